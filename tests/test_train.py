"""The training loop's mechanics on tiny networks and data: outputs, checkpoints, exact resume,
determinism, and every bad input it must refuse with one line. Never speed, never accuracy targets
(see docs and BENCHMARKS.md for full runs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from portres import backends
from portres.cli import main
from portres.spec import ResNetSpec, StageSpec, StemSpec
from portres.training.checkpoint import CheckpointError, load_checkpoint
from portres.training.loop import TrainConfig, TrainingError, train

FRAMEWORKS = [name for name in backends.available(training=True) if name != "numpy"]
TINY = ResNetSpec(name="tiny", block="basic", shortcut="A", stem=StemSpec(kind="cifar", width=4, max_pool=False),
                  stages=(StageSpec(1, 4, 1), StageSpec(1, 8, 2)), num_classes=10, in_channels=1)


class Quiet:
    """A progress sink for tests."""

    def __init__(self):
        self.lines = []

    def update(self, text, final=False):
        if final:
            self.lines.append(text)

    def note(self, text):
        self.lines.append(text)


def quick(tmp_path, name="run", **overrides) -> TrainConfig:
    settings = dict(out=str(tmp_path / name), spec=TINY.to_dict(), data="digits", backend="numpy", epochs=2,
                    batch_size=16, limit_train=96, lr=0.05, seed=3)
    return TrainConfig(**{**settings, **overrides})


def run(config, resume=False):
    return train(config, resume=resume, progress=Quiet())


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_writes_metrics_checkpoints_and_a_summary(tmp_path):
    summary = run(quick(tmp_path))
    out = tmp_path / "run"
    metrics = read_metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2] and metrics[-1]["step"] == 12  # 96 images / 16, two epochs
    for field in ("lr", "train_loss", "train_error", "test_loss", "test_top1_error", "test_top5_error",
                  "images_per_s", "seconds"):
        assert all(m[field] is not None and np.isfinite(m[field]) for m in metrics), field
    assert summary["finished"] and summary["best_test_top1_error"] == min(m["test_top1_error"] for m in metrics)
    assert json.loads((out / "summary.json").read_text())["steps_done"] == 12
    state, description = load_checkpoint(out / "last.safetensors")
    assert description["position"] == {**description["position"], "epoch": 2, "batch": 0, "step": 12}
    assert any(name.startswith("optimizer/momentum_buffer.") for name in state)
    _, best = load_checkpoint(out / "best.safetensors")
    assert best["spec"]["name"] == "tiny"
    try:
        import matplotlib  # noqa: F401
        assert (out / "curves.png").stat().st_size > 0
    except ImportError:
        pass


def test_the_learning_rate_follows_the_schedule(tmp_path):
    run(quick(tmp_path, schedule="multistep", milestones=(1,), lr=0.1))
    metrics = read_metrics(tmp_path / "run")
    assert metrics[0]["lr"] == pytest.approx(0.1) and metrics[1]["lr"] == pytest.approx(0.01)


@pytest.mark.parametrize("backend", ["numpy", *FRAMEWORKS])
def test_resumed_runs_end_exactly_where_uninterrupted_ones_do(tmp_path, backend):
    run(quick(tmp_path, "whole", backend=backend))
    first = run(quick(tmp_path, "parts", backend=backend, stop_after_steps=8))  # mid-epoch 2 (6 steps an epoch)
    assert not first["finished"] and first["steps_done"] == 8
    resumed = run(quick(tmp_path, "parts", backend=backend), resume=True)
    assert resumed["finished"] and resumed["steps_done"] == 12
    a, _ = load_checkpoint(tmp_path / "whole" / "last.safetensors")
    b, _ = load_checkpoint(tmp_path / "parts" / "last.safetensors")
    assert sorted(a) == sorted(b)
    assert all(np.array_equal(a[name], b[name]) for name in a), [n for n in a if not np.array_equal(a[n], b[n])]
    timing = {"images_per_s", "seconds"}
    untimed = lambda out: [{k: v for k, v in m.items() if k not in timing} for m in read_metrics(out)]  # noqa: E731
    assert untimed(tmp_path / "whole") == untimed(tmp_path / "parts")


def test_the_same_seed_gives_the_same_loss_curve(tmp_path):
    losses = [[m["train_loss"] for m in (run(quick(tmp_path, f"r{i}")) and read_metrics(tmp_path / f"r{i}"))]
              for i in range(2)]
    assert losses[0] == losses[1]
    other = run(quick(tmp_path, "other", seed=4)) and read_metrics(tmp_path / "other")
    assert [m["train_loss"] for m in other] != losses[0]


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = quick(tmp_path, epochs=3, lr=1e30, checkpoint_every=1)
    diverged = r"diverged (at|by) step \d+ \(epoch 1, lr [0-9.]+e\+[0-9]+\).*last good checkpoint"
    with pytest.raises(TrainingError, match=diverged):
        run(config)
    state, description = load_checkpoint(tmp_path / "run" / "last.safetensors")  # readable, and finite
    assert all(np.isfinite(value).all() for value in state.values())


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    run(quick(tmp_path, stop_after_steps=3))
    with pytest.raises(CheckpointError, match=r"other settings \(lr 0.05 -> 0.1\)"):
        run(quick(tmp_path, lr=0.1), resume=True)
    with pytest.raises(CheckpointError, match="optimiser"):
        run(quick(tmp_path, momentum=0.5), resume=True)
    (tmp_path / "run" / "last.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(CheckpointError, match="corrupt"):
        run(quick(tmp_path), resume=True)


def test_a_spec_that_does_not_fit_the_data_is_refused(tmp_path):
    three_channels = ResNetSpec.from_dict({**TINY.to_dict(), "in_channels": 3})
    with pytest.raises(ValueError, match="1-channel"):
        run(quick(tmp_path, spec=three_channels.to_dict()))


@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": 1}, "batch_size must be at least 2"),
    ({"batch_size": 200}, "exceeds the 96 training images"),
    ({"data": "imagenet"}, "unknown data set 'imagenet'"),
    ({"lr": -1.0}, r"lr=-1.0 must be a finite number >= 0"),
    ({"milestones": (5,)}, "milestones"),
    ({"warmup_epochs": 2.0}, "warmup_epochs=2.0 must be below epochs=2"),
])
def test_bad_settings_are_refused_before_training(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        run(quick(tmp_path, **overrides))


def test_train_and_eval_commands(tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["train", "--arch", "resnet20", "--backend", "numpy", "--data", "digits",
                                       "--epochs", "1", "--batch-size", "16", "--limit-train", "32",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "resnet20 on digits: finished" in result.stdout
    record = read_metrics(out)[0]
    evaluated = CliRunner().invoke(main, ["eval", "--weights", str(out / "best.safetensors"), "--data", "digits",
                                          "--backend", "numpy", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["top1_error"] == pytest.approx(record["test_top1_error"])


@pytest.mark.parametrize("args, message", [
    (["train", "--arch", "resnet20", "--data", "cifar10", "--data-dir", "/nonexistent"], "cifar-10-python.tar.gz"),
    (["train", "--arch", "resnet20", "--backend", "jax"], "unknown backend 'jax'"),
    (["train", "--arch", "resnet20", "--milestones", "a,b"], "comma-separated list of epochs"),
    (["eval", "--weights", "/nonexistent.safetensors", "--data", "digits"], "no checkpoint at /nonexistent"),
])
def test_command_errors_are_one_line_with_status_2(args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.strip().count("\n") == 0, result.output


def test_a_cifar_archive_trains_through_the_real_loader(tmp_path):
    from test_data import write_cifar

    write_cifar(tmp_path, "cifar10", count=8)
    spec = ResNetSpec.from_dict({**TINY.to_dict(), "in_channels": 3})
    summary = run(quick(tmp_path, spec=spec.to_dict(), data="cifar10", data_dir=str(tmp_path), limit_train=None,
                        batch_size=8, epochs=1))
    assert summary["finished"] and summary["steps_done"] == 5  # 5 batches of 8 synthetic images


@pytest.mark.slow
def test_a_run_killed_while_training_loses_at_most_the_steps_since_its_checkpoint(tmp_path):
    out = tmp_path / "killed"
    code = ("import sys; from portres.training.loop import TrainConfig, train; from portres.spec import ResNetSpec; "
            f"train(TrainConfig(out={str(out)!r}, spec={TINY.to_dict()!r}, data='digits', backend='numpy', "
            "epochs=50, batch_size=16, limit_train=96, lr=0.05, checkpoint_every=1))")
    child = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "last.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.5)  # let it write a few more checkpoints, then kill it wherever it is
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    state, description = load_checkpoint(out / "last.safetensors")
    done = description["position"]["step"]
    assert done >= 1
    summary = run(TrainConfig(out=str(out), spec=TINY.to_dict(), data="digits", backend="numpy", epochs=50,
                              batch_size=16, limit_train=96, lr=0.05, checkpoint_every=1, stop_after_steps=done + 2),
                  resume=True)
    assert summary["steps_done"] == done + 2


def test_an_inference_only_backend_is_refused_for_training(tmp_path):
    if "onnxruntime" not in backends.available():
        pytest.skip("onnxruntime not installed")
    with pytest.raises(backends.BackendUnavailable, match="computes no gradients"):
        run(quick(tmp_path, backend="onnxruntime"))
