"""Steady-state forward-pass benchmarks, one child process per backend.

Each backend runs in its own process so that memory peaks, thread pools and BLAS
libraries do not leak between backends (MLX must load OpenBLAS before anything else
loads a BLAS). The parent only validates arguments, measures the CPU's sgemm peak and
collects one JSON record per backend::

    >>> from portres import bench
    >>> record = bench.run_in_subprocess(bench.BenchConfig("mlx", portres.get("resnet18").to_dict(), batch=2,
    ...                                                    input_size=64, iters=3))
    >>> record["images_per_s"] > 0
    True

Command line: ``portres bench --backend mlx --depth 50``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
import traceback

import numpy as np

GPU_DEVICES = ("gpu", "cuda", "metal", "mps", "cl", "amd", "nv")


def default_batch(device: str | None) -> int:
    """16 on CPUs (enough to amortise per-call overhead), 64 on GPUs."""
    return 64 if device and device.lower().split(":")[0] in GPU_DEVICES else 16


@dataclasses.dataclass
class BenchConfig:
    backend: str  # backend name
    spec: dict  # ResNetSpec.to_dict()
    device: str | None = None  # backend device; None: the framework's default
    batch: int = 16  # images per forward pass
    input_size: int = 224  # square input side
    dtype: str | None = None  # compute dtype; None: the backend's default
    warmup: int = 2  # untimed passes after the first call (TinyJit captures on the 2nd)
    iters: int = 10  # timed passes
    seed: int = 0  # weights and input seed
    beam: int = 0  # tinygrad BEAM search width (0: off)
    profile: bool = False  # also time each op kind, op by op (synchronised after every op)


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024  # Linux reports KiB


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


class _Progress:
    """Progress on stderr once a run has taken more than a few seconds."""

    def __init__(self, label: str):
        self.label, self.start, self.shown = label, time.perf_counter(), False
        self.tty = sys.stderr.isatty()

    def __call__(self, message: str, final: bool = False) -> None:
        if time.perf_counter() - self.start < 3 and not self.shown:
            return
        self.shown = True
        if self.tty:
            end = "\n" if final else ""
            sys.stderr.write(f"\r\033[K[{self.label}] {message}{end}")
        else:
            sys.stderr.write(f"[{self.label}] {message}\n")
        sys.stderr.flush()


def op_label(op) -> str:
    """Group ops for profiles: conv2d by kernel/stride/groups, everything else by kind."""
    layer = op.layer
    if op.kind == "conv2d":
        extra = f"/{layer.stride}" if layer.stride > 1 else ""
        grouped = " grouped" if layer.groups > 1 else ""
        return f"conv2d {layer.kernel_size}x{layer.kernel_size}{extra}{grouped}"
    return op.kind


def profile_ops(model, x_on_device, batch: int, input_size: int) -> list[dict]:
    """Time every op on its own (realised and synchronised after each), summed per op label.

    Two passes; the second is reported, so one-off kernel compilation is not counted.
    """
    for _ in range(2):
        profile = _profile_pass(model, x_on_device, batch, input_size)
    return profile


def _profile_pass(model, x_on_device, batch: int, input_size: int) -> list[dict]:
    from .analysis import summary
    from .plan import INPUT, apply_op

    backend, plan = model.backend, model.plan
    macs_of = {row.name: row.macs for row in summary(plan, input_size).rows}
    values, seconds, macs = {INPUT: x_on_device}, {}, {}
    last_use = plan.last_uses()
    for index, op in enumerate(plan.ops):
        args = [values[name] for name in op.inputs]
        start = time.perf_counter()
        values[op.output] = backend.realize(apply_op(backend, op, args, model.params))
        backend.synchronize()
        label = op_label(op)
        seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - start
        macs[label] = macs.get(label, 0) + macs_of[op.name]
        for name in set(op.inputs):
            if last_use[name] == index:
                del values[name]
    total = sum(seconds.values())
    return [{"op": label, "seconds": t, "share": t / total,
             "gflop_per_s": 2 * macs[label] * batch / t / 1e9 if macs[label] else 0.0}
            for label, t in sorted(seconds.items(), key=lambda item: -item[1])]


def run_benchmark(config: BenchConfig) -> dict:
    """Build, time and describe one backend in this process (the child's job)."""
    if config.beam and config.backend == "tinygrad":
        os.environ["BEAM"] = str(config.beam)  # read when tinygrad is imported
    from . import backends
    from .analysis import summary
    from .model import build
    from .spec import ResNetSpec

    spec = ResNetSpec.from_dict(config.spec)
    progress = _Progress(f"{config.backend} {spec.name} batch {config.batch}")
    module = backends.load(config.backend, config.device)
    rss_start = _peak_rss_bytes()
    started = time.perf_counter()
    model = build(spec, config.backend, device=config.device, dtype=config.dtype, seed=config.seed)
    build_s = time.perf_counter() - started
    backend = model.backend
    rng = np.random.default_rng(config.seed)
    images = rng.standard_normal((config.batch, spec.in_channels, config.input_size, config.input_size))
    x = backend.from_numpy(model.check_input(images.astype(np.float32)))

    def timed_pass() -> tuple[float, object]:
        start = time.perf_counter()
        out = backend.realize(model.forward(x))
        backend.synchronize()
        return time.perf_counter() - start, out

    progress("first call (compile / JIT capture) ...")
    first_call_s, out = timed_pass()
    for i in range(config.warmup):
        progress(f"first call {first_call_s:.2f} s; warm-up {i + 1}/{config.warmup}")
        timed_pass()
    latencies = []
    for i in range(config.iters):
        elapsed, out = timed_pass()
        latencies.append(elapsed)
        progress(f"first call {first_call_s:.2f} s; pass {i + 1}/{config.iters}: {elapsed * 1e3:.0f} ms")
    logits = backend.to_numpy(out)
    if logits.shape != (config.batch, spec.num_classes) or not np.all(np.isfinite(logits)):
        raise RuntimeError(f"{config.backend} produced {logits.shape} logits with NaN/inf: the timing is void")
    median = _percentile(latencies, 50)
    macs = summary(spec, config.input_size).macs
    info = module.info()
    record = {
        "network": spec.name, "backend": config.backend, "device": backend.device, "dtype": backend.dtype,
        "batch": config.batch, "input_size": config.input_size, "iters": config.iters, "warmup": config.warmup,
        "beam": config.beam, "images_per_s": config.batch / median, "latency_median_s": median,
        "latency_p90_s": _percentile(latencies, 90), "latency_min_s": min(latencies), "first_call_s": first_call_s,
        "build_s": build_s, "gmacs_per_image": macs / 1e9, "gflop_per_s": 2 * macs * config.batch / median / 1e9,
        "peak_rss_bytes": _peak_rss_bytes(), "rss_growth_bytes": _peak_rss_bytes() - rss_start, **backend.memory(),
        "framework": info["framework"], "blas": info.get("blas"), "threads": info.get("threads", os.cpu_count()),
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine(),
    }
    progress(f"{record['images_per_s']:.2f} images/s (median {median * 1e3:.0f} ms)", final=True)
    if config.profile:
        progress("profiling op by op ...")
        record["profile"] = profile_ops(model, x, config.batch, config.input_size)
    return record


# -- parent side --------------------------------------------------------------------------------


class BenchError(RuntimeError):
    """A backend's benchmark failed for a reason the user can fix (message says how)."""


def run_in_subprocess(config: BenchConfig, timeout: float | None = None) -> dict:
    """Run :func:`run_benchmark` in a fresh interpreter; returns its record or raises BenchError."""
    command = [sys.executable, "-m", "portres.bench", json.dumps(dataclasses.asdict(config))]
    try:
        child = subprocess.run(command, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{config.backend}: no result within {timeout:.0f} s; lower --iters or --batch") from None
    if child.returncode in (-9, 137):
        raise BenchError(f"{config.backend}: killed by the OS, most likely out of memory: lower --batch "
                         f"(now {config.batch}) or --input-size")
    lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise BenchError(f"{config.backend}: the benchmark process exited with status {child.returncode} "
                         "and no result (see the messages above)")
    record = json.loads(lines[-1])
    if "error" in record:
        raise BenchError(f"{config.backend}: {record['error']}")
    return record


def measure_sgemm_peak(size: int = 2048, repeats: int = 3) -> float:
    """GFLOP/s of NumPy's float32 matmul: a measured stand-in for the CPU's attainable peak."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((size, size), np.float32), rng.standard_normal((size, size), np.float32)
    a @ b
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def cpu_flags() -> str:
    """The SIMD flags that matter for these kernels, from /proc/cpuinfo (Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return platform.processor() or "unknown"
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
    return " ".join(f for f in wanted if f in flags) or "none of avx2/fma/avx512"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return platform.processor() or "unknown"


def _main(argv: list[str]) -> int:
    config = BenchConfig(**json.loads(argv[1]))
    try:
        record = run_benchmark(config)
    except MemoryError:
        record = {"error": f"out of memory at batch {config.batch}: lower --batch or --input-size"}
    except (ValueError, RuntimeError, KeyError) as error:
        record = {"error": str(error)}
        if not isinstance(error, ValueError):
            traceback.print_exc(file=sys.stderr)
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
