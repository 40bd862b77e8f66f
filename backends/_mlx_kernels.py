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


# Winograd F(m x m, 3x3) (Lavin & Gray 2015): out tile = A^T [(G g G^T) * (B^T d B)] A for every
# (m+2)-square input tile d (stride m) and 3x3 filter g; (A^T, G, B^T) for m = 2 and m = 4 (points 0, +-1, +-2).
WINOGRAD_MATRICES = {
    2: ([[1, 1, 1, 0], [0, 1, -1, -1]],
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]),
    4: ([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
         [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
         [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]),
}


@functools.cache
def winograd_transforms(tile_out: int, dtype) -> tuple:
    """The 2-D transforms of F(tile_out x tile_out, 3x3) as MLX constants, each the Kronecker square of the
    1-D one so that a transform is one GEMM over every (tile, channel) column: (output (m*m, a*a),
    filter (a*a, 9), input (a*a, a*a)) with a = m + 2, computed in float64 and rounded once."""
    output, filter_, data = (np.array(matrix, dtype=np.float64) for matrix in WINOGRAD_MATRICES[tile_out])
    return tuple(mx.array(np.kron(matrix, matrix), dtype=dtype) for matrix in (output, filter_, data))


@functools.cache
def winograd_conv3x3(stream, tile_out: int = 4):
    """Stride-1 3x3 conv with zero padding 1 (NHWC x OHWI -> NHWC) by Winograd F(m x m, 3x3), m = ``tile_out``,
    with its own gradient, on ``stream``.

    Every transform is a GEMM by a constant matrix (BLAS speed, not elementwise passes): the input's
    (m+2)-square tiles (stride m) gathered as (a*a, tiles*C) rows times the input transform, the
    filter's (9, C*O) times the filter transform, then one batched matmul of a*a GEMMs
    (tiles, C) @ (C, O), the output transform, and the tiles laid back as pixels. F(4x4) does 4x fewer
    multiplies in its GEMMs than the direct conv; its float32 error against float64 is ~1e-6 relative
    (tests/test_mlx_kernels.py). The gradient is the transposed transforms (they are linear), the
    overlapping tiles' input gradients folded back (``fold_tiles``): autodiff through the tile
    gather scatters into a*a full-size buffers instead.

        >>> winograd_conv3x3(mx.default_stream(mx.cpu))(mx.zeros((1, 5, 7, 3)), mx.zeros((8, 3, 3, 3))).shape
        (1, 5, 7, 8)
    """
    @mx.custom_function
    def conv(x, weight):
        n, h, w, _ = x.shape
        g = WinogradGrid(x.shape, weight.shape[0], tile_out)
        output_transform = winograd_transforms(tile_out, x.dtype)[0]
        products = winograd_tiles(g, x) @ winograd_filters(g, weight)  # (a*a, tiles, O): a*a GEMMs in one call
        out = (output_transform @ products.reshape(g.points, g.tiles * g.out_channels))
        out = out.reshape(tile_out, tile_out, n, g.tiles_h, g.tiles_w, g.out_channels).transpose(2, 3, 0, 4, 1, 5)
        return out.reshape(n, g.tiles_h * tile_out, g.tiles_w * tile_out, g.out_channels)[:, :h, :w, :]

    @conv.vjp
    def conv_vjp(primals, cotangent, output):
        with mx.stream(stream):
            return winograd_vjp(tile_out, *primals, cotangent)

    return conv


class WinogradGrid:
    """The tiling of an NHWC input of ``shape`` for F(m x m, 3x3): tiles per side, tiles in all, points a*a."""

    def __init__(self, shape, out_channels: int, tile_out: int):
        self.n, self.h, self.w, self.c = shape
        self.out_channels, self.tile_out, self.side = out_channels, tile_out, tile_out + 2
        self.points = self.side * self.side
        self.tiles_h, self.tiles_w = -(-self.h // tile_out), -(-self.w // tile_out)
        self.tiles = self.n * self.tiles_h * self.tiles_w


def winograd_tiles(g: WinogradGrid, x):
    """The input transform of every tile, (a*a, tiles, C): the tiles gathered from the padded input, then one GEMM."""
    m, a = g.tile_out, g.side
    input_transform = winograd_transforms(m, x.dtype)[2]
    padded = mx.pad(x, [(0, 0), (1, g.tiles_h * m + 1 - g.h), (1, g.tiles_w * m + 1 - g.w), (0, 0)])
    last_h, last_w = m * (g.tiles_h - 1) + 1, m * (g.tiles_w - 1) + 1
    data = mx.stack([padded[:, i:i + last_h:m, j:j + last_w:m, :] for i in range(a) for j in range(a)])
    return (input_transform @ data.reshape(g.points, g.tiles * g.c)).reshape(g.points, g.tiles, g.c)


def winograd_filters(g: WinogradGrid, weight):
    """The filter transform of OHWI 3x3 ``weight``: (a*a, C, O)."""
    filter_transform = winograd_transforms(g.tile_out, weight.dtype)[1]
    taps = weight.transpose(1, 2, 3, 0).reshape(9, g.c * g.out_channels)
    return (filter_transform @ taps).reshape(g.points, g.c, g.out_channels)


def winograd_vjp(tile_out: int, x, weight, cotangent):
    """The gradients (x, weight) of ``winograd_conv3x3``: each transform transposed, in reverse order."""
    g = WinogradGrid(x.shape, weight.shape[0], tile_out)
    m, a, o = tile_out, g.side, g.out_channels
    output_transform, filter_transform, input_transform = winograd_transforms(tile_out, x.dtype)
    # the output gradient as tiles (m*m, tiles*O), zero past the image
    tiled = mx.pad(cotangent, [(0, 0), (0, g.tiles_h * m - g.h), (0, g.tiles_w * m - g.w), (0, 0)])
    tiled = tiled.reshape(g.n, g.tiles_h, m, g.tiles_w, m, o).transpose(2, 4, 0, 1, 3, 5).reshape(m * m, g.tiles * o)
    grad_products = (output_transform.T @ tiled).reshape(g.points, g.tiles, o)
    grad_filters = winograd_tiles(g, x).transpose(0, 2, 1) @ grad_products  # (a*a, C, O)
    grad_taps = filter_transform.T @ grad_filters.reshape(g.points, g.c * o)
    grad_weight = grad_taps.reshape(3, 3, g.c, o).transpose(3, 0, 1, 2)
    grad_tiles = grad_products @ winograd_filters(g, weight).transpose(0, 2, 1)  # (a*a, tiles, C)
    grad_data = (input_transform.T @ grad_tiles.reshape(g.points, g.tiles * g.c))
    grad_data = grad_data.reshape(a, a, g.n, g.tiles_h, g.tiles_w, g.c)
    folded = fold_tiles(fold_tiles(grad_data, m, offset_axis=0, block_axis=3), m, offset_axis=1, block_axis=4)
    image = folded.transpose(2, 3, 0, 4, 1, 5).reshape(g.n, m * (g.tiles_h + 1), m * (g.tiles_w + 1), g.c)
    return image[:, 1:1 + g.h, 1:1 + g.w, :], grad_weight


def fold_tiles(grads, tile_out: int, offset_axis: int, block_axis: int):
    """Sum overlapping tiles' gradients along one axis: offset i of tile t is pixel m*t + i, so offsets
    m and m+1 of tile t land on offsets 0 and 1 of block t+1. ``grads``: the offset axis (m+2) and the
    tile axis (T); the result: residues (m) and blocks (T+1), pixel = m*block + residue."""
    def pad(array, offsets, blocks):
        widths = [(0, 0)] * array.ndim
        widths[offset_axis], widths[block_axis] = offsets, blocks
        return mx.pad(array, widths)

    index = [slice(None)] * grads.ndim
    index[offset_axis] = slice(0, tile_out)
    own = grads[tuple(index)]
    index[offset_axis] = slice(tile_out, None)
    spill = grads[tuple(index)]
    return pad(own, (0, 0), (0, 1)) + pad(spill, (0, tile_out - 2), (1, 0))


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
