"""``portres parity``: one input through the float64 reference and each backend."""

from __future__ import annotations

import sys

import click

from .app import backend_list, fmt_error, json_line, load_spec, main, table


@main.command()
@click.argument("name", required=False)
@click.option("--depth", type=int, help="ResNet depth (18/34/50/101/152; CIFAR 20/32/44/56/110/1202).")
@click.option("--spec", "spec_file", type=click.Path(), help="A spec JSON file instead of a preset NAME.")
@click.option("--backends", "backend_names", help="Comma-separated backends (default: every available one).")
@click.option("--input-size", type=click.IntRange(min=1), help="Square input side (default 64; CIFAR 32).")
@click.option("--batch", type=click.IntRange(min=1), help="Images (default 2; with --grads 4).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16", "float64"]),
              help="Compute dtype (default float32; with --grads float64, which any network's conditioning allows).")
@click.option("--grads", is_flag=True, help="Compare train-mode loss, gradients and BN statistics instead.")
@click.option("--device", help="Device for every backend (e.g. CPU, CUDA for tinygrad; cpu, gpu for mlx).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON record per backend.")
def parity(name, depth, spec_file, backend_names, input_size, batch, dtype, grads, device, seed, as_json):
    """Run one input through the float64 reference and each backend; compare.

    Exit status 1 if any backend is off by more than the tolerance (1e-4 relative L2 in
    float32, 2e-2 in float16/bfloat16); the report then names the first op that diverges.
    With --grads: one train-mode batch, its loss, every parameter's gradient and the updated
    BN statistics (float32 or float64); a failure names the first parameter, from the output
    backwards, whose gradient diverges. Status 2 for a usage or environment error, including
    a backend that cannot run here.
    """
    from portres import backends as registry
    from portres import parity as checker

    spec = load_spec(name, spec_file, depth)
    size = input_size or checker.parity_input_size(spec)
    names = backend_list(backend_names, include_numpy=False)
    if backend_names not in (None, "all"):  # asked for by name: it must be able to run
        for backend in names:
            if reason := registry.unavailable_reason(backend, device):
                raise registry.BackendUnavailable(f"backend {backend!r} cannot run: {reason}")
    if grads:
        _gradient_parity(spec, names, size, 4 if batch is None else batch, dtype or "float64", device, seed, as_json)
    batch, dtype = 2 if batch is None else batch, dtype or "float32"
    checker.check_memory(spec, size, batch)
    results = checker.check(spec, names, input_size=size, batch=batch, dtype=dtype, seed=seed, device=device)
    if as_json:
        for r in results:
            click.echo(json_line({"network": spec.name, "input_size": size, "batch": batch, **r.to_dict()}))
    else:
        click.echo(f"{spec.name}: batch {batch} at {size}x{size}, seed {seed}, vs float64 NumPy reference\n")
        rows = []
        for r in results:
            if r.error:
                rows.append([r.backend, r.device, r.dtype, "-", "-", "-", f"{r.tolerance:.0e}", "ERROR"])
                continue
            stage, worst = r.worst_stage
            rows.append([r.backend, r.device, r.dtype, fmt_error(r.logits_error), f"{stage} {fmt_error(worst)}",
                         fmt_error(r.max_abs_error), f"{r.tolerance:.0e}", "pass" if r.passed else "FAIL"])
        click.echo(table(["backend", "device", "dtype", "logits rel.err", "worst stage", "max abs", "tol", "result"],
                         rows, right={3, 5}))
        for r in results:
            if r.error:
                click.echo(f"\n{r.backend}: could not run: {r.error}")
            elif not r.passed:
                click.echo(f"\n{r.backend}: diverges first at {r.divergence or 'no single op (accumulated error)'}")
    if any(not r.passed and not r.error for r in results):
        sys.exit(1)  # ran, and a backend disagrees
    sys.exit(2 if any(r.error for r in results) else 0)


def _gradient_parity(spec, names, size, batch, dtype, device, seed, as_json) -> None:
    from portres.parity import check_memory
    from portres.training import parity as checker

    if dtype not in checker.TOLERANCES:
        raise ValueError(f"--grads compares in {' or '.join(checker.TOLERANCES)}, not {dtype}")
    if batch < 2:
        raise ValueError("--grads needs --batch 2 or more: train-mode batch norm normalises over the batch")
    check_memory(spec, size, 3 * batch)  # the reference keeps every value for its backward pass
    results = checker.check_grads(spec, names, input_size=size, batch=batch, seed=seed, device=device, dtype=dtype)
    if as_json:
        for r in results:
            click.echo(json_line({"network": spec.name, "input_size": size, "batch": batch, **r.to_dict()}))
    else:
        tolerance = checker.TOLERANCES[dtype]
        click.echo(f"{spec.name}: gradients of one train-mode batch of {batch} at {size}x{size}, seed {seed}, "
                   f"vs the float64 reference\ntolerances: loss {tolerance['loss']:.0e}, all gradients "
                   f"{tolerance['grads']:.0e}, each parameter {tolerance['parameter']:.0e}, BN statistics "
                   f"{tolerance['running_stats']:.0e}\n")
        rows = []
        for r in results:
            if r.error:
                rows.append([r.backend, r.device, r.dtype, "-", "-", "-", "-", "ERROR"])
                continue
            worst, worst_error = r.worst_parameter
            rows.append([r.backend, r.device, r.dtype, fmt_error(r.loss_error), fmt_error(r.grads_error),
                         f"{worst} {fmt_error(worst_error)}", fmt_error(r.running_stats_error),
                         "pass" if r.passed else "FAIL"])
        click.echo(table(["backend", "device", "dtype", "loss", "gradients", "worst parameter", "BN stats", "result"],
                         rows, right={3, 4, 6}))
        for r in results:
            if r.error:
                click.echo(f"\n{r.backend}: could not run: {r.error}")
            elif not r.passed:
                click.echo(f"\n{r.backend}: diverges first at {r.divergence or 'no single parameter (accumulated)'}")
        if dtype == "float32" and any(not r.passed and not r.error for r in results):
            images, _, params = checker.gradient_case(spec, size, batch, seed)
            margin = checker.gate_margin(spec, params, images)
            if margin < checker.FLOAT32_GATE_MARGIN:
                click.echo(f"\nnote: a ReLU or max-pool input of this batch lies {margin:.1e} (relative) from its "
                           "kink, within float32's reach: float32 may flip that gradient gate. --dtype float64 "
                           "compares regardless; in float32, another --seed may keep every gate clear.")
    if any(not r.passed and not r.error for r in results):
        sys.exit(1)
    sys.exit(2 if any(r.error for r in results) else 0)
