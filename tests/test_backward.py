"""The NumPy reference's hand-written backward, primitive by primitive, against central finite
differences in float64; and the mechanics and errors of ``portres.loss_and_grads``."""

from __future__ import annotations

import numpy as np
import pytest

import portres
from portres.backends.numpy import Backend
from portres.spec import ResNetSpec, StageSpec, StemSpec

REFERENCE = Backend()
R = REFERENCE
STEP = 1e-6


def directional_check(forward, inputs: list, backward_grads: list, seed: int = 0) -> float:
    """Relative error of <grad, v> against (L(x + hv) - L(x - hv)) / 2h for a random direction v,
    where L = sum(forward(*inputs) * r) and ``backward_grads`` are the claimed dL/d(inputs)."""
    rng = np.random.default_rng(seed)
    directions = [rng.standard_normal(x.shape) for x in inputs]
    shifted = lambda sign: forward(*[x + sign * STEP * v for x, v in zip(inputs, directions)])  # noqa: E731
    numeric = (shifted(1) - shifted(-1)) / (2 * STEP)
    analytic = sum(float(np.sum(g * v)) for g, v in zip(backward_grads, directions))
    return abs(numeric - analytic) / max(abs(numeric), 1e-12)


def weighted(primitive, out_weights):
    return lambda *args: float(np.sum(primitive(*args) * out_weights))


RNG = np.random.default_rng(42)


@pytest.mark.parametrize("stride, padding, groups, kernel", [
    (1, 1, 1, 3), (2, 1, 1, 3), (1, 0, 1, 1), (2, 0, 1, 1), (2, 3, 1, 7), (1, 1, 2, 3), (2, 1, 4, 3)])
def test_conv2d_backward(stride, padding, groups, kernel):
    x = RNG.standard_normal((2, 8, 9, 9))
    w = RNG.standard_normal((12, 8 // groups, kernel, kernel))
    out = REFERENCE.conv2d(x, w, None, stride, padding, groups)
    r = RNG.standard_normal(out.shape)
    grad_x, grad_w = REFERENCE.conv2d_backward(r, x, w, stride, padding, groups)
    f = weighted(lambda x, w: REFERENCE.conv2d(x, w, None, stride, padding, groups), r)
    assert grad_x.shape == x.shape and grad_w.shape == w.shape
    assert directional_check(f, [x, w], [grad_x, grad_w]) < 1e-7


def test_batch_norm_train_backward():
    x = RNG.standard_normal((3, 5, 4, 4)) * 2 + 1
    weight, bias = RNG.uniform(0.5, 1.5, 5), RNG.standard_normal(5)
    y, _, _ = REFERENCE.batch_norm_train(x, weight, bias, 1e-5)
    r = RNG.standard_normal(y.shape)
    grad_x, grad_weight, grad_bias = REFERENCE.batch_norm_train_backward(r, x, weight, 1e-5)
    f = weighted(lambda x, w, b: REFERENCE.batch_norm_train(x, w, b, 1e-5)[0], r)
    assert directional_check(f, [x, weight, bias], [grad_x, grad_weight, grad_bias]) < 1e-7


def test_batch_norm_train_returns_batch_mean_and_unbiased_variance():
    x = RNG.standard_normal((3, 5, 4, 4))
    y, mean, var = REFERENCE.batch_norm_train(x, np.ones(5), np.zeros(5), 1e-5)
    assert np.allclose(mean, x.mean((0, 2, 3))) and np.allclose(var, x.var((0, 2, 3), ddof=1))
    assert np.allclose(y.mean((0, 2, 3)), 0) and np.allclose(y.var((0, 2, 3)), 1, atol=1e-4)  # biased, as normalised


@pytest.mark.parametrize("stride, padding, groups", [(1, 1, 1), (2, 0, 2)])
def test_conv2d_bias_backward(stride, padding, groups):
    """The conv bias gradient (Keras' convs have one) is summed by the plan's backward walker, not by
    conv2d_backward: checked through portres.training.backprop.backward_op, on every input at once."""
    from portres.plan import Conv2d, Op
    from portres.training.backprop import backward_op

    x, w, b = RNG.standard_normal((2, 4, 7, 7)), RNG.standard_normal((6, 4 // groups, 3, 3)), RNG.standard_normal(6)
    op = Op("conv", Conv2d(4, 6, 3, stride, padding, groups, bias=True), ("x",), "y")
    out = REFERENCE.conv2d(x, w, b, stride, padding, groups)
    r = RNG.standard_normal(out.shape)
    (grad_x,), grads = backward_op(REFERENCE, op, [x], r, {"conv.weight": w, "conv.bias": b})
    assert sorted(grads) == ["conv.bias", "conv.weight"] and grads["conv.bias"].shape == b.shape
    f = weighted(lambda x, w, b: REFERENCE.conv2d(x, w, b, stride, padding, groups), r)
    assert directional_check(f, [x, w, b], [grad_x, grads["conv.weight"], grads["conv.bias"]]) < 1e-7
    # the bias alone, element by element (central differences)
    step, numeric = 1e-6, np.zeros_like(b)
    for i in range(b.size):
        bump = np.zeros_like(b)
        bump[i] = step
        numeric[i] = (f(x, w, b + bump) - f(x, w, b - bump)) / (2 * step)
    np.testing.assert_allclose(grads["conv.bias"], numeric, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("name, forward, backward", [
    ("relu", lambda x: R.relu(x), lambda g, x: [R.relu_backward(g, x)]),
    ("zero_pad 1", lambda x: R.zero_pad(x, 1), lambda g, x: [R.zero_pad_backward(g, 1)]),
    ("zero_pad 3", lambda x: R.zero_pad(x, 3), lambda g, x: [R.zero_pad_backward(g, 3)]),
    ("max_pool 3/2 pad 1", lambda x: R.max_pool(x, 3, 2, 1), lambda g, x: [R.max_pool_backward(g, x, 3, 2, 1)]),
    ("avg_pool 2/2 ceil", lambda x: R.avg_pool(x, 2, 2), lambda g, x: [R.avg_pool_backward(g, x, 2, 2)]),
    ("avg_pool 3/2 ceil", lambda x: R.avg_pool(x, 3, 2), lambda g, x: [R.avg_pool_backward(g, x, 3, 2)]),
    ("subsample 2", lambda x: R.subsample(x, 2), lambda g, x: [R.subsample_backward(g, x, 2)]),
    ("pad_channels", lambda x: R.pad_channels(x, 2, 3), lambda g, x: [R.pad_channels_backward(g, 2, 3)]),
    ("global_avg_pool", lambda x: R.global_avg_pool(x), lambda g, x: [R.global_avg_pool_backward(g, x)]),
])
def test_single_input_primitive_backward(name, forward, backward):
    x = RNG.standard_normal((2, 3, 7, 7))  # odd sides: partial ceil-mode windows, uneven subsampling
    r = RNG.standard_normal(forward(x).shape)
    assert directional_check(weighted(forward, r), [x], backward(r, x)) < 1e-7, name


def test_linear_backward():
    x, w, b = RNG.standard_normal((4, 6)), RNG.standard_normal((3, 6)), RNG.standard_normal(3)
    r = RNG.standard_normal((4, 3))
    grads = REFERENCE.linear_backward(r, x, w)
    assert directional_check(weighted(REFERENCE.linear, r), [x, w, b], list(grads)) < 1e-7


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_and_its_backward(smoothing):
    logits = RNG.standard_normal((5, 7)) * 3
    labels = RNG.integers(0, 7, 5)
    targets = np.full((5, 7), smoothing / 7)
    targets[np.arange(5), labels] += 1 - smoothing
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected = np.mean((1 - smoothing) * -log_softmax[np.arange(5), labels] + smoothing * -log_softmax.mean(1))
    assert REFERENCE.cross_entropy(logits, targets) == pytest.approx(expected, rel=1e-12)
    grad = REFERENCE.cross_entropy_backward(logits, targets)
    assert directional_check(lambda z: REFERENCE.cross_entropy(z, targets), [logits], [grad]) < 1e-7


TINY = ResNetSpec(name="tiny", block="bottleneck", shortcut="B", groups=2,
                  stem=StemSpec(kind="imagenet", width=8), stages=(StageSpec(1, 4, 1), StageSpec(2, 4, 2)),
                  num_classes=5)
TINY_PREACT = ResNetSpec(name="tiny_v2", block="preact_basic", shortcut="avg_down",
                         stem=StemSpec(kind="deep", width=8, deep_width=4),
                         stages=(StageSpec(1, 8, 1), StageSpec(1, 12, 2)), num_classes=4)
TINY_CIFAR = ResNetSpec(name="tiny_a", block="basic", shortcut="A",
                        stem=StemSpec(kind="cifar", width=4, max_pool=False),
                        stages=(StageSpec(1, 4, 1), StageSpec(1, 8, 2)), num_classes=3)


@pytest.mark.parametrize("spec", [TINY, TINY_PREACT, TINY_CIFAR], ids=lambda s: s.name)
def test_whole_network_gradients_against_finite_differences(spec):
    from portres.training.parity import gate_safe_case

    # every ReLU/max-pool input far enough from its kink that the finite-difference step cannot cross it
    images, labels, params = gate_safe_case(spec, 16, batch=3, min_margin=1e-4)
    loss, grads, _ = portres.loss_and_grads(spec, "numpy", params, images, labels)
    names = list(grads)
    base = {name: params[name].astype(np.float64) for name in params}

    # the loss as a function of float64 parameters, straight through the walker (load_weights rounds to float32)
    from portres.plan import make_plan
    from portres.training.grads import soft_targets
    from portres.walker import run_plan_train

    plan = make_plan(spec)
    targets = soft_targets(labels, spec.num_classes, 0.0, np.float64)

    def exact_loss(*trainable):
        arrays = {**base, **dict(zip(names, trainable))}
        values, _ = run_plan_train(plan, REFERENCE, arrays, images.astype(np.float64))
        return REFERENCE.cross_entropy(values[plan.output], targets)

    assert exact_loss(*[base[n] for n in names]) == pytest.approx(loss, rel=1e-12)
    assert directional_check(exact_loss, [base[n] for n in names], [grads[n] for n in names]) < 1e-6


# -- loss_and_grads: contract and errors ----------------------------------------------------------


def test_loss_and_grads_contract_on_the_reference():
    spec = portres.get("resnet20")
    params = portres.init_params(spec, seed=1, randomize_batch_norm=True)
    before = {k: v.copy() for k, v in params.items()}
    images = RNG.standard_normal((4, 3, 32, 32)).astype(np.float32)
    loss, grads, stats = portres.loss_and_grads("resnet20", "numpy", params, images, [0, 3, 9, 3])
    plan = portres.make_plan(spec)
    trainable = [n for n, (_, t) in plan.param_shapes().items() if t]
    buffers = [n for n, (_, t) in plan.param_shapes().items() if not t]
    assert list(grads) == trainable and sorted(stats) == sorted(buffers)
    assert all(grads[n].dtype == np.float64 and grads[n].shape == params[n].shape for n in trainable)
    assert isinstance(loss, float) and 0 < loss < 10
    assert all(np.array_equal(params[k], before[k]) for k in params)  # nothing mutated

    # bn1's running statistics follow PyTorch: (1 - m) * old + m * batch, unbiased variance
    conv1 = REFERENCE.conv2d(images.astype(np.float64), params["conv1.weight"].astype(np.float64), None, 1, 1, 1)
    batch_mean, batch_var = conv1.mean((0, 2, 3)), conv1.var((0, 2, 3), ddof=1)
    assert np.allclose(stats["bn1.running_mean"], 0.9 * params["bn1.running_mean"] + 0.1 * batch_mean, rtol=1e-6)
    assert np.allclose(stats["bn1.running_var"], 0.9 * params["bn1.running_var"] + 0.1 * batch_var, rtol=1e-6)
    _, _, stats_half = portres.loss_and_grads(spec, "numpy", params, images, [0, 3, 9, 3], bn_momentum=0.5)
    assert np.allclose(stats_half["bn1.running_mean"], 0.5 * params["bn1.running_mean"] + 0.5 * batch_mean, rtol=1e-6)


def test_label_smoothing_changes_the_loss_as_defined():
    images = RNG.standard_normal((2, 3, 16, 16)).astype(np.float32)
    params = portres.init_params(TINY_CIFAR)
    plain, _, _ = portres.loss_and_grads(TINY_CIFAR, "numpy", params, images, [0, 2])
    smooth, _, _ = portres.loss_and_grads(TINY_CIFAR, "numpy", params, images, [0, 2], label_smoothing=0.3)
    assert smooth != plain


@pytest.mark.parametrize("labels, kwargs, message", [
    ([0, 1, 2, 10], {}, r"labels must lie in \[0, 10\): label 10 at index 3"),
    ([0, -1, 2, 3], {}, r"label -1 at index 1"),
    ([0, 1, 2], {}, r"one label per image \(4\), got labels of shape \(3,\)"),
    ([0.5, 1, 2, 3], {}, "integer class indices"),
    ([0, 1, 2, 3], {"label_smoothing": 1.0}, r"label_smoothing=1.0 must be a number in \[0, 1\)"),
    ([0, 1, 2, 3], {"bn_momentum": -0.1}, r"bn_momentum=-0.1 must be a number in \[0, 1\]"),
    ([0, 1, 2, 3], {"dtype": "float16"}, "computes in float64 or float32, not 'float16'|training runs in float32"),
])
def test_bad_labels_and_arguments_are_clear_errors(labels, kwargs, message):
    images = RNG.standard_normal((4, 3, 32, 32)).astype(np.float32)
    with pytest.raises(ValueError, match=message):
        portres.loss_and_grads("resnet20", "numpy", portres.init_params("resnet20"), images, labels, **kwargs)


def test_a_single_image_is_refused_for_train_mode_batch_norm():
    with pytest.raises(ValueError, match="at least 2 images"):
        portres.loss_and_grads("resnet20", "numpy", portres.init_params("resnet20"),
                               np.zeros((1, 3, 32, 32), np.float32), [0])


def test_images_that_do_not_fit_the_spec_are_clear_errors():
    with pytest.raises(ValueError, match="expected 3 input channels"):
        portres.loss_and_grads("resnet20", "numpy", portres.init_params("resnet20"),
                               np.zeros((2, 1, 32, 32), np.float32), [0, 1])
