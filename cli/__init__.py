"""The ``portres`` command line: list, summary, spec, backends, parity, bench.

User errors (unknown preset, invalid spec file, bad argument, missing framework) print one
``portres: error: ...`` line on stderr and exit with status 2, never a traceback.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import click

from portres import analysis, zoo
from portres.spec import ResNetSpec, SpecError
from portres.weights import WeightsError

USER_ERRORS = (SpecError, WeightsError, ValueError, KeyError, OSError, RuntimeError, MemoryError)


def fail(message: str) -> None:
    """The one line every user error prints; the exit status is 2."""
    click.echo(f"portres: error: {message}", err=True)
    sys.exit(2)


class _Group(click.Group):
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as error:  # click would print the usage block; one line is enough
            where = f" (see `{error.ctx.command_path} --help`)" if error.ctx else ""
            fail(f"{error.format_message()}{where}")
        except click.ClickException as error:
            fail(error.format_message())
        except click.exceptions.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except MemoryError:
            fail("out of memory: lower --batch or --input-size, or use a smaller network")
        except USER_ERRORS as error:
            fail(str(error))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="portres")
def main():
    """One ResNet description, lowered to tinygrad, MLX (and torch), checked against float64 NumPy."""


# -- helpers --------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list], right: set[int] | None = None) -> str:
    """A plain-text table; columns in ``right`` are right-aligned (numbers)."""
    right = right or set()
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    fmt = lambda row: "  ".join(c.rjust(w) if i in right else c.ljust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(row) for row in cells[1:]])


def load_spec(name: str | None, spec_file: str | None, depth: int | None = None) -> ResNetSpec:
    """The spec from exactly one of NAME, --spec FILE or --depth N."""
    given = [x for x in (name, spec_file, depth) if x is not None]
    if len(given) != 1:
        raise click.UsageError("give exactly one of NAME, --spec FILE.json or --depth N")
    if spec_file is not None:
        path = Path(spec_file)
        if not path.is_file():
            raise FileNotFoundError(f"spec file {spec_file} does not exist")
        try:
            return ResNetSpec.from_json(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"spec file {spec_file} cannot be read: {error}") from None
        except SpecError as error:
            raise SpecError(f"{spec_file}: {error}") from None
    if depth is not None:
        if f"resnet{depth}" not in zoo.names():
            raise ValueError(f"unknown depth {depth}: ImageNet ResNets have depth "
                             f"{'/'.join(map(str, zoo.IMAGENET_DEPTHS))}, CIFAR ResNets "
                             f"{'/'.join(map(str, zoo.CIFAR_DEPTHS))}; other presets by name: --arch NAME")
        return zoo.get(f"resnet{depth}")
    return zoo.get(name)


def millions(n: int) -> str:
    return f"{n / 1e6:,.2f}M"


def giga(n: float) -> str:
    return f"{n / 1e9:,.3f}G"


# -- verbs ----------------------------------------------------------------------------------


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON record per preset.")
def list_presets(as_json):
    """Every preset: family, parameters and MACs at its natural input size."""
    rows = []
    for name in zoo.names():
        entry = zoo.entry(name)
        size = analysis.default_input_size(entry.spec)
        s = analysis.summary(entry.spec, size)
        rows.append({"name": name, "family": entry.family, "params": s.params, "macs": s.macs,
                     "input_size": size, "description": entry.description})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(table(["name", "family", "params", "MACs", "input", "description"],
                     [[r["name"], r["family"], f"{r['params']:,}", giga(r["macs"]), r["input_size"], r["description"]]
                      for r in rows], right={2, 3, 4}))


@main.command()
@click.argument("name", required=False)
@click.option("--spec", "spec_file", type=click.Path(), help="A spec JSON file instead of a preset NAME.")
@click.option("--input-size", type=click.IntRange(min=1), help="Square input side (default: 224, CIFAR 32).")
@click.option("--ops", is_flag=True, help="Show every op, not just the stages.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def summary(name, spec_file, input_size, ops, as_json):
    """Parameters, buffers, MACs and output shapes of a network, per stage (or per op)."""
    spec = load_spec(name, spec_file)
    s = analysis.summary(spec, input_size or analysis.default_input_size(spec))
    if as_json:
        click.echo(json.dumps(s.to_dict(), indent=2))
        return
    if ops:
        rows = [[r.name, r.op, "x".join(map(str, r.output_shape)), f"{r.params:,}", f"{r.macs:,}"] for r in s.rows]
        click.echo(table(["op", "kind", "output (per image)", "params", "MACs"], rows, right={3, 4}))
    else:
        rows = [[g["stage"], "x".join(map(str, g["output_shape"])), f"{g['params']:,}", giga(g["macs"])]
                for g in s.stages()]
        click.echo(table(["stage", "output (per image)", "params", "MACs"], rows, right={2, 3}))
    height, width = s.input_size
    click.echo(f"\n{s.name} at {height}x{width}: {s.params:,} parameters, {s.buffers:,} BN buffers, "
               f"{s.macs / 1e9:.3f} GMACs ({2 * s.macs / 1e9:.3f} GFLOPs) per image")


@main.command("spec")
@click.argument("name")
def show_spec(name):
    """The JSON spec of a preset (edit it and pass it back with --spec)."""
    click.echo(zoo.get(name).to_json())


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def backends(as_json):
    """Installed backends: devices, framework versions, BLAS, and why any cannot run."""
    from portres import backends as registry

    report = []
    for name in registry.NAMES:
        reason = registry.unavailable_reason(name)
        record = {"backend": name, "available": reason is None, "reason": reason}
        if reason is None:
            try:
                record.update(registry.load(name).info())
            except Exception as error:  # noqa: BLE001 - an installed but broken framework is reported, not raised
                record.update(available=False, reason=f"installed but failed to load: {error}")
        report.append(record)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for r in report:
        if r["available"]:
            click.echo(f"{r['backend']:9s} ok       {r['framework']}; devices: {', '.join(r['devices'])} "
                       f"(default {r['default_device']})" + (f"; BLAS: {r['blas']}" if r.get("blas") else ""))
        else:
            click.echo(f"{r['backend']:9s} missing  {r['reason']}")


def _backend_list(value: str | None, include_numpy: bool) -> list[str]:
    from portres import backends as registry

    if value in (None, "all"):
        names = [n for n in registry.available() if include_numpy or n != "numpy"]
        if not names:
            raise ValueError("no backend is available here: pip install 'portres[all]'")
        return names
    names = [n.strip() for n in value.split(",") if n.strip()]
    for n in names:
        if n not in registry.NAMES:
            raise ValueError(f"unknown backend {n!r}; choose from {', '.join(registry.NAMES)} or 'all'")
    return names


def _fmt_error(x: float) -> str:
    return "inf/NaN" if not math.isfinite(x) else f"{x:.2e}"


@main.command()
@click.argument("name", required=False)
@click.option("--depth", type=int, help="ResNet depth (18/34/50/101/152; CIFAR 20/32/44/56/110/1202).")
@click.option("--spec", "spec_file", type=click.Path(), help="A spec JSON file instead of a preset NAME.")
@click.option("--backends", "backend_names", help="Comma-separated backends (default: every available one).")
@click.option("--input-size", type=click.IntRange(min=1), help="Square input side (default 64; CIFAR 32).")
@click.option("--batch", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
@click.option("--device", help="Device for every backend (e.g. CPU, CUDA for tinygrad; cpu, gpu for mlx).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON record per backend.")
def parity(name, depth, spec_file, backend_names, input_size, batch, dtype, device, seed, as_json):
    """Run one input through the float64 reference and each backend; compare.

    Exit status 1 if any backend is off by more than the tolerance (1e-4 relative L2 in
    float32, 2e-2 in float16/bfloat16); the report then names the first op that diverges.
    """
    from portres import parity as checker

    spec = load_spec(name, spec_file, depth)
    size = input_size or checker.default_input_size(spec)
    results = checker.check(spec, _backend_list(backend_names, include_numpy=False), input_size=size,
                            batch=batch, dtype=dtype, seed=seed, device=device)
    if as_json:
        for r in results:
            click.echo(json.dumps({"network": spec.name, "input_size": size, "batch": batch, **r.to_dict()}))
    else:
        click.echo(f"{spec.name}: batch {batch} at {size}x{size}, seed {seed}, vs float64 NumPy reference\n")
        rows = []
        for r in results:
            if r.error:
                rows.append([r.backend, r.device, r.dtype, "-", "-", "-", f"{r.tolerance:.0e}", "ERROR"])
                continue
            stage, worst = r.worst_stage
            rows.append([r.backend, r.device, r.dtype, _fmt_error(r.logits_error), f"{stage} {_fmt_error(worst)}",
                         _fmt_error(r.max_abs_error), f"{r.tolerance:.0e}", "pass" if r.passed else "FAIL"])
        click.echo(table(["backend", "device", "dtype", "logits rel.err", "worst stage", "max abs", "tol", "result"],
                         rows, right={3, 5}))
        for r in results:
            if r.error:
                click.echo(f"\n{r.backend}: could not run: {r.error}")
            elif not r.passed:
                click.echo(f"\n{r.backend}: diverges first at {r.divergence or 'no single op (accumulated error)'}")
    sys.exit(0 if all(r.passed for r in results) else 1)


@main.command()
@click.option("--backend", "backend_names", default="mlx", show_default=True,
              help="tinygrad, mlx, numpy, torch, 'all', or a comma-separated list.")
@click.option("--depth", type=int, help="ResNet depth: 18/34/50/101/152 (CIFAR: 20/32/44/56/110/1202).")
@click.option("--arch", "name", help="A preset name instead of --depth (see `portres list`).")
@click.option("--spec", "spec_file", type=click.Path(), help="A spec JSON file instead of --depth.")
@click.option("--device", help="Backend device (tinygrad: CPU, CUDA, METAL, CL; mlx: cpu, gpu; torch: cpu, cuda).")
@click.option("--batch", type=click.IntRange(min=1), help="Images per pass (default: 16 on CPU, 64 on GPU).")
@click.option("--input-size", type=click.IntRange(min=1), default=224, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16", "float64"]),
              help="Compute dtype (default: float32; the numpy reference: float64).")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True, help="Untimed passes.")
@click.option("--iters", type=click.IntRange(min=1), default=10, show_default=True, help="Timed passes.")
@click.option("--beam", type=click.IntRange(min=0), default=0, show_default=True,
              help="tinygrad BEAM search width (kernels cached on disk; 0: off).")
@click.option("--profile", is_flag=True, help="Also time each op kind, op by op.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON record per backend on stdout.")
def bench(backend_names, depth, name, spec_file, device, batch, input_size, dtype, warmup, iters, beam, profile,
          seed, as_json):
    """Time steady-state forward passes: images/s, latency, first call, GFLOP/s, memory.

    Each backend runs in its own process with seeded weights and the input kept on the
    device; passes are synchronised (tinygrad: device synchronize; MLX: eval).
    """
    from portres import backends as registry
    from portres import bench as runner
    from portres.analysis import check_input_size
    from portres.plan import make_plan

    if depth is None and name is None and spec_file is None:
        depth = 50
    spec = load_spec(name, spec_file, depth)
    check_input_size(make_plan(spec), input_size)
    explicit = backend_names != "all"
    reasons = {n: registry.unavailable_reason(n, device) for n in _backend_list(backend_names, include_numpy=True)}
    if explicit and any(reasons.values()):
        backend, reason = next((n, r) for n, r in reasons.items() if r)
        raise ValueError(f"backend {backend!r} cannot run: {reason}")
    peak = None
    records, failures = [], []
    for backend in (n for n, reason in reasons.items() if reason is None):
        config = runner.BenchConfig(backend, spec.to_dict(), device=device, batch=batch, input_size=input_size,
                                    dtype=dtype, warmup=warmup, iters=iters, seed=seed, beam=beam, profile=profile)
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
    if not records:
        raise ValueError("no backend could be benchmarked: " + ("; ".join(failures) or
                                                             "none is available here (see `portres backends`)"))


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
        click.echo(f"{spec.name}, {size}x{size}, {first['gmacs_per_image']:.3f} GMACs/image, "
                   f"{first['iters']} timed passes after {first['warmup']} warm-up\n")
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
