"""Keras Applications' names for portres's plans, and Keras weights files read with h5py.

Keras' ResNet50/101/152 and ResNet50V2/101V2/152V2 (``keras/src/applications/resnet.py``) are
portres's ``keras_resnet*`` presets; what differs from torchvision is in their specs (v1 stride,
conv biases, BN epsilon, last-block strides, zero-padded max pool), and what differs in naming
and layout is here:

* layer names ``conv1_conv``, ``conv1_bn``, ``conv{stage + 1}_block{block + 1}_{k}_conv`` /
  ``_{k}_bn`` (v1) or ``_preact_bn`` and ``_{k}_bn`` after conv ``k`` (v2), ``_0_conv`` / ``_0_bn``
  for projections, ``post_bn`` (v2) and ``predictions``; variables ``kernel``, ``bias``,
  ``gamma``, ``beta``, ``moving_mean``, ``moving_variance``;
* conv kernels are ``(height, width, in, out)`` and Dense kernels ``(in, out)``.

Two spellings of the names are read (see :data:`portres.interop.SCHEMES`):

* named: ``"conv1_conv/kernel"`` - Keras 3's ``variable.path``, Keras 2's ``variable.name``
  (``"conv1_conv/kernel:0"``), and the layer/weight names inside a legacy ``.h5`` file such
  as the Keras Applications downloads (``model.save_weights("x.h5")`` in Keras 2);
* positional (dialect ``"weights.h5"``): Keras 3's ``model.save_weights("x.weights.h5")`` and
  ``.keras`` files name each layer by its class and position in ``model.layers``
  (``layers/conv2d_3/vars/0``); :func:`positional_name_map` recomputes that order from the plan
  the way Keras' functional graph sorts its layers (by depth from the output, ties by a
  depth-first traversal), which the parity tests check against Keras itself.

    >>> name_map(make_plan(portres.get("keras_resnet50")))["conv2_block1_0_conv/kernel"][0]
    'layer1.0.downsample.0.weight'
"""

from __future__ import annotations

import contextlib
import io
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ..plan import INPUT, Op, Plan
from ..tensorfiles import KERAS_FORMATS, ZIP_ERRORS, Entry, WeightsError
from . import HWIO, IDENTITY, IN_OUT, NameMap, NotApplicable, Transform

__all__ = ["KERAS_FORMATS", "KerasLayer", "h5_entries", "keras_graph", "keras_layer_order", "name_map",
           "positional_name_map"]  # KERAS_FORMATS: the suffixes h5_entries reads
_VARIABLES = {  # per Keras layer class: (Keras variable, portres suffix), in Keras' creation order
    "Conv2D": (("kernel", "weight"), ("bias", "bias")),
    "BatchNormalization": (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"),
                           ("moving_variance", "running_var")),
    "Dense": (("kernel", "weight"), ("bias", "bias")),
}
_SNAKE = {"Conv2D": "conv2d", "BatchNormalization": "batch_normalization", "Dense": "dense"}
_BLOCK = re.compile(r"layer(\d+)\.(\d+)\.(.+)")


@dataclass
class KerasLayer:
    """One layer of the Keras functional graph a plan corresponds to."""

    name: str  # Keras layer name
    kind: str  # Keras class name: Conv2D, BatchNormalization, Dense, ZeroPadding2D, Activation, ...
    inputs: list[str]  # the Keras layers it reads, in Keras' call order ("input" is the model input)
    op: Op | None = None  # the plan op it computes (None for Keras' explicit padding layers)
    variables: list[tuple[str, str, Transform]] = field(default_factory=list)  # (Keras var, portres name, transform)


def keras_graph(plan: Plan) -> list[KerasLayer]:
    """The Keras Applications layers that compute ``plan``, in execution order.

    Raises :class:`~portres.interop.NotApplicable` where a parameter has no Keras name (a deep
    stem, avg-down shortcuts): Keras Applications has no such ResNet.
    """
    layers: list[KerasLayer] = []
    producer = {INPUT: INPUT}  # plan value -> the Keras layer that outputs it
    for op in plan.ops:
        name, kind = _layer_name(plan, op)
        inputs = [producer[value] for value in op.inputs]
        if op.kind == "add":
            inputs.reverse()  # Keras adds [shortcut, residual]; the plan's add reads (residual, shortcut)
        if op.kind in ("conv2d", "max_pool") and op.layer.padding and _explicitly_padded(plan, op):
            pad = KerasLayer(_pad_name(name), "ZeroPadding2D", inputs)
            layers.append(pad)
            inputs = [pad.name]
        layer = KerasLayer(name, kind, inputs, op)
        for variable, suffix in _VARIABLES.get(kind, ()):
            portres_name = f"{op.name}.{suffix}"
            if portres_name in op.param_shapes():
                transform = HWIO if kind == "Conv2D" and suffix == "weight" else \
                    IN_OUT if kind == "Dense" and suffix == "weight" else IDENTITY
                layer.variables.append((variable, portres_name, transform))
        layers.append(layer)
        producer[op.output] = name
    return layers


def name_map(plan: Plan) -> NameMap:
    """``{"layer/variable": (portres name, transform)}`` for every parameter and buffer of ``plan``."""
    return {f"{layer.name}/{variable}": (name, transform)
            for layer in keras_graph(plan) for variable, name, transform in layer.variables}


def positional_name_map(plan: Plan) -> NameMap:
    """``{"layers/conv2d_3/vars/0": (portres name, transform)}``: the paths of Keras 3's ``.weights.h5``."""
    counters: dict[str, int] = {}
    result: NameMap = {}
    for layer in keras_layer_order(keras_graph(plan)):
        if layer.kind not in _SNAKE:
            continue
        snake = _SNAKE[layer.kind]
        count = counters.get(snake, 0)
        counters[snake] = count + 1
        path = f"layers/{snake}_{count}" if count else f"layers/{snake}"
        for index, (_, name, transform) in enumerate(layer.variables):
            result[f"{path}/vars/{index}"] = (name, transform)
    return result


def keras_layer_order(layers: list[KerasLayer]) -> list[KerasLayer]:
    """``layers`` in the order of a Keras functional model's ``model.layers``.

    Keras (``keras/src/ops/function.py``, ``map_graph``) walks the graph depth-first from the
    output, numbering each layer when first reached (inputs in call order), gives each layer its
    longest distance to the output as its depth, and sorts by depth (deepest first), then number.
    """
    by_name = {layer.name: layer for layer in layers}
    parents = {layer.name: [name for name in layer.inputs if name in by_name] for layer in layers}
    output = layers[-1].name
    number = {output: 0}
    finished: list[str] = []  # post-order: inputs before the layers that read them
    stack = [(output, iter(parents[output]))]
    done = set()
    while stack:  # iterative: resnet152 chains ~500 layers, near Python's recursion limit
        name, pending = stack[-1]
        for parent in pending:
            if parent not in done:
                number.setdefault(parent, len(number))
                stack.append((parent, iter(parents[parent])))
                break
        else:
            stack.pop()
            if name not in done:
                done.add(name)
                finished.append(name)
    depth: dict[str, int] = {}
    for name in reversed(finished):
        here = depth.setdefault(name, 0)
        for parent in parents[name]:
            depth[parent] = max(depth.get(parent, 0), here + 1)
    return sorted((by_name[name] for name in finished), key=lambda layer: (-depth[layer.name], number[layer.name]))


def _layer_name(plan: Plan, op: Op) -> tuple[str, str]:
    kind = {"conv2d": "Conv2D", "batch_norm": "BatchNormalization", "relu": "Activation", "max_pool": "MaxPooling2D",
            "zero_pad": "ZeroPadding2D", "add": "Add", "global_avg_pool": "GlobalAveragePooling2D",
            "linear": "Dense", "subsample": "MaxPooling2D"}.get(op.kind, op.kind)
    fixed = {"conv1": "conv1_conv", "bn1": "conv1_bn", "relu": "conv1_relu", "maxpool_pad": "pool1_pad",
             "maxpool": "pool1_pool", "final_bn": "post_bn", "final_relu": "post_relu", "avgpool": "avg_pool",
             "fc": "predictions"}
    if op.name in fixed:
        return fixed[op.name], kind
    block = _BLOCK.fullmatch(op.name)
    if block:
        stage, index, rest = block.groups()
        prefix = f"conv{int(stage) + 1}_block{int(index) + 1}"
        suffix = _block_suffix(plan, op, rest)
        if suffix is not None:
            return f"{prefix}_{suffix}", kind
    if op.param_shapes():
        raise NotApplicable(f"Keras Applications' ResNets have no layer for {op.name} ({op.kind}) of "
                            f"{plan.spec.name}; the keras layout names ResNets with a 7x7 stem and B/C shortcuts")
    return op.name, kind  # a parameter-free op Keras has no counterpart of (option-A channel padding)


def _block_suffix(plan: Plan, op: Op, rest: str) -> str | None:
    preact = plan.spec.is_preactivation
    if rest == "downsample.0" and op.kind == "conv2d":
        return "0_conv"
    if rest == "downsample.1" and op.kind == "batch_norm":
        return "0_bn"
    if rest == "add":
        return "out" if preact else "add"
    if rest == "shortcut.subsample":
        return "shortcut_pool"  # Keras' MaxPooling2D(1, strides) has an automatic name and no weights
    match = re.fullmatch(r"(conv|bn|relu)(\d+)", rest)
    if not match:
        return None
    what, k = match.group(1), int(match.group(2))
    if what == "conv":
        return f"{k}_conv"
    if preact:  # bnK/reluK come before convK: Keras calls them preact_* (K = 1) or the (K-1)th conv's
        return f"preact_{what}" if k == 1 else f"{k - 1}_{what}"
    if what == "relu" and op.inputs and op.inputs[0].endswith(".add"):
        return "out"  # the ReLU after the add
    return f"{k}_{what}"


def _explicitly_padded(plan: Plan, op: Op) -> bool:
    # Keras pads the stem's conv and max pool with ZeroPadding2D layers, and ResNetV2 its 3x3 convs;
    # v1's 3x3 convs use padding="same" (no layer). Only the layer order depends on this.
    return op.name in ("conv1", "maxpool") or plan.spec.is_preactivation


def _pad_name(name: str) -> str:
    return {"conv1_conv": "conv1_pad", "pool1_pool": "pool1_pad"}.get(name, name.replace("_conv", "_pad"))


# -- reading Keras weights files ------------------------------------------------------------


def _h5py(path: Path):
    try:
        import h5py
    except ImportError:
        raise WeightsError(f"{path}: reading Keras {path.suffix} files needs h5py: pip install 'portres[keras]'") \
            from None
    return h5py


def _attribute_list(group, name: str) -> list[str]:
    # Keras splits long attribute lists into name0, name1, ... (HDF5's 64 KiB header limit)
    chunks = [group.attrs[name]] if name in group.attrs else []
    index = 0
    while f"{name}{index}" in group.attrs:
        chunks.append(group.attrs[f"{name}{index}"])
        index += 1
    return [item.decode("utf8") if isinstance(item, bytes) else str(item) for chunk in chunks for item in chunk]


@contextlib.contextmanager
def h5_entries(path: Path, file: BinaryIO) -> Iterator[dict[str, Entry]]:
    """The tensors of a Keras ``.h5`` / ``.weights.h5`` / ``.keras`` file open as ``file``.

    A legacy file (``layer_names`` attribute) yields ``"layer/variable"`` names; a Keras 3 file
    yields its dataset paths (``layers/conv2d/vars/0``). Data is read only when asked for.
    """
    h5py = _h5py(path)
    if path.suffix == ".keras":  # a zip holding model.weights.h5 beside the model's config
        try:
            with zipfile.ZipFile(file) as archive:
                file = io.BytesIO(archive.read("model.weights.h5"))
        except KeyError:
            raise WeightsError(f"{path}: a .keras archive without model.weights.h5; save the model with "
                               "Keras 3's model.save()") from None
        except ZIP_ERRORS as error:
            raise WeightsError(f"{path}: not a valid .keras archive ({type(error).__name__}: {error})") from None
    try:
        h5 = h5py.File(file, "r")
    except OSError as error:
        raise WeightsError(f"{path}: not an HDF5 file ({error})") from None
    with h5:
        yield _h5_tensors(path, h5py, h5)


def _h5_tensors(path: Path, h5py, h5) -> dict[str, Entry]:
    def entry(dataset) -> Entry:
        if not isinstance(dataset, h5py.Dataset):
            raise WeightsError(f"{path}: {dataset.name} is not a tensor")
        return Entry(tuple(dataset.shape), dataset.dtype, lambda: _read(path, dataset))

    root = h5["model_weights"] if isinstance(h5.get("model_weights"), h5py.Group) else h5  # a whole saved model
    entries: dict[str, Entry] = {}
    layer_names = _attribute_list(root, "layer_names")
    if layer_names:  # legacy: each layer's group lists its variables' names
        for layer in layer_names:
            if layer not in root:
                raise WeightsError(f"{path}: not a valid Keras weights file (layer {layer!r} is listed but absent)")
            group = root[layer]
            for weight in _attribute_list(group, "weight_names"):
                if weight not in group:
                    raise WeightsError(f"{path}: not a valid Keras weights file ({layer}/{weight} is absent)")
                name = weight if "/" in weight else f"{layer}/{weight}"
                name = name[:-2] if name.endswith(":0") else name
                if name in entries:
                    raise WeightsError(f"{path}: holds two tensors named {name!r}")
                entries[name] = entry(group[weight])
        return entries

    def visit(name, item):
        if isinstance(item, h5py.Dataset):
            entries[name] = entry(item)

    root.visititems(visit)
    return entries


def _read(path: Path, dataset):
    import numpy as np

    try:
        return np.asarray(dataset[()])
    except OSError as error:
        raise WeightsError(f"{path}: cannot read {dataset.name} ({error})") from None
