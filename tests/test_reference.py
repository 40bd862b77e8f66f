"""The float64 NumPy reference against direct, loop-based definitions; input checking."""

import numpy as np
import pytest

import portres
from portres.backends.numpy import Backend

reference = Backend()
rng = np.random.default_rng(0)


def direct_conv2d(x, w, b, stride, padding, groups):
    """Convolution straight from its definition: one output element at a time."""
    n, c, h, wd = x.shape
    o, cg, k, _ = w.shape
    xp = np.zeros((n, c, h + 2 * padding, wd + 2 * padding))
    xp[:, :, padding:padding + h, padding:padding + wd] = x
    ho, wo = (h + 2 * padding - k) // stride + 1, (wd + 2 * padding - k) // stride + 1
    out = np.zeros((n, o, ho, wo))
    per_group = o // groups
    for i in range(n):
        for oc in range(o):
            g = oc // per_group
            for y in range(ho):
                for xx in range(wo):
                    patch = xp[i, g * cg:(g + 1) * cg, y * stride:y * stride + k, xx * stride:xx * stride + k]
                    out[i, oc, y, xx] = np.sum(patch * w[oc]) + (b[oc] if b is not None else 0.0)
    return out


@pytest.mark.parametrize("c, o, k, stride, padding, groups, size", [
    (3, 4, 3, 1, 1, 1, 7), (4, 6, 3, 2, 1, 2, 8), (8, 8, 3, 2, 1, 8, 9), (6, 9, 1, 2, 0, 3, 7),
    (3, 5, 7, 2, 3, 1, 11), (4, 4, 5, 3, 2, 4, 10),
])
def test_conv2d_matches_direct_definition(c, o, k, stride, padding, groups, size):
    x = rng.standard_normal((2, c, size, size + 1))
    w = rng.standard_normal((o, c // groups, k, k))
    b = rng.standard_normal(o)
    got = reference.conv2d(x, w, b, stride, padding, groups)
    np.testing.assert_allclose(got, direct_conv2d(x, w, b, stride, padding, groups), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(reference.conv2d(x, w, None, stride, padding, groups),
                               direct_conv2d(x, w, None, stride, padding, groups), rtol=1e-12, atol=1e-12)


def test_batch_norm_matches_per_element_formula():
    x = rng.standard_normal((2, 3, 4, 5))
    weight, bias, mean, var = rng.standard_normal(3), rng.standard_normal(3), rng.standard_normal(3), rng.random(3) + .1
    got = reference.batch_norm(x, weight, bias, mean, var, 1e-3)
    for i in range(2):
        for c in range(3):
            for y in range(4):
                for z in range(5):
                    want = (x[i, c, y, z] - mean[c]) / np.sqrt(var[c] + 1e-3) * weight[c] + bias[c]
                    assert abs(got[i, c, y, z] - want) < 1e-12


def test_max_pool_matches_loops_with_negative_inputs_at_the_border():
    x = rng.standard_normal((1, 2, 7, 6)) - 3.0  # all negative: -inf padding must never win
    got = reference.max_pool(x, 3, 2, 1)
    assert got.shape == (1, 2, 4, 3)
    for c in range(2):
        for y in range(4):
            for z in range(3):
                rows = range(max(2 * y - 1, 0), min(2 * y + 2, 7))
                cols = range(max(2 * z - 1, 0), min(2 * z + 2, 6))
                assert got[0, c, y, z] == max(x[0, c, r, s] for r in rows for s in cols)


@pytest.mark.parametrize("h, w, k, s", [(7, 6, 2, 2), (8, 8, 2, 2), (5, 9, 3, 2), (1, 3, 2, 2)])
def test_avg_pool_is_ceil_mode_over_in_bounds_pixels(h, w, k, s):
    x = rng.standard_normal((2, 3, h, w))
    got = reference.avg_pool(x, k, s)
    out_h, out_w = -(-(h - k) // s) + 1 if h >= k else 1, -(-(w - k) // s) + 1 if w >= k else 1
    assert got.shape == (2, 3, out_h, out_w)
    for y in range(out_h):
        for z in range(out_w):
            window = x[:, :, y * s:min(y * s + k, h), z * s:min(z * s + k, w)]
            np.testing.assert_allclose(got[:, :, y, z], window.mean(axis=(2, 3)), rtol=1e-12)


def test_shortcut_a_primitives():
    x = rng.standard_normal((1, 2, 5, 5))
    sub = reference.subsample(x, 2)
    assert sub.shape == (1, 2, 3, 3) and sub[0, 1, 2, 1] == x[0, 1, 4, 2]
    padded = reference.pad_channels(x, 1, 2)
    assert padded.shape == (1, 5, 5, 5) and np.all(padded[:, [0, 3, 4]] == 0)
    np.testing.assert_array_equal(padded[:, 1:3], x)


def test_reference_is_float64_even_with_float32_inputs_and_weights():
    model = portres.build("resnet20", "numpy")
    assert model.params["conv1.weight"].dtype == np.float64
    values = model.values(np.ones((1, 3, 32, 32), np.float32), [model.plan.features[1][1], model.plan.output])
    assert all(v.dtype == np.float64 for v in values.values())


def test_whole_network_against_an_independent_loop_forward():
    """A tiny basic-block net computed layer by layer with the direct conv above."""
    spec = portres.ResNetSpec(name="tiny", block="basic", stem=portres.StemSpec(kind="cifar", width=4, max_pool=False),
                              stages=(portres.StageSpec(1, 4, 1), portres.StageSpec(1, 8, 2)), num_classes=3)
    p = portres.init_params(spec, seed=1, randomize_batch_norm=True)
    x = rng.standard_normal((2, 3, 6, 6))

    def bn(v, name):
        return reference.batch_norm(v, *(p[f"{name}.{s}"].astype(np.float64) for s in
                                         ("weight", "bias", "running_mean", "running_var")), 1e-5)

    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    conv = lambda v, name, s, pad: direct_conv2d(v, p[f"{name}.weight"].astype(np.float64), None, s, pad, 1)  # noqa
    h = relu(bn(conv(x, "conv1", 1, 1), "bn1"))
    h = relu(bn(conv(relu(bn(conv(h, "layer1.0.conv1", 1, 1), "layer1.0.bn1")), "layer1.0.conv2", 1, 1),
                "layer1.0.bn2") + h)
    branch = bn(conv(relu(bn(conv(h, "layer2.0.conv1", 2, 1), "layer2.0.bn1")), "layer2.0.conv2", 1, 1),
                "layer2.0.bn2")
    shortcut = bn(conv(h, "layer2.0.downsample.0", 2, 0), "layer2.0.downsample.1")
    h = relu(branch + shortcut).mean(axis=(2, 3))
    logits = h @ p["fc.weight"].T.astype(np.float64) + p["fc.bias"]
    np.testing.assert_allclose(portres.build(spec, "numpy", p)(x), logits, rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def resnet20():
    return portres.build("resnet20", "numpy")


@pytest.mark.parametrize("x, message", [
    (np.zeros((3, 32, 32)), r"expected a 4-D NCHW array \(batch, 3, height, width\), got shape \(3, 32, 32\)"),
    (np.zeros((1, 4, 32, 32)), r"expected 3 input channels at axis 1 \(NCHW\), got shape \(1, 4, 32, 32\)"),
    (np.zeros((1, 32, 32, 3)), r"NHWC\? use x.transpose\(0, 3, 1, 2\)"),
    (np.zeros((1, 3, 3, 32)), r"input 3x32 is too small for resnet20: .* at least 4 pixels"),
    (np.zeros((0, 3, 32, 32)), r"at least 1 image"),
    (np.array([[["a"]]]), r"input dtype <U1 is not numeric"),
])
def test_bad_input_is_a_value_error_stating_expected_and_got(resnet20, x, message):
    with pytest.raises(ValueError, match=message):
        resnet20(x)


def test_features_are_the_stem_and_each_stage(resnet20):
    feats = resnet20.features(rng.standard_normal((2, 3, 32, 32)))
    assert {k: v.shape for k, v in feats.items()} == {
        "stem": (2, 16, 32, 32), "layer1": (2, 16, 32, 32), "layer2": (2, 32, 16, 16), "layer3": (2, 64, 8, 8)}
