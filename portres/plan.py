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
    output: str  # value name of the logits (of the pooled features in a headless spec)
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

    @cached_property
    def pooled(self) -> str:
        """Value name of the globally pooled features (N, C): the classifier's input, a headless plan's output.

            >>> make_plan("resnet20").pooled
            'avgpool'
        """
        return next(op.output for op in reversed(self.ops) if op.kind == "global_avg_pool")

    def feature_info(self) -> list[dict]:
        """One dict per feature (stem and each stage): ``name``, ``channels`` and ``reduction`` (input
        pixels per output pixel, per side), read off the plan's shapes.

            >>> make_plan("resnet50").feature_info()[3]
            {'name': 'layer3', 'channels': 1024, 'reduction': 16}
        """
        side = self.total_stride * 64  # a multiple of every stride, so each reduction divides it exactly
        shapes = self.shapes(side)
        return [{"name": name, "channels": shapes[value][0], "reduction": side // shapes[value][1]}
                for name, value in self.features]

    def truncated(self, values) -> Plan:
        """This plan cut after the last op that writes one of ``values`` (what computing only them needs).

            >>> make_plan("resnet20").truncated(["layer1.2.relu2"]).output
            'layer1.2.relu2'
        """
        wanted = set(values)
        last = max(index for index, op in enumerate(self.ops) if op.output in wanted)
        return dataclasses.replace(self, ops=self.ops[:last + 1], output=self.ops[last].output)

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
    if spec.num_classes:  # headless (num_classes=0): the pooled features are the output
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
