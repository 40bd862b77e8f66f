"""What tests/golden/make_golden.py (with torch, timm, Keras) and tests/test_golden.py (without them) share:
the seeded weights, the seeded images and the summary of a stage output stored in the golden files.

Nothing here reads portres's plan or runs a network: weights come from each tensor's name and shape
alone, so a framework's ``state_dict`` and portres's ``plan.param_shapes()`` give the same numbers
wherever they name a tensor alike. Only NumPy and the standard library are imported.

* Weights (:func:`tensor`): each tensor draws from its own stream, seeded by ``(SEED, crc32(name))``,
  with scales that keep activations O(1) and batch norm non-trivial: 4-D conv kernels He-normal
  (std ``sqrt(2 / fan_in)``), 2-D classifier weights ``N(0, 1/in)``, and by suffix BN ``weight``
  ``1 + 0.1 N``, any ``bias`` (BN shift, conv and classifier biases) ``0.1 N``, ``running_mean``
  ``0.1 N``, ``running_var`` ``U(0.5, 2)``. Every value is rounded to float32 once, so loading the
  weights as float32 (portres's default) changes nothing and both sides then compute in float64
  with the very same numbers.
* Images (:func:`images`): standard normal, seeded by ``(IMAGE_SEED, size)``, rounded to float32.
* Stage outputs (:func:`summarize`): a ``(N, C, H, W)`` output is stored as a count sketch of each
  image's flattened output (``SKETCH_SIZE`` buckets; each element goes to one bucket, chosen with a
  random sign, both seeded by the stage name and the length) plus the per-channel means over the
  batch and the spatial dims. A count sketch ``S`` is linear and, for any fixed vector ``v``,
  ``E‖Sv‖² = ‖v‖²`` (the signs are independent with mean 0, so cross terms vanish in expectation):
  ``‖S(a − b)‖ / ‖Sb‖`` estimates the relative L2 error ``‖a − b‖ / ‖b‖`` without storing ``b``.
  With 256 buckets per image it is within a small factor of the true value, which is all a check
  that separates rounding (1e-15) from a wrong layer (1e-1) needs; the stored files stay small.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Mapping

import numpy as np

SEED = 17  # of the weights
IMAGE_SEED = 0  # of the input images
BATCH = 2  # images per golden batch
SKETCH_SIZE = 256  # buckets of each image's stage-output sketch
IMAGENET_SIZE = 64  # input side of the ImageNet-family networks
CIFAR_SIZE = 32  # input side of the CIFAR networks


def tensor(name: str, shape: tuple[int, ...], seed: int = SEED) -> np.ndarray:
    """The seeded float64 value (float32-representable) of the tensor ``name`` of ``shape``."""
    shape = tuple(int(n) for n in shape)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    suffix = name.rsplit(".", 1)[-1]
    if len(shape) == 4:  # conv kernel (out, in / groups, kh, kw): He-normal on the fan-in
        value = rng.standard_normal(shape) * math.sqrt(2.0 / (shape[1] * shape[2] * shape[3]))
    elif len(shape) == 2:  # classifier (out, in)
        value = rng.standard_normal(shape) / math.sqrt(shape[1])
    elif len(shape) == 1 and suffix == "weight":  # BN scale
        value = 1.0 + 0.1 * rng.standard_normal(shape)
    elif len(shape) == 1 and suffix in ("bias", "running_mean"):
        value = 0.1 * rng.standard_normal(shape)
    elif len(shape) == 1 and suffix == "running_var":
        value = rng.uniform(0.5, 2.0, shape)
    else:
        raise ValueError(f"no seeded rule for {name} of shape {shape}")
    return value.astype(np.float32).astype(np.float64)


def weights(shapes: Mapping[str, tuple[int, ...]], seed: int = SEED) -> dict[str, np.ndarray]:
    """``{name: tensor(name, shape)}`` for torchvision-style names (portres's names)."""
    return {name: tensor(name, shape, seed) for name, shape in shapes.items()}


def fingerprint(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """A digest of the parameter names and shapes: the golden file records the framework model's."""
    text = "\n".join(f"{name}:{tuple(int(n) for n in shape)}" for name, shape in sorted(shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def images(size: int, batch: int = BATCH, channels: int = 3) -> np.ndarray:
    """The seeded NCHW float64 input batch (float32-representable)."""
    rng = np.random.default_rng([IMAGE_SEED, size])
    return rng.standard_normal((batch, channels, size, size)).astype(np.float32).astype(np.float64)


def input_size(stem_kind: str) -> int:
    """The golden input side for a network with this stem kind ("cifar", "imagenet", "deep")."""
    return CIFAR_SIZE if stem_kind == "cifar" else IMAGENET_SIZE


def sketch(stage: str, x: np.ndarray) -> np.ndarray:
    """``(N, SKETCH_SIZE)``: the count sketch of each image's flattened output, seeded by ``stage``."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    length = x.shape[1]
    rng = np.random.default_rng([SEED, zlib.crc32(stage.encode()), length])
    bucket = rng.integers(0, SKETCH_SIZE, length)
    sign = rng.integers(0, 2, length) * 2.0 - 1.0
    return np.stack([np.bincount(bucket, weights=sign * row, minlength=SKETCH_SIZE) for row in x])


def summarize(features: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{"<stage>.sketch": (N, SKETCH_SIZE), "<stage>.means": (C,)}`` for NCHW stage outputs."""
    out = {}
    for stage, value in features.items():
        value = np.asarray(value, np.float64)
        if value.ndim != 4:
            raise ValueError(f"{stage}: expected an NCHW output, got shape {value.shape}")
        out[f"{stage}.sketch"] = sketch(stage, value)
        out[f"{stage}.means"] = value.mean(axis=(0, 2, 3))
    return out
