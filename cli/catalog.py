"""Verbs that describe networks and the installation: list, summary, spec, backends."""

from __future__ import annotations

import json

import click

from portres import analysis, zoo

from .app import giga, load_spec, main, table


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON record per preset.")
def list_presets(as_json):
    """Every preset: family, parameters and MACs at its natural input size."""
    rows = []
    for name in zoo.names():
        entry = zoo.entry(name)
        size = entry.input_size
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
    s = analysis.summary(spec, input_size or zoo.default_input_size(spec))
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
    """Installed backends: devices, framework versions, the BLAS in use (and any rejected), and why any cannot run."""
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
    width = max(len(r["backend"]) for r in report)
    indent = " " * (width + 10)
    for r in report:
        if r["available"]:
            rule = f"; {r['default_device_rule']}" if r.get("default_device_rule") else ""
            click.echo(f"{r['backend']:{width}s}  ok       {r['framework']}; devices: {', '.join(r['devices'])} "
                       f"(default {r['default_device']}{rule})")
            if r.get("opencl"):
                click.echo(f"{indent} OpenCL: {r['opencl']}")
            if r.get("blas"):
                click.echo(f"{indent} BLAS: {r['blas']}")
            if r.get("blas_core"):
                click.echo(f"{indent} BLAS core: {r['blas_core']}")
            for rejected in r.get("blas_rejected", []):  # every library judged unsafe or wrong here, and why
                click.echo(f"{indent} BLAS rejected: {rejected}")
        else:
            click.echo(f"{r['backend']:{width}s}  missing  {r['reason']}")
