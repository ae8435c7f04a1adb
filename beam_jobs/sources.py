"""Bulk-captioning inputs: folders, globs and .tar/.tar.gz/.zip archives, read in memory.

Archive members are streamed (tar in 'r|*' mode, zip through a seekable
handle) and never extracted: a member is only ever a byte string with a uri
`ARCHIVE_URI!/member`. Links, directories, and names with `..` or an absolute
path become error rows instead of being read.
"""

from __future__ import annotations

import posixpath
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

from apache_beam.io.filesystems import FileSystems

from model.preprocess import ImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
ARCHIVE_EXTENSIONS = (".tar", ".tar.gz", ".tgz", ".zip")
MAX_MEMBER_BYTES = 256 << 20
MEMBER_SEPARATOR = "!/"


@dataclass(frozen=True)
class Item:
    """One input: its bytes, why there are none, or (a plain file not read yet) neither."""

    uri: str
    data: bytes | None = None
    error_type: str | None = None
    message: str = ""


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_EXTENSIONS)


def _is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def match_input(spec: str) -> list[str]:
    """Expands one --input into file paths: a glob, a folder (recursive, images only), or a file."""
    if _is_glob(spec):
        return sorted(m.path for r in FileSystems.match([spec]) for m in r.metadata_list)
    folder = spec.rstrip("/")
    listing = FileSystems.match([folder + "/**"])[0].metadata_list if "://" in spec else None
    if listing is None:
        import os

        if os.path.isdir(folder):
            return sorted(
                os.path.join(root, f)
                for root, _, files in os.walk(folder)
                for f in files
                if is_image_name(f) or is_archive_name(f)
            )
        return [spec] if os.path.exists(spec) else []
    files = [m.path for m in listing if is_image_name(m.path) or is_archive_name(m.path)]
    return sorted(files) or ([spec] if FileSystems.exists(spec) else [])


def unsafe_member(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":")


def _member_item(uri: str, name: str, size: int, kind: str, read) -> Item:
    if unsafe_member(name):
        return Item(
            uri, error_type="unsafe_path", message=f"member name escapes the archive: {name!r}"
        )
    if kind != "file":
        return Item(uri, error_type="not_a_file", message=f"archive member is a {kind}")
    if size > MAX_MEMBER_BYTES:
        return Item(uri, error_type="too_large", message=f"{size} bytes > {MAX_MEMBER_BYTES}")
    return Item(uri, data=read())


def _tar_kind(m: tarfile.TarInfo) -> str:
    if m.isfile():
        return "file"
    if m.issym() or m.islnk():
        return "link"
    return "directory" if m.isdir() else "special file"


def read_tar(path: str) -> Iterator[Item]:
    with (
        FileSystems.open(path, compression_type="uncompressed") as f,
        tarfile.open(fileobj=f, mode="r|*") as tar,
    ):
        for m in tar:
            if m.isfile() and not is_image_name(m.name):
                continue  # like folders: only image files are inputs
            uri = f"{path}{MEMBER_SEPARATOR}{m.name}"
            yield _member_item(
                uri, m.name, m.size, _tar_kind(m), lambda m=m: tar.extractfile(m).read()
            )


def _zip_kind(info: zipfile.ZipInfo) -> str:
    if info.is_dir():
        return "directory"
    mode = (info.external_attr >> 16) & 0o170000
    return "link" if mode == 0o120000 else "file"


def read_zip(path: str) -> Iterator[Item]:
    with FileSystems.open(path, compression_type="uncompressed") as f, zipfile.ZipFile(f) as z:
        for info in z.infolist():
            kind = _zip_kind(info)
            if kind == "file" and not is_image_name(info.filename):
                continue
            uri = f"{path}{MEMBER_SEPARATOR}{info.filename}"
            yield _member_item(uri, info.filename, info.file_size, kind, lambda i=info: z.read(i))


def read_path(path: str, defer_files: bool = False) -> Iterator[Item]:
    """A matched path -> one Item, or one per archive member; failures become error Items.

    With `defer_files`, a plain file comes back unread (no data, no error): the
    caption job groups inputs by uri before reading them, so only archive
    members, which can only be read by opening their archive, carry bytes
    through the grouping.
    """
    lower = path.lower()
    try:
        if lower.endswith(".zip"):
            yield from read_zip(path)
        elif lower.endswith((".tar", ".tar.gz", ".tgz")):
            yield from read_tar(path)
        elif defer_files:
            yield Item(path)
        else:
            yield Item(path, data=read_file(path))
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
        yield Item(path, error_type="bad_archive", message=f"{type(e).__name__}: {e}")
    except OSError as e:
        yield Item(path, error_type="read_error", message=f"{type(e).__name__}: {e}")


def read_uri(uri: str) -> bytes:
    """Bytes of a file or of one archive member (attention plots re-read a few inputs)."""
    if MEMBER_SEPARATOR in uri:
        archive, member = uri.split(MEMBER_SEPARATOR, 1)
        for item in read_path(archive):
            if item.uri == uri and item.data is not None:
                return item.data
        raise FileNotFoundError(uri)
    return read_file(uri)


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
