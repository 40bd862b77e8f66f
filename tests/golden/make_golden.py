# how to regenerate: python tests/golden/make_golden.py   (from the repo root, in a venv with the versions below)
"""Generate tests/golden/data/*.npz: what the real frameworks compute for every distinct zoo architecture.

Nothing in CI installs torch, timm or Keras, and every portres backend runs the same plan
(portres/plan.py), so a mistake in the plan passes every parity test. These files are the
independent check: each holds, for one representative per distinct architecture (the networks of
tests/conftest.py's ``architecture_representatives()``), the float64 logits and a summary of the stem's
and every stage's output, computed once by the framework that defines the network, with the
seeded weights and images of tests/golden/seeded.py. tests/test_golden.py computes the same with
portres's float64 NumPy reference and compares (no framework needed).

Where each network comes from (``SOURCES`` below):

* torchvision ``torchvision.models.<name>(weights=None)``: resnet18, resnet50, resnext50_32x4d,
  resnext101_32x8d, resnext101_64x4d, wide_resnet50_2; resnet50_v1 (the original v1, stride on the
  first 1x1 of each downsampling bottleneck) is torchvision's resnet50 with ``conv1.stride = 2`` and
  ``conv2.stride = 1`` in each downsampling block (layer2.0, layer3.0, layer4.0).
* timm ``timm.create_model(<name>, pretrained=False)``: resnet26d, resnetv2_18, resnetv2_50 (the
  timm names of the pre-activation nets are written by ``portres.interop.export_weights(.., "timm")``;
  the post-activation ResNets use torchvision's names).
* Keras 3 (JAX backend, floatx float64) ``keras.applications.ResNet50`` / ``ResNet50V2``
  (``weights=None``, 1000 classes, ``classifier_activation=None``): keras_resnet50, keras_resnet50v2,
  weights under Keras' names by ``export_weights(.., "keras")``, NHWC input.
* The CIFAR nets no framework ships, written below as torch modules from the papers (the authors'
  Lua Torch code cannot be run here), independent of portres/plan.py; only the spec's fields are read,
  to assert the preset is the network written here:

  - resnet20 and plain20: He et al. 2016, "Deep Residual Learning for Image Recognition", section
    4.2: a 3x3 conv (16) with BN-ReLU, three stages of n basic blocks (16/32/64, stride 1/2/2), each
    block conv-BN-ReLU-conv-BN, the shortcut added, then ReLU; option A shortcuts: the identity,
    strided (``x[:, :, ::2, ::2]``) and zero-padded in channels where the shape changes; global
    average pooling and a 10-way classifier. The paper does not say where the zero channels go:
    here (as portres's preset and akamaster/pytorch_resnet_cifar10) half before, half after;
    facebookarchive/fb.resnet.torch appends them all after. plain20 is the same without shortcuts.
  - resnetv2_20: the pre-activation basic net of He et al. 2016, "Identity Mappings in Deep
    Residual Networks": each block BN-ReLU-conv-BN-ReLU-conv plus the shortcut, a final BN-ReLU
    before pooling. Its appendix: "for the first Residual Unit (that follows a stand-alone
    convolutional layer, conv1), we adopt the first activation right after conv1 and before splitting
    into two paths", so the first block's shortcut reads BN-ReLU(conv1) (as fb.resnet.torch's
    preresnet.lua does). portres's preset adds the bare conv1 output there instead (as timm and
    kuangliu/pytorch-cifar do for an identity shortcut); everything else agrees. Both are written:
    ``resnetv2_20`` is the paper's, ``resnetv2_20.preset_first_unit`` the preset's choice, and
    tests/test_golden.py expects the first to differ (strict xfail) until the preset is settled.
  - resnetv2_164: the authors' KaimingHe/resnet-1k-layers resnet-pre-act.lua, line by line: a bare
    3x3 conv (16); three stages of 18 bottlenecks (16/32/64 inner, x4 out, stride 1/2/2); a block
    that keeps the shape is BN-ReLU-conv1x1(stride)-BN-ReLU-conv3x3-BN-ReLU-conv1x1 plus the identity;
    a block that changes it applies BN-ReLU first and feeds the result to both the convs and a 1x1
    strided projection (no BN on the shortcut); final BN-ReLU, average pooling, 10-way classifier.

Every network computes in float64 (torch ``.double()``; Keras floatx float64 with JAX's x64, and Keras'
float64-to-float32 promotion, which made its batch norms compute in float32, switched off) on
``seeded.images(64)`` (ImageNet family) or ``seeded.images(32)`` (CIFAR), batch 2. Each file records
the framework and its version, the input size, the seeds, the date and a digest of the framework
model's parameter names and shapes.

Environment used (CPU only): torch 2.13.0+cpu, torchvision 0.28.0, timm 1.0.31, keras 3.15.1,
jax 0.10.2, portres (editable). ``python tests/golden/make_golden.py NAME ...`` regenerates some.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
sys.path.insert(0, str(HERE))
os.environ.setdefault("KERAS_BACKEND", "jax")  # Keras 3 on JAX's CPU: TensorFlow is not needed

# torchvision's PyPI wheel is built against CUDA torch; with the CPU torch its compiled ops do not load
# ("operator torchvision::nms does not exist" raised by torchvision/_meta_registrations.py at import).
# The ResNets use none of those ops: an empty stand-in module lets `import torchvision` (and timm,
# which imports torchvision) succeed without them.
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # Keras' float64 needs JAX's 64-bit mode

import keras  # noqa: E402
import seeded  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from keras.src.backend.common import dtypes as keras_dtypes  # noqa: E402
from torch import nn  # noqa: E402

import portres  # noqa: E402
from portres.interop import export_weights  # noqa: E402

keras.config.set_floatx("float64")
# Keras 3's type promotion maps float64 to float32 ("aligned with JAX's default", i.e. without x64), and
# BatchNormalization computes in result_type(input, "float32"): with floatx float64 the convs run in float64
# but every BN in float32 (relative errors ~1e-7). With JAX's x64 on, promote float64 as JAX then does.
keras_dtypes.BIT64_TO_BIT32_DTYPE.pop("float64", None)
assert keras.backend.result_type("float64", "float32") == "float64"
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TORCHVISION = ("resnet18", "resnet50", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2")
SOURCES = {
    **{name: f"torchvision.models.{name}(weights=None)" for name in TORCHVISION},
    "resnet50_v1": "torchvision.models.resnet50(weights=None), downsampling blocks' conv1.stride=2, conv2.stride=1",
    "resnet26d": "timm.create_model('resnet26d', pretrained=False)",
    "resnetv2_18": "timm.create_model('resnetv2_18', pretrained=False)",
    "resnetv2_50": "timm.create_model('resnetv2_50', pretrained=False)",
    "keras_resnet50": "keras.applications.ResNet50(weights=None, classifier_activation=None)",
    "keras_resnet50v2": "keras.applications.ResNet50V2(weights=None, classifier_activation=None)",
    "resnet20": "torch modules in make_golden.py from He et al. 2016 section 4.2 (option A)",
    "plain20": "torch modules in make_golden.py from He et al. 2016 section 4.2 (no shortcuts)",
    "resnetv2_20": "torch modules in make_golden.py from He et al. 2016 'Identity Mappings' (and its appendix)",
    "resnetv2_20.preset_first_unit": "as resnetv2_20, but the first block's shortcut adds the bare conv1 output "
                                     "(portres's preset) instead of BN-ReLU(conv1) (the paper's appendix)",
    "resnetv2_164": "torch modules in make_golden.py from KaimingHe/resnet-1k-layers resnet-pre-act.lua",
}


# -- torch: weights in, float64 outputs out ---------------------------------------------------------


def torch_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(value.shape) for name, value in model.state_dict().items()
            if not name.endswith("num_batches_tracked")}


def load_torch(model: nn.Module, params: dict[str, np.ndarray]) -> nn.Module:
    """``params`` (the model's own names) into ``model`` strictly, in float64, eval mode."""
    model = model.double().eval()
    state = model.state_dict()
    missing = [name for name in state if name not in params and not name.endswith("num_batches_tracked")]
    extra = [name for name in params if name not in state]
    if missing or extra:
        raise SystemExit(f"{type(model).__name__}: names differ: missing {missing[:5]}, extra {extra[:5]}")
    for name, value in params.items():
        if tuple(state[name].shape) != value.shape:
            raise SystemExit(f"{name}: shape {tuple(state[name].shape)} in the model, {value.shape} given")
        state[name] = torch.from_numpy(np.ascontiguousarray(value, np.float64))
    model.load_state_dict(state, strict=True)
    return model


def run_torch(model: nn.Module, stages: dict[str, nn.Module], images: np.ndarray):
    """Logits and the outputs of the ``stages`` modules (forward hooks), as float64 NumPy."""
    captured: dict[str, np.ndarray] = {}
    hooks = [module.register_forward_hook(lambda _m, _i, out, key=key: captured.__setitem__(key, out.detach().numpy()))
             for key, module in stages.items()]
    with torch.no_grad():
        logits = model(torch.from_numpy(images)).numpy()
    for hook in hooks:
        hook.remove()
    return logits, {key: captured[key] for key in stages}


def torchvision_net(name: str, images: np.ndarray):
    v1 = name == "resnet50_v1"
    model = getattr(torchvision.models, "resnet50" if v1 else name)(weights=None)
    if v1:  # the original v1: the downsampling bottleneck strides its first 1x1, not its 3x3
        for layer in (model.layer2, model.layer3, model.layer4):
            assert layer[0].conv2.stride == (2, 2) and layer[0].downsample is not None
            layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
    shapes = torch_shapes(model)
    model = load_torch(model, seeded.weights(shapes))
    stages = {"stem": model.maxpool, **{f"layer{i}": getattr(model, f"layer{i}") for i in range(1, 5)}}
    return (*run_torch(model, stages, images), shapes, f"torchvision {torchvision.__version__}")


def timm_net(name: str, images: np.ndarray):
    model = timm.create_model(name, pretrained=False)
    spec = portres.get(name)
    if name.startswith("resnetv2"):  # timm's pre-activation names: written from portres's by the timm name map
        shapes = {key: shape for key, (shape, _) in portres.make_plan(spec).param_shapes().items()}
        timm_params = export_weights(seeded.weights(shapes), spec, "timm")
        model = load_torch(model, timm_params)
        stages = {"stem": model.stem, **{f"layer{i + 1}": stage for i, stage in enumerate(model.stages)}}
    else:  # timm's ResNets: torchvision's names
        shapes = torch_shapes(model)
        model = load_torch(model, seeded.weights(shapes))
        stages = {"stem": model.maxpool, **{f"layer{i}": getattr(model, f"layer{i}") for i in range(1, 5)}}
    return (*run_torch(model, stages, images), shapes, f"timm {timm.__version__}")


# -- Keras -----------------------------------------------------------------------------------------------


def keras_net(name: str, images: np.ndarray):
    spec = portres.get(name)
    size = images.shape[-1]
    application = {"keras_resnet50": "ResNet50", "keras_resnet50v2": "ResNet50V2"}[name]
    model = getattr(keras.applications, application)(weights=None, include_top=True, classes=1000,
                                                      input_shape=(size, size, 3), classifier_activation=None)
    shapes = {key: shape for key, (shape, _) in portres.make_plan(spec).param_shapes().items()}
    named = export_weights(seeded.weights(shapes), spec, "keras")
    if {variable.path for variable in model.weights} != set(named):
        raise SystemExit(f"{name}: Keras' variables are not the exported names")
    for variable in model.weights:
        assert str(variable.dtype) == "float64", variable.dtype
        assert tuple(variable.shape) == named[variable.path].shape, variable.path
        variable.assign(named[variable.path])
    blocks = [stage.blocks for stage in spec.stages]
    stage_layers = {"stem": "pool1_pool",
                    **{f"layer{i + 1}": f"conv{i + 2}_block{n}_out" for i, n in enumerate(blocks)}}
    probe = keras.Model(model.input, [model.get_layer(layer).output for layer in stage_layers.values()]
                        + [model.output])
    outputs = probe(images.transpose(0, 2, 3, 1), training=False)  # Keras is NHWC
    outputs = [np.asarray(value, np.float64) for value in outputs]
    features = {key: value.transpose(0, 3, 1, 2) for key, value in zip(stage_layers, outputs[:-1])}
    return outputs[-1], features, shapes, f"keras {keras.__version__} (jax {jax.__version__}, floatx float64)"


# -- the CIFAR networks, written from the papers ----------------------------------------------------------


def conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)


def option_a(x: torch.Tensor, cout: int, stride: int) -> torch.Tensor:
    """The parameter-free shortcut: strided identity, zero channels added (half before, half after)."""
    if stride != 1:
        x = x[:, :, ::stride, ::stride]
    extra = cout - x.shape[1]
    if extra:
        x = F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
    return x


class CifarBasic(nn.Module):
    """He et al. 2016, section 4.2: conv-BN-ReLU-conv-BN, + option-A shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, residual: bool):
        super().__init__()
        self.conv1, self.bn1 = conv(cin, cout, 3, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv(cout, cout, 3), nn.BatchNorm2d(cout)
        self.cout, self.stride, self.residual = cout, stride, residual

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + option_a(x, self.cout, self.stride)
        return F.relu(out)


class CifarPreActBasic(nn.Module):
    """Identity mappings: BN-ReLU-conv-BN-ReLU-conv + shortcut (option A on the block input).

    ``first_unit_shortcut_activated``: the network's first unit takes its shortcut after conv1's BN-ReLU
    (the paper's appendix) rather than from the bare conv1 output."""

    def __init__(self, cin: int, cout: int, stride: int, first_unit_shortcut_activated: bool = False):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), conv(cin, cout, 3, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), conv(cout, cout, 3)
        self.cout, self.stride, self.activated_shortcut = cout, stride, first_unit_shortcut_activated

    def forward(self, x):
        activated = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        return out + option_a(activated if self.activated_shortcut else x, self.cout, self.stride)


class CifarPreActBottleneck(nn.Module):
    """resnet-1k-layers' bottleneck: the stride on the first 1x1; where the shape changes, the BN-ReLU
    comes first and feeds both the convs and a bare 1x1 strided projection."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        inner = cout // 4
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), conv(cin, inner, 1, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(inner), conv(inner, inner, 3)
        self.bn3, self.conv3 = nn.BatchNorm2d(inner), conv(inner, cout, 1)
        self.project = cin != cout
        if self.project:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))
        else:
            assert stride == 1  # the authors' code only strides where the width grows

    def forward(self, x):
        if self.project:  # "Residual Units for increasing dimensions": common BN, ReLU
            x = F.relu(self.bn1(x))
            shortcut = self.downsample(x)
            out = self.conv1(x)
        else:
            shortcut = x
            out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + shortcut


class CifarNet(nn.Module):
    """The CIFAR nets' frame: a 3x3 conv (16), three stages (stride 1/2/2), [BN-ReLU,] pooling, classifier."""

    def __init__(self, kind: str, depth: int, first_unit_shortcut_activated: bool = True):
        super().__init__()
        preact = kind.startswith("preact")
        self.preact = preact
        self.conv1 = conv(3, 16, 3)
        if not preact:
            self.bn1 = nn.BatchNorm2d(16)
        if kind == "preact_bottleneck":
            n, widths = (depth - 2) // 9, (64, 128, 256)
        else:
            n, widths = (depth - 2) // 6, (16, 32, 64)
        cin = 16
        for stage, (cout, stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
            blocks = []
            for index in range(n):
                s = stride if index == 0 else 1
                if kind in ("basic", "plain"):
                    blocks.append(CifarBasic(cin, cout, s, residual=kind == "basic"))
                elif kind == "preact_basic":
                    first = stage == 1 and index == 0 and first_unit_shortcut_activated
                    blocks.append(CifarPreActBasic(cin, cout, s, first))
                else:
                    blocks.append(CifarPreActBottleneck(cin, cout, s))
                cin = cout
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        if preact:
            self.final_bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x):
        self.features = {}
        x = self.conv1(x)
        if not self.preact:
            x = F.relu(self.bn1(x))
        self.features["stem"] = x
        for stage in (1, 2, 3):
            x = getattr(self, f"layer{stage}")(x)
            self.features[f"layer{stage}"] = x
        if self.preact:
            x = F.relu(self.final_bn(x))
        return self.fc(x.mean(dim=(2, 3)))


CIFAR = {  # name: (block kind, depth, what the preset must say)
    "resnet20": ("basic", 20, {"block": "basic", "shortcut": "A", "residual": True}),
    "plain20": ("plain", 20, {"block": "basic", "residual": False}),
    "resnetv2_20": ("preact_basic", 20, {"block": "preact_basic", "shortcut": "A", "residual": True}),
    "resnetv2_164": ("preact_bottleneck", 164, {"block": "preact_bottleneck", "shortcut": "B", "residual": True,
                                                 "bottleneck_stride_at": "1x1"}),
}


def check_cifar_preset(name: str, depth: int, expected: dict) -> None:
    """The preset's fields say it is the network written here (the plan is not read)."""
    spec = portres.get(name)
    per_block = 9 if spec.block == "preact_bottleneck" else 6
    facts = {
        "stem": (spec.stem.kind, spec.stem.width, spec.stem.max_pool),
        "stages": [(s.blocks, s.width, s.stride) for s in spec.stages],
        "other": (spec.groups, spec.width_per_group, spec.width_factor, spec.stage_stride_at, spec.conv_bias,
                  spec.bn_eps, spec.num_classes, spec.in_channels, spec.zero_init_last_bn),
        **{field: getattr(spec, field) for field in expected},
    }
    n = (depth - 2) // per_block
    wanted = {
        "stem": ("cifar", 16, False),
        "stages": [(n, 16, 1), (n, 32, 2), (n, 64, 2)],
        "other": (1, None, 1, "first", "none", 1e-5, 10, 3, False),
        **expected,
    }
    if facts != wanted:
        raise SystemExit(f"{name}: the preset is not the network written here:\n  {facts}\n  {wanted}")


def cifar_net(name: str, images: np.ndarray):
    base, _, variant = name.partition(".")
    kind, depth, expected = CIFAR[base]
    check_cifar_preset(base, depth, expected)
    model = CifarNet(kind, depth, first_unit_shortcut_activated=variant != "preset_first_unit")
    shapes = torch_shapes(model)
    model = load_torch(model, seeded.weights(shapes))
    with torch.no_grad():
        logits = model(torch.from_numpy(images)).numpy()
    features = {key: value.numpy() for key, value in model.features.items()}
    return logits, features, shapes, f"torch {torch.__version__} (modules written in make_golden.py)"


# -- writing ------------------------------------------------------------------------------------------------


def generate(name: str) -> Path:
    base = name.partition(".")[0]
    spec = portres.get(base)
    size = seeded.input_size(spec.stem.kind)
    images = seeded.images(size)
    if base in CIFAR:
        run = cifar_net
    elif base.startswith("keras_"):
        run = keras_net
    elif SOURCES[name].startswith("timm"):
        run = timm_net
    else:
        run = torchvision_net
    logits, features, shapes, framework = run(name, images)
    assert logits.dtype == np.float64 and logits.shape == (seeded.BATCH, spec.num_classes), logits.shape
    assert list(features) == ["stem", *[f"layer{i + 1}" for i in range(len(spec.stages))]], list(features)
    meta = {
        "network": name, "source": SOURCES[name], "framework": framework, "torch": torch.__version__,
        "python": sys.version.split()[0], "numpy": np.__version__, "input_size": size, "batch": seeded.BATCH,
        "weight_seed": seeded.SEED, "image_seed": seeded.IMAGE_SEED, "sketch_size": seeded.SKETCH_SIZE,
        "dtype": "float64", "date": datetime.date.today().isoformat(),
        "param_count": int(sum(np.prod(shape, dtype=np.int64) for shape in shapes.values())),
        "param_fingerprint": seeded.fingerprint(shapes),
        "stage_shapes": {key: list(value.shape) for key, value in features.items()},
        "stage_rms": {key: float(np.sqrt(np.mean(np.square(value)))) for key, value in features.items()},
        "generator": "tests/golden/make_golden.py",
    }
    DATA.mkdir(exist_ok=True)
    path = DATA / f"{name}.npz"
    summary = seeded.summarize(features)
    np.savez_compressed(path, logits=logits, **summary, meta=np.array(json.dumps(meta, sort_keys=True)))
    rms = ", ".join(f"{key} {value:.3g}" for key, value in meta["stage_rms"].items())
    print(f"{name}: {framework}; logits rms {np.sqrt(np.mean(logits ** 2)):.3g}; stage rms {rms}", flush=True)
    return path


def main(argv: list[str]) -> None:
    unknown = [name for name in argv if name not in SOURCES]
    if unknown:
        raise SystemExit(f"unknown network(s) {unknown}; known: {', '.join(SOURCES)}")
    for name in argv or SOURCES:
        generate(name)


if __name__ == "__main__":
    main(sys.argv[1:])
