"""Augmentation, vectorised over the batch (one gather per call, no Python loop over images).

The CIFAR paper's recipe (He et al. 2016, section 4.2): pad 4 pixels of zeros on each side,
take a random 32x32 crop, flip horizontally with probability 1/2. :func:`portres.data.batches`
applies it after normalisation, so the zero padding is the per-channel mean, as in the paper
(which subtracted the mean before padding).

    >>> import numpy as np
    >>> x = np.arange(2 * 1 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4)
    >>> pad_crop_flip(x, np.random.default_rng(0), pad=1).shape
    (2, 1, 4, 4)
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def _check(images: np.ndarray, pad: int = 0) -> None:
    if images.ndim != 4:
        raise ValueError(f"augmentation takes a batch of shape (N, C, H, W); got {images.shape}")
    if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or pad < 0:
        raise ValueError(f"pad={pad!r} must be an integer >= 0")


def pad_crop_flip(images: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """Zero-pad ``pad`` pixels per side, crop back to H x W at a random offset, flip half the images
    left-right; a new array of the same shape and dtype.

    Draws from ``rng``, in this order: N row offsets, N column offsets (each in [0, 2*pad]), N flips.

        >>> x = np.ones((3, 2, 8, 8), np.uint8)
        >>> int(pad_crop_flip(x, np.random.default_rng(1)).sum()) <= int(x.sum())  # padding adds zeros
        True
    """
    images = np.asarray(images)
    _check(images, pad)
    count, _, height, width = images.shape
    rows_offset = rng.integers(0, 2 * pad + 1, size=count)
    cols_offset = rng.integers(0, 2 * pad + 1, size=count)
    flips = rng.random(count) < 0.5
    padded = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad))) if pad else images
    # every H x W window of every padded image, as a view: (N, C, rows offset, cols offset, H, W)
    windows = sliding_window_view(padded, (height, width), axis=(2, 3))
    out = windows[np.arange(count), :, rows_offset, cols_offset]  # one gather: (N, C, H, W), a new array
    out[flips] = out[flips, :, :, ::-1]
    return out


def flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flip each image left-right with probability 1/2 (draws N uniforms from ``rng``); a new array.

        >>> x = np.arange(4, dtype=np.float32).reshape(1, 1, 1, 4)
        >>> flip(x, np.random.default_rng(3)).ravel().tolist() in ([0, 1, 2, 3], [3, 2, 1, 0])
        True
    """
    images = np.asarray(images)
    _check(images)
    flips = rng.random(images.shape[0]) < 0.5
    out = images.copy()
    out[flips] = images[flips, :, :, ::-1]
    return out


AUGMENTATIONS = {"pad_crop_flip": pad_crop_flip, "flip": flip}  # names the CLI and batches() accept
