"""Hand-written backward of every primitive of the NumPy reference, for training.

Each ``<primitive>_backward`` takes the gradient of the primitive's output and the forward
inputs it needs, and returns the gradients of those inputs (and parameters). They are the
reference's autodiff: :mod:`portres.training.backprop` chains them over the plan in reverse,
and tests/test_backward.py checks each against central finite differences in float64.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..losses import softmax_cross_entropy_grad


def _window_slice(start: int, stride: int, count: int) -> slice:
    """The input positions tap ``start`` of a strided window reads, for ``count`` outputs."""
    return slice(start, start + stride * (count - 1) + 1, stride)


class Backward:
    """Mixed into the NumPy backend: the backward half of each primitive (NCHW)."""

    def conv2d_backward(self, grad, x, weight, stride, padding, groups):
        """Gradients of ``conv2d(x, weight)`` w.r.t. ``x`` and ``weight``: the im2col GEMMs transposed."""
        n, c, h, w = x.shape
        out_channels, group_channels, k, _ = weight.shape
        _, _, ho, wo = grad.shape
        per_group = out_channels // groups
        padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
        windows = sliding_window_view(padded, (k, k), axis=(2, 3))[:, :, ::stride, ::stride][:, :, :ho, :wo]
        cols = windows.reshape(n, groups, group_channels, ho, wo, k, k).transpose(1, 0, 3, 4, 2, 5, 6)
        cols = cols.reshape(groups, n * ho * wo, group_channels * k * k)
        grad_rows = grad.reshape(n, groups, per_group, ho, wo).transpose(1, 0, 3, 4, 2).reshape(groups, -1, per_group)
        kernels = weight.reshape(groups, per_group, group_channels * k * k)  # (G, O/G, Cg*k*k)
        grad_weight = np.matmul(grad_rows.transpose(0, 2, 1), cols).reshape(weight.shape)
        grad_cols = np.matmul(grad_rows, kernels)  # (G, N*Ho*Wo, Cg*k*k)
        grad_cols = grad_cols.reshape(groups, n, ho, wo, group_channels, k, k).transpose(1, 0, 4, 2, 3, 5, 6)
        grad_cols = grad_cols.reshape(n, c, ho, wo, k, k)
        grad_padded = np.zeros_like(padded)
        for i in range(k):  # col2im: every tap adds its share back where it read
            for j in range(k):
                grad_padded[:, :, _window_slice(i, stride, ho), _window_slice(j, stride, wo)] += grad_cols[..., i, j]
        return grad_padded[:, :, padding:padding + h, padding:padding + w], grad_weight

    def batch_norm_train_backward(self, grad, x, weight, eps):
        """Gradients of train-mode BN w.r.t. ``x``, its scale and its shift; the batch mean and
        variance depend on ``x`` too, which gives the two correction terms."""
        axes = (0, 2, 3)
        count = x.shape[0] * x.shape[2] * x.shape[3]
        mean = x.mean(axes, keepdims=True)
        inverse_std = 1.0 / np.sqrt(x.var(axes, keepdims=True) + eps)
        normalised = (x - mean) * inverse_std
        grad_bias = grad.sum(axes)
        grad_weight = (grad * normalised).sum(axes)
        scale = weight[None, :, None, None] * inverse_std
        grad_x = scale * (grad - grad_bias[None, :, None, None] / count
                          - normalised * grad_weight[None, :, None, None] / count)
        return grad_x, grad_weight, grad_bias

    def relu_backward(self, grad, x):
        return grad * (x > 0)  # 0 at x == 0, as PyTorch

    def max_pool_backward(self, grad, x, kernel_size, stride, padding):
        """Each window's gradient goes to its first maximum (PyTorch's choice among ties)."""
        n, c, h, w = x.shape
        _, _, ho, wo = grad.shape
        padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), constant_values=-np.inf)
        windows = sliding_window_view(padded, (kernel_size, kernel_size), axis=(2, 3))[:, :, ::stride, ::stride]
        first_max = windows[:, :, :ho, :wo].reshape(n, c, ho, wo, -1).argmax(-1)
        rows = np.arange(ho)[:, None] * stride + first_max // kernel_size
        cols = np.arange(wo)[None, :] * stride + first_max % kernel_size
        grad_padded = np.zeros_like(padded)
        batch, channel = np.indices((n, c))[..., None, None].repeat(ho, -2).repeat(wo, -1)
        np.add.at(grad_padded, (batch, channel, rows, cols), grad)
        return grad_padded[:, :, padding:padding + h, padding:padding + w]

    def zero_pad_backward(self, grad, padding):
        return grad[:, :, padding:grad.shape[2] - padding, padding:grad.shape[3] - padding]

    def avg_pool_backward(self, grad, x, kernel_size, stride):
        """Each window's gradient spread over the in-bounds pixels it averaged (ceil mode)."""
        h, w = x.shape[2:]
        ho, wo = grad.shape[2:]
        full_h, full_w = (ho - 1) * stride + kernel_size, (wo - 1) * stride + kernel_size
        ones = np.pad(np.ones((h, w)), ((0, max(full_h - h, 0)), (0, max(full_w - w, 0))))
        counts = sliding_window_view(ones, (kernel_size, kernel_size))[::stride, ::stride].sum((2, 3))[:ho, :wo]
        share = grad / counts
        grad_padded = np.zeros(x.shape[:2] + (max(full_h, h), max(full_w, w)), grad.dtype)
        for i in range(kernel_size):
            for j in range(kernel_size):
                grad_padded[:, :, _window_slice(i, stride, ho), _window_slice(j, stride, wo)] += share
        return grad_padded[:, :, :h, :w]

    def subsample_backward(self, grad, x, stride):
        grad_x = np.zeros_like(x)
        grad_x[:, :, ::stride, ::stride] = grad
        return grad_x

    def pad_channels_backward(self, grad, before, after):
        return grad[:, before:grad.shape[1] - after]

    def global_avg_pool_backward(self, grad, x):
        h, w = x.shape[2:]
        return np.broadcast_to(grad[:, :, None, None] / (h * w), x.shape).copy()

    def linear_backward(self, grad, x, weight):
        """Gradients w.r.t. ``x``, ``weight`` and ``bias``."""
        return grad @ weight, grad.T @ x, grad.sum(0)

    def cross_entropy_backward(self, logits, targets):
        """Gradient of the mean cross-entropy w.r.t. the logits: (softmax - targets) / batch."""
        return softmax_cross_entropy_grad(logits, targets)
