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


# -- the contract (backends/base.py): every member exists on every backend, with its default or its own -------


class _OneRank:
    """A process group of one rank: what data_parallel needs of a group, without a launcher."""

    size = 1

    @staticmethod
    def all_sum(x):
        return x

    @staticmethod
    def all_reduce_mean(tree):
        return dict(tree)


@pytest.mark.parametrize("name", AVAILABLE)
def test_every_backend_subclasses_the_contract_and_remakes_itself_from_its_options(name):
    from portres.backends.base import PRIMITIVES, AbstractBackend

    backend = backends.load(name).Backend()
    assert isinstance(backend, AbstractBackend) and backend.name == name
    for member in (*PRIMITIVES, "lock", "autodiff", "for_training", "for_gradients", "for_nonfinite_input",
                   "compile_train_step", "all_reduce_mean", "replica_hashes", "search_kernels", "end_block"):
        assert getattr(type(backend), member, None) is not None, member
    again = backend.variant()
    assert type(again) is type(backend) and again.options() == backend.options() and again is not backend
    assert backend.autodiff == (name in ("tinygrad", "mlx", "torch"))
    assert backend.all_reduce_mean({"w": 1}) == {"w": 1} and backend.search_kernels(0) is None
    assert backend.for_training().autodiff == backend.autodiff
    with backend.lock:
        assert len(backend.replica_hashes({"w": backend.from_numpy(np.ones(3))})) == 1


def test_the_reference_has_the_defaults_and_says_what_it_lacks():
    backend = backends.load("numpy").Backend()
    assert backend.for_training() is backend is backend.for_nonfinite_input() is backend.for_gradients()
    step = object()
    assert backend.compile_train_step(step) is step
    with pytest.raises(NotImplementedError, match="the numpy backend has no autodiff"):
        backend.value_and_grad(lambda trainable: None)
    with pytest.raises(NotImplementedError, match="the numpy backend has no data-parallel training"):
        backend.data_parallel(_OneRank())


@pytest.mark.skipif("onnxruntime" not in AVAILABLE, reason="onnxruntime not installed")
def test_an_inference_engine_says_it_cannot_train_and_keeps_one_exact_variant():
    backend = backends.load("onnxruntime").Backend()
    with pytest.raises(NotImplementedError, match="the onnxruntime backend has no training"):
        backend.batch_norm_train(None, None, None, 1e-5)
    exact = backend.for_nonfinite_input()
    assert exact.nan_exact and exact is backend.for_nonfinite_input() and exact.for_nonfinite_input() is exact


@pytest.mark.skipif("tinygrad" not in AVAILABLE, reason="tinygrad not installed")
def test_tinygrad_variants_are_options_and_the_bench_sets_its_beam_through_the_backend():
    from tinygrad.helpers import BEAM

    backend = backends.load("tinygrad").Backend(dtype="float32")
    assert backend.winograd and not backend.strided_convs_to_depth
    assert not backend.for_nonfinite_input().winograd and backend.winograd
    gradients = backend.for_training()
    assert (gradients.winograd, gradients.strided_convs_to_depth) == (False, True)
    before = BEAM.value
    try:
        backend.search_kernels(2)
        assert BEAM.value == 2
    finally:
        BEAM.value = before


@pytest.mark.skipif("mlx" not in AVAILABLE, reason="mlx not installed")
def test_mlx_variants_keep_the_replica_group_and_share_the_threads_streams():
    module = backends.load("mlx")
    backend = module.Backend(device="cpu", cpu_streams=2).data_parallel(_OneRank(), sync_bn=True)
    gradients = backend.for_gradients()
    assert gradients.strided_convs_to_depth and not backend.strided_convs_to_depth
    assert gradients.shifted_gemm_min_pixels == module.Backend.TRAINING_SHIFTED_GEMM_MIN_PIXELS
    assert gradients.group is backend.group and gradients.sync_bn
    assert gradients._streams() is backend._streams()  # MLX makes a thread per stream: variants add none
    with pytest.raises(ValueError, match="sync_bn sums batch statistics over a data-parallel group"):
        module.Backend(sync_bn=True)


@pytest.mark.parametrize("name", [name for name in ("mlx", "torch") if name in AVAILABLE])
def test_sync_bn_over_one_rank_is_plain_train_mode_batch_norm(name):
    """The shared sync-BN code (base.synchronized_batch_norm), with a one-rank group's sum, normalises as
    the backend's own train-mode BN does (float64)."""
    rng = np.random.default_rng(0)
    x, weight, bias = rng.standard_normal((4, 3, 5, 5)), rng.standard_normal(3), rng.standard_normal(3)
    plain = backends.load(name).Backend(device="cpu", dtype="float64")
    synced = plain.data_parallel(_OneRank(), sync_bn=True)
    assert synced.all_reduce_mean({"g": 1}) == {"g": 1}  # through the group's
    outputs = [[b.to_numpy(a) for a in b.batch_norm_train(b.from_numpy(x), *map(b.from_numpy, (weight, bias)), 1e-5)]
               for b in (plain, synced)]
    for ours, theirs in zip(*outputs):
        np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)


def test_two_pass_statistics_over_slices_are_the_whole_batchs():
    from portres.backends.base import two_pass_statistics

    x = np.random.default_rng(1).standard_normal((5, 3))
    mean, centered, var = two_pass_statistics([x[:2], x[2:]], 5, channel_sum=lambda a: a.sum(0))
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(var, x.var(0), rtol=1e-13)
    np.testing.assert_allclose(np.concatenate(centered), x - x.mean(0), rtol=1e-13)


@pytest.mark.parametrize("backend", AVAILABLE)
def test_a_model_is_freed_as_soon_as_nothing_holds_it(backend):
    """No reference cycle through the compiled forward: a model (with its framework's sessions and buffers)
    goes when its last reference does, not at some later garbage collection (the suite builds hundreds)."""
    import gc
    import weakref

    x = np.zeros((2, 3, 32, 32), np.float32)
    enabled = gc.isenabled()
    gc.disable()
    try:
        model = portres.build("resnet20", backend)
        model(x)
        model.features(x)
        freed = weakref.ref(model)
        del model
        assert freed() is None
    finally:
        if enabled:
            gc.enable()
