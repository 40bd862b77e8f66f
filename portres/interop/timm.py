"""timm's names for portres's plans (pytorch-image-models, ``timm/models/resnet.py`` and ``resnetv2.py``).

* Post-activation ResNets (``resnet.py``: resnet50, resnet50d, resnet26d, ...) use torchvision's
  names, which portres already uses, deep stem (``conv1.0/1/3/4/6``) and avg-down shortcuts
  (``downsample.1/2``) included: the map is the identity.
* Pre-activation ResNets (``resnetv2.py``: resnetv2_50, resnetv2_50d, resnetv2_18, ...) name the stem
  ``stem.conv`` (deep: ``stem.conv1/norm1/conv2/norm2/conv3``), block ``j`` of stage ``i``
  ``stages.i.blocks.j`` with ``norm1/conv1/norm2/conv2/norm3/conv3`` (``normK`` is the BN-ReLU before
  ``convK``, portres's ``bnK``) and ``downsample.conv``; the final BN-ReLU is ``norm`` and the
  classifier a 1x1 conv, ``head.fc`` (weight ``(classes, features, 1, 1)``).

Structurally timm's ``resnetv2_50`` is portres's ``resnetv2_50`` (7x7/2 stem conv without norm,
3x3/2 max pool with -inf padding, stride on the 3x3, projections reading the pre-activated input,
no norm on the shortcut), and ``resnetv2_50d`` is ``resnet(50, preactivation=True, deep stem,
avg_down)``. The ``resnetv2_50x1_bit`` family standardises its conv weights (StdConv2d) and uses
GroupNorm: portres has no spec for those.

    >>> name_map(make_plan(portres.get("resnetv2_50")))["head.fc.weight"]
    ('fc.weight', Transform(name='(out, in, 1, 1)->(out, in)', permutation=None, unit_axes=2))
"""

from __future__ import annotations

import re

from ..plan import Plan
from . import CONV_1X1, IDENTITY, NameMap, NotApplicable

_DEEP_STEM = {"conv1.0": "stem.conv1", "conv1.1": "stem.norm1", "conv1.3": "stem.conv2", "conv1.4": "stem.norm2",
              "conv1.6": "stem.conv3"}
_BLOCK = re.compile(r"layer(\d+)\.(\d+)\.(.+)")


def name_map(plan: Plan) -> NameMap:
    """``{timm name: (portres name, transform)}`` for every parameter and buffer of ``plan``."""
    if not plan.spec.is_preactivation:
        return {name: (name, IDENTITY) for name in plan.param_shapes()}
    result: NameMap = {}
    for name in plan.param_shapes():
        op_name, suffix = name.rsplit(".", 1)
        if op_name == "fc":
            result[f"head.fc.{suffix}"] = (name, CONV_1X1 if suffix == "weight" else IDENTITY)
        else:
            result[f"{_preact_op_name(plan, op_name)}.{suffix}"] = (name, IDENTITY)
    return result


def _preact_op_name(plan: Plan, op_name: str) -> str:
    if op_name == "conv1":
        return "stem.conv"
    if op_name in _DEEP_STEM:
        return _DEEP_STEM[op_name]
    if op_name == "final_bn":
        return "norm"
    block = _BLOCK.fullmatch(op_name)
    if block:
        stage, index, rest = block.groups()
        prefix = f"stages.{int(stage) - 1}.blocks.{index}"
        if rest.startswith("bn"):
            return f"{prefix}.norm{rest[2:]}"
        if rest.startswith("conv"):
            return f"{prefix}.{rest}"
        if rest in ("downsample.0", "downsample.1"):  # B/C projection, or avg-down's conv after its pool
            return f"{prefix}.downsample.conv"
    raise NotApplicable(f"timm's ResNetV2 has no name for {op_name} of {plan.spec.name}")
