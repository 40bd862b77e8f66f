"""``portres export``: a network and its weights as a file another runtime loads (ONNX)."""

from __future__ import annotations

import os

import click

from portres.interop.onnx import OPSET, OPSETS

from .app import load_spec, main, millions


@main.command()
@click.argument("name", required=False)
@click.option("--spec", "spec_file", type=click.Path(), help="A spec JSON file instead of a preset NAME.")
@click.option("--weights", type=click.Path(), help="Weights: .safetensors, .npz or .pth (default: seeded random).")
@click.option("--format", "file_format", type=click.Choice(["onnx"]), default="onnx", show_default=True)
@click.option("-o", "--output", type=click.Path(), help="File to write (default: NAME.onnx).")
@click.option("--no-fold", is_flag=True, help="Keep BatchNormalization nodes instead of folding BN into the convs.")
@click.option("--opset", type=click.IntRange(OPSETS.start, OPSETS.stop - 1), default=OPSET, show_default=True,
              help="ONNX opset; the IR version is the oldest that holds it.")
@click.option("--input-size", type=click.IntRange(min=1), help="Pin height and width (default: dynamic, like batch).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the random weights when --weights is not given.")
@click.option("--features", is_flag=True,
              help="A backbone: the graph's outputs are the stem's and each stage's output (stem, layer1, ...).")
def export(name, spec_file, weights, file_format, output, no_fold, opset, input_size, seed, features):
    """Write a network as an ONNX graph: `input` (batch x C x H x W) in, `logits` out
    (with --features: the stage outputs `stem`, `layer1`, ...).

    The exporter walks the same plan every backend runs; the file passes
    onnx.checker.check_model(full_check=True) before it is written (atomically).
    Needs `pip install 'portres[onnx]'`.
    """
    from portres.interop.onnx import describe, export_onnx
    from portres.plan import make_plan

    spec = load_spec(name, spec_file)
    if input_size is not None:
        make_plan(spec).check_input_size(input_size)
    if weights is not None and not os.path.isfile(weights):
        raise FileNotFoundError(f"weights file {weights} does not exist")
    path = output or f"{spec.name}.onnx"
    model = export_onnx(spec, weights, path, fold_batch_norm=not no_fold, opset=opset, input_size=input_size,
                        seed=seed, features=features)
    report = describe(model)
    kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(report["node_types"].items(), key=lambda i: -i[1]))
    size = f"{input_size}x{input_size}" if input_size else "height x width"
    click.echo(f"wrote {path} ({os.path.getsize(path) / 2**20:,.1f} MiB): {spec.name} as {file_format}, opset "
               f"{report['opset']}, IR version {report['ir_version']}")
    click.echo(f"  {report['nodes']} nodes ({kinds})")
    click.echo(f"  {report['initializers']} initializers, {millions(report['initializer_values'])} values; "
               f"batch norm {'kept as BatchNormalization' if no_fold else 'folded into the convs'}")
    if features:
        stages = ", ".join(f"'{info['name']}' ({info['channels']} channels, 1/{info['reduction']})"
                           for info in make_plan(spec).feature_info())
        click.echo(f"  input 'input': batch x {spec.in_channels} x {size} float32; outputs {stages}")
    else:
        width = spec.num_classes or make_plan(spec).feature_info()[-1]["channels"]  # headless: the pooled features
        click.echo(f"  input 'input': batch x {spec.in_channels} x {size} float32; output 'logits': batch x {width}")
    click.echo("  onnx.checker.check_model(full_check=True): ok")
    if weights is None:
        click.echo(f"note: no --weights given: the file holds seeded random weights (seed {seed}), not a trained "
                   "network", err=True)
