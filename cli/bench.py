"""``portres bench``: steady-state speed, one child process per backend."""

from __future__ import annotations

import json

import click

from .app import backend_list, load_spec, main, table


@main.command()
@click.option("--backend", "backend_names", default="mlx", show_default=True,
              help="tinygrad, mlx, numpy, torch, onnxruntime, 'all', or a comma-separated list.")
@click.option("--depth", type=int, help="ResNet depth: 18/34/50/101/152 (CIFAR: 20/32/44/56/110/1202).")
@click.option("--arch", "name", help="A preset name instead of --depth (see `portres list`).")
@click.option("--spec", "spec_file", type=click.Path(), help="A spec JSON file instead of --depth.")
@click.option("--device", help="Backend device (tinygrad: CPU, CUDA, METAL, CL; mlx: cpu, gpu; torch: cpu, cuda).")
@click.option("--batch", type=click.IntRange(min=1), help="Images per pass (default: 16 on CPU, 64 on GPU).")
@click.option("--input-size", type=click.IntRange(min=1), help="Square input side (default: 224; CIFAR nets 32).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16", "float64"]),
              help="Compute dtype (default: float32; the numpy reference: float64).")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True, help="Untimed passes.")
@click.option("--iters", type=click.IntRange(min=1), default=10, show_default=True, help="Timed passes.")
@click.option("--beam", type=click.IntRange(min=0), default=0, show_default=True,
              help="tinygrad BEAM search width (kernels cached on disk; 0: off). It pays on --device CPU, "
                   "not on pocl's CL device.")
@click.option("--profile", is_flag=True, help="Also time each op kind, op by op.")
@click.option("--train", is_flag=True, help="Time training steps (forward, backward, SGD update) instead.")
@click.option("--processes", "process_counts",
              help="With --train: data-parallel ranks on this machine, or a list to compare (e.g. 1,2); "
                   "--batch is per rank.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON record per backend on stdout.")
def bench(backend_names, depth, name, spec_file, device, batch, input_size, dtype, warmup, iters, beam, profile, train,
          process_counts, seed, as_json):
    """Time steady-state forward passes (or with --train, training steps): images/s, latency, first
    call, GFLOP/s, memory.

    Each backend runs in its own process with seeded weights and the input kept on the
    device; passes are synchronised (tinygrad: device synchronize; MLX: eval). A training step
    is forward, backward and an SGD update with train-mode BN, counted as 3 forward passes of work.

    \b
        portres bench --backend mlx --depth 50
        portres bench --train --backend all --depth 20 --batch 128
        portres bench --train --processes 1,2 --backend mlx --depth 20 --batch 64
    """
    from portres import backends as registry
    from portres import bench as runner
    from portres.plan import make_plan
    from portres.zoo import default_input_size

    if depth is None and name is None and spec_file is None:
        depth = 50
    spec = load_spec(name, spec_file, depth)
    input_size = input_size or default_input_size(spec)
    make_plan(spec).check_input_size(input_size)
    if profile and train:
        raise click.UsageError("--profile times inference ops; leave it out with --train")
    counts = _process_counts(process_counts, train, backend_names)
    explicit = backend_names != "all"
    reasons = {n: registry.unavailable_reason(n, device) for n in backend_list(backend_names, include_numpy=True)}
    if explicit and any(reasons.values()):
        backend, reason = next((n, r) for n, r in reasons.items() if r)
        raise ValueError(f"backend {backend!r} cannot run: {reason}")
    peak = None
    records, failures = [], []
    runs = [(n, processes) for n, reason in reasons.items() if reason is None for processes in counts]
    for backend, processes in runs:
        config = runner.BenchConfig(backend, spec.to_dict(), device=device, batch=batch, input_size=input_size,
                                    dtype=dtype, warmup=warmup, iters=iters, seed=seed, beam=beam, profile=profile,
                                    train=train, processes=processes)
        try:
            record = runner.run_in_subprocess(config)
        except runner.BenchError as error:
            if explicit:
                raise ValueError(str(error)) from None
            failures.append(str(error))
            continue
        if record["device"].lower().startswith("cpu"):  # the peak we can measure is the CPU's
            peak = peak or runner.measure_sgemm_peak()
            record["sgemm_peak_gflop_per_s"] = peak
            record["fraction_of_sgemm_peak"] = record["gflop_per_s"] / peak
        records.append(record)
    torch_rate = next((r["images_per_s"] for r in records if r["backend"] == "torch"), None)
    for r in records:
        r["ratio_vs_torch"] = r["images_per_s"] / torch_rate if torch_rate else None
        r["cpu"], r["cpu_flags"] = runner.cpu_model(), runner.cpu_flags()
    if as_json:
        for r in records:
            click.echo(json.dumps(r))
        for failure in failures:
            click.echo(f"portres: skipped {failure}", err=True)
    else:
        _print_bench(spec, records, failures, peak)
        if counts != [1]:
            _print_scaling(records)
    if not records:
        raise ValueError("no backend could be benchmarked: " + ("; ".join(failures) or
                                                             "none is available here (see `portres backends`)"))


def _process_counts(value: str | None, train: bool, backend_names: str) -> list[int]:
    """``--processes 1,2`` -> [1, 2]: the rank counts to time, each on every backend asked for."""
    if value is None:
        return [1]
    if not train:
        raise click.UsageError("--processes times data-parallel training: add --train")
    try:
        counts = list(dict.fromkeys(int(part) for part in value.split(",") if part.strip()))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of process counts, e.g. 1,2") from None
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"{value!r}: process counts are positive integers, e.g. 1,2")
    from portres.training.replicas import check_parallel_settings

    if max(counts) > 1:
        for backend in backend_list(backend_names, include_numpy=True):
            check_parallel_settings(backend, processes=max(counts))
    return counts


def _print_scaling(records):
    """Data-parallel rates next to one process's, per backend: what the extra processes bought."""
    from portres import bench as runner

    def cell(value, form):
        return "-" if value is None else form.format(value)

    rows = [[row["backend"], row["processes"], row["batch_per_rank"], f"{row['images_per_s_per_rank']:.2f}",
             f"{row['images_per_s']:.2f}", cell(row["speed_up"], "{:.2f}x"), cell(row["efficiency"], "{:.0%}"),
             cell(row["all_reduce_ms"], "{:.1f}"), cell(row["all_reduce_share"], "{:.0%}"),
             cell(row["all_reduce_mib"], "{:.2f}")] for row in runner.scaling(records)]
    click.echo("\ndata parallel (batch per rank; efficiency = total / (processes x one process)):")
    click.echo(table(["backend", "processes", "batch/rank", "img/s per rank", "img/s total", "speed-up", "efficiency",
                      "all-reduce ms", "of step", "all-reduce MB"], rows, right=set(range(1, 10))))
    engines = sorted({r["engine"] for r in records if r.get("engine")})
    if engines:
        click.echo(f"engines: {', '.join(engines)}; the all-reduce is timed on its own after the steps, with the "
                   "ranks lined up first")


def _print_bench(spec, records, failures, peak):
    mb = lambda n: f"{n / 2**20:,.0f}" if n else "-"  # noqa: E731
    rows = []
    for r in records:
        rows.append([r["backend"], r["device"], r["dtype"], r["batch"], f"{r['images_per_s']:.2f}",
                     f"{r['latency_median_s'] * 1e3:.1f}", f"{r['latency_p90_s'] * 1e3:.1f}",
                     f"{r['latency_min_s'] * 1e3:.1f}", f"{r['first_call_s']:.2f}", f"{r['gflop_per_s']:.1f}",
                     f"{100 * r['fraction_of_sgemm_peak']:.0f}%" if r.get("fraction_of_sgemm_peak") else "-",
                     mb(r["peak_rss_bytes"]),
                     f"{r['ratio_vs_torch']:.2f}x" if r.get("ratio_vs_torch") else "-"])
    first = records[0] if records else None
    if first:
        size = first["input_size"]
        what = "training steps (forward, backward, SGD; 3x the forward's work)" if first.get("train") else "passes"
        click.echo(f"{spec.name}, {size}x{size}, {first['gmacs_per_image']:.3f} GMACs/image, "
                   f"{first['iters']} timed {what} after {first['warmup']} warm-up\n")
    click.echo(table(["backend", "device", "dtype", "batch", "img/s", "median ms", "p90 ms", "min ms", "first call s",
                      "GFLOP/s", "of peak", "peak RSS MB", "vs torch"], rows, right=set(range(3, 13))))
    click.echo("")
    for r in records:
        blas = f"; BLAS: {r['blas']}" if r.get("blas") else ""
        click.echo(f"{r['backend']}: {r['framework']}{blas}; threads {r['threads']}")
    if first:
        peak_text = f"; sgemm peak (NumPy, measured) {peak:.0f} GFLOP/s" if peak else ""
        click.echo(f"machine: {first['cpu']} ({first['cpu_flags']}), {first['cpu_count']} CPUs, "
                   f"Python {first['python']}{peak_text}")
    for r in records:
        if r.get("profile"):
            click.echo(f"\n{r['backend']} per-op profile (each op timed alone, synchronised):")
            click.echo(table(["op", "seconds", "share", "GFLOP/s"],
                             [[p["op"], f"{p['seconds']:.4f}", f"{100 * p['share']:.1f}%",
                               f"{p['gflop_per_s']:.1f}" if p["gflop_per_s"] else "-"] for p in r["profile"]],
                             right={1, 2, 3}))
    for failure in failures:
        click.echo(f"skipped {failure}")
