"""Run the standard benchmark matrix and write BENCHMARKS.md.

    python benchmarks/run_matrix.py --output BENCHMARKS.md          # or: make matrix

Networks x every available backend (plus the torch peer when installed) x batch 1 and 16,
ResNet inputs at 224x224 in float32; each cell in its own process (portres.bench). Numbers
are recorded here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
from pathlib import Path

import portres
from portres import backends, bench

NETWORKS = ["resnet18", "resnet50", "resnet101", "resnext50_32x4d", "resnetv2_50"]
BATCHES = [1, 16]
# training rows: (network, input side, batch) - the CIFAR ResNet-20 and ResNet-50 at 224
# (a row may end in :backend+backend to time only those: tinygrad compiles ResNet-50's step for many minutes)
TRAINING = [("resnet20", 32, 128), ("resnet50", 224, 16)]
# data-parallel rows: (network, input side, batch per rank), each with 1 and 2 local processes
SCALING = [("resnet20", 32, 64)]
SCALING_BACKENDS = ("mlx", "torch")  # the backends whose replicas are processes (tinygrad's are devices)


def memory_gib() -> str:
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        return f"{kib / 2**20:.0f} GiB"
    except (OSError, StopIteration):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="BENCHMARKS.md")
    parser.add_argument("--networks", default=",".join(NETWORKS))
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--backends", default=None,
                        help="default: every available backend except numpy; BACKEND@DEVICE names a device "
                             "(tinygrad@CPU,tinygrad@CL: both of tinygrad's CPU-side devices)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--tinygrad-beam", type=int, default=0, metavar="N",
                        help="also time tinygrad with BEAM=N at batch 16 on the --beam-networks (the first search "
                             "takes ~50 min per network on 2 cores, then tinygrad's disk cache has it)")
    parser.add_argument("--beam-networks", default="resnet50")
    parser.add_argument("--training", default=",".join(f"{n}:{s}:{b}" for n, s, b in TRAINING),
                        help="training rows as network:input:batch, comma-separated ('' for none)")
    parser.add_argument("--training-backends", default=None, help="default: the inference backends that train")
    parser.add_argument("--scaling", default=",".join(f"{n}:{s}:{b}" for n, s, b in SCALING),
                        help="network:input:batch-per-rank rows timed with 1 and 2 local processes ('' for none)")
    parser.add_argument("--log", default=str(Path(__file__).with_name("perf_log.md")),
                        help="speed-work log appended to the report")
    args = parser.parse_args()

    names = args.backends.split(",") if args.backends else [b for b in backends.available() if b != "numpy"]
    records, failures = [], []
    for network in filter(None, args.networks.split(",")):
        spec = portres.get(network)
        for batch in map(int, args.batches.split(",")):
            for backend, device in map(backend_and_device, names):
                config = bench.BenchConfig(backend, spec.to_dict(), device=device, batch=batch, input_size=224,
                                           dtype="float32", warmup=2, iters=args.iters if batch > 1 else 4 * args.iters)
                print(f"{network} batch {batch} {backend} ...", file=sys.stderr, flush=True)
                try:
                    records.append(bench.run_in_subprocess(config))
                except bench.BenchError as error:
                    failures.append(f"{network} batch {batch}: {error}")
            tinygrad_devices = [device for backend, device in map(backend_and_device, names) if backend == "tinygrad"]
            if args.tinygrad_beam and batch > 1 and tinygrad_devices and network in args.beam_networks.split(","):
                config = dataclasses.replace(config, backend="tinygrad", device=tinygrad_devices[-1],
                                             beam=args.tinygrad_beam)
                print(f"{network} batch {batch} tinygrad BEAM={args.tinygrad_beam} ...", file=sys.stderr, flush=True)
                try:
                    records.append(bench.run_in_subprocess(config))
                except bench.BenchError as error:
                    failures.append(f"{network} batch {batch} BEAM={args.tinygrad_beam}: {error}")
    training_names = args.training_backends.split(",") if args.training_backends else \
        [name for name in names if backend_and_device(name)[0] in backends.TRAINABLE]
    for row in filter(None, args.training.split(",")):
        network, size, batch, *only = row.split(":")  # network:input:batch[:backend+backend]
        for backend, device in map(backend_and_device, only[0].split("+") if only else training_names):
            config = bench.BenchConfig(backend, portres.get(network).to_dict(), device=device, batch=int(batch),
                                       input_size=int(size), dtype="float32", warmup=2, iters=args.iters, train=True)
            print(f"training {network} {size} batch {batch} {backend} ...", file=sys.stderr, flush=True)
            try:
                records.append(bench.run_in_subprocess(config))
            except bench.BenchError as error:
                failures.append(f"training {network} batch {batch}: {error}")
    for row in filter(None, args.scaling.split(",")):
        network, size, batch = row.split(":")
        for backend in [name for name in SCALING_BACKENDS if name in names]:
            for processes in (1, 2):
                config = bench.BenchConfig(backend, portres.get(network).to_dict(), batch=int(batch),
                                           input_size=int(size), dtype="float32", warmup=2, iters=args.iters,
                                           train=True, processes=processes)
                print(f"data parallel {network} {size} batch {batch}/rank {backend} x{processes} ...", file=sys.stderr,
                      flush=True)
                try:
                    record = bench.run_in_subprocess(config)
                    records.append({**record, "processes": record.get("processes", 1), "scaling": True})
                except bench.BenchError as error:
                    failures.append(f"data parallel {network} {backend} x{processes}: {error}")
    output = Path(args.output)
    kept = gpu_check_block(output.read_text()) if output.is_file() else ""
    output.write_text(report(records, failures, Path(args.log), kept))
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def scaling_section(records: list[dict]) -> list[str]:
    """Data-parallel training on this machine: 1 vs 2 local processes, what the second one bought."""
    first = records[0]
    lines = [f"## Data-parallel training, {first['network']} {first['input_size']}x{first['input_size']} "
             f"(`portres bench --train --processes 1,2`)", "",
             "Batch per rank fixed; efficiency = images/s in all / (processes x one process's images/s). The "
             "all-reduce (gradients and BN statistics) is timed on its own after the steps.", "",
             "| backend | processes | batch/rank | images/s per rank | images/s in all | speed-up | efficiency "
             "| all-reduce ms | of step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(value, form):
        return "-" if value is None else form.format(value)

    for row in bench.scaling(records):
        cells = [row["backend"], row["processes"], row["batch_per_rank"], f"{row['images_per_s_per_rank']:.2f}",
                 f"{row['images_per_s']:.2f}", cell(row["speed_up"], "{:.2f}x"), cell(row["efficiency"], "{:.0%}"),
                 cell(row["all_reduce_ms"], "{:.1f}"), cell(row["all_reduce_share"], "{:.0%}")]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", f"What limits it here: {os.cpu_count()} CPU cores in all. One process already uses every core "
              "(torch's intra-op threads; MLX splits a training batch across one CPU stream per core), so a second "
              "process shares the same cores instead of adding any, and pays the all-reduce over loopback. On a "
              "machine with a device per rank (GPUs) the ranks add compute instead.", ""]
    return lines


def backend_and_device(name: str) -> tuple[str, str | None]:
    """``"tinygrad@CL"`` -> ``("tinygrad", "CL")``; a bare name leaves the device to the backend."""
    backend, _, device = name.partition("@")
    return backend, device or None


# benchmarks/gpu_check.py writes its GPU rows between these lines; a matrix run here keeps them
GPU_CHECK_BEGIN, GPU_CHECK_END = "<!-- gpu-check: written by benchmarks/gpu_check.py -->", "<!-- /gpu-check -->"


def gpu_check_block(document: str) -> str:
    """The GPU check's rows in ``document`` (markers included), or ``""``."""
    start, end = document.find(GPU_CHECK_BEGIN), document.find(GPU_CHECK_END)
    return document[start:end + len(GPU_CHECK_END)] + "\n" if 0 <= start < end else ""


def row_name(record: dict) -> str:
    """A row's backend, with its device where that is not the only CPU one (tinygrad's CPU and CL devices)."""
    device = str(record.get("device") or "")
    shown = record["backend"] + (f" {device}" if record["backend"] == "tinygrad" or device.lower() != "cpu" else "")
    return shown + (f" (BEAM={record['beam']})" if record.get("beam") else "")


def report(records: list[dict], failures: list[str], log: Path, gpu_rows: str = "") -> str:
    today = datetime.date.today().isoformat()
    frameworks = sorted({r["framework"] for r in records})
    blas = sorted({f"{r['backend']}: {r['blas']}" for r in records if r.get("blas")})
    lines = [
        "# Benchmarks",
        "",
        "Forward-pass inference, float32, 224x224, seeded weights, input kept on the device; median of",
        "timed passes after 2 warm-up passes (the first call — compile / JIT capture — is reported apart).",
        "Training rows time whole SGD steps (forward and backward with train-mode BN, momentum update) on a",
        "fixed batch; their GFLOP/s count a step as 3 forward passes.",
        "Written by `benchmarks/run_matrix.py` (`make matrix`); numbers are never asserted in tests.",
        "",
        f"- date: {today}",
        f"- machine: {bench.cpu_model()}, {os.cpu_count()} CPUs ({bench.cpu_flags()}), {memory_gib()} RAM, "
        f"{platform.system()} {platform.machine()}",
        f"- sgemm peak (NumPy float32 2048^3, measured): {bench.measure_sgemm_peak():.0f} GFLOP/s",
        f"- Python {platform.python_version()}; " + "; ".join(frameworks),
        *[f"- BLAS {b}" for b in blas],
        "",
    ]
    lines += tables(records)
    if gpu_rows:
        lines += [gpu_rows]
    lines += ["## GPUs", "", *gpu_note(), ""]
    if failures:
        lines += ["## Cells that did not run", ""] + [f"- {f}" for f in failures] + [""]
    if log.is_file():
        lines += [log.read_text().replace("# Speed work log", "## Speed work log", 1)]
    return "\n".join(lines) + "\n"


def tables(records: list[dict]) -> list[str]:
    """The report's tables (lines): one per network and mode, then the data-parallel one."""
    lines = []
    scaling = [r for r in records if r.get("scaling")]
    records = [r for r in records if not r.get("scaling")]
    for network, training in dict.fromkeys((r["network"], r.get("train", False)) for r in records):
        rows = [r for r in records if r["network"] == network and r.get("train", False) == training]
        title = (f"## Training {network}, {rows[0]['input_size']}x{rows[0]['input_size']} "
                 f"({rows[0]['gmacs_per_image']:.3f} GMACs/image per step)") if training else \
            f"## {network} ({rows[0]['gmacs_per_image']:.3f} GMACs/image)"
        lines += [title, "",
                  "| backend | batch | images/s | median ms | p90 ms | first call s | GFLOP/s | peak RSS MiB "
                  "| vs torch |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for batch in dict.fromkeys(r["batch"] for r in rows):
            same = [r for r in rows if r["batch"] == batch]
            torch = next((r["images_per_s"] for r in same if r["backend"] == "torch"), None)
            for r in same:
                ratio = f"{r['images_per_s'] / torch:.2f}x" if torch else "-"
                cells = [row_name(r), batch, f"{r['images_per_s']:.2f}", f"{r['latency_median_s'] * 1e3:.1f}",
                         f"{r['latency_p90_s'] * 1e3:.1f}", f"{r['first_call_s']:.2f}", f"{r['gflop_per_s']:.1f}",
                         f"{r['peak_rss_bytes'] / 2**20:,.0f}", ratio]
                lines.append("| " + " | ".join(map(str, cells)) + " |")
        lines.append("")
    if scaling:
        lines += scaling_section(scaling)
    return lines


def gpu_note() -> list[str]:
    """Which accelerators the backends see here; GPU rows come from runs on a machine that has one."""
    seen = {name: backends.load(name).info()["devices"] for name in backends.available() if name != "numpy"}
    lines = [f"- {name} devices here: {', '.join(devices)}" for name, devices in seen.items()]
    if not any(d.split(":")[0].upper() in ("GPU", "CUDA", "METAL", "CL", "NV", "AMD") for ds in seen.values()
               for d in ds):
        lines.append("- no GPU on this machine, so no GPU rows. On one, run `portres bench --depth 50 --batch 64` "
                     "with `--backend tinygrad --device CUDA` (or METAL), `--backend mlx --device gpu` and "
                     "`--backend torch --device cuda`, each also with `--dtype float16`, and add them here.")
    return lines


if __name__ == "__main__":
    sys.exit(main())
