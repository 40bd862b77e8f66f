"""The :class:`Dataset` every loader returns, per-channel statistics, normalisation, and the
check that a data set fits a network spec.

    >>> import numpy as np
    >>> from portres.data import Dataset
    >>> images = np.zeros((4, 1, 8, 8), np.uint8); images[:, :, 2:6, 2:6] = 255
    >>> ds = Dataset("toy", images, np.array([0, 1, 0, 1]), images[:2], np.array([1, 0]),
    ...              num_classes=2, class_names=("off", "on"))
    >>> ds.in_channels, ds.image_size, ds.mean.round(3).tolist()
    (1, (8, 8), [0.25])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

IMAGE_DTYPES = (np.uint8, np.float32)  # uint8: 0..255 pixels; float32: already in [0, 1]
_STATS_CHUNK = 2048  # images per float64 chunk when summing uint8 statistics (~50 MB for CIFAR)


class DataError(ValueError):
    """A data set that cannot be used: the message names the problem and the fix."""


def _readonly(array: np.ndarray) -> np.ndarray:
    # a read-only view: the caller's array keeps its flags, the Dataset cannot be changed through it
    view = array.view()
    view.flags.writeable = False
    return view


def _check_images(name: str, where: str, images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4:
        raise DataError(f"data set {name}: {where} has shape {images.shape}; expected 4 axes (N, C, H, W)")
    if images.dtype not in IMAGE_DTYPES:
        raise DataError(f"data set {name}: {where} has dtype {images.dtype}; expected uint8 (0..255) or float32 "
                        f"in [0, 1] (convert with .astype(np.float32) / scale)")
    if images.shape[0] == 0:
        raise DataError(f"data set {name}: {where} is empty; each split needs at least one image")
    if images.dtype == np.float32:
        low, high = float(images.min()), float(images.max())
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 1:
            raise DataError(f"data set {name}: float32 {where} must lie in [0, 1] (found {low:g}..{high:g}); "
                            f"divide by the maximum pixel value or store uint8")
    return images


def _check_labels(name: str, where: str, labels, count: int, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != count:
        raise DataError(f"data set {name}: {where} has shape {labels.shape}; expected ({count},), one label per image")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"data set {name}: {where} has dtype {labels.dtype}; labels must be integer class indices")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise DataError(f"data set {name}: {where} has labels outside [0, {num_classes}) "
                        f"(e.g. {int(bad[0])}, {bad.size} in all); labels must be class indices 0..{num_classes - 1}: "
                        f"renumber them or raise num_classes")
    return labels.astype(np.int64, copy=False)


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) standard deviation of ``images`` in [0, 1] scale, float32.

    uint8 images are summed in chunks with float64 accumulators, whose integer sums stay exact
    (CIFAR's are below 2**53): the statistics are exact and no float64 copy of the whole set is
    made (CIFAR's 50,000 training images would take 1.2 GB).

        >>> channel_stats(np.full((2, 3, 4, 4), 255, np.uint8))[0].tolist()
        [1.0, 1.0, 1.0]
    """
    channels = images.shape[1]
    if images.dtype != np.uint8:
        mean = images.mean(axis=(0, 2, 3), dtype=np.float64)
        std = images.std(axis=(0, 2, 3), dtype=np.float64)
        return mean.astype(np.float32), std.astype(np.float32)
    sums = np.zeros(channels, np.float64)
    squares = np.zeros(channels, np.float64)
    for start in range(0, images.shape[0], _STATS_CHUNK):
        chunk = images[start:start + _STATS_CHUNK].reshape(-1, channels, images.shape[2] * images.shape[3])
        pixels = chunk.astype(np.float32)  # 0..255 exactly
        sums += np.einsum("npq->p", pixels, dtype=np.float64)
        squares += np.einsum("npq,npq->p", pixels, pixels, dtype=np.float64)
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = sums / count
    variance = np.maximum(squares / count - mean**2, 0)
    return (mean / 255).astype(np.float32), (np.sqrt(variance) / 255).astype(np.float32)


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
    """``(images / scale - mean) / std`` per channel as float32 NCHW; uint8 is scaled by 1/255, float32
    is taken as already in [0, 1].

        >>> normalize(np.array([[[[0, 255]]]], np.uint8), [0.5], [0.5]).tolist()
        [[[[-1.0, 1.0]]]]
    """
    images = np.asarray(images)
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    if images.ndim != 4 or mean.shape != (images.shape[1],) or std.shape != (images.shape[1],):
        raise DataError(f"normalize: images of shape {images.shape} need one mean and one std per channel "
                        f"(got mean {mean.shape}, std {std.shape})")
    scale = np.float32(1 / 255) if images.dtype == np.uint8 else np.float32(1)
    # one multiply-add per pixel: x * (scale / std) - mean / std
    gain = (scale / std)[:, None, None]
    shift = (mean / std)[:, None, None]
    out = images.astype(np.float32)
    out *= gain
    out -= shift
    return out


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """Train and test images with labels, validated when built; see the module docstring.

    ``mean`` and ``std`` default to the training images' per-channel statistics. Arrays are
    stored as read-only views.
    """

    name: str  # the name errors and logs use ("cifar10", "digits", "folder:pets", ...)
    train_images: np.ndarray  # (N, C, H, W) uint8 0..255, or float32 in [0, 1]
    train_labels: np.ndarray  # (N,) int64 class indices
    test_images: np.ndarray  # (M, C, H, W), same C, H, W and dtype as the training images
    test_labels: np.ndarray  # (M,) int64 class indices
    num_classes: int  # labels lie in [0, num_classes)
    class_names: tuple[str, ...]  # one name per class, index = label
    mean: np.ndarray | None = None  # (C,) float32 per-channel mean of train_images in [0, 1] scale
    std: np.ndarray | None = None  # (C,) float32 per-channel standard deviation, same scale

    def __post_init__(self) -> None:
        name = self.name
        if not isinstance(name, str) or not name:
            raise DataError(f"Dataset name={name!r} must be a non-empty string")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, (int, np.integer)) \
                or self.num_classes < 1:
            raise DataError(f"data set {name}: num_classes={self.num_classes!r} must be an integer >= 1")
        set_ = lambda field, value: object.__setattr__(self, field, value)  # noqa: E731 (frozen dataclass)
        set_("num_classes", int(self.num_classes))
        train = _check_images(name, "train_images", self.train_images)
        test = _check_images(name, "test_images", self.test_images)
        if train.shape[1:] != test.shape[1:] or train.dtype != test.dtype:
            raise DataError(f"data set {name}: train images are {train.dtype} {train.shape[1:]} but test images are "
                            f"{test.dtype} {test.shape[1:]}; both splits need the same channels, size and dtype")
        train_labels = _check_labels(name, "train_labels", self.train_labels, train.shape[0], self.num_classes)
        test_labels = _check_labels(name, "test_labels", self.test_labels, test.shape[0], self.num_classes)
        class_names = tuple(self.class_names)
        if len(class_names) != self.num_classes or not all(isinstance(c, str) for c in class_names):
            raise DataError(f"data set {name}: class_names must be {self.num_classes} strings, one per class "
                            f"(got {len(class_names)})")
        if self.mean is None or self.std is None:
            mean, std = channel_stats(train)
        else:
            mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        channels = train.shape[1]
        if mean.shape != (channels,) or std.shape != (channels,):
            raise DataError(f"data set {name}: mean and std need one value per channel ({channels}); "
                            f"got shapes {mean.shape} and {std.shape}")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
            raise DataError(f"data set {name}: std must be finite and > 0 in every channel (got {std.tolist()}); "
                            f"a constant channel cannot be normalised: drop it or pass std explicitly")
        for field, value in (("train_images", train), ("train_labels", train_labels), ("test_images", test),
                             ("test_labels", test_labels), ("mean", mean), ("std", std)):
            set_(field, _readonly(value))
        set_("class_names", class_names)

    @property
    def in_channels(self) -> int:
        """Channels per image (C)."""
        return self.train_images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of every image."""
        return tuple(self.train_images.shape[2:])

    def split(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """``(images, labels)`` of ``"train"`` or ``"test"``."""
        if which not in ("train", "test"):
            raise DataError(f"split {which!r} must be 'train' or 'test'")
        return (self.train_images, self.train_labels) if which == "train" else (self.test_images, self.test_labels)

    def describe(self) -> str:
        """One line: sizes, image shape, classes."""
        height, width = self.image_size
        return (f"{self.name}: {len(self.train_labels):,} train / {len(self.test_labels):,} test, "
                f"{self.in_channels}x{height}x{width} {self.train_images.dtype}, {self.num_classes} classes")

    def __repr__(self) -> str:
        return f"Dataset({self.describe()})"


def _shape_words(dataset: Dataset) -> str:
    height, width = dataset.image_size
    return f"{dataset.in_channels}-channel {height}x{width} images in {dataset.num_classes} classes"


def check_fits(dataset: Dataset, spec) -> None:
    """Raise :class:`DataError` (one line: the problem and the fix) unless ``spec`` (a ResNetSpec or
    Plan) takes ``dataset``'s channels, number of classes and image size.

        >>> import portres
        >>> from portres.data import load
        >>> check_fits(load("digits"), portres.get("resnet20"))
        Traceback (most recent call last):
        portres.data.dataset.DataError: data set digits has 1-channel 16x16 images in 10 classes but the spec \
resnet20 expects in_channels=3: ...
    """
    from portres.analysis import check_input_size
    from portres.plan import as_plan

    plan = as_plan(spec)
    spec = plan.spec
    fields = [key for key in ("in_channels", "num_classes") if getattr(spec, key) != getattr(dataset, key)]
    if fields:
        expects = " / ".join(f"{key}={getattr(spec, key)}" for key in fields)
        fix = " and ".join(f'"{key}": {getattr(dataset, key)}' for key in fields)
        raise DataError(f"data set {dataset.name} has {_shape_words(dataset)} but the spec {spec.name} expects "
                        f"{expects}: write the spec with `portres spec {spec.name} > net.json`, set {fix} "
                        f"and pass --spec net.json")
    # labels were checked against dataset.num_classes when the Dataset was built, so they fit the spec too
    try:
        check_input_size(plan, dataset.image_size)
    except ValueError as error:
        raise DataError(f"data set {dataset.name} has {_shape_words(dataset)}: {error}; use larger images "
                        f"(the data set's image_size option) or a network with fewer strided stages") from None


def fit_spec(spec, dataset: Dataset):
    """``spec`` with ``in_channels`` and ``num_classes`` taken from ``dataset`` (the rest unchanged).

        >>> import portres
        >>> from portres.data import load
        >>> fit_spec(portres.get("resnet20"), load("digits")).in_channels
        1
    """
    from portres.plan import as_plan

    spec = as_plan(spec).spec
    return dataclasses.replace(spec, in_channels=dataset.in_channels, num_classes=dataset.num_classes)
