"""Parameter, buffer and MAC counts and output shapes, read off the plan.

    >>> import portres
    >>> s = portres.summary(portres.get("resnet50"), input_size=224)
    >>> s.params, round(s.macs / 1e9, 3)
    (25557032, 4.089)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .plan import INPUT, Plan, as_plan
from .spec import ResNetSpec


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

    def stages(self) -> list[dict]:
        """Rows grouped by stem / layerN / head: name, output shape, params, MACs."""
        groups: dict[str, dict] = {}
        for row in self.rows:
            group = row.name.split(".")[0]
            group = group if group.startswith("layer") else ("head" if row.op in ("linear", "global_avg_pool")
                                                             or row.name.startswith("final_") else "stem")
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


def _hw(input_size) -> tuple[int, int]:
    if isinstance(input_size, int):
        return (input_size, input_size)
    height, width = input_size
    return (int(height), int(width))


def infer_shapes(plan: Plan, input_size) -> dict[str, tuple[int, ...]]:
    """Per-sample shape of every value for an input of ``input_size`` (int or (H, W))."""
    check_input_size(plan, input_size)
    height, width = _hw(input_size)
    shapes = {INPUT: (plan.spec.in_channels, height, width)}
    for op in plan.ops:
        shapes[op.output] = op.layer.output_shape(*(shapes[name] for name in op.inputs))
    return shapes


def check_input_size(plan: Plan, input_size) -> None:
    """Raise ``ValueError`` when a side is below the network's total stride.

    Smaller inputs still compute, but the last stages would see nothing but padding.
    """
    height, width = _hw(input_size)
    need = plan.total_stride
    if height < need or width < need:
        raise ValueError(
            f"input {height}x{width} is too small for {plan.spec.name}: its strides downsample by {need}, "
            f"so each side must be at least {need} pixels"
        )


def summary(spec: ResNetSpec | Plan, input_size=224) -> Summary:
    """Counts for ``spec`` at ``input_size`` (int or (H, W)); see the module docstring."""
    plan = as_plan(spec)
    shapes = infer_shapes(plan, input_size)
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
    return Summary(plan.spec.name, _hw(input_size), sum(r.params for r in rows), sum(r.buffers for r in rows),
                   sum(r.macs for r in rows), tuple(rows))


def default_input_size(spec: ResNetSpec) -> int:
    """The input side a network is usually run at: 32 for CIFAR stems, 224 otherwise."""
    return 32 if spec.stem.kind == "cifar" else 224


def activation_bytes(spec: ResNetSpec | Plan, input_size, batch: int, itemsize: int = 8) -> int:
    """Rough peak memory of one forward pass of ``batch`` images: the widest conv's input, output and
    im2col buffer (how the reference convolves), plus every stage output kept for comparisons.

        >>> activation_bytes("resnet50", 224, batch=16) / 2**30 < 4
        True
    """
    plan = as_plan(spec)
    shapes = infer_shapes(plan, input_size)
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
