"""HTTP(S) inputs, fetched on the workers the way img2dataset fetches them.

One `Fetcher` per worker process (`fetcher_for`, shared by every DoFn instance and
thread there) holds a urllib3 pool, so
connections to a host are reused across images; at most `per_host` requests go to one
host at a time. Every request carries a `User-Agent` naming the project and nothing
else: no cookies, no credentials. A failed fetch raises `ImageError` with a kind the
caption table's `error_type` column keeps:

    http_404, http_500, ...  the server's final answer (429 and 5xx are retried first)
    http_timeout             connect, a read, or the whole attempt took over `timeout`
    http_connection          refused, reset, or closed before the body ended
    too_large                Content-Length or the bytes streamed so far > `max_bytes`
    redirect_loop            more than `max_redirects` redirects, or one seen before
    unsupported_uri          a redirect to another scheme (file://, ftp://, ...)

429, 5xx, timeouts and broken connections are tried again up to `retries` times,
waiting `backoff * 2**attempt` seconds or what `Retry-After` asks (up to `max_wait`);
the kinds left after that are transient (`model.io.formats.TRANSIENT_ERRORS`), so a
`--skip_existing` run tries them again.
"""

from __future__ import annotations

import email.utils
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

from model.defaults import FETCH_RETRIES, FETCH_TIMEOUT, MAX_BYTES, MAX_REDIRECTS, PER_HOST
from model.images.preprocess import ImageError
from model.io.storage import uri_scheme

if TYPE_CHECKING:
    from urllib3 import BaseHTTPResponse

USER_AGENT = "show-attend-tell-captioner/1.0 (bulk image captioning; Beam caption_images)"
HTTP_SCHEMES = ("http", "https")
REDIRECTS = (301, 302, 303, 307, 308)
RETRIED_STATUSES = (408, 429, 500, 502, 503, 504)
CHUNK = 64 * 1024


@dataclass(frozen=True)
class FetchSettings:
    """How the workers fetch http(s) inputs (`--fetch_timeout`, `--fetch_retries`, ...)."""

    timeout: float = FETCH_TIMEOUT  # seconds an attempt may take, connect to last byte
    retries: int = FETCH_RETRIES  # further attempts after a retried failure
    max_redirects: int = MAX_REDIRECTS
    per_host: int = PER_HOST  # requests in flight to one host, per worker process
    max_bytes: int = MAX_BYTES
    backoff: float = 0.5  # seconds before the first retry; doubles each time
    max_wait: float = 60.0  # a longer Retry-After is not waited for: the row is transient

    @classmethod
    def from_flags(cls, args: Any, max_bytes: int) -> FetchSettings:
        """From the flags of `model.cli.add_fetch_flags`."""
        return cls(
            timeout=args.fetch_timeout,
            retries=args.fetch_retries,
            max_redirects=args.max_redirects,
            per_host=args.per_host,
            max_bytes=max_bytes,
        )


def is_http(uri: str) -> bool:
    """An http:// or https:// URL (fetched, not read through a file system)."""
    return uri_scheme(uri) in HTTP_SCHEMES


class RetryableError(Exception):
    """A failure worth another attempt: the error it ends as, and the wait the server asked."""

    def __init__(self, error: ImageError, wait: float | None = None):
        super().__init__(str(error))
        self.error = error
        self.wait = wait


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a `Retry-After` header asks for (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class Fetcher:
    """Fetches http(s) uris with connection reuse, a per-host cap, retries and limits."""

    def __init__(self, settings: FetchSettings):
        import urllib3

        self.settings = settings
        self.pool = urllib3.PoolManager(
            num_pools=64,
            maxsize=settings.per_host,
            headers={"User-Agent": USER_AGENT},
            retries=False,
        )
        self._slots: dict[str, threading.BoundedSemaphore] = defaultdict(
            lambda: threading.BoundedSemaphore(settings.per_host)
        )
        self._lock = threading.Lock()

    def _slot(self, host: str) -> threading.BoundedSemaphore:
        with self._lock:
            return self._slots[host]

    def fetch(self, url: str) -> bytes:
        """The body of `url`; raises ImageError naming why there is none."""
        s = self.settings
        for attempt in range(s.retries + 1):
            try:
                with self._slot(urlsplit(url).netloc.lower()):
                    return self._attempt(url)
            except RetryableError as retry:
                wait = s.backoff * 2**attempt if retry.wait is None else retry.wait
                if attempt == s.retries or wait > s.max_wait:
                    raise retry.error from None
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _attempt(self, url: str) -> bytes:
        import urllib3

        s = self.settings
        deadline = time.monotonic() + s.timeout
        seen = {url}
        try:
            while True:
                response = self.pool.request(
                    "GET",
                    url,
                    preload_content=False,
                    redirect=False,
                    retries=False,
                    timeout=urllib3.Timeout(connect=s.timeout, read=s.timeout),
                )
                try:
                    if response.status == 200:
                        return self._body(response, deadline)
                    done_with(response)
                    if response.status not in REDIRECTS:
                        raise self._status_error(url, response)
                    url = self._next(url, response.headers.get("Location"), seen)
                finally:
                    response.release_conn()
        except urllib3.exceptions.LocationParseError as e:
            raise ImageError("bad_url", f"not a valid URL: {e}") from None
        except (urllib3.exceptions.TimeoutError, TimeoutError) as e:
            raise RetryableError(ImageError("http_timeout", f"{url}: {_reason(e)}")) from None
        except urllib3.exceptions.SSLError as e:
            raise ImageError("http_tls", f"{url}: {_reason(e)}") from None
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise RetryableError(ImageError("http_connection", f"{url}: {_reason(e)}")) from None

    def _next(self, url: str, location: str | None, seen: set[str]) -> str:
        if not location:
            raise ImageError("bad_redirect", f"{url}: a redirect without a Location header")
        target = urljoin(url, location)
        if urlsplit(target).scheme.lower() not in HTTP_SCHEMES:
            raise ImageError("unsupported_uri", f"{url} redirects to {target}: not http(s)")
        if target in seen or len(seen) > self.settings.max_redirects:
            raise ImageError(
                "redirect_loop",
                f"{url}: {len(seen)} redirects without an image (a loop, or over "
                f"{self.settings.max_redirects})",
            )
        seen.add(target)
        return target

    def _status_error(self, url: str, response: BaseHTTPResponse) -> Exception:
        status = response.status
        error = ImageError(f"http_{status}", f"HTTP {status} {response.reason or ''} from {url}")
        if status in RETRIED_STATUSES:
            return RetryableError(error, retry_after(response.headers.get("Retry-After")))
        return error

    def _body(self, response: BaseHTTPResponse, deadline: float) -> bytes:
        """The body, streamed: refused once it passes `max_bytes` or the attempt's deadline
        (a server that trickles bytes, or never stops sending, holds no thread for long)."""
        limit = self.settings.max_bytes
        declared = response.headers.get("Content-Length")
        chunks, size = [], 0
        try:
            if declared and declared.isdigit() and int(declared) > limit:
                raise ImageError("too_large", f"Content-Length {declared} > --max_bytes {limit}")
            # read1: whatever has arrived, up to CHUNK (stream() waits for whole chunks,
            # so a body trickling in held the thread until it ended, deadline or not).
            while chunk := response.read1(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise ImageError("too_large", f"the body passed --max_bytes {limit}")
                if time.monotonic() > deadline:
                    raise RetryableError(
                        ImageError(
                            "http_timeout",
                            f"the body took over --fetch_timeout {self.settings.timeout:g}s "
                            f"({size} bytes so far)",
                        )
                    )
                chunks.append(chunk)
        except BaseException:
            response.close()  # a connection with a body left in it serves nothing more
            raise
        return b"".join(chunks)


def done_with(response: BaseHTTPResponse) -> None:
    """Reads a short answer's body so its connection serves the next request; a long
    one's connection is closed instead."""
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) <= CHUNK:
        response.drain_conn()
    else:
        response.close()


_FETCHERS: dict[FetchSettings, Fetcher] = {}
_FETCHERS_LOCK = threading.Lock()


def fetcher_for(settings: FetchSettings) -> Fetcher:
    """This process's Fetcher for `settings`: one pool and one per-host cap however many
    DoFn instances and threads the runner gives the process."""
    with _FETCHERS_LOCK:
        if settings not in _FETCHERS:
            _FETCHERS[settings] = Fetcher(settings)
        return _FETCHERS[settings]


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None) or error
    return f"{type(reason).__name__}: {reason}"
