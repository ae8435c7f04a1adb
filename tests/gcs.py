"""A local Google Cloud Storage for the tests: an emulator and the proxy TensorFlow needs.

`gcp-storage-emulator` serves the JSON API on loopback. Beam's GcsIO, the
google-cloud-storage client and pyarrow find it through STORAGE_EMULATOR_HOST.
TensorFlow's own GCS file system (checkpoints, summaries, SavedModels,
`tf.io.gfile`) has its endpoints compiled in (https://www.googleapis.com and
https://storage.googleapis.com), so it reaches the emulator the way it would
reach Google behind a corporate proxy: `https_proxy` points at `TlsProxy`, which
answers CONNECT with a certificate for those hosts signed by a throw-away CA
(given to TensorFlow's curl through CURL_CA_BUNDLE) and forwards each request to
the emulator. GOOGLE_AUTH_TOKEN_FOR_TESTING stands in for TensorFlow's credentials;
Beam's (google-auth) are a test "authorized_user" file whose token refresh the
proxy answers itself.
"""

from __future__ import annotations

import datetime
import http.client
import http.server
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests import gcs_xml

GOOGLE_HOSTS = ["www.googleapis.com", "storage.googleapis.com", "oauth2.googleapis.com"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_ca_and_cert(folder: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, cert.pem, key.pem): a CA and a server certificate for GOOGLE_HOSTS."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    life = (now - datetime.timedelta(days=1), now + datetime.timedelta(days=2))

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test GCS CA"))
        .issuer_name(name("test GCS CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(life[0])
        .not_valid_after(life[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name(GOOGLE_HOSTS[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(life[0])
        .not_valid_after(life[1])
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(h) for h in GOOGLE_HOSTS]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    """CONNECT opens TLS and serves the tunnel with this same handler; every other
    request is sent on to the emulator with its Host rewritten, its body whole
    (curl sends chunked uploads, which the emulator stores with their framing)."""

    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_CONNECT(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        tls = self.server.tls.wrap_socket(self.connection, server_side=True)
        try:
            _ProxyHandler(tls, self.client_address, self.server)
        finally:
            self.close_connection = True

    def _forward(self) -> None:
        if self.headers.get("Host", "").startswith("oauth2.googleapis.com"):
            return self._token()
        path = self.path
        if "://" in path:  # absolute form (plain http through the proxy)
            path = "/" + path.split("://", 1)[1].split("/", 1)[1]
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = self._read_chunked()
        else:
            body = self.rfile.read(length) if length else None
        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower() not in ("host", "proxy-connection", "transfer-encoding", "connection")
        }
        if body is not None:
            headers["Content-Length"] = str(len(body))
        # The emulator builds upload URLs from Host: the next request comes here too.
        headers["Host"] = f"127.0.0.1:{self.server.server_address[1]}"
        conn = http.client.HTTPConnection("127.0.0.1", self.server.emulator_port, timeout=120)
        try:
            conn.request(self.command, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        self.send_response(response.status, response.reason)
        for k, v in response.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _token(self) -> None:
        """google-auth refreshing the test credentials: a token the emulator ignores."""
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps(
            {"access_token": "test-token", "expires_in": 3600, "token_type": "Bearer"}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            size = int(self.rfile.readline().split(b";")[0], 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(out)
            out += self.rfile.read(size)
            self.rfile.readline()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward  # noqa: N815


class _ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, emulator_port: int, tls: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.emulator_port = emulator_port
        self.tls = tls


@contextmanager
def tls_proxy(emulator_port: int, cert: Path, key: Path) -> Iterator[int]:
    """A forwarding proxy on loopback for TensorFlow's curl; yields its port."""
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server = _ProxyServer(emulator_port, tls)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def wait_for_port(port: int, process: subprocess.Popen, log: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the GCS emulator ended:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the GCS emulator did not start in {seconds} s:\n{log.read_text()}")


@contextmanager
def gcs_emulator(folder: Path, bucket: str) -> Iterator[dict[str, str]]:
    """Starts the emulator with `bucket` and the TLS proxy; yields the environment
    that points Beam, google-auth and TensorFlow (in this process and its children) at it."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = folder / "emulator.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.gcs", str(port), bucket],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).parent.parent,
        )
    try:
        wait_for_port(port, process, log)
        ca, cert, key = write_ca_and_cert(folder)
        adc = folder / "credentials.json"  # Beam asks google-auth for credentials first
        adc.write_text(
            json.dumps(
                {
                    "type": "authorized_user",
                    "client_id": "test",
                    "client_secret": "test",
                    "refresh_token": "test",
                }
            )
        )
        with tls_proxy(port, cert, key) as proxy_port:
            proxy = f"http://127.0.0.1:{proxy_port}"
            yield {
                "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
                "https_proxy": proxy,
                "http_proxy": proxy,
                "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost",
                "CURL_CA_BUNDLE": str(ca),  # TensorFlow's curl
                "REQUESTS_CA_BUNDLE": str(ca),  # google-auth's token refresh
                "GOOGLE_APPLICATION_CREDENTIALS": str(adc),
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
                "GOOGLE_CLOUD_PROJECT": "test-project",
            }
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def serve(port: int, bucket: str) -> None:
    """Runs the emulator in memory, with two fixes:
    - an empty object (TensorFlow's folder marker) arrives with no body, which the
      emulator reads as None;
    - `ifGenerationMatch` on uploads and deletes is honoured as GCS does (412 when the
      object's generation differs; 0: the object must not exist), atomically: the
      output lease of extract_features (`beam_jobs.lease`) rests on it;
    and the XML API that delta-rs sends for the caption table (`tests.gcs_xml`)."""
    from http import HTTPStatus

    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    media_upload = objects._media_upload

    def empty_body_is_empty(request, response, storage):  # noqa: ANN001
        if request.data is None:
            request._data = b""
        return media_upload(request, response, storage)

    objects._media_upload = empty_body_is_empty  # looked up by name in objects.insert
    lock = gcs_xml.LOCK  # one lock for every conditional write, JSON or XML

    def object_name(request) -> str:  # noqa: ANN001
        if "object_id" in request.params:
            return request.params["object_id"]
        if "name" in request.query:
            return request.query["name"][0]
        data = request.data if isinstance(request.data, dict) else {}
        return (data.get("meta") or data).get("name", "")

    def with_preconditions(handler):  # noqa: ANN001, ANN202
        def handle(request, response, storage, *args, **kwargs):  # noqa: ANN001, ANN202
            wanted = request.query.get("ifGenerationMatch")
            if not wanted:
                return handler(request, response, storage, *args, **kwargs)
            with lock:  # the check and the write as one step
                try:
                    obj = storage.get_file_obj(request.params["bucket_name"], object_name(request))
                    generation = str(obj["generation"])
                except NotFound:
                    generation = "0"
                if generation != wanted[0]:
                    response.status = HTTPStatus.PRECONDITION_FAILED
                    response.json({"error": {"code": 412, "message": "conditionNotMet"}})
                    return None
                return handler(request, response, storage, *args, **kwargs)

        return handle

    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler in (objects.insert, objects.delete):
                handlers[method] = with_preconditions(handler)
    gcs_xml.install(server)  # delta-rs (object_store) speaks the XML API
    emulator = server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    emulator.run()


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2])
