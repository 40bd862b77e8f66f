"""The backend-neutral description of a residual network.

A :class:`ResNetSpec` says *what* the network is (stem, stages, block kind, shortcut
policy, ...); :mod:`portres.plan` turns it into the flat list of ops every backend runs.
Specs are frozen, validated field by field when built (``make_plan`` checks the ops they
make), and round-trip exactly through JSON. This module imports no other portres module::

    >>> from portres.spec import ResNetSpec, StageSpec
    >>> spec = ResNetSpec(name="tiny", block="basic",
    ...                   stages=(StageSpec(blocks=1, width=8, stride=1),))
    >>> ResNetSpec.from_dict(spec.to_dict()) == spec
    True
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

BLOCK_KINDS = ("basic", "bottleneck", "preact_basic", "preact_bottleneck")
SHORTCUT_KINDS = ("A", "B", "C", "avg_down")
STEM_KINDS = ("imagenet", "deep", "cifar")
BOTTLENECK_STRIDE_POSITIONS = ("3x3", "1x1")
STAGE_STRIDE_POSITIONS = ("first", "last")  # which block of a stage carries the stage's stride
STRIDE_ONLY_SHORTCUTS = ("project", "subsample")  # a shortcut that changes resolution but not channels
CONV_BIAS_POLICIES = ("none", "all", "unnormalized")  # which convs carry a bias
MAX_POOL_PADDINGS = ("neg_inf", "zero")  # what the stem's max pool pads with
BOTTLENECK_EXPANSION = 4  # a bottleneck block outputs 4x its stage width (He et al. 2016)

# Upper bounds: generous for every published ResNet (resnet1202: 600 blocks; ImageNet-21k: 21,843
# classes), small enough that a typo cannot make `summary` or `init_params` run away.
MAX_BLOCKS = 10_000  # residual blocks in the whole network
MAX_STAGES = 32  # stages
MAX_CHANNELS = 16_384  # channels of any conv (after width_factor / groups / expansion)
MAX_STRIDE = 16  # stride of one stage
MAX_CLASSES = 100_000  # outputs of the classifier
MAX_IN_CHANNELS = 1_024  # channels of the input image


class SpecError(ValueError):
    """An invalid spec: the message names the field, the value and the rule."""


def _check_int(where: str, value, minimum: int = 1, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{where}={value!r} must be an integer")
    if value < minimum:
        raise SpecError(f"{where}={value} must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise SpecError(f"{where}={value:,} exceeds the limit of {maximum:,}; use a smaller value")


def _check_choice(where: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SpecError(f"{where}={value!r} must be one of {', '.join(map(repr, choices))}")


@dataclass(frozen=True)
class StemSpec:
    """The layers before the first stage."""

    kind: str = "imagenet"  # "imagenet": 7x7/2 conv; "deep": three 3x3 convs, first /2; "cifar": one 3x3/1 conv
    width: int = 64  # channels the stem hands to the first stage
    deep_width: int = 32  # channels of the deep stem's first two convs (unused by other stems)
    max_pool: bool = True  # 3x3/2 max-pool after the convs (ImageNet stems), none for CIFAR
    # "neg_inf": padding never wins (PyTorch); "zero": Keras' ZeroPadding2D before a valid pool, which
    # differs only where the pool reads negative values (pre-activation stems end on a bare conv)
    max_pool_padding: str = "neg_inf"

    def __post_init__(self) -> None:
        _check_choice("stem.kind", self.kind, STEM_KINDS)
        _check_int("stem.width", self.width, maximum=MAX_CHANNELS)
        _check_int("stem.deep_width", self.deep_width, maximum=MAX_CHANNELS)
        if not isinstance(self.max_pool, bool):
            raise SpecError(f"stem.max_pool={self.max_pool!r} must be true or false")
        _check_choice("stem.max_pool_padding", self.max_pool_padding, MAX_POOL_PADDINGS)
        if self.max_pool_padding != "neg_inf" and not self.max_pool:
            raise SpecError(f"stem.max_pool_padding={self.max_pool_padding!r} needs stem.max_pool=true; "
                            "leave it 'neg_inf'")


@dataclass(frozen=True)
class StageSpec:
    """A run of blocks at one resolution."""

    blocks: int  # number of residual blocks in the stage
    width: int  # basic: block width; bottleneck: inner width before groups/width scaling (output = 4x)
    stride: int = 1  # stride of the stage's first block (its last with stage_stride_at="last"); the others use 1

    def __post_init__(self) -> None:
        limits = {"blocks": MAX_BLOCKS, "width": MAX_CHANNELS, "stride": MAX_STRIDE}
        for field_name, maximum in limits.items():
            _check_int(f"stage.{field_name}", getattr(self, field_name), maximum=maximum)


@dataclass(frozen=True)
class ResNetSpec:
    """A whole residual network; see the module docstring for an example."""

    name: str  # a label for tables, files and the zoo (part of equality, like every field)
    stages: tuple[StageSpec, ...]  # the stages in order (torchvision's layer1..layer4)
    block: str = "bottleneck"  # "basic", "bottleneck", "preact_basic" or "preact_bottleneck"
    stem: StemSpec = field(default_factory=StemSpec)  # layers before the first stage
    groups: int = 1  # cardinality of the 3x3 conv (ResNeXt); 1 for ordinary ResNets
    width_per_group: int | None = None  # ResNeXt "d": bottleneck width = int(width*factor*d/64)*groups
    width_factor: int = 1  # widens the 3x3 convs (wide ResNets); bottleneck outputs stay at 4x width
    bottleneck_stride_at: str = "3x3"  # "3x3": v1.5 (torchvision); "1x1": the original v1 paper
    stage_stride_at: str = "first"  # block of a stage that strides: "first", or "last" (Keras ResNetV2)
    shortcut: str = "B"  # when shape changes: "A" pad, "B" 1x1 projection, "C" always project, "avg_down"
    # a shortcut that changes resolution but not channels: "project" as `shortcut` says, or
    # "subsample" (x[:, :, ::s, ::s], Keras ResNetV2's 1x1 max pool)
    stride_only_shortcut: str = "project"
    # "none": BN supplies every shift (torchvision, timm); "all": every conv has a bias (Keras ResNet);
    # "unnormalized": only convs whose output no BN reads directly (Keras ResNetV2)
    conv_bias: str = "none"
    residual: bool = True  # False builds the plain (shortcut-free) twin
    zero_init_last_bn: bool = False  # init each block's last BN scale to 0 (Goyal et al. 2017)
    bn_eps: float = 1e-5  # epsilon of every batch norm
    num_classes: int = 1000  # outputs of the final linear layer; 0: headless (no fc, the pooled features come out)
    in_channels: int = 3  # channels of the input image

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SpecError(f"name={self.name!r} must be a non-empty string")
        if isinstance(self.stages, list):
            object.__setattr__(self, "stages", tuple(self.stages))
        if not isinstance(self.stages, tuple) or not self.stages:
            raise SpecError(f"stages={self.stages!r} must be a non-empty sequence of StageSpec")
        if len(self.stages) > MAX_STAGES:
            raise SpecError(f"{len(self.stages)} stages exceed the limit of {MAX_STAGES}")
        for index, stage in enumerate(self.stages):
            if not isinstance(stage, StageSpec):
                raise SpecError(f"stages[{index}]={stage!r} must be a StageSpec")
        total_blocks = sum(stage.blocks for stage in self.stages)
        if total_blocks > MAX_BLOCKS:
            raise SpecError(f"{total_blocks:,} blocks in all exceed the limit of {MAX_BLOCKS:,} "
                            "(resnet1202 has 600); use fewer blocks per stage")
        if not isinstance(self.stem, StemSpec):
            raise SpecError(f"stem={self.stem!r} must be a StemSpec")
        _check_choice("block", self.block, BLOCK_KINDS)
        _check_choice("shortcut", self.shortcut, SHORTCUT_KINDS)
        _check_choice("bottleneck_stride_at", self.bottleneck_stride_at, BOTTLENECK_STRIDE_POSITIONS)
        _check_choice("stage_stride_at", self.stage_stride_at, STAGE_STRIDE_POSITIONS)
        _check_choice("stride_only_shortcut", self.stride_only_shortcut, STRIDE_ONLY_SHORTCUTS)
        _check_choice("conv_bias", self.conv_bias, CONV_BIAS_POLICIES)
        if self.stride_only_shortcut == "subsample" and self.shortcut == "C":
            raise SpecError("stride_only_shortcut='subsample' contradicts shortcut='C' (project in every block); "
                            "use shortcut='B' or stride_only_shortcut='project'")
        _check_int("groups", self.groups, maximum=MAX_CHANNELS)
        _check_int("width_factor", self.width_factor, maximum=MAX_CHANNELS)
        _check_int("num_classes", self.num_classes, minimum=0, maximum=MAX_CLASSES)
        _check_int("in_channels", self.in_channels, maximum=MAX_IN_CHANNELS)
        for flag in ("residual", "zero_init_last_bn"):
            if not isinstance(getattr(self, flag), bool):
                raise SpecError(f"{flag}={getattr(self, flag)!r} must be true or false")
        eps = self.bn_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise SpecError(f"bn_eps={eps!r} must be a finite number > 0")
        if self.width_per_group is not None:
            _check_int("width_per_group", self.width_per_group, maximum=MAX_CHANNELS)
            if not self.is_bottleneck:
                raise SpecError(
                    f"width_per_group={self.width_per_group} only applies to bottleneck blocks, "
                    f"not block={self.block!r}; leave it unset (null)"
                )
        if self.zero_init_last_bn and not self.residual:
            raise SpecError(
                "zero_init_last_bn=True needs residual=True: in a plain network it would zero every block's output"
            )
        if self.zero_init_last_bn and self.is_preactivation:
            raise SpecError(
                f"zero_init_last_bn=True does not apply to block={self.block!r}: pre-activation blocks end in a "
                "conv, not a BN; leave it false"
            )
        channels = self.stem.width
        for index, stage in enumerate(self.stages):
            inner = self.inner_width(stage)
            if inner < 1:
                raise SpecError(
                    f"stages[{index}].width={stage.width} with width_per_group={self.width_per_group} "
                    f"gives a bottleneck width of 0; raise width_per_group to at least {math.ceil(64 / stage.width)}"
                )
            if inner % self.groups:
                what = "bottleneck width" if self.is_bottleneck else "block width"
                raise SpecError(f"groups={self.groups} must divide the {what} {inner} (stages[{index}])")
            out = self.out_width(stage)
            if max(inner, out) > MAX_CHANNELS:
                raise SpecError(f"stages[{index}] has {max(inner, out):,} channels, over the limit of "
                                f"{MAX_CHANNELS:,}; lower its width or width_factor")
            if self.residual and self.shortcut == "A" and out < channels:
                raise SpecError(
                    f"shortcut='A' cannot shrink channels: stages[{index}] goes from {channels} to {out}; "
                    "use shortcut='B'"
                )
            channels = out
        # what needs the ops themselves (groups must divide a basic block's *input* channels too) is
        # checked when the plan is made: portres.plan.make_plan raises SpecError for it

    # -- derived shape facts (the plan uses these; nothing else re-derives them) --

    @property
    def is_bottleneck(self) -> bool:
        return self.block in ("bottleneck", "preact_bottleneck")

    @property
    def is_preactivation(self) -> bool:
        return self.block.startswith("preact_")

    def inner_width(self, stage: StageSpec) -> int:
        """Width of the block's 3x3 conv(s) in ``stage``."""
        width = stage.width * self.width_factor
        if self.width_per_group is not None:
            return int(width * self.width_per_group / 64) * self.groups
        return width

    def out_width(self, stage: StageSpec) -> int:
        """Channels each block of ``stage`` outputs."""
        if self.is_bottleneck:
            return stage.width * BOTTLENECK_EXPANSION
        return self.inner_width(stage)

    @property
    def feature_width(self) -> int:
        """Channels entering the classifier."""
        return self.out_width(self.stages[-1])

    # -- JSON --

    def require_classifier(self, what: str) -> None:
        """Raise ``SpecError`` naming ``what`` when the network is headless (``num_classes=0``): a loss, a
        gradient or a prediction needs class outputs.

            >>> ResNetSpec(name="trunk", num_classes=0).require_classifier("training")
            Traceback (most recent call last):
            SpecError: trunk is headless (num_classes=0): training needs a classifier; give it num_classes >= 1
        """
        if self.num_classes == 0:
            raise SpecError(f"{self.name} is headless (num_classes=0): {what} needs a classifier; give it "
                            "num_classes >= 1")

    def to_dict(self) -> dict:
        """Plain-JSON form; ``ResNetSpec.from_dict(spec.to_dict()) == spec``."""
        data = dataclasses.asdict(self)
        data["stages"] = [dataclasses.asdict(stage) for stage in self.stages]
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict) -> ResNetSpec:
        """Build a spec from :meth:`to_dict` output; unknown keys are rejected.

        Omitted fields take their defaults, so a hand-written file may list only
        ``name``, ``stages`` and what differs.
        """
        if not isinstance(data, dict):
            raise SpecError(f"a spec must be a JSON object, got {type(data).__name__}")
        _reject_unknown("spec", data, cls)
        data = dict(data)
        for required in ("name", "stages"):
            if required not in data:
                raise SpecError(f"spec is missing the required field {required!r}")
        stages = data["stages"]
        if not isinstance(stages, list) or not stages:
            raise SpecError(f"stages={stages!r} must be a non-empty list of objects")
        built = []
        for index, stage in enumerate(stages):
            if not isinstance(stage, dict):
                raise SpecError(f"stages[{index}]={stage!r} must be an object")
            _reject_unknown(f"stages[{index}]", stage, StageSpec)
            try:
                built.append(StageSpec(**stage))
            except TypeError as error:  # a required key is missing
                raise SpecError(f"stages[{index}]: {_missing(error)}") from None
            except SpecError as error:
                raise SpecError(f"stages[{index}]: {error}") from None
        data["stages"] = tuple(built)
        if "stem" in data:
            stem = data["stem"]
            if not isinstance(stem, dict):
                raise SpecError(f"stem={stem!r} must be an object")
            _reject_unknown("stem", stem, StemSpec)
            data["stem"] = StemSpec(**stem)
        try:
            return cls(**data)
        except TypeError as error:  # e.g. a non-string key
            raise SpecError(f"spec: {error}") from None

    @classmethod
    def from_json(cls, text: str) -> ResNetSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise SpecError(f"spec is not valid JSON: {error}") from None
        except RecursionError:
            raise SpecError("spec JSON is nested too deeply to be a spec") from None
        return cls.from_dict(data)


def _reject_unknown(where: str, data: dict, cls) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise SpecError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(known)}")


def _missing(error: TypeError) -> str:
    text = str(error)
    return text[text.find("missing"):] if "missing" in text else text
