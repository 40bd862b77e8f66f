"""Which device tinygrad runs on when none is named: the user's DEV, a GPU, or on a CPU-only machine
OpenCL's every-core CPU device (pocl) for large work and tinygrad's one-thread CPU device for small work.

The policy is checked against faked machines (a GPU, an OpenCL GPU, pocl with one or two cores, no
clang); the real machine's OpenCL device, where it has one, in the last tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from portres import backends

pytestmark = pytest.mark.skipif(backends.unavailable_reason("tinygrad") is not None, reason="tinygrad not installed")


@pytest.fixture
def tinygrad():
    return backends.load("tinygrad")


def pocl(compute_units: int = 2, kind: str = "CPU"):
    return lambda device="CL": SimpleNamespace(kind=kind, compute_units=compute_units)


def fake_machine(monkeypatch, tinygrad, *, first: str, opencl=None, user_dev: str = "", clang: bool = True):
    """tinygrad's first usable device ``first``, its OpenCL device ``opencl``, DEV as the user set it."""
    monkeypatch.setattr(tinygrad, "_tinygrad_default", lambda: user_dev or first)
    monkeypatch.setattr(tinygrad, "opencl_device", opencl or (lambda device="CL": None))
    monkeypatch.setattr(tinygrad, "DEV", SimpleNamespace(device=user_dev))
    monkeypatch.setattr(tinygrad.shutil, "which", lambda name: "/usr/bin/clang" if clang else None)


RESNET20_B128_STEP = 3 * 128 * 4.1e7  # a CIFAR training step: forward and backward, about three passes
DIGITS_RESNET20_B64_STEP = 3 * 64 * 2.6e6  # portres train --data digits: 8x8 images


def test_on_a_cpu_only_machine_with_pocl_inference_and_large_steps_go_to_every_core(monkeypatch, tinygrad):
    fake_machine(monkeypatch, tinygrad, first="CL", opencl=pocl(2))
    assert tinygrad.default_device() == "CL"  # inference: OpenCL's every-core device compiles as fast
    assert tinygrad.default_device(RESNET20_B128_STEP) == "CL"
    assert tinygrad.default_device(tinygrad.CL_MIN_TRAINING_MACS_PER_STEP) == "CL"
    assert tinygrad.default_device(DIGITS_RESNET20_B64_STEP) == "CPU"  # compiles twice as fast there


def test_a_gpu_is_the_default_whatever_the_work(monkeypatch, tinygrad):
    fake_machine(monkeypatch, tinygrad, first="CUDA", opencl=pocl(2))
    assert tinygrad.default_device(DIGITS_RESNET20_B64_STEP) == "CUDA"
    fake_machine(monkeypatch, tinygrad, first="CL", opencl=pocl(64, kind="GPU"))
    assert tinygrad.default_device(DIGITS_RESNET20_B64_STEP) == "CL"


def test_the_users_dev_wins(monkeypatch, tinygrad):
    fake_machine(monkeypatch, tinygrad, first="CL", opencl=pocl(2), user_dev="CPU")
    assert tinygrad.default_device(RESNET20_B128_STEP) == "CPU"
    fake_machine(monkeypatch, tinygrad, first="CL", opencl=pocl(2), user_dev="CL")
    assert tinygrad.default_device(DIGITS_RESNET20_B64_STEP) == "CL"


def test_one_core_or_no_clang_or_no_opencl(monkeypatch, tinygrad):
    fake_machine(monkeypatch, tinygrad, first="CL", opencl=pocl(1))
    assert tinygrad.default_device(RESNET20_B128_STEP) == "CPU"  # nothing to spread over
    fake_machine(monkeypatch, tinygrad, first="CL", opencl=pocl(2), clang=False)
    assert tinygrad.default_device(DIGITS_RESNET20_B64_STEP) == "CL"  # the CPU device cannot compile
    fake_machine(monkeypatch, tinygrad, first="CPU")
    assert tinygrad.default_device(RESNET20_B128_STEP) == "CPU"


def test_training_and_bench_ask_for_the_work_at_hand(monkeypatch, tinygrad):
    import portres
    from portres import bench
    from portres.training.grads import training_backend

    asked = []
    pick = classmethod(lambda cls, training_macs_per_step=None: asked.append(training_macs_per_step) or "CPU")
    monkeypatch.setattr(tinygrad.Backend, "default_device", pick)
    assert training_backend("tinygrad", macs_per_step=1e6).device == "CPU" and asked[-1] == 1e6
    config = bench.BenchConfig("tinygrad", portres.get("resnet20").to_dict(), input_size=16, batch=4, train=True)
    _, backend, _ = bench._training_pass(portres.get("resnet20"), config)
    assert backend.device == "CPU"
    assert asked[-1] == portres.summary("resnet20", 16).macs * 4 * 3  # a training step: three passes of work
    named = bench.BenchConfig("tinygrad", portres.get("resnet20").to_dict(), device="CPU", input_size=16, batch=4,
                              train=True)
    asked.clear()
    _, backend, _ = bench._training_pass(portres.get("resnet20"), named)
    assert asked == [] and backend.device == "CPU"  # a device asked for is not second-guessed


def test_choosing_leaves_no_dev_behind_for_child_processes():
    """tinygrad writes DEV=<its default> into os.environ; a child would read it as the user's choice."""
    environment = {key: value for key, value in os.environ.items() if key != "DEV"}
    code = ("import os; from portres.backends import tinygrad; tinygrad.default_device(); tinygrad.info(); "
            "print(os.environ.get('DEV'))")
    out = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None"


def test_an_opencl_cpu_device_is_described_and_not_taken_for_a_gpu(tinygrad):
    opencl = tinygrad.opencl_device()
    if opencl is None:
        pytest.skip("no OpenCL device here (sudo apt-get install pocl-opencl-icd)")
    backend = tinygrad.Backend(device="CL")
    assert backend.accelerator == (opencl.kind != "CPU")
    assert f"{opencl.compute_units} compute units" in backend.threads
    assert opencl.describe() in tinygrad.info()["opencl"]
    from portres import bench

    assert bench.default_batch(backend.accelerator) == (16 if opencl.kind == "CPU" else 64)
    out = subprocess.run([sys.executable, "-m", "portres.cli", "backends"], capture_output=True, text=True, timeout=120)
    assert f"OpenCL: {opencl.describe()}" in out.stdout, out.stdout + out.stderr


def test_a_device_that_is_not_tinygrads_default_holds_every_tensor_of_a_train_step():
    """With pocl, tinygrad's own default is CL: a constant copied without naming the device landed there
    and a train step on --device CPU failed ("all buffers must be on the same device: ['CPU', 'CL']")."""
    import portres

    tinygrad = backends.load("tinygrad")
    if tinygrad.opencl_device() is None:
        pytest.skip("needs a second tinygrad device: an OpenCL one (sudo apt-get install pocl-opencl-icd)")
    spec = portres.ResNetSpec(name="tiny", block="basic", stem=portres.StemSpec(kind="cifar", width=4, max_pool=False),
                              stages=(portres.StageSpec(1, 4, 1),), num_classes=3)
    code = ("import json, sys; from portres import bench, ResNetSpec\n"
            "spec = ResNetSpec.from_dict(json.loads(sys.argv[1]))\n"
            "for train in (True, False):\n"
            "    record = bench.run_benchmark(bench.BenchConfig('tinygrad', spec.to_dict(), device='CPU', batch=2,"
            " input_size=8, iters=1, warmup=1, train=train))\n"
            "    print(record['device'])")
    environment = {**os.environ, "DEV": "CL"}  # tinygrad's default elsewhere than the device asked for
    out = subprocess.run([sys.executable, "-c", code, spec.to_json()], env=environment, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["CPU", "CPU"]


def test_beam_on_an_opencl_cpu_device_warns_that_it_chose_slower_kernels(monkeypatch, tinygrad):
    import warnings

    monkeypatch.setattr(tinygrad.BEAM, "value", tinygrad.BEAM.value)  # search_kernels sets tinygrad's global
    backend = tinygrad.Backend(device="CPU")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend.search_kernels(2)  # tinygrad's CPU device: BEAM pays there
        assert tinygrad.BEAM.value == 2
        monkeypatch.setattr(backend, "device", "CL")
        monkeypatch.setattr(tinygrad, "opencl_device", pocl(64, kind="GPU"))
        backend.search_kernels(2)  # an OpenCL GPU
        monkeypatch.setattr(tinygrad, "opencl_device", pocl(2))
        backend.search_kernels(0)  # turning the search off
    with pytest.warns(tinygrad.BeamSearchWarning, match="--device CPU"):
        backend.search_kernels(1)
    assert tinygrad.BEAM.value == 1  # a warning, not a refusal: the user asked for it
