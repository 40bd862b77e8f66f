"""Named presets, each with what using it needs besides the architecture (input size,
normalisation, the naming scheme of its published weights). This module imports only the spec.

    >>> import portres
    >>> portres.get("resnet50").stages[0]
    StageSpec(blocks=3, width=64, stride=1)
    >>> "resnet20" in portres.zoo.names()
    True
    >>> portres.zoo.entry("keras_resnet50").layout, portres.zoo.default_input_size("resnet20")
    ('keras', 32)
    >>> portres.data_config("resnet50").resize_size       # how its weights want images prepared
    256
"""

from __future__ import annotations

import dataclasses
import difflib
import math

from .spec import ResNetSpec, SpecError, StageSpec, StemSpec

# Blocks per stage for the ImageNet depths (He et al. 2016, table 1).
IMAGENET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
IMAGENET_WIDTHS = (64, 128, 256, 512)
IMAGENET_STRIDES = (1, 2, 2, 2)
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)

# Keras Applications' ResNet50/101/152 (keras/src/applications/resnet.py): the original v1 (stride on
# the first 1x1), a bias on every conv, BN epsilon 1.001e-5. Its explicit ZeroPadding2D before the
# stem's max pool is left as -inf padding: that pool reads ReLU outputs (>= 0) and every window holds
# one, so zero padding never wins there and both give the same function.
KERAS_V1 = {"bottleneck_stride_at": "1x1", "conv_bias": "all", "bn_eps": 1.001e-5}
# Keras' ResNet50V2/101V2/152V2: pre-activation; each stage strides in its LAST block (stages
# conv2..conv4 by 2, conv5 by 1), whose shortcut is a 1x1/s max pool (a subsample); a bias on the
# convs no BN follows (stem, each block's last conv, projections); the stem's max pool reads the bare
# conv (negative values too) after ZeroPadding2D, so its zero padding is kept as such.
KERAS_V2 = {"stage_stride_at": "last", "stride_only_shortcut": "subsample", "conv_bias": "unnormalized",
            "bn_eps": 1.001e-5, "stem": StemSpec(max_pool_padding="zero")}
KERAS_V2_STRIDES = (2, 2, 2, 1)

# torchvision's and timm's ImageNet normalisation of [0, 1] RGB images
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm's IMAGENET_INCEPTION_MEAN/STD, which its ResNetV2 weights expect: [0, 1] -> [-1, 1]
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
# Keras' "caffe" mode (keras.applications.resnet.preprocess_input): BGR, this mean subtracted on the 0-255 scale
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
# CIFAR-10's training images, per channel on the [0, 1] scale (population std over all 50,000 x 32 x 32 pixels):
# what portres.data.channel_stats computes for --data cifar10, so predicting normalises as training did
CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)
CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")  # Pillow's resampling filters of those names
CHANNEL_ORDERS = {"RGB": 3, "BGR": 3, "L": 1}  # channel order -> channels ("L": one grayscale channel)
# how 0-255 pixels are scaled before (x - mean) / std: "unit" x / 255 (torchvision, timm), "raw" x as is
# (Keras' caffe mode), "symmetric" x / 127.5 - 1 (Keras' "tf" mode, [-1, 1])
SCALES = ("unit", "raw", "symmetric")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How an image becomes a network input (what :func:`portres.preprocess` does):

    1. resize the shorter side to ``resize_size`` with ``interpolation`` (Pillow, antialiased), keeping
       the aspect ratio, then crop the central ``input_size`` x ``input_size`` (torchvision's
       ``Resize(resize_size)`` + ``CenterCrop(input_size)``); ``resize_size=None``: no resize, except that
       an image not already ``input_size`` x ``input_size`` is resized to it (squashed, as portres's
       folder loader does);
    2. channels in ``channel_order`` ("RGB", "BGR" or "L" grayscale), pixels scaled by ``scale``, then
       ``(x - mean) / std`` per channel (``mean``/``std`` in ``channel_order``'s order).

        >>> data_config("resnet50")
        DataConfig(input_size=224, resize_size=256, interpolation='bilinear', mean=(0.485, 0.456, 0.406), \
std=(0.229, 0.224, 0.225), channel_order='RGB', scale='unit', source='torchvision')
        >>> data_config("keras_resnet50").scale, data_config("keras_resnet50").channel_order
        ('raw', 'BGR')
    """

    input_size: int = 224  # the side of the (square) network input
    resize_size: int | None = 256  # the shorter side before the centre crop; None: no resize (see above)
    interpolation: str = "bilinear"  # one of INTERPOLATIONS
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channel_order: str = "RGB"  # one of CHANNEL_ORDERS
    scale: str = "unit"  # one of SCALES
    source: str = "torchvision"  # whose convention this is, for messages and `portres list`

    def __post_init__(self):
        def positive_int(name, value):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"DataConfig.{name}={value!r} must be a positive integer")

        positive_int("input_size", self.input_size)
        if self.resize_size is not None:
            positive_int("resize_size", self.resize_size)
            if self.resize_size < self.input_size:
                raise SpecError(f"DataConfig.resize_size={self.resize_size} is smaller than input_size="
                                f"{self.input_size}: the centre crop would not fit")
        if self.interpolation not in INTERPOLATIONS:
            raise SpecError(f"DataConfig.interpolation={self.interpolation!r} must be one of "
                            f"{', '.join(INTERPOLATIONS)}")
        if self.channel_order not in CHANNEL_ORDERS:
            raise SpecError(f"DataConfig.channel_order={self.channel_order!r} must be one of "
                            f"{', '.join(CHANNEL_ORDERS)}")
        if self.scale not in SCALES:
            raise SpecError(f"DataConfig.scale={self.scale!r} must be one of {', '.join(SCALES)}")
        for name in ("mean", "std"):
            values = tuple(getattr(self, name))
            if len(values) != self.channels or not all(isinstance(v, (int, float)) for v in values):
                raise SpecError(f"DataConfig.{name}={values!r} needs {self.channels} number(s), one per channel of "
                                f"{self.channel_order}")
            object.__setattr__(self, name, tuple(float(v) for v in values))
        if not all(v > 0 for v in self.std):
            raise SpecError(f"DataConfig.std={self.std!r} must be positive")

    @property
    def channels(self) -> int:
        """Channels of the network input: 3, or 1 for grayscale ("L")."""
        return CHANNEL_ORDERS[self.channel_order]

    @property
    def crop_pct(self) -> float:
        """timm's name for ``input_size / resize_size`` (1.0 without a resize)."""
        return 1.0 if self.resize_size is None else self.input_size / self.resize_size


def timm_data_config(input_size: int, crop_pct: float, interpolation: str, mean=IMAGENET_MEAN,
                     std=IMAGENET_STD) -> DataConfig:
    """timm's evaluation transform (``transforms_imagenet_eval``): resize the shorter side to
    ``floor(input_size / crop_pct)``, centre crop ``input_size``.

        >>> timm_data_config(224, 0.95, "bicubic").resize_size
        235
    """
    return DataConfig(input_size, math.floor(input_size / crop_pct), interpolation, mean, std, source="timm")


TORCHVISION_DATA = DataConfig()  # torchvision's IMAGENET1K_V1 transforms: 256 bilinear, crop 224, ImageNet mean/std
# Keras Applications' preprocess_input does not resize: the 256 -> 224 resize and crop is portres's choice
# (the same as torchvision's, the usual evaluation protocol for these weights)
KERAS_CAFFE_DATA = DataConfig(mean=CAFFE_MEAN_BGR, std=(1.0, 1.0, 1.0), channel_order="BGR", scale="raw",
                              source="keras")
KERAS_TF_DATA = DataConfig(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), scale="symmetric", source="keras")
CIFAR10_DATA = DataConfig(32, None, mean=CIFAR10_MEAN, std=CIFAR10_STD, source="portres")
# The default pretrained tag of each timm preset (timm/models/resnet.py, resnetv2.py: the first listed
# tag of a model is its default): input size, crop_pct, interpolation, mean/std as timm declares them.
TIMM_DATA = {
    "resnet26d": timm_data_config(224, 0.875, "bicubic"),  # resnet26d.bt_in1k (_ttcfg)
    "resnet50d": timm_data_config(224, 0.875, "bicubic"),  # resnet50d.ra2_in1k (_ttcfg)
    "resnet101d": timm_data_config(256, 0.95, "bicubic"),  # resnet101d.ra2_in1k: 256 input, crop_pct 0.95
    # resnetv2_*: IMAGENET_INCEPTION_MEAN/STD (0.5) in resnetv2.py's _cfg
    "resnetv2_18": timm_data_config(224, 0.9, "bicubic", INCEPTION_MEAN, INCEPTION_STD),  # .ra4_e3600_r224_in1k
    "resnetv2_34": timm_data_config(224, 0.9, "bicubic", INCEPTION_MEAN, INCEPTION_STD),  # .ra4_e3600_r224_in1k
    "resnetv2_50": timm_data_config(224, 0.95, "bicubic", INCEPTION_MEAN, INCEPTION_STD),  # .a1h_in1k
    "resnetv2_101": timm_data_config(224, 0.95, "bicubic", INCEPTION_MEAN, INCEPTION_STD),  # .a1h_in1k
    "resnetv2_152": timm_data_config(224, 0.875, "bicubic", INCEPTION_MEAN, INCEPTION_STD),  # .untrained
}


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """A preset: its architecture and how it is used (timm's registry metadata is the model)."""

    spec: ResNetSpec  # the architecture
    # "resnet", "resnext", "wide_resnet", "resnet_v1", "resnet_v2", "resnet_d", "keras", "cifar", "cifar_v2",
    # "plain"
    family: str  # the preset's family (listed above)
    description: str  # one line for `portres list`
    input_size: int  # the image side it is usually run at: 32 for CIFAR stems, 224 otherwise
    # per-channel normalisation of [0, 1] RGB images that its published weights expect; None where it has no
    # published weights (the data set's own statistics apply) or they expect other preprocessing (Keras v1:
    # BGR with the mean subtracted on a 0-255 scale); `data` below is the whole recipe
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str = "torchvision"  # the naming scheme of its published weights (portres.interop.LAYOUTS)
    source: str = "paper"  # whose definition it follows: "torchvision", "timm", "keras" or "paper"
    data: DataConfig | None = None  # how its input images are prepared (register() fills it in: usual_data_config)


_REGISTRY: dict[str, ZooEntry] = {}


class UnknownNameError(SpecError, KeyError):
    """An unknown preset name; the message lists the closest names (a SpecError and, as before, a KeyError)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


def usual_input_size(spec: ResNetSpec) -> int:
    """The image side a network of this shape is usually run at: 32 for CIFAR stems, 224 otherwise."""
    return 32 if spec.stem.kind == "cifar" else 224


def usual_data_config(spec: ResNetSpec) -> DataConfig:
    """The preprocessing a network of this shape gets when nothing else is known: a CIFAR stem takes
    32 x 32 images normalised with CIFAR-10's statistics, any other stem torchvision's ImageNet
    transforms; one input channel reads images as grayscale (the mean of the RGB statistics).

        >>> usual_data_config(resnet(18, in_channels=1)).mean
        (0.449,)
    """
    config = CIFAR10_DATA if spec.stem.kind == "cifar" else TORCHVISION_DATA
    if spec.in_channels == 1:
        return dataclasses.replace(config, channel_order="L", mean=(round(sum(config.mean) / 3, 6),),
                                   std=(round(sum(config.std) / 3, 6),))
    if spec.in_channels != 3:
        raise SpecError(f"{spec.name} takes {spec.in_channels}-channel input: images have 1 or 3 channels, so "
                        "there is no usual preprocessing for it (pass config=DataConfig(...) for 1 or 3)")
    return config


def register(spec: ResNetSpec, family: str, description: str = "", **metadata) -> ResNetSpec:
    """Add ``spec`` to the zoo under ``spec.name``; a duplicate name raises ``ValueError``.

    ``metadata``: the other :class:`ZooEntry` fields (``input_size`` defaults to :func:`usual_input_size`,
    ``data`` to :func:`usual_data_config`).

        >>> register(resnet(18, name="my_resnet18"), "resnet", layout="torchvision")  # doctest: +SKIP
    """
    if spec.name in _REGISTRY:
        raise ValueError(f"a preset named {spec.name!r} is already registered")
    metadata.setdefault("input_size", usual_input_size(spec))
    if metadata.get("data") is None and spec.in_channels in (1, 3):
        metadata["data"] = usual_data_config(spec)
    _REGISTRY[spec.name] = ZooEntry(spec, family, description, **metadata)
    return spec


def names() -> list[str]:
    """Every preset name, in registration order."""
    return list(_REGISTRY)


def entry(name: str) -> ZooEntry:
    if not isinstance(name, str):
        raise UnknownNameError(f"a preset name must be a string, got {type(name).__name__} {name!r} "
                               "(`portres list` shows all)")
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=5, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise UnknownNameError(f"unknown preset {name!r}{hint} (`portres list` shows all)")
    return _REGISTRY[name]


def get(name: str) -> ResNetSpec:
    """The spec registered as ``name``, e.g. ``portres.get("resnext50_32x4d")``."""
    return entry(name).spec


def default_input_size(spec_or_name) -> int:
    """The image side ``spec_or_name`` is usually run at: its preset's ``input_size``, and for a spec the zoo
    does not hold, :func:`usual_input_size`.

        >>> default_input_size("resnet50"), default_input_size("resnet56")
        (224, 32)
    """
    spec = resolve(spec_or_name)
    registered = _REGISTRY.get(spec.name)
    return registered.input_size if registered is not None and registered.spec == spec else usual_input_size(spec)


def data_config(spec_or_name) -> DataConfig:
    """How images are prepared for ``spec_or_name`` (a preset name or a spec): its preset's
    :class:`DataConfig` (what its published weights were trained with), and for a spec the zoo does not
    hold, :func:`usual_data_config`.

        >>> data_config("resnet50d").interpolation, data_config("resnet50d").resize_size
        ('bicubic', 256)
        >>> data_config("resnet20").input_size, data_config("resnet20").resize_size
        (32, None)
    """
    spec = resolve(spec_or_name)
    registered = _REGISTRY.get(spec.name)
    if registered is not None and registered.data is not None and _same_network(registered.spec, spec):
        return registered.data
    return usual_data_config(spec)


def _same_network(registered: ResNetSpec, spec: ResNetSpec) -> bool:
    # a preset with another head (num_classes, e.g. fine-tuned) still wants its preset's preprocessing
    return dataclasses.replace(registered, num_classes=spec.num_classes) == spec


def resolve(spec_or_name) -> ResNetSpec:
    """A ResNetSpec as is, a preset name as its spec: what every function taking a spec accepts."""
    if isinstance(spec_or_name, ResNetSpec):
        return spec_or_name
    if isinstance(spec_or_name, str):
        return get(spec_or_name)
    raise SpecError(f"expected a ResNetSpec or a preset name, got {type(spec_or_name).__name__}")


def resnet(depth: int, *, name: str | None = None, preactivation: bool = False, **knobs) -> ResNetSpec:
    """An ImageNet ResNet of ``depth`` 18/34/50/101/152 with any variant knobs as keywords.

        >>> resnet(50, shortcut="avg_down", stem=StemSpec(kind="deep")).shortcut
        'avg_down'

    ``knobs`` are :class:`~portres.spec.ResNetSpec` fields (``shortcut="avg_down"``,
    ``stem=StemSpec(kind="deep")``, ``bottleneck_stride_at="1x1"``, ``residual=False``, ...).
    """
    if depth not in IMAGENET_DEPTHS:
        raise SpecError(f"depth={depth!r} must be one of {', '.join(map(str, IMAGENET_DEPTHS))}")
    block, blocks = IMAGENET_DEPTHS[depth]
    if preactivation:
        block = "preact_" + block
    stages = tuple(
        StageSpec(blocks=n, width=w, stride=s) for n, w, s in zip(blocks, IMAGENET_WIDTHS, IMAGENET_STRIDES)
    )
    allowed = {f.name for f in dataclasses.fields(ResNetSpec)} - {"name", "stages", "block"}
    unknown = set(knobs) - allowed
    if unknown:
        raise SpecError(f"resnet() got unknown or fixed keyword(s): {', '.join(sorted(unknown))}")
    return ResNetSpec(name=name or f"resnet{depth}", stages=stages, block=block, **knobs)


def cifar_resnet(depth: int, *, name: str | None = None, **knobs) -> ResNetSpec:
    """The CIFAR ResNet of depth 6n+2 (He et al. 2016, section 4.2): widths 16/32/64, option A."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise SpecError(f"depth={depth!r} must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, 1202, ...)")
    blocks = (depth - 2) // 6
    knobs = {"shortcut": "A", "num_classes": 10, **knobs}
    return ResNetSpec(
        name=name or f"resnet{depth}",
        block="basic",
        stem=StemSpec(kind="cifar", width=16, max_pool=False),
        stages=(StageSpec(blocks, 16, 1), StageSpec(blocks, 32, 2), StageSpec(blocks, 64, 2)),
        **knobs,
    )


CIFAR_PREACT_DEPTHS = (20, 32, 44, 56, 110)  # pre-activation basic blocks, 6n+2
CIFAR_PREACT_BOTTLENECK_DEPTHS = (164, 1001)  # pre-activation bottlenecks, 9n+2 (He et al. 2016, section 4)


def cifar_preact_resnet(depth: int, *, bottleneck: bool = False, name: str | None = None, **knobs) -> ResNetSpec:
    """A pre-activation CIFAR ResNet ("Identity mappings in deep residual networks", He et al. 2016).

    Basic blocks: depth 6n+2 (resnetv2_20 ... resnetv2_110), widths 16/32/64, option-A shortcuts
    like the original CIFAR nets. Bottlenecks: depth 9n+2 (resnetv2_164, resnetv2_1001), inner
    widths 16/32/64 and outputs 4x (64/128/256), the stride on the first 1x1 and 1x1 projection
    shortcuts where the shape changes, as the authors' code (KaimingHe/resnet-1k-layers). Both
    start with one bare 3x3 conv and end with BN-ReLU, global average pooling and the classifier.

        >>> cifar_preact_resnet(1001, bottleneck=True).stages[0]
        StageSpec(blocks=111, width=16, stride=1)
    """
    per_block = 9 if bottleneck else 6
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < per_block + 2 or (depth - 2) % per_block:
        examples = "164, 1001" if bottleneck else "20, 56, 110"
        raise SpecError(f"depth={depth!r} must be {per_block}n+2 with n >= 1 ({examples}, ...)")
    blocks = (depth - 2) // per_block
    knobs = {"num_classes": 10, **knobs}
    if bottleneck:
        knobs = {"shortcut": "B", "bottleneck_stride_at": "1x1", **knobs}
    else:
        knobs = {"shortcut": "A", **knobs}
    return ResNetSpec(
        name=name or f"resnetv2_{depth}",
        block="preact_bottleneck" if bottleneck else "preact_basic",
        stem=StemSpec(kind="cifar", width=16, max_pool=False),
        stages=(StageSpec(blocks, 16, 1), StageSpec(blocks, 32, 2), StageSpec(blocks, 64, 2)),
        **knobs,
    )


def _register_defaults() -> None:
    torchvision = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "source": "torchvision", "data": TORCHVISION_DATA}
    timm = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "layout": "timm", "source": "timm"}
    for depth in IMAGENET_DEPTHS:
        register(resnet(depth), "resnet", f"ResNet-{depth} (torchvision, v1.5)", **torchvision)
    for groups, width_per_group, depth in ((32, 4, 50), (32, 8, 101), (64, 4, 101)):
        register(
            resnet(depth, name=f"resnext{depth}_{groups}x{width_per_group}d", groups=groups,
                   width_per_group=width_per_group),
            "resnext", f"ResNeXt-{depth} {groups}x{width_per_group}d (torchvision)", **torchvision,
        )
    for depth in (50, 101):
        register(resnet(depth, name=f"wide_resnet{depth}_2", width_factor=2), "wide_resnet",
                 f"Wide ResNet-{depth}-2 (torchvision)", **torchvision)
    for depth in (50, 101, 152):
        register(resnet(depth, name=f"resnet{depth}_v1", bottleneck_stride_at="1x1"), "resnet_v1",
                 f"ResNet-{depth}, original v1: stride on the first 1x1")
    for depth in IMAGENET_DEPTHS:
        register(resnet(depth, name=f"resnetv2_{depth}", preactivation=True), "resnet_v2",
                 f"Pre-activation ResNet-{depth} (identity mappings)", mean=INCEPTION_MEAN, std=INCEPTION_STD,
                 layout="timm", source="timm", data=TIMM_DATA[f"resnetv2_{depth}"])
    for depth in (50, 101):
        register(resnet(depth, name=f"resnet{depth}d", stem=StemSpec(kind="deep"), shortcut="avg_down"),
                 "resnet_d", f"ResNet-{depth}-D: deep stem + avg-pool downsampling (timm names)",
                 data=TIMM_DATA[f"resnet{depth}d"], **timm)
    d_variant = {"stem": StemSpec(kind="deep"), "shortcut": "avg_down"}
    resnet26d = resnet(50, name="resnet26d", **d_variant)
    register(dataclasses.replace(resnet26d, stages=tuple(dataclasses.replace(s, blocks=2) for s in resnet26d.stages)),
             "resnet_d", "ResNet-26-D: bottleneck [2, 2, 2, 2], deep stem + avg-pool downsampling (timm)",
             data=TIMM_DATA["resnet26d"], **timm)
    for depth in (50, 101, 152):
        register(resnet(depth, name=f"keras_resnet{depth}", **KERAS_V1), "keras",
                 f"Keras Applications ResNet{depth}: v1, conv biases, BN eps 1.001e-5 (Keras names: layout='keras')",
                 layout="keras", source="keras", data=KERAS_CAFFE_DATA)
    for depth in (50, 101, 152):
        v2 = resnet(depth, name=f"keras_resnet{depth}v2", preactivation=True, **KERAS_V2)
        stages = tuple(dataclasses.replace(s, stride=stride) for s, stride in zip(v2.stages, KERAS_V2_STRIDES))
        register(dataclasses.replace(v2, stages=stages), "keras",
                 f"Keras Applications ResNet{depth}V2: pre-activation, stride in each stage's last block",
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), layout="keras", source="keras",  # x / 127.5 - 1
                 data=KERAS_TF_DATA)
    for depth in CIFAR_DEPTHS:
        register(cifar_resnet(depth), "cifar", f"CIFAR ResNet-{depth}, option A shortcuts")
    for depth in CIFAR_DEPTHS:  # the plain twin of every CIFAR depth
        register(cifar_resnet(depth, name=f"plain{depth}", residual=False), "plain",
                 f"CIFAR plain-{depth}: ResNet-{depth} without shortcuts")
    for depth in CIFAR_PREACT_DEPTHS:
        register(cifar_preact_resnet(depth), "cifar_v2", f"CIFAR pre-activation ResNet-{depth}, option A shortcuts")
    for depth in CIFAR_PREACT_BOTTLENECK_DEPTHS:
        register(cifar_preact_resnet(depth, bottleneck=True), "cifar_v2",
                 f"CIFAR pre-activation ResNet-{depth}, bottlenecks 16/32/64 x4, projection shortcuts")


_register_defaults()
