"""CIFAR-10 and CIFAR-100 from their official "python version" archives, without any framework and
without running code from the files.

Users fetch the archive themselves (https://www.cs.toronto.edu/~kriz/cifar.html) and place it, or
its extracted folder, in a data directory::

    DIR/cifar-10-python.tar.gz    or  DIR/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    DIR/cifar-100-python.tar.gz   or  DIR/cifar-100-python/{train, test, meta}

Each member is a Python 2 pickle (protocol 2) of a dict with bytes keys: ``b"data"`` (a uint8
array, one row of 3072 values per image: 1024 red, 1024 green, 1024 blue, each 32x32 row-major),
``b"labels"`` (CIFAR-10) or ``b"fine_labels"``/``b"coarse_labels"`` (CIFAR-100), ``b"batch_label"``
and ``b"filenames"``. The arrays are pickled through three numpy globals, which (with a latin1-only
stand-in for ``_codecs.encode``, for files re-saved by Python 3) are the only ones
:class:`SafeUnpickler` resolves; any other global is refused by name. Even those resolve to
stand-ins that build each array over the bytes the file holds for it: a file cannot make numpy
allocate memory it does not hold. Tar entries and extracted files are refused, from their
declared sizes before they are read, when larger than any official member.

    >>> ds = load_cifar10("data")  # doctest: +SKIP
    >>> ds.describe()  # doctest: +SKIP
    'cifar10: 50,000 train / 10,000 test, 3x32x32 uint8, 10 classes'
"""

from __future__ import annotations

import io
import math
import os
import pickle
import reprlib
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dataset import DataError, Dataset

URL = "https://www.cs.toronto.edu/~kriz/cifar.html"  # where users download the archives
IMAGE_SHAPE = (3, 32, 32)  # every CIFAR image, as stored: channels, rows, columns
# The most bytes a member may take per image: its 3,072 pixels twice over (a file re-saved by Python 3
# writes them as UTF-8 text, up to 2 bytes each) plus its label and file name. A data batch of 10,000
# images is 30.7 MB, the CIFAR-100 train file of 50,000 153 MB; anything larger is not CIFAR.
BYTES_PER_IMAGE = 2 * 3072 + 256
META_BYTES = 1 << 20  # the class names member (about 1.5 KB in CIFAR-100) and any other archive entry
MAX_ENTRIES = 64  # the official archives hold 5 and 9; tarfile keeps every entry it reads in memory


def _latin1_bytes(text, encoding="latin1"):
    # Python 3 writes bytes into a protocol-2 pickle as _codecs.encode(text, "latin1"); this stand-in
    # does only that conversion, so a file re-saved by Python 3 loads while nothing else can be called
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise DataError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r}): only the latin1 form "
                        f"Python 3 uses for bytes is allowed")
    return text.encode("latin1")


class _Refused(Exception):
    """A pickle or archive asks for something no original CIFAR file holds; the caller names the file."""


def _ndarray(*args, **kwargs):
    # what the global numpy.ndarray resolves to: the token _reconstruct expects. Called directly, as
    # ndarray(shape, dtype), numpy would allocate the shape uninitialised: memory the file does not hold
    # (949 MB from 15.8 KB), whose stale contents then read as pixels and labels
    raise _Refused("refusing a call of numpy.ndarray, which would allocate memory the file does not hold "
                   "(an original CIFAR file builds its arrays from their bytes)")


class _PickledDtype:
    """The dtype of a pickled array: numpy.dtype(code, align, copy), then BUILD with its byte order."""

    __slots__ = ("dtype",)
    CODES = frozenset(f"{kind}{size}" for kind in "iuf" for size in (1, 2, 4, 8) if f"{kind}{size}" != "f1") | {"b1"}

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype

    def __setstate__(self, state) -> None:
        # numpy 1 and 2 write (3, byte order, None, None, None, -1, -1, 0) for a plain number type; fields,
        # sub-arrays and object flags are not in a CIFAR file
        order = state[1] if isinstance(state, tuple) and len(state) == 8 else None
        order = order.decode("latin1") if isinstance(order, bytes) else order
        if order not in ("<", ">", "|", "=") or state[0] != 3 or state[2:] != (None, None, None, -1, -1, 0):
            raise _Refused(f"refusing the dtype state {reprlib.repr(state)}: a CIFAR file holds plain numbers only")
        self.dtype = self.dtype.newbyteorder(order)


def _dtype(code, align=False, copy=True) -> _PickledDtype:
    # what the global numpy.dtype resolves to: plain integer and float types only (an object dtype would have
    # numpy allocate and zero the whole shape before reading the list that fills it)
    text = code.decode("latin1") if isinstance(code, bytes) else code
    if not isinstance(text, str) or text not in _PickledDtype.CODES or align not in (0, 1) or copy not in (0, 1):
        raise _Refused(f"refusing numpy.dtype{reprlib.repr((code, align, copy))}: a CIFAR file holds plain numbers "
                       f"only")
    return _PickledDtype(np.dtype(text))


class _PickledArray:
    """What numpy's _reconstruct resolves to. numpy pickles an array as _reconstruct(ndarray, (0,), b"b")
    (an empty array) and then BUILDs it with (1, shape, dtype, Fortran order, bytes); this stand-in
    accepts only that empty start (any other would have numpy allocate the shape it names) and makes
    the array over those very bytes, so an array is never larger than the bytes behind it."""

    __slots__ = ("array",)

    def __init__(self, subtype, shape, typecode) -> None:
        if subtype is not _ndarray or shape != (0,) or typecode not in (b"b", "b"):
            name = "ndarray" if subtype is _ndarray else reprlib.repr(subtype)
            raise _Refused(f"refusing numpy _reconstruct({name}, {reprlib.repr(shape)}, {reprlib.repr(typecode)}): "
                           f"numpy starts every array as _reconstruct(ndarray, (0,), b'b')")
        self.array = None

    def __setstate__(self, state) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise _Refused(f"refusing the array state {reprlib.repr(state)}: numpy writes (1, shape, dtype, order, "
                           f"bytes)")
        version, shape, dtype, fortran, raw = state
        if not (version == 1 and isinstance(shape, tuple) and len(shape) <= 32
                and all(type(n) is int and n >= 0 for n in shape) and isinstance(dtype, _PickledDtype)
                and fortran in (0, 1) and isinstance(raw, bytes)):
            raise _Refused(f"refusing the array state {reprlib.repr(state)}: numpy writes (1, shape, dtype, order, "
                           f"bytes)")
        needed = math.prod(shape) * dtype.dtype.itemsize  # Python ints: no overflow
        if needed != len(raw):
            raise _Refused(f"an array of shape {reprlib.repr(shape)} and dtype {dtype.dtype} needs {needed:,} bytes "
                           f"but the file holds {len(raw):,} for it")
        self.array = np.frombuffer(raw, dtype.dtype).reshape(shape, order="F" if fortran else "C")


def _built(value):
    # a dict value that is a pickled array becomes the array (one that never got its bytes is refused)
    if isinstance(value, _PickledArray):
        if getattr(value, "array", None) is None:  # (NEWOBJ makes one without __init__)
            raise _Refused("an array was started but never given its bytes")
        return value.array
    return value


# The globals a pickled numpy array needs: the reconstructor, the array type and the dtype type, each
# resolved to a stand-in above (so that no pickle reaches numpy's constructors). The original files
# (Python 2, numpy 1) name the reconstructor numpy.core.multiarray; numpy 2 writes
# numpy._core.multiarray; Python 3 adds _codecs.encode for bytes at protocol 2.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _PickledArray,
    ("numpy._core.multiarray", "_reconstruct"): _PickledArray,
    ("numpy", "ndarray"): _ndarray,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1_bytes,
}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS`: loading data never runs code.

        >>> import pickle, io
        >>> SafeUnpickler(io.BytesIO(pickle.dumps(print, protocol=2)), "x").load()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        portres.data.dataset.DataError: x: refusing to load __builtin__.print: ...
    """

    def __init__(self, file, where: str) -> None:
        super().__init__(file, encoding="bytes")  # Python 2 str -> bytes, as the keys b"data" show
        self.where = where  # the file named in errors

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(f"{self.where}: refusing to load {module}.{name}: a CIFAR file holds only numpy arrays, "
                            f"lists and strings, so this is not an original CIFAR file; download it again from "
                            f"{URL}") from None

    def persistent_load(self, pid):
        raise DataError(f"{self.where}: refusing a persistent id; this is not an original CIFAR file")


def unpickle(payload: bytes, where: str) -> dict:
    """The dict pickled in ``payload`` (a CIFAR member), through :class:`SafeUnpickler`."""
    try:
        value = SafeUnpickler(io.BytesIO(payload), where).load()
        value = {key: _built(item) for key, item in value.items()} if isinstance(value, dict) else value
    except DataError:
        raise
    except _Refused as error:
        raise DataError(f"{where}: {error}; this is not an original CIFAR file: download it again from {URL}") from None
    except Exception as error:  # a truncated or corrupt file fails in many ways inside pickle
        raise DataError(f"{where} is not a readable CIFAR file ({type(error).__name__}: {error}); "
                        f"download the archive again from {URL}") from None
    if not isinstance(value, dict):
        raise DataError(f"{where} holds a {type(value).__name__}, not the dict a CIFAR file holds; "
                        f"download the archive again from {URL}")
    return value


@dataclass(frozen=True)
class Layout:
    """Where one CIFAR variant keeps its files."""

    name: str  # "cifar10" or "cifar100"
    archive: str  # the file users download
    folder: str  # the folder the archive extracts to
    train: tuple[str, ...]  # training batch members, in order
    test: str  # the test batch member
    meta: str  # the member holding the class names
    images_per_train: int = 10_000  # images in each training member (the test member holds 10,000)

    def max_bytes(self, member: str | None) -> int:
        """The most bytes ``member`` (None: any other archive entry) may take; see :data:`BYTES_PER_IMAGE`."""
        if member in self.train:
            return self.images_per_train * BYTES_PER_IMAGE
        return 10_000 * BYTES_PER_IMAGE if member == self.test else META_BYTES

    def too_large(self, what: str, size: int, member: str | None) -> str:
        title = self.name.replace("cifar", "CIFAR-")
        holder = f"a {title} {member}" if member else "any other entry of a CIFAR archive"
        return f"{what} {size:,} bytes, more than the {self.max_bytes(member):,} {holder} can hold"


CIFAR10 = Layout("cifar10", "cifar-10-python.tar.gz", "cifar-10-batches-py",
                 tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
CIFAR100 = Layout("cifar100", "cifar-100-python.tar.gz", "cifar-100-python", ("train",), "test", "meta", 50_000)


def default_data_dir() -> Path:
    """``$PORTRES_DATA_DIR`` if set, else ``./data``."""
    return Path(os.environ.get("PORTRES_DATA_DIR", "data"))


def _missing_message(layout: Layout, data_dir: Path, detail: str = "") -> str:
    where = data_dir.expanduser().resolve()
    return (f"{layout.name} not found{detail}: place {layout.archive} (from {URL}) in {where} or extract it there "
            f"(giving {where / layout.folder}/); portres does not download data")


def read_members(layout: Layout, data_dir) -> dict[str, bytes]:
    """The bytes of every member ``layout`` needs, from the extracted folder or the .tar.gz.

    Looks in ``data_dir/<folder>/``, then ``data_dir`` itself (pointed at the extracted folder),
    then ``data_dir/<archive>``; ``data_dir`` may also be the archive's path. A partly extracted
    folder is an error unless the archive sits beside it.
    """
    data_dir = Path(data_dir if data_dir is not None else default_data_dir()).expanduser()
    needed = (*layout.train, layout.test, layout.meta)
    if data_dir.is_file():
        return _from_archive(layout, data_dir, needed)
    archive = data_dir / layout.archive
    for folder in (data_dir / layout.folder, data_dir):
        present = [name for name in needed if (folder / name).is_file()]
        if present:
            missing = [name for name in needed if name not in present]
            if not missing:
                for name in needed:  # each size from the directory entry, before reading any of them
                    size = (folder / name).stat().st_size
                    if size > layout.max_bytes(name):
                        raise DataError(f"{layout.too_large(f'{folder / name} is', size, name)}; it is not from "
                                        f"{layout.archive} ({URL}): extract the archive there again")
                return {name: (folder / name).read_bytes() for name in needed}
            if not archive.is_file():
                raise DataError(f"{folder} lacks {', '.join(missing)} of {layout.name}; extract {layout.archive} "
                                f"(from {URL}) there again")
    if archive.is_file():
        return _from_archive(layout, archive, needed)
    detail = "" if data_dir.is_dir() else f" ({data_dir} does not exist)"
    raise DataError(_missing_message(layout, data_dir, detail))


class _PlainTarInfo(tarfile.TarInfo):
    """Tar headers as the official archives have them: files and folders. tarfile reads the data of a
    long-name, pax or sparse header whole while parsing it, ahead of the member it describes (a header
    declaring 1 GiB made it read 1 GiB), so those are refused here, from the header block alone."""

    KINDS = {tarfile.GNUTYPE_LONGNAME: "a GNU long name header", tarfile.GNUTYPE_LONGLINK: "a GNU long link header",
             tarfile.GNUTYPE_SPARSE: "a GNU sparse file", tarfile.XHDTYPE: "a pax header",
             tarfile.XGLTYPE: "a pax header", tarfile.SOLARIS_XHDTYPE: "a pax header"}

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        info = super().frombuf(buf, encoding, errors)
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE):
            kind = cls.KINDS.get(info.type, f"an entry of type {info.type!r}")
            raise _Refused(f"entry {info.name} is {kind}, which no CIFAR archive holds")
        return info


def _from_archive(layout: Layout, archive: Path, needed: tuple[str, ...]) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    wanted = {f"{layout.folder}/{name}": name for name in needed}
    try:
        # stream mode: one pass of decompression, members read in archive order
        with tarfile.open(archive, "r|gz", tarinfo=_PlainTarInfo) as tar:
            for count, member in enumerate(tar, 1):
                if count > MAX_ENTRIES:
                    raise _Refused(f"it holds more than {MAX_ENTRIES} entries")
                name = wanted.get(member.name.removeprefix("./"))
                # the size the header declares, checked before any of the member is read (or skipped)
                if member.size > layout.max_bytes(name):
                    raise _Refused(layout.too_large(f"member {member.name} declares", member.size, name))
                if name is not None and member.isfile():
                    members[name] = tar.extractfile(member).read()
    except _Refused as error:
        raise DataError(f"{archive}: {error}; it is not {layout.archive} from {URL}: download it again") from None
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DataError(f"{archive} is not a readable .tar.gz ({error}); download {layout.archive} again "
                        f"from {URL}") from None
    missing = [f"{layout.folder}/{name}" for name in needed if name not in members]
    if missing:
        raise DataError(f"{archive} lacks {', '.join(missing)}; it is not {layout.archive} from {URL}: "
                        f"download it again")
    return members


def _decode_names(names, where: str) -> tuple[str, ...]:
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"{where}: class names must be a list of strings")
    return tuple(n.decode("utf-8") if isinstance(n, bytes) else n for n in names)


def _labels(labels, key: bytes, count: int, num_classes: int, split: str, where: str) -> np.ndarray:
    # a list of Python ints in the original files (an integer array in some re-saved ones), checked in
    # Python before numpy sees it: a ragged or huge value would otherwise fail inside numpy
    if isinstance(labels, np.ndarray) and labels.dtype.kind in "iu" and labels.ndim == 1:
        outside = labels[(labels < 0) | (labels >= num_classes)].tolist()
    elif isinstance(labels, list) and all(type(label) is int for label in labels):
        outside = [label for label in labels if not 0 <= label < num_classes]
    else:
        if isinstance(labels, list):
            got = f"a list holding {next(type(label).__name__ for label in labels if type(label) is not int)}"
        else:
            got = f"{type(labels).__name__} {getattr(labels, 'dtype', '')}".strip()
        raise DataError(f"{where}: {key!r} must be a list of {count} integer labels, got {got}; download the archive "
                        f"again from {URL}")
    if len(labels) != count:
        raise DataError(f"{where}: {key!r} must be {count} integer labels (one per image), got {len(labels)}; "
                        f"download the archive again from {URL}")
    if outside:  # named with the member, before any array is made of them
        raise DataError(f"{where}: {split}_labels has labels outside [0, {num_classes}) (e.g. {outside[0]}, "
                        f"{len(outside)} in all); this is not an original CIFAR file: download it again from {URL}")
    return np.array(labels, np.int64)


def _images_and_labels(batch: dict, label_key: bytes, num_classes: int, split: str,
                       where: str) -> tuple[np.ndarray, np.ndarray]:
    if b"data" not in batch or label_key not in batch:
        raise DataError(f"{where} lacks the keys b'data' and {label_key!r} of a CIFAR batch (it has "
                        f"{', '.join(sorted(reprlib.repr(key) for key in batch))}); download the archive again "
                        f"from {URL}")
    data = batch[b"data"]
    row = int(np.prod(IMAGE_SHAPE))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != row:
        shape = getattr(data, "shape", type(data).__name__)
        raise DataError(f"{where}: b'data' must be a uint8 array of shape (N, {row}), got "
                        f"{getattr(data, 'dtype', '')} {shape}")
    labels = _labels(batch[label_key], label_key, data.shape[0], num_classes, split, where)
    return data.reshape(-1, *IMAGE_SHAPE), labels


def _load(layout: Layout, data_dir, label_key: bytes, names_key: bytes, name: str) -> Dataset:
    members = read_members(layout, data_dir)
    where = lambda member: f"{layout.name} {layout.folder}/{member}"  # noqa: E731
    # the class names first: the labels are checked against their count as each batch is decoded
    meta = unpickle(members.pop(layout.meta), where(layout.meta))
    if names_key not in meta:
        raise DataError(f"{where(layout.meta)} lacks {names_key!r}; download the archive again from {URL}")
    class_names = _decode_names(meta[names_key], where(layout.meta))
    classes = len(class_names)
    # pop each member as it is decoded: the raw bytes and the arrays are never all held at once
    train = [_images_and_labels(unpickle(members.pop(m), where(m)), label_key, classes, "train", where(m))
             for m in layout.train]
    test_images, test_labels = _images_and_labels(unpickle(members.pop(layout.test), where(layout.test)), label_key,
                                                  classes, "test", where(layout.test))
    return Dataset(name, np.concatenate([images for images, _ in train]), np.concatenate([lab for _, lab in train]),
                   test_images, test_labels, num_classes=classes, class_names=class_names)


def load_cifar10(data_dir=None) -> Dataset:
    """CIFAR-10: 50,000 train / 10,000 test, 3x32x32 uint8, 10 classes (see the module docstring)."""
    return _load(CIFAR10, data_dir, b"labels", b"label_names", "cifar10")


def load_cifar100(data_dir=None, labels: str = "fine") -> Dataset:
    """CIFAR-100: 50,000 train / 10,000 test, 3x32x32 uint8; ``labels="fine"`` (100 classes) or
    ``"coarse"`` (the 20 superclasses)."""
    if labels not in ("fine", "coarse"):
        raise DataError(f"cifar100 labels={labels!r} must be 'fine' (100 classes) or 'coarse' (20 superclasses)")
    name = "cifar100" if labels == "fine" else "cifar100-coarse"
    return _load(CIFAR100, data_dir, f"{labels}_labels".encode(), f"{labels}_label_names".encode(), name)
