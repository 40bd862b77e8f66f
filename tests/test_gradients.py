"""The gradient parity suite: every framework's autodiff against the float64 reference's
hand-written backward - loss, every parameter's gradient and the updated BN statistics.

Every zoo entry is compared in float64 (chaotic deep networks included; see
portres/training/parity.py for why float32 cannot be held to 1e-3 there), and random small
networks in float32 at the issue's thresholds on cases whose ReLU/max-pool gates sit clear of
their kinks. tinygrad compiles each network's backward for minutes on 2 cores, so by default it
runs on small networks covering every block, stem and shortcut kind; PORTRES_FULL_ZOO=1 runs it
over the whole zoo too.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import portres
from portres import backends, zoo
from portres.parity import default_input_size
from portres.spec import ResNetSpec, StageSpec, StemSpec
from portres.training import parity
from portres.training.grads import loss_and_grads

FRAMEWORKS = [name for name in backends.available(training=True) if name != "numpy"]
FULL_ZOO = os.environ.get("PORTRES_FULL_ZOO") == "1"
ZOO_FOR = {"tinygrad": zoo.names() if FULL_ZOO else ["resnet20"]}


class References:
    """The float64 reference gradients per (network, dtype-independent case), shared by the backends."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, spec, size):
        if self.key != (spec, size):
            images, labels, params = parity.gradient_case(spec, size, batch=4, seed=0)
            reference = loss_and_grads(spec, "numpy", params, images, labels, dtype="float64")
            self.key, self.value = (spec, size), (images, labels, params, reference)
        return self.value


REFERENCES = References()


def compare(spec, backend, size, dtype="float64", case=None):
    images, labels, params, reference = case or REFERENCES.get(spec, size)
    computed = loss_and_grads(spec, backend, params, images, labels, dtype=dtype)
    return parity.compare_grads(parity.GradParityResult(backend, "-", dtype), reference, computed,
                                portres.make_plan(spec))


@pytest.mark.parametrize("name, backend", [(n, b) for n in zoo.names() for b in FRAMEWORKS
                                           if n in ZOO_FOR.get(b, zoo.names())])
def test_float64_gradient_parity_for_every_zoo_entry(name, backend):
    spec = portres.get(name)
    result = compare(spec, backend, default_input_size(spec))
    assert result.passed, result.to_dict() | {"parameter_errors": None, "divergence": result.divergence}


# small networks that cover every block kind, stem, shortcut policy and grouped conv
COVERING = {
    "bottleneck_B_grouped": ResNetSpec(name="bottleneck_B_grouped", block="bottleneck", groups=2, shortcut="B",
                                       stem=StemSpec(kind="imagenet", width=8),
                                       stages=(StageSpec(1, 4, 1), StageSpec(1, 8, 2)), num_classes=5),
    "v1_stride_on_1x1_C": ResNetSpec(name="v1_stride_on_1x1_C", block="bottleneck", bottleneck_stride_at="1x1",
                                     shortcut="C", stem=StemSpec(kind="cifar", width=8, max_pool=False),
                                     stages=(StageSpec(1, 4, 1), StageSpec(1, 4, 2)), num_classes=4),
    "preact_basic_avg_down_deep": ResNetSpec(name="preact_basic_avg_down_deep", block="preact_basic",
                                             shortcut="avg_down", stem=StemSpec(kind="deep", width=8, deep_width=4),
                                             stages=(StageSpec(1, 8, 1), StageSpec(1, 12, 2)), num_classes=3),
    "preact_bottleneck_B": ResNetSpec(name="preact_bottleneck_B", block="preact_bottleneck", shortcut="B",
                                      stem=StemSpec(kind="imagenet", width=8),
                                      stages=(StageSpec(1, 4, 1), StageSpec(1, 4, 2)), num_classes=3),
    "basic_A": ResNetSpec(name="basic_A", block="basic", shortcut="A", width_factor=2,
                          stem=StemSpec(kind="cifar", width=4, max_pool=False),
                          stages=(StageSpec(1, 4, 1), StageSpec(1, 8, 2)), num_classes=3),
    "plain": ResNetSpec(name="plain", block="basic", residual=False,
                        stem=StemSpec(kind="cifar", width=4, max_pool=True),
                        stages=(StageSpec(2, 4, 1), StageSpec(1, 8, 2)), num_classes=3),
}


# tinygrad compiles float32 and float64 kernels separately (about a minute per network here), so it
# checks these in float64 and float32 on the random small networks below
DTYPES_FOR = {"tinygrad": ("float64",)}


@pytest.mark.parametrize("backend", FRAMEWORKS)
@pytest.mark.parametrize("name", list(COVERING))
def test_gradient_parity_of_every_layer_kind(name, backend):
    spec = COVERING[name]
    case = parity.gate_safe_case(spec, 16, batch=4)  # float32 gates clear of their kinks
    reference = loss_and_grads(spec, "numpy", case[2], case[0], case[1], dtype="float64")
    for dtype in DTYPES_FOR.get(backend, ("float32", "float64")):
        result = compare(spec, backend, 16, dtype, case=(*case, reference))
        assert result.passed, (dtype, result.to_dict())
        assert result.tolerance == parity.TOLERANCES[dtype]


@st.composite
def small_specs(draw):
    from portres.spec import BLOCK_KINDS, SHORTCUT_KINDS, STEM_KINDS

    block = draw(st.sampled_from(BLOCK_KINDS))
    stages = tuple(StageSpec(blocks=1, width=draw(st.sampled_from([4, 8])), stride=draw(st.sampled_from([1, 2])))
                   for _ in range(draw(st.integers(1, 2))))
    stem = StemSpec(kind=draw(st.sampled_from(STEM_KINDS)), width=8, deep_width=4, max_pool=draw(st.booleans()))
    residual = draw(st.booleans())
    try:
        return ResNetSpec(name="drawn", block=block, stages=stages, stem=stem, groups=draw(st.sampled_from([1, 2])),
                          shortcut=draw(st.sampled_from(SHORTCUT_KINDS)), residual=residual,
                          num_classes=draw(st.integers(2, 5)), in_channels=draw(st.integers(1, 3)))
    except portres.SpecError:
        return None


EXAMPLES = {"tinygrad": 2, "mlx": 25, "torch": 25}


@pytest.mark.slow
@pytest.mark.parametrize("backend", FRAMEWORKS)
def test_random_small_networks_agree_in_float32(backend):
    @settings(max_examples=EXAMPLES.get(backend, 5), deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(spec=small_specs())
    def check(spec):
        if spec is None:
            return
        size = max(16, portres.make_plan(spec).total_stride)
        case = parity.gate_safe_case(spec, size, batch=4)
        reference = loss_and_grads(spec, "numpy", case[2], case[0], case[1], dtype="float64")
        result = compare(spec, backend, size, "float32", case=(*case, reference))
        assert result.passed, (spec.to_json(None), result.to_dict())

    check()


# -- a deliberately broken backward must fail and be pointed at -------------------------------


def _batch_norm_without_the_mean_gradient(backend: str):
    """Train-mode BN whose forward is right but whose gradient skips the batch mean's dependence on x."""
    if backend == "mlx":
        import mlx.core as mx

        axes, stop = (0, 1, 2), mx.stop_gradient
        mean_of = lambda x: mx.mean(x, axis=axes)  # noqa: E731
        shape = lambda v, x: v  # noqa: E731
    else:
        axes, stop = (0, 2, 3), (lambda t: t.detach())
        mean_of = lambda x: x.mean(axis=axes) if backend == "tinygrad" else x.mean(dim=axes)  # noqa: E731
        shape = lambda v, x: v.reshape(1, -1, 1, 1)  # noqa: E731

    def broken(self, x, weight, bias, eps):
        if isinstance(x, tuple):  # MLX's split-batch training view: one slice of the batch per CPU stream
            import mlx.core as mx

            y, mean, var = broken(self, mx.concatenate(list(x), axis=0), weight, bias, eps)
            return type(x)(mx.split(y, np.cumsum([part.shape[0] for part in x])[:-1].tolist(), axis=0)), mean, var
        count = x.numel() / x.shape[1] if backend == "torch" else x.size // x.shape[-1] if backend == "mlx" \
            else x.numel() // x.shape[1]
        mean = mean_of(x)
        centered = x - shape(stop(mean), x)
        var = mean_of(centered * centered)
        scale = weight * (var + eps) ** -0.5
        return centered * shape(scale, x) + shape(bias, x), mean, var * (count / (count - 1))

    return broken


@pytest.mark.parametrize("backend", FRAMEWORKS)
def test_a_broken_backward_fails_and_names_the_first_parameter_from_the_output(monkeypatch, backend):
    module = backends.load(backend)
    monkeypatch.setattr(module.Backend, "batch_norm_train", _batch_norm_without_the_mean_gradient(backend))
    spec = COVERING["basic_A"]
    (result,) = parity.check_grads(spec, [backend], input_size=16, dtype="float64")
    assert not result.passed
    # fc and the last BN's own scale and shift are still right; the conv feeding that BN is the first to be off
    assert result.divergence.startswith("layer2.0.conv2.weight"), result.divergence
    assert result.loss_error < 1e-12  # the forward pass is untouched


def test_parity_grads_command_names_the_parameter(monkeypatch):
    from click.testing import CliRunner

    from portres.cli import main

    if "mlx" not in FRAMEWORKS:
        pytest.skip("mlx not installed")
    ok = CliRunner().invoke(main, ["parity", "resnet20", "--grads", "--backends", "mlx"])
    assert ok.exit_code == 0 and "float64" in ok.output and "pass" in ok.output, ok.output
    module = backends.load("mlx")
    monkeypatch.setattr(module.Backend, "batch_norm_train", _batch_norm_without_the_mean_gradient("mlx"))
    failed = CliRunner().invoke(main, ["parity", "resnet20", "--grads", "--backends", "mlx"])
    assert failed.exit_code == 1 and "diverges first at layer3.2.conv2.weight" in failed.output, failed.output
    usage = CliRunner().invoke(main, ["parity", "resnet20", "--grads", "--batch", "1"])
    assert usage.exit_code == 2 and "--batch 2 or more" in usage.output


def test_gate_margin_finds_a_relu_input_at_its_kink():
    spec = COVERING["basic_A"]
    images, labels, params = parity.gradient_case(spec, 16, batch=2)
    assert parity.gate_margin(spec, params, images) > 0
    params = dict(params)
    params["bn1.bias"] = np.zeros_like(params["bn1.bias"])
    params["bn1.weight"] = np.zeros_like(params["bn1.weight"])  # bn1 outputs exact zeros into the stem ReLU
    assert parity.gate_margin(spec, params, images) == 0.0


@pytest.mark.skipif("mlx" not in FRAMEWORKS, reason="mlx not installed")
@pytest.mark.parametrize("slices", [1, 2], ids=["whole batch", "split over two streams"])
def test_mlx_batch_norm_gradient_equals_autodiff_of_its_formula_statistics_included(slices):
    import mlx.core as mx

    from portres.backends.mlx import _batch_norm_train

    rng = np.random.default_rng(0)
    x, weight, bias = (mx.array(a, dtype=mx.float64) for a in (rng.standard_normal((3, 4, 5, 6)) * 2 + 1,
                                                                 rng.uniform(0.5, 1.5, 6), rng.standard_normal(6)))
    probe = [mx.array(rng.standard_normal(shape), dtype=mx.float64) for shape in ((3, 4, 5, 6), (6,), (6,))]

    def formula(x, weight, bias):
        count = x.shape[0] * x.shape[1] * x.shape[2]
        mean = mx.mean(x, axis=(0, 1, 2))
        var = mx.mean((x - mean) ** 2, axis=(0, 1, 2))
        return (x - mean) * weight * mx.rsqrt(var + 1e-5) + bias, mean, var * count / (count - 1)

    def objective(fn):
        return lambda *args: sum((out * p).sum() for out, p in zip(fn(*args), probe))

    streams = tuple(mx.new_stream(mx.cpu) for _ in range(slices))
    split = _batch_norm_train(1e-5, streams)  # on slices of the batch (1 and 2 images), one per stream

    def ours_as_formula(x, weight, bias):
        mean, var, ys = split(weight, bias, mx.split(x, [1], axis=0) if slices == 2 else [x])
        return mx.concatenate(ys, axis=0), mean, var

    ours = mx.grad(objective(ours_as_formula), argnums=(0, 1, 2))(x, weight, bias)
    autodiff = mx.grad(objective(formula), argnums=(0, 1, 2))(x, weight, bias)
    for a, b in zip(ours, autodiff):
        assert np.allclose(np.array(a), np.array(b), rtol=1e-10, atol=1e-12)


@pytest.mark.skipif("mlx" not in FRAMEWORKS, reason="mlx not installed")
@pytest.mark.parametrize(("name", "streams"), [("basic_A", 2), ("bottleneck_B_grouped", 3)])
def test_mlx_split_batch_training_view_computes_the_whole_batchs_gradients(name, streams):
    """MLX on several CPU streams splits a training batch across them (5 images over 3 streams: slices
    of 1, 2 and 2); loss, gradients and running statistics are the unsplit batch's (float64)."""
    from portres.backends import mlx as mlx_backend
    from portres.training.grads import gradient_function, soft_targets, trainable_names

    spec = COVERING[name]
    plan = portres.make_plan(spec)
    images, labels, params = parity.gradient_case(spec, 16, batch=5)
    targets = soft_targets(labels, spec.num_classes, 0.0, np.float64)
    results = []
    for cpu_streams in (1, streams):
        lowering = mlx_backend.Backend(device="cpu", dtype="float64", cpu_streams=cpu_streams)
        assert type(lowering.for_training()).__name__ == ("_BatchSplit" if cpu_streams > 1 else "Backend")
        arrays = lowering.load_params(plan, params)
        trainable = {name: arrays[name] for name in trainable_names(plan)}
        buffers = {name: value for name, value in arrays.items() if name not in trainable}
        loss, logits, stats, grads = gradient_function(plan, lowering)(
            trainable, buffers, lowering.from_numpy(images), lowering.from_numpy(targets))
        results.append({"loss": lowering.to_numpy(loss), "logits": lowering.to_numpy(logits),
                        **{name: lowering.to_numpy(value) for name, value in {**stats, **grads}.items()}})
    whole, split = results
    assert whole.keys() == split.keys()
    for name in whole:
        np.testing.assert_allclose(split[name], whole[name], rtol=1e-10, atol=1e-13, err_msg=name)


SPACE_TO_DEPTH_CASES = [  # (batch, channels, side, out channels, kernel, stride, padding): odd sides, 7x7/2, 5x5/3
    (2, 3, 8, 4, 3, 2, 1), (2, 3, 7, 4, 3, 2, 1), (1, 2, 9, 3, 7, 2, 3), (1, 2, 10, 3, 5, 3, 2), (1, 2, 5, 2, 3, 2, 0)]


@pytest.mark.parametrize("backend", [name for name in ("mlx", "tinygrad") if name in FRAMEWORKS])
@pytest.mark.parametrize("case", SPACE_TO_DEPTH_CASES, ids=lambda case: "n{}c{}s{}o{}k{}st{}p{}".format(*case))
def test_strided_conv_over_the_space_to_depth_input_equals_the_direct_one(backend, case):
    """Training lowers strided convs as stride-1 convs over the input's space-to-depth: values and both
    gradients equal the framework's direct strided conv (float32)."""
    batch, channels, side, out_channels, kernel, stride, padding = case
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, channels, side, side)).astype(np.float32)
    weight = rng.standard_normal((out_channels, channels, kernel, kernel)).astype(np.float32)
    lowering = backends.load(backend).Backend(dtype="float32").for_gradients()
    if backend == "mlx":
        import mlx.core as mx

        xs, ws = mx.array(x.transpose(0, 2, 3, 1)), mx.array(weight.transpose(0, 2, 3, 1))
        rewritten = lambda x, w: lowering._space_to_depth_conv(x, w, None, stride, padding)  # noqa: E731
        direct = lambda x, w: mx.conv2d(x, w, stride=stride, padding=padding)  # noqa: E731
        cotangent = mx.array(rng.standard_normal(direct(xs, ws).shape).astype(np.float32))
        results = [(f(xs, ws), *mx.vjp(f, [xs, ws], [cotangent])[1]) for f in (rewritten, direct)]
    else:
        from tinygrad import Tensor

        xs, ws = Tensor(x), Tensor(weight)
        outputs = [lowering._space_to_depth_conv(xs, ws, None, stride, padding),
                   xs.conv2d(ws, stride=stride, padding=padding)]
        cotangent = Tensor(rng.standard_normal(outputs[1].shape).astype(np.float32))
        results = [(y, *(y * cotangent).sum().gradient(xs, ws)) for y in outputs]
    for got, want in zip(*results):
        assert got.shape == want.shape
        np.testing.assert_allclose(np.array(got) if backend == "mlx" else got.numpy(),
                                   np.array(want) if backend == "mlx" else want.numpy(), rtol=1e-4, atol=1e-4)
