"""MLX's CPU kernels for portres's MLX backend: convs as GEMMs over shifted views (and their
hand-written gradients), train-mode batch norm over a batch split across CPU streams, and the
per-thread streams those run on.

Imported by ``backends/mlx.py`` only, after it has loaded the BLAS MLX should use (that must
happen before ``mlx.core`` is first imported). Speed figures: benchmarks/perf_log.md.
"""

from __future__ import annotations

import functools
import threading

import mlx.core as mx
import numpy as np

from .base import two_pass_statistics


def pool_counts(height: int, width: int, kernel_size: int, stride: int) -> np.ndarray:
    """In-bounds pixels under each ceil-mode pooling window, shaped (1, H_out, W_out, 1)."""
    def per_axis(n):
        out = max(-(-(n - kernel_size) // stride), 0) + 1
        starts = np.arange(out) * stride
        return np.minimum(starts + kernel_size, n) - starts
    return np.outer(per_axis(height), per_axis(width))[None, :, :, None]


def tap_shifts(kernel: int, padded_width: int) -> list[int]:
    """Row offset of each tap (i, j), in (i, j) order, for the shifted-GEMM convs."""
    return [i * padded_width + j for i in range(kernel) for j in range(kernel)]


def sum_of_products(pairs):
    """sum(a @ b for a, b in pairs), accumulated in place by addmm (no temporaries per term)."""
    acc = None
    for a, b in pairs:
        acc = a @ b if acc is None else mx.addmm(acc, a, b)
    return acc


def padded_rows(x, padding: int, kernel: int):
    """``x`` zero-padded and flattened to rows of pixels, with zero rows behind for the last taps' shifts
    (a zero image: one copy, where padding the rows again would be a second)."""
    n, h, w, c = x.shape
    hp, wp = h + 2 * padding, w + 2 * padding
    assert hp * wp >= (kernel - 1) * (wp + 1), "the zero image must cover the last tap's shift"
    rows = mx.pad(x, [(0, 1), (padding, padding), (padding, padding), (0, 0)]).reshape((n + 1) * hp * wp, c)
    return rows, n * hp * wp, wp


@functools.cache
def shifted_gemm(padding: int, stream):
    """Stride-1 KxK conv (NHWC x OHWI, zero padding ``padding``) without im2col, with its own gradient,
    on ``stream``.

    On the zero-padded input flattened to rows of pixels, the tap (i, j) of every output pixel
    is the input row shifted by i*padded_width + j. So out = sum over taps of rows[shift:shift+M]
    @ W[i, j], each a contiguous slice (no copy) accumulated in place by addmm; outputs are
    computed on the padded grid and its garbage pad columns sliced away. The gradient is the
    same shape of computation (autodiff through the slices would scatter into nine full-size
    buffers: 161 ms instead of ~25 for resnet20's 32x32 layer at batch 128): the input's as
    shifted GEMMs of the output gradient with the transposed taps, shifted back; the weights' as
    one GEMM per tap. MLX calls a custom VJP on whatever stream is the default when the gradient
    is built, so it names the forward's stream itself (split batches run on several).
    """
    @mx.custom_function
    def conv(x, weight):
        n, h, w, _ = x.shape
        out_channels, kernel = weight.shape[0], weight.shape[1]
        rows, m, wp = padded_rows(x, padding, kernel)
        taps = weight.transpose(1, 2, 3, 0).reshape(kernel * kernel, x.shape[3], out_channels)  # (K*K, C, O)
        acc = sum_of_products((rows[shift:shift + m], taps[tap]) for tap, shift in enumerate(tap_shifts(kernel, wp)))
        out_h, out_w = h + 2 * padding - kernel + 1, w + 2 * padding - kernel + 1
        return acc.reshape(n, -1, wp, out_channels)[:, :out_h, :out_w, :]

    @conv.vjp
    def conv_vjp(primals, cotangent, output):
        with mx.stream(stream):
            return shifted_gemm_vjp(padding, *primals, cotangent)

    return conv


def shifted_gemm_vjp(padding: int, x, weight, cotangent):
    """The gradients (x, weight) of ``shifted_gemm``: the same shape of computation as its forward."""
    n, h, w, c = x.shape
    out_channels, kernel = weight.shape[0], weight.shape[1]
    rows, m, wp = padded_rows(x, padding, kernel)
    hp = h + 2 * padding
    # the output gradient on the padded grid (zero at the garbage columns), as rows, behind a zero image
    # (one copy) that the input gradient's backward shifts read from
    front = hp * wp
    out_h, out_w = cotangent.shape[1:3]
    padded = mx.pad(cotangent, [(1, 0), (0, hp - out_h), (0, wp - out_w), (0, 0)]).reshape(front + m, out_channels)
    grad_rows = padded[front:]
    shifts = tap_shifts(kernel, wp)
    grad_taps = mx.stack([rows[shift:shift + m].T @ grad_rows for shift in shifts])  # (K*K, C, O)
    grad_weight = grad_taps.reshape(kernel, kernel, c, out_channels).transpose(3, 0, 1, 2)
    # each input row received grad_rows[r - shift] @ W[tap].T from every tap
    taps_t = weight.transpose(1, 2, 0, 3).reshape(kernel * kernel, out_channels, c)  # (K*K, O, C)
    grad_input_rows = sum_of_products((padded[front - shift:front - shift + m], taps_t[tap])
                                       for tap, shift in enumerate(shifts))
    grad_x = grad_input_rows.reshape(n, hp, wp, c)[:, padding:padding + h, padding:padding + w, :]
    return grad_x, grad_weight


def pixels(slices) -> int:
    """Pixels per channel in a batch held as NHWC slices (BN's count)."""
    return sum(x.shape[0] for x in slices) * slices[0].shape[1] * slices[0].shape[2]


def channel_sum(x):
    """An NHWC array summed over all but its channels."""
    return mx.sum(x, axis=(0, 1, 2))


_PER_THREAD = threading.local()  # MLX binds a stream to the thread that made it


def thread_streams(device, count: int) -> list:
    """This thread's ``count`` streams on ``device``, made on its first call (MLX raises "There is no
    Stream(cpu, 1) in current thread" for a stream made in another thread). Shared by every backend of
    that device in the thread, so variants made for training add no streams (each is a thread in MLX)."""
    pools = _PER_THREAD.__dict__.setdefault("pools", {})
    key = (str(device), count)
    if key not in pools:
        pools[key] = [mx.new_stream(device) for _ in range(count)]
    return pools[key]


def on_streams(streams, function, *per_slice) -> list:
    """``[function(*arguments of slice i) on streams[i]]``: one batch slice's work per CPU stream."""
    outs = []
    for stream, arguments in zip(streams, zip(*per_slice)):
        with mx.stream(stream):
            outs.append(function(*arguments))
    return outs


@functools.cache
def batch_norm_over_slices(eps: float, streams: tuple):
    """Train-mode BN (NHWC) over a batch held as slices, one per stream in ``streams``:
    ``(weight, bias, slices) -> (batch mean, unbiased batch variance, normalised slices)``, with its
    own gradient.

    The statistics are the whole batch's: each slice's partial sums, computed on its stream, are
    added (a split batch trains exactly as one). MLX's CPU elementwise passes run on one thread per
    stream and are memory-bound, and autodiff of the forward formula makes about twice the passes
    the closed form needs: with x^ = (x - mean) * inv_std, dx = A * dy + B + C * x^ with per-channel
    A, B, C (the mean and variance outputs' cotangents included, for callers that differentiate
    through the statistics).
    """
    axes = (0, 1, 2)
    per_stream = functools.partial(on_streams, streams)

    @mx.custom_function
    def batch_norm(weight, bias, slices):
        # two passes from each slice's partial sums on its stream
        count = pixels(slices)
        mean, centered, var = two_pass_statistics(slices, count, channel_sum=channel_sum, each=per_stream)
        scale = weight * mx.rsqrt(var + eps)
        return mean, var * (count / (count - 1)), per_stream(lambda c: c * scale + bias, centered)

    @batch_norm.vjp
    def batch_norm_vjp(primals, cotangents, outputs):
        weight, _, slices = primals
        grad_mean, grad_var, grad_ys = cotangents
        mean, unbiased, _ = outputs
        count = pixels(slices)
        inv_std = mx.rsqrt(unbiased * ((count - 1) / count) + eps)
        normalised = per_stream(lambda x: (x - mean) * inv_std, slices)
        grad_bias = sum(per_stream(lambda g: g.sum(axis=axes), grad_ys))
        grad_weight = sum(per_stream(lambda g, n: (g * n).sum(axis=axes), grad_ys, normalised))
        scale = weight * inv_std
        per_channel_shift = grad_mean / count - scale * grad_bias / count
        per_channel_slope = grad_var * (2 / (count - 1)) / inv_std - scale * grad_weight / count
        grad_slices = per_stream(lambda g, n: scale * g + per_channel_shift + per_channel_slope * n,
                                 grad_ys, normalised)
        return grad_weight, grad_bias, grad_slices

    return batch_norm
