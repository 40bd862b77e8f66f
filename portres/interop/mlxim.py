"""mlx-image's (``mlxim``) names for portres's plans: its ResNets are torchvision's, in MLX.

``mlxim/model/resnet/resnet.py`` builds torchvision's modules with ``mlx.nn``, and its
``.safetensors`` hold ``tree_flatten(model.parameters())`` (BN running statistics included).
Two things differ from torchvision: ``mlx.nn.Sequential`` keeps its children in a ``layers``
list, so ``layer1.0.conv1`` is ``layer1.layers.0.conv1`` and ``downsample.0`` is
``downsample.layers.0``; and MLX convolution weights are ``(out, height, width, in)``. Linear
weights are ``(out, in)`` as in torch.

    >>> name_map(make_plan(portres.get("resnet50")))["layer1.layers.0.downsample.layers.0.weight"]
    ('layer1.0.downsample.0.weight', Transform(name='OHWI->OIHW', permutation=(0, 3, 1, 2), unit_axes=0))
"""

from __future__ import annotations

import re

from ..plan import Plan
from . import IDENTITY, OHWI, NameMap

# a torchvision-style Sequential child: "layerI.J", "downsample.K", the deep stem's "conv1.K"
_SEQUENTIAL_CHILD = re.compile(r"(^|\.)(layer\d+|downsample|conv1)\.(\d+)(?=\.)")


def name_map(plan: Plan) -> NameMap:
    """``{mlx-image name: (portres name, transform)}`` for every parameter and buffer of ``plan``."""
    convs = {op.name for op in plan.ops if op.kind == "conv2d"}
    result: NameMap = {}
    for name in plan.param_shapes():
        op_name, suffix = name.rsplit(".", 1)
        foreign = _SEQUENTIAL_CHILD.sub(r"\1\2.layers.\3", name)
        result[foreign] = (name, OHWI if op_name in convs and suffix == "weight" else IDENTITY)
    return result
