"""The XML API requests of `object_store` (delta-rs's storage layer), answered by the emulator.

`gcp-storage-emulator` serves GCS's JSON API, which Beam's GcsIO and Google's clients
use. delta-rs reaches GCS through `object_store`, which speaks the XML API
(`src/gcp/client.rs` there): objects at `/BUCKET/OBJECT` (GET with Range, HEAD, PUT,
DELETE), copies as a PUT with `x-goog-copy-source`, put-if-absent as
`x-goog-if-generation-match: 0` (the Delta log's commit rests on it), and listings as
`GET /BUCKET?list-type=2&prefix=…` answered with an S3-style `ListBucketResult`. These
handlers answer them over the emulator's own storage, so a file Beam writes through the
JSON API is the object delta-rs reads.

`install` also makes the emulator serve requests in threads, as GCS does (one at a time,
a client killed mid-request would hold every other one up), and drop a connection idle
for 30 s; a precondition check and its write hold `LOCK`, so they are one step.
"""

from __future__ import annotations

import datetime
import email.utils
import threading
import types
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote
from xml.sax.saxutils import escape

VERSION_MATCH = "x-goog-if-generation-match"
LOCK = threading.Lock()  # conditional writes: the check and the write as one step


def _rfc2822(updated: str) -> str:
    when = datetime.datetime.strptime(updated, "%Y-%m-%dT%H:%M:%S.%fZ")
    return email.utils.format_datetime(when.replace(tzinfo=datetime.UTC), usegmt=True)


def _object_headers(response: Any, obj: dict[str, Any]) -> None:
    response["ETag"] = f'"{obj["generation"]}"'
    response["x-goog-generation"] = str(obj["generation"])
    response["Last-Modified"] = _rfc2822(obj["updated"])


def _not_found(response: Any) -> None:
    response.status = HTTPStatus.NOT_FOUND
    response["Content-type"] = "application/xml"
    response._content = "<Error><Code>NoSuchKey</Code></Error>"


def _generation(storage: Any, bucket: str, name: str) -> str:
    from gcp_storage_emulator.exceptions import NotFound

    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return "0"


def get(request: Any, response: Any, storage: Any, download: Any) -> None:
    """GET or HEAD of an object (Range honoured by the emulator's own download)."""
    from gcp_storage_emulator.exceptions import NotFound

    bucket, name = request.params["bucket_name"], request.params["object_id"]
    try:
        obj = storage.get_file_obj(bucket, name)
    except NotFound:
        return _not_found(response)
    download(request, response, storage)
    _object_headers(response, obj)


def put(request: Any, response: Any, storage: Any) -> None:
    """An upload or, with x-goog-copy-source, a copy; either conditioned on the target's
    generation when x-goog-if-generation-match is sent (0: the target must not exist)."""
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    bucket, name = request.params["bucket_name"], request.params["object_id"]
    source = request.get_header("x-goog-copy-source")
    try:
        if source:
            source_bucket, source_name = unquote(source.lstrip("/")).split("/", 1)
            data = storage.get_file(source_bucket, source_name)
        else:
            data = request.data or b""  # read before the lock: a slow client holds no one
    except NotFound:
        return _not_found(response)
    content_type = request.get_header("Content-Type", "application/octet-stream")
    obj = objects._make_object_resource(
        request.base_url, bucket, name, content_type, str(len(data))
    )
    obj = objects._checksums(data, obj)
    wanted = request.get_header(VERSION_MATCH)
    with LOCK:
        if wanted is not None and _generation(storage, bucket, name) != wanted:
            response.status = HTTPStatus.PRECONDITION_FAILED
            response._content = "<Error><Code>PreconditionFailed</Code></Error>"
            return None
        try:
            storage.create_file(bucket, name, data, obj)
        except NotFound:
            return _not_found(response)
        _object_headers(response, storage.get_file_obj(bucket, name))


def delete(request: Any, response: Any, storage: Any) -> None:
    from gcp_storage_emulator.exceptions import NotFound

    try:
        storage.delete_file(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
        return _not_found(response)
    response.status = HTTPStatus.NO_CONTENT


def list_objects(request: Any, response: Any, storage: Any) -> None:
    """`GET /BUCKET?list-type=2`: every match in one page (no continuation token)."""
    from gcp_storage_emulator.exceptions import NotFound

    query = {k: v[0] for k, v in request.query.items()}
    if query.get("list-type") != "2":
        response.status = HTTPStatus.NOT_IMPLEMENTED
        return
    prefix, delimiter = query.get("prefix"), query.get("delimiter")
    try:
        objs, prefixes = storage.get_file_list(request.params["bucket_name"], prefix, delimiter)
    except NotFound:
        return _not_found(response)
    after = query.get("start-after")
    contents = "".join(
        f"<Contents><Key>{escape(o['name'])}</Key><Size>{o['size']}</Size>"
        f"<LastModified>{o['updated']}</LastModified>"
        f'<ETag>"{o["generation"]}"</ETag></Contents>'
        for o in objs
        if after is None or o["name"] > after
    )
    common = "".join(
        f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in prefixes
    )
    response["Content-type"] = "application/xml"
    response._content = (
        '<?xml version="1.0" encoding="UTF-8"?><ListBucketResult>'
        f"<Name>{escape(request.params['bucket_name'])}</Name>{contents}{common}"
        "</ListBucketResult>"
    )


def install(server: Any) -> None:
    """Adds the XML API to the emulator's routes (and HEAD to its request handler)."""
    from gcp_storage_emulator.handlers import objects

    download = objects.download
    public = r"^/(?P<bucket_name>[-.\w]+)/(?P<object_id>.*[^/]+)$"
    routes = []
    for regex, handlers in server.HANDLERS:
        if regex == public:
            handlers = {
                "GET": lambda q, r, s, *a, **k: get(q, r, s, download),
                "HEAD": lambda q, r, s, *a, **k: get(q, r, s, download),
                "PUT": put,
                "DELETE": delete,
            }
        routes.append((regex, handlers))
    routes.append((r"^/(?P<bucket_name>[-.\w]+)$", {"GET": list_objects}))
    server.HANDLERS = tuple(routes)

    def do_head(handler: Any) -> None:
        server.Router(handler).handle("HEAD")

    server.RequestHandler.do_HEAD = do_head
    server.RequestHandler.timeout = 30  # a client killed mid-request: its socket is dropped

    class ThreadingHTTPServer(server.server.ThreadingHTTPServer):
        daemon_threads = True

    # `APIThread.run` builds `server.HTTPServer(...)` from the module it imported as `server`
    server.server = types.SimpleNamespace(
        **{**vars(server.server), "HTTPServer": ThreadingHTTPServer}
    )
    close = server.Response.close

    def close_without_body_for_head(response: Any) -> None:
        if response._handler.command != "HEAD":
            return close(response)
        content = response._content
        size = len(content.encode() if isinstance(content, str) else content)
        response._handler.send_response(response.status.value, response.status.phrase)
        for k, v in response._headers.items():
            response._handler.send_header(k, v)
        response._handler.send_header("Content-Length", str(size))
        response._handler.end_headers()

    server.Response.close = close_without_body_for_head
