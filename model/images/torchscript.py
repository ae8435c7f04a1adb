"""Reads the tensors of a TorchScript (`torch.jit.save`) file with `pickle` and NumPy alone.

A TorchScript file is a zip: `ARCHIVE/data.pkl` pickles the module tree, and
each tensor's bytes sit raw (little-endian) in `ARCHIVE/data/KEY`. The pickle
names TorchScript classes (`__torch__.*`) and rebuilds tensors through
`torch._utils._rebuild_tensor_v2`; an unpickler that answers those two with
plain stand-ins walks the tree without torch, and without running any code the
file names: `find_class` resolves only the names below and refuses the rest.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

_DTYPES = {
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


class TorchScriptError(ValueError):
    """The file is not a TorchScript archive this reader understands."""


class _Module:
    """A TorchScript module object: its class name and its attributes (in file order)."""

    kind = ""

    def __init__(self, *_: Any) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


@dataclass(frozen=True)
class _TensorRef:
    storage: tuple[str, str]  # (dtype name, key of the raw bytes in data/)
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: Any, offset: int, shape: Any, stride: Any, *_: Any) -> _TensorRef:
    return _TensorRef(storage, int(offset), tuple(shape), tuple(stride))


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch.jit._pickle", "build_intlist"):
            return list
        if module == "torch" and name in _DTYPES:
            return name
        if module.startswith("__torch__."):
            # NEWOBJ needs a type: one subclass per TorchScript class, named after it.
            return type(name, (_Module,), {"kind": f"{module}.{name}"})
        raise TorchScriptError(f"unexpected class {module}.{name} in the pickle")

    def persistent_load(self, pid: Any) -> tuple[str, str]:
        # ('storage', dtype name, key, device, numel)
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise TorchScriptError(f"unexpected persistent id {pid!r}")
        return (pid[1], str(pid[2]))


def read_tensors(data: bytes) -> dict[str, np.ndarray]:
    """Every tensor of the module tree by dotted attribute path, in file order.

    >>> tensors = read_tensors(open("default_1.pt", "rb").read())
    >>> tensors["net.layers.conv.weight"].shape
    (32, 3, 3, 3)
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise TorchScriptError(f"not a zip archive ({e})") from None
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise TorchScriptError(f"expected one data.pkl, found {len(pickles)}")
    root = pickles[0][: -len("data.pkl")]
    tree = _Unpickler(io.BytesIO(archive.read(pickles[0]))).load()

    out: dict[str, np.ndarray] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, _Module) and isinstance(node.state, dict):
            for key, value in node.state.items():
                walk(value, f"{path}.{key}" if path else key)
        elif isinstance(node, _TensorRef):
            dtype_name, key = node.storage
            raw = np.frombuffer(archive.read(f"{root}data/{key}"), _DTYPES[dtype_name])
            itemsize = raw.itemsize
            view = np.lib.stride_tricks.as_strided(
                raw[node.offset :],
                shape=node.shape,
                strides=tuple(s * itemsize for s in node.stride),
                writeable=False,
            )
            out[path] = np.array(view)  # a copy: the archive's buffer is not kept

    walk(tree, "")
    return out
