"""Reading tensors out of PyTorch zip archives without running any code stored in them.

Why this exists: ``torch.jit.load`` compiles and runs the TorchScript code inside an archive (a
scripted ``__setstate__`` can write files), and ``torch.load(weights_only=True)`` refuses TorchScript
archives outright. Yet the weights themselves are plain: ``<name>/data.pkl`` describes tensors whose
bytes are the zip members ``<name>/data/<key>``, the same encoding a ``torch.save`` file (torch >= 1.6)
uses. A restricted unpickler rebuilds those tensors itself; each class of the archive's own code
(``__torch__.*``) becomes an inert record, and every other global is refused.
"""

from __future__ import annotations

import builtins
import collections
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch

from captioners.errors import CaptionerError, UnsafeCheckpointError

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
# Legacy typed-storage class names -> the dtype of their elements (UntypedStorage holds raw bytes).
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
}


class _Refused(pickle.UnpicklingError):
    """A global outside the allow-list: reported as unsafe, not merely unreadable."""


class _Record:
    """Stands for an instance of a TorchScript class: keeps what BUILD gives it, runs nothing."""

    __slots__ = ("state",)
    qualname = "__torch__"

    def __new__(cls, *_args: Any) -> "_Record":
        self = object.__new__(cls)
        self.state = None
        return self

    def __init__(self, *_args: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Storage(NamedTuple):
    key: str
    dtype: torch.dtype
    nbytes: int
    data: bytearray | None  # None when only shapes are wanted


class _Shape(tuple):
    """A tensor's size, standing in for the tensor when no storage bytes are read."""


def _passthrough(value: Any, *_ignored: Any) -> Any:
    """Stand-in for helpers that only tag or repack a value (torch.jit._pickle, _rebuild_parameter:
    a Parameter's data is the tensor we already rebuilt ourselves)."""
    return value


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_flags: Any) -> Any:
    """Our _rebuild_tensor / _rebuild_tensor_v2: the dtype is the storage's."""
    return _make_tensor(storage, getattr(storage, "dtype", None), offset, size, stride)


def _rebuild_tensor_v3(storage: Any, offset: Any, size: Any, stride: Any, _grad: Any, _hooks: Any,
                       dtype: Any, *_metadata: Any) -> Any:
    """Newer dtypes (float8, uint16...) view an UntypedStorage with a dtype named as a global."""
    return _make_tensor(storage, dtype, offset, size, stride)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """Everything data.pkl may name besides __torch__ classes. Dtypes come from vars(torch), not
    getattr, so that a name cannot make torch import one of its lazy submodules."""
    allowed: dict[tuple[str, str], Any] = {("collections", "OrderedDict"): collections.OrderedDict}
    for name in ("list", "tuple", "dict", "set", "frozenset", "str", "bytes", "bytearray", "int", "float",
                 "bool", "complex", "slice", "range"):
        allowed["builtins", name] = getattr(builtins, name)
    for name in ("build_intlist", "build_tensorlist", "build_doublelist", "build_boollist", "restore_type_tag"):
        allowed["torch.jit._pickle", name] = _passthrough
    allowed.update({("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
                    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
                    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
                    ("torch._utils", "_rebuild_parameter"): _passthrough,
                    ("torch._utils", "_rebuild_parameter_with_state"): _passthrough})
    allowed.update({("torch", n): v for n, v in vars(torch).items() if isinstance(v, torch.dtype)})
    allowed.update({(m, n): v for n, v in _STORAGE_DTYPES.items() for m in ("torch", "torch.storage")})
    return allowed


_ALLOWED = _allowed_globals()


class _ArchiveUnpickler(pickle._Unpickler):
    """Python's own unpickler (not the C one): its memo is a dict, so a crafted memo index cannot make it
    allocate gigabytes; data.pkl files are small (the tensors' bytes are separate zip members)."""

    def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str, read_data: bool) -> None:
        super().__init__(file)
        self._archive, self._prefix, self._read_data = archive, prefix, read_data
        self._storages: dict[str, _Storage] = {}
        self._records: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self._records:
                self._records[qualname] = type("_TorchRecord", (_Record,), {"__slots__": (), "qualname": qualname})
            return self._records[qualname]
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:80]}")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise pickle.UnpicklingError(f"malformed storage record {str(pid)[:80]}")
        if key not in self._storages:
            self._storages[key] = self._load_storage(key, dtype, numel * _itemsize(dtype))
        return self._storages[key]

    def _load_storage(self, key: str, dtype: torch.dtype, nbytes: int) -> _Storage:
        """Check the member against the declared size (central directory only), then read it if wanted."""
        member = f"{self._prefix}data/{key}"
        try:
            info = self._archive.getinfo(member)
        except KeyError:
            raise pickle.UnpicklingError(f"storage member {member} is missing") from None
        if info.file_size != nbytes:
            raise pickle.UnpicklingError(f"{member} holds {info.file_size} bytes, {nbytes} expected")
        if not self._read_data:
            return _Storage(key, dtype, nbytes, None)
        data = bytearray(nbytes)
        with self._archive.open(info) as member_file:
            if member_file.readinto(data) != nbytes:
                raise pickle.UnpicklingError(f"{member} is truncated")
        return _Storage(key, dtype, nbytes, data)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _int_tuple(value: Any) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and v >= 0 for v in value):
        raise pickle.UnpicklingError(f"bad tensor size or stride {str(value)[:80]}")
    return tuple(value)


def _make_tensor(storage: _Storage, dtype: torch.dtype, offset: Any, size: Any, stride: Any) -> Any:
    """Check that the view lies inside its storage (an archive could claim anything), then build it."""
    if not isinstance(storage, _Storage) or not isinstance(dtype, torch.dtype):
        raise pickle.UnpicklingError("tensor without a storage or dtype")
    size, stride = _int_tuple(size), _int_tuple(stride)
    itemsize = _itemsize(dtype)
    numel = storage.nbytes // itemsize
    empty = 0 in size
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if type(offset) is int and not empty else 0
    if (len(size) != len(stride) or storage.nbytes % itemsize or type(offset) is not int or offset < 0
            or (offset > numel if empty else last >= numel)):
        raise pickle.UnpicklingError(f"tensor of size {size}, stride {stride}, offset {offset} does not fit "
                                     f"in storage {storage.key} of {numel} {dtype} elements")
    if storage.data is None:
        return _Shape(size)
    flat = torch.frombuffer(storage.data, dtype=dtype) if numel else torch.empty(0, dtype=dtype)
    return flat.as_strided(size, stride, offset)


def _data_prefix(archive: zipfile.ZipFile, path: Path) -> str:
    """The archive's top folder (``ViT-L-14/`` for OpenAI's CLIP), found by its data.pkl."""
    for name in archive.namelist():
        folder, _, leaf = name.partition("/")
        if leaf == "data.pkl":
            return folder + "/"
    raise CaptionerError(f"Could not read {path}: it is a zip file but holds no data.pkl (not a PyTorch archive).")


def _check_byteorder(archive: zipfile.ZipFile, prefix: str, path: Path) -> None:
    """Storage bytes are copied as they are, so only little-endian archives can be read (absent = little)."""
    if prefix + "byteorder" not in archive.namelist():
        return
    with archive.open(prefix + "byteorder") as file:
        order = file.read(16).decode("ascii", "replace").strip()
    if order != "little":
        raise CaptionerError(f"Could not read {path}: it was saved on a {order!r}-endian machine; only "
                             "little-endian archives are supported.")


def _unpickle(path: Path, read_data: bool) -> Any:
    with zipfile.ZipFile(path) as archive:
        prefix = _data_prefix(archive, path)
        _check_byteorder(archive, prefix, path)
        with archive.open(prefix + "data.pkl") as file:
            return _ArchiveUnpickler(file, archive, prefix, read_data).load()


def _named(obj: Any, leaf: type, prefix: str = "", path: frozenset = frozenset()) -> Iterator[tuple[str, Any]]:
    """Yield ``(dotted name, leaf)`` through records and dicts; ``path`` guards against cycles."""
    if isinstance(obj, _Record):
        if obj.state is not None and not isinstance(obj.state, dict):
            log.warning("%s (%s) keeps a custom state; its tensors are not named", prefix.rstrip(".") or "<root>",
                        obj.qualname)
            return
        obj = obj.state
    if not isinstance(obj, dict) or id(obj) in path:
        return
    for key, value in obj.items():
        if isinstance(value, leaf):
            yield prefix + str(key), value
        elif isinstance(value, (dict, _Record)):
            yield from _named(value, leaf, f"{prefix}{key}.", path | {id(obj)})


def _read(path: str | os.PathLike, read_data: bool, leaf: type) -> dict[str, Any]:
    """Unpickle and name the leaves; every failure becomes one of the project's one-line errors."""
    path = Path(path)
    try:
        data = _unpickle(path, read_data)
        for key in _WRAPPER_KEYS:
            if isinstance(data, dict) and isinstance(data.get(key), dict):
                data = data[key]
        return dict(_named(data, leaf))
    except CaptionerError:
        raise
    except _Refused as exc:
        raise UnsafeCheckpointError(f"Refused to read {path}: its data.pkl names the global {exc}, which is not "
                                    "weights data and could run code.") from None
    except zipfile.BadZipFile as exc:
        legacy = " (a legacy pre-1.6 torch.save pickle?)" if _starts_with_pickle(path) else ""
        raise CaptionerError(f"Could not read {path}: not a readable zip archive{legacy}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the contract is: nothing but CaptionerError escapes
        reason = (str(exc).splitlines() or [""])[0][:200]
        raise CaptionerError(f"Could not read {path} as a PyTorch archive: {type(exc).__name__}: {reason}") from None


def _starts_with_pickle(path: Path) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read(1) == b"\x80"
    except OSError:
        return False


def is_torchscript(path: str | os.PathLike) -> bool:
    """True for a zip holding ``*/constants.pkl`` or ``*/code/...``: what torch.jit.save writes and
    torch.save never does. Unreadable or missing files are simply not TorchScript."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except Exception:  # noqa: BLE001 - a predicate: anything unreadable is "no"
        return False
    return any(n.split("/")[1:] == ["constants.pkl"] or n.split("/")[1:2] == ["code"] for n in names)


def read_torchscript_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive by attribute path (``visual.conv1.weight``), as
    ``torch.jit.load(path).state_dict()`` would name them, without compiling or running its code.
    Tensor attributes that are not parameters or buffers may be included; modules with a custom
    ``__getstate__`` (a non-dict state) are skipped with a warning. Plain torch.save zips work too.
    Raises UnsafeCheckpointError for a refused global, CaptionerError for an unreadable file."""
    return _read(path, read_data=True, leaf=torch.Tensor)


def read_tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape of a torch.save zip (a ``{"state_dict": ...}`` wrapper is unwrapped) or a
    TorchScript archive, read from data.pkl alone: no storage bytes are read, so a listing can learn a
    large checkpoint's layout cheaply. Legacy (pre-1.6, non-zip) pickles raise CaptionerError."""
    return {name: tuple(shape) for name, shape in _read(path, read_data=False, leaf=_Shape).items()}
