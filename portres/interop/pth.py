"""PyTorch checkpoints (``.pth``/``.pt``/``.bin``) read and written without torch.

Reading never runs code from the file. A checkpoint is a pickle, and a pickle can name any
Python callable; this one is read by an unpickler that knows only the handful of names a
``state_dict`` needs (``torch._utils._rebuild_tensor_v2``, ``_rebuild_parameter``, the
``torch.*Storage`` types, ``collections.OrderedDict``) and answers each with a harmless
stand-in that records what the tensor looks like. Any other name (``os.system``,
``builtins.eval``, a class of the training script) is refused before anything is called,
with a :class:`~portres.weights.WeightsError` naming it. Nothing the pickle touches outlives
its load: each load gets stand-ins of its own, and BUILD (setting attributes) may only give a
fresh OrderedDict its ``_metadata``, so one file cannot change how another one loads.

Two containers are read:

* the zip archive ``torch.save`` has written since torch 1.6: ``<archive>/data.pkl`` (the
  pickle, whose tensors refer to storages by key), ``<archive>/data/<key>`` (each storage's
  raw bytes), ``<archive>/byteorder`` and ``<archive>/version``;
* the legacy stream of torch < 1.6 (``_use_new_zipfile_serialization=False``): a magic
  number, a protocol version and system information, each pickled, then the same kind of
  pickle, a pickled list of storage keys and each storage's element count and bytes.

As for every weights file, the directory comes first: the pickle and the zip directory (or
the legacy storage headers) say every tensor's name, shape, dtype and where its bytes are,
and all of it is checked for consistency before a tensor's data is read, then only the
tensors asked for are read. A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is
unwrapped and a ``module.`` prefix on every name (``DataParallel``) is stripped.

Writing produces what ``torch.save(state_dict)`` writes (protocol 2 pickle with persistent
storage ids, 64-byte aligned storages), so ``torch.load(path, weights_only=True)`` reads it.

    >>> import portres
    >>> from portres.interop.pth import read_pth, write_pth
    >>> write_pth("/tmp/r18.pth", portres.init_params(portres.get("resnet18")))
    >>> read_pth("/tmp/r18.pth")["fc.weight"].shape
    (1000, 512)
"""

from __future__ import annotations

import _compat_pickle
import collections
import contextlib
import dataclasses
import functools
import hashlib
import io
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..tensorfiles import (
    TORCH_FORMATS,
    ZIP_ERRORS,
    Entry,
    WeightsError,
    atomic_write,
    checked_for_saving,
    is_count,
    open_regular_file,
    read_array,
)

SUFFIXES = TORCH_FORMATS  # what load_weights and save_weights treat as a torch checkpoint

# torch's storage classes: the dtype of their bytes in NumPy and torch's name for it.
# bfloat16 has no NumPy dtype: its bytes are read as uint16 and widened to float32.
_STORAGES = {
    "FloatStorage": (np.dtype("f4"), "float32"),
    "DoubleStorage": (np.dtype("f8"), "float64"),
    "HalfStorage": (np.dtype("f2"), "float16"),
    "BFloat16Storage": (np.dtype("u2"), "bfloat16"),
    "LongStorage": (np.dtype("i8"), "int64"),
    "IntStorage": (np.dtype("i4"), "int32"),
    "ShortStorage": (np.dtype("i2"), "int16"),
    "CharStorage": (np.dtype("i1"), "int8"),
    "ByteStorage": (np.dtype("u1"), "uint8"),
    "BoolStorage": (np.dtype("?"), "bool"),
}
_NUMPY_TO_STORAGE = {dtype: name for name, (dtype, torch_name) in _STORAGES.items() if torch_name != "bfloat16"}
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")  # where trainers put the state_dict
# A view whose strides repeat elements is refused past 16x its storage's bytes and 64 MiB (expand()ed tensors
# are rare in checkpoints and small: the limits keep a 4-byte storage from becoming terabytes).
_MAX_REPEAT, _MAX_REPEATED_BYTES = 16, 1 << 26
_MAX_PICKLE = 1 << 28  # bytes of data.pkl read at most: a state_dict's pickle is kilobytes, never 256 MiB
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001  # torch.serialization.PROTOCOL_VERSION
_ALIGNMENT = 64  # torch aligns each storage's bytes in the zip to 64 bytes (mmap-friendly)
_ARCHIVE = "archive"  # the top directory torch.save uses for a file object


# -- reading: stand-ins for the few globals a state_dict needs ----------------------------------


class _Inert:
    """A stand-in with no ``__dict__``: a pickle can make one but has no way to change it."""

    __slots__ = ()


class _StorageType(_Inert):
    """``torch.FloatStorage`` and friends: only a name and the dtype of the bytes."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


@dataclasses.dataclass(frozen=True, eq=False)
class _Storage(_Inert):
    """A storage the pickle refers to by persistent id; its bytes stay in the file."""

    __slots__ = ("kind", "key", "numel")
    kind: _StorageType  # its torch class, hence the dtype of its bytes
    key: str  # names its bytes: the zip member data/<key>, or its place in the legacy stream
    numel: int  # elements, as the pickle declares


@dataclasses.dataclass(frozen=True, eq=False)
class _Tensor(_Inert):
    """What ``_rebuild_tensor_v2`` was asked to build: a strided view of a storage."""

    __slots__ = ("storage", "offset", "shape", "stride", "negative")
    storage: object  # a _Storage once validated; anything the pickle gave until then
    offset: object  # storage offset in elements
    shape: object  # sizes
    stride: object  # strides in elements
    negative: bool  # torch's lazy negation bit (metadata {"neg": True}): the values are the negated storage


class _Global(_Inert):
    """An allowed callable as one load hands it to its pickle: a fresh wrapper, never the function itself.

    The functions below are shared by every load in the process; a pickle that got hold of one
    could set its ``__defaults__`` (BUILD) and change what every later load returns.
    """

    __slots__ = ("name", "function")

    def __init__(self, name: str, function):
        self.name, self.function = name, function

    def __call__(self, *args):  # REDUCE, INST and OBJ pass positional arguments only
        return self.function(*args)


class _Refused(Exception):
    """The pickle asked for something a state_dict never needs."""


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    negative = False
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise _Refused(f"tensor metadata of type {type(metadata).__name__}")
        for key, value in metadata.items():
            if key == "neg":
                negative = bool(value)
            elif value:  # "conj" (complex tensors) or a flag newer than this reader
                raise _Refused(f"tensor metadata {key!r}")
    return _Tensor(storage, storage_offset, size, stride, negative)


def _rebuild_tensor(storage, storage_offset, size, stride):  # torch < 1.0 wrote this older form
    return _Tensor(storage, storage_offset, size, stride, False)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, _Tensor):
        raise _Refused(f"a Parameter made of {type(data).__name__}, not of a tensor")
    return data


def _encode(text, encoding="latin1"):
    # Protocol 2 pickles bytes as _codecs.encode(str, "latin1") (torch's weights_only loader allows it too).
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused("_codecs.encode other than a str in latin1")
    return text.encode("latin1")


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("_codecs", "encode"): _encode,
}


class _Unpickler(pickle._Unpickler):
    """Knows only ``_ALLOWED`` and the storage types; persistent ids become :class:`_Storage` references.

    Python's own unpickler in pure Python, so that the opcodes that can reach beyond the
    file are this class's: BUILD (setting attributes on an object) may only give a fresh
    OrderedDict its ``_metadata``, as ``torch.save`` writes it; NEWOBJ (``cls.__new__``) is
    refused; EXT1/2/4 are refused, because they look globals up in ``copyreg``'s process-wide
    cache before asking :meth:`find_class`. Every global a pickle names is a fresh stand-in
    of this load, so nothing it touches outlives it. (The C unpickler would also grow its memo
    to any index a LONG_BINPUT names: gigabytes from a few bytes.)
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: BinaryIO, legacy: bool):
        super().__init__(file)
        self._legacy = legacy  # legacy persistent ids carry a sixth field, view metadata
        self.storages: dict[str, _Storage] = {}
        self._globals = {key: _Global(f"{key[0]}.{key[1]}", function) for key, function in _ALLOWED.items()}
        self._globals.update({("torch", name): _StorageType(name) for name in _STORAGES})

    def find_class(self, module: str, name: str):
        # Every global a pickle names passes through here (GLOBAL, STACK_GLOBAL, INST, OBJ),
        # before anything is called: refusing here means nothing of the file ever runs.
        try:
            return self._globals[(module, name)]
        except (KeyError, TypeError):
            raise _Refused(f"the global {_global_name(module, name)}") from None

    def persistent_load(self, pid):
        fields = 6 if self._legacy else 5
        if not (isinstance(pid, tuple) and len(pid) == fields and pid[0] == "storage"):
            raise _Refused(f"the persistent id {_short(pid)} (expected ('storage', type, key, location, numel))")
        _, kind, key, location, numel = pid[:5]
        if not isinstance(kind, _StorageType):
            raise _Refused(f"a storage of type {_short(kind)}")
        if not (isinstance(key, str) and isinstance(location, str) and is_count(numel)):
            raise _Refused(f"the malformed storage id {_short(pid)}")
        if self._legacy and pid[5] is not None:
            raise _Refused("a storage view (written by torch < 1.0); load it with torch and re-save it")
        storage = self.storages.setdefault(key, _Storage(kind, key, numel))
        if storage.kind is not kind or storage.numel != numel:
            raise _Refused(f"storage {key!r} declared twice, as {storage.numel} x {storage.kind.name} and "
                           f"{numel} x {kind.name}")
        return storage

    def _load_build(self):
        state = self.stack.pop()
        target = self.stack[-1]
        # torch.save's one BUILD: the state_dict OrderedDict's _metadata (each module's version).
        if type(target) is collections.OrderedDict and isinstance(state, dict) and all(
                isinstance(key, str) and not key.startswith("__") for key in state):
            vars(target).update(state)
            return
        if isinstance(target, _Global):
            what = f"the global {target.name}"
        elif isinstance(target, _StorageType):
            what = f"the global torch.{target.name}"
        else:
            what = {_Tensor: "a tensor", _Storage: "a storage"}.get(type(target))
            what = what or f"an object of type {type(target).__name__}"
        raise _Refused(f"a BUILD on {what} (setting attributes on it: {_short(state)})")

    def _load_newobj(self):  # NEWOBJ and NEWOBJ_EX: cls.__new__(cls, ...), which torch.save never writes
        raise _Refused("NEWOBJ (an object created without calling its class)")

    def _load_ext(self):
        raise _Refused("an extension code (EXT1/EXT2/EXT4), a global looked up in copyreg's registry")

    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.NEWOBJ[0]] = dispatch[pickle.NEWOBJ_EX[0]] = _load_newobj
    dispatch[pickle.EXT1[0]] = dispatch[pickle.EXT2[0]] = dispatch[pickle.EXT4[0]] = _load_ext


def _global_name(module, name) -> str:
    """``module.name`` as the pickle spells it, with the Python 3 name where protocol 2 wrote Python 2's."""
    written = f"{module}.{name}" if isinstance(module, str) and isinstance(name, str) else _short((module, name))
    if isinstance(module, str) and isinstance(name, str):
        python3 = _compat_pickle.NAME_MAPPING.get((module, name))
        python3 = python3 or (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
        if python3 != (module, name):
            return f"{written} (Python 3: {'.'.join(python3)})"
    return written


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _unpickle(path: Path, unpickler: _Unpickler, what: str):
    try:
        return unpickler.load()
    except _Refused as refused:
        raise WeightsError(
            f"{path}: refused to load: its pickle asks for {refused}, which a state_dict never needs, so it may run "
            "code; nothing from the file was run. Only tensors, storages and OrderedDicts are loaded. If you trust "
            "the file, load it with torch.load(weights_only=False) and torch.save(model.state_dict(), ...) "
            "instead") from None
    except WeightsError:
        raise
    except Exception as error:  # noqa: BLE001 - a corrupt pickle raises anything from EOFError to TypeError
        raise WeightsError(f"{path}: {what} is not a valid pickle ({type(error).__name__}: {error}); the file is "
                           "corrupt or truncated") from None


# -- reading: containers ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint holds, from its pickle and directory alone (no tensor data read)."""

    tensors: dict[str, tuple[tuple[int, ...], str]]  # name (as loaded) -> (shape, torch dtype name as stored)
    container: str  # "zip" (torch >= 1.6) or "legacy" (torch < 1.6)
    wrapper: tuple[str, ...]  # keys the state_dict sat under, e.g. ("state_dict",); () when at the top
    stripped_prefix: str  # "module." when every name had it (DataParallel) and it was removed, else ""


@dataclasses.dataclass(frozen=True)
class _Located:
    """Where a storage's bytes are and how to read a span of them."""

    read: object  # (start element, count) -> 1-D array of the storage's dtype in file byte order
    numel: int  # elements the container holds for this storage


def read_pth(path) -> dict[str, np.ndarray]:
    """Every tensor of the PyTorch checkpoint at ``path``, as NumPy arrays; torch is not needed.

    The ``state_dict`` is found at the top or under ``state_dict``/``model``; a ``module.``
    prefix on every name is removed; ``num_batches_tracked`` counters are kept (``load_weights``
    drops them). bfloat16 is widened to float32; other dtypes are kept. Nothing in the file
    is executed: a pickle naming any other global raises :class:`WeightsError` naming it.

        >>> read_pth("resnet50-0676ba61.pth")["conv1.weight"].shape
        (64, 3, 7, 7)
    """
    with _open_checkpoint(path) as entries:
        return {name: entry.read() for name, entry in entries.items()}


def inspect_pth(path) -> CheckpointInfo:
    """Names, shapes, stored dtypes and layout of a checkpoint, without reading tensor data.

        >>> inspect_pth("ddp.pth").stripped_prefix
        'module.'
    """
    with _open_checkpoint(path) as entries:
        return entries.info


@contextlib.contextmanager
def _open_checkpoint(path) -> Iterator[_Entries]:
    # read as a torch checkpoint whatever the suffix (checkpoint.pth.tar, model.ckpt)
    path = Path(path)
    with open_regular_file(path) as file, checkpoint_entries(path, file) as entries:
        yield entries


class _Entries(dict):
    """The entries of a checkpoint, with what was learned about its layout on the side."""

    info: CheckpointInfo


@contextlib.contextmanager
def checkpoint_entries(path: Path, file: BinaryIO) -> Iterator[dict[str, Entry]]:
    """The validated entries of the torch checkpoint open as ``file`` (``portres.weights.open_weights_file``'s hook)."""
    head = file.read(512)
    file.seek(0)
    if head.startswith(b"PK"):
        try:
            archive = zipfile.ZipFile(file)
        except ZIP_ERRORS as error:
            raise WeightsError(f"{path}: a zip archive that cannot be read ({type(error).__name__}: {error}); "
                               "the file is truncated or corrupt: download or save it again") from None
        with archive:
            yield _zip_entries(path, archive)
        return
    if head.startswith(b"\x80\x02\x8a\x0a") and int.from_bytes(head[4:14], "little") == _LEGACY_MAGIC:
        yield _legacy_entries(path, file)
        return
    if head[257:262] == b"ustar":
        raise WeightsError(f"{path}: a tar archive, the checkpoint format of torch < 0.4, which is not read here; "
                           "load it with that torch and re-save it: torch.save(torch.load(old), new)")
    if head.startswith(b"\x93NUMPY") or head.startswith(b"{") or len(head) >= 8 and head[8:9] == b"{":
        raise WeightsError(f"{path}: not a PyTorch checkpoint (it looks like a .npy or .safetensors file); give it "
                           "the suffix of its format")
    raise WeightsError(f"{path}: not a PyTorch checkpoint: neither a zip archive (torch >= 1.6) nor a legacy "
                       f"torch.save stream (torch < 1.6); it starts with {head[:16]!r}")


def _zip_entries(path: Path, archive: zipfile.ZipFile) -> _Entries:
    def bad(why: str) -> WeightsError:
        return WeightsError(f"{path}: not a valid PyTorch checkpoint ({why})")

    infos = archive.infolist()
    if not infos:
        raise bad("the zip archive is empty")
    # torch's reader takes the archive's name from its first record, and every record must share it
    prefix = infos[0].filename.split("/", 1)[0]
    members = {info.filename: info for info in infos}
    pickle_info = members.get(f"{prefix}/data.pkl")
    if pickle_info is None:
        if f"{prefix}/constants.pkl" in members or any(name.startswith(f"{prefix}/code/") for name in members):
            raise WeightsError(f"{path}: a TorchScript archive (torch.jit.save), not a state_dict; load it with "
                               "torch.jit.load and save its state_dict(): torch.save(module.state_dict(), path)")
        if all(name.endswith(".npy") for name in members):
            raise WeightsError(f"{path}: a NumPy .npz archive, not a PyTorch checkpoint; rename it to .npz")
        raise bad(f"no {prefix}/data.pkl record")
    if pickle_info.file_size > _MAX_PICKLE:
        raise bad(f"its pickle claims {pickle_info.file_size} bytes, over the {_MAX_PICKLE} a state_dict could need")
    byteorder = "little"
    if f"{prefix}/byteorder" in members:
        try:
            byteorder = archive.read(f"{prefix}/byteorder")[:16].decode("ascii")
        except (*ZIP_ERRORS, UnicodeDecodeError) as error:
            raise bad(f"unreadable byteorder record ({type(error).__name__}: {error})") from None
        if byteorder not in ("little", "big"):
            raise bad(f"byteorder record {byteorder!r} is neither 'little' nor 'big'")
    try:
        pickled = archive.read(pickle_info)
    except ZIP_ERRORS as error:
        raise bad(f"{prefix}/data.pkl cannot be read ({type(error).__name__}: {error}): truncated or corrupt") from None
    unpickler = _Unpickler(io.BytesIO(pickled), legacy=False)
    root = _unpickle(path, unpickler, "data.pkl")
    state, wrapper, prefix_stripped = _find_state_dict(path, root)

    located: dict[str, _Located] = {}
    for storage in _used_storages(path, state):
        info = members.get(f"{prefix}/data/{storage.key}")
        if info is None:
            raise bad(f"storage {storage.key!r} has no record {prefix}/data/{storage.key}: truncated or corrupt")
        itemsize = _STORAGES[storage.kind.name][0].itemsize
        if info.file_size != storage.numel * itemsize:
            raise bad(f"record {info.filename} holds {info.file_size} bytes, but the pickle declares "
                      f"{storage.numel} x {storage.kind.name} ({storage.numel * itemsize} bytes)")
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise bad(f"record {info.filename} is stored uncompressed but its sizes disagree")
        located[storage.key] = _Located(functools.partial(_read_zip_span, path, archive, info), storage.numel)
    return _make_entries(path, state, located, byteorder, CheckpointInfo({}, "zip", wrapper, prefix_stripped))


def _read_zip_span(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, dtype: np.dtype, start: int,
                   count: int) -> np.ndarray:
    try:
        with archive.open(info) as member:
            member.seek(start * dtype.itemsize)
            return read_array(member, (count,), dtype)
    except ZIP_ERRORS as error:
        raise WeightsError(f"{path}: record {info.filename} is corrupt ({type(error).__name__}: {error})") from None


def _legacy_entries(path: Path, file: BinaryIO) -> _Entries:
    def bad(why: str) -> WeightsError:
        return WeightsError(f"{path}: not a valid legacy PyTorch checkpoint ({why})")

    size = os.fstat(file.fileno()).st_size
    header = _Unpickler(file, legacy=True)  # three plain pickles: no globals allowed beyond the usual
    magic = _unpickle(path, header, "the magic number")
    protocol = _unpickle(path, header, "the protocol version")
    if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL:
        raise bad(f"magic number {magic!r} / protocol {protocol!r}, expected torch's {_LEGACY_PROTOCOL}")
    system = _unpickle(path, header, "the system information")
    if not isinstance(system, dict):
        raise bad("its system information is not a dict")
    byteorder = "little" if system.get("little_endian", True) else "big"
    unpickler = _Unpickler(file, legacy=True)
    root = _unpickle(path, unpickler, "the state_dict pickle")
    keys = _unpickle(path, _Unpickler(file, legacy=True), "the list of storage keys")
    if not (isinstance(keys, list) and all(isinstance(key, str) for key in keys)):
        raise bad("its list of storage keys is not a list of strings")
    # The storages follow in the order of the keys, each as an int64 element count and its bytes.
    located: dict[str, _Located] = {}
    offset = file.tell()
    count_format = "<q" if byteorder == "little" else ">q"
    for key in keys:
        storage = unpickler.storages.get(key)
        if storage is None:
            raise bad(f"storage {key!r} is listed but no tensor uses it")
        file.seek(offset)
        raw = file.read(8)
        if len(raw) != 8:
            raise bad(f"the file ends before storage {key!r}: truncated")
        (numel,) = struct.unpack(count_format, raw)
        if numel != storage.numel:
            raise bad(f"storage {key!r} holds {numel} elements but the pickle declares {storage.numel}")
        start = offset + 8
        offset = start + numel * _STORAGES[storage.kind.name][0].itemsize
        if offset > size:
            raise bad(f"storage {key!r} needs bytes {start}..{offset} but the file has {size}: truncated")
        located[key] = _Located(functools.partial(_read_file_span, path, file, start), numel)
    state, wrapper, prefix_stripped = _find_state_dict(path, root)
    for storage in _used_storages(path, state):
        if storage.key not in located:
            raise bad(f"storage {storage.key!r} is used by a tensor but missing from the file")
    return _make_entries(path, state, located, byteorder, CheckpointInfo({}, "legacy", wrapper, prefix_stripped))


def _read_file_span(path: Path, file: BinaryIO, base: int, dtype: np.dtype, start: int, count: int) -> np.ndarray:
    try:
        file.seek(base + start * dtype.itemsize)
        return read_array(file, (count,), dtype)
    except (OSError, EOFError) as error:
        raise WeightsError(f"{path}: cannot read its tensors ({type(error).__name__}: {error})") from None


# -- reading: from the unpickled object to validated entries --------------------------------------


def _describe(value) -> str:
    if isinstance(value, _Tensor):
        return "tensor"
    if isinstance(value, Mapping):
        return f"{type(value).__name__} of {len(value)} entries"
    return type(value).__name__


def _is_state_dict(value) -> bool:
    return (isinstance(value, Mapping) and len(value) > 0
            and all(isinstance(k, str) and isinstance(v, _Tensor) for k, v in value.items()))


def _find_state_dict(path: Path, root) -> tuple[Mapping, tuple[str, ...], str]:
    """The mapping of names to tensors in ``root``, the wrapper keys around it and any prefix stripped."""
    state, wrapper = root, ()
    while not _is_state_dict(state) and isinstance(state, Mapping) and len(wrapper) < 3:
        key = next((k for k in _WRAPPER_KEYS if k in state and isinstance(state[k], Mapping)), None)
        if key is None:
            break
        state, wrapper = state[key], (*wrapper, key)
    if not _is_state_dict(state):
        where = "".join(f"[{key!r}]" for key in wrapper)
        if isinstance(state, Mapping) and state:
            content = ", ".join(f"{k!r}: {_describe(v)}" for k, v in list(state.items())[:8])
            others = f" and {len(state) - 8} more" if len(state) > 8 else ""
            found = f"a mapping whose entries are not all named tensors ({content}{others})"
        else:
            found = f"an empty {type(state).__name__}" if isinstance(state, Mapping) else f"a {_describe(state)}"
        raise WeightsError(f"{path}: holds no state_dict: checkpoint{where} is {found}; expected a mapping of names "
                           f"to tensors, at the top or under one of {', '.join(map(repr, _WRAPPER_KEYS))}")
    names = list(state)
    stripped = "module." if all(name.startswith("module.") for name in names) else ""
    if stripped:
        state = {name[len(stripped):]: tensor for name, tensor in state.items()}
    return state, wrapper, stripped


def _used_storages(path: Path, state: Mapping) -> list[_Storage]:
    used: dict[int, _Storage] = {}
    for name, tensor in state.items():
        if not isinstance(tensor.storage, _Storage):
            raise WeightsError(f"{path}: tensor {name!r} is built on a {_describe(tensor.storage)}, not a storage")
        used.setdefault(id(tensor.storage), tensor.storage)
    return list(used.values())


def _make_entries(path: Path, state: Mapping, located: dict[str, _Located], byteorder: str,
                  info: CheckpointInfo) -> _Entries:
    entries, described = _Entries(), {}
    for name, tensor in state.items():
        shape, stride, offset = tensor.shape, tensor.stride, tensor.offset
        if not (isinstance(shape, tuple) and isinstance(stride, tuple) and len(shape) == len(stride)
                and all(is_count(v) for v in (*shape, *stride, offset))):
            raise WeightsError(f"{path}: tensor {name!r} has a malformed shape {_short(shape)}, stride "
                               f"{_short(stride)} or offset {_short(offset)}")
        storage = tensor.storage
        file_dtype, torch_name = _STORAGES[storage.kind.name]
        layout = f"tensor {name!r} (shape {_short(list(shape))}, stride {_short(list(stride))}, offset {offset})"
        # The elements the view touches: from its offset to its last element; empty tensors touch none.
        extent = 0 if 0 in shape else 1 + sum((n - 1) * s for n, s in zip(shape, stride))
        if offset + extent > located[storage.key].numel:
            raise WeightsError(f"{path}: {layout} reaches past the end of its storage {storage.key!r} of "
                               f"{storage.numel} elements")
        # Zero or overlapping strides repeat elements (expand() does), so a view may be far larger than its
        # storage: 2**62 x 2**62 from one float. Zero sizes count as one, so no size is unbounded either.
        nbytes = math.prod(max(n, 1) for n in shape) * (4 if torch_name == "bfloat16" else file_dtype.itemsize)
        storage_bytes = storage.numel * file_dtype.itemsize
        if nbytes > max(_MAX_REPEAT * storage_bytes, _MAX_REPEATED_BYTES):
            raise WeightsError(f"{path}: {layout} repeats the {storage_bytes} bytes of its storage {storage.key!r} "
                               f"into {nbytes} bytes, more than {_MAX_REPEAT} times them and over "
                               f"{_MAX_REPEATED_BYTES >> 20} MiB; a checkpoint stores each tensor's values, so the "
                               "file is corrupt or crafted")
        file_dtype = file_dtype.newbyteorder("<" if byteorder == "little" else ">")
        dtype = np.dtype(np.float32) if torch_name == "bfloat16" else file_dtype.newbyteorder("=")
        read = functools.partial(_read_tensor, located[storage.key], file_dtype, torch_name == "bfloat16",
                                 tensor.negative, offset, extent, shape, stride)
        entries[name] = Entry(tuple(shape), dtype, read, torch_name)
        described[name] = (tuple(shape), torch_name)
    entries.info = dataclasses.replace(info, tensors=described)
    return entries


def _read_tensor(located: _Located, file_dtype: np.dtype, bfloat16: bool, negative: bool, offset: int, extent: int,
                 shape: tuple[int, ...], stride: tuple[int, ...]) -> np.ndarray:
    span = located.read(file_dtype, offset, extent)  # only the elements this view touches, freshly read
    # A dimension of size 0 or 1 never steps, so its stride (unchecked, any integer) is irrelevant: 0 keeps it in range.
    steps = tuple(s * file_dtype.itemsize if n > 1 and extent else 0 for n, s in zip(shape, stride))
    view = np.lib.stride_tricks.as_strided(span, shape, steps, writeable=False)
    array = np.array(view, dtype=file_dtype.newbyteorder("="), order="C")  # a contiguous, native-order copy
    if bfloat16:  # bfloat16 is the top half of a float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    if negative:
        array = np.negative(array)
    return array


# -- writing ----------------------------------------------------------------------------------


class _TorchName:
    """A name in torch (a rebuild function, a storage class), written into the pickle by name only."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle requires a reduce function to be callable; this one never is called
        raise TypeError(f"{self.module}.{self.name} is only a name in a pickle written without torch")


_REBUILD_TENSOR_V2 = _TorchName("torch._utils", "_rebuild_tensor_v2")
_STORAGE_NAMES = {name: _TorchName("torch", name) for name in _STORAGES}


class _StorageToSave:
    def __init__(self, kind: str, key: str, numel: int):
        self.kind, self.key, self.numel = kind, key, numel


class _TensorToSave:
    """Pickles as ``torch._utils._rebuild_tensor_v2(storage, 0, shape, stride, False, OrderedDict())``."""

    def __init__(self, storage: _StorageToSave, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride = tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape)))  # C order, in elements
        return _REBUILD_TENSOR_V2, (self.storage, 0, self.shape, stride, False, collections.OrderedDict())


class _Pickler(pickle._Pickler):
    """Python's own pickler, taught to write a torch name as a GLOBAL without importing torch.

    The C pickler looks every global up in its module to check it, which would import torch
    (or fail without it); the pure-Python one lets a type supply its own writer.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_torch_name(self, name: _TorchName) -> None:
        self.write(pickle.GLOBAL + f"{name.module}\n{name.name}\n".encode("ascii"))
        self.memoize(name)

    dispatch[_TorchName] = _save_torch_name

    def persistent_id(self, obj):
        if isinstance(obj, _StorageToSave):  # exactly torch's: ('storage', type, key, location, numel)
            return ("storage", _STORAGE_NAMES[obj.kind], obj.key, "cpu", obj.numel)
        return None


def write_pth(path, params: Mapping[str, np.ndarray], *, bfloat16: bool | Collection[str] = False) -> None:
    """Write ``params`` as ``torch.save(state_dict)`` would, without torch, atomically.

    ``torch.load(path, weights_only=True)`` returns the same names, shapes, dtypes and values.
    Every tensor is checked first as :func:`portres.save_weights` checks it; nothing is written
    if any fails. ``bfloat16=True`` stores every floating-point tensor as bfloat16, a collection
    of names only those (rounded to nearest even from float32, as torch rounds; a value beyond
    bfloat16's range is an error, not an infinity).

        >>> write_pth("/tmp/r20.pth", portres.init_params(portres.get("resnet20")))
    """
    path = Path(path)
    arrays = checked_for_saving(path, params, ".pth", storable_dtypes=_NUMPY_TO_STORAGE,
                                format_name="a torch checkpoint")
    if isinstance(bfloat16, str) or not isinstance(bfloat16, (bool, Collection)):
        raise WeightsError(f"bfloat16 is True, False or a collection of tensor names, not {bfloat16!r}")
    if not isinstance(bfloat16, bool) and (unknown := set(bfloat16) - set(arrays)):
        raise WeightsError(f"nothing was written to {path}; bfloat16 names tensors it does not have: "
                           f"{', '.join(map(str, sorted(unknown, key=str)))}")
    storages, payloads, too_large = {}, [], []
    for index, (name, array) in enumerate(arrays.items()):
        kind = _NUMPY_TO_STORAGE[array.dtype.newbyteorder("=")]
        data = array.astype(array.dtype.newbyteorder("<"), copy=False)
        if array.dtype.kind == "f" and (bfloat16 is True or (bfloat16 is not False and name in bfloat16)):
            data = _to_bfloat16_bits(array)
            kind = "BFloat16Storage"
            if np.any((data & 0x7F80) == 0x7F80):
                too_large.append(name)
        storages[name] = _TensorToSave(_StorageToSave(kind, str(index), array.size), array.shape)
        payloads.append(data.reshape(-1).view(np.uint8))
    if too_large:
        raise WeightsError(f"nothing was written to {path}; these tensors overflow bfloat16 (largest finite "
                           f"3.39e+38): {', '.join(too_large)}")
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(collections.OrderedDict(storages))
    atomic_write(path, lambda file: _write_zip(file, buffer.getvalue(), payloads))


def round_to_bfloat16(array: np.ndarray) -> np.ndarray:
    """``array``'s values as a bfloat16 checkpoint stores them (round half to even), as float32.

        >>> round_to_bfloat16(np.array([1.0 + 2.0**-9], np.float32))
        array([1.], dtype=float32)
    """
    return (_to_bfloat16_bits(array).astype(np.uint32) << 16).view(np.float32)


def _to_bfloat16_bits(array: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, reported by the caller
        bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round half to even on the dropped 16 bits
    return rounded.astype("<u2")


def _write_zip(file: BinaryIO, pickled: bytes, payloads: list[np.ndarray]) -> None:
    # The records and their order are torch.save's, less ".format_version": that one tells torch it may
    # compute storage offsets as its own zip writer lays them out (with data descriptors, which Python's
    # zipfile does not write to a seekable file); without it torch reads offsets from the directory.
    serialization_id = int.from_bytes(hashlib.sha256(pickled).digest()[:16], "little") % 10**40
    records = [("data.pkl", pickled), (".storage_alignment", str(_ALIGNMENT).encode()), ("byteorder", b"little")]
    records += [(f"data/{index}", payload) for index, payload in enumerate(payloads)]
    records += [("version", b"3\n"), (".data/serialization_id", f"{serialization_id:040d}".encode())]
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for record, data in records:
            info = zipfile.ZipInfo(f"{_ARCHIVE}/{record}", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.file_size = len(data) if isinstance(data, bytes) else data.nbytes
            zip64 = info.file_size * 1.05 > zipfile.ZIP64_LIMIT  # as zipfile decides for a known size
            # A local header is 30 bytes, the name, the extra field (+20 for zip64 sizes); pad the extra
            # field (id "FB", as torch does) so the data starts on a multiple of 64 bytes.
            start = file.tell() + 30 + len(info.filename.encode("ascii")) + 4 + (20 if zip64 else 0)
            padding = -start % _ALIGNMENT
            info.extra = struct.pack("<HH", 0x4246, padding) + b"Z" * padding
            with archive.open(info, "w", force_zip64=zip64) as member:
                member.write(memoryview(data))
