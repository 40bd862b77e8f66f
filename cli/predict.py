"""``portres predict`` and ``portres embed``: a trained network on photos, with its own preprocessing.

    portres predict china.jpg flower.jpg --arch resnet50 --weights resnet50.pth --backend mlx
    portres predict photos/ --weights runs/flowers --json            # a `portres train` run: its spec and classes
    portres embed photos/ --arch resnet50 --weights resnet50.pth -o embeddings.npy

Images are prepared as the network's weights expect (``portres.data_config``), in batches; a bad
image, a weights file of another network or an unknown stage is one line and exit status 2, with
nothing written.
"""

from __future__ import annotations

import os
import sys

import click
import numpy as np

from .app import json_line, load_spec, main, table


def _network_options(function):
    """The options naming the network and where it runs, shared by predict and embed."""
    for option in reversed([
        click.option("--arch", "name", help="A zoo preset (default: what the weights file records or holds)."),
        click.option("--spec", "spec_file", type=click.Path(), help="A spec JSON file instead of --arch."),
        click.option("--weights", required=True, type=click.Path(),
                     help="A weights file (.pth, .safetensors, .npz, Keras .h5) or a `portres train` checkpoint "
                          "or run directory."),
        click.option("--backend", default="numpy", show_default=True,
                     help="numpy, tinygrad, mlx, torch or onnxruntime."),
        click.option("--device", help="The backend's device (default: its own)."),
        click.option("--batch-size", type=click.IntRange(min=1, max=4096), default=16, show_default=True,
                     help="Images per forward pass."),
    ]):
        function = option(function)
    return function


def load_network(name, spec_file, weights, backend, device):
    """The model ``--weights`` holds, built as ``--arch``/``--spec`` if given, else as recorded or recognised."""
    import portres

    arch = load_spec(name, spec_file) if name is not None or spec_file is not None else None
    return portres.load(weights, backend, arch=arch, device=device)


def batches_of(paths: list, batch_size: int):
    """``paths`` in runs of ``batch_size``, with a progress bar on stderr when there is more than one run."""
    runs = [paths[start:start + batch_size] for start in range(0, len(paths), batch_size)]
    if len(runs) == 1:
        yield from runs
        return
    with click.progressbar(length=len(paths), label="images", file=sys.stderr) as bar:
        for run in runs:
            yield run
            bar.update(len(run))


def top_classes(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(classes, probabilities)`` of the ``k`` most probable classes per row (softmax in float64), best first.

        >>> top_classes(np.array([[0.0, 2.0, 1.0]]), 2)[0].tolist()
        [[1, 2]]
    """
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(shifted)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    classes = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return classes, np.take_along_axis(probabilities, classes, axis=1)


@main.command()
@click.argument("images", nargs=-1, required=True)
@_network_options
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True, help="Classes shown per image.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON line per image: image and top (class, label, probability).")
def predict(images, name, spec_file, weights, backend, device, batch_size, top, as_json):
    """Classify IMAGES (files or folders of images) with a trained network.

    Each image is prepared as the network's weights expect (resize, centre crop, normalisation:
    `portres.data_config`); the top classes are printed per image with their labels: ImageNet's for
    a 1000-class network, a `portres train` run's own class names for its checkpoints.
    """
    from portres.images import image_paths, preprocess

    paths = image_paths(images)
    model = load_network(name, spec_file, weights, backend, device)
    if model.spec.num_classes == 0:
        raise ValueError(f"{model.spec.name} is headless (num_classes=0): it has no classes to predict; "
                         "use `portres embed`")
    k = min(top, model.spec.num_classes)
    names = model.class_names
    label = (lambda index: names[index]) if names is not None else (lambda index: f"class {index}")
    results = []  # printed once every image has been read: a bad image leaves nothing half-printed
    for run in batches_of(paths, batch_size):
        classes, probabilities = top_classes(model(preprocess(run, config=model.data_config)), k)
        for path, row_classes, row_probabilities in zip(run, classes, probabilities):
            results.append((str(path), [{"class": int(c), "label": label(int(c)), "probability": float(p)}
                                        for c, p in zip(row_classes, row_probabilities)]))
    for index, (path, ranked) in enumerate(results):
        if as_json:
            click.echo(json_line({"image": path, "top": ranked}))
            continue
        if index:
            click.echo()
        click.echo(path)
        rows = [[rank, entry["class"], entry["label"], f"{entry['probability']:.4f}"]
                for rank, entry in enumerate(ranked, start=1)]
        click.echo(table(["rank", "class", "label", "probability"], rows, right={0, 1, 3}))


@main.command()
@click.argument("images", nargs=-1, required=True)
@_network_options
@click.option("--stage", help="Pool this stage's output instead of the last (stem, layer1, ...).")
@click.option("-o", "--output", required=True, type=click.Path(), help="The .npy file to write: (N, C) float32.")
def embed(images, name, spec_file, weights, backend, device, batch_size, stage, output):
    """Write the globally pooled features of IMAGES (files or folders) as an (N, C) float32 .npy file.

    By default the classifier's input (the last stage, pooled); --stage pools another stage's
    output. Rows follow the images in the order given, folders expanded and sorted.
    """
    from portres.images import image_paths, preprocess
    from portres.tensorfiles import atomic_write

    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"cannot write {output}: the folder {parent} does not exist (create it first)")
    if os.path.isdir(output):
        raise IsADirectoryError(f"cannot write {output}: it is a folder; give a file name such as {output}/out.npy")
    paths = image_paths(images)
    model = load_network(name, spec_file, weights, backend, device)
    stages = [info["name"] for info in model.feature_info]
    if stage is not None and stage not in stages:
        raise ValueError(f"unknown stage {stage!r} of {model.spec.name}: choose from {', '.join(stages)}")
    rows = []
    for run in batches_of(paths, batch_size):
        x = preprocess(run, config=model.data_config)
        pooled = model.embed(x) if stage is None else model.features(x, [stage])[stage].mean(axis=(2, 3))
        rows.append(np.asarray(pooled, np.float32))
    embeddings = np.concatenate(rows, axis=0)
    atomic_write(output, lambda file: np.save(file, embeddings))
    what = f"{stage}, pooled" if stage is not None else "pooled features"
    click.echo(f"wrote {output}: {embeddings.shape[0]} x {embeddings.shape[1]} float32 ({what} of "
               f"{model.spec.name} on {model.backend.name}), one row per image in the order given", err=True)
