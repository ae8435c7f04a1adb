"""The model side's one file-system layer: TensorFlow's `tf.io.gfile`.

It is the layer checkpoints, TensorBoard summaries and SavedModels already go
through, so every path in `model/` (local, gs://, or any scheme TensorFlow has
registered) is read and written the same way, with the credentials TensorFlow
finds (on GCP, the VM's service account). Beam workers have TensorFlow already,
so reading a vocabulary or a manifest there needs nothing more.

TensorFlow is imported on first use: the command lines parse their flags and
check local paths before it loads.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import IO, Any


def gfile() -> Any:
    from model.quiet import import_tensorflow

    return import_tensorflow().io.gfile


def uri_scheme(uri: str) -> str:
    """`gs` of gs://b/x, `https` of https://..., "" of a local path."""
    found = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", uri)
    return found.group(1).lower() if found else ""


def is_remote(path: str) -> bool:
    return "://" in path


def open_file(path: str, mode: str = "r") -> IO[Any]:
    """Text modes read and write UTF-8. A missing file raises FileNotFoundError."""
    if "r" in mode and not gfile().exists(path):
        raise FileNotFoundError(path)
    return gfile().GFile(path, mode)


def exists(path: str) -> bool:
    """A file or folder; on an object store, a prefix with at least one object under it."""
    return bool(gfile().exists(path))


def makedirs(path: str) -> None:
    gfile().makedirs(path)


def read_bytes(path: str) -> bytes:
    with open_file(path, "rb") as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    """Readers never see half a file: locally written beside it, then renamed; an
    object store makes the object visible only once its upload completes."""
    parent = os.path.dirname(path.rstrip("/"))
    if parent:
        makedirs(parent)
    if is_remote(path):
        with gfile().GFile(path, "wb") as f:
            f.write(data)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def copy_to_local(path: str, local: str) -> str:
    with open_file(path, "rb") as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 24)
    return local


def copy_from_local(local: str, path: str) -> None:
    with open(local, "rb") as src, gfile().GFile(path, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 24)


def not_a_readable_file(path: str, max_bytes: int) -> tuple[str, str] | None:
    """(error type, message) for a path that must not be read: larger than `max_bytes` (an
    object's size from the store's metadata), or locally not a regular file (a FIFO would
    block the reader forever; a device, socket or folder). None when it may be read."""
    import stat

    try:
        if is_remote(path):
            size = gfile().stat(path).length
            return ("too_large", f"{size} bytes > {max_bytes}") if size > max_bytes else None
        st = os.stat(path)
    except Exception:  # noqa: BLE001 - missing or unreachable: the read says why
        return None
    if stat.S_ISDIR(st.st_mode):
        return "not_a_file", "a folder, not an image file"
    if not stat.S_ISREG(st.st_mode):
        return "not_a_file", "not a regular file (a FIFO, device or socket)"
    if st.st_size > max_bytes:
        return "too_large", f"{st.st_size} bytes > {max_bytes}"
    return None
