"""Data sets and batches for training: CIFAR-10/100, scikit-learn's digits, image folders;
augmentation vectorised in NumPy; ImageNet-style folders streamed from disk (:mod:`.streaming`).
Nothing here imports a framework; scikit-learn and Pillow are imported only by the loaders that
need them.

    >>> from portres import data
    >>> data.names()
    ('cifar10', 'cifar100', 'digits', 'folder')
    >>> ds = data.load("digits")                      # 1,437 / 360, 1x16x16, 10 classes
    >>> for x, y in data.batches(ds.train_images, ds.train_labels, 64, mean=ds.mean, std=ds.std,
    ...                          shuffle=True, seed=0, epoch=0, augment="flip"):
    ...     pass                                       # x: float32 (64, 1, 16, 16), y: int64 (64,)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from . import augment
from .batches import BatchIterator, batches, epoch_order, make_batch, num_batches
from .cifar import default_data_dir, load_cifar10, load_cifar100
from .dataset import DataError, Dataset, channel_stats, check_fits, fit_spec, normalize
from .digits import load_digits
from .folder import load_folder
from .streaming import (
    ImageFolder,
    StreamedFolder,
    evaluate_stream,
    open_streamed_folder,
    scan_image_folder,
    stream_batches,
)

_LOADERS: dict[str, Callable[..., Dataset]] = {}  # name -> loader(data_dir, **options)


def register(name: str, loader: Callable[..., Dataset]) -> None:
    """Make ``load(name, data_dir, **options)`` call ``loader(data_dir, **options)``; names are unique."""
    if name in _LOADERS:
        raise ValueError(f"a data set named {name!r} is already registered")
    _LOADERS[name] = loader


def names() -> tuple[str, ...]:
    """The data set names :func:`load` accepts, in registration order."""
    return tuple(_LOADERS)


def options(name: str) -> dict[str, object]:
    """``{option: default}`` the data set ``name`` accepts besides ``data_dir``."""
    loader = _loader(name)
    return {p.name: p.default for p in inspect.signature(loader).parameters.values() if p.name != "data_dir"}


def _loader(name: str) -> Callable[..., Dataset]:
    if name not in _LOADERS:
        raise DataError(f"unknown data set {name!r}; known: {', '.join(_LOADERS)}")
    return _LOADERS[name]


def load(name: str, data_dir=None, **options_: object) -> Dataset:
    """The data set ``name`` (see :func:`names`); ``data_dir`` is where its files are (unused by digits).

    Options: cifar100 ``labels="fine"|"coarse"``; digits ``image_size=16``; folder ``image_size=32``,
    ``color="rgb"|"grayscale"``.

        >>> load("digits", image_size=32).image_size
        (32, 32)
    """
    loader = _loader(name)
    accepted = options(name)
    unknown = sorted(set(options_) - set(accepted))
    if unknown:
        takes = ", ".join(accepted) if accepted else "no options"
        raise DataError(f"data set {name} does not take {', '.join(unknown)}; it takes {takes}")
    return loader(data_dir, **options_)


def _ignores_data_dir(loader: Callable[..., Dataset]) -> Callable[..., Dataset]:
    def load_without_dir(data_dir=None, **options_):
        return loader(**options_)

    load_without_dir.__signature__ = inspect.Signature(  # options() reads the loader's own
        [inspect.Parameter("data_dir", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
         *inspect.signature(loader).parameters.values()])
    return load_without_dir


register("cifar10", load_cifar10)
register("cifar100", load_cifar100)
register("digits", _ignores_data_dir(load_digits))
register("folder", load_folder)

__all__ = [
    "BatchIterator", "DataError", "Dataset", "ImageFolder", "StreamedFolder", "augment", "batches", "channel_stats",
    "check_fits", "default_data_dir", "epoch_order", "evaluate_stream", "fit_spec", "load", "load_cifar10",
    "load_cifar100", "load_digits", "load_folder", "make_batch", "names", "normalize", "num_batches",
    "open_streamed_folder", "options", "register", "scan_image_folder", "stream_batches",
]
