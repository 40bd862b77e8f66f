"""MLX's CPU conv kernels (backends/_mlx_kernels.py) against the float64 reference: Winograd F(m x m, 3x3)
(value and hand-written gradient) and where the MLX backend uses it. The shifted-GEMM conv's own test is
in test_gradients.py (test_mlx_shifted_gemm_conv_and_its_hand_written_gradient_equal_the_reference_in_float64).
"""

from __future__ import annotations

import numpy as np
import pytest

from portres import backends

pytestmark = pytest.mark.skipif("mlx" not in backends.available(), reason="mlx not installed")

WINOGRAD_CASES = [  # (batch, channels, height, width, out channels): odd sides, sides not a tile multiple, batch 1
    (1, 3, 8, 8, 4), (2, 5, 7, 9, 6), (1, 4, 5, 3, 2), (3, 2, 11, 6, 5), (1, 1, 1, 1, 1), (2, 16, 14, 14, 8)]


def _case_id(case) -> str:
    return "n{}c{}h{}w{}o{}".format(*case)


def _kernels():
    return backends.load("mlx").kernels  # portres's MLX backend before mlx.core: it picks the BLAS


def _reference(case, seed=0):
    """(x NCHW, weight OIHW, reference output, output cotangent, reference (input, weight) gradients), float64."""
    from portres.backends.numpy import Backend

    batch, channels, height, width, out_channels = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, channels, height, width))
    weight = rng.standard_normal((out_channels, channels, 3, 3))
    reference = Backend()
    expected = reference.conv2d(x, weight, None, 1, 1, 1)
    cotangent = rng.standard_normal(expected.shape)
    return x, weight, expected, cotangent, reference.conv2d_backward(cotangent, x, weight, 1, 1, 1)


def _relative(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("tile_out", [2, 4])
@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=_case_id)
def test_winograd_conv_equals_the_reference_in_float64_and_float32(case, tile_out):
    """float64: the transforms are exact (1e-12 holds); float32: F(4x4)'s larger transform constants
    cost accuracy (~1e-6 relative), still far inside the parity tolerance (1e-4)."""
    kernels = _kernels()
    import mlx.core as mx

    x, weight, expected, _, _ = _reference(case)
    conv = kernels.winograd_conv3x3(mx.default_stream(mx.cpu), tile_out)
    for dtype, tolerance in ((mx.float64, 1e-12), (mx.float32, 1e-5)):
        xs, ws = (mx.array(a.transpose(0, 2, 3, 1), dtype=dtype) for a in (x, weight))  # NHWC, OHWI
        with mx.stream(mx.cpu):
            got = np.array(conv(xs, ws).astype(mx.float64)).transpose(0, 3, 1, 2)
        assert got.shape == expected.shape
        assert _relative(got, expected) < tolerance, (dtype, _relative(got, expected))


@pytest.mark.parametrize("tile_out", [2, 4])
@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=_case_id)
def test_winograd_conv_hand_written_gradient_equals_the_reference_in_float64(case, tile_out):
    """Both gradients of the Winograd conv (transposed transforms, overlapping tiles folded back) against
    the float64 reference's conv2d_backward (which test_backward.py checks by finite differences)."""
    kernels = _kernels()
    import mlx.core as mx

    x, weight, expected, cotangent, expected_grads = _reference(case)
    conv = kernels.winograd_conv3x3(mx.default_stream(mx.cpu), tile_out)
    xs, ws = (mx.array(a.transpose(0, 2, 3, 1), dtype=mx.float64) for a in (x, weight))
    with mx.stream(mx.cpu):
        value, grads = mx.vjp(conv, [xs, ws], [mx.array(cotangent.transpose(0, 2, 3, 1), dtype=mx.float64)])
    got = [np.array(value[0]), *(np.array(g) for g in grads)]
    for name, a, b in zip(("value", "input gradient", "weight gradient"), got, [expected, *expected_grads]):
        np.testing.assert_allclose(a.transpose(0, 3, 1, 2), b, rtol=1e-11, atol=1e-11, err_msg=name)


def test_the_mlx_backend_runs_winograd_where_it_pays_and_the_option_switches_it_off():
    """``winograd`` (default on) picks Winograd for float32 3x3 stride-1 convs on mid-sized maps with enough
    tiles; ``winograd=False``, the gradient variant, float64 and large maps keep the other convs. Both ways
    a ResNet's output matches the float64 reference within the float32 parity tolerance."""
    import portres

    module = backends.load("mlx")
    backend = module.Backend(device="cpu")
    mid = (8, 28, 28, 128)
    assert backend.winograd and backend._winograd_pays(mid, 3, 1)
    assert not backend._winograd_pays((8, 56, 56, 64), 3, 1)  # large map: the shifted GEMMs win there
    assert not backend._winograd_pays((1, 7, 7, 512), 3, 1)  # few tiles: the filter transform outweighs them
    assert not backend._winograd_pays(mid, 3, 0) and not backend._winograd_pays(mid, 1, 0)
    assert not module.Backend(device="cpu", winograd=False)._winograd_pays(mid, 3, 1)
    assert not module.Backend(device="cpu", dtype="float64")._winograd_pays(mid, 3, 1)
    direct = backend.for_nonfinite_input()  # Winograd tiles and space-to-depth taps would spread NaN/inf further
    assert not direct._winograd_pays(mid, 3, 1) and direct.strided_convs_to_depth is False
    assert direct.for_nonfinite_input() is direct
    assert backend.variant(cpu_streams=1).winograd and not backend.for_gradients()._winograd_pays(mid, 3, 1)
    small = (64, 8, 8, 64)
    assert not backend.for_gradients()._winograd_pays(small, 3, 1)  # off for gradients unless asked for
    assert module.Backend(device="cpu", winograd_max_pixels=64).for_gradients()._winograd_pays(small, 3, 1)

    rng = np.random.default_rng(1)
    images = rng.standard_normal((32, 3, 32, 32))
    want = portres.build("resnet20", "numpy")(images)
    for winograd in (True, False):
        got = np.asarray(portres.build("resnet20", "mlx", device="cpu", winograd=winograd)(images.astype(np.float32)))
        assert _relative(got, want) < 1e-4, (winograd, _relative(got, want))



def test_the_7x7_stem_runs_over_its_space_to_depth_input_by_default_and_the_option_switches_it(monkeypatch):
    """``strided_convs_to_depth=None`` (default) sends the 7x7/2 stem, not the 3x3/2 convs, to the space-to-depth
    shifted GEMMs; ``False`` keeps MLX's conv for all. Both match the float64 reference."""
    import portres

    module = backends.load("mlx")
    kernels_seen = []
    original = module.Backend._space_to_depth_conv

    def spy(self, x, weight, *args):
        kernels_seen.append(weight.shape[1])
        return original(self, x, weight, *args)

    monkeypatch.setattr(module.Backend, "_space_to_depth_conv", spy)
    images = np.random.default_rng(3).standard_normal((2, 3, 40, 40))
    want = portres.build("resnet18", "numpy")(images)
    for option, expected in ((None, [7]), (False, [])):
        kernels_seen.clear()
        got = np.asarray(portres.build("resnet18", "mlx", device="cpu", strided_convs_to_depth=option)(images))
        assert sorted(set(kernels_seen)) == expected, option
        assert _relative(got, want) < 1e-4, (option, _relative(got, want))
