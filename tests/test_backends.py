"""Backend-specific mechanics: options that change how a backend computes must not change what."""

import numpy as np
import pytest

import portres
from portres import backends, parity

AVAILABLE = backends.available()


@pytest.fixture(scope="module")
def case():
    spec = portres.get("resnet20")
    images, params = parity.parity_case(spec, 32, batch=5, seed=3)
    return spec, images, params, parity.Reference(spec, images, params).logits


@pytest.mark.skipif("mlx" not in AVAILABLE, reason="mlx not installed")
@pytest.mark.parametrize("streams", [1, 2, 3])
def test_mlx_splits_the_batch_across_cpu_streams_without_changing_results(case, streams):
    spec, images, params, reference = case
    model = portres.build(spec, "mlx", params, device="cpu", cpu_streams=streams)
    assert parity.relative_error(model(images), reference) < 1e-5  # 5 images: uneven 2/2/1 split at 3
    assert parity.relative_error(model(images[:1]), reference[:1]) < 1e-5


@pytest.mark.skipif("mlx" not in AVAILABLE, reason="mlx not installed")
def test_mlx_rejects_bad_stream_counts_and_devices():
    with pytest.raises(ValueError, match="cpu_streams=0 must be a positive integer"):
        portres.build("resnet20", "mlx", cpu_streams=0)
    with pytest.raises(ValueError, match="MLX devices are 'cpu' and 'gpu', not 'tpu'"):
        portres.build("resnet20", "mlx", device="tpu")


@pytest.mark.skipif("mlx" not in AVAILABLE, reason="mlx not installed")
@pytest.mark.parametrize("size", [27, 28, 40])  # around the shifted-GEMM threshold (28x28 pixels)
def test_mlx_conv_paths_agree_with_the_reference_on_both_sides_of_the_threshold(size):
    (result,) = parity.check("resnet18", ["mlx"], input_size=size * 4, batch=1)
    assert result.passed, result.to_dict()


@pytest.mark.skipif("tinygrad" not in AVAILABLE, reason="tinygrad not installed")
@pytest.mark.parametrize("winograd", [True, False])
def test_tinygrad_with_and_without_winograd(case, winograd):
    spec, images, params, reference = case
    model = portres.build(spec, "tinygrad", params, winograd=winograd)
    assert parity.relative_error(model(images), reference) < 1e-5


@pytest.mark.skipif("tinygrad" not in AVAILABLE, reason="tinygrad not installed")
def test_tinygrad_unknown_device_lists_what_is_known():
    with pytest.raises(ValueError, match="unknown tinygrad device 'TPU'"):
        portres.build("resnet20", "tinygrad", device="TPU")


@pytest.mark.skipif("tinygrad" not in AVAILABLE, reason="tinygrad not installed")
def test_tinygrad_jit_replays_read_each_new_input(case):
    spec, images, params, reference = case
    model = portres.build(spec, "tinygrad", params)
    numpy_model = portres.build(spec, "numpy", params)
    outputs = [model(images) for _ in range(4)]  # call 2 captures, calls 3+ replay
    assert all(np.array_equal(outputs[0], o) for o in outputs[1:])
    other = np.random.default_rng(7).standard_normal(images.shape).astype(np.float32)
    assert parity.relative_error(model(other), numpy_model(other)) < 1e-5  # a replay, fed a new batch
    assert parity.relative_error(model(images), reference) < 1e-5


@pytest.mark.parametrize("backend", AVAILABLE)
def test_a_model_built_in_one_thread_runs_in_others_concurrently(case, backend):
    # MLX once raised "There is no Stream(cpu, 1) in current thread" here and aborted at exit
    import concurrent.futures

    spec, images, params, reference = case
    model = portres.build(spec, backend, params)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        outputs = list(pool.map(lambda i: model(images[i % 5:i % 5 + 2]), range(6)))
    for i, out in enumerate(outputs):
        assert parity.relative_error(out, reference[i % 5:i % 5 + 2]) < 1e-5


# -- PORTRES_EXPECT_BACKENDS: a framework that failed to install fails the run (tests/conftest.py) -------------


def test_an_expected_backend_that_cannot_run_is_one_line_naming_it_and_its_pip_extra(monkeypatch):
    from conftest import missing_expected_backends

    assert missing_expected_backends(None) == [] == missing_expected_backends("")
    assert missing_expected_backends(" numpy , ") == []
    real = backends.unavailable_reason
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device=None: {
        "torch": "torch is not installed: pip install 'portres[torch]'",
        "tinygrad": "tinygrad's CPU device compiles kernels with clang, which is not on PATH"}.get(name)
        or real(name, device))
    lines = missing_expected_backends("numpy,torch,tinygrad,cuda")
    assert lines == [
        "PORTRES_EXPECT_BACKENDS: the torch backend is not available: torch is not installed: pip install "
        "'portres[torch]'",
        "PORTRES_EXPECT_BACKENDS: the tinygrad backend is not available: tinygrad's CPU device compiles kernels "
        "with clang, which is not on PATH (it installs with pip install 'portres[tinygrad]')",
        "PORTRES_EXPECT_BACKENDS names 'cuda', which is no backend: choose from numpy, tinygrad, mlx, torch, "
        "onnxruntime"]


def test_a_run_expecting_a_missing_backend_fails_at_its_start(tmp_path):
    import os
    import subprocess
    import sys

    # onnxruntime blocked as if it had failed to install; the run stops before collecting anything
    code = ("import sys; sys.modules['onnxruntime'] = None\n"
            "import pytest; sys.exit(pytest.main(['tests/test_smoke.py', '-q', '-p', 'no:cacheprovider']))\n")
    environment = {**os.environ, "PORTRES_EXPECT_BACKENDS": "numpy,onnxruntime"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=environment, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 4, done.stdout + done.stderr
    assert ("PORTRES_EXPECT_BACKENDS: the onnxruntime backend is not available: onnxruntime is not installed: "
            "pip install 'portres[onnx]'") in done.stdout + done.stderr
    assert "passed" not in done.stdout
