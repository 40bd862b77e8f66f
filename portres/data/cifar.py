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
:class:`SafeUnpickler` resolves; any other global is refused by name.

    >>> ds = load_cifar10("data")  # doctest: +SKIP
    >>> ds.describe()  # doctest: +SKIP
    'cifar10: 50,000 train / 10,000 test, 3x32x32 uint8, 10 classes'
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dataset import DataError, Dataset

URL = "https://www.cs.toronto.edu/~kriz/cifar.html"  # where users download the archives
IMAGE_SHAPE = (3, 32, 32)  # every CIFAR image, as stored: channels, rows, columns


def _numpy_reconstruct():
    # numpy 2 moved numpy.core to numpy._core; reach the function without importing the
    # deprecated alias (the files name it numpy.core.multiarray, being written by numpy 1)
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _latin1_bytes(text, encoding="latin1"):
    # Python 3 writes bytes into a protocol-2 pickle as _codecs.encode(text, "latin1"); this stand-in
    # does only that conversion, so a file re-saved by Python 3 loads while nothing else can be called
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise DataError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r}): only the latin1 form "
                        f"Python 3 uses for bytes is allowed")
    return text.encode("latin1")


# The globals a pickled numpy array needs: the reconstructor, the array type and the dtype type.
# The original files (Python 2, numpy 1) name the reconstructor numpy.core.multiarray; numpy 2
# writes numpy._core.multiarray; Python 3 adds _codecs.encode for bytes at protocol 2.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
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
    except DataError:
        raise
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


CIFAR10 = Layout("cifar10", "cifar-10-python.tar.gz", "cifar-10-batches-py",
                 tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
CIFAR100 = Layout("cifar100", "cifar-100-python.tar.gz", "cifar-100-python", ("train",), "test", "meta")


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
                return {name: (folder / name).read_bytes() for name in needed}
            if not archive.is_file():
                raise DataError(f"{folder} lacks {', '.join(missing)} of {layout.name}; extract {layout.archive} "
                                f"(from {URL}) there again")
    if archive.is_file():
        return _from_archive(layout, archive, needed)
    detail = "" if data_dir.is_dir() else f" ({data_dir} does not exist)"
    raise DataError(_missing_message(layout, data_dir, detail))


def _from_archive(layout: Layout, archive: Path, needed: tuple[str, ...]) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    wanted = {f"{layout.folder}/{name}": name for name in needed}
    try:
        # stream mode: one pass of decompression, members read in archive order
        with tarfile.open(archive, "r|gz") as tar:
            for member in tar:
                name = wanted.get(member.name.removeprefix("./"))
                if name is not None and member.isfile():
                    members[name] = tar.extractfile(member).read()
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


def _images_and_labels(batch: dict, label_key: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    if b"data" not in batch or label_key not in batch:
        raise DataError(f"{where} lacks the keys b'data' and {label_key!r} of a CIFAR batch (it has "
                        f"{sorted(batch)}); download the archive again from {URL}")
    data, labels = batch[b"data"], batch[label_key]
    row = int(np.prod(IMAGE_SHAPE))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != row:
        shape = getattr(data, "shape", type(data).__name__)
        raise DataError(f"{where}: b'data' must be a uint8 array of shape (N, {row}), got "
                        f"{getattr(data, 'dtype', '')} {shape}")
    labels = np.asarray(labels)
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: {label_key!r} must be {data.shape[0]} integer labels, got {labels.dtype} "
                        f"{labels.shape}")
    return data.reshape(-1, *IMAGE_SHAPE), labels.astype(np.int64)


def _load(layout: Layout, data_dir, label_key: bytes, names_key: bytes, name: str) -> Dataset:
    members = read_members(layout, data_dir)
    where = lambda member: f"{layout.name} {layout.folder}/{member}"  # noqa: E731
    # pop each member as it is decoded: the raw bytes and the arrays are never all held at once
    train = [_images_and_labels(unpickle(members.pop(m), where(m)), label_key, where(m)) for m in layout.train]
    test_images, test_labels = _images_and_labels(unpickle(members.pop(layout.test), where(layout.test)), label_key,
                                                  where(layout.test))
    meta = unpickle(members.pop(layout.meta), where(layout.meta))
    if names_key not in meta:
        raise DataError(f"{where(layout.meta)} lacks {names_key!r}; download the archive again from {URL}")
    class_names = _decode_names(meta[names_key], where(layout.meta))
    return Dataset(name, np.concatenate([images for images, _ in train]), np.concatenate([lab for _, lab in train]),
                   test_images, test_labels, num_classes=len(class_names), class_names=class_names)


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
