"""Bulk-captioning inputs: folders, globs and .tar/.tar.gz/.zip archives, read in memory.

Archive members are streamed (tar in 'r|*' mode, zip through a seekable
handle) and never extracted: a member is only ever a byte string with a uri
`ARCHIVE_URI!/member`. Directory entries are not inputs. Links, archives inside
the archive, members larger than `max_bytes` and names with `..` or an absolute
path become error rows instead of being read. A zip member that fails its CRC
is an error row and the next member is read; a tar stream that breaks ends
with one `bad_archive` row saying how many members came before the damage.
Plain files that are not regular files (FIFOs, devices, sockets) or are larger
than `max_bytes` (local or in an object store) become error rows before a byte
is read.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import posixpath
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from apache_beam.io.filesystems import FileSystems

from beam_jobs.paths import absolute, is_local
from model.defaults import MAX_BYTES
from model.images.fetch import HTTP_SCHEMES
from model.images.preprocess import ImageError
from model.io.storage import uri_scheme

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
ARCHIVE_EXTENSIONS = (".tar", ".tar.gz", ".tgz", ".zip")
MEMBER_SEPARATOR = "!/"
# Schemes whose uris are read through Beam's FileSystems; http(s) is fetched
# (`model.images.fetch`); any other (file://, ftp://, data:...) in a table is refused as a row.
STORE_SCHEMES = ("gs", "s3", "az", "hdfs")


@dataclass(frozen=True)
class Item:
    """One input: its bytes, why there are none, or (a plain file not read yet) neither.
    A row of an input table also has its `key` and its kept columns (name, value)."""

    uri: str
    data: bytes | None = None
    error_type: str | None = None
    message: str = ""
    key: str | None = None  # None: the uri is the key
    kept: tuple[tuple[str, Any], ...] = ()

    @property
    def identity(self) -> str:
        return self.uri if self.key is None else self.key


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_EXTENSIONS)


def _is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def path_exists(path: str) -> bool:
    """A file or a folder; on an object store, which has no folders, a prefix with at
    least one object under it."""
    if FileSystems.exists(path):
        return True
    if is_local(path):
        return False
    listing = FileSystems.match([path.rstrip("/") + "/**"], limits=[1])[0].metadata_list
    return bool(listing)


BRACES = re.compile(r"\{([^{}]*)\}")


def expand_braces(spec: str) -> list[str]:
    """WebDataset's shard patterns: `{00000..00099}` (zero-padded as written) and `{a,b}`,
    any number of them; a spec without them is itself."""
    found = next((m for m in BRACES.finditer(spec) if ".." in m[1] or "," in m[1]), None)
    if found is None:
        return [spec]
    head, tail, body = spec[: found.start()], spec[found.end() :], found[1]
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        lo, hi = numbers[1], numbers[2]
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        choices = [str(n).zfill(width) for n in range(int(lo), int(hi) + step, step)]
    else:
        choices = body.split(",")
    return [out for c in choices for out in expand_braces(head + c + tail)]


def match_input(spec: str) -> list[str]:
    """Expands one --input into file paths: a glob, a folder (recursive, images only), a
    file, or a WebDataset brace pattern (`shards/{00000..00099}.tar`) of any of these.

    A path that exists is that path, even with glob characters in its name (`img[1].jpg`,
    a folder `photos [1]`); a pattern is a pattern only when nothing has its name.
    Local paths come back absolute and normalised (no `.`, `..` or `//`), so one file
    spelled several ways is one uri."""
    specs = [spec] if path_exists(absolute(spec)) else expand_braces(spec)
    if len(specs) > 1:
        return sorted({path for s in specs for path in match_input(s)})
    spec = absolute(spec)
    if _is_glob(spec) and not path_exists(spec):
        return sorted(m.path for r in FileSystems.match([spec]) for m in r.metadata_list)
    folder = spec.rstrip("/")
    listing = None if is_local(spec) else FileSystems.match([folder + "/**"])[0].metadata_list
    if listing is None:
        if os.path.isdir(folder):
            return sorted(walk_folder(folder))
        return [spec] if os.path.exists(spec) else []
    files = [m.path for m in listing if is_image_name(m.path) or is_archive_name(m.path)]
    return sorted(files) or ([spec] if FileSystems.exists(spec) else [])


def walk_folder(folder: str) -> Iterator[str]:
    """A local folder's image and archive files, recursively, under their real names
    first: links to folders are followed only after every real folder is read, and a
    link to a folder already read (a second name for it, or a cycle) is not entered. A
    folder that cannot be listed, or such a link, comes back as its own path, which
    `read_path` turns into an error row naming the cause, so nothing under it goes
    missing without a word."""
    seen: set[str] = set()
    links: list[str] = []

    def visit(path: str) -> Iterator[str]:
        seen.add(os.path.realpath(path))
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:
            yield path  # unreadable
            return
        for entry in entries:
            if entry.is_dir(follow_symlinks=True):
                if entry.is_symlink():
                    links.append(entry.path)
                else:
                    yield from visit(entry.path)
            elif is_image_name(entry.name) or is_archive_name(entry.name):
                yield entry.path

    yield from visit(folder)
    while links:
        link = links.pop(0)
        if os.path.realpath(link) in seen:
            yield link  # its folder is read under another name
        else:
            yield from visit(link)


def unsafe_member(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":")


def _member_item(uri: str, name: str, size: int, kind: str, max_bytes: int) -> Item | None:
    """The error row of a member that must not be read, or None to read it."""
    if unsafe_member(name):
        return Item(
            uri, error_type="unsafe_path", message=f"member name escapes the archive: {name!r}"
        )
    if kind != "file":
        return Item(uri, error_type="not_a_file", message=f"archive member is a {kind}")
    if is_archive_name(name):
        return Item(
            uri,
            error_type="nested_archive",
            message="an archive inside an archive is not opened; extract it and pass it as --input",
        )
    if size > max_bytes:
        return Item(uri, error_type="too_large", message=f"{size} bytes > --max_bytes {max_bytes}")
    return None


def _is_input(name: str) -> bool:
    return is_image_name(name) or is_archive_name(name)


class MemberUris:
    """Each member's uri `ARCHIVE!/NAME`, unique within the archive: a name that comes
    again (tar and zip both allow it; WebDataset and hand-made tars hold such) is
    `NAME#2`, `NAME#3`, ... in archive order, so every member is its own row."""

    def __init__(self, path: str):
        self.path = path
        self.used: set[str] = set()

    def __call__(self, name: str) -> str:
        uri, n = f"{self.path}{MEMBER_SEPARATOR}{name}", 1
        while uri in self.used:
            n += 1
            uri = f"{self.path}{MEMBER_SEPARATOR}{name}#{n}"
        self.used.add(uri)
        return uri


def _tar_kind(m: tarfile.TarInfo) -> str:
    if m.isfile():
        return "file"
    if m.issym() or m.islnk():
        return "link"
    return "directory" if m.isdir() else "special file"


def read_tar(
    path: str, max_bytes: int = MAX_BYTES, keep: Sequence[tuple[str, str]] = ()
) -> Iterator[Item]:
    """A tar's image members, streamed; WebDataset samples (`Samples`) keyed by sample."""
    samples = Samples(keep)
    try:
        with FileSystems.open(path, compression_type="uncompressed") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
            f.seek(0)
            # tarfile's own gzip reader takes a truncated stream for the archive's end;
            # GzipFile, drained below, raises on it and on a bad CRC.
            stream = gzip.GzipFile(fileobj=f, mode="rb") if gzipped else f
            with tarfile.open(fileobj=stream, mode="r|" if gzipped else "r|*") as tar:
                member_uri = MemberUris(path)
                for m in tar:
                    if m.isfile() and is_sidecar(m.name) and m.size <= SIDECAR_BYTES:
                        yield from samples.add(m.name, sidecar=tar.extractfile(m).read())
                    if m.isdir() or (m.isfile() and not _is_input(m.name)):
                        continue  # like folders: only image files are inputs
                    uri = member_uri(m.name)
                    refused = _member_item(uri, m.name, m.size, _tar_kind(m), max_bytes)
                    item = refused or Item(uri, data=tar.extractfile(m).read())
                    yield from samples.add(m.name, item)
            yield from samples.flush()
            while gzipped and stream.read(1 << 20):
                pass
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        # A stream cannot be read past its damage: the members after it are unknown.
        yield from samples.flush()
        done = samples.count
        where = f"after {done} member(s)" if done else "before any member"
        yield Item(
            path, error_type="bad_archive", message=f"archive unreadable {where}: {describe(e)}"
        )


SIDECAR_EXTENSIONS = (".json", ".txt", ".cls")
SIDECAR_BYTES = 1 << 20


def is_sidecar(name: str) -> bool:
    return name.lower().endswith(SIDECAR_EXTENSIONS)


def sample_key(name: str) -> tuple[str, str]:
    """A WebDataset member name as (sample key, extension): `dir/000123.seg.png` is
    (`dir/000123`, `seg.png`), as WebDataset's own readers split it."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext if dot else ""


class Samples:
    """A tar's members grouped as WebDataset groups them: consecutive members that share a
    sample key are one sample. A sample with a `.json`, `.txt` or `.cls` member beside its
    image is a WebDataset sample: its image's row is keyed by the sample key (the only
    image, else `KEY.EXT`) and keeps, of `keep` ((field, column) pairs), the JSON's
    fields and the text members (named by extension) as text. Images with no such member
    are plain archive members (keyed by uri). One sample is held at a time."""

    def __init__(self, keep: Sequence[tuple[str, str]] = ()):
        self.keep = tuple(keep)
        self.key: str | None = None
        self.items: list[tuple[str, Item]] = []
        self.sidecars: dict[str, bytes] = {}
        self.count = 0

    def add(self, name: str, item: Item | None = None, sidecar: bytes = b"") -> Iterator[Item]:
        key, ext = sample_key(name)
        if key != self.key:
            yield from self.flush()
            self.key = key
        if item is not None:
            self.items.append((ext, item))
        else:
            self.sidecars[ext.lower()] = sidecar

    def flush(self) -> Iterator[Item]:
        items, sidecars, key = self.items, self.sidecars, self.key
        self.items, self.sidecars, self.key = [], {}, None
        for ext, item in items:
            if sidecars and key is not None:
                own = key if len(items) == 1 else f"{key}.{ext}"
                item = dataclasses.replace(item, key=own, kept=sample_fields(sidecars, self.keep))
            self.count += 1
            yield item


def sample_fields(
    sidecars: dict[str, bytes], keep: Sequence[tuple[str, str]]
) -> tuple[tuple[str, Any], ...]:
    """The `keep` values of a WebDataset sample: fields of its JSON member (as text: JSON
    values other than strings as JSON), else its text members by extension."""
    import json

    fields: dict[str, Any] = {}
    for ext, data in sidecars.items():
        text = data.decode("utf-8", "replace")
        if ext == "json":
            try:
                record = json.loads(text)
            except ValueError:
                continue
            if isinstance(record, dict):
                for k, v in record.items():
                    if v is not None:
                        fields.setdefault(k, v if isinstance(v, str) else json.dumps(v))
        else:
            fields[ext] = text.strip()
    return tuple((column, fields.get(field)) for field, column in keep)


def _zip_kind(info: zipfile.ZipInfo) -> str:
    if info.is_dir():
        return "directory"
    mode = (info.external_attr >> 16) & 0o170000
    return "link" if mode == 0o120000 else "file"


def read_zip(path: str, max_bytes: int = MAX_BYTES) -> Iterator[Item]:
    try:
        with FileSystems.open(path, compression_type="uncompressed") as f, zipfile.ZipFile(f) as z:
            member_uri = MemberUris(path)
            for info in z.infolist():
                kind = _zip_kind(info)
                if kind == "directory" or (kind == "file" and not _is_input(info.filename)):
                    continue
                uri = member_uri(info.filename)
                refused = _member_item(uri, info.filename, info.file_size, kind, max_bytes)
                if refused:
                    yield refused
                    continue
                try:  # the central directory lists every member: one bad one is one row
                    yield bounded_member(z, info, uri, max_bytes)
                except RuntimeError as e:  # encrypted
                    yield Item(uri, error_type="encrypted", message=describe(e))
                except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
                    yield Item(uri, error_type="corrupt", message=describe(e))
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        yield Item(path, error_type="bad_archive", message=f"not a readable zip: {describe(e)}")


def bounded_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, uri: str, max_bytes: int) -> Item:
    """A zip member read through a bounded stream: at most `max_bytes` + 1 bytes are ever
    inflated, whatever its directory entry claims (`ZipFile.read` inflates up to 2 GiB
    per call, so a zip bomb whose entry claims 100 bytes takes gigabytes)."""
    with z.open(info) as member:
        data = member.read(max_bytes + 1)
    if len(data) > max_bytes:
        return Item(uri, error_type="too_large", message=f"inflates to > --max_bytes {max_bytes}")
    return Item(uri, data=data)


def printable_uri(uri: str) -> str | None:
    """None when `uri` is valid UTF-8 text; else the name with its undecodable bytes as \\xNN
    (a file name that is not UTF-8 cannot be a Parquet string or a Beam key)."""
    try:
        uri.encode("utf-8")
        return None
    except UnicodeEncodeError:
        try:
            return uri.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            return uri.encode("utf-8", "backslashreplace").decode("utf-8")


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def check_plain_file(path: str, max_bytes: int = MAX_BYTES) -> None:
    """Refuses, before reading, a path that holds more than `max_bytes` or (locally) is not
    a regular file (a FIFO would block forever). An object's size comes from the store's
    metadata. Raises ImageError; OSError (or Beam's IO error) if it is missing."""
    if not is_local(path):
        size = FileSystems.get_filesystem(path).size(path)
    else:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise folder_error(path)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError("not_a_file", "not a regular file (a FIFO, device or socket)")
        size = st.st_size
    if size > max_bytes:
        raise ImageError("too_large", f"{size} bytes > --max_bytes {max_bytes}")


def folder_error(path: str) -> ImageError:
    """Why a folder is an input row rather than its images (see `walk_folder`)."""
    if os.path.islink(path):
        target = os.path.realpath(path)
        inside = (os.path.abspath(path), os.path.realpath(os.path.dirname(path)) + os.sep)
        if any(p.startswith(target + os.sep) for p in inside):
            return ImageError("link_cycle", f"a link back to a folder it is inside: {target}")
        return ImageError(
            "linked_folder", f"a link to {target}, whose images are read under that name"
        )
    try:
        os.scandir(path).close()
    except PermissionError:
        return ImageError("unreadable_folder", "a folder this user may not list (permissions)")
    except OSError as e:
        return ImageError("unreadable_folder", f"a folder that cannot be listed: {describe(e)}")
    return ImageError("not_a_file", "a folder, not an image file")


def read_path(
    path: str, max_bytes: int = MAX_BYTES, keep: Sequence[tuple[str, str]] = ()
) -> Iterator[Item]:
    """A matched path -> one Item, or one per archive member; failures become error Items.
    `keep`: the fields WebDataset samples keep (`Samples`)."""
    lower = path.lower()
    try:
        if lower.endswith(".zip"):
            yield from read_zip(path, max_bytes)
        elif lower.endswith((".tar", ".tar.gz", ".tgz")):
            yield from read_tar(path, max_bytes, keep)
        else:
            check_plain_file(path, max_bytes)
            yield Item(path, data=read_file(path))
    except ImageError as e:
        yield Item(path, error_type=e.kind, message=str(e))
    except OSError as e:
        yield Item(path, error_type="read_error", message=describe(e))


def archive_of(uri: str) -> str | None:
    """The archive of an `ARCHIVE!/member` uri, else None."""
    if MEMBER_SEPARATOR not in uri:
        return None
    archive = uri.split(MEMBER_SEPARATOR, 1)[0]
    return archive if is_archive_name(archive) else None


def read_input(
    uri: str, max_bytes: int = MAX_BYTES, fetch: Callable[[str], bytes] | None = None
) -> bytes:
    """The bytes of one input: a path, an object store uri, an archive member, or (with
    `fetch`) an http(s) URL. Raises ImageError for what is refused unread (too large, not
    a file, a scheme that is not read), OSError when a read fails."""
    scheme = uri_scheme(uri)
    if scheme in HTTP_SCHEMES:
        if fetch is None:
            raise ImageError("unsupported_uri", "http(s) inputs are fetched by caption_images")
        return fetch(uri)
    if scheme and scheme not in STORE_SCHEMES:
        raise ImageError(
            "unsupported_uri",
            f"{scheme}:// uris are not read (paths, {', '.join(STORE_SCHEMES)} and http(s) are)",
        )
    if archive_of(uri) is not None:
        return read_member(uri, max_bytes)
    check_plain_file(uri, max_bytes)
    return read_file(uri)


def read_member(uri: str, max_bytes: int = MAX_BYTES) -> bytes:
    """One archive member's bytes (the archive is streamed up to it)."""
    archive = archive_of(uri) or uri
    for item in read_path(archive, max_bytes):
        if item.uri in (uri, archive):  # the member, or why the archive has none
            if item.data is None:
                raise ImageError(item.error_type or "read_error", item.message)
            return item.data
    raise ImageError("missing_file", f"no member {uri.split(MEMBER_SEPARATOR, 1)[1]!r} in it")


def read_uri(uri: str, fetch: Callable[[str], bytes] | None = None) -> bytes:
    """Bytes of an input again (attention plots re-read a few)."""
    return read_input(uri, MAX_BYTES, fetch)


def read_failure(uri: str, error: Exception) -> ImageError:
    """Why a file could not be read, as an error of kind missing_file or read_error."""
    try:
        missing = not FileSystems.exists(uri)
    except Exception:  # noqa: BLE001 - the filesystem itself is failing
        missing = False
    kind = "missing_file" if missing else "read_error"
    return ImageError(kind, f"{type(error).__name__}: {error}")


def read_file(path: str) -> bytes:
    with FileSystems.open(
        path, mime_type="application/octet-stream", compression_type="uncompressed"
    ) as f:
        return f.read()


def display_name(uri: str) -> str:
    return posixpath.basename(uri.split(MEMBER_SEPARATOR)[-1])
