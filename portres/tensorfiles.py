"""Tensor files: safetensors and ``.npz`` read and written, and any file written all or nothing.

The file-level half of weights I/O, kept apart from networks (as tinygrad's ``nn/state.py``
is): nothing here knows a spec or a plan, so :mod:`portres.weights`, :mod:`portres.interop`
and :mod:`portres.training.checkpoint` all build on it and it imports none of them.

* :func:`atomic_write` replaces a file with what a function writes: a unique temporary
  file beside the destination, fsynced and renamed over it, so a crash, Ctrl-C or a
  concurrent writer leaves one complete old or new file and no temporary file. Only a
  regular file is ever replaced.
* Reading validates a file's directory first (the safetensors header, as strictly as the
  reference library; the zip directory and each member's ``.npy`` header) and describes
  each tensor as an :class:`Entry` whose ``read()`` reads only that tensor: a file that does
  not fit is rejected unread, and a small ``.npz`` claiming gigabytes is never decompressed.
* Errors are :class:`WeightsError`; lists in messages go through :func:`capped` and
  :func:`listed`, so a file of millions of tensors (or a megabyte-long name) gives a message
  of a few lines.

    >>> atomic_write("/tmp/notes.txt", lambda file: file.write(b"hello"))
    >>> with open_regular_file("/tmp/r18.safetensors") as file:
    ...     safetensors_entries(Path("/tmp/r18.safetensors"), file)["fc.bias"].shape
    (1000,)
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
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np


class WeightsError(ValueError):
    """Weights that do not fit the spec, or a file that cannot be read; nothing was loaded."""


# -- the formats ------------------------------------------------------------------------------

SAFETENSORS, NPZ = ".safetensors", ".npz"
TORCH_FORMATS = (".pth", ".pt", ".bin")  # torch.save checkpoints, read and written by interop/pth.py
WRITE_FORMATS = (SAFETENSORS, NPZ, *TORCH_FORMATS)  # the suffixes save_weights writes
WRITE_FORMAT_NAMES = ".safetensors, .npz or .pth (.pt, .bin)"
KERAS_FORMATS = (".h5", ".keras")  # Keras weights, read (not written) by interop/keras.py with h5py
READ_FORMATS = (*WRITE_FORMATS, *KERAS_FORMATS)  # the suffixes load_weights reads
READ_FORMAT_NAMES = ".safetensors, .npz, .pth (.pt, .bin) or Keras' .h5 (.weights.h5, .keras)"
NUMERIC_KINDS = "fiu"  # dtype kinds a weight may have: bool, complex, strings and objects are not weights
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": None,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
                       "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}
NUMPY_TO_SAFETENSORS = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items() if v is not None}
MAX_HEADER = 100_000_000  # the reference safetensors library's limit on the JSON header
_CHUNK = 1 << 24  # bytes per read when filling an array from a file (bounds the temporary buffers)
_LISTED = 20  # items an error lists of each kind: a file can hold millions of tensors
_ITEM_CHARS = 300  # longest item listed in full: a tensor name can be megabytes long
_NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink loop"))


# -- messages that stay short ------------------------------------------------------------------


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
    return separator.join(shortened(text) for text in capped(names))


def shortened(text: str) -> str:
    """``text``, or its start and end around a count of what was left out if it is over ``_ITEM_CHARS``."""
    if len(text) <= _ITEM_CHARS:
        return text
    return f"{text[:150]}...({len(text) - 250:,} characters)...{text[-100:]}"


# -- writing files: all or nothing -----------------------------------------------------------


def atomic_write(path, write_fn: Callable[[BinaryIO], object]) -> None:
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

        >>> atomic_write("/tmp/notes.txt", lambda file: file.write(b"hello"))
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
    descriptor, temporary = create_temporary(path, directory, target.name, old_mode is None)
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


def create_temporary(path: Path, directory: Path, name: str, new: bool) -> tuple[int, Path]:
    """A new file ``.<name[:32]>.<16 hex digits>.tmp`` in ``directory``, open for writing: ``(descriptor, path)``.

    ``new``: the file will be a new one (mode 0666 less the umask), not a replacement. Errors
    name ``path``, the destination. training/checkpoint.py removes stale files of this pattern.
    """
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


def checked_for_saving(path: Path, params, container: str | None = None, *,
                       storable_dtypes: Collection[np.dtype] | None = None, format_name: str = ""
                       ) -> dict[str, np.ndarray]:
    """The arrays to write, each checked as loading will check it; ``container`` defaults to the suffix.

    A format that stores only some dtypes names them: safetensors' are known here; another
    writer (interop/pth.py) passes ``storable_dtypes`` and its ``format_name`` for messages.

        >>> checked_for_saving(Path("/tmp/w.npz"), {"fc.bias": np.zeros(10, np.float32)})["fc.bias"].shape
        (10,)
    """
    container = container or path.suffix
    if container == SAFETENSORS:
        storable_dtypes, format_name = NUMPY_TO_SAFETENSORS, "safetensors"
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
            array = to_numpy(value)
        except Exception as error:  # noqa: BLE001 - any unconvertible object is a user error here
            problems.append(f"{name}: cannot convert {type(value).__name__} to an array ({error})")
            continue
        stored = array.dtype.newbyteorder("=")
        if array.dtype.kind not in NUMERIC_KINDS:
            problems.append(f"{name}: dtype {array.dtype} is not numeric; weights are integers or floats")
        elif storable_dtypes is not None and stored not in storable_dtypes:
            problems.append(f"{name}: {format_name} cannot store dtype {array.dtype}; cast it (e.g. to float32)")
        elif array.dtype.kind == "f" and not np.isfinite(array).all():
            problems.append(f"{name}: contains NaN or inf")
        else:
            arrays[name] = np.asarray(array, order="C")  # ascontiguousarray would make a scalar shape (1,)
    if problems:
        raise WeightsError(f"nothing was written to {path}; these tensors would not load:\n  "
                           + "\n  ".join(capped(problems, "more problems")))
    return arrays


def safetensors_header(path: Path, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    header, offset = {}, 0
    for name, array in arrays.items():
        header[name] = {"dtype": NUMPY_TO_SAFETENSORS[array.dtype.newbyteorder("=")], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    header["__metadata__"] = {"format": "np", "writer": "portres", **metadata}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
    if len(text) > MAX_HEADER:
        raise WeightsError(f"nothing was written to {path}: its safetensors header would be {len(text)} bytes, over "
                           f"the format's limit of {MAX_HEADER}; save fewer tensors per file or use .npz")
    return text


def write_safetensors(file: BinaryIO, header: bytes, arrays: Mapping[str, np.ndarray]) -> None:
    file.write(struct.pack("<Q", len(header)))
    file.write(header)
    for array in arrays.values():
        file.write(array.astype(array.dtype.newbyteorder("<"), copy=False).reshape(-1).view(np.uint8).data)


def write_npz(file: BinaryIO, arrays: Mapping[str, np.ndarray]) -> None:
    # What np.savez does, without its keyword arguments: a tensor named "file" or "allow_pickle" is data here.
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


# -- reading files: the directory first, then only the data needed ------------------------------


@dataclass(frozen=True)
class Entry:
    """One tensor of a weights file, described from the file's directory alone."""

    shape: tuple[int, ...]  # as the file declares it
    dtype: np.dtype  # of the array read() returns (bfloat16 is widened to float32)
    read: Callable[[], np.ndarray]  # reads (and for .npz decompresses) this tensor's data only
    stored: str | None = None  # the file's own dtype where it differs from ``dtype`` ("bfloat16")


@contextlib.contextmanager
def open_regular_file(path: Path) -> Iterator[BinaryIO]:
    """``path`` open for binary reading, or a :class:`WeightsError` saying why not (a directory,
    a FIFO or device, missing, unreadable); messages call it a file of its own suffix.

        >>> with open_regular_file(Path("/tmp/r18.safetensors")) as file:
        ...     file.read(8)
    """
    path = Path(path)
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
        yield file


@contextlib.contextmanager
def npz_entries(path: Path, file: BinaryIO) -> Iterator[dict[str, Entry]]:
    """The validated tensors of the ``.npz`` archive open as ``file``; readable while the context is open.

        >>> with open_regular_file(Path("/tmp/r20.npz")) as file, npz_entries(Path("/tmp/r20.npz"), file) as entries:
        ...     entries["fc.bias"].read().shape
        (10,)
    """
    if file.read(6) == b"\x93NUMPY":  # np.save output renamed to .npz
        raise WeightsError(f"{path}: holds a single array, not a .npz archive of named tensors")
    file.seek(0)
    try:
        archive = zipfile.ZipFile(file)
    except ZIP_ERRORS as error:
        raise WeightsError(f"{path}: not a valid .npz file ({type(error).__name__}: {error})") from None
    with archive:
        yield _npz_entries(path, archive)


def read_array(file, shape: tuple[int, ...], dtype: np.dtype, fortran_order: bool = False) -> np.ndarray:
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


ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError, RuntimeError)


def _npz_entries(path: Path, archive: zipfile.ZipFile) -> dict[str, Entry]:
    # Everything here comes from the zip directory and each member's .npy header (its first
    # bytes): a member that claims gigabytes is judged before a byte of it is decompressed.
    def bad(why: str) -> WeightsError:
        return WeightsError(f"{path}: not a valid .npz file ({shortened(why)})")  # a member's name can be 64 KB

    entries: dict[str, Entry] = {}
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
        except ZIP_ERRORS as error:
            raise bad(f"member {info.filename!r}: {type(error).__name__}: {error}") from None
        if dtype.hasobject:
            raise bad(f"member {info.filename!r} holds Python objects, which are never unpickled")
        size = math.prod(shape) * dtype.itemsize
        if info.file_size != data_offset + size:
            raise bad(f"member {info.filename!r} declares shape {list(shape)} of {dtype} ({size} bytes) but stores "
                      f"{info.file_size - data_offset} bytes: corrupt")
        read = functools.partial(_read_npz_member, path, archive, info, data_offset, shape, dtype, fortran_order)
        entries[name] = Entry(tuple(shape), dtype, read)
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
            return read_array(member, shape, dtype, fortran_order)
    except ZIP_ERRORS as error:
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


def is_count(value) -> bool:
    """A non-negative int, not a bool: what a file's shapes, offsets and sizes must be.

        >>> is_count(3), is_count(True), is_count(-1)
        (True, False, False)
    """
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def safetensors_entries(path: Path, file: BinaryIO) -> dict[str, Entry]:
    """The validated tensors of the ``.safetensors`` file open as ``file``, from its header alone.

        >>> with open_regular_file(Path("/tmp/r18.safetensors")) as file:
        ...     safetensors_entries(Path("/tmp/r18.safetensors"), file)["fc.bias"].dtype
        dtype('float32')
    """
    # The rules of the reference library: a JSON header of at most 100 MB, then a body that the
    # tensors' byte ranges, sorted, cover exactly (no overlap, no hole, nothing after the last).
    def bad(why: str) -> WeightsError:
        return WeightsError(f"{path}: not a valid safetensors file ({shortened(why)})")  # or a name, megabytes

    size = os.fstat(file.fileno()).st_size
    if size < 8:
        raise bad(f"{size} bytes, shorter than the 8-byte header length")
    (header_length,) = struct.unpack("<Q", file.read(8))
    if header_length > size - 8:
        raise bad(f"header length {header_length} exceeds the file's {size - 8} remaining bytes: truncated or corrupt")
    if header_length > MAX_HEADER:
        raise bad(f"header length {header_length} exceeds the format's limit of {MAX_HEADER} bytes")
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
                and all(is_count(v) for v in (*shape, *offsets))):
            raise bad(f"entry {name!r} has a shape or offsets that are not non-negative integers")
        if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_DTYPES:
            raise bad(f"entry {name!r} has unsupported dtype {dtype_name!r}")
        begin, end = offsets
        itemsize = 2 if dtype_name == "BF16" else np.dtype(SAFETENSORS_DTYPES[dtype_name]).itemsize
        if end - begin != math.prod(shape) * itemsize:
            raise bad(f"entry {name!r} has {end - begin} bytes for shape {shape} of {dtype_name}")
        spans.append((begin, end, name))
        dtype = np.dtype(np.float32) if dtype_name == "BF16" else np.dtype(SAFETENSORS_DTYPES[dtype_name])
        read = functools.partial(_read_safetensors_tensor, path, file, body_start + begin, tuple(shape), dtype_name)
        entries[name] = Entry(tuple(shape), dtype, read, "bfloat16" if dtype_name == "BF16" else None)
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
            raw = read_array(file, shape, np.dtype("<u2"))
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return read_array(file, shape, np.dtype(SAFETENSORS_DTYPES[dtype_name]).newbyteorder("<"))
    except (OSError, EOFError) as error:
        raise WeightsError(f"{path}: cannot read its tensors ({type(error).__name__}: {error})") from None



TRAINING_STATE = "optimizer/"  # names of a training checkpoint's optimiser slots: state, not weights


def is_training_state(name: str) -> bool:
    """Whether a file's tensor ``name`` is training state rather than a weight: torchvision's BN step
    counters (``num_batches_tracked``) and a portres checkpoint's optimiser slots (``optimizer/...``).

        >>> is_training_state("bn1.num_batches_tracked"), is_training_state("bn1.weight")
        (True, False)
    """
    return name.endswith("num_batches_tracked") or name.startswith(TRAINING_STATE)


def to_numpy(value) -> np.ndarray:
    """``value`` as a NumPy array; a torch tensor is detached and moved to the CPU (bfloat16 widened to float32).

        >>> to_numpy([1.0, 2.0]).dtype
        dtype('float64')
    """
    if hasattr(value, "detach"):  # a torch tensor; torch stays un-imported here
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


