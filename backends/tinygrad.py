"""tinygrad lowering: NCHW Tensors on any tinygrad device, forward captured by TinyJit."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import os
import shutil
import threading
import warnings
from dataclasses import dataclass

import numpy as np

from ._space_to_depth import space_to_depth
from .base import AbstractBackend

try:
    from tinygrad import Context, Device, GlobalCounters, Tensor, TinyJit, dtypes
    from tinygrad.device import ALL_DEVICES
    from tinygrad.helpers import BEAM, DEV
except ImportError as error:  # pragma: no cover - guarded by backends.unavailable_reason
    raise ImportError(f"the tinygrad backend needs tinygrad: pip install 'portres[tinygrad]' ({error})") from None

NAME = "tinygrad"
FOLD_BATCH_NORM = True  # one conv kernel with a bias instead of conv + a BN pass
DTYPES = {"float32": dtypes.float32, "float16": dtypes.float16, "bfloat16": dtypes.bfloat16, "float64": dtypes.float64}


# tinygrad devices that are not the host CPU (CL is either: see opencl_device)
ACCELERATORS = ("METAL", "AMD", "NV", "CUDA", "QCOM", "WEBGPU")
# On a CPU-only machine, pocl's OpenCL CPU device (every core) ran every steady-state pass measured 1.4-1.9x
# faster than tinygrad's CPU device (one worker thread): ResNet-50 b16 4.37 vs 2.72 img/s, ResNet-20 8x8 b64
# 4199 vs 2862, its training step at b128 59.5 vs 35.1. Its compiles of inference graphs take as long (9.2 vs
# 8.9 s), of training steps twice as long (54 vs 24 s): training whose steps are smaller than this stays on the
# CPU device, where a short run (digits: ResNet-20 at 8x8) is over before the faster steps repay the compiles.
# Measured on a 2-core Xeon (AVX-512): benchmarks/perf_log.md, "tinygrad on OpenCL".
CL_MIN_TRAINING_MACS_PER_STEP = 2e9
# BEAM on pocl's CPU device: the search times each candidate kernel alone, and those times did not predict the
# kernels' speed in the network: ResNet-20 32x32 b16 after a 28-minute search ran at 0.63-0.66x of tinygrad's
# hand-coded kernels (0.73x timing candidates at full size); on tinygrad's CPU device BEAM bought 1.7x (ResNet-50).
BEAM_ON_OPENCL_CPU = ("tinygrad's BEAM search on an OpenCL CPU device (pocl) chose slower kernels than tinygrad's "
                      "own in portres's measurements (ResNet-20: 0.65x after a 28-minute search; BENCHMARKS.md); "
                      "for BEAM on this machine use --device CPU")


class BeamSearchWarning(RuntimeWarning):
    """A BEAM search that is expected to cost time without making kernels faster."""


def devices() -> list[str]:
    return list(Device.get_available_devices())


@dataclass(frozen=True)
class OpenCLDevice:
    """What an OpenCL device is, as its driver reports it (``portres backends`` prints it)."""
    platform: str  # e.g. "Portable Computing Language" (pocl)
    version: str  # the platform's version line
    name: str  # the device, e.g. "pthread-skylake-avx512-Intel(R) Xeon(R) Processor"
    kind: str  # "CPU", "GPU" or "accelerator"
    compute_units: int  # CL_DEVICE_MAX_COMPUTE_UNITS: cores for a CPU device
    float64: bool  # cl_khr_fp64
    float16: bool  # cl_khr_fp16

    def describe(self) -> str:
        precisions = ", ".join(["float32"] + ["float64"] * self.float64 + ["float16"] * self.float16)
        return (f"{self.platform} ({self.version.split('  ')[0]}): {self.name}, {self.kind}, "
                f"{self.compute_units} compute units, {precisions}")


@functools.cache
def opencl_device(device: str = "CL") -> OpenCLDevice | None:
    """The OpenCL device tinygrad's ``device`` opens, or ``None`` where there is no usable one."""
    import ctypes

    try:
        from tinygrad.runtime.autogen import opencl as cl

        opened = Device[device]
        kind, units, platform = ctypes.c_uint64(), ctypes.c_uint32(), cl.cl_platform_id()
        cl.clGetDeviceInfo(opened.cl_dev, cl.CL_DEVICE_TYPE, 8, ctypes.byref(kind), None)
        cl.clGetDeviceInfo(opened.cl_dev, cl.CL_DEVICE_MAX_COMPUTE_UNITS, 4, ctypes.byref(units), None)
        cl.clGetDeviceInfo(opened.cl_dev, cl.CL_DEVICE_PLATFORM, ctypes.sizeof(platform), ctypes.byref(platform), None)

        def platform_text(what) -> str:
            text = ctypes.create_string_buffer(512)
            cl.clGetPlatformInfo(platform, what, 512, text, None)
            return text.value.decode(errors="replace")

        kinds = {cl.CL_DEVICE_TYPE_CPU: "CPU", cl.CL_DEVICE_TYPE_GPU: "GPU"}
        return OpenCLDevice(platform_text(cl.CL_PLATFORM_NAME), platform_text(cl.CL_PLATFORM_VERSION),
                            opened.device_name, kinds.get(kind.value, "accelerator"), units.value,
                            "cl_khr_fp64" in opened.device_exts, "cl_khr_fp16" in opened.device_exts)
    except Exception:  # noqa: BLE001 - no OpenCL library, no ICD, no device: all mean "none here"
        return None


@functools.cache
def _tinygrad_default() -> str:
    """tinygrad's own default device (its first usable one, or DEV=...), without the DEV it writes into
    os.environ for child processes: there it would read as the user's choice and pin portres's."""
    before = os.environ.get("DEV")
    try:
        return Device.DEFAULT
    finally:
        if before is None:
            os.environ.pop("DEV", None)


def default_device(training_macs_per_step: float | None = None) -> str:
    """The device portres runs tinygrad on when none is given: the user's ``DEV=...``; else a GPU where
    there is one; else, on a CPU-only machine, an OpenCL CPU device (pocl: every core) for inference and for
    training steps of ``training_macs_per_step`` >= CL_MIN_TRAINING_MACS_PER_STEP multiply-adds, and
    tinygrad's CPU device (one worker thread, but half the compile time of a training step) for smaller steps.

        >>> default_device(), default_device(3 * 64 * 2.6e6)    # with pocl, no GPU: inference; digits training
        ('CL', 'CPU')
    """
    chosen = _tinygrad_default()
    if DEV.device or chosen.split(":")[0] not in ("CL", "CPU"):
        return chosen
    opencl = opencl_device() if chosen.startswith("CL") else None
    if opencl is None or opencl.kind != "CPU":
        return chosen  # tinygrad's CPU device, or an OpenCL GPU
    if shutil.which("clang") is None:
        return chosen  # tinygrad's CPU device compiles with clang
    small = training_macs_per_step is not None and training_macs_per_step < CL_MIN_TRAINING_MACS_PER_STEP
    return "CPU" if small or opencl.compute_units < 2 else chosen


def info() -> dict:
    record = {"framework": f"tinygrad {importlib.metadata.version('tinygrad')}", "devices": devices(),
              "default_device": default_device(),
              "default_device_rule": (f"{default_device(0)} for training steps under "
                                      f"{CL_MIN_TRAINING_MACS_PER_STEP:.0e} multiply-adds"
                                      if default_device(0) != default_device() else None)}
    if (opencl := opencl_device()) is not None:
        record["opencl"] = opencl.describe()
    return record


def _open_device(device: str | None) -> str:
    name = Device.canonicalize(device if device is not None else default_device())
    if name.split(":")[0] not in ALL_DEVICES:
        raise ValueError(f"unknown tinygrad device {device!r}; tinygrad knows {', '.join(ALL_DEVICES)}")
    try:
        Device[name]
    except Exception as error:  # noqa: BLE001 - tinygrad raises many kinds here; all mean "not usable"
        raise ValueError(f"tinygrad device {name} is not usable here ({type(error).__name__}: {error}); "
                         f"usable: {', '.join(devices()) or 'none'}") from None
    return name


@contextlib.contextmanager
def _quiet_stderr():
    """Silence fd 2: a failing probe compile would spray compiler errors on the terminal."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@functools.cache
def _dtype_problem(device: str, dtype: str) -> str | None:
    """Compile and run a tiny cast on ``device``: renderers claim dtypes their compiler lacks
    (Debian 12's clang 14 rejects x86 ``__bf16``)."""
    try:
        with _quiet_stderr():
            stored = Tensor([1.5, -2.0], device=device).cast(DTYPES[dtype]).realize()  # a real buffer of dtype
            (stored * 2).cast(dtypes.float32).numpy()
    except Exception as error:  # noqa: BLE001 - any failure means the dtype is unusable here
        text = str(error).splitlines()[0][:200]
        return f"tinygrad device {device} cannot compute in {dtype} here ({type(error).__name__}: {text})"
    return None


# tinygrad's settings (Context(WINO=...), the JIT's ALLOW_DEVICE_USAGE) are process-wide globals, so two
# threads running tinygrad at once see each other's ("usage of device CPU disallowed"): Model serialises
# calls through this lock, which makes a model usable from any thread.
LOCK = threading.RLock()


def realized(out):
    """A forward's result (one tensor or a tuple of them, e.g. stage outputs) computed, as it came."""
    if isinstance(out, tuple):
        Tensor.realize(*out)
        return out
    return out.realize()


class Backend(AbstractBackend):
    """tinygrad Tensors (NCHW). ``winograd``: 3x3 stride-1 convs by Winograd (default: not in float16 or
    bfloat16); ``strided_convs_to_depth``: strided convs over the space-to-depth input (for gradients)."""

    name = NAME
    autodiff = True
    lock = LOCK

    def __init__(self, device: str | None = None, dtype: str | None = None, winograd: bool | None = None, *,
                 strided_convs_to_depth: bool = False):
        self.device = _open_device(device)
        # tinygrad 0.14's CPU runtime runs its kernels one after another on one worker thread, however
        # many cores there are (a train step's process CPU time equals its wall time); OpenCL CPU devices
        # (pocl) spread each kernel's work-groups over every core
        opencl = opencl_device(self.device) if self.device.startswith("CL") else None
        self.threads = ("1 CPU worker thread" if self.device.startswith("CPU") else
                        f"OpenCL {opencl.kind} device, {opencl.compute_units} compute units" if opencl else "device")
        self.dtype = dtype or "float32"
        if self.dtype not in DTYPES:
            raise ValueError(f"tinygrad backend dtypes are {', '.join(DTYPES)}, not {self.dtype!r}")
        self._dtype = DTYPES[self.dtype]
        # Winograd 3x3 convs (tinygrad's WINO); by default not in float16/bfloat16, where its transforms cost ten
        # times the precision (resnet20 in float16: a conv alone off by 4e-3 instead of 2e-4, a stage by 4.9e-3
        # instead of 4.6e-4 - as far off as a primitive off by 1%)
        self.winograd = self.dtype not in ("float16", "bfloat16") if winograd is None else winograd
        self.strided_convs_to_depth = strided_convs_to_depth  # see _space_to_depth_conv
        self._host_dtype = np.float64 if self.dtype == "float64" else np.float32  # NumPy side of transfers
        if self._dtype not in Device[self.device].renderer.supported_dtypes():
            raise ValueError(f"tinygrad device {self.device} cannot compute in {self.dtype} (its renderer lacks it: "
                             f"OpenCL needs cl_khr_fp16 for float16); use float32")
        if self.dtype != "float32" and (problem := _dtype_problem(self.device, self.dtype)):
            hint = ""
            if self.dtype == "bfloat16":
                hint = "; on CPU, bfloat16 needs a clang whose x86 target has __bf16 (clang 14 lacks it)"
            raise ValueError(f"{problem}; use float32 or float16{hint}")

    @classmethod
    def default_device(cls, training_macs_per_step: float | None = None) -> str:
        return default_device(training_macs_per_step)

    @property
    def accelerator(self) -> bool:
        kind = self.device.split(":")[0]
        opencl = opencl_device(self.device) if kind == "CL" else None
        return kind in ACCELERATORS or (opencl is not None and opencl.kind != "CPU")

    def options(self) -> dict:
        return {"device": self.device, "dtype": self.dtype, "winograd": self.winograd,
                "strided_convs_to_depth": self.strided_convs_to_depth}

    def search_kernels(self, beam: int) -> None:
        """tinygrad's BEAM search, ``beam`` wide, for the kernels compiled from now on in this process
        (its results are cached on disk); 0: off. As the environment variable BEAM, which tinygrad reads
        when it is imported. On an OpenCL CPU device (pocl) it warns first: there the search chose slower
        kernels than tinygrad's own (BEAM_ON_OPENCL_CPU)."""
        opencl = opencl_device(self.device) if self.device.split(":")[0] == "CL" else None
        if beam and opencl is not None and opencl.kind == "CPU":
            warnings.warn(BEAM_ON_OPENCL_CPU, BeamSearchWarning, stacklevel=2)
        BEAM.value = beam

    # -- arrays and parameters --

    def from_numpy(self, x: np.ndarray) -> Tensor:
        return Tensor(np.ascontiguousarray(x, dtype=self._host_dtype), device=self.device).cast(self._dtype).realize()

    def to_numpy(self, x: Tensor) -> np.ndarray:
        return x.numpy() if x.dtype == dtypes.float64 else x.cast(dtypes.float32).numpy()

    def load_params(self, plan, params: dict) -> dict:
        return {name: self.from_numpy(value) for name, value in params.items()}

    def compile(self, forward):
        # TinyJit replays kernels for one input shape, so keep one capture per shape.
        captures: dict[tuple, TinyJit] = {}

        def run(params, x: Tensor) -> Tensor:
            key = (x.shape, x.dtype)
            if key not in captures:
                captures[key] = TinyJit(lambda image: realized(forward(params, image)))
            return captures[key](x)

        return run

    def realize(self, x: Tensor) -> Tensor:
        return x.realize()

    def end_block(self, x: Tensor) -> Tensor:
        # schedule block by block: tinygrad's scheduler is superlinear in graph depth, so one
        # lazy graph for a whole network made resnet110's first call 75 s and resnet1202's endless
        return x.realize()

    def synchronize(self) -> None:
        Device[self.device].synchronize()

    def memory(self) -> dict:
        # tinygrad counts live device buffers, not a peak: this is what the model holds after a pass
        in_use = GlobalCounters.mem_used_per_device.get(self.device, GlobalCounters.mem_used)
        return {"device_memory_in_use_bytes": in_use}

    # -- primitives (NCHW) --

    def conv2d(self, x, weight, bias, stride, padding, groups):
        kernel = weight.shape[2]
        if stride > 1 and kernel == 1 and padding == 0:
            # subsample first (one cheap copy): the strided 1x1 read its input at 12 GFLOP/s
            x, stride = x[:, :, ::stride, ::stride].contiguous(), 1
        if stride > 1 and groups == 1 and self.strided_convs_to_depth:
            return self._space_to_depth_conv(x, weight, bias, stride, padding)
        # Winograd F(4x4, 3x3) for stride-1 3x3 convs: ~4x fewer multiplies; on CPU ResNet-18
        # goes 3.8 -> 9.3 images/s, ResNet-50 1.8 -> 2.6, parity unchanged (1e-6)
        with Context(WINO=int(self.winograd)):
            return x.conv2d(weight, bias, groups=groups, stride=stride, padding=padding)

    def _space_to_depth_conv(self, x, weight, bias, stride, padding):
        # strided convs as stride-1 convs over the space-to-depth input (backends/_space_to_depth.py):
        # differentiated, tinygrad's strided conv made two weight-gradient kernels that ran at 2-3
        # GFLOP/s and took 2 of resnet20's 7.6 s per step (DEBUG=2)
        n, c, h, w = x.shape
        out_channels, kernel = weight.shape[0], weight.shape[2]
        g = space_to_depth(h, w, kernel=kernel, stride=stride, padding=padding)
        x = x.pad((padding, g.pad_right, padding, g.pad_bottom))[:, :, :g.blocks_h * stride, :g.blocks_w * stride]
        z = x.reshape(n, c, g.blocks_h, stride, g.blocks_w, stride).permute(0, 3, 5, 1, 2, 4)
        z = z.reshape(n, stride * stride * c, g.blocks_h, g.blocks_w)
        grow = g.grown_kernel - kernel
        weight = weight.pad((0, grow, 0, grow))
        weight = weight.reshape(out_channels, c, g.taps, stride, g.taps, stride).permute(0, 3, 5, 1, 2, 4)
        return z.conv2d(weight.reshape(out_channels, -1, g.taps, g.taps), bias)

    def batch_norm(self, x, weight, bias, mean, var, eps):
        scale = weight * (var + eps).rsqrt()
        return x * scale.reshape(1, -1, 1, 1) + (bias - mean * scale).reshape(1, -1, 1, 1)

    def channel_affine(self, x, scale, shift):
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    # -- training --

    def batch_norm_train(self, x, weight, bias, eps):
        count = x.shape[0] * x.shape[2] * x.shape[3]
        mean = x.mean(axis=(0, 2, 3))
        centered = x - mean.reshape(1, -1, 1, 1)
        var = (centered * centered).mean(axis=(0, 2, 3))
        scale = weight * (var + eps).rsqrt()
        return centered * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1), mean, var * (count / (count - 1))

    def cross_entropy(self, logits, targets):
        return -(targets * logits.log_softmax(axis=1)).sum(axis=1).mean()

    def compile_train_step(self, step):
        """``step(state, ...)`` under TinyJit. The JIT replays kernels on fixed buffers, so the state
        lives in the tensors of the first ``state`` passed and every step assigns into them; the
        returned loss and logits are overwritten by the next step (read them first)."""
        jitted, bound = None, None

        def run(state, images, targets, lr, count):
            nonlocal jitted, bound
            if bound is not state:
                bound = state

                def captured(images, targets, lr, count):
                    new_state, loss, logits = step(bound, images, targets, lr, count)
                    for name, value in new_state.items():
                        bound[name].assign(value)
                    Tensor.realize(*bound.values(), loss, logits)
                    return loss, logits

                jitted = TinyJit(captured)
            with self.lock:
                loss, logits = jitted(images, targets, self._scalar(lr), self._scalar(count))
            return state, loss, logits

        return run

    def _scalar(self, value) -> Tensor:
        """A 0-d tensor in a buffer of its own: the JIT takes no constants as inputs."""
        # clone() without a device puts a constant's copy on tinygrad's default device (CL with pocl)
        return Tensor(value, dtype=self._dtype, device=self.device).clone(device=self.device).realize()

    def data_parallel(self, devices: tuple[str, ...], *, sync_bn: bool = False) -> ReplicatedBackend:
        """This backend replicated over ``devices`` in one process (see :class:`ReplicatedBackend`): tinygrad's
        replicas are devices, not processes."""
        return ReplicatedBackend(devices, dtype=self.dtype, winograd=self.winograd, sync_bn=sync_bn,
                                 strided_convs_to_depth=self.strided_convs_to_depth)

    def value_and_grad(self, loss_fn):
        """``loss_fn(trainable) -> (loss, aux)`` -> ``f(trainable) -> (loss, aux, grads)`` by tinygrad's autograd.
        (No graph may be realised inside ``loss_fn``: a realised tensor is a leaf to tinygrad.)"""
        def run(trainable: dict):
            loss, aux = loss_fn(trainable)
            grads = loss.gradient(*trainable.values())
            # one schedule for everything: realised one by one, each would re-run the shared forward graph
            Tensor.realize(loss, *aux.values(), *grads)
            return loss, aux, dict(zip(trainable, grads))

        return run

    def relu(self, x):
        # Tensor.relu is (x > 0).where(x, 0), which maps NaN to 0: a NaN input would give finite logits.
        # NaN stays NaN here, and the gradient at 0 stays 0 (PyTorch's convention).
        # Realised: otherwise the next conv recomputes (BN-)ReLU inside its reduce loop.
        return (x > 0).where(x, (x != x).where(x, 0)).contiguous()

    def max_pool(self, x, kernel_size, stride, padding):
        window = ((kernel_size, kernel_size), stride)
        pooled = x.max_pool2d(*window, padding=padding)
        # tinygrad's max reduce skips NaN; the reference (and torch) return NaN for a window holding one
        holds_nan = (x != x).cast(x.dtype).max_pool2d(*window, padding=padding) > 0
        return holds_nan.where(float("nan"), pooled)

    def for_gradients(self) -> Backend:
        """This backend as training differentiates it: without Winograd, whose transforms' gradients
        add kernels (resnet20's step: 715 -> 494 kernels; first call 241 -> 165 s, steps no slower), and
        strided convs over the space-to-depth input (see _space_to_depth_conv)."""
        return self.variant(winograd=False, strided_convs_to_depth=True)

    def for_nonfinite_input(self) -> Backend:
        """This backend without Winograd: its 6x6 input tiles spread one NaN/inf over a 4x4 output tile,
        so the reference's NaN/inf pattern is only matched by direct convs (``Model`` switches per call)."""
        return self.variant(winograd=False) if self.winograd else self

    def zero_pad(self, x, padding):
        return x.pad((None, None, (padding, padding), (padding, padding)))

    def avg_pool(self, x, kernel_size, stride):
        return x.avg_pool2d((kernel_size, kernel_size), stride=stride, ceil_mode=True, count_include_pad=False)

    def subsample(self, x, stride):
        return x[:, :, ::stride, ::stride]

    def pad_channels(self, x, before, after):
        return x.pad((None, (before, after), None, None))

    def add(self, x, y):
        # realise the shortcut: fused into the block's last conv, a projection ran at 4 GFLOP/s
        return x + y.contiguous()

    def global_avg_pool(self, x):
        return x.mean(axis=(2, 3))

    def linear(self, x, weight, bias):
        return x.linear(weight.T, bias)


class ReplicatedBackend(Backend):
    """Data parallel on tinygrad's multi-device tensors, in one process: parameters and optimiser state
    replicated on every device, each batch sharded along its first axis (``Tensor.shard``). Differentiating
    the replicated parameters through the sharded batch, tinygrad all-reduces their gradients itself, and
    the loss (a mean over the global batch) then has the replicas' mean gradient: ``all_reduce_mean`` has
    nothing left to do. Batch norm uses each replica's own statistics (as torch DDP), or with ``sync_bn``
    the global batch's (a mean over a sharded axis is tinygrad's cross-device reduce).

        >>> lowering = Backend().data_parallel(("CPU:0", "CPU:1"))
        >>> lowering.from_numpy(np.zeros((8, 3, 32, 32))).device     # ('CPU', 'CPU:1')
    """

    def __init__(self, devices: tuple[str, ...], dtype: str | None = None, winograd: bool | None = None,
                 sync_bn: bool = False, *, strided_convs_to_depth: bool = False):
        super().__init__(devices[0], dtype, winograd, strided_convs_to_depth=strided_convs_to_depth)
        self.requested_devices = tuple(devices)  # as given (reports), for variants
        self.devices = tuple(_open_device(device) for device in devices)
        if len(set(self.devices)) != len(self.devices):
            raise ValueError(f"tinygrad devices {', '.join(devices)} name one device twice (tinygrad calls them "
                             f"{', '.join(self.devices)}): give each replica its own device")
        self.device = ",".join(devices)  # for reports; tinygrad calls below use self.devices
        self.sync_bn = sync_bn  # sums over tinygrad's devices, not a process group's ranks

    def options(self) -> dict:
        return {"devices": self.requested_devices, "dtype": self.dtype, "winograd": self.winograd,
                "sync_bn": self.sync_bn, "strided_convs_to_depth": self.strided_convs_to_depth}

    def from_numpy(self, x: np.ndarray) -> Tensor:
        """A batch sharded along its first axis when it divides among the devices, else replicated (an
        evaluation batch at the end of a test set): either way every device computes its part."""
        single = Tensor(np.ascontiguousarray(x, dtype=self._host_dtype), device=self.devices[0]).cast(self._dtype)
        divides = single.ndim >= 1 and single.shape[0] >= len(self.devices) and single.shape[0] % len(self.devices) == 0
        return single.shard(self.devices, axis=0 if divides else None).contiguous().realize()

    def load_params(self, plan, params: dict) -> dict:
        return {name: self._replicated(value) for name, value in params.items()}

    def _replicated(self, value) -> Tensor:
        single = Tensor(np.ascontiguousarray(value, dtype=self._host_dtype), device=self.devices[0]).cast(self._dtype)
        return single.shard(self.devices).contiguous().realize()

    def _scalar(self, value) -> Tensor:
        return self._replicated(np.array([value])).reshape(())  # a replicated constant is no buffer for the JIT

    def synchronize(self) -> None:
        for device in self.devices:
            Device[device].synchronize()

    def memory(self) -> dict:
        return {"device_memory_in_use_bytes": sum(GlobalCounters.mem_used_per_device.get(device, 0)
                                                  for device in self.devices)}

    # all_reduce_mean stays the base's identity: the gradients are reduced already, by tinygrad's autograd
    # through the sharded batch (see the class)

    def batch_norm_train(self, x, weight, bias, eps):
        replicas = len(self.devices)
        if self.sync_bn or replicas == 1:
            return super().batch_norm_train(x, weight, bias, eps)
        n, c, h, w = x.shape
        grouped = x.reshape(replicas, n // replicas, c, h, w)  # axis 0 = the device: each keeps its rows
        count = n // replicas * h * w
        mean = grouped.mean(axis=(1, 3, 4))  # (replicas, C): each replica's own batch
        centered = grouped - mean.reshape(replicas, 1, c, 1, 1)
        var = (centered * centered).mean(axis=(1, 3, 4))
        scale = weight.reshape(1, c) * (var + eps).rsqrt()
        y = centered * scale.reshape(replicas, 1, c, 1, 1) + bias.reshape(1, 1, c, 1, 1)
        # the running statistics follow the replicas' mean (what averaging them at a checkpoint gives)
        return y.reshape(n, c, h, w), mean.mean(axis=0), (var * (count / (count - 1))).mean(axis=0)

    def replica_hashes(self, state: dict) -> list[str]:
        """SHA-256 of each device's own copy of ``state`` (read from its buffer, not gathered)."""
        digests = [hashlib.sha256() for _ in self.devices]
        for name in sorted(state):
            buffers = state[name].contiguous().realize().uop.base.realized
            copies = buffers.bufs if hasattr(buffers, "bufs") else [buffers] * len(self.devices)
            for digest, buffer in zip(digests, copies):
                digest.update(f"{name}|".encode())
                digest.update(bytes(buffer.as_memoryview()))
        return [digest.hexdigest() for digest in digests]
