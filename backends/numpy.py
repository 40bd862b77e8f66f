"""The float64 NumPy reference: NCHW, vectorised (im2col + batched matmul), obviously correct.

Every other backend is held against this one. It never folds batch norm and never
reorders arithmetic for speed beyond what NumPy's matmul does.
"""

from __future__ import annotations

import platform

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..losses import softmax_cross_entropy
from .base import AbstractBackend
from .numpy_backward import Backward

NAME = "numpy"
FOLD_BATCH_NORM = False  # the reference computes every op as the plan spells it
DTYPES = ("float64", "float32")


def devices() -> list[str]:
    return ["cpu"]


def info() -> dict:
    config = {}
    try:
        config = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except Exception:  # noqa: BLE001 - older NumPy: no dict mode; BLAS is then just unknown
        pass
    blas = f"{config.get('name', 'unknown')} {config.get('version', '')}".strip()
    return {"framework": f"numpy {np.__version__}", "devices": devices(), "default_device": "cpu", "blas": blas,
            "machine": platform.machine()}


class Backend(AbstractBackend, Backward):
    """The float64 reference; differentiated by portres's hand-written backward (``Backward``), not autodiff."""

    name = NAME
    autodiff = False

    def __init__(self, device: str | None = None, dtype: str | None = None):
        if device not in (None, "cpu"):
            raise ValueError(f"the numpy backend runs on 'cpu' only, not {device!r}")
        self.device = "cpu"
        self.dtype = dtype or "float64"
        if self.dtype not in DTYPES:
            raise ValueError(f"the numpy backend computes in {' or '.join(DTYPES)}, not {self.dtype!r}")
        self._np_dtype = np.dtype(self.dtype)
        self.threads = "NumPy's BLAS default"  # for reports

    # -- arrays and parameters --

    def from_numpy(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=self._np_dtype)

    def to_numpy(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)

    def load_params(self, plan, params: dict) -> dict:
        return {name: np.asarray(value, dtype=self._np_dtype) for name, value in params.items()}

    def compile(self, forward):
        return forward

    # -- primitives (NCHW) --

    def conv2d(self, x, weight, bias, stride, padding, groups):
        n, c, _, _ = x.shape
        out_channels, group_channels, k, _ = weight.shape
        if padding:
            x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
        windows = sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]  # N C Ho Wo k k
        ho, wo = windows.shape[2:4]
        # im2col per group: (G, N*Ho*Wo, Cg*k*k) @ (G, Cg*k*k, O/G)
        cols = windows.reshape(n, groups, group_channels, ho, wo, k, k).transpose(1, 0, 3, 4, 2, 5, 6)
        cols = cols.reshape(groups, n * ho * wo, group_channels * k * k)
        kernels = weight.reshape(groups, out_channels // groups, group_channels * k * k).transpose(0, 2, 1)
        out = np.matmul(cols, kernels)  # G, N*Ho*Wo, O/G
        out = out.reshape(groups, n, ho, wo, out_channels // groups).transpose(1, 0, 4, 2, 3)
        out = out.reshape(n, out_channels, ho, wo)
        if bias is not None:
            out = out + bias[:, None, None]
        return np.ascontiguousarray(out)

    def batch_norm_train(self, x, weight, bias, eps):
        """Normalise with the batch's statistics; returns (y, batch mean, unbiased batch variance)."""
        axes = (0, 2, 3)
        count = x.shape[0] * x.shape[2] * x.shape[3]
        mean, var = x.mean(axes), x.var(axes)
        scale = weight / np.sqrt(var + eps)
        y = (x - mean[:, None, None]) * scale[:, None, None] + bias[:, None, None]
        return y, mean, var * (count / (count - 1))

    def cross_entropy(self, logits, targets):
        """Mean cross-entropy of ``logits`` against soft ``targets`` (rows summing to 1)."""
        return softmax_cross_entropy(logits, targets)

    def batch_norm(self, x, weight, bias, mean, var, eps):
        per_channel = lambda v: v[:, None, None]  # noqa: E731
        return (x - per_channel(mean)) / np.sqrt(per_channel(var) + eps) * per_channel(weight) + per_channel(bias)

    def channel_affine(self, x, scale, shift):
        return x * scale[:, None, None] + shift[:, None, None]

    def relu(self, x):
        return np.maximum(x, 0)

    def max_pool(self, x, kernel_size, stride, padding):
        pad = ((0, 0), (0, 0), (padding, padding), (padding, padding))
        x = np.pad(x, pad, constant_values=-np.inf)
        return sliding_window_view(x, (kernel_size, kernel_size), axis=(2, 3))[:, :, ::stride, ::stride].max((4, 5))

    def zero_pad(self, x, padding):
        return np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))

    def avg_pool(self, x, kernel_size, stride):
        # ceil-mode: zero-pad bottom/right so the last partial window exists, divide by real pixels
        h, w = x.shape[2:]
        out_h = max(-(-(h - kernel_size) // stride), 0) + 1
        out_w = max(-(-(w - kernel_size) // stride), 0) + 1
        pad_h, pad_w = (out_h - 1) * stride + kernel_size - h, (out_w - 1) * stride + kernel_size - w

        def window_sums(a):
            a = np.pad(a, ((0, 0), (0, 0), (0, max(pad_h, 0)), (0, max(pad_w, 0))))
            return sliding_window_view(a, (kernel_size, kernel_size), axis=(2, 3))[:, :, ::stride, ::stride].sum((4, 5))

        return window_sums(x) / window_sums(np.ones((1, 1, h, w), x.dtype))

    def subsample(self, x, stride):
        return x[:, :, ::stride, ::stride]

    def pad_channels(self, x, before, after):
        return np.pad(x, ((0, 0), (before, after), (0, 0), (0, 0)))

    def add(self, x, y):
        return x + y

    def global_avg_pool(self, x):
        return x.mean(axis=(2, 3))

    def linear(self, x, weight, bias):
        return x @ weight.T + bias
