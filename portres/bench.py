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
import threading
import time
import traceback

import numpy as np

from .backends.base import Forwarding


def default_batch(accelerator: bool) -> int:
    """16 on CPUs (enough to amortise per-call overhead; OpenCL CPU devices too), 64 on GPUs."""
    return 64 if accelerator else 16


@dataclasses.dataclass
class BenchConfig:
    backend: str  # backend name
    spec: dict  # ResNetSpec.to_dict()
    device: str | None = None  # backend device; None: the framework's default
    batch: int | None = None  # images per forward pass; None: default_batch(whether the device is an accelerator)
    input_size: int = 224  # square input side
    dtype: str | None = None  # compute dtype; None: the backend's default
    warmup: int = 2  # untimed passes after the first call (TinyJit captures on the 2nd)
    iters: int = 10  # timed passes
    seed: int = 0  # weights and input seed
    beam: int = 0  # tinygrad BEAM search width (0: off)
    profile: bool = False  # also time each op kind, op by op (synchronised after every op)
    train: bool = False  # time training steps (forward, backward, SGD update) instead of inference
    processes: int = 1  # with train: data-parallel ranks on this machine (batch is per rank)


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024  # Linux reports KiB


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


class _Progress:
    """Progress on stderr once a run has taken more than a few seconds."""

    DELAY_S = 3.0

    def __init__(self, label: str):
        self.label, self.start, self.shown = label, time.perf_counter(), False
        self.tty = sys.stderr.isatty()
        self._timer = None

    def __call__(self, message: str, final: bool = False) -> None:
        self.cancel()
        if time.perf_counter() - self.start < self.DELAY_S and not self.shown:
            # a step that may run long: say what it is if it is still running after the delay
            self._timer = threading.Timer(self.DELAY_S, self._show, (message, False))
            self._timer.daemon = True
            self._timer.start()
            return
        self._show(message, final)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _show(self, message: str, final: bool) -> None:
        self.shown = True
        if self.tty:
            sys.stderr.write(f"\r\033[K[{self.label}] {message}" + ("\n" if final else ""))
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
    from .analysis import summary

    macs_of = {row.name: row.macs for row in summary(model.plan, input_size).rows}
    for _ in range(2):
        profile = _profile_pass(model, x_on_device, batch, macs_of)
    return profile


class _TimedPrimitives(Forwarding):
    """The backend's primitives, each realised, synchronised and timed under the current op's ``label``
    (seconds per label in ``seconds``)."""

    def __init__(self, backend):
        self.backend, self.label, self.seconds = backend, "", {}
        self.name, self.device, self.dtype = backend.name, backend.device, backend.dtype

    def call_primitive(self, primitive: str, *args):
        start = time.perf_counter()
        out = self.backend.realize(getattr(self.backend, primitive)(*args))
        self.backend.synchronize()
        self.seconds[self.label] = self.seconds.get(self.label, 0.0) + time.perf_counter() - start
        return out

    def end_block(self, x):
        return self.backend.end_block(x)


def _profile_pass(model, x_on_device, batch: int, macs_of: dict[str, int]) -> list[dict]:
    from .walker import run_plan

    timed, macs = _TimedPrimitives(model.backend), {}

    def enter(op, args):
        timed.label = op_label(op)
        macs[timed.label] = macs.get(timed.label, 0) + macs_of[op.name]

    run_plan(model.plan, timed, model.params, x_on_device, before_op=enter)
    total = sum(timed.seconds.values())
    return [{"op": label, "seconds": t, "share": t / total,
             "gflop_per_s": 2 * macs[label] * batch / t / 1e9 if macs[label] else 0.0}
            for label, t in sorted(timed.seconds.items(), key=lambda item: -item[1])]


def run_benchmark(config: BenchConfig) -> dict:
    """Build, time and describe one backend in this process (the child's job)."""
    from . import backends
    from .analysis import summary
    from .plan import make_plan
    from .spec import ResNetSpec

    spec = ResNetSpec.from_dict(config.spec)
    group = None
    if config.processes > 1:  # this process is one rank that portres.training.launch.run_local started
        from .training import replicas

        group = replicas.join(config.backend, distributed=True, device=config.device)
    label = f"{config.backend} {spec.name}{' training' if config.train else ''}"
    progress = _Progress(label if group is None else f"{label}, rank {group.rank} of {group.processes}")
    if group is not None and group.rank != 0:
        progress = _Silent()
    module = backends.load(config.backend, config.device)
    rss_start = _peak_rss_bytes()
    started = time.perf_counter()
    if config.train:
        timed_pass, backend, config = _training_pass(spec, config, group)
    else:
        timed_pass, backend, config, model = _inference_pass(spec, config)
    build_s = time.perf_counter() - started

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
    width = spec.num_classes or make_plan(spec).feature_info()[-1]["channels"]  # headless: the pooled features
    if logits.shape != (config.batch, width) or not np.all(np.isfinite(logits)):
        raise RuntimeError(f"{config.backend} produced {logits.shape} outputs with NaN/inf: the timing is void")
    median = _percentile(latencies, 50)
    # a training step is about 3 forward passes of work: the forward, and the backward's two GEMMs per conv
    macs = summary(spec, config.input_size).macs * (3 if config.train else 1)
    info = module.info()
    record = {
        "network": spec.name, "backend": config.backend, "device": backend.device, "dtype": backend.dtype,
        "batch": config.batch, "input_size": config.input_size, "iters": config.iters, "warmup": config.warmup,
        "beam": config.beam, "train": config.train, "images_per_s": config.batch / median, "latency_median_s": median,
        "latency_p90_s": _percentile(latencies, 90), "latency_min_s": min(latencies), "first_call_s": first_call_s,
        "build_s": build_s, "gmacs_per_image": macs / 1e9, "gflop_per_s": 2 * macs * config.batch / median / 1e9,
        "peak_rss_bytes": _peak_rss_bytes(), "rss_growth_bytes": _peak_rss_bytes() - rss_start, **backend.memory(),
        "framework": info["framework"], "blas": info.get("blas"), "threads": backend.threads,
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine(),
    }
    if group is not None:
        record.update(_data_parallel_record(config, group, backend, timed_pass.state, median))
        progress(f"{record['images_per_s_per_rank']:.2f} images/s per rank, {record['images_per_s']:.2f} in all; "
                 f"all-reduce {record['all_reduce_median_s'] * 1e3:.1f} ms", final=True)
        group.close()
    else:
        progress(f"{record['images_per_s']:.2f} images/s (median {median * 1e3:.0f} ms)", final=True)
    if config.profile and not config.train:
        progress("profiling op by op ...")
        shape = (config.batch, spec.in_channels, config.input_size, config.input_size)
        images = np.random.default_rng(config.seed).standard_normal(shape).astype(np.float32)
        record["profile"] = profile_ops(model, model.backend.from_numpy(images), config.batch, config.input_size)
    progress.cancel()
    return record


def _inference_pass(spec, config: BenchConfig):
    from .model import build

    model = build(spec, config.backend, device=config.device, dtype=config.dtype, seed=config.seed)
    backend = model.backend
    if config.beam:  # before the first call compiles (tinygrad's BEAM; otherwise the environment's BEAM holds)
        backend.search_kernels(config.beam)
    config = dataclasses.replace(config, batch=config.batch or default_batch(backend.accelerator))
    rng = np.random.default_rng(config.seed)
    images = rng.standard_normal((config.batch, spec.in_channels, config.input_size, config.input_size))
    x = backend.from_numpy(model.check_input(images.astype(np.float32)))

    def timed_pass() -> tuple[float, object]:
        start = time.perf_counter()
        out = backend.realize(model.forward(x))
        backend.synchronize()
        return time.perf_counter() - start, out

    return timed_pass, backend, config, model


def _training_pass(spec, config: BenchConfig, group=None):
    """One SGD step (momentum 0.9, weight decay 1e-4: the CIFAR recipe) per pass, on a fixed batch; with a
    data-parallel ``group``, this rank's step (its own batch, gradients averaged over the ranks)."""
    from .analysis import summary
    from .model import check_images
    from .plan import make_plan
    from .training.grads import soft_targets, training_backend
    from .training.optim import SGD
    from .training.step import initial_state, make_train_step
    from .weights import init_params

    plan = make_plan(spec)
    # the step's work, for a backend that picks its device by it (tinygrad: small steps on its CPU device)
    macs_per_step = 3 * summary(spec, config.input_size).macs * (config.batch or default_batch(False))
    backend = training_backend(config.backend, config.device, config.dtype, macs_per_step)
    if group is not None:
        backend = group.wrap(training_backend(config.backend, group.local_device(config.device), config.dtype),
                             sync_bn=False)
    if config.beam:
        backend.search_kernels(config.beam)
    config = dataclasses.replace(config, batch=config.batch or default_batch(backend.accelerator))
    if config.batch < 2:
        raise ValueError("training needs --batch 2 or more: train-mode batch norm normalises over the batch")
    spec.require_classifier("a training benchmark")
    optimizer = SGD(momentum=0.9, weight_decay=1e-4)
    state = {"arrays": initial_state(plan, backend, init_params(plan, config.seed), optimizer), "count": 0}
    step = make_train_step(plan, backend, optimizer)
    rng = np.random.default_rng(config.seed)
    images = rng.standard_normal((config.batch, spec.in_channels, config.input_size, config.input_size))
    x = backend.from_numpy(check_images(plan, images.astype(np.float32), min_batch=2))
    targets = backend.from_numpy(soft_targets(rng.integers(0, spec.num_classes, config.batch), spec.num_classes, 0.0,
                                              np.dtype(backend.dtype)))

    def timed_pass() -> tuple[float, object]:
        start = time.perf_counter()
        state["count"] += 1
        state["arrays"], loss, logits = step(state["arrays"], x, targets, 0.01, state["count"])
        backend.to_numpy(loss)  # the step has finished when its loss is on the host
        return time.perf_counter() - start, logits

    timed_pass.state = state  # for the all-reduce timing after the steps
    return timed_pass, backend, config


class _Silent:
    """The progress of benchmark ranks other than 0."""

    def __call__(self, message: str, final: bool = False) -> None:
        pass

    def cancel(self) -> None:
        pass


def _training_macs(config: BenchConfig) -> int:
    from .analysis import summary
    from .spec import ResNetSpec

    return 3 * summary(ResNetSpec.from_dict(config.spec), config.input_size).macs  # as run_benchmark counts a step


def _data_parallel_record(config: BenchConfig, group, backend, state: dict, step_median_s: float) -> dict:
    """Per-rank and total rates, and one all-reduce of what a step averages (every gradient and BN running
    statistic) timed on its own, after the steps: a step's all-reduce is inside the step (MLX runs it in
    the step's graph), so it is measured as its own collective on arrays of the same sizes."""
    model = state["arrays"].model
    tree = {name: value * 0 for name, value in model.items()}
    sizes = [int(np.prod(tuple(value.shape))) for value in tree.values()]
    timings = []
    for _ in range(config.warmup + config.iters):
        group.sum_host([0.0])  # line the ranks up, so that no rank's wait for a slower one is counted
        start = time.perf_counter()
        backend.realize(backend.all_reduce_mean(tree))
        backend.synchronize()
        timings.append(time.perf_counter() - start)
    all_reduce = _percentile(timings[config.warmup:], 50)
    # every rank's step time (they run in lock step, but a slow rank holds the others back)
    medians = group.sum_host(np.eye(group.processes)[group.rank] * step_median_s)
    slowest = float(medians.max())
    return {"processes": group.processes, "engine": group.engine.name, "batch_per_rank": config.batch,
            "step_median_s_per_rank": [float(m) for m in medians], "images_per_s_per_rank": config.batch / slowest,
            "images_per_s": group.processes * config.batch / slowest, "all_reduce_median_s": all_reduce,
            "gflop_per_s": group.processes * config.batch / slowest * 2 * _training_macs(config) / 1e9,
            "all_reduce_bytes": int(sum(sizes)) * np.dtype(backend.dtype).itemsize,
            "all_reduce_share_of_step": all_reduce / slowest}


# -- parent side --------------------------------------------------------------------------------


class BenchError(RuntimeError):
    """A backend's benchmark failed for a reason the user can fix (message says how)."""


RESULT_PREFIX = "PORTRES-BENCH-RESULT "  # marks the child's one result line on stdout


def scaling(records: list[dict]) -> list[dict]:
    """Data-parallel records beside their backend's one-process rate: what the extra processes bought.

    Each row: backend, processes, batch_per_rank, images_per_s_per_rank, images_per_s, speed_up and
    efficiency (total / (processes x one process); None without a one-process record), all_reduce_ms and
    all_reduce_share (None for one process).
    """
    alone = {r["backend"]: r["images_per_s"] for r in records if r.get("processes", 1) == 1}
    rows = []
    for r in records:
        processes, single = r.get("processes", 1), alone.get(r["backend"])
        rows.append({
            "backend": r["backend"], "processes": processes, "batch_per_rank": r.get("batch_per_rank", r["batch"]),
            "images_per_s_per_rank": r.get("images_per_s_per_rank", r["images_per_s"]),
            "images_per_s": r["images_per_s"],
            "speed_up": r["images_per_s"] / single if single else None,
            "efficiency": r["images_per_s"] / (processes * single) if single else None,
            "all_reduce_ms": r["all_reduce_median_s"] * 1e3 if "all_reduce_median_s" in r else None,
            "all_reduce_share": r.get("all_reduce_share_of_step"),
            "all_reduce_mib": r["all_reduce_bytes"] / 2**20 if "all_reduce_bytes" in r else None})
    return rows


def run_in_subprocess(config: BenchConfig, timeout: float | None = None) -> dict:
    """Run :func:`run_benchmark` in a fresh interpreter (``config.processes`` of them, as the ranks of a
    data-parallel group on this machine); returns its (rank 0's) record or raises BenchError."""
    command = [sys.executable, "-m", "portres.bench", json.dumps(dataclasses.asdict(config))]
    if config.processes > 1:
        return _run_ranks(command, config)
    try:
        child = subprocess.run(command, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{config.backend}: no result within {timeout:.0f} s; lower --iters or --batch") from None
    if child.returncode in (-9, 137):
        raise BenchError(f"{config.backend}: killed by the OS, most likely out of memory: lower --batch "
                         f"(now {config.batch or 'the default'}) or --input-size")
    lines = [line[len(RESULT_PREFIX):] for line in child.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        raise BenchError(f"{config.backend}: the benchmark process exited with status {child.returncode} "
                         "and no result (see the messages above)")
    record = json.loads(lines[-1])
    if "error" in record:
        raise BenchError(f"{config.backend}: {record['error']}")
    return record


def _run_ranks(command: list[str], config: BenchConfig) -> dict:
    from .training.launch import run_local
    from .training.replicas import DistributedError

    try:
        stdout = run_local(command, config.processes, config.backend, stdout=subprocess.PIPE).stdout
    except DistributedError as error:
        stdout = getattr(error, "stdout", None) or ""
        if RESULT_PREFIX + '{"error"' not in stdout:  # rank 0's own error says more than how the ranks ended
            raise BenchError(f"{config.backend} with {config.processes} processes: {error}") from None
    lines = [line[len(RESULT_PREFIX):] for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        raise BenchError(f"{config.backend}: rank 0 exited without a result (see the messages above)")
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
    except Exception as error:  # noqa: BLE001 - the parent prints one line; PORTRES_DEBUG=1 shows the traceback
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "out of memory" in text.lower() or "outofmemory" in type(error).__name__.lower():
            text = f"out of device memory at batch {config.batch}: lower --batch or --input-size ({text})"
        elif not isinstance(error, ValueError):  # ValueErrors are the user's; anything else is ours
            text = f"{type(error).__name__}: {text} (PORTRES_DEBUG=1 shows the traceback)"
        record = {"error": text}
        if os.environ.get("PORTRES_DEBUG"):
            traceback.print_exc(file=sys.stderr)
    print(RESULT_PREFIX + json.dumps(record), flush=True)
    if config.processes > 1 and "error" in record:  # a failed rank must end the group, not wait on it
        print(f"portres: error: {record['error']}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
