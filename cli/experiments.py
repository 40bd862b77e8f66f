"""``portres experiment degradation|gradflow|lesion`` (gradflow and lesion also as top-level verbs):
the ResNet papers' experiments, on any backend. See docs/experiments.md."""

from __future__ import annotations

import math
from pathlib import Path

import click

from .app import IMAGE_SIZE, data_for, json_line, main, table


def percent(value) -> str:  # the reports' format, imported lazily (cli modules load no experiment code)
    from portres.experiments.degradation import percent as as_percent

    return as_percent(value)


def _is_file(name: str) -> bool:
    return name.endswith((".safetensors", ".npz", ".pth")) or Path(name).is_file()


def _checkpoint_spec(path: str, fix: str):
    """The network a training checkpoint was trained as (a usage error saying ``fix`` if it is a weights file)."""
    from portres.training.checkpoint import CheckpointError
    from portres.training.loop import spec_of_checkpoint

    try:
        return spec_of_checkpoint(path)
    except CheckpointError as error:
        raise click.UsageError(f"{error}: {fix}" if "is a weights file" in str(error) else str(error)) from None



def _number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}e}" if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e3) else f"{value:.{digits}f}"



@main.group("experiment")
def experiment():
    """The ResNet papers' experiments: degradation, gradient flow, lesions (docs/experiments.md)."""


@experiment.command("degradation")
@click.option("--nets", default="plain20,plain56,resnet20,resnet56", show_default=True,
              help="Comma-separated presets, trained one after the other with one recipe, seed and data order.")
@click.option("--data", default="digits", show_default=True, help="digits (minutes on a CPU) or cifar10 (the paper).")
@click.option("--data-dir", type=click.Path(), help="Where the data set's files are (CIFAR archives).")
@click.option("--backend", default="mlx", show_default=True, help="numpy, tinygrad, mlx or torch.")
@click.option("--device", help="Backend device (mlx: cpu, gpu; torch: cpu, cuda; tinygrad: CPU, CUDA).")
@click.option("--epochs", type=click.IntRange(min=1), help="Default: digits 20, cifar10 164 (the paper).")
@click.option("--batch-size", type=click.IntRange(min=2), help="Default: digits 64, cifar10 128.")
@click.option("--lr", type=float, help="Peak learning rate (default 0.1).")
@click.option("--weight-decay", type=float, help="Default 1e-4 (the paper).")
@click.option("--schedule", type=click.Choice(["constant", "multistep", "cosine"]),
              help="Default: digits cosine, cifar10 multistep (/10 at 32k and 48k iterations).")
@click.option("--warmup-epochs", type=click.FloatRange(min=0),
              help="Linear warm-up from lr/10 (default: digits a tenth of the epochs; cifar10 none, as the paper "
                   "for depth <= 56).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--limit-train", type=click.IntRange(min=2), help="Train on the first N images only (quick runs).")
@click.option("--out", default="runs/degradation", show_default=True, type=click.Path(), help="Output directory.")
@click.option("--resume", is_flag=True, help="Continue each network's run from OUT/<net>/last.safetensors.")
@click.option("--overwrite", is_flag=True, help="Replace the runs already in OUT/<net>/ (refused without it).")
def degradation(nets, data, data_dir, backend, device, epochs, batch_size, lr, weight_decay, schedule, warmup_epochs,
                seed, limit_train, out, resume, overwrite):
    """Train plain and residual twins with one recipe: OUT/report.md, OUT/degradation.png (training
    error per epoch: plain dashed, residual solid), OUT/results.json, and each run in OUT/<net>/.

    \b
        portres experiment degradation                                   # digits, MLX, CPU: minutes
        portres experiment degradation --data cifar10 --data-dir DIR --epochs 164 --backend torch --device cuda
    """
    from portres import backends as registry
    from portres.experiments.degradation import DegradationConfig, run_degradation

    if reason := registry.unavailable_reason(backend, device):
        raise registry.BackendUnavailable(f"backend {backend!r} cannot run: {reason}")
    names = tuple(dict.fromkeys(name.strip() for name in nets.split(",") if name.strip()))
    if not names:
        raise click.UsageError("--nets names no network; give e.g. plain20,plain56,resnet20,resnet56")
    config = DegradationConfig(out=out, nets=names, data=data, data_dir=data_dir, backend=backend, device=device,
                               epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                               schedule=schedule, warmup_epochs=warmup_epochs, seed=seed, limit_train=limit_train,
                               overwrite=overwrite)
    results = run_degradation(config, resume=resume)
    rows = [[row["network"], row["family"], row["depth"], f"{row['params']:,}", percent(row["final_train_error"]),
             percent(row["final_test_error"]), percent(row["best_test_error"])] for row in results["nets"]]
    click.echo(table(["network", "family", "depth", "params", "final train error", "test error", "best test"], rows,
                     right={2, 3, 4, 5, 6}))
    for family, found in results["effect"].items():
        click.echo(f"{family}: {found['deep']} {percent(found['deep_train_error'])} vs {found['shallow']} "
                   f"{percent(found['shallow_train_error'])} final train error: {found['expected']}: "
                   f"{'shown' if found['shown'] else 'NOT shown'}")
    click.echo(f"{results['seconds'] / 60:.1f} min; report: {Path(out) / 'report.md'}")


@click.command("gradflow")
@click.argument("names", nargs=-1, required=True)
@click.option("--backend", default="mlx", show_default=True, help="numpy, tinygrad, mlx or torch.")
@click.option("--device", help="Backend device.")
@click.option("--dtype", type=click.Choice(["float64", "float32"]), default="float64", show_default=True,
              help="float64: the same numbers on every backend (deep plain nets amplify float32 rounding).")
@click.option("--weights", type=click.Path(), help="Weights or a checkpoint for the one NAME (default: init).")
@click.option("--data", help="Take the batch from this data set's test split (default: Gaussian images).")
@click.option("--data-dir", type=click.Path(), help="Where the data set's files are.")
@click.option("--image-size", type=IMAGE_SIZE, help="digits/folder: square side images are resized to.")
@click.option("--batch", type=click.IntRange(min=2), default=16, show_default=True, help="Images in the loss's batch.")
@click.option("--input-size", type=click.IntRange(min=1), help="Gaussian images' side (default 32 for CIFAR nets).")
@click.option("--line-points", type=click.IntRange(min=3), default=32, show_default=True,
              help="Points on the line of inputs for the shattered-gradients measure.")
@click.option("--line-radius", type=click.FloatRange(min=0, min_open=True), default=0.01, show_default=True,
              help="The line's half-length per pixel, relative to the data's deviation.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per network on stdout.")
@click.option("--plot", type=click.Path(), help="Write the four-panel figure here (PNG).")
def gradflow(names, backend, device, dtype, weights, data, data_dir, image_size, batch, input_size, line_points,
             line_radius, seed, as_json, plot):
    """Gradient flow at initialisation (or for --weights): per block, the loss's gradient norm at the
    block's input and at its conv weights, the 3x3 convs' response deviation after BN, and the
    correlation of gradients at neighbouring inputs (shattered gradients). One batch, train-mode BN.

    \b
        portres gradflow plain56 resnet56 resnetv2_56 --plot gradflow.png
        portres gradflow runs/degradation/resnet56/best.safetensors --data digits
    """
    from portres import backends as registry
    from portres import zoo
    from portres.experiments.gradflow import data_batch, gradient_flow

    if reason := registry.unavailable_reason(backend, device):
        raise registry.BackendUnavailable(f"backend {backend!r} cannot run: {reason}")
    if weights is not None and len(names) != 1:
        raise click.UsageError(f"--weights belongs to one network, but {len(names)} are named: give one NAME, or "
                               "name checkpoints themselves as NAMEs")
    jobs = []
    for name in names:
        if name in zoo.names():
            jobs.append((zoo.get(name), weights, True))  # a preset is fitted to the data's channels and classes
        elif _is_file(name):
            if not Path(name).is_file():
                raise FileNotFoundError(f"no checkpoint at {name}")
            jobs.append((_checkpoint_spec(name, "give a preset as NAME and this file as --weights"), name, False))
        else:
            zoo.get(name)  # the unknown-preset error, with the closest names
    flows = []
    for spec, weights_of, fit in jobs:
        images = labels = None
        if data is not None:
            data_used, options = data_for(weights_of, data, image_size, None)
            # a checkpoint's own network is checked against the data, never rewritten to fit it
            spec, images, labels = data_batch(spec, data_used, data_dir, batch, fit=fit, **options)
        flow = gradient_flow(spec, backend, weights=weights_of, images=images, labels=labels, batch=batch,
                             input_size=input_size, line_points=line_points, line_radius=line_radius, seed=seed,
                             dtype=dtype, device=device)
        flows.append(flow.to_dict())
        if as_json:
            click.echo(json_line(flows[-1]))
        else:
            _print_flow(flows[-1])
    if not as_json and len(flows) > 1:
        _print_comparison(flows)
    if plot:
        from portres.experiments.plots import plot_gradflow

        note = plot_gradflow(plot, flows)
        click.echo(note or f"wrote {plot}", err=as_json)


def _print_flow(flow: dict) -> None:
    click.echo(f"{flow['network']} ({flow['family']}), {flow['weights']}, {flow['backend']} {flow['dtype']}, batch "
               f"{flow['batch']} of {flow['input_size']}x{flow['input_size']}: loss {flow['loss']:.4f}; correlation of "
               f"neighbouring inputs' gradients at the image {flow['input_line_correlation']:.3f}")
    rows = [[row["block"], _number(row["grad_norm"]), f"{row['line_correlation']:.3f}",
             _number(row["weight_grad_norm"]), _number(row["response_std"])] for row in flow["blocks"]]
    output = flow["output"]
    rows.append(["(output)", _number(output["grad_norm"]), f"{output['line_correlation']:.3f}", "", ""])
    click.echo(table(["block", "|dL/d input|", "grad corr", "|dL/dW| convs", "response std"], rows,
                     right={1, 2, 3, 4}))
    click.echo("")


def _print_comparison(flows: list[dict]) -> None:
    first = [(flow["network"], flow["blocks"][0] if flow["blocks"] else flow["output"]) for flow in flows]
    click.echo("first block's input: " + "; ".join(
        f"{name} |dL/dx| {_number(row['grad_norm'])}, grad corr {row['line_correlation']:.3f}" for name, row in first))


@click.command("lesion")
@click.option("--arch", "name", help="The preset the weights were trained as (default: the checkpoint's own spec).")
@click.option("--weights", "weights", multiple=True, required=True, type=click.Path(),
              help="A trained network's weights or checkpoint; repeat to compare checkpoints (e.g. a plain twin).")
@click.option("--data", help="The data set whose test split is used (default: the checkpoint's; else digits).")
@click.option("--data-dir", type=click.Path(), help="Where the data set's files are.")
@click.option("--image-size", type=IMAGE_SIZE, help="digits/folder: square side images are resized to.")
@click.option("--backend", default="mlx", show_default=True,
              help="numpy, tinygrad, mlx, torch or onnxruntime (path gradients then on numpy).")
@click.option("--device", help="Backend device.")
@click.option("--draws", type=click.IntRange(min=1), default=5, show_default=True,
              help="Random sets of k deleted blocks per k.")
@click.option("--path-samples", type=click.IntRange(min=1), default=3, show_default=True,
              help="Random paths per path length for the gradient share.")
@click.option("--path-batch", type=click.IntRange(min=2), default=32, show_default=True,
              help="Training images the path gradients are measured on.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per network on stdout.")
@click.option("--plot", type=click.Path(), help="Write the figure here (PNG).")
def lesion(name, weights, data, data_dir, image_size, backend, device, draws, path_samples, path_batch, seed, as_json,
           plot):
    """Lesion study (Veit et al. 2016): test error after deleting each single block (a residual block
    becomes its shortcut; a plain block, where it keeps the shape, the identity), after deleting k
    random blocks, and for residual nets the path-length distribution and each length's gradient.

    \b
        portres lesion --weights runs/degradation/resnet56/best.safetensors \\
                       --weights runs/degradation/plain56/best.safetensors --plot lesion.png
        portres lesion --arch resnet56 --weights r56.safetensors --data digits --plot lesion.png
    """
    from portres import backends as registry
    from portres import zoo
    from portres.experiments.lesion import lesion_study

    if reason := registry.unavailable_reason(backend, device):
        raise registry.BackendUnavailable(f"backend {backend!r} cannot run: {reason}")
    if name is not None and len(weights) != 1:
        raise click.UsageError(f"--arch names the network of one --weights, but {len(weights)} are given: name "
                               "checkpoints only (their network is read from them)")
    for path in weights:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no weights file at {path}")
    specs = [zoo.get(name)] if name is not None else \
        [_checkpoint_spec(path, "name the network with --arch") for path in weights]
    studies = []
    for spec, path in zip(specs, weights):
        data_used, options = data_for(path, data, image_size, "digits")
        study = lesion_study(spec, backend, path, data_used, data_dir=data_dir, data_options=options,
                             fit_to_data=name is not None, device=device, draws=draws, path_samples=path_samples,
                             path_batch=path_batch, seed=seed,
                             progress=lambda text: click.echo(text, err=True))
        studies.append(study.to_dict())
        if as_json:
            click.echo(json_line(studies[-1]))
        else:
            _print_study(studies[-1])
    if plot:
        from portres.experiments.plots import plot_lesion

        note = plot_lesion(plot, studies)
        click.echo(note or f"wrote {plot}", err=as_json)


def _print_study(study: dict) -> None:
    baseline = study["baseline_error"]
    click.echo(f"{study['network']} ({study['family']}) on {study['data']} test ({study['test_images']:,} images, "
               f"{study['backend']}): intact test error {percent(baseline)}")
    click.echo(table(["deleted block", "test error", "change"],
                     [[row["block"], percent(row["test_error"]), f"{100 * (row['test_error'] - baseline):+.2f}"]
                      for row in study["single"]], right={1, 2}))
    click.echo("")
    click.echo(table(["k deleted", "draws", "mean error", "std", "min", "max"],
                     [[row["k"], row["draws"], percent(row["mean"]), percent(row["std"]), percent(row["min"]),
                       percent(row["max"])] for row in study["random"]], right={0, 1, 2, 3, 4, 5}))
    paths = study["paths"]
    if paths:
        click.echo("")
        click.echo(table(["path length", "paths", "share of paths", "|gradient| per path", "share of gradient"],
                         [[k, f"{count:,}", f"{share:.4f}", _number(norm), f"{part:.4f}"]
                          for k, count, share, norm, part in zip(paths["lengths"], paths["count"],
                                                                 paths["share_of_paths"], paths["gradient_norm"],
                                                                 paths["share_of_gradient"])],
                         right={0, 1, 2, 3, 4}))
    click.echo("")


main.add_command(gradflow)
main.add_command(lesion)
experiment.add_command(gradflow)
experiment.add_command(lesion)

__all__ = ["degradation", "experiment", "gradflow", "lesion"]
