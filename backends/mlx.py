"""MLX lowering: NHWC inside, forward wrapped in ``mx.compile``.

Layouts: portres hands over NCHW activations and OIHW conv weights (torchvision's);
MLX convolves NHWC activations with OHWI weights. Weights are transposed once when the
model is built; activations at the model's edges only.

On Linux the ``mlx[cpu]`` wheel links the reference (netlib) BLAS, ~50x slower than an
optimized one. Its BLAS symbols resolve through the global scope, so loading OpenBLAS
with ``RTLD_GLOBAL`` *before* ``mlx.core`` is imported makes MLX use it. This module does
that on import, with the library ``_blas.select`` judged safe for this CPU (a wrong one
dies with SIGILL), and reports the outcome as ``info()["blas"]``, ``"blas_core"`` and
``"blas_rejected"``; falling back to the bundled BLAS warns once (``BundledBlasWarning``).

Speed on CPU (measured, see benchmarks/perf_log.md): 1x1 convs run as one GEMM, 3x3
stride-1 convs on large maps as accumulated GEMMs over shifted views (no im2col copy), on
mid-sized maps (float32) by Winograd F(4x4, 3x3), the 7x7/2 stem over its space-to-depth
input, and the batch is split across one CPU stream per core, because MLX runs a stream's
elementwise ops on a single thread.
"""

from __future__ import annotations

import functools
import platform
import sys
from collections.abc import Callable

import numpy as np

from . import _blas
from ._space_to_depth import space_to_depth
from .base import AbstractBackend, Forwarding, cpu_cores


def _choose_blas() -> tuple[_blas.Selection | None, Callable[[int], None] | None, str]:
    """Load the BLAS MLX should use, chosen safely, before mlx.core: (selection, thread setter, description)."""
    if platform.system() != "Linux":
        return None, None, "Accelerate (macOS)" if platform.system() == "Darwin" else "the BLAS bundled with mlx"
    if "mlx.core" in sys.modules:
        import warnings

        warnings.warn("mlx.core was imported before portres.backends.mlx, so portres could not load an optimized "
                      "BLAS for it: MLX may run on its bundled reference BLAS, up to 50x slower on CPU. Fix: import "
                      "portres.backends.mlx (or call portres.build) before importing mlx.", _blas.BundledBlasWarning,
                      stacklevel=3)
        return None, None, ("unknown: mlx.core was imported before portres.backends.mlx, so OpenBLAS could not be "
                            "preloaded (import portres.backends.mlx first)")
    try:
        selection = _blas.select()  # judged in subprocesses and cached: nothing unsafe is loaded here
    except Exception as error:  # noqa: BLE001 - a bug in choosing must cost speed (with a warning), not the backend
        failed = _blas.Rejection("(all candidates)", "portres", f"choosing a BLAS failed: {error!r}")
        selection = _blas.Selection(None, rejected=(failed,))
    try:
        set_threads = _blas.preload(selection)
    except OSError as error:  # vanished or changed since it was probed
        why = _blas.Rejection(selection.path, selection.source, f"cannot be loaded: {error}")
        selection, set_threads = _blas.Selection(None, rejected=(*selection.rejected, why)), None
    _blas.warn_bundled(selection)
    return selection, set_threads, selection.describe()


# The chosen BLAS (None off Linux), its openblas_set_num_threads (through its symbol prefix) if any, and one line.
BLAS_SELECTION, _set_threads, BLAS = _choose_blas()

try:
    import mlx.core as mx
except ImportError as error:  # pragma: no cover - guarded by backends.unavailable_reason
    raise ImportError(f"the mlx backend needs MLX: pip install 'portres[mlx]' ({error})") from None

from . import _mlx_kernels as kernels  # noqa: E402 - mlx.core only after the BLAS is loaded

NAME = "mlx"
FOLD_BATCH_NORM = True
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16, "float64": mx.float64}


def devices() -> list[str]:
    return [kind for kind, device in (("cpu", mx.cpu), ("gpu", mx.gpu)) if mx.is_available(device)]


def info() -> dict:
    return {"framework": f"mlx {mx.__version__}", "devices": devices(),
            "default_device": str(mx.default_device().type).split(".")[-1], "blas": BLAS,
            "blas_core": BLAS_SELECTION.corename if BLAS_SELECTION else None,
            "blas_rejected": BLAS_SELECTION.rejected_lines() if BLAS_SELECTION else []}


def _set_blas_threads(threads: int) -> None:
    if _set_threads is not None:
        _set_threads(threads)


class Backend(AbstractBackend):
    """MLX arrays, NHWC inside. ``cpu_streams``: CPU streams a batch is split across (default: one per
    core). ``winograd``: float32 stride-1 3x3 convs on maps up to ``winograd_max_pixels`` by Winograd
    F(4x4, 3x3) on the CPU (``_winograd_pays``). For gradients (``for_gradients``): ``strided_convs_to_depth``,
    ``shifted_gemm_min_pixels`` and ``winograd_max_pixels`` (see their constants below). ``group``/``sync_bn``:
    one replica of a data-parallel group."""

    name = NAME
    autodiff = True

    def __init__(self, device: str | None = None, dtype: str | None = None, cpu_streams: int | None = None, *,
                 strided_convs_to_depth: bool | None = None, shifted_gemm_min_pixels: int | None = None,
                 winograd: bool = True, winograd_max_pixels: int | None = None,
                 group: ProcessGroup | None = None, sync_bn: bool = False):
        if device is None:  # float64 exists on the CPU only: a float64 request defaults there (Apple: GPU otherwise)
            self._device = mx.cpu if dtype == "float64" else mx.default_device()
        elif device in ("cpu", "gpu"):
            self._device = mx.cpu if device == "cpu" else mx.gpu
            if not mx.is_available(self._device):
                raise ValueError(f"MLX device {device!r} is not available here; available: {', '.join(devices())}")
        else:
            raise ValueError(f"MLX devices are 'cpu' and 'gpu', not {device!r}")
        self.device = "gpu" if self._device == mx.gpu else "cpu"
        self.dtype = dtype or "float32"
        if self.dtype not in DTYPES:
            raise ValueError(f"MLX backend dtypes are {', '.join(DTYPES)}, not {self.dtype!r}")
        self._dtype = DTYPES[self.dtype]
        if self.dtype == "float64" and self.device != "cpu":
            raise ValueError("MLX computes in float64 on the CPU only: use device='cpu' or float32")
        self._host_dtype = np.float64 if self.dtype == "float64" else np.float32  # NumPy side of transfers
        # MLX runs a CPU stream's elementwise ops on one thread, and those passes are
        # memory-bound. One stream per core, each taking a slice of the batch (with one BLAS
        # thread each), keeps every core busy: ResNet-50 batch 16 goes 15 -> 21 images/s.
        if cpu_streams is None:
            cpu_streams = cpu_cores() if self.device == "cpu" else 1
        if isinstance(cpu_streams, bool) or not isinstance(cpu_streams, int) or cpu_streams < 1:
            raise ValueError(f"cpu_streams={cpu_streams!r} must be a positive integer")
        self.cpu_streams = cpu_streams  # streams the batch is split across
        # on CPU: see _space_to_depth_conv; None: the stems' large kernels only (SPACE_TO_DEPTH_MIN_KERNEL)
        self.strided_convs_to_depth = strided_convs_to_depth
        self.winograd = winograd  # on CPU, float32: see _winograd_pays
        self._winograd_max_pixels_option = winograd_max_pixels  # None: the default for the role (see for_gradients)
        self.winograd_max_pixels = self.WINOGRAD_MAX_PIXELS if winograd_max_pixels is None else winograd_max_pixels
        self.shifted_gemm_min_pixels = self.SHIFTED_GEMM_MIN_PIXELS if shifted_gemm_min_pixels is None \
            else shifted_gemm_min_pixels
        if sync_bn and group is None:
            raise ValueError("sync_bn sums batch statistics over a data-parallel group: pass group")
        self.group, self.sync_bn = group, sync_bn
        self.threads = (f"{cpu_streams} CPU streams, {max(1, cpu_cores() // cpu_streams)} BLAS threads each "
                        "(all cores for one stream at batch 1)") if self.device == "cpu" else "device"

    def options(self) -> dict:
        return {"device": self.device, "dtype": self.dtype, "cpu_streams": self.cpu_streams,
                "strided_convs_to_depth": self.strided_convs_to_depth,
                "shifted_gemm_min_pixels": self.shifted_gemm_min_pixels, "winograd": self.winograd,
                "winograd_max_pixels": self._winograd_max_pixels_option,
                "group": self.group, "sync_bn": self.sync_bn}

    def _streams(self) -> list:
        """This thread's CPU streams: each thread that runs the model gets its own, so a model built in one
        thread can be called from any other, concurrently too (the compiled traces are shared)."""
        return kernels.thread_streams(self._device, self.cpu_streams)

    # -- arrays and parameters --

    def from_numpy(self, x: np.ndarray):
        x = np.asarray(x, dtype=self._host_dtype)
        if x.ndim == 4:
            x = x.transpose(0, 2, 3, 1)  # NCHW -> NHWC
        return mx.array(np.ascontiguousarray(x), dtype=self._dtype)  # mx.array makes float64 float32 by default

    def to_numpy(self, x) -> np.ndarray:
        with mx.stream(self._device):
            out = np.array(x if x.dtype == mx.float64 else x.astype(mx.float32))
        return out.transpose(0, 3, 1, 2) if out.ndim == 4 else out

    def load_params(self, plan, params: dict) -> dict:
        loaded = {}
        for name, value in params.items():
            if value.ndim == 4:
                value = value.transpose(0, 2, 3, 1)  # OIHW -> OHWI
            loaded[name] = mx.array(np.ascontiguousarray(value, self._host_dtype), dtype=self._dtype)
        mx.eval(loaded)
        return loaded

    def compile(self, forward):
        compiled = [mx.compile(forward) for _ in range(self.cpu_streams)]  # traced separately per stream
        cores = cpu_cores()

        def run(params, x):
            streams = self._streams()
            parts = min(len(streams), x.shape[0])
            bounds = [x.shape[0] * i // parts for i in range(1, parts)]
            chunks = mx.split(x, bounds, axis=0) if parts > 1 else [x]
            if self.device == "cpu":
                _set_blas_threads(cores // parts)  # batch 1: every core for the one GEMM stream
            outs = []
            for stream, function, chunk in zip(streams, compiled, chunks):
                with mx.stream(stream):
                    outs.append(function(params, chunk))
            if parts == 1:
                out = outs[0]
            elif isinstance(outs[0], tuple):  # several outputs (stage outputs): each joined across streams
                out = tuple(mx.concatenate(list(pieces), axis=0) for pieces in zip(*outs))
            else:
                out = mx.concatenate(outs, axis=0)
            mx.eval(out)
            return out

        return run

    def realize(self, x):
        mx.eval(x)
        return x

    def synchronize(self) -> None:
        mx.synchronize()

    def memory(self) -> dict:
        return {"device_peak_memory_bytes": mx.get_peak_memory()}

    # -- primitives (NHWC) --

    def conv2d(self, x, weight, bias, stride, padding, groups):
        kernel = weight.shape[1]
        if self.device == "cpu" and groups == 1 and kernel == 1 and padding == 0:
            return self._pointwise_conv(x, weight, bias, stride)
        # MLX's own conv computes float64 in float32 (1.5e-7 off on CPU): float64 runs GEMMs only
        exact = self.dtype == "float64"
        to_depth = self.strided_convs_to_depth
        if to_depth is None:
            to_depth = kernel >= self.SPACE_TO_DEPTH_MIN_KERNEL
        if self.device == "cpu" and groups == 1 and stride > 1 and to_depth:
            return self._space_to_depth_conv(x, weight, bias, stride, padding)
        if self.device == "cpu" and (groups > 1 or (stride > 1 and exact)):
            return self._channel_major_conv(x, weight, bias, stride, padding, groups)
        if self.device == "cpu" and groups == 1 and stride == 1 and self._winograd_pays(x.shape, kernel, padding):
            y = kernels.winograd_conv3x3(mx.default_stream(self._device))(x, weight)
            return y if bias is None else y + bias
        if self.device == "cpu" and stride == 1 and padding == kernel // 2 \
                and (x.shape[1] * x.shape[2] >= self.shifted_gemm_min_pixels or exact):
            return self._shifted_gemm_conv(x, weight, bias, padding)
        y = mx.conv2d(x, weight, stride=stride, padding=padding, groups=groups)
        return y if bias is None else y + bias

    def for_nonfinite_input(self) -> Backend:
        """This backend with direct convs only: Winograd's 6x6 input tiles spread one NaN/inf over a 4x4 output
        tile, and the space-to-depth conv's zero-padded taps multiply inputs outside the window (0 * inf is
        NaN), so only direct convs match the reference's NaN/inf pattern (``Model`` switches per call)."""
        changes = {"winograd": False} if self.winograd else {}
        if self.strided_convs_to_depth is not False:
            changes["strided_convs_to_depth"] = False
        return self.variant(**changes) if changes else self

    def for_training(self) -> Backend | _BatchSplit:
        """This backend as a training step runs it: ``for_gradients``, with the batch split across the
        CPU streams when there are several (``_BatchSplit``; resnet20 at batch 128: see perf_log.md)."""
        differentiated = self.for_gradients()
        return _BatchSplit(differentiated) if self.device == "cpu" and self.cpu_streams > 1 else differentiated

    def for_gradients(self) -> Backend:
        """This backend as training differentiates it: 3x3 convs as shifted GEMMs down to 8x8 maps, strided
        ones over the space-to-depth input (grouped ones channel-major). MLX's own strided conv is faster
        forward, but its gradient w.r.t. the input runs a dilated conv that is 5-14x slower on CPU
        (ResNet-50's 3x3/2 at 28x28, batch 16: 4.4 s vs 0.3 s) and has no float64 kernel."""
        return self.variant(strided_convs_to_depth=self.device == "cpu",
                            shifted_gemm_min_pixels=self.TRAINING_SHIFTED_GEMM_MIN_PIXELS,
                            winograd_max_pixels=self.TRAINING_WINOGRAD_MAX_PIXELS
                            if self._winograd_max_pixels_option is None else self._winograd_max_pixels_option)

    # Winograd F(4x4, 3x3) (kernels.winograd_conv3x3) against the shifted GEMMs and MLX's conv, one stream,
    # one BLAS thread, forward (perf_log.md step 14): it wins where maps are mid-sized and channels many
    # (ResNet-50 at batch 8: 28x28x128 12 ms vs 19; 14x14x256 13 vs 17; ResNet-20 8x8x64 at batch 64:
    # 3.3 vs 4.7). Its transforms cost per (tile, channel) what a 36-channel GEMM would, so at 56x56x64 it
    # only ties and at 32x32x16 loses (12 vs 7 ms); and the filter transform, recomputed per call, outweighs
    # few tiles (7x7x512 at batch 8: 38 vs 16 ms).
    WINOGRAD_MAX_PIXELS = 28 * 28
    WINOGRAD_MIN_TILES = 64
    # Differentiated (forward and hand-written gradient, kernels.winograd_vjp) it loses at 16x16 and up
    # (ResNet-20's 16x16x32 at batch 64: 44-46 vs 21-22 ms shifted; 32x32x16: 93-97 vs 28-32) and at 8x8x64
    # went either way (17.6 vs 22.4 ms wall; 26.2 vs 19.1 ms CPU), as did the whole ResNet-20 step
    # (perf_log.md T16): off for gradients unless ``winograd_max_pixels`` is given (64 takes the 8x8 maps).
    TRAINING_WINOGRAD_MAX_PIXELS = 0

    def _winograd_pays(self, shape, kernel: int, padding: int) -> bool:
        """Whether a stride-1 conv of an NHWC input of ``shape`` runs as Winograd F(4x4, 3x3) here."""
        n, h, w, _ = shape
        tiles = n * -(-h // 4) * -(-w // 4)
        return (self.winograd and self.device == "cpu" and self.dtype == "float32" and kernel == 3 and padding == 1
                and h * w <= self.winograd_max_pixels and tiles >= self.WINOGRAD_MIN_TILES)

    # MLX's CPU conv is im2col + one GEMM; at large feature maps the im2col copy costs more
    # than the GEMM (ResNet-50 3x3 at 56x56: 78 ms of copy vs 22 ms of GEMM), so there
    # the conv becomes k*k accumulated GEMMs on shifted views instead (see _shifted_gemm_conv).
    SHIFTED_GEMM_MIN_PIXELS = 28 * 28
    # Differentiated, the shifted GEMMs win at smaller maps too: MLX's conv gradient runs two more
    # im2col convs (ResNet-20's 3x3 at 16x16, 32 channels, batch 64, one thread: forward and
    # gradient 24.5 ms shifted vs 50.3 ms MLX; at 8x8 with 64 channels 24-33 vs 36-37 ms).
    TRAINING_SHIFTED_GEMM_MIN_PIXELS = 8 * 8

    # Strided convs forward: MLX's own (im2col + one GEMM) beats the space-to-depth shifted GEMMs for 3x3/2
    # (ResNet-50 at batch 8, one thread, CPU ms: 56x56x128 30 vs 53; 14x14x512 22 vs 111), but not for the 7x7/2
    # stem on 3 channels (224x224: 70 vs 60), whose im2col copies 49 taps of 3-float runs.
    SPACE_TO_DEPTH_MIN_KERNEL = 5

    def _pointwise_conv(self, x, weight, bias, stride):
        # a 1x1 conv is one GEMM over pixels: (N*H*W, C) @ (C, O); MLX's conv path is 1.5-7x slower
        if stride > 1:
            x = x[:, ::stride, ::stride, :]
        n, h, w, c = x.shape
        kernel = weight.reshape(weight.shape[0], c).T
        pixels = x.reshape(n * h * w, c)
        y = pixels @ kernel if bias is None else mx.addmm(bias, pixels, kernel)
        return y.reshape(n, h, w, -1)

    def _shifted_gemm_conv(self, x, weight, bias, padding):
        y = kernels.shifted_gemm(padding, mx.default_stream(self._device))(x, weight)
        return y if bias is None else y + bias

    def _space_to_depth_conv(self, x, weight, bias, stride, padding):
        # strided convs as stride-1 shifted GEMMs (and their fast gradient) over the space-to-depth
        # input (backends/_space_to_depth.py): resnet20's 3x3/2 at 32x32, batch 64, one thread, forward
        # and gradient 64.6 ms channel-major -> 35.4 ms
        n, h, w, c = x.shape
        out_channels, kernel = weight.shape[0], weight.shape[1]
        g = space_to_depth(h, w, kernel=kernel, stride=stride, padding=padding)
        x = mx.pad(x, [(0, 0), (padding, g.pad_bottom), (padding, g.pad_right), (0, 0)])
        x = x[:, :g.blocks_h * stride, :g.blocks_w * stride, :]
        z = x.reshape(n, g.blocks_h, stride, g.blocks_w, stride, c).transpose(0, 1, 3, 2, 4, 5)
        z = z.reshape(n, g.blocks_h, g.blocks_w, stride * stride * c)
        grow = g.grown_kernel - kernel
        weight = mx.pad(weight, [(0, 0), (0, grow), (0, grow), (0, 0)])
        weight = weight.reshape(out_channels, g.taps, stride, g.taps, stride, c).transpose(0, 1, 3, 2, 4, 5)
        conv = kernels.shifted_gemm(0, mx.default_stream(self._device))
        y = conv(z, weight.reshape(out_channels, g.taps, g.taps, -1))
        return y if bias is None else y + bias

    def _channel_major_conv(self, x, weight, bias, stride, padding, groups):
        # MLX's CPU grouped conv runs at ~1 GFLOP/s (ResNeXt-50: 80% of its time). Here each
        # group is a GEMM in channel-major layout (G, Cg, pixels), whose slices copy and
        # multiply in long contiguous runs: stride 1 as the shifted GEMMs of
        # _shifted_gemm_conv batched over groups, larger strides as im2col + one batched GEMM.
        # (ResNeXt-50 layer1 3x3 at batch 8: MLX 228 ms; NHWC im2col 170 ms; this 60 ms.)
        n, h, w, c = x.shape
        out_channels, kernel = weight.shape[0], weight.shape[1]
        per_group_in, per_group_out = c // groups, out_channels // groups
        x = x.reshape(n, h, w, groups, per_group_in).transpose(3, 4, 0, 1, 2)  # (G, Cg, N, H, W)
        x = mx.pad(x, [(0, 0), (0, 0), (0, 0), (padding, padding), (padding, padding)])
        hp, wp = h + 2 * padding, w + 2 * padding
        out_h, out_w = (hp - kernel) // stride + 1, (wp - kernel) // stride + 1
        # OHWI (G*Og, K, K, Cg) -> (G, Og, K*K*Cg): (tap, channel) order, as the patches below
        group_kernels = weight.reshape(groups, per_group_out, kernel * kernel * per_group_in)
        if stride == 1:
            m = n * hp * wp
            rows = mx.pad(x.reshape(groups, per_group_in, m), [(0, 0), (0, 0), (0, (kernel - 1) * (wp + 1))])
            shifts = kernels.tap_shifts(kernel, wp)
            acc = kernels.sum_of_products((group_kernels[:, :, tap * per_group_in:(tap + 1) * per_group_in],
                                           rows[:, :, shift:shift + m]) for tap, shift in enumerate(shifts))
            y = acc.reshape(groups, per_group_out, n, hp, wp)[:, :, :, :out_h, :out_w]
        else:
            taps = [x[:, :, :, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
                    for i in range(kernel) for j in range(kernel)]
            patches = mx.concatenate(taps, axis=1).reshape(groups, kernel * kernel * per_group_in, -1)
            y = (group_kernels @ patches).reshape(groups, per_group_out, n, out_h, out_w)
        y = y.transpose(2, 3, 4, 0, 1).reshape(n, out_h, out_w, out_channels)
        return y if bias is None else y + bias

    def batch_norm(self, x, weight, bias, mean, var, eps):
        scale = weight * mx.rsqrt(var + eps)
        return x * scale + (bias - mean * scale)

    def channel_affine(self, x, scale, shift):
        return x * scale + shift

    # -- training --

    def batch_norm_train(self, x, weight, bias, eps):
        if self.sync_bn:
            return self._synchronized_batch_norm(x, weight, bias, eps)
        if isinstance(x, _Slices):  # the split-batch training view: one slice per stream
            mean, var, ys = kernels.batch_norm_over_slices(eps, tuple(self._streams()[:len(x)]))(weight, bias, list(x))
            return _Slices(ys), mean, var
        mean, var, (y,) = kernels.batch_norm_over_slices(eps, (mx.default_stream(self._device),))(weight, bias, [x])
        return y, mean, var

    def _synchronized_batch_norm(self, x, weight, bias, eps):
        # the global batch's statistics, by autodiff. ``x`` may be a split batch (_Slices, one per stream).
        split = isinstance(x, _Slices)
        slices = list(x) if split else [x]
        streams = self._streams() if split else [mx.default_stream(self._device)]
        ys, mean, var = self.synchronized_batch_norm(slices, kernels.pixels(slices), weight, bias, eps,
                                                     channel_sum=kernels.channel_sum, rsqrt=mx.rsqrt,
                                                     each=functools.partial(kernels.on_streams, streams))
        return (_Slices(ys) if split else ys[0]), mean, var

    def cross_entropy(self, logits, targets):
        if logits.dtype == mx.float64:  # MLX's float64 exp (and logsumexp) is float32-accurate; power is exact
            shifted = logits - mx.stop_gradient(logits.max(axis=1, keepdims=True))
            exponentials = mx.power(mx.array(np.e, mx.float64), shifted)
            log_probabilities = shifted - mx.log(exponentials.sum(axis=1, keepdims=True))
        else:
            log_probabilities = logits - mx.logsumexp(logits, axis=1, keepdims=True)
        return -(targets * log_probabilities).sum(axis=1).mean()

    def compile_train_step(self, step):
        """``step`` on one stream (the whole batch: BN statistics), every core for BLAS. Not under
        mx.compile: on CPU it traced resnet20's step for 25 s and then ran it slower (2.9 vs 2.5 s at
        batch 128), since the step is dominated by GEMMs and reductions that compile does not fuse."""
        cores = cpu_cores()

        def run(state, images, targets, lr, count):
            if self.device == "cpu":
                _set_blas_threads(cores)
            with mx.stream(self._streams()[0]):
                state, loss, logits = step(state, images, targets, mx.array(lr, self._dtype),
                                           mx.array(count, self._dtype))
                mx.eval(state, loss, logits)
            return state, loss, logits

        return run

    def value_and_grad(self, loss_fn):
        """``loss_fn(trainable) -> (loss, aux)`` -> ``f(trainable) -> (loss, aux, grads)`` by ``mx.value_and_grad``.
        The whole batch runs on one stream: splitting it would change the batch statistics."""
        differentiate = mx.value_and_grad(loss_fn)

        def run(trainable: dict):
            (loss, aux), grads = differentiate(trainable)
            return loss, aux, grads

        return run

    def relu(self, x):
        return mx.maximum(x, 0)

    def _windows(self, x, kernel_size, stride, out_h, out_w):
        # every (i, j) offset of the window as one strided slice: pooling = reduce over k*k slices
        for i in range(kernel_size):
            for j in range(kernel_size):
                yield x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride, :]

    def max_pool(self, x, kernel_size, stride, padding):
        if padding:
            x = mx.pad(x, [(0, 0), (padding, padding), (padding, padding), (0, 0)], constant_values=-float("inf"))
        out_h = (x.shape[1] - kernel_size) // stride + 1
        out_w = (x.shape[2] - kernel_size) // stride + 1
        result = None
        for window in self._windows(x, kernel_size, stride, out_h, out_w):
            result = window if result is None else mx.maximum(result, window)
        return result

    def zero_pad(self, x, padding):
        return mx.pad(x, [(0, 0), (padding, padding), (padding, padding), (0, 0)])

    def avg_pool(self, x, kernel_size, stride):
        height, width = x.shape[1:3]
        counts = kernels.pool_counts(height, width, kernel_size, stride)
        out_h, out_w = counts.shape[1:3]
        pad_h, pad_w = (out_h - 1) * stride + kernel_size - height, (out_w - 1) * stride + kernel_size - width
        x = mx.pad(x, [(0, 0), (0, max(pad_h, 0)), (0, max(pad_w, 0)), (0, 0)])
        total = sum(self._windows(x, kernel_size, stride, out_h, out_w))
        return total / mx.array(counts.astype(np.float32)).astype(x.dtype)

    def subsample(self, x, stride):
        return x[:, ::stride, ::stride, :]

    def pad_channels(self, x, before, after):
        return mx.pad(x, [(0, 0), (0, 0), (0, 0), (before, after)])

    def add(self, x, y):
        return x + y

    def global_avg_pool(self, x):
        return mx.mean(x, axis=(1, 2))

    def linear(self, x, weight, bias):
        return x @ weight.T + bias


class _Slices(tuple):
    """One activation of the split-batch training view: slices of the batch, one per CPU stream."""


class _BatchSplit(Forwarding):
    """The MLX CPU backend as training runs it (``Backend.for_training``): the batch split across
    the CPU streams.

    MLX runs a CPU stream's ops on one thread, and ResNet-20's step at batch 128 is thin GEMMs
    (16-64 channels) and memory-bound passes that gain nothing from a second BLAS thread. So each
    activation is held as slices of the batch (``_Slices``), every primitive runs per slice on
    that slice's stream (one BLAS thread each), train-mode BN adds the slices' partial sums into
    the whole batch's statistics, and the slices join at the global pool: the same function as
    the unsplit batch, computed on every core.
    """

    def __init__(self, backend: Backend):
        self._backend = backend  # the differentiated variant (Backend.for_gradients) each slice runs on
        self.name, self.device, self.dtype, self.threads = backend.name, backend.device, backend.dtype, backend.threads
        self.autodiff, self.group, self.sync_bn = backend.autodiff, backend.group, backend.sync_bn

    def _split(self, x) -> _Slices:
        if isinstance(x, _Slices):
            return x
        parts = min(self._backend.cpu_streams, x.shape[0])
        _set_blas_threads(max(1, cpu_cores() // parts))  # the slices' GEMMs run side by side
        return _Slices(mx.split(x, [x.shape[0] * i // parts for i in range(1, parts)], axis=0))

    def _each(self, primitive: str, x, *args, other=None):
        """``primitive(slice of x[, slice of other], *args)`` for each slice, on the slice's stream."""
        activations = [self._split(x)] if other is None else [self._split(x), self._split(other)]
        function = getattr(self._backend, primitive)
        streams = self._backend._streams()
        return _Slices(kernels.on_streams(streams, lambda *parts: function(*parts, *args), *activations))

    def call_primitive(self, primitive: str, x, *args):
        return self._each(primitive, x, *args)

    def add(self, x, y):
        return self._each("add", x, other=y)

    def global_avg_pool(self, x):
        return mx.concatenate(self._each("global_avg_pool", x), axis=0)  # (N, C): the slices end here

    def linear(self, x, weight, bias):
        return self._backend.linear(mx.concatenate(x, axis=0) if isinstance(x, _Slices) else x, weight, bias)

    def batch_norm_train(self, x, weight, bias, eps):
        return self._backend.batch_norm_train(self._split(x), weight, bias, eps)  # statistics over every slice

    def cross_entropy(self, logits, targets):
        return self._backend.cross_entropy(logits, targets)


# -- data parallel: this process as one rank of a group (portres.training.replicas) -------------------


class ProcessGroup:
    """This process's place in the group ``mlx.launch``/``mpirun`` started, on ``mx.distributed`` (ring
    over TCP, MPI, NCCL, JACCL), and the collectives data-parallel training needs.

        >>> group = ProcessGroup(launcher)           # under mlx.launch -n 2 (MLX_RANK, MLX_HOSTFILE)
        >>> group.sum_host(np.array([1.0]))          # array([2.])
    """

    BACKENDS = {"mlx.launch (ring)": "ring", "portres --processes": "ring", "mpirun": "mpi",
                "mlx.launch (nccl)": "nccl", "mlx.launch (jaccl)": "jaccl"}

    def __init__(self, launcher, *, timeout_s: float | None = None, device: str | None = None):
        import mlx.nn

        self._average = mlx.nn.average_gradients
        backend = self.BACKENDS.get(launcher.name, "any")
        try:
            self.group = mx.distributed.init(strict=True, backend=backend)
        except RuntimeError as error:
            text = str(error)
            if "bind" in text.lower():
                where = launcher.address or "its address"
                raise RuntimeError(f"rank {launcher.rank} cannot listen on {where}: the port "
                                   "is in use (another program, or a run that has not ended): start with another "
                                   "port (mlx.launch --starting-port P; portres --port P)") from None
            raise RuntimeError(f"MLX's {backend} backend did not start under {launcher.name} ({text}); "
                               "see docs/distributed.md") from None
        self.rank, self.size = self.group.rank(), self.group.size()
        self.name = f"mx.distributed {backend}"

        @mx.custom_function
        def all_sum(x):
            return mx.distributed.all_sum(x, group=self.group)

        @all_sum.vjp
        def all_sum_vjp(primals, cotangent, output):
            # every rank's loss depends on every rank's input through the sum: the input's gradient is
            # the sum of all ranks' cotangents (MLX's own all_sum passes only the local one back)
            return mx.distributed.all_sum(cotangent, group=self.group)

        self.all_sum = all_sum  # differentiable sum over the ranks (sync BN)

    def local_device(self, device: str | None) -> str | None:
        return device  # mlx.launch gives each rank its GPU (CUDA_VISIBLE_DEVICES); on Apple silicon there is one

    def all_reduce_mean(self, tree: dict) -> dict:
        """The mean over the ranks of every array in ``tree``: ``mlx.nn.average_gradients`` (arrays packed
        into few large all-reduces)."""
        # a list, not the dict: MLX's tree utilities would read the dots in "layer1.0.conv1.weight" as nesting
        return dict(zip(tree, self._average(list(tree.values()), group=self.group)))

    def sum_host(self, values: np.ndarray) -> np.ndarray:
        out = mx.distributed.all_sum(mx.array(values, dtype=mx.float64), group=self.group, stream=mx.cpu)
        return np.array(out)

    def broadcast(self, data: np.ndarray) -> np.ndarray:
        """Rank 0's bytes on every rank (the others pass zeros): a sum of uint8, exact bit for bit."""
        out = mx.distributed.all_sum(mx.array(data, dtype=mx.uint8), group=self.group, stream=mx.cpu)
        return np.array(out)

    @staticmethod
    def lost_peer(error: BaseException) -> bool:
        text = str(error).lower()
        return isinstance(error, RuntimeError) and any(mark in text for mark in ("[ring]", "[mpi]", "[nccl]",
                                                                                 "[jaccl]", "peer", "connection"))

    def close(self) -> None:
        pass  # MLX has no call to leave a group; the sockets close with the process

    # -- starting ranks on this machine (portres train --processes N: portres.training.launch) --

    SHARES_PORTS = True  # the ring binds its port with SO_REUSEPORT: the launcher's hold on it must allow that

    @staticmethod
    def ports_needed(processes: int) -> int:
        """Loopback ports ``processes`` local ranks listen on: one each (the ring)."""
        return processes

    @staticmethod
    def serve_rendezvous(held: list, processes: int) -> None:
        """Nothing to serve: ring ranks find each other through the hostfile."""
        return None

    @staticmethod
    def launch_environments(processes: int, ports: list[int], workdir, threads: int, host: str) -> list[dict]:
        """What ``mlx.launch`` (ring) sets for each of ``processes`` ranks on ``host``: a hostfile of their
        addresses (written to ``workdir``) and MLX_RANK. ``threads`` is unused: each rank's BLAS takes the
        cores the launcher gives it.

            >>> ProcessGroup.launch_environments(2, [4001, 4002], Path("/tmp"), 1, "127.0.0.1")[1]
            {'MLX_HOSTFILE': '/tmp/hostfile.json', 'MLX_RANK': '1'}
        """
        import json
        from pathlib import Path

        hostfile = Path(workdir) / "hostfile.json"  # the ring backend's format: one list of addresses per rank
        hostfile.write_text(json.dumps([[f"{host}:{port}"] for port in ports]))
        return [{"MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(rank)} for rank in range(processes)]
