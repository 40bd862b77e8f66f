"""Augmentation, vectorised over the batch (one gather per call, no Python loop over images).

The CIFAR paper's recipe (He et al. 2016, section 4.2): pad 4 pixels of zeros on each side,
take a random 32x32 crop, flip horizontally with probability 1/2. :func:`portres.data.batches`
applies it after normalisation, so the zero padding is the per-channel mean, as in the paper
(which subtracted the mean before padding).

    >>> import numpy as np
    >>> x = np.arange(2 * 1 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4)
    >>> pad_crop_flip(x, np.random.default_rng(0), pad=1).shape
    (2, 1, 4, 4)

ImageNet training crops images of any size before they become a batch: :func:`random_resized_crop_boxes`
samples torchvision's ``RandomResizedCrop`` boxes for a batch of image sizes (the streaming loader of
:mod:`portres.data.streaming` crops, resizes and flips the decoded images with them).
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


RESIZED_CROP_SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop's defaults: share of the image's area...
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)  # ...and width/height of the box
RESIZED_CROP_TRIES = 10  # boxes tried before the centre-crop fallback


def resized_crop_draws(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The uniforms :func:`resized_crop_boxes` turns into ``count`` boxes, drawn from ``rng`` in this order
    whatever the image sizes: ``tries`` (count, 10, 2) (area share and log-ratio of each try), then
    ``offsets`` (count, 2) (row and column offset). Drawn before the images are read, so that a batch's
    boxes depend on ``rng`` alone, not on which thread decodes which image first."""
    return rng.random((count, RESIZED_CROP_TRIES, 2)), rng.random((count, 2))


def resized_crop_boxes(widths, heights, tries: np.ndarray, offsets: np.ndarray, scale=RESIZED_CROP_SCALE,
                       ratio=RESIZED_CROP_RATIO) -> np.ndarray:
    """``(N, 4)`` int64 boxes ``(left, top, width, height)`` for images of ``widths[i]`` x ``heights[i]``
    pixels from the uniforms of :func:`resized_crop_draws`, as torchvision's ``RandomResizedCrop.get_params``
    samples them: up to 10 tries of an area share uniform in ``scale`` and an aspect ratio log-uniform in
    ``ratio``; the first box that fits the image wins, at a uniform offset; when none fits, the centred box
    of the whole image with its aspect ratio clamped to ``ratio``. Vectorised: no loop over images."""
    widths = np.asarray(widths, np.int64)
    heights = np.asarray(heights, np.int64)
    count = len(widths)
    if widths.ndim != 1 or widths.shape != heights.shape or (widths < 1).any() or (heights < 1).any():
        raise ValueError(f"widths and heights must be two (N,) arrays of sizes >= 1; got {widths.shape}, "
                         f"{heights.shape}")
    if tries.shape != (count, RESIZED_CROP_TRIES, 2) or offsets.shape != (count, 2):
        raise ValueError(f"tries {tries.shape} and offsets {offsets.shape} must be ({count}, "
                         f"{RESIZED_CROP_TRIES}, 2) and ({count}, 2): use resized_crop_draws(rng, {count})")
    low, high = float(scale[0]), float(scale[1])
    if not 0 < low <= high or not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"scale={scale!r} and ratio={ratio!r} must be (low, high) with 0 < low <= high")
    area = (widths * heights).astype(np.float64)[:, None]
    log_low, log_high = np.log(ratio[0]), np.log(ratio[1])
    target_area = area * (low + (high - low) * tries[..., 0])
    aspect = np.exp(log_low + (log_high - log_low) * tries[..., 1])
    # torchvision's int(round(...)) and np.rint both round halves to even
    box_w = np.rint(np.sqrt(target_area * aspect)).astype(np.int64)
    box_h = np.rint(np.sqrt(target_area / aspect)).astype(np.int64)
    fits = (box_w > 0) & (box_w <= widths[:, None]) & (box_h > 0) & (box_h <= heights[:, None])
    first = fits.argmax(axis=1)  # the first try that fits (0 where none does: replaced below)
    rows = np.arange(count)
    w, h = box_w[rows, first], box_h[rows, first]
    # torch.randint(0, n) for n = size - box + 1 positions: the floor of a uniform times n
    top = np.minimum((offsets[:, 0] * (heights - h + 1)).astype(np.int64), heights - h)
    left = np.minimum((offsets[:, 1] * (widths - w + 1)).astype(np.int64), widths - w)
    # the fallback: the largest centred box whose aspect ratio lies in `ratio`
    in_ratio = widths / heights
    fallback_w = np.where(in_ratio > ratio[1], np.rint(heights * ratio[1]).astype(np.int64), widths)
    fallback_h = np.where(in_ratio < ratio[0], np.rint(widths / ratio[0]).astype(np.int64), heights)
    none_fits = ~fits.any(axis=1)
    w, h = np.where(none_fits, fallback_w, w), np.where(none_fits, fallback_h, h)
    top = np.where(none_fits, (heights - h) // 2, top)
    left = np.where(none_fits, (widths - w) // 2, left)
    return np.stack([left, top, w, h], axis=1)


def random_resized_crop_boxes(widths, heights, rng: np.random.Generator, scale=RESIZED_CROP_SCALE,
                              ratio=RESIZED_CROP_RATIO) -> np.ndarray:
    """torchvision's ``RandomResizedCrop`` boxes ``(left, top, width, height)`` for a batch of image sizes:
    :func:`resized_crop_boxes` of :func:`resized_crop_draws` (which says what is drawn from ``rng``).

        >>> boxes = random_resized_crop_boxes([40, 500], [50, 375], np.random.default_rng(0))
        >>> boxes.shape, bool((boxes[:, 0] + boxes[:, 2] <= [40, 500]).all())
        ((2, 4), True)
    """
    tries, offsets = resized_crop_draws(rng, len(np.atleast_1d(widths)))
    return resized_crop_boxes(widths, heights, tries, offsets, scale, ratio)


AUGMENTATIONS = {"pad_crop_flip": pad_crop_flip, "flip": flip}  # names the CLI and batches() accept
