"""Parameter, buffer and MAC counts, output shapes and memory, read off the plan; which preset a set
of parameter shapes was made for.

    >>> import portres
    >>> s = portres.summary(portres.get("resnet50"), input_size=224)
    >>> s.params, round(s.macs / 1e9, 3)
    (25557032, 4.089)
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from . import zoo
from .plan import INPUT, Plan, as_plan, image_side
from .spec import ResNetSpec
from .tensorfiles import is_training_state


@dataclass(frozen=True)
class OpRow:
    name: str  # op name (parameter prefix)
    op: str  # op kind: conv2d, batch_norm, ...
    output_shape: tuple[int, ...]  # per sample: (C, H, W) or (F,)
    params: int  # trainable parameters of this op
    buffers: int  # running statistics of this op
    macs: int  # multiply-accumulates per sample


@dataclass(frozen=True)
class Summary:
    name: str  # the spec's name
    input_size: tuple[int, int]  # (height, width) the counts were taken at
    params: int  # trainable parameters
    buffers: int  # BN running statistics (mean and variance entries)
    macs: int  # multiply-accumulates per image
    rows: tuple[OpRow, ...]  # one per op, in plan order
    parts: tuple[str, ...] = field(repr=False)  # per row: "stem", its stage ("layer2") or "head"

    def stages(self) -> list[dict]:
        """Rows grouped by stem / layerN / head: name, output shape, params, MACs."""
        groups: dict[str, dict] = {}
        for row, group in zip(self.rows, self.parts):
            entry = groups.setdefault(group, {"stage": group, "output_shape": row.output_shape,
                                              "params": 0, "macs": 0})
            entry["output_shape"] = row.output_shape
            entry["params"] += row.params
            entry["macs"] += row.macs
        return list(groups.values())

    def to_dict(self) -> dict:
        return {"name": self.name, "input_size": list(self.input_size), "params": self.params,
                "buffers": self.buffers, "macs": self.macs, "stages": self.stages(),
                "ops": [dict(row.__dict__, output_shape=list(row.output_shape)) for row in self.rows]}


def infer_shapes(plan: Plan, input_size) -> dict[str, tuple[int, ...]]:
    """Per-sample shape of every value for an input of ``input_size`` (int or (H, W)): ``plan.shapes``."""
    return plan.shapes(input_size)


def check_input_size(plan: Plan, input_size) -> None:
    """Raise ``ValueError`` when a side is below the network's total stride: ``plan.check_input_size``."""
    plan.check_input_size(input_size)


def summary(spec: ResNetSpec | Plan, input_size=224) -> Summary:
    """Counts for ``spec`` at ``input_size`` (int or (H, W)); see the module docstring."""
    plan = as_plan(spec)
    shapes = plan.shapes(input_size)
    rows = []
    for op in plan.ops:
        params = buffers = 0
        for shape, trainable in op.param_shapes().values():
            if trainable:
                params += math.prod(shape)
            else:
                buffers += math.prod(shape)
        macs = op.layer.macs(*(shapes[name] for name in op.inputs))
        rows.append(OpRow(op.name, op.kind, shapes[op.output], params, buffers, macs))
    return Summary(plan.spec.name, image_side(input_size), sum(r.params for r in rows), sum(r.buffers for r in rows),
                   sum(r.macs for r in rows), tuple(rows), tuple(plan.parts[op.name] for op in plan.ops))


def activation_bytes(spec: ResNetSpec | Plan, input_size, batch: int, itemsize: int = 8) -> int:
    """Rough peak memory of one forward pass of ``batch`` images: the widest conv's input, output and
    im2col buffer (how the reference convolves), plus every stage output kept for comparisons.

        >>> activation_bytes("resnet50", 224, batch=16) / 2**30 < 4
        True
    """
    plan = as_plan(spec)
    shapes = plan.shapes(input_size)
    widest = 0
    for op in plan.ops:
        inputs = sum(math.prod(shapes[name]) for name in op.inputs)
        output = math.prod(shapes[op.output])
        columns = output // op.layer.out_channels * op.layer.in_channels * op.layer.kernel_size ** 2 \
            if op.kind == "conv2d" else 0
        widest = max(widest, inputs + output + columns)
    kept = sum(math.prod(shapes[value]) for _, value in plan.features) + math.prod(shapes[INPUT])
    return (widest + kept) * batch * itemsize


def available_memory_bytes() -> int | None:
    """Memory the OS says a new allocation can get (Linux ``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@functools.cache
def _parameter_signature(spec: ResNetSpec) -> frozenset[tuple[str, tuple[int, ...]]]:
    return frozenset((name, tuple(shape)) for name, (shape, _) in as_plan(spec).param_shapes().items())


def nearest_presets(shapes: Mapping[str, tuple[int, ...]]) -> tuple[list[str], int, int]:
    """The zoo presets whose parameters best match ``shapes`` (name -> shape) by name and shape.

    Returns the presets tied for the best match (several when architectures share every shape,
    e.g. ``resnet50`` and ``resnet50_v1``), how many tensors of ``shapes`` they match and how
    many tensors they have; training state (``num_batches_tracked``, optimiser slots) is ignored.

        >>> nearest_presets({k: v.shape for k, v in portres.init_params(portres.get("resnet101")).items()})
        (['resnet101', 'resnet101_v1'], 522, 522)
    """
    given = {(name, tuple(shape)) for name, shape in shapes.items() if not is_training_state(name)}
    best, best_score, matched, total = [], -1.0, 0, 0
    for name in zoo.names():
        signature = _parameter_signature(zoo.get(name))
        common = len(given & signature)
        score = common / max(1, len(given | signature))  # Jaccard: penalises extra and missing tensors alike
        if score > best_score:
            best, best_score, matched, total = [name], score, common, len(signature)
        elif score == best_score:
            best.append(name)
    return best, matched, total
