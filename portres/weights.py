"""Seeded initialisation, safetensors/npz I/O and strict loading.

Parameter names are the plan's: torchvision's state_dict keys wherever torchvision has
the model (``layer1.0.conv1.weight``, ``layer1.0.downsample.1.running_var``, ``fc.bias``).
Elsewhere the scheme is the analogous one:

* pre-activation blocks: ``bnK`` is the BN-ReLU *before* ``convK``; the network ends with
  ``final_bn``; projections are ``downsample.0`` (a bare 1x1 conv, as in timm's v2);
* deep stem (ResNet-D): timm's ``conv1.0 / conv1.1 / conv1.3 / conv1.4 / conv1.6`` then
  ``bn1``; avg-down shortcuts are ``downsample.1`` (conv) and ``downsample.2`` (BN);
* CIFAR: ``conv1``, ``bn1``, ``layer1..3``, ``fc``; option-A shortcuts have no parameters.

Files are never half-written and never half-read:

* ``save_weights`` checks every tensor as ``load_weights`` will, then writes through
  ``_atomic_write(path, write_fn)`` (reusable for any file, e.g. training checkpoints): a
  unique temporary file beside the destination, fsynced and renamed over it, so a crash,
  Ctrl-C or a concurrent writer leaves one complete old or new file and no temporary file.
  Only a regular file is ever replaced: a device, FIFO, socket or directory at the path or
  behind its symlinks is refused.
* PyTorch checkpoints (``.pth``/``.pt``/``.bin``) are read and written by ``interop/pth.py``
  without torch and without running anything from their pickle.
* Reading validates a file's directory first (the safetensors header, as strictly as the
  reference library; the zip directory and each member's ``.npy`` header) and then reads
  only the tensors needed: a file that does not fit the spec is rejected unread, and a
  small ``.npz`` claiming gigabytes is never decompressed.

Errors list at most the first 20 names or problems of each kind, then how many more, so a
file of millions of tensors (or a megabyte-long name) gives a message of a few lines.

    >>> import portres
    >>> params = portres.init_params(portres.get("resnet18"), seed=0)
    >>> params["conv1.weight"].shape
    (64, 3, 7, 7)
    >>> portres.save_weights("/tmp/r18.safetensors", params)
    >>> loaded = portres.load_weights("/tmp/r18.safetensors", portres.get("resnet18"))
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import secrets
import shlex
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .plan import Plan, as_plan
from .spec import ResNetSpec


class WeightsError(ValueError):
    """Weights that do not fit the spec, or a file that cannot be read; nothing was loaded."""


def init_params(spec: ResNetSpec | Plan, seed: int = 0, *, randomize_batch_norm: bool = False) -> dict[str, np.ndarray]:
    """Deterministic float32 parameters and buffers for ``spec``.

    Convs: He-normal, fan-out (torchvision). Linear: U(±1/sqrt(fan_in)) for weight and bias
    (PyTorch's default). BN: scale 1 (0 where ``zero_init_last_bn``), shift 0, running mean
    0, variance 1. Each tensor draws from its own stream seeded by ``(seed, crc32(name))``,
    so values do not depend on plan order, platform or which other tensors exist.

    ``randomize_batch_norm=True`` draws non-trivial BN scales, shifts and running
    statistics instead (for parity tests: identity BN hides bugs).
    """
    plan = as_plan(spec)
    params: dict[str, np.ndarray] = {}
    for op in plan.ops:
        layer = op.layer
        for name, (shape, _) in op.param_shapes().items():
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            suffix = name.rsplit(".", 1)[1]
            if op.kind == "conv2d" and suffix == "weight":
                fan_out = shape[0] * shape[2] * shape[3]
                value = rng.standard_normal(shape) * math.sqrt(2.0 / fan_out)
            elif op.kind == "linear":
                value = rng.uniform(-1, 1, shape) / math.sqrt(layer.in_features)
            elif randomize_batch_norm:
                low_high = {"weight": (0.5, 1.5), "running_var": (0.5, 2.0)}
                if suffix in low_high:
                    value = rng.uniform(*low_high[suffix], shape)
                else:  # bias, running_mean
                    value = rng.normal(0.0, 0.2, shape)
            else:
                one = suffix == "running_var" or (suffix == "weight" and not layer.zero_init)
                value = np.full(shape, 1.0 if one else 0.0)
            params[name] = value.astype(np.float32)
    return params


# -- writing files: all or nothing -----------------------------------------------------------

_TORCH_FORMATS = (".pth", ".pt", ".bin")  # torch.save checkpoints, read and written by interop/pth.py
_FORMATS = (".safetensors", ".npz", *_TORCH_FORMATS)
_FORMAT_NAMES = ".safetensors, .npz or .pth (.pt, .bin)"
_KERAS_FORMATS = (".h5", ".keras")  # Keras weights, read (not written) by interop/keras.py with h5py
_READ_FORMAT_NAMES = ".safetensors, .npz, .pth (.pt, .bin) or Keras' .h5 (.weights.h5, .keras)"
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": None,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
                       "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}
_NUMPY_TO_SAFETENSORS = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items() if v is not None}
_MAX_HEADER = 100_000_000  # the reference safetensors library's limit on the JSON header
_NUMERIC_KINDS = "fiu"  # dtype kinds a weight may have: bool, complex, strings and objects are not weights
_CHUNK = 1 << 24  # bytes per read when filling an array from a file (bounds the temporary buffers)
_LISTED = 20  # items an error lists of each kind: a file can hold millions of tensors
_ITEM_CHARS = 300  # longest item listed in full: a tensor name can be megabytes long
_NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink loop"))


def capped(items, what: str = "more", limit: int = _LISTED) -> list[str]:
    """The first ``limit`` of ``items`` as text, then "... and N more" if there are more.

    Every message that lists names or problems goes through this, so its length does not grow
    with the file: 200,000 unexpected tensors are 20 names and a count, not 1.7 MB of text.
    """
    items = list(items)
    more = [f"... and {len(items) - limit:,} {what}"] if len(items) > limit else []
    return [str(item) for item in items[:limit]] + more


def listed(names, separator: str = ", ") -> str:
    """Names for a message: the first ``_LISTED``, each shortened, then how many more."""
    return separator.join(_shortened(text) for text in capped(names))


def _shortened(text: str) -> str:
    """``text``, or its start and end around a count of what was left out if it is over ``_ITEM_CHARS``."""
    if len(text) <= _ITEM_CHARS:
        return text
    return f"{text[:150]}...({len(text) - 250:,} characters)...{text[-100:]}"


def _atomic_write(path, write_fn: Callable[[BinaryIO], object]) -> None:
    """Replace the file at ``path`` with the bytes ``write_fn(file)`` writes: all or nothing.

    The bytes go to a new, uniquely named file in the destination's directory, which is
    fsynced and renamed over the destination (``os.replace``: atomic on POSIX and Windows);
    the directory is then fsynced where the OS allows. So a crash, a failing ``write_fn``,
    Ctrl-C or a concurrent writer leaves the complete old file or a complete new one, never
    a mix, and never the temporary file. A new file gets the mode any new file gets (0666
    less the umask); a replaced file keeps its mode; through a symlink, the link's target is
    replaced and the link kept (a dangling link's target is created, as shell redirection
    does). Only a regular file is ever replaced: a directory, FIFO, device or socket at
    ``path`` or behind its symlinks is refused, before writing and again just before the
    rename. A destination that cannot be written (missing or read-only directory, a
    read-only file, not a regular file) and any ``OSError`` while writing (a full disk)
    raise :class:`WeightsError` naming ``path``, never the temporary file; other exceptions
    from ``write_fn`` pass through unchanged.

        >>> _atomic_write("/tmp/notes.txt", lambda file: file.write(b"hello"))
    """
    path = Path(path)
    target = Path(os.path.realpath(path))  # through a symlink: replace its target, keep the link
    directory = target.parent
    via = f" (via symlink to {target})" if os.path.islink(path) else ""
    try:
        if not stat.S_ISDIR(os.stat(directory).st_mode):
            raise NotADirectoryError
    except FileNotFoundError:
        raise WeightsError(f"cannot write {path}{via}: directory {directory} does not exist; create it first "
                           f"(mkdir -p {shlex.quote(str(directory))})") from None
    except NotADirectoryError:
        raise WeightsError(f"cannot write {path}: {directory} is not a directory") from None
    except OSError as error:
        raise WeightsError(f"cannot write {path}: cannot reach {directory} ({error.strerror})") from None
    existing = _existing_regular_file(path, target, via)
    old_mode = None if existing is None else stat.S_IMODE(existing.st_mode)
    if old_mode is not None and not os.access(target, os.W_OK):
        raise WeightsError(f"cannot write {path}: the existing file is read-only (mode {old_mode:o}); make it "
                           f"writable (chmod u+w {shlex.quote(str(path))}) or save elsewhere")
    descriptor, temporary = _create_temporary(path, directory, target.name, old_mode is None)
    try:
        with os.fdopen(descriptor, "wb") as file:
            write_fn(file)
            file.flush()
            if old_mode is not None:
                os.chmod(temporary, old_mode)
            os.fsync(file.fileno())
        _existing_regular_file(path, target, via)  # a FIFO or device made meanwhile is not replaced either
        os.replace(temporary, target)
    except BaseException as error:  # KeyboardInterrupt too: never leave the temporary file behind
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(error, OSError):  # a full disk, a vanished directory: name the destination, not the temp file
            raise WeightsError(f"cannot write {path}: {error.strerror or type(error).__name__}; "
                               "the existing file, if any, is unchanged") from None
        raise
    _fsync_directory(directory)


def _existing_regular_file(path: Path, target: Path, via: str) -> os.stat_result | None:
    """``target``'s status if it is a regular file, None if nothing is there; anything else is refused.

    ``os.replace`` swaps directory entries whatever they are: over a device, FIFO or socket it
    would put a regular file in the node's place (as root, an output symlinked to /dev/null
    would replace /dev/null). ``target`` has its symlinks resolved, so lstat sees the node itself.
    """
    try:
        status = os.lstat(target)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise WeightsError(f"cannot write {path}: {error.strerror}; check the permissions of {target.parent}") from None
    if stat.S_ISREG(status.st_mode):
        return status
    if stat.S_ISDIR(status.st_mode):
        raise WeightsError(f"cannot write {path}: it is a directory{via}; give the path of a file inside it")
    kind = next((name for is_kind, name in _NOT_REGULAR if is_kind(status.st_mode)), "a special file")
    raise WeightsError(f"cannot write {path}: it is {kind}{via}, not a regular file; choose another output path")


def _create_temporary(path: Path, directory: Path, name: str, new: bool) -> tuple[int, Path]:
    # Not tempfile.mkstemp: it creates mode 0600, and giving a new file the umask's mode would
    # need the umask, which a process can only read by changing it (racy with threads). Opening
    # with 0666 lets the kernel apply the umask and any default ACL as for any new file; a
    # replaced file's old mode is set after writing.
    temporary = directory / f".{name[:32]}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(temporary, flags, 0o666 if new else 0o600), temporary
    except PermissionError:
        raise WeightsError(f"cannot write {path}: no permission to create files in {directory}; choose a "
                           "writable directory or fix its permissions") from None
    except OSError as error:
        raise WeightsError(f"cannot write {path}: cannot create a file in {directory} ({error.strerror})") from None


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable. Windows cannot open a directory, and some file systems
    # refuse to sync one; the file's own data was synced before the rename either way.
    try:
        descriptor = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def save_weights(path, params: Mapping[str, np.ndarray], *, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``params`` to ``path`` (``.safetensors``, ``.npz`` or torch's ``.pth``), atomically.

    Every tensor is first checked as :func:`load_weights` will check it (a non-empty string
    name the format can store, a numeric dtype, finite values); on any problem nothing is
    written and one :class:`WeightsError` lists them all. The file is replaced all or nothing
    (see ``_atomic_write``): it keeps its permissions, and a symlink keeps its link.
    ``metadata`` (strings) goes into a safetensors file's ``__metadata__``.

        >>> save_weights("/tmp/r20.npz", init_params(portres.get("resnet20")))
    """
    path = Path(path)
    if path.suffix not in _FORMATS:
        raise WeightsError(f"{path}: unknown weights format {path.suffix!r}; use {_FORMAT_NAMES}")
    if metadata is not None:
        if path.suffix != ".safetensors":
            raise WeightsError(f"{path}: only .safetensors files carry metadata")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise WeightsError(f"{path}: metadata must map strings to strings")
    if path.suffix in _TORCH_FORMATS:
        from .interop.pth import write_pth

        write_pth(path, params)
        return
    arrays = _checked_for_saving(path, params)
    if path.suffix == ".safetensors":
        header = _safetensors_header(path, arrays, metadata or {})
        _atomic_write(path, lambda file: _write_safetensors(file, header, arrays))
    else:
        _atomic_write(path, lambda file: _write_npz(file, arrays))


def _checked_for_saving(path: Path, params, container: str | None = None) -> dict[str, np.ndarray]:
    """The arrays to write, each checked as loading will check it; ``container`` defaults to the suffix."""
    container = container or path.suffix
    if container in _TORCH_FORMATS:
        from .interop.pth import _NUMPY_TO_STORAGE as storable
    if not isinstance(params, Mapping):
        raise WeightsError(f"cannot save {type(params).__name__} to {path}: give a mapping of name -> array")
    arrays, problems = {}, []
    for name, value in params.items():
        if not isinstance(name, str) or not name:
            problems.append(f"{name!r}: a tensor name must be a non-empty string")
            continue
        if container == ".safetensors" and name == "__metadata__":
            problems.append(f"{name}: the name is reserved for the safetensors header's metadata")
            continue
        if container == ".npz" and zipfile.ZipInfo(name + ".npy").filename != name + ".npy":
            problems.append(f"{name!r}: a zip member cannot be named so (NUL byte or path separator); rename it")
            continue
        try:
            array = _to_numpy(value)
        except Exception as error:  # noqa: BLE001 - any unconvertible object is a user error here
            problems.append(f"{name}: cannot convert {type(value).__name__} to an array ({error})")
            continue
        stored = array.dtype.newbyteorder("=")
        if array.dtype.kind not in _NUMERIC_KINDS:
            problems.append(f"{name}: dtype {array.dtype} is not numeric; weights are integers or floats")
        elif container == ".safetensors" and stored not in _NUMPY_TO_SAFETENSORS:
            problems.append(f"{name}: safetensors cannot store dtype {array.dtype}; cast it (e.g. to float32)")
        elif container in _TORCH_FORMATS and stored not in storable:
            problems.append(f"{name}: a torch checkpoint cannot store dtype {array.dtype}; cast it (e.g. to float32)")
        elif array.dtype.kind == "f" and not np.isfinite(array).all():
            problems.append(f"{name}: contains NaN or inf")
        else:
            arrays[name] = np.asarray(array, order="C")  # ascontiguousarray would make a scalar shape (1,)
    if problems:
        raise WeightsError(f"nothing was written to {path}; these tensors would not load:\n  "
                           + "\n  ".join(capped(problems, "more problems")))
    return arrays


def _safetensors_header(path: Path, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    header, offset = {}, 0
    for name, array in arrays.items():
        header[name] = {"dtype": _NUMPY_TO_SAFETENSORS[array.dtype.newbyteorder("=")], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    header["__metadata__"] = {"format": "np", "writer": "portres", **metadata}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
    if len(text) > _MAX_HEADER:
        raise WeightsError(f"nothing was written to {path}: its safetensors header would be {len(text)} bytes, over "
                           f"the format's limit of {_MAX_HEADER}; save fewer tensors per file or use .npz")
    return text


def _write_safetensors(file: BinaryIO, header: bytes, arrays: Mapping[str, np.ndarray]) -> None:
    file.write(struct.pack("<Q", len(header)))
    file.write(header)
    for array in arrays.values():
        file.write(array.astype(array.dtype.newbyteorder("<"), copy=False).reshape(-1).view(np.uint8).data)


def _write_npz(file: BinaryIO, arrays: Mapping[str, np.ndarray]) -> None:
    # What np.savez does, without its keyword arguments: a tensor named "file" or "allow_pickle" is data here.
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


# -- reading files: the directory first, then only the data needed ------------------------------


@dataclass(frozen=True)
class _Entry:
    """One tensor of a weights file, described from the file's directory alone."""

    shape: tuple[int, ...]  # as the file declares it
    dtype: np.dtype  # of the array read() returns (bfloat16 is widened to float32)
    read: Callable[[], np.ndarray]  # reads (and for .npz decompresses) this tensor's data only
    stored: str | None = None  # the file's own dtype where it differs from ``dtype`` ("bfloat16")


def read_weights_file(path) -> dict[str, np.ndarray]:
    """Every tensor in a ``.safetensors``, ``.npz`` or torch ``.pth`` file, unchecked against any spec.

    The file's directory (every name, dtype, shape and size) is validated before any tensor
    data is read; a corrupt or unreadable file raises :class:`WeightsError` naming it.

        >>> read_weights_file("/tmp/r18.safetensors")["fc.bias"].shape
        (1000,)
    """
    with _open_weights_file(path) as entries:
        return {name: entry.read() for name, entry in entries.items()}


def describe_weights_file(path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each tensor's shape and dtype as the file stores it (e.g. ``"bfloat16"``), from its directory alone.

        >>> describe_weights_file("/tmp/r18.safetensors")["fc.bias"]
        ((1000,), 'float32')
    """
    with _open_weights_file(path) as entries:
        return {name: (entry.shape, entry.stored or str(entry.dtype)) for name, entry in entries.items()}


@contextlib.contextmanager
def _open_weights_file(path, container: str | None = None) -> Iterator[dict[str, _Entry]]:
    """The validated directory of a weights file; its entries can be read while the context is open.

    ``container`` (a suffix) overrides the one the path has, e.g. ``.pth`` for ``checkpoint.pth.tar``.
    """
    path = Path(path)
    container = container or path.suffix
    if container not in (*_FORMATS, *_KERAS_FORMATS):
        raise WeightsError(f"{path}: unknown weights format {path.suffix!r}; use {_READ_FORMAT_NAMES}")
    if os.path.isdir(path):  # os.path, not Path: it answers False instead of raising where access is denied
        raise WeightsError(f"{path} is a directory, not a weights file; give the path of a {path.suffix} file")
    if os.path.exists(path) and not os.path.isfile(path):
        raise WeightsError(f"{path} is not a regular file; give the path of a {path.suffix} file")
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such weights file") from None
    except PermissionError:
        raise WeightsError(f"{path}: permission denied; make it readable (chmod u+r {shlex.quote(str(path))}) "
                           "and its directories searchable") from None
    except OSError as error:
        raise WeightsError(f"{path}: cannot open ({error.strerror})") from None
    with file:
        if container == ".safetensors":
            yield _safetensors_entries(path, file)
            return
        if container in _TORCH_FORMATS:
            from .interop.pth import checkpoint_entries

            with checkpoint_entries(path, file) as entries:
                yield entries
            return
        if container in _KERAS_FORMATS:
            from .interop.keras import h5_entries

            with h5_entries(path, file) as entries:
                yield entries
            return
        if file.read(6) == b"\x93NUMPY":  # np.save output renamed to .npz
            raise WeightsError(f"{path}: holds a single array, not a .npz archive of named tensors")
        file.seek(0)
        try:
            archive = zipfile.ZipFile(file)
        except _ZIP_ERRORS as error:
            raise WeightsError(f"{path}: not a valid .npz file ({type(error).__name__}: {error})") from None
        with archive:
            yield _npz_entries(path, archive)


def _read_array(file, shape: tuple[int, ...], dtype: np.dtype, fortran_order: bool = False) -> np.ndarray:
    """The next ``prod(shape)`` items of ``file``, read straight into a new array in bounded chunks."""
    array = np.empty(math.prod(shape), dtype)
    if array.nbytes:
        buffer, filled = memoryview(array.view(np.uint8)), 0
        while filled < len(buffer):
            count = file.readinto(buffer[filled:filled + _CHUNK])
            if not count:
                raise EOFError(f"the data ends {len(buffer) - filled} bytes early")
            filled += count
    return array.reshape(shape, order="F" if fortran_order else "C")


_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError, RuntimeError)


def _npz_entries(path: Path, archive: zipfile.ZipFile) -> dict[str, _Entry]:
    # Everything here comes from the zip directory and each member's .npy header (its first
    # bytes): a member that claims gigabytes is judged before a byte of it is decompressed.
    def bad(why: str) -> WeightsError:
        return WeightsError(f"{path}: not a valid .npz file ({_shortened(why)})")  # a member's name can be 64 KB

    entries: dict[str, _Entry] = {}
    for info in archive.infolist():
        if not info.filename.endswith(".npy"):
            raise bad(f"member {info.filename!r} is not a .npy array")
        name = info.filename[:-len(".npy")]
        if not name:
            raise bad("a member has an empty name")
        if name in entries:
            raise bad(f"two members are named {info.filename!r}")
        try:
            shape, fortran_order, dtype, data_offset = _npy_header(archive, info)
        except _ZIP_ERRORS as error:
            raise bad(f"member {info.filename!r}: {type(error).__name__}: {error}") from None
        if dtype.hasobject:
            raise bad(f"member {info.filename!r} holds Python objects, which are never unpickled")
        size = math.prod(shape) * dtype.itemsize
        if info.file_size != data_offset + size:
            raise bad(f"member {info.filename!r} declares shape {list(shape)} of {dtype} ({size} bytes) but stores "
                      f"{info.file_size - data_offset} bytes: corrupt")
        read = functools.partial(_read_npz_member, path, archive, info, data_offset, shape, dtype, fortran_order)
        entries[name] = _Entry(tuple(shape), dtype, read)
    return entries


def _npy_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported (1.0 and 2.0 are)")
        return shape, fortran_order, dtype, member.tell()


def _read_npz_member(path, archive, info, data_offset, shape, dtype, fortran_order) -> np.ndarray:
    try:
        with archive.open(info) as member:
            member.read(data_offset)
            return _read_array(member, shape, dtype, fortran_order)
    except _ZIP_ERRORS as error:
        raise WeightsError(f"{path}: member {info.filename!r} is corrupt ({type(error).__name__}: {error})") from None


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    # json.loads keeps the last of two equal keys; in a header that would silently pick one of two tensors.
    result = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _safetensors_entries(path: Path, file: BinaryIO) -> dict[str, _Entry]:
    # The rules of the reference library: a JSON header of at most 100 MB, then a body that the
    # tensors' byte ranges, sorted, cover exactly (no overlap, no hole, nothing after the last).
    def bad(why: str) -> WeightsError:
        return WeightsError(f"{path}: not a valid safetensors file ({_shortened(why)})")  # or a name, megabytes

    size = os.fstat(file.fileno()).st_size
    if size < 8:
        raise bad(f"{size} bytes, shorter than the 8-byte header length")
    (header_length,) = struct.unpack("<Q", file.read(8))
    if header_length > size - 8:
        raise bad(f"header length {header_length} exceeds the file's {size - 8} remaining bytes: truncated or corrupt")
    if header_length > _MAX_HEADER:
        raise bad(f"header length {header_length} exceeds the format's limit of {_MAX_HEADER} bytes")
    raw = file.read(header_length)
    if len(raw) != header_length:
        raise bad(f"header ends after {len(raw)} of {header_length} bytes: truncated")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as error:
        raise bad(f"header is not UTF-8 text: {error}") from None
    except _DuplicateKey as error:
        raise bad(f"header has the key {error.args[0]!r} more than once") from None
    except json.JSONDecodeError as error:
        raise bad(f"header is not JSON: {error}") from None
    except RecursionError:
        raise bad("header is not a safetensors header: its JSON is nested thousands of levels deep") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise bad("__metadata__ is not a map of strings to strings")
    body_start, body_length = 8 + header_length, size - 8 - header_length
    entries, spans = {}, []
    for name, info in header.items():
        if not name:
            raise bad("a tensor has an empty name")
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise bad(f"entry {name!r} lacks dtype/shape/data_offsets")
        dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
                and all(_is_count(v) for v in (*shape, *offsets))):
            raise bad(f"entry {name!r} has a shape or offsets that are not non-negative integers")
        if not isinstance(dtype_name, str) or dtype_name not in _SAFETENSORS_DTYPES:
            raise bad(f"entry {name!r} has unsupported dtype {dtype_name!r}")
        begin, end = offsets
        itemsize = 2 if dtype_name == "BF16" else np.dtype(_SAFETENSORS_DTYPES[dtype_name]).itemsize
        if end - begin != math.prod(shape) * itemsize:
            raise bad(f"entry {name!r} has {end - begin} bytes for shape {shape} of {dtype_name}")
        spans.append((begin, end, name))
        dtype = np.dtype(np.float32) if dtype_name == "BF16" else np.dtype(_SAFETENSORS_DTYPES[dtype_name])
        read = functools.partial(_read_safetensors_tensor, path, file, body_start + begin, tuple(shape), dtype_name)
        entries[name] = _Entry(tuple(shape), dtype, read, "bfloat16" if dtype_name == "BF16" else None)
    covered = 0
    for begin, end, name in sorted(spans):
        if begin < covered:
            raise bad(f"entry {name!r} (bytes {begin}..{end}) overlaps the tensor before it, which ends at {covered}")
        if begin > covered:
            raise bad(f"bytes {covered}..{begin} before entry {name!r} belong to no tensor")
        covered = end
    if covered > body_length:
        raise bad(f"the tensors need {covered} bytes but the body holds {body_length}: truncated")
    if covered < body_length:
        raise bad(f"the last {body_length - covered} bytes of the body belong to no tensor")
    return entries


def _read_safetensors_tensor(path: Path, file: BinaryIO, start: int, shape: tuple[int, ...], dtype_name: str):
    try:
        file.seek(start)
        if dtype_name == "BF16":  # bfloat16 is the top half of a float32
            raw = _read_array(file, shape, np.dtype("<u2"))
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return _read_array(file, shape, np.dtype(_SAFETENSORS_DTYPES[dtype_name]).newbyteorder("<"))
    except (OSError, EOFError) as error:
        raise WeightsError(f"{path}: cannot read its tensors ({type(error).__name__}: {error})") from None


# -- strict loading -------------------------------------------------------------------------


def _to_numpy(value):
    if hasattr(value, "detach"):  # a torch tensor; torch stays un-imported here
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def _float_dtype(dtype) -> np.dtype:
    try:
        target = np.dtype(dtype)
    except TypeError:
        target = None
    if target is None or target.kind != "f":
        raise WeightsError(f"dtype {dtype!r} is not a floating-point type; use 'float32', 'float16' or 'float64'")
    return target


TRAINING_STATE = "optimizer/"  # names of a training checkpoint's optimiser slots: state, not weights


def _is_counter(name: str) -> bool:
    # torchvision's BN step counters and a portres checkpoint's optimiser state: not parameters
    return name.endswith("num_batches_tracked") or name.startswith(TRAINING_STATE)


def read_metadata(path) -> dict[str, str]:
    """The ``__metadata__`` of a ``.safetensors`` file (``{}`` for other formats), read from its header only."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    with _open_weights_file(path):  # validates the whole header first
        pass
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        return dict(json.loads(file.read(length).decode("utf-8")).get("__metadata__") or {})


def _cast(name: str, array: np.ndarray, target: np.dtype) -> tuple[np.ndarray | None, str | None]:
    """``array`` as a C-ordered copy in ``target``, or why not; finiteness is checked after the cast."""
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, not warned about
        value = np.array(array, dtype=target, order="C")
    if np.isfinite(value).all():
        return value, None
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return None, f"{name}: contains NaN or inf"
    largest = float(np.abs(array.astype(np.float64)).max())
    return None, (f"{name}: largest magnitude {largest:.6g} overflows {target} (largest finite "
                  f"{float(np.finfo(target).max):.6g}); rescale it or load with a wider dtype, e.g. dtype='float64'")


def load_weights(source, spec: ResNetSpec | Plan, *, dtype="float32", layout: str = "torchvision"
                 ) -> dict[str, np.ndarray]:
    """Check ``source`` (a path or a mapping) against ``spec``; return copies in ``dtype``.

    Strict: every missing, unexpected, misshapen, non-numeric or non-finite entry, and every
    value too large for ``dtype`` (checked after the cast), is reported in one
    :class:`WeightsError`. A torchvision ``state_dict`` loads as is (its
    ``num_batches_tracked`` counters are ignored). From a file, names, shapes and dtypes are
    checked from its directory first, so a file that does not fit is rejected without its
    data being read. Nothing is returned half-loaded.

    ``layout`` names the source's naming scheme: ``"torchvision"`` (portres's own names),
    ``"timm"``, ``"keras"`` (Keras Applications; ``.h5``/``.weights.h5``/``.keras`` files need
    h5py) or ``"mlxim"`` (mlx-image), mapped by :mod:`portres.interop` with their tensor layouts
    (HWIO, OHWI, ...) converted; ``"auto"`` picks the one scheme whose names fit exactly. Problems
    are reported in the source's own names.

        >>> params = load_weights("/tmp/r18.safetensors", portres.get("resnet18"), dtype="float32")
        >>> params["fc.weight"].dtype
        dtype('float32')
        >>> params = load_weights("resnet50.weights.h5", portres.get("keras_resnet50"), layout="keras")
    """
    plan = as_plan(spec)
    target = _float_dtype(dtype)
    from . import interop

    interop.schemes(layout)  # an unknown layout fails before any file is opened
    expected = {name: shape for name, (shape, _) in plan.param_shapes().items()}
    if isinstance(source, (str, os.PathLike)):
        origin = str(source)
        with _open_weights_file(source) as entries:
            given = {name: entry for name, entry in entries.items() if not _is_counter(name)}
            given, expected, rename = _foreign_names(given, expected, plan, layout)
            described = {name: (entry.shape, entry.dtype) for name, entry in given.items()}
            problems, fitting = _fit(expected, given, described)
            shapes = {name: shape for name, (shape, _) in described.items()}
            if problems:
                raise _misfit(origin, plan, problems, shapes if layout == "torchvision" else None)
            arrays = {name: given[name].read() for name in fitting}
    elif isinstance(source, Mapping):
        origin = "the given mapping"
        given = {str(k): v for k, v in source.items() if not _is_counter(str(k))}
        given, expected, rename = _foreign_names(given, expected, plan, layout)
        arrays, unconvertible = {}, []
        for name in [name for name in expected if name in given]:
            try:
                arrays[name] = _to_numpy(given[name])
            except Exception as error:  # noqa: BLE001 - any unconvertible object is a user error here
                unconvertible.append(f"{name}: cannot convert {type(given[name]).__name__} to an array ({error})")
        problems, fitting = _fit(expected, given, {name: (array.shape, array.dtype) for name, array in arrays.items()})
        problems += unconvertible
        shapes = {name: tuple(value.shape) for name, value in given.items() if hasattr(value, "shape")}
    else:
        raise WeightsError(f"weights must be a file path or a mapping of name -> array, got {type(source).__name__}")
    result = {}
    for name in fitting:
        portres_name, transform = rename[name]
        result[portres_name], problem = _cast(name, transform.to_portres(arrays[name]), target)
        if problem:
            problems.append(problem)
    if problems:
        raise _misfit(origin, plan, problems, shapes if layout == "torchvision" else None)
    return {name: result[name] for name in plan.param_shapes()}  # plan order, whatever the source's


def _foreign_names(given: dict, expected: dict, plan: Plan, layout: str) -> tuple[dict, dict, dict]:
    """``given`` under the chosen scheme's spelling, the shapes it should have under its names,
    and ``{its name: (portres name, transform)}``; the scheme is ``layout``'s, or detected."""
    from . import interop

    if layout == "torchvision":
        return given, expected, interop.identity_map(plan)
    scheme = interop.choose(given, plan, layout)
    renamed: dict = {}
    for name, value in given.items():
        spelled = scheme.normalize(name)
        if spelled in renamed:
            raise WeightsError(f"the weights name {_shortened(repr(spelled))} twice (as {_shortened(repr(name))} "
                               "and another spelling)")
        renamed[spelled] = value
    try:
        rename = scheme.name_map(plan)
    except interop.NotApplicable as error:
        raise WeightsError(f"layout {layout!r} cannot name {plan.spec.name}'s weights: {error}") from None
    return renamed, {name: transform.foreign_shape(expected[portres_name])
                     for name, (portres_name, transform) in rename.items()}, rename


def _fit(expected: dict, given: Mapping, described: dict) -> tuple[list[str], list[str]]:
    """Problems found from names, shapes and dtypes alone, and the names (in plan order) that fit."""
    problems, fitting = [], []
    missing = [name for name in expected if name not in given]
    unexpected = [name for name in given if name not in expected]
    if missing:
        problems.append(f"missing ({len(missing):,}): {listed(missing)}")
    if unexpected:
        hint = ""
        if all(name.startswith("module.") for name in unexpected):
            hint = " (every unexpected key starts with 'module.': strip the DataParallel prefix)"
        problems.append(f"unexpected ({len(unexpected):,}): {listed(unexpected)}{hint}")
    for name, shape in expected.items():
        if name not in described:
            continue
        actual_shape, actual_dtype = described[name]
        if actual_dtype.kind not in _NUMERIC_KINDS:
            problems.append(f"{name}: dtype {actual_dtype} is not numeric")
        elif tuple(actual_shape) != tuple(shape):
            problems.append(f"{name}: shape {_shortened(str(list(actual_shape)))}, expected {list(shape)}")
        else:
            fitting.append(name)
    return problems, fitting


def _misfit(origin: str, plan: Plan, problems: list[str], shapes: Mapping[str, tuple] | None = None) -> WeightsError:
    hint = _looks_like(shapes, plan) if shapes else ""
    return WeightsError(f"weights from {origin} do not fit {plan.spec.name}:\n  "
                        + "\n  ".join(capped(problems, "more problems")) + hint)


@functools.cache
def _signature(spec: ResNetSpec) -> frozenset[tuple[str, tuple[int, ...]]]:
    return frozenset((name, tuple(shape)) for name, (shape, _) in as_plan(spec).param_shapes().items())


def nearest_presets(shapes: Mapping[str, tuple[int, ...]]) -> tuple[list[str], int, int]:
    """The zoo presets whose parameters best match ``shapes`` (name -> shape) by name and shape.

    Returns the presets tied for the best match (several when architectures share every shape,
    e.g. ``resnet50`` and ``resnet50_v1``), how many tensors of ``shapes`` they match and how
    many tensors they have; ``num_batches_tracked`` counters are ignored.

        >>> nearest_presets({k: v.shape for k, v in init_params(portres.get("resnet101")).items()})
        (['resnet101', 'resnet101_v1'], 522, 522)
    """
    from . import zoo

    given = {(name, tuple(shape)) for name, shape in shapes.items() if not _is_counter(name)}
    best, best_score, matched, total = [], -1.0, 0, 0
    for name in zoo.names():
        signature = _signature(zoo.get(name))
        common = len(given & signature)
        score = common / max(1, len(given | signature))  # Jaccard: penalises extra and missing tensors alike
        if score > best_score:
            best, best_score, matched, total = [name], score, common, len(signature)
        elif score == best_score:
            best.append(name)
    return best, matched, total


def _looks_like(shapes: Mapping[str, tuple], plan: Plan) -> str:
    """A hint naming the zoo preset the weights were made for, when that is not the one asked for."""
    given = {(name, tuple(shape)) for name, shape in shapes.items() if not _is_counter(name)}
    if given == {(name, tuple(shape)) for name, (shape, _) in plan.param_shapes().items()}:
        return ""  # names and shapes fit: the problem is elsewhere (a dtype, a value)
    best, matched, total = nearest_presets(shapes)
    if plan.spec.name in best or matched < 0.5 * max(len(given), total):
        return ""
    names = listed(best, " or ")
    if matched == len(given) == total:
        return f"\n  looks like {names} (every name and shape matches); load it with that preset"
    return f"\n  closest preset: {names} ({matched} of its {total} tensors match by name and shape)"
