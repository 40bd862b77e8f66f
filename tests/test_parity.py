"""The shared parity suite: every zoo entry x every available backend vs the float64 reference.

Inputs and weights are random (BN affine terms and running statistics included); the
check is relative L2 error of the logits and of every stage output.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import portres
from portres import backends, parity, zoo
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

FRAMEWORKS = [name for name in backends.available() if name != "numpy"]
LOW_PRECISION_NETWORKS = ["resnet18", "resnet50", "resnext50_32x4d", "resnetv2_50", "resnet50d", "resnet20"]


class Cases:
    """One random case and its reference per network, shared by that network's backends."""

    def __init__(self):
        self.name, self.value = None, None

    def get(self, name: str):
        if name != self.name:  # tests are ordered network-major, so one entry suffices
            spec = portres.get(name)
            images, params = parity.parity_case(spec, parity.default_input_size(spec), batch=2, seed=0)
            self.name, self.value = name, (spec, images, params, parity.Reference(spec, images, params))
        return self.value


CASES = Cases()


def explain(result: parity.ParityResult, spec, images, params, model) -> str:
    reference = parity.Reference(spec, images, params, keep_all=True)
    where = parity.locate_divergence(model, reference) or "no single op (accumulated error)"
    return (f"{result.backend} {result.dtype}: logits {result.logits_error:.3g}, stages {result.stage_errors}; "
            f"first divergence: {where}")


@pytest.mark.parametrize("name, backend", [(n, b) for n in zoo.names() for b in FRAMEWORKS])
def test_float32_parity_for_every_zoo_entry(name, backend):
    spec, images, params, reference = CASES.get(name)
    model = portres.build(spec, backend, params, dtype="float32")
    result = parity.compare(model, images, reference)
    assert result.passed, explain(result, spec, images, params, model)
    assert set(result.stage_errors) == {"stem"} | {f"layer{i + 1}" for i in range(len(spec.stages))}


@pytest.mark.parametrize("name, backend, dtype", [
    (n, b, d) for n in LOW_PRECISION_NETWORKS for b in FRAMEWORKS for d in ("float16", "bfloat16")])
def test_low_precision_parity(name, backend, dtype):
    spec, images, params, reference = CASES.get(name)
    try:
        model = portres.build(spec, backend, params, dtype=dtype)
    except ValueError as error:  # only a dtype this device cannot compute in may skip; it says so
        if "cannot compute in" not in str(error):
            raise
        pytest.skip(str(error))
    result = parity.compare(model, images, reference)
    assert result.tolerance == 2e-2
    assert result.passed, explain(result, spec, images, params, model)


@pytest.mark.parametrize("name", ["resnet50", "resnetv2_18", "resnet50d", "resnet56"])
def test_bn_folding_rewrite_preserves_the_function(name):
    spec, images, params, reference = CASES.get(name)
    folded = portres.build(spec, "numpy", params, fold_batch_norm_into_conv=True)
    count = lambda plan, kind: sum(op.kind == kind for op in plan.ops)  # noqa: E731
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
    images, params = parity.parity_case(spec, parity.default_input_size(spec), batch=4, seed=1)
    images = nonfinite_images(images)
    reference = parity.Reference(spec, images, params)
    assert np.isnan(reference.logits[0]).all() and np.isfinite(reference.logits[3]).all()
    model = portres.build(spec, backend, params)
    result = parity.compare(model, images, reference)  # NaN/inf must sit exactly where the reference's do
    assert result.passed, result.to_dict()
    all_nan = np.full_like(images[:1], np.nan)
    assert np.isnan(model(all_nan)).all()  # tinygrad's relu once turned this into finite logits


# -- a deliberately broken primitive must fail the suite and be pointed at -----------------


def _break(monkeypatch, backend: str, primitive: str, broken):
    module = backends.load(backend)
    original = getattr(module.Backend, primitive)
    monkeypatch.setattr(module.Backend, primitive, lambda self, *args: broken(self, original, *args))


BREAKAGES = {
    # (primitive, network, replacement, the op the report must blame)
    "leaky relu": ("relu", "resnet20", lambda self, f, x: self.add(f(self, x), x * 0.05), "relu (relu)"),
    "channels padded on one side": ("pad_channels", "resnet20", lambda self, f, x, b, a: f(self, x, 0, a + b),
                                    "layer2.0.shortcut.pad (pad_channels)"),
    "avg pool off by 1%": ("avg_pool", "resnet50d", lambda self, f, x, k, s: f(self, x, k, s) * 1.01,
                           "layer2.0.downsample.0 (avg_pool)"),
    "BN scale off by 1%": ("channel_affine", "resnetv2_18", lambda self, f, x, s, b: f(self, x, s * 1.01, b),
                           "layer1.0.bn1 (channel_affine)"),
}


# tinygrad compiles each broken network anew: the resnet20 cases by default, all in the full tier
@pytest.mark.parametrize("breakage, backend", [
    (breakage, backend) for breakage in BREAKAGES for backend in FRAMEWORKS
    if backend != "tinygrad" or BREAKAGES[breakage][1] == "resnet20" or os.environ.get("PORTRES_FULL_ZOO") == "1"])
def test_a_broken_primitive_fails_and_is_located(monkeypatch, backend, breakage):
    primitive, network, replacement, blamed = BREAKAGES[breakage]
    _break(monkeypatch, backend, primitive, replacement)
    (result,) = parity.check(network, [backend], batch=2)
    assert not result.passed
    assert result.divergence is not None and result.divergence.startswith(blamed), result.divergence


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
    ("num_classes", lambda d: d.update(num_classes=0)),
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
