"""spec -> plan: the one place the architecture is written down.

A :class:`Plan` is an immutable, flat sequence of :class:`Op` s. Each op names the values
it reads, the value it writes and its layer (conv, batch norm, relu, pool, add, linear,
...). Parameter names are the op name plus a suffix (``layer1.0.conv1.weight``) and are
torchvision's state_dict keys wherever torchvision has the model::

    >>> import portres
    >>> plan = portres.make_plan(portres.get("resnet18"))
    >>> [op.name for op in plan.ops[:4]]
    ['conv1', 'bn1', 'relu', 'maxpool']
    >>> plan.ops[1].inputs
    ('conv1',)

Backends never re-derive the architecture: they execute ops (see :func:`run_plan`). The plan
also records each residual block (:class:`Block`), so nothing recovers the structure from names.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import ClassVar

from .spec import ResNetSpec, SpecError
from .zoo import resolve as resolve_spec

INPUT = "input"  # the value name of the network input


# -- layers: what one op computes, with its parameter shapes and output shape --------


@dataclass(frozen=True)
class Layer:
    kind: ClassVar[str]

    def param_shapes(self) -> dict[str, tuple[tuple[int, ...], bool]]:
        """``{suffix: (shape, trainable)}``; buffers (running statistics) are not trainable."""
        return {}

    def output_shape(self, *shapes: tuple[int, ...]) -> tuple[int, ...]:
        """Per-sample output shape ``(C, H, W)`` or ``(F,)`` from the input shapes."""
        return shapes[0]

    def macs(self, *shapes: tuple[int, ...]) -> int:
        """Multiply-accumulates per sample."""
        return 0

    def problem(self) -> str | None:
        """Why this layer cannot be computed, or None."""
        return None


@dataclass(frozen=True)
class Conv2d(Layer):
    kind: ClassVar[str] = "conv2d"
    in_channels: int  # input channels
    out_channels: int  # output channels
    kernel_size: int  # square kernel side
    stride: int = 1  # step in both spatial dims
    padding: int = 0  # zeros added on every side
    groups: int = 1  # channel groups (ResNeXt cardinality)
    bias: bool = False  # a per-channel shift: where spec.conv_bias asks, and after batch-norm folding

    def problem(self):
        for what, channels in (("input", self.in_channels), ("output", self.out_channels)):
            if channels % self.groups:
                return f"groups={self.groups} does not divide its {channels} {what} channels"
        return None

    def param_shapes(self):
        weight = (self.out_channels, self.in_channels // self.groups, self.kernel_size, self.kernel_size)
        shapes = {"weight": (weight, True)}
        if self.bias:
            shapes["bias"] = ((self.out_channels,), True)
        return shapes

    def output_shape(self, shape):
        channels, height, width = shape
        _expect_channels(self, channels, self.in_channels)
        side = lambda n: (n + 2 * self.padding - self.kernel_size) // self.stride + 1  # noqa: E731
        return (self.out_channels, side(height), side(width))

    def macs(self, shape):
        _, height, width = self.output_shape(shape)
        per_pixel = self.in_channels // self.groups * self.kernel_size**2 * self.out_channels
        return height * width * per_pixel


@dataclass(frozen=True)
class BatchNorm(Layer):
    kind: ClassVar[str] = "batch_norm"
    channels: int  # normalised channels
    eps: float  # added to the variance
    zero_init: bool = False  # init the scale to 0 (last BN of a block, when the spec asks)

    def param_shapes(self):
        vector = (self.channels,)
        return {"weight": (vector, True), "bias": (vector, True),
                "running_mean": (vector, False), "running_var": (vector, False)}

    def output_shape(self, shape):
        _expect_channels(self, shape[0], self.channels)
        return shape


@dataclass(frozen=True)
class ChannelAffine(Layer):
    """``x * scale + shift`` per channel: an eval-mode BN with its statistics folded in."""

    kind: ClassVar[str] = "channel_affine"
    channels: int  # scaled channels

    def param_shapes(self):
        return {"scale": ((self.channels,), True), "shift": ((self.channels,), True)}

    def output_shape(self, shape):
        _expect_channels(self, shape[0], self.channels)
        return shape


@dataclass(frozen=True)
class ReLU(Layer):
    kind: ClassVar[str] = "relu"


@dataclass(frozen=True)
class MaxPool(Layer):
    kind: ClassVar[str] = "max_pool"
    kernel_size: int  # window side
    stride: int  # window step
    padding: int  # -inf padding on every side

    def output_shape(self, shape):
        side = lambda n: (n + 2 * self.padding - self.kernel_size) // self.stride + 1  # noqa: E731
        return (shape[0], side(shape[1]), side(shape[2]))


@dataclass(frozen=True)
class ZeroPad(Layer):
    """Zeros added around the spatial dims: Keras' ZeroPadding2D before a valid max pool."""

    kind: ClassVar[str] = "zero_pad"
    padding: int  # zero rows and columns added on every side

    def output_shape(self, shape):
        return (shape[0], shape[1] + 2 * self.padding, shape[2] + 2 * self.padding)


@dataclass(frozen=True)
class AvgPool(Layer):
    """Average pool with ceil-mode output size, dividing by the in-bounds count.

    Matches ``torch.nn.AvgPool2d(k, s, ceil_mode=True, count_include_pad=False)``:
    a partial window at the bottom/right edge averages only the pixels it covers.
    """

    kind: ClassVar[str] = "avg_pool"
    kernel_size: int  # window side
    stride: int  # window step

    def output_shape(self, shape):
        side = lambda n: max(math.ceil((n - self.kernel_size) / self.stride), 0) + 1  # noqa: E731
        return (shape[0], side(shape[1]), side(shape[2]))


@dataclass(frozen=True)
class Subsample(Layer):
    """``x[:, :, ::stride, ::stride]``: option-A shortcuts."""

    kind: ClassVar[str] = "subsample"
    stride: int  # keep every stride-th row and column, starting at 0

    def output_shape(self, shape):
        return (shape[0], -(-shape[1] // self.stride), -(-shape[2] // self.stride))


@dataclass(frozen=True)
class PadChannels(Layer):
    """Zero channels added before and after: option-A shortcuts."""

    kind: ClassVar[str] = "pad_channels"
    before: int  # zero channels in front
    after: int  # zero channels behind

    def output_shape(self, shape):
        return (shape[0] + self.before + self.after, *shape[1:])


@dataclass(frozen=True)
class Add(Layer):
    kind: ClassVar[str] = "add"

    def output_shape(self, first, second):
        if first != second:
            raise ValueError(f"add of mismatched shapes {first} and {second}")
        return first


@dataclass(frozen=True)
class GlobalAvgPool(Layer):
    """Mean over the spatial dims: ``(C, H, W) -> (C,)``."""

    kind: ClassVar[str] = "global_avg_pool"

    def output_shape(self, shape):
        return (shape[0],)


@dataclass(frozen=True)
class Linear(Layer):
    kind: ClassVar[str] = "linear"
    in_features: int  # inputs
    out_features: int  # outputs

    def param_shapes(self):
        return {"weight": ((self.out_features, self.in_features), True), "bias": ((self.out_features,), True)}

    def output_shape(self, shape):
        _expect_channels(self, shape[0], self.in_features)
        return (self.out_features,)

    def macs(self, shape):
        return self.in_features * self.out_features


def _expect_channels(layer: Layer, got: int, expected: int) -> None:
    if got != expected:
        raise ValueError(f"{layer.kind} expects {expected} channels, got {got}")


# -- the plan ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    name: str  # canonical name; the op's parameters are f"{name}.{suffix}"
    layer: Layer  # what it computes
    inputs: tuple[str, ...]  # values it reads, by name ("input" is the network input)
    output: str = ""  # value it writes; the op name unless a rewrite (BN folding) merged ops

    def __post_init__(self) -> None:
        if not self.output:
            object.__setattr__(self, "output", self.name)
        if (problem := self.layer.problem()) is not None:
            raise ValueError(f"{self.name} ({self.kind}): {problem}")

    @property
    def kind(self) -> str:
        return self.layer.kind

    def param_shapes(self) -> dict[str, tuple[tuple[int, ...], bool]]:
        """``{full parameter name: (shape, trainable)}``."""
        return {f"{self.name}.{suffix}": info for suffix, info in self.layer.param_shapes().items()}


@dataclass(frozen=True)
class Block:
    """One residual (or plain) block, as :func:`make_plan` built it: its ops read ``input`` and the
    last one writes ``output``. Rewrites (BN folding, block deletion) keep these records; the ops they
    removed are simply no longer in ``plan.ops`` (:meth:`Plan.block_ops` lists those that are)."""

    name: str  # "layer2.0": stage 2 (counted from 1), block 0 (from 0); its ops are named f"{name}.*"
    stage: str  # "layer2": the stage it belongs to (a feature name)
    input: str  # the value it reads
    output: str  # the value it writes
    ops: tuple[str, ...]  # every op of the block, in plan order (its shortcut's too)
    shortcut: tuple[str, ...] = ()  # the shortcut's own ops (projection, subsample, padding); () for identity
    add: str | None = None  # its add op; None in a plain network


@dataclass(frozen=True)
class Plan:
    spec: ResNetSpec  # what the plan was made from
    ops: tuple[Op, ...]  # in execution order
    features: tuple[tuple[str, str], ...]  # (feature name, value name): stem and each stage's output
    output: str  # value name of the logits
    total_stride: int  # input pixels per final feature-map pixel, per side
    blocks: tuple[Block, ...] = ()  # every residual (or plain) block, in order

    def shapes(self, input_size) -> dict[str, tuple[int, ...]]:
        """Per-sample shape of every value for an input of ``input_size`` (int or (H, W)).

            >>> make_plan("resnet20").shapes(32)["layer3.2.relu2"]
            (64, 8, 8)
        """
        self.check_input_size(input_size)
        height, width = image_side(input_size)
        shapes = {INPUT: (self.spec.in_channels, height, width)}
        for op in self.ops:
            shapes[op.output] = op.layer.output_shape(*(shapes[name] for name in op.inputs))
        return shapes

    def check_input_size(self, input_size) -> None:
        """Raise ``ValueError`` when a side of ``input_size`` is below the network's total stride.

        Smaller inputs still compute, but the last stages would see nothing but padding.
        """
        height, width = image_side(input_size)
        need = self.total_stride
        if height < need or width < need:
            raise ValueError(
                f"input {height}x{width} is too small for {self.spec.name}: its strides downsample by {need}, "
                f"so each side must be at least {need} pixels"
            )

    def param_shapes(self) -> dict[str, tuple[tuple[int, ...], bool]]:
        """Every parameter and buffer, in plan order: ``{name: (shape, trainable)}``."""
        shapes: dict[str, tuple[tuple[int, ...], bool]] = {}
        for op in self.ops:
            shapes.update(op.param_shapes())
        return shapes

    def op(self, name: str) -> Op:
        for op in self.ops:
            if op.name == name:
                return op
        raise KeyError(name)

    @cached_property
    def block_of(self) -> dict[str, Block]:
        """Op name -> the block it belongs to, for the ops of a block."""
        return {name: block for block in self.blocks for name in block.ops}

    def block_ops(self, block: Block) -> list[Op]:
        """The ops of ``block`` still in the plan, in plan order."""
        return [op for op in self.ops if self.block_of.get(op.name) is block]

    @cached_property
    def parts(self) -> dict[str, str]:
        """Op name -> the part of the network it is in: ``"stem"``, its stage (``"layer2"``) or ``"head"``."""
        parts, after_blocks = {}, False
        for op in self.ops:
            block = self.block_of.get(op.name)
            after_blocks = after_blocks or block is not None
            parts[op.name] = block.stage if block is not None else ("head" if after_blocks else "stem")
        return parts

    @cached_property
    def block_outputs(self) -> frozenset[str]:
        """Value names that end a block: the output of each block's last op in the plan."""
        last: dict[str, str] = {}
        for op in self.ops:
            if op.name in self.block_of:
                last[self.block_of[op.name].name] = op.output
        return frozenset(last.values())

    def last_uses(self) -> dict[str, int]:
        """For each value, the index of the last op that reads it (to free memory early)."""
        last: dict[str, int] = {}
        for index, op in enumerate(self.ops):
            for value in op.inputs:
                last[value] = index
        return last


def image_side(input_size) -> tuple[int, int]:
    """``(height, width)`` of an input size given as an int or a pair."""
    if isinstance(input_size, int):
        return (input_size, input_size)
    height, width = input_size
    return (int(height), int(width))


def as_plan(spec_or_plan) -> Plan:
    """``spec_or_plan`` itself if it is a Plan, else the (cached) plan of a spec or preset name."""
    return spec_or_plan if isinstance(spec_or_plan, Plan) else make_plan(spec_or_plan)


class _Builder:
    """Appends ops while walking the spec; keeps the name of the current value."""

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.blocks: list[Block] = []
        self.shortcut: tuple[str, ...] = ()  # the ops the current block's shortcut added

    def add(self, name: str, layer: Layer, *inputs: str) -> str:
        self.ops.append(Op(name, layer, tuple(inputs)))
        return name

    def conv_bn(self, x: str, conv: str, bn: str, spec: ResNetSpec, cin: int, cout: int, kernel: int,
                stride: int = 1, groups: int = 1, zero_init: bool = False) -> str:
        x = self.add(conv, Conv2d(cin, cout, kernel, stride, kernel // 2, groups), x)
        return self.add(bn, BatchNorm(cout, spec.bn_eps, zero_init), x)


def make_plan(spec: ResNetSpec | str) -> Plan:
    """The flat op sequence for ``spec``, a ResNetSpec or a preset name (cached: specs are immutable).

    This is where a spec is checked against its ops: a conv it cannot compute (e.g. groups that do
    not divide a basic block's *input* channels) raises :class:`~portres.spec.SpecError`.
    """
    return _checked_plan(resolve_spec(spec))


@lru_cache(maxsize=256)
def _checked_plan(spec: ResNetSpec) -> Plan:
    try:
        plan = _build_plan(spec)
        plan.shapes(plan.total_stride)  # every op's channel arithmetic, at the smallest input
    except ValueError as error:
        raise SpecError(f"{error}; adjust stem.width, the stage widths or groups") from None
    return plan


def _build_plan(spec: ResNetSpec) -> Plan:
    b = _Builder()
    x, total_stride = _stem(b, spec)
    features = [("stem", x)]
    channels = spec.stem.width
    for stage_index, stage in enumerate(spec.stages):
        strided_block = 0 if spec.stage_stride_at == "first" else stage.blocks - 1
        for block_index in range(stage.blocks):
            stride = stage.stride if block_index == strided_block else 1
            prefix = f"layer{stage_index + 1}.{block_index}"
            first_op, block_input, b.shortcut = len(b.ops), x, ()
            x = _block(b, spec, prefix, x, channels, stage, stride)
            ops = b.ops[first_op:]
            add = next((op.name for op in ops if op.kind == "add"), None)
            b.blocks.append(Block(prefix, f"layer{stage_index + 1}", block_input, x, tuple(op.name for op in ops),
                                  b.shortcut, add))
            channels = spec.out_width(stage)
        total_stride *= stage.stride
        features.append((f"layer{stage_index + 1}", x))
    if spec.is_preactivation:  # v2 ends with the BN-ReLU its last block left out
        x = b.add("final_bn", BatchNorm(channels, spec.bn_eps), x)
        x = b.add("final_relu", ReLU(), x)
    x = b.add("avgpool", GlobalAvgPool(), x)
    x = b.add("fc", Linear(channels, spec.num_classes), x)
    return Plan(spec, _with_conv_biases(b.ops, spec.conv_bias), tuple(features), x, total_stride, tuple(b.blocks))


def _with_conv_biases(ops: list[Op], policy: str) -> tuple[Op, ...]:
    """``ops`` with ``bias=True`` on the convs ``spec.conv_bias`` names (see the spec field)."""
    if policy == "none":
        return tuple(ops)
    normalized = {op.inputs[0] for op in ops if op.kind == "batch_norm"}  # conv outputs a BN reads
    return tuple(
        Op(op.name, dataclasses.replace(op.layer, bias=True), op.inputs, op.output)
        if op.kind == "conv2d" and (policy == "all" or op.output not in normalized) else op
        for op in ops
    )


def _stem(b: _Builder, spec: ResNetSpec) -> tuple[str, int]:
    stem, cin = spec.stem, spec.in_channels
    preact = spec.is_preactivation  # v2 stems end on a bare conv: the first block normalises
    if stem.kind == "imagenet":
        x = b.add("conv1", Conv2d(cin, stem.width, 7, 2, 3), INPUT)
        stride = 2
    elif stem.kind == "cifar":
        x = b.add("conv1", Conv2d(cin, stem.width, 3, 1, 1), INPUT)
        stride = 1
    else:  # deep (ResNet-C/D): timm's resnet50d names, conv1.{0..6} then bn1
        mid = stem.deep_width
        x = b.conv_bn(INPUT, "conv1.0", "conv1.1", spec, cin, mid, 3, 2)
        x = b.add("conv1.2", ReLU(), x)
        x = b.conv_bn(x, "conv1.3", "conv1.4", spec, mid, mid, 3)
        x = b.add("conv1.5", ReLU(), x)
        x = b.add("conv1.6", Conv2d(mid, stem.width, 3, 1, 1), x)
        stride = 2
    if not preact:
        x = b.add("bn1", BatchNorm(stem.width, spec.bn_eps), x)
        x = b.add("relu", ReLU(), x)
    if stem.max_pool:
        if stem.max_pool_padding == "zero":  # Keras: ZeroPadding2D(1), then a valid 3x3/2 pool
            x = b.add("maxpool_pad", ZeroPad(1), x)
            x = b.add("maxpool", MaxPool(3, 2, 0), x)
        else:
            x = b.add("maxpool", MaxPool(3, 2, 1), x)
        stride *= 2
    return x, stride


def _block(b: _Builder, spec: ResNetSpec, prefix: str, x: str, cin: int, stage, stride: int) -> str:
    """One residual (or plain) block: the convs, the shortcut, the add."""
    inner, cout = spec.inner_width(stage), spec.out_width(stage)
    p = f"{prefix}."
    block_input = x
    if spec.is_bottleneck:
        # (in, out, kernel, stride, groups) per conv; v1.5 strides the 3x3, v1 the first 1x1
        on_1x1 = spec.bottleneck_stride_at == "1x1"
        convs = [(cin, inner, 1, stride if on_1x1 else 1, 1),
                 (inner, inner, 3, 1 if on_1x1 else stride, spec.groups),
                 (inner, cout, 1, 1, 1)]
    else:
        convs = [(cin, inner, 3, stride, spec.groups), (inner, cout, 3, 1, 1)]
    last = len(convs)

    if spec.is_preactivation:
        # BN-ReLU-conv, repeated; a projection shortcut reads the pre-activated input.
        for i, (ci, co, k, s, g) in enumerate(convs, start=1):
            x = b.add(f"{p}bn{i}", BatchNorm(ci, spec.bn_eps), x)
            x = b.add(f"{p}relu{i}", ReLU(), x)
            if i == 1:
                preactivated = x
            x = b.add(f"{p}conv{i}", Conv2d(ci, co, k, s, k // 2, g), x)
        if not spec.residual:
            return x
        shortcut = _shortcut(b, spec, p, block_input, preactivated, cin, cout, stride)
        return b.add(f"{p}add", Add(), x, shortcut)

    for i, (ci, co, k, s, g) in enumerate(convs, start=1):
        zero = spec.zero_init_last_bn and i == last
        x = b.conv_bn(x, f"{p}conv{i}", f"{p}bn{i}", spec, ci, co, k, s, g, zero_init=zero)
        if i < last:
            x = b.add(f"{p}relu{i}", ReLU(), x)
    if spec.residual:
        shortcut = _shortcut(b, spec, p, block_input, block_input, cin, cout, stride)
        x = b.add(f"{p}add", Add(), x, shortcut)
    return b.add(f"{p}relu{last}", ReLU(), x)


def _shortcut(b: _Builder, *args) -> str:
    """:func:`_shortcut_path`, noting the ops it added as the block's shortcut."""
    first_op = len(b.ops)
    value = _shortcut_path(b, *args)
    b.shortcut = tuple(op.name for op in b.ops[first_op:])
    return value


def _shortcut_path(b: _Builder, spec: ResNetSpec, p: str, identity: str, projected: str,
                   cin: int, cout: int, stride: int) -> str:
    """The shortcut value: ``identity`` when shapes match, else the spec's policy.

    ``projected`` is what a learned projection reads (the pre-activated input in v2).
    """
    reshapes = stride != 1 or cin != cout
    if spec.stride_only_shortcut == "subsample" and stride != 1 and cin == cout:  # Keras v2's 1x1/s max pool
        return b.add(f"{p}shortcut.subsample", Subsample(stride), identity)
    if spec.shortcut == "A" and reshapes:
        x = identity
        if stride != 1:
            x = b.add(f"{p}shortcut.subsample", Subsample(stride), x)
        if cout != cin:
            before = (cout - cin) // 2
            x = b.add(f"{p}shortcut.pad", PadChannels(before, cout - cin - before), x)
        return x
    if spec.shortcut == "avg_down" and reshapes:  # timm's downsample.{0: pool, 1: conv, 2: bn}
        x = projected
        if stride != 1:
            x = b.add(f"{p}downsample.0", AvgPool(stride, stride), x)
        x = b.add(f"{p}downsample.1", Conv2d(cin, cout, 1), x)
        return _projection_norm(b, spec, f"{p}downsample.2", x, cout)
    if spec.shortcut == "C" or reshapes:  # B and C: torchvision's downsample.{0: conv, 1: bn}
        x = b.add(f"{p}downsample.0", Conv2d(cin, cout, 1, stride), projected)
        return _projection_norm(b, spec, f"{p}downsample.1", x, cout)
    return identity


def _projection_norm(b: _Builder, spec: ResNetSpec, name: str, x: str, channels: int) -> str:
    # v2 adds the projection to an un-normalised residual: no BN on the shortcut either
    if spec.is_preactivation:
        return x
    return b.add(name, BatchNorm(channels, spec.bn_eps), x)


# -- rewrites ----------------------------------------------------------------------------


def fold_batch_norm(plan: Plan, params: dict) -> tuple[Plan, dict]:
    """Fold eval-mode BN into the ops around it: the rewrite every framework backend runs.

    ``conv -> bn`` becomes one conv with a bias; a BN that follows no conv (pre-activation
    nets) becomes a per-channel ``channel_affine`` with its statistics folded in. Either way
    the op writes the BN's value name, so later ops and the reference's per-op values line
    up. Params are float32 NumPy arrays; the arithmetic is done in float64 and rounded once.

        >>> folded_plan, folded_params = fold_batch_norm(plan, portres.init_params(plan.spec))
    """
    import numpy as np

    readers: dict[str, int] = {}
    for op in plan.ops:
        for value in op.inputs:
            readers[value] = readers.get(value, 0) + 1
    by_output = {op.output: op for op in plan.ops}
    features = {value for _, value in plan.features}
    folded_into: dict[str, Op] = {}  # bn op name -> the conv it absorbs
    for op in plan.ops:
        if op.kind != "batch_norm":
            continue
        source = by_output.get(op.inputs[0])
        if source is not None and source.kind == "conv2d" and readers[source.output] == 1 \
                and op.inputs[0] not in features:
            folded_into[op.name] = source
    absorbed = {conv.name: bn_name for bn_name, conv in folded_into.items()}

    def scale_and_shift(bn: Op) -> tuple[np.ndarray, np.ndarray]:
        stat = lambda suffix: params[f"{bn.name}.{suffix}"].astype(np.float64)  # noqa: E731
        scale = stat("weight") / np.sqrt(stat("running_var") + bn.layer.eps)
        return scale, stat("bias") - stat("running_mean") * scale

    norms = {op.name for op in plan.ops if op.kind == "batch_norm"}  # every one is folded away below
    ops, new_params = [], {key: value for key, value in params.items() if key.rsplit(".", 1)[0] not in norms}
    for op in plan.ops:
        if op.name in folded_into:
            continue
        if op.name in absorbed:
            bn = plan.op(absorbed[op.name])
            scale, shift = scale_and_shift(bn)
            weight = params[f"{op.name}.weight"].astype(np.float64)
            bias = params[f"{op.name}.bias"].astype(np.float64) if op.layer.bias else 0.0
            new_params[f"{op.name}.weight"] = (weight * scale[:, None, None, None]).astype(np.float32)
            new_params[f"{op.name}.bias"] = (bias * scale + shift).astype(np.float32)
            op = Op(op.name, dataclasses.replace(op.layer, bias=True), op.inputs, bn.output)
        elif op.kind == "batch_norm":
            # computing rsqrt(var + eps) once here, not per element: inside mx.compile MLX
            # fused it into the activation pass (resnetv2_50 batch 16: 12.7 -> 21 images/s)
            scale, shift = scale_and_shift(op)
            new_params[f"{op.name}.scale"] = scale.astype(np.float32)
            new_params[f"{op.name}.shift"] = shift.astype(np.float32)
            op = Op(op.name, ChannelAffine(op.layer.channels), op.inputs, op.output)
        ops.append(op)
    return dataclasses.replace(plan, ops=tuple(ops)), new_params


def delete_blocks(plan: Plan, blocks) -> Plan:
    """The plan with the named blocks (``"layer2.3"``) deleted: the lesion rewrite (Veit et al. 2016).

    A *residual* block loses its residual branch and becomes its shortcut: ``relu(x + F(x))``
    becomes ``relu(shortcut(x))`` in v1 (identity, option-A padding or projection, whatever the
    block has; the ReLU after the addition stays, and on an identity shortcut of a post-ReLU
    input it changes nothing), ``x + F(x)`` becomes ``shortcut(x)`` in v2 (a v2 projection keeps
    the BN-ReLU it reads). This computes what the network computes with that branch's output
    zeroed. A *plain* block (no shortcut) is deleted whole - its convs, norms and ReLUs - and
    its output becomes its input, which is possible only where the block keeps the shape
    (stride 1, as many channels out as in); deleting a block that changes it raises
    ``ValueError``. Deleted ops' parameters are no longer part of the plan; value names of the
    remaining ops are unchanged, so features and per-op values line up with the intact plan.

        >>> lesioned = delete_blocks(make_plan("resnet56"), ["layer1.3", "layer3.0"])
        >>> sum(op.kind == "add" for op in lesioned.ops)
        25
    """
    if isinstance(blocks, str):
        blocks = [blocks]
    by_name = {block.name: block for block in plan.blocks}
    names = list(by_name)
    wanted = list(dict.fromkeys(blocks))
    unknown = [block for block in wanted if block not in names]
    if unknown:
        listed = f"{names[0]} ... {names[-1]}" if len(names) > 4 else ", ".join(names)
        raise ValueError(f"{plan.spec.name} has no block {unknown[0]!r}; its blocks are {listed} "
                         f"(layerS.B: stage S from 1, block B from 0)" if names else
                         f"{plan.spec.name} has no blocks to delete")
    ops = list(plan.ops)
    alias: dict[str, str] = {}  # deleted value -> the value that now stands for it
    removable: set[str] = set()  # op names that go once nothing reads them
    for block in wanted:
        members = [op for op in ops if plan.block_of.get(op.name) is by_name[block]]
        add = next((op for op in members if op.kind == "add"), None)
        if add is not None:  # residual: the add's output becomes the shortcut value (its second input)
            alias[add.output] = add.inputs[1]
            ops.remove(add)
            removable.update(op.name for op in members if op is not add)
            continue
        produced = {op.output for op in members}
        entry = next(name for op in members for name in op.inputs if name not in produced)
        convs = [op.layer for op in members if op.kind == "conv2d"]
        if any(conv.stride != 1 for conv in convs) or convs[0].in_channels != convs[-1].out_channels:
            raise ValueError(f"cannot delete the plain block {block} of {plan.spec.name}: it changes the shape "
                             f"({convs[0].in_channels} -> {convs[-1].out_channels} channels, stride "
                             f"{max(conv.stride for conv in convs)}), so nothing can stand in for it; delete a block "
                             "that keeps the shape")
        alias[members[-1].output] = entry
        for op in members:
            ops.remove(op)
    resolve = lambda value: resolve(alias[value]) if value in alias else value  # noqa: E731
    ops = [dataclasses.replace(op, inputs=tuple(resolve(v) for v in op.inputs)) for op in ops]
    features = tuple((name, resolve(value)) for name, value in plan.features)
    output = resolve(plan.output)
    while True:  # drop branch ops nothing reads any more (a v2 projection still reads its block's BN-ReLU)
        read = {value for op in ops for value in op.inputs} | {value for _, value in features} | {output}
        dead = [op for op in ops if op.name in removable and op.output not in read]
        if not dead:
            break
        ops = [op for op in ops if op not in dead]
    return dataclasses.replace(plan, ops=tuple(ops), features=features, output=output)


# -- the walker ----------------------------------------------------------------------------


def apply_op(primitives, op: Op, args: list, params: dict):
    """Run one op with a backend's primitives (the set is listed in ``portres.backends``)."""
    layer, name = op.layer, op.name
    kind = layer.kind
    if kind == "conv2d":
        return primitives.conv2d(args[0], params[f"{name}.weight"], params.get(f"{name}.bias"),
                                 layer.stride, layer.padding, layer.groups)
    if kind == "batch_norm":
        return primitives.batch_norm(args[0], params[f"{name}.weight"], params[f"{name}.bias"],
                                     params[f"{name}.running_mean"], params[f"{name}.running_var"], layer.eps)
    if kind == "channel_affine":
        return primitives.channel_affine(args[0], params[f"{name}.scale"], params[f"{name}.shift"])
    if kind == "relu":
        return primitives.relu(args[0])
    if kind == "max_pool":
        return primitives.max_pool(args[0], layer.kernel_size, layer.stride, layer.padding)
    if kind == "zero_pad":
        return primitives.zero_pad(args[0], layer.padding)
    if kind == "avg_pool":
        return primitives.avg_pool(args[0], layer.kernel_size, layer.stride)
    if kind == "subsample":
        return primitives.subsample(args[0], layer.stride)
    if kind == "pad_channels":
        return primitives.pad_channels(args[0], layer.before, layer.after)
    if kind == "add":
        return primitives.add(args[0], args[1])
    if kind == "global_avg_pool":
        return primitives.global_avg_pool(args[0])
    if kind == "linear":
        return primitives.linear(args[0], params[f"{name}.weight"], params[f"{name}.bias"])
    raise NotImplementedError(f"no lowering for op kind {kind!r}")


def run_plan(plan: Plan, primitives, params: dict, x, keep: tuple[str, ...] = (), before_op=None) -> dict:
    """Execute ``plan`` on ``x`` (batch norm in eval mode); returns ``{value name: array}`` for the
    output and ``keep``.

    Values are dropped after their last reader, so peak memory stays that of one block.
    ``before_op(op, args)``, if given, runs before each op (and may update ``params``).
    Each block's output goes through the backend's ``end_block`` (lazy frameworks cut their graph
    there; elsewhere it returns its argument).
    """
    block_outputs = plan.block_outputs
    apply = lambda op, args: apply_op(primitives, op, args, params)  # noqa: E731
    cut = lambda value, result: primitives.end_block(result) if value in block_outputs else result  # noqa: E731
    return _walk(plan, apply, x, keep, before_op=before_op, after_op=cut)


def run_plan_train(plan: Plan, primitives, params: dict, x, *, momentum: float | None = 0.1,
                   keep: tuple[str, ...] = (), probes: dict | None = None,
                   constants: dict | None = None) -> tuple[dict, dict]:
    """Execute ``plan`` with batch norm in training mode; returns ``(values, running_stats)``.

    Each BN normalises with its batch's mean and biased variance (the backend's
    ``batch_norm_train`` primitive returns them with the unbiased variance), and its running
    statistics are updated with PyTorch's rule, written here once for every backend:
    ``running = (1 - momentum) * running + momentum * batch`` (unbiased variance). BN state
    is passed in ``params`` and returned, never kept anywhere else (``momentum=None``: none are
    computed, for passes that do not train). Plans are never folded in training, and graphs are
    not cut at block ends (that would cut tinygrad's gradients).

    For gradients with respect to values inside the network (:mod:`portres.experiments.probes`):
    ``probes`` maps value names (``INPUT`` too) to arrays added to the value once it is written,
    and ``constants`` maps extra value names to arrays ops may read (e.g. a detached copy).

        >>> values, stats = run_plan_train(plan, backend, params, images)
        >>> sorted(stats)[:2]
        ['bn1.running_mean', 'bn1.running_var']
    """
    running_stats: dict = {}

    def apply(op: Op, args: list):
        if op.kind != "batch_norm":
            return apply_op(primitives, op, args, params)
        name = op.name
        y, mean, var = primitives.batch_norm_train(args[0], params[f"{name}.weight"], params[f"{name}.bias"],
                                                   op.layer.eps)
        if momentum is not None:
            for suffix, batch in (("running_mean", mean), ("running_var", var)):
                running_stats[f"{name}.{suffix}"] = params[f"{name}.{suffix}"] * (1 - momentum) + batch * momentum
        return y

    if probes:
        add_probe = lambda value, result: primitives.add(result, probes[value]) if value in probes else result  # noqa: E731
    else:
        add_probe = None
    return _walk(plan, apply, x, keep, after_op=add_probe, constants=constants), running_stats


def _walk(plan: Plan, apply, x, keep, *, before_op=None, after_op=None, constants=None) -> dict:
    """The one forward walker: ``apply(op, args)`` for each op in order, values dropped after their
    last reader. ``before_op(op, args)`` runs before an op; ``after_op(value name, result)`` may
    replace what is written (``INPUT`` included)."""
    wanted = set(keep) | {plan.output}
    last_use = plan.last_uses()
    x = after_op(INPUT, x) if after_op is not None else x
    values = {**(constants or {}), INPUT: x}
    kept = {INPUT: x} if INPUT in wanted else {}
    for index, op in enumerate(plan.ops):
        args = [values[name] for name in op.inputs]
        if before_op is not None:
            before_op(op, args)
        result = apply(op, args)
        if after_op is not None:
            result = after_op(op.output, result)
        values[op.output] = result
        if op.output in wanted:
            kept[op.output] = result
        for name in set(op.inputs):
            if last_use[name] == index:
                del values[name]
    return kept
