"""A real HTTP server on loopback that serves images with the faults the web has.

    with FaultServer(images) as server:   # images: name -> JPEG bytes
        server.url("img/a.jpg")           # 200
        server.url("status/404")          # 404
        server.url("flaky/a.jpg")         # 500 the first time, then the image
        server.url("busy/a.jpg")          # 429 + Retry-After: 1 the first time, then the image
        server.url("slow/a.jpg")          # the body trickles past any short timeout
        server.url("reset/a.jpg")         # half the body, then a TCP reset
        server.url("loop/a")              # redirects to loop/b, which redirects back
        server.url("hop/a.jpg")           # one redirect, to img/a.jpg
        server.url("big")                 # Content-Length over any small --max_bytes
        server.url("endless")             # a chunked body that never ends
        server.url("html/a.jpg")          # an HTML page served for a .jpg
        server.url("typed/a.jpg")         # the image, with Content-Type text/plain
        server.url("delay/a.jpg")         # the image after `delay` seconds

`server.healthy = True` makes slow/ and reset/ serve the image at once (a host that came
back). `server.hits` counts requests per path; `server.agents` holds the User-Agents seen.
"""

from __future__ import annotations

import collections
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FaultServer:
    def __init__(self, images: dict[str, bytes], delay: float = 0.0):
        self.images = images
        self.delay = delay
        self.healthy = False
        self.hits: collections.Counter[str] = collections.Counter()
        self.agents: set[str] = set()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.lstrip("/")
                with server.lock:
                    server.hits[path] += 1
                    seen = server.hits[path]
                    server.agents.add(self.headers.get("User-Agent", ""))
                server.answer(self, path, seen)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *a: None  # a client that gave up is no news

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{path}"

    def __enter__(self) -> FaultServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, h: BaseHTTPRequestHandler, path: str, seen: int) -> None:
        kind, _, name = path.partition("/")
        image = self.images.get(name.split("?")[0], b"")
        if kind == "img" and image:
            return send(h, 200, image)
        if kind == "status":
            return send(h, int(name), b"no")
        if kind == "flaky":
            return send(h, 500, b"oops") if seen == 1 else send(h, 200, image)
        if kind == "busy":
            if seen == 1:
                return send(h, 429, b"slow down", {"Retry-After": "1"})
            return send(h, 200, image)
        if kind == "slow" and not self.healthy:
            return trickle(h, image)
        if kind == "reset" and not self.healthy:
            return reset(h, image)
        if kind in ("slow", "reset"):
            return send(h, 200, image)
        if kind == "loop":
            return send(h, 302, b"", {"Location": "/loop/" + ("b" if name == "a" else "a")})
        if kind == "hop":
            return send(h, 301, b"", {"Location": f"/img/{name}"})
        if kind == "big":
            return send(h, 200, b"x" * 300_000)
        if kind == "endless":
            return endless(h)
        if kind == "html":
            return send(
                h, 200, b"<html><body>no image</body></html>", {"Content-Type": "text/html"}
            )
        if kind == "typed":
            return send(h, 200, image, {"Content-Type": "text/plain"})
        if kind == "delay":
            time.sleep(self.delay)
            return send(h, 200, image)
        return send(h, 404, b"not found")


def send(h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict | None = None) -> None:
    h.send_response(status)
    headers = {"Content-Type": "image/jpeg", **(headers or {})}
    for k, v in headers.items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def trickle(h: BaseHTTPRequestHandler, body: bytes) -> None:
    h.send_response(200)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    try:
        for i in range(0, len(body), 64):
            h.wfile.write(body[i : i + 64])
            h.wfile.flush()
            time.sleep(0.3)
    except OSError:
        pass  # the client gave up


def reset(h: BaseHTTPRequestHandler, body: bytes) -> None:
    h.send_response(200)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body[: len(body) // 2])
    h.wfile.flush()
    h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    h.connection.close()  # SO_LINGER 0: the close is a RST
    h.close_connection = True


def endless(h: BaseHTTPRequestHandler) -> None:
    h.send_response(200)
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    chunk = b"y" * 8192
    try:
        while True:
            h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    except OSError:
        pass
