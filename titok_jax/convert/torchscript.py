"""Reads the parameters of a TorchScript archive without running any of its code.

A TorchScript ``.pt`` is a zip: ``<prefix>/data.pkl`` pickles the module tree, whose tensors point
into raw little-endian storages ``<prefix>/data/<key>``; ``<prefix>/code/`` holds the TorchScript
source. ``torch.jit.load`` would compile and run that source. Here the pickle is read by an
unpickler with an allow-list: the tensor-rebuild functions, ``OrderedDict``, the storage types and
``build_intlist``. Every ``__torch__.*`` class becomes :class:`ScriptObject`, an inert attribute
container. Anything else in the pickle raises :class:`pickle.UnpicklingError`.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any, Iterator

import numpy as np
from etils import epath

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class ScriptObject:
    """A TorchScript module or object, reduced to its pickled attributes (``vars(obj)``)."""

    type_name = "?"

    def __setstate__(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected state {type(state).__name__} for "
                                         f"{self.type_name}")
        self.__dict__.update(state)


class _StorageType:
    def __init__(self, dtype: type):
        self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple[int, ...],
                    stride: tuple[int, ...], *_unused: Any) -> np.ndarray:
    if not size:
        return storage[offset].copy()
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * item for s in stride))
    return np.array(view)


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix = archive, prefix
        self._storages: dict[str, np.ndarray] = {}
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch.jit._pickle" and name == "build_intlist":
            return list
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module.startswith("__torch__"):
            key = f"{module}.{name}"
            if key not in self._classes:
                self._classes[key] = type(name, (ScriptObject,), {"type_name": key})
            return self._classes[key]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: TorchScript weights "
                                     f"may only hold tensors and module attributes")

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if key not in self._storages:
            raw = self._archive.read(f"{self._prefix}/data/{key}")
            array = np.frombuffer(raw, dtype=storage_type.dtype.newbyteorder("<"))
            if array.size != numel:
                raise pickle.UnpicklingError(f"storage {key}: {array.size} elements, "
                                             f"expected {numel}")
            self._storages[key] = array.astype(storage_type.dtype)
        return self._storages[key]


def read_module(path: str | os.PathLike) -> ScriptObject:
    """The root module of a TorchScript archive (a local or ``gs://`` path), as nested
    :class:`ScriptObject` attributes with numpy arrays for tensors."""
    path = os.fspath(path)
    with epath.Path(path).open("rb") as f, zipfile.ZipFile(f) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{path} is not a TorchScript archive (no single <name>/data.pkl)")
        prefix = pickles[0].split("/")[0]
        root = _Unpickler(archive.read(pickles[0]), archive, prefix).load()
    if not isinstance(root, ScriptObject):
        raise ValueError(f"{path}: the archive's root is a {type(root).__name__}, not a module")
    return root


def named_tensors(obj: ScriptObject, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
    """``('layers.mixed.conv.weight', array)`` for every tensor attribute, depth first in
    attribute order."""
    for name, value in vars(obj).items():
        key = f"{prefix}{name}"
        if isinstance(value, np.ndarray):
            yield key, value
        elif isinstance(value, ScriptObject):
            yield from named_tensors(value, key + ".")


def named_modules(obj: ScriptObject, prefix: str = "") -> Iterator[tuple[str, ScriptObject]]:
    """``(dotted path, module)`` for ``obj`` and every submodule."""
    yield prefix, obj
    for name, value in vars(obj).items():
        if isinstance(value, ScriptObject):
            yield from named_modules(value, f"{prefix}.{name}" if prefix else name)
