"""scikit-learn's bundled handwritten digits: a small real data set that needs no download.

1,797 grey 8x8 images of the digits 0-9 (UCI "optical recognition of handwritten digits": each
pixel counts the set pixels, 0..16, of a 4x4 block of a 32x32 bitmap). portres scales the
counts to [0, 1], upsamples to 16x16 by pixel replication and splits them 1,437 train / 360
test, stratified by class, with a fixed seed: the split is the same for every training run.

Why pixel replication (nearest neighbour): each value is a block average of the original
bitmap, so the piecewise-constant image is the one consistent with how the data was made;
averaging 2x2 blocks of the 16x16 image gives back the 8x8 exactly, no value is invented and
strokes are not blurred. It is also torch's ``F.interpolate`` default, which a reference run
is likely to have used. Upsampling gives the CIFAR networks (total stride 4) 4x4 feature maps
in their last stage instead of 2x2.

    >>> ds = load_digits()
    >>> ds.describe()
    'digits: 1,437 train / 360 test, 1x16x16 float32, 10 classes'
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from .dataset import DataError, Dataset

SPLIT_SEED = 0  # fixes the train/test split; a constant, never the training seed
TEST_COUNT = 360  # test images (20%); the other 1,437 train: the sizes of the degradation runs
NATIVE_SIZE = 8  # the images' side as stored
LEVELS = 16  # pixel values are counts 0..16
INSTALL = "pip install 'portres[digits]'"  # what a missing scikit-learn asks for


def _bundled_file() -> Path | None:
    """sklearn's digits.csv.gz, located without importing sklearn (that takes ~2 s); None if absent."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise DataError(f"the digits data set comes with scikit-learn, which is not installed: {INSTALL}")
    for location in spec.submodule_search_locations or ():
        path = Path(location) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def read_raw() -> tuple[np.ndarray, np.ndarray]:
    """``(pixels (1797, 8, 8) float64 in 0..16, labels (1797,) int64)`` exactly as scikit-learn's
    ``load_digits`` returns them. Reads the bundled CSV directly (0.2 s) rather than importing
    ``sklearn.datasets`` (2 s); falls back to ``load_digits`` if a future release moves the file."""
    path = _bundled_file()
    if path is None:
        from sklearn.datasets import load_digits as sklearn_load_digits

        bunch = sklearn_load_digits()
        return np.asarray(bunch.images, np.float64), np.asarray(bunch.target, np.int64)
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",")
    if table.ndim != 2 or table.shape[1] != NATIVE_SIZE * NATIVE_SIZE + 1:
        raise DataError(f"{path} has shape {table.shape}, not the 65 columns of the digits data set; "
                        f"reinstall scikit-learn ({INSTALL})")
    return table[:, :-1].reshape(-1, NATIVE_SIZE, NATIVE_SIZE), table[:, -1].astype(np.int64)


def stratified_split(labels: np.ndarray, test_count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(train_indices, test_indices)`` with ``test_count`` test examples spread over the
    classes in proportion to their sizes (largest remainders get the leftovers; ties go to the
    lower class), chosen within each class by ``default_rng(seed)``.

        >>> train, test = stratified_split(np.array([0, 0, 0, 0, 1, 1]), 3, seed=0)
        >>> len(train), len(test), np.bincount(np.array([0, 0, 0, 0, 1, 1])[test]).tolist()
        (3, 3, [2, 1])
    """
    classes, counts = np.unique(labels, return_counts=True)
    if not 0 < test_count < len(labels):
        raise DataError(f"test_count={test_count} must lie between 1 and {len(labels) - 1}")
    exact = counts * test_count / len(labels)
    quota = np.floor(exact).astype(np.int64)
    leftover = test_count - int(quota.sum())
    quota[np.argsort(-(exact - quota), kind="stable")[:leftover]] += 1
    rng = np.random.default_rng(seed)
    test = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)])
    test = np.sort(test)
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def load_digits(image_size: int = 16) -> Dataset:
    """The digits as float32 (N, 1, S, S) in [0, 1]; ``image_size`` S is a multiple of 8 (8, 16, 24, 32, ...),
    reached by pixel replication (see the module docstring)."""
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) \
            or image_size < NATIVE_SIZE or image_size % NATIVE_SIZE:
        raise DataError(f"digits image_size={image_size!r} must be a multiple of {NATIVE_SIZE} (8, 16, 24, 32, ...): "
                        f"the 8x8 images are upsampled by repeating pixels")
    pixels, labels = read_raw()
    factor = int(image_size) // NATIVE_SIZE
    images = (pixels / LEVELS).astype(np.float32)
    images = images.repeat(factor, axis=1).repeat(factor, axis=2)[:, None]
    train, test = stratified_split(labels, TEST_COUNT, SPLIT_SEED)
    return Dataset("digits", images[train], labels[train], images[test], labels[test], num_classes=10,
                   class_names=tuple(str(d) for d in range(10)))
