"""``portres.load``: a network rebuilt from what is on disk, the architecture read off the file.

A portres training checkpoint (or its run directory) records its spec and class names; a plain
weights file (``.pth``/``.pt``, ``.safetensors``, ``.npz``, Keras ``.h5``) is matched against the zoo
by its tensors' names and shapes (every one must fit), or named with ``arch=``.

    >>> model = portres.load("runs/r20")                         # best.safetensors of a `portres train` run
    >>> model = portres.load("resnet50.pth", "mlx")              # recognised as resnet50 (torchvision names)
    >>> model.class_names[:2]
    ('tench', 'goldfish')
"""

from __future__ import annotations

from pathlib import Path

from . import zoo
from .analysis import nearest_presets
from .interop import SCHEMES, match
from .model import Model, build
from .plan import make_plan
from .spec import ResNetSpec
from .tensorfiles import is_training_state
from .weights import WeightsError, describe_weights_file, load_weights
from .zoo import DataConfig


def load(path, backend: str = "numpy", *, arch=None, **options) -> Model:
    """The network stored at ``path`` on ``backend`` (options as :func:`portres.build`: ``device``,
    ``dtype``, ...).

    ``path``: a training checkpoint or run directory (its ``best.safetensors``, else ``last``), built
    with the spec and class names it records; or a weights file, built as the zoo preset whose
    parameters it holds exactly (by name and shape, in torchvision, timm, Keras or mlx-image naming)
    or as ``arch`` (a preset name or ResNetSpec). Raises ``WeightsError`` (a ``ValueError``) in one
    line when the file fits no preset or not ``arch``.

        >>> portres.load("resnet101.safetensors", arch="resnet50")
        WeightsError: resnet101.safetensors does not fit resnet50: it looks like resnet101 (every name and ...
    """
    path = checkpoint_file(path)
    described = checkpoint_description(path)
    if described is not None:
        spec, class_names, data_config = described
        if arch is not None and zoo.resolve(arch) != spec:
            raise WeightsError(f"{path} is a checkpoint of {spec.name}, not {zoo.resolve(arch).name}: "
                               "leave out the architecture (it is recorded in the checkpoint)")
        return build(spec, backend, str(path), class_names=class_names, data_config=data_config, **options)
    spec = zoo.resolve(arch) if arch is not None else recognise(path)
    if arch is not None:
        check_not_another_network(path, spec)
    return build(spec, backend, weights_for(path, spec), **options)


def check_not_another_network(path, spec: ResNetSpec) -> None:
    """One line (``WeightsError``) when the weights file ``path`` holds exactly another preset's parameters."""
    shapes = {name: shape for name, (shape, _) in describe_weights_file(path).items() if not is_training_state(name)}
    expected = {name: shape for name, (shape, _) in make_plan(spec).param_shapes().items()}
    if {name: tuple(shape) for name, shape in shapes.items()} == expected:
        return
    best, matched, total = nearest_presets(shapes)
    if matched == len(shapes) == total and spec.name not in best:
        raise WeightsError(f"{path} does not fit {spec.name}: it looks like {' or '.join(best)} (every name and "
                           f"shape matches); load it as {best[0]} (--arch {best[0]}, or leave the architecture out)")


def checkpoint_file(path) -> Path:
    """``path`` as a file: a run directory's ``best.safetensors`` (else ``last.safetensors``); the file itself."""
    from .training.checkpoint import BEST, LAST

    path = Path(path)
    if path.is_dir():
        for name in (BEST, LAST):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path} is a directory without {BEST} or {LAST}: give a weights file or the "
                                "directory of a `portres train` run")
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    return path


def checkpoint_description(path) -> tuple[ResNetSpec, tuple[str, ...] | None, DataConfig | None] | None:
    """``(spec, class names, data config)`` recorded in the training checkpoint ``path``; None for a plain
    weights file."""
    from .training.checkpoint import CheckpointError, DescriptionError, read_description
    from .training.loop import spec_of_checkpoint

    try:
        description = read_description(path)
    except DescriptionError:  # a checkpoint, but altered: refused, not read as a plain weights file
        raise
    except CheckpointError:
        return None
    names = description.get("class_names")
    spec = spec_of_checkpoint(path)
    return spec, (tuple(names) if names is not None else None), training_data_config(spec, description.get("data"))


def training_data_config(spec: ResNetSpec, record: dict | None) -> DataConfig | None:
    """How a ``portres train`` run prepared its images (``data`` of its checkpoint: size, mean, std) as a
    DataConfig: squashed to the training size, as the folder loader does, and normalised with the data
    set's own statistics. None for checkpoints that predate the record or trained on non-square images
    (the preset's configuration then applies).

        >>> training_data_config(spec, {"image_size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3}).input_size
        32
    """
    if record is None or record["image_size"][0] != record["image_size"][1]:
        return None
    if len(record["mean"]) != spec.in_channels or spec.in_channels not in (1, 3):
        raise WeightsError(f"the checkpoint's data record holds {len(record['mean'])} channel statistics for "
                           f"{spec.name}'s {spec.in_channels} input channels: the file was altered")
    # a run streamed from a folder (portres train --stream) also records its resize + centre crop and channels
    return DataConfig(input_size=record["image_size"][0], resize_size=record.get("resize_size"),
                      interpolation=record.get("interpolation", "bilinear"), mean=tuple(record["mean"]),
                      std=tuple(record["std"]),
                      channel_order=record.get("channel_order", "L" if spec.in_channels == 1 else "RGB"),
                      scale=record.get("scale", "unit"), source="portres train")


def recognise(path) -> ResNetSpec:
    """The zoo preset whose parameters are exactly the tensors of the weights file ``path`` (every name
    and shape, in portres/torchvision naming or another known scheme); the first in zoo order where
    several share every shape (``resnet50`` before ``resnet50_v1``). ``WeightsError`` if none does.

        >>> recognise("resnet18.pth").name
        'resnet18'
    """
    shapes = {name: shape for name, (shape, _) in describe_weights_file(path).items() if not is_training_state(name)}
    best, matched, total = nearest_presets(shapes)
    if matched == len(shapes) == total:
        return zoo.get(best[0])
    for name in zoo.names():  # foreign names (Keras, timm, mlx-image): a scheme naming every tensor, shapes too
        spec = zoo.get(name)
        if any(_fits(scheme, shapes, spec) for scheme in SCHEMES):
            return spec
    closest = " or ".join(best[:3])
    raise WeightsError(f"{path}: its {len(shapes)} tensors are no preset's parameters (closest: {closest}, "
                       f"{matched} of {total} tensors match by name and shape); name the network with arch= "
                       "(--arch NAME or --spec FILE)")


def _fits(scheme, shapes: dict, spec: ResNetSpec) -> bool:
    found = match(scheme, list(shapes), spec)
    if not found.complete:
        return False
    plan_shapes = {name: shape for name, (shape, _) in make_plan(spec).param_shapes().items()}
    normalized = {scheme.normalize(name): tuple(shape) for name, shape in shapes.items()}
    return all(transform.foreign_shape(plan_shapes[target]) == normalized[name]
               for name, (target, transform) in found.name_map.items())


def weights_for(path, spec: ResNetSpec):
    """What :func:`portres.build` loads for ``spec`` from the weights file ``path``: the path itself in
    portres/torchvision naming (a misfit then names the preset it looks like), else the tensors read
    through the naming scheme their names fit."""
    names = {name for name in describe_weights_file(path) if not is_training_state(name)}
    if names & set(make_plan(spec).param_shapes()):
        return str(path)
    return load_weights(path, spec, layout="auto")


__all__ = ["checkpoint_file", "load", "recognise"]
