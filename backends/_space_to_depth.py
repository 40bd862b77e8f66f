"""A strided conv as a stride-1 conv over its input's space-to-depth: the geometry, written once for
the backends that lower strided convs this way when training (mlx, tinygrad: their own strided
convs' gradients are slow on CPU; see benchmarks/perf_log.md T8, T11).

A KxK conv with stride s reads, for output pixel (y, x), the padded input's s x s blocks y .. y+T-1
(T = ceil(K/s)) in each axis. So it equals a TxT stride-1 conv without padding over the padded input
cut into s x s blocks stacked on the channels (s*s*C of them), whose kernel is the original
zero-padded to T*s per axis and cut the same way: 16/9 the multiply-adds for a 3x3/2 conv.

    >>> space_to_depth(32, 32, kernel=3, stride=2, padding=1)
    SpaceToDepth(taps=2, blocks_h=17, blocks_w=17, pad_bottom=1, pad_right=1, grown_kernel=4)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpaceToDepth:
    taps: int  # kernel side after the transform: ceil(K / s)
    blocks_h: int  # s x s blocks per column of the padded input (output rows + taps - 1)
    blocks_w: int  # blocks per row
    pad_bottom: int  # zero rows below the input (beside `padding` above); the padded input is then cut to
    pad_right: int  #   exactly blocks * s rows and columns, which may drop rows no output reads
    grown_kernel: int  # kernel side zero-padded to taps * s


def space_to_depth(height: int, width: int, *, kernel: int, stride: int, padding: int) -> SpaceToDepth:
    taps = -(-kernel // stride)
    out_h = (height + 2 * padding - kernel) // stride + 1
    out_w = (width + 2 * padding - kernel) // stride + 1
    blocks_h, blocks_w = out_h + taps - 1, out_w + taps - 1
    return SpaceToDepth(taps, blocks_h, blocks_w, pad_bottom=max(0, blocks_h * stride - height - padding),
                        pad_right=max(0, blocks_w * stride - width - padding), grown_kernel=taps * stride)
