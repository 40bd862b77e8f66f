"""The shared parity suite: every zoo entry x every available backend vs the float64 reference.

Inputs and weights are random (BN affine terms and running statistics included); the
check is relative L2 error of the logits and of every stage output. Every framework runs with
eval-mode BN folded into the convs (its default) and unfolded (what ``portres eval`` and the
evaluation during training run); in float32 everywhere, in float64 where the framework computes
in it, in float16/bfloat16 on a few networks (there each op alone is checked too).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import forward_case  # tests/ is on sys.path (rootdir conftest)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import portres
from portres import backends, parity, zoo
from portres.plan import make_plan
from portres.rewrites import fold_batch_norm
from portres.spec import (
    BLOCK_KINDS,
    BOTTLENECK_STRIDE_POSITIONS,
    SHORTCUT_KINDS,
    STEM_KINDS,
    ResNetSpec,
    SpecError,
    StageSpec,
    StemSpec,
)
from portres.walker import apply_op
from portres.weights import load_weights

FRAMEWORKS = [name for name in backends.available() if name != "numpy"]
LOW_PRECISION_NETWORKS = ["resnet18", "resnet50", "resnext50_32x4d", "resnetv2_50", "resnet50d", "resnet20"]
FOLDING = ("folded", "unfolded")


class Cases:
    """One random case and its reference per network and case size, shared by that network's backends."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, name: str, size: int | None = None, batch: int = 2, keep_all: bool = False):
        spec = portres.get(name)
        key = (name, size or parity.parity_input_size(spec), batch, keep_all)
        if key != self.key:  # tests are ordered network-major, so one entry suffices
            images, params = parity.parity_case(spec, key[1], batch=batch, seed=0)
            self.key, self.value = key, (spec, images, params, parity.Reference(spec, images, params, keep_all))
        return self.value


CASES = Cases()


def explain(result: parity.ParityResult, spec, images, params, model) -> str:
    reference = parity.Reference(spec, images, params, keep_all=True)
    where = parity.locate_divergence(model, reference) or "no single op (accumulated error)"
    return (f"{result.backend} {result.dtype}: logits {result.logits_error:.3g}, stages {result.stage_errors}; "
            f"first divergence: {where}")


def count(plan, kind: str) -> int:
    return sum(op.kind == kind for op in plan.ops)


def build(spec, backend: str, params, bn: str, **options):
    """``portres.build`` with eval-mode BN folded into the convs or not, checking the option took effect."""
    model = portres.build(spec, backend, params, fold_batch_norm_into_conv=bn == "folded", **options)
    unfolded = count(make_plan(spec), "batch_norm")
    assert count(model.plan, "batch_norm") == (0 if bn == "folded" else unfolded) and unfolded > 0
    return model


# The default tier runs the deeper twins (resnet1202, plain110, resnet152, resnetv2_1001, ...) on one image
# at the smallest input they accept (tests/conftest.py: forward_case); the full tier on the full case.
@pytest.mark.parametrize("name, backend, bn", [(n, b, f) for n in zoo.names() for b in FRAMEWORKS for f in FOLDING])
def test_float32_parity_for_every_zoo_entry(name, backend, bn):
    size, batch = forward_case(name)
    spec, images, params, reference = CASES.get(name, size, batch)
    model = build(spec, backend, params, bn, dtype="float32")
    result = parity.compare(model, images, reference)
    assert result.passed, explain(result, spec, images, params, model)
    assert set(result.stage_errors) == {"stem"} | {f"layer{i + 1}" for i in range(len(spec.stages))}


# -- float64: where a framework computes in float64, it agrees with the reference to rounding ----------------

# onnxruntime computes in float32 and float16 only (test_onnxruntime_computes_in_no_float64 keeps this honest)
FLOAT64_FRAMEWORKS = [name for name in FRAMEWORKS if name != "onnxruntime"]
# one network per kind of block and shortcut, conv biases (keras), and a deep one at the reduced case (plain110,
# where float32 drifts most; resnet1202 and plain1202 measured 1e-14 too)
FLOAT64_NETWORKS = ["resnet20", "resnetv2_18", "resnet26d", "keras_resnet50", "resnext50_32x4d", "plain110"]


@pytest.mark.parametrize("name, backend", [(n, b) for n in FLOAT64_NETWORKS for b in FLOAT64_FRAMEWORKS])
def test_float64_forward_parity(name, backend):
    """Measured: at most 1e-14 (plain1202's worst stage on MLX; 1e-15 typical) against 1.5e-7 for a float32
    computation anywhere on the way: 1e-10 (parity.TOLERANCE) catches a silent fall-back to float32. The
    folded model is held to the reference's own folded float64 model (folding rounds weights to float32)."""
    size, batch = forward_case(name)
    spec, images, params, reference = CASES.get(name, size, batch)
    unfolded = build(spec, backend, params, "unfolded", dtype="float64")
    result = parity.compare(unfolded, images, reference)
    assert result.tolerance == 1e-10
    assert result.passed, explain(result, spec, images, params, unfolded)
    folded = build(spec, backend, params, "folded", dtype="float64")
    folded_reference = build(spec, "numpy", params, "folded")
    assert folded_reference.backend.dtype == "float64"
    errors = {"logits": parity.relative_error(folded(images), folded_reference(images))}
    expected = folded_reference.features(images)
    errors.update({key: parity.relative_error(value, expected[key]) for key, value in folded.features(images).items()})
    assert max(errors.values()) < 1e-10, errors


@pytest.mark.skipif("onnxruntime" not in FRAMEWORKS, reason="onnxruntime not installed")
def test_onnxruntime_computes_in_no_float64():
    with pytest.raises(ValueError, match="cannot compute in float64"):
        portres.build("resnet20", "onnxruntime", dtype="float64")


# -- float16 and bfloat16: the network against the reference, and each op alone ------------------------------


def rounded(values, dtype: str) -> np.ndarray:
    """``values`` rounded to float16 or bfloat16 (to nearest, ties to even), returned in float64."""
    values = np.asarray(values, np.float32)
    if dtype == "float16":
        return values.astype(np.float16).astype(np.float64)
    bits = values.view(np.uint32).astype(np.uint64)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return np.where(np.isfinite(values), bits.view(np.float32), values).astype(np.float64)


# Each op alone, fed the reference's values and run with the weights both rounded to the dtype, against the
# float64 reference of that op on those same rounded numbers: what is left is the op's own rounding. Measured
# (resnet20, resnet50, resnet50d, resnetv2_18; folded and unfolded): float16 at most 6.1e-4 (MLX), 2.2e-4
# (torch, onnxruntime); bfloat16 1.8e-3 (torch), 4.8e-3 on MLX, whose shifted-GEMM convs sum nine bfloat16
# partial products and whose BN rounds its scale and shift to bfloat16. An op off by 1% is off by at least
# 8.6e-3 in float16 and 7.3e-3 in bfloat16 (where the factor 1.01 itself rounds to 1.0078): these fail it.
OP_TOLERANCE = {"float16": 2e-3, "bfloat16": 4e-3}
# a thin margin on both sides: MLX 4.8e-3 achieved, tinygrad on OpenCL (pocl) 4.1e-3 (an unfolded BN), 7.3e-3 broken
OP_TOLERANCE_OF = {("mlx", "bfloat16"): 6e-3, ("tinygrad", "bfloat16"): 6e-3}


def op_tolerance(backend: str, dtype: str) -> float:
    return OP_TOLERANCE_OF.get((backend, dtype), OP_TOLERANCE[dtype])


def op_errors(model, spec, params, reference: parity.Reference) -> dict[str, float]:
    """``{"<op name> (<kind>)": relative error}`` of each op of ``model`` alone on rounded exact inputs
    (``reference`` made with ``keep_all``)."""
    from portres.backends.numpy import Backend

    dtype = model.backend.dtype
    plan = make_plan(spec)
    weights = load_weights(params, plan)
    if count(model.plan, "batch_norm") < count(plan, "batch_norm"):
        plan, weights = fold_batch_norm(plan, weights)
    assert [op.name for op in plan.ops] == [op.name for op in model.plan.ops]
    weights = {name: rounded(value, dtype) for name, value in weights.items()}
    exact = Backend()
    errors = {}
    for op in plan.ops:
        args = [rounded(reference.values[value], dtype) for value in op.inputs]
        errors[f"{op.name} ({op.kind})"] = parity.relative_error(model.run_op(op, args), apply_op(exact, op, args,
                                                                                                  weights))
    return errors


def build_in(spec, backend: str, params, dtype: str, bn: str = "folded"):
    try:
        return build(spec, backend, params, bn, dtype=dtype)
    except ValueError as error:  # only a dtype this device cannot compute in may skip; it says so
        if "cannot compute in" not in str(error):
            raise
        pytest.skip(str(error))


@pytest.mark.parametrize("name, backend, dtype", [
    (n, b, d) for n in LOW_PRECISION_NETWORKS for b in FRAMEWORKS for d in ("float16", "bfloat16")])
def test_low_precision_parity(name, backend, dtype):
    """Network against the reference: measured at most 2.2e-3 in float16 (resnetv2_50, unfolded BN on MLX)
    and 1.6e-2 in bfloat16 (the same), under parity.TOLERANCE's 5e-3 and 2e-2. bfloat16 cannot see a 1%
    error in one primitive there (resnet50d with its avg-pool off by 1%: 1.1e-2 to 1.5e-2), so every op
    is also checked alone (op_errors), where it can."""
    spec, images, params, reference = CASES.get(name, keep_all=True)
    for bn in FOLDING:
        model = build_in(spec, backend, params, dtype, bn)
        result = parity.compare(model, images, reference)
        assert result.tolerance == {"float16": 5e-3, "bfloat16": 2e-2}[dtype]
        assert result.passed, (bn, explain(result, spec, images, params, model))
        errors = op_errors(model, spec, params, reference)
        worst = max(errors, key=errors.get)
        assert errors[worst] < op_tolerance(backend, dtype), f"{bn}: {worst} off by {errors[worst]:.3g}"


@pytest.mark.parametrize("name", ["resnet50", "resnetv2_18", "resnet50d", "resnet56"])
def test_bn_folding_rewrite_preserves_the_function(name):
    spec, images, params, reference = CASES.get(name)
    folded = portres.build(spec, "numpy", params, fold_batch_norm_into_conv=True)
    assert count(folded.plan, "batch_norm") == 0 < count(portres.make_plan(spec), "batch_norm")
    # v2's BNs that precede ReLUs follow no conv: they become per-channel affines
    assert (count(folded.plan, "channel_affine") > 0) == spec.is_preactivation
    assert parity.relative_error(folded(images), reference.logits) < 1e-6


def test_nan_never_passes():
    ref = np.ones((2, 3))
    assert parity.relative_error(np.full((2, 3), np.nan), ref) == float("inf")
    assert parity.relative_error(np.full((2, 3), np.inf), ref) == float("inf")
    ref = np.array([1.0, np.nan, np.inf, -np.inf])
    assert parity.relative_error(ref.copy(), ref) == 0.0  # non-finite values in the same places
    for wrong in ([1.0, 0.0, np.inf, -np.inf], [1.0, np.nan, np.nan, -np.inf], [1.0, np.nan, -np.inf, -np.inf],
                  [np.nan, np.nan, np.inf, -np.inf], [1.0, np.nan, np.inf, np.inf]):
        assert parity.relative_error(np.array(wrong), ref) == float("inf"), wrong
    result = parity.ParityResult("x", "cpu", "float32", 1e-4, logits_error=float("nan"), stage_errors={"stem": 0.0})
    assert not result.passed


NONFINITE_NETWORKS = ["resnet20", "resnet18", "resnetv2_18", "resnet50d", "resnext50_32x4d"]


def nonfinite_images(images: np.ndarray) -> np.ndarray:
    """One NaN pixel in image 0, one +inf in image 1, one -inf in image 2; image 3 stays finite."""
    images = images.copy()
    images[0, 0, 5, 7] = np.nan
    images[1, -1, 0, 0] = np.inf
    images[2, 0, -1, 3] = -np.inf
    return images


@pytest.mark.parametrize("name, backend", [(n, b) for n in NONFINITE_NETWORKS for b in FRAMEWORKS])
def test_nan_and_inf_propagate_exactly_as_in_the_reference(name, backend):
    spec = portres.get(name)
    images, params = parity.parity_case(spec, parity.parity_input_size(spec), batch=4, seed=1)
    images = nonfinite_images(images)
    reference = parity.Reference(spec, images, params)
    assert np.isnan(reference.logits[0]).all() and np.isfinite(reference.logits[3]).all()
    model = portres.build(spec, backend, params)
    result = parity.compare(model, images, reference)  # NaN/inf must sit exactly where the reference's do
    assert result.passed, result.to_dict()
    all_nan = np.full_like(images[:1], np.nan)
    assert np.isnan(model(all_nan)).all()  # tinygrad's relu once turned this into finite logits


# -- a deliberately broken primitive must fail the suite and be pointed at, in every dtype ----------------


def _break(monkeypatch, backend: str, primitive: str, broken):
    module = backends.load(backend)
    original = getattr(module.Backend, primitive)
    monkeypatch.setattr(module.Backend, primitive, lambda self, *args: broken(self, original, *args))


BREAKAGES = {
    # (primitive, network, BN folded or not, replacement, the op the report must blame)
    "leaky relu": ("relu", "resnet20", "folded", lambda self, f, x: self.add(f(self, x), x * 0.05), "relu (relu)"),
    "channels padded on one side": ("pad_channels", "resnet20", "folded", lambda self, f, x, b, a: f(self, x, 0, a + b),
                                    "layer2.0.shortcut.pad (pad_channels)"),
    "avg pool off by 1%": ("avg_pool", "resnet50d", "folded", lambda self, f, x, k, s: f(self, x, k, s) * 1.01,
                           "layer2.0.downsample.0 (avg_pool)"),
    "BN scale off by 1%": ("channel_affine", "resnetv2_18", "folded", lambda self, f, x, s, b: f(self, x, s * 1.01, b),
                           "layer1.0.bn1 (channel_affine)"),
    "unfolded BN off by 1%": ("batch_norm", "resnet20", "unfolded",
                              lambda self, f, x, w, b, m, v, eps: f(self, x, w, b, m, v, eps) * 1.01,
                              "bn1 (batch_norm)"),
}
DTYPES = ("float32", "float16", "bfloat16")


# tinygrad compiles each broken network anew: the resnet20 cases in float32 by default, all in the full tier
@pytest.mark.parametrize("breakage, backend, dtype", [
    (breakage, backend, dtype) for breakage in BREAKAGES for backend in FRAMEWORKS for dtype in DTYPES
    if backend != "tinygrad" or (BREAKAGES[breakage][1] == "resnet20" and dtype == "float32")
    or os.environ.get("PORTRES_FULL_ZOO") == "1"])
def test_a_broken_primitive_fails_and_is_located(monkeypatch, backend, breakage, dtype):
    """float32: the network is off by more than 1e-4 and the first op off on exact inputs is the broken one.
    float16: the network is off by more than 5e-3, and in float16 and bfloat16 the first op off on rounded
    exact inputs (op_errors) is the broken one."""
    primitive, network, bn, replacement, blamed = BREAKAGES[breakage]
    spec, images, params, reference = CASES.get(network, keep_all=True)
    _break(monkeypatch, backend, primitive, replacement)
    model = build_in(spec, backend, params, dtype, bn)
    result = parity.compare(model, images, reference)
    if dtype != "bfloat16":  # bfloat16's own error hides a 1% one in the network (see test_low_precision_parity)
        assert not result.passed, result.to_dict()
    if dtype == "float32":
        where = parity.locate_divergence(model, reference)
    else:
        errors = op_errors(model, spec, params, reference)
        where = next((op for op, error in errors.items() if error >= op_tolerance(backend, dtype)), None)
    assert where is not None and where.startswith(blamed), where


# -- property-based: random valid specs agree everywhere; invalid ones never get built -----


@st.composite
def small_specs(draw):
    block = draw(st.sampled_from(BLOCK_KINDS))
    bottleneck = block.endswith("bottleneck")
    stages = tuple(StageSpec(blocks=draw(st.integers(1, 2)), width=draw(st.sampled_from([4, 8, 12])),
                             stride=draw(st.sampled_from([1, 2])))
                   for _ in range(draw(st.integers(1, 3))))
    stem = StemSpec(kind=draw(st.sampled_from(STEM_KINDS)), width=draw(st.sampled_from([4, 8, 16])),
                    deep_width=draw(st.sampled_from([4, 8])), max_pool=draw(st.booleans()))
    residual = draw(st.booleans())
    try:
        spec = ResNetSpec(
            name="drawn", block=block, stages=stages, stem=stem, groups=draw(st.sampled_from([1, 2, 4])),
            width_per_group=draw(st.sampled_from([None, 16, 32])) if bottleneck else None,
            width_factor=draw(st.sampled_from([1, 2])), shortcut=draw(st.sampled_from(SHORTCUT_KINDS)),
            bottleneck_stride_at=draw(st.sampled_from(BOTTLENECK_STRIDE_POSITIONS)), residual=residual,
            zero_init_last_bn=residual and draw(st.booleans()), bn_eps=draw(st.sampled_from([1e-5, 1e-3])),
            num_classes=draw(st.integers(1, 7)), in_channels=draw(st.integers(1, 4)))
    except SpecError:
        assume(False)
    stride = portres.make_plan(spec).total_stride
    return spec, draw(st.integers(stride, max(stride * 2 + 3, 9)))


# tinygrad compiles every random network (~10 s each on 2 cores): 5 by default, 20 in the full tier
EXAMPLES = {"tinygrad": 20 if os.environ.get("PORTRES_FULL_ZOO") == "1" else 5, "mlx": 100, "torch": 100}


@pytest.mark.slow
@pytest.mark.parametrize("backend", FRAMEWORKS)
def test_random_valid_specs_agree_with_the_reference(backend):
    @settings(max_examples=EXAMPLES.get(backend, 10), deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=small_specs())
    def check(case):
        spec, size = case
        (result,) = parity.check(spec, [backend], input_size=size, batch=2, locate=False)
        assert result.passed, f"{spec.to_json(None)} at {size}: {result.to_dict()}"

    check()


INVALID_EDITS = [
    ("stages", lambda d: d["stages"][0].update(blocks=0)),
    ("stages", lambda d: d["stages"][-1].update(width=-8)),
    ("stages", lambda d: d["stages"][0].update(stride=0)),
    ("block", lambda d: d.update(block="dense")),
    ("shortcut", lambda d: d.update(shortcut="E")),
    ("groups", lambda d: d.update(groups=7, width_per_group=None)),
    ("bn_eps", lambda d: d.update(bn_eps=-1e-5)),
    ("width_factor", lambda d: d.update(width_factor=0)),
    ("num_classes", lambda d: d.update(num_classes=-1)),  # 0 is a headless network
    ("stem", lambda d: d["stem"].update(kind="huge")),
    ("residual", lambda d: d.update(residual=False, zero_init_last_bn=True)),
    ("unknown key", lambda d: d.update(dilation=2)),
]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=small_specs(), edit=st.sampled_from(INVALID_EDITS))
def test_random_invalid_specs_are_rejected_before_any_backend(case, edit):
    spec, _ = case
    data = spec.to_dict()
    what, change = edit
    if what == "groups":
        assume(all(spec.inner_width(s) % 7 for s in spec.stages))
    change(data)
    with pytest.raises(SpecError):
        ResNetSpec.from_dict(data)


@pytest.mark.parametrize("backend", [name for name in FLOAT64_FRAMEWORKS if name != "numpy"])
def test_the_parity_command_holds_float64_to_float64(backend):
    """`portres parity --dtype float64` once built the BN-folded model, whose folded weights are rounded to
    float32, and failed every backend at 4e-8 against its 1e-10 tolerance."""
    result, = parity.check("resnet20", [backend], input_size=8, batch=1, dtype="float64", locate=False)
    assert result.tolerance == 1e-10
    assert result.passed, result
