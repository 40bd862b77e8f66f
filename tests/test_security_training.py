"""Security: what training must never do with its run directory and checkpoints.

Attacks reproduced here (every crafted checkpoint is made in ``tmp_path`` at run time):

* **Divergence on the last step of an epoch.** A learning rate of 1e300 (float32) used to crash
  with ``TypeError: unsupported format string passed to NoneType.__format__``; finite but huge
  weights (float64) wrote a ``NaN`` line to ``metrics.jsonl`` and then failed on "Out of range
  float values are not JSON compliant". Both must stop with one ``TrainingError`` naming the
  step and the learning rate (exit status 2 from ``portres train``), keep the last good
  checkpoint, and write nothing non-finite.
* **A used output directory.** A second ``train`` into the same ``out`` silently replaced the
  first run's checkpoints and metrics, and two runs at once both wrote it. A non-empty ``out``
  is refused unless ``--resume``/``--overwrite``; a run holds a lock on ``out`` for its whole
  length (the second run is refused naming the first's PID; a symlink planted as the lock file is
  not followed, so its target is never truncated); a temporary file a killed writer
  left is removed by the next run that holds the lock, and never while another run holds it.
* **Optimiser slots that do not fit.** A momentum slot of shape (1,) broadcast silently; a
  checkpoint without slots resumed with fresh momentum; a float64 slot in a float32 run. Every
  slot is checked for presence, shape and dtype, in one capped error.
* **Tampered checkpoint descriptions.** A missing field, a wrong type, a negative epoch, a NaN
  in the metrics, garbage RNG state, a bad config or optimiser, class names that are not strings
  or not one per class, and a spec that does not match the tensors: each is refused with one
  line naming the field, from the Python API and from ``portres train --resume`` and
  ``portres eval`` (exit status 2), never a traceback, a bare key name or a backend's shape error.
* **An unbounded ``--image-size``.** 100000 used to load digits until the memory ran out; it is
  refused before any image is loaded, and an out-of-memory error names ``train``'s own options.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from test_train import TINY, quick, read_metrics, run

import portres.data
from portres.cli import main
from portres.tensorfiles import create_temporary
from portres.training import loop
from portres.training.checkpoint import KEY, CheckpointError, DescriptionError, RunDirectoryError, load_checkpoint
from portres.training.loop import TrainingError
from portres.weights import save_weights

pytestmark = pytest.mark.skipif(os.name == "nt", reason="the run directory's lock is flock (POSIX)")


def invoke(*args):
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    return result, result.output.strip().splitlines()


def strict_lines(path):
    """Every line of a metrics file, parsed as strict JSON (NaN and Infinity refused)."""
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


# -- divergence -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, lr", [("float32", 1e300), ("float64", 1e38)])
def test_divergence_on_the_last_step_of_an_epoch_stops_naming_step_and_lr(tmp_path, dtype, lr):
    # one step an epoch: the step that diverges is the last of its epoch. float32: the weights become
    # NaN/inf; float64: they stay finite but so large that the test loss is NaN
    config = quick(tmp_path, dtype=dtype, lr=lr, epochs=2, limit_train=16)
    stopped = rf"diverged at step 1 \(epoch 1, lr {re.escape(f'{lr:.4g}')}\).*none was written yet"
    with pytest.raises(TrainingError, match=stopped):
        run(config)
    out = tmp_path / "run"
    assert strict_lines(out / "metrics.jsonl") == [] and not (out / "last.safetensors").exists()


def test_divergence_keeps_the_last_good_checkpoint_and_metrics(tmp_path, monkeypatch):
    # a good first epoch, then an lr that overflows the float32 weights on the last step of epoch 2
    monkeypatch.setattr(loop, "make_lr_schedule", lambda config, per_epoch: lambda step: 1e300 if step == 3 else 0.05)
    with pytest.raises(TrainingError, match=r"diverged at step 4 \(epoch 2, lr 1e\+300\).*last good checkpoint"):
        run(quick(tmp_path, dtype="float32", limit_train=32))  # 2 steps an epoch
    out = tmp_path / "run"
    state, description = load_checkpoint(out / "last.safetensors")
    assert description["position"]["step"] == 2 and all(np.isfinite(value).all() for value in state.values())
    assert [record["epoch"] for record in strict_lines(out / "metrics.jsonl")] == [1]
    assert not (out / "summary.json").exists()


def test_the_train_command_reports_divergence_in_one_line(tmp_path):
    spec = tmp_path / "tiny.json"
    spec.write_text(json.dumps(TINY.to_dict()))
    result, lines = invoke("train", "--spec", spec, "--backend", "numpy", "--dtype", "float32", "--lr", "1e300",
                           "--epochs", "1", "--batch-size", "16", "--limit-train", "16", "--out", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert lines[-1].startswith("portres: error: training diverged at step 1 (epoch 1, lr 1e+300)"), result.output
    assert "Traceback" not in result.output


# -- the run directory ------------------------------------------------------------------------------


def test_a_second_run_into_a_used_directory_is_refused_unless_resumed_or_overwritten(tmp_path):
    run(quick(tmp_path))
    out = tmp_path / "run"
    kept = {name: (out / name).read_bytes() for name in ("last.safetensors", "best.safetensors", "metrics.jsonl")}
    with pytest.raises(RunDirectoryError, match=r"is not empty \(it holds best.safetensors.*--resume.*--overwrite"):
        run(quick(tmp_path, seed=4))
    assert {name: (out / name).read_bytes() for name in kept} == kept
    with pytest.raises(TrainingError, match="not both"):
        run(quick(tmp_path, overwrite=True), resume=True)
    # --overwrite replaces the whole run: a run stopped before its first epoch leaves no best of the old one
    summary = run(quick(tmp_path, seed=4, overwrite=True, stop_after_steps=2))
    assert summary["steps_done"] == 2 and not (out / "best.safetensors").exists() and read_metrics(out) == []
    assert json.loads((out / "summary.json").read_text())["steps_done"] == 2


def test_the_train_command_refuses_a_used_directory_in_one_line(tmp_path):
    args = ["train", "--spec", _spec_file(tmp_path), "--backend", "numpy", "--epochs", "1", "--batch-size", "16",
            "--limit-train", "16", "--out", tmp_path / "run"]
    assert invoke(*args)[0].exit_code == 0
    result, lines = invoke(*args)
    assert result.exit_code == 2 and len(lines) == 1 and "--overwrite" in lines[0], result.output
    assert invoke(*args, "--overwrite")[0].exit_code == 0
    result, lines = invoke(*args, "--overwrite", "--resume")
    assert result.exit_code == 2 and len(lines) == 1 and "give one of them" in lines[0], result.output


def _stale_temporary(out, name="last.safetensors"):
    """A temporary file exactly as the atomic writer names it, as a writer killed mid-write leaves it."""
    descriptor, path = create_temporary(out / name, out, name, True)
    os.write(descriptor, b"half a checkpoint")
    os.close(descriptor)
    return path


def test_a_concurrent_run_is_refused_naming_the_first_runs_pid(tmp_path):
    out = tmp_path / "run"
    settings = dict(out=str(out), spec=TINY.to_dict(), data="digits", backend="numpy", epochs=100000, batch_size=16,
                    limit_train=32, lr=0.05, checkpoint_every=1)
    code = f"from portres.training.loop import TrainConfig, train; train(TrainConfig(**{settings!r}))"
    first = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.safetensors").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, "the first run ended early"
        stale = _stale_temporary(out)
        # the same run resumed a second time, while the first still writes: refused, nothing written
        with pytest.raises(RunDirectoryError, match=rf"in use by another run \(PID {first.pid}\)"):
            run(loop.TrainConfig(**settings, stop_after_steps=1), resume=True)
        result, lines = invoke("train", "--spec", _spec_file(tmp_path), "--backend", "numpy", "--out", out,
                               "--overwrite")
        assert result.exit_code == 2 and len(lines) == 1 and f"PID {first.pid}" in lines[0], result.output
        assert stale.exists()  # a live run's directory: nothing is removed while it holds the lock
    finally:
        first.kill()
        first.wait()
    # the first run was killed mid-run: its lock went with it, and the next run removes the stale temporary
    summary = run(loop.TrainConfig(**settings, stop_after_steps=1), resume=True)
    assert summary["steps_done"] >= 2 and not stale.exists()


def test_a_symlink_planted_as_the_lock_file_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".portres.lock").symlink_to(victim)
    with pytest.raises(RunDirectoryError, match="cannot lock the run directory"):
        run(quick(tmp_path))
    assert victim.read_text() == "precious"


def _spec_file(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY.to_dict()))
    return path


def test_only_this_runs_own_temporaries_are_removed(tmp_path):
    run(quick(tmp_path, stop_after_steps=2))
    out = tmp_path / "run"
    stale = [_stale_temporary(out, name) for name in ("last.safetensors", "best.safetensors", "summary.json")]
    foreign = [out / ".notes.txt.0123456789abcdef.tmp", out / ".last.safetensors.tmp", out / "last.safetensors.tmp",
               _stale_temporary(out, "other.safetensors")]
    for path in foreign[:3]:
        path.write_text("not ours")
    run(quick(tmp_path, stop_after_steps=3), resume=True)
    assert not any(path.exists() for path in stale) and all(path.exists() for path in foreign)


# -- optimiser slots --------------------------------------------------------------------------------


def _stopped_run(tmp_path, **overrides):
    """A float32 run stopped mid-epoch: its last checkpoint and the config to resume it with."""
    config = quick(tmp_path, dtype="float32", **overrides)
    run(quick(tmp_path, dtype="float32", stop_after_steps=3, **overrides))
    return tmp_path / "run" / "last.safetensors", config


def _rewrite(path, state=None, description=None):
    """The checkpoint at ``path`` written again with ``state``/``description`` changed as given (NaN allowed)."""
    old_state, old_description = load_checkpoint(path)
    description = old_description if description is None else description
    save_weights(path, old_state if state is None else state, metadata={KEY: json.dumps(description)})


def test_a_broadcastable_momentum_slot_is_refused(tmp_path):
    path, config = _stopped_run(tmp_path)
    state, _ = load_checkpoint(path)
    state["optimizer/momentum_buffer.conv1.weight"] = np.ones(1, np.float32)  # broadcasts against (4, 1, 3, 3)
    _rewrite(path, state)
    with pytest.raises(CheckpointError, match=r"optimiser slot momentum_buffer.conv1.weight has shape \[1\], "
                                              r"expected \[4, 1, 3, 3\]"):
        run(config, resume=True)


def test_a_checkpoint_without_optimiser_slots_is_refused(tmp_path):
    path, config = _stopped_run(tmp_path)
    state, _ = load_checkpoint(path)
    slots = [name for name in state if name.startswith("optimizer/")]
    _rewrite(path, {name: value for name, value in state.items() if name not in slots})
    with pytest.raises(CheckpointError) as error:
        run(config, resume=True)
    message = str(error.value)
    assert "optimiser slot momentum_buffer.conv1.weight is missing" in message
    assert f"and {len(slots) - 8} more" in message and "\n" not in message  # one line, capped


def _widen(state, name="optimizer/momentum_buffer.fc.bias"):
    state[name] = state[name].astype(np.float64)


@pytest.mark.parametrize("change, message", [
    (_widen, "optimiser slot momentum_buffer.fc.bias is float64, expected float32"),
    (lambda s: s.update({"optimizer/exp_avg.fc.bias": np.zeros(10, np.float32)}),
     "optimiser slot exp_avg.fc.bias is unexpected"),
    (lambda s: s.pop("bn1.weight"), "bn1.weight is missing"),
])
def test_slots_and_tensors_of_the_wrong_kind_are_refused(tmp_path, change, message):
    path, config = _stopped_run(tmp_path)
    state, _ = load_checkpoint(path)
    change(state)
    _rewrite(path, state)
    with pytest.raises(CheckpointError, match=message):
        run(config, resume=True)


# -- the checkpoint's description ---------------------------------------------------------------------


def _set(keys, value):
    def change(description):
        *parents, last = keys
        for key in parents:
            description = description[key]
        if value is _DELETE:
            del description[last]
        else:
            description[last] = value
    return change


_DELETE = object()
TAMPERED = [
    (_set(["position"], _DELETE), "field 'position' is missing"),
    (_set(["position", "epoch"], "x"), "field 'position.epoch' must be a non-negative integer, got 'x'"),
    (_set(["position", "epoch"], -1), "field 'position.epoch' must be a non-negative integer, got -1"),
    (_set(["position", "step"], 10**9), "field 'position'"),
    (_set(["position", "epoch_sums", "lr"], "fast"), "field 'position.epoch_sums.lr' must be null or a finite number"),
    (_set(["rng_state"], "garbage"), "field 'rng_state' is not part of a checkpoint description"),
    (_set(["metrics"], [{"epoch": 1}]), "field 'metrics[0].step' is missing"),
    (_set(["config", "lr"], "x"), "field 'config' holds an invalid setting: lr='x'"),
    (_set(["config", "data_options"], {"image_size": 10**6}), "field 'config' holds an invalid setting: image_size"),
    (_set(["optimizer", "momentum"], "x"), "field 'optimizer' is not a valid optimiser"),
    (_set(["spec", "stages"], "x"), "field 'spec' is not a valid network"),
    (_set(["dtype"], "float8"), "field 'dtype' must be 'float32' or 'float64', got 'float8'"),
    (_set(["finished_epoch"], "no"), "field 'finished_epoch' must be true or false"),
    (_set(["class_names"], "digits"), "field 'class_names' must be null or a list of class names"),
    (_set(["class_names"], ["zero", 1]), "field 'class_names' must be null or a list of class names"),
    (_set(["class_names"], ["x" * 1001] * 10), "field 'class_names' must be null or a list of class names"),
    (_set(["class_names"], ["zero", "one"]), "field 'class_names' must name each of the network's 10 classes, got 2"),
    (_set(["config", "freeze"], 3), "field 'config' holds an invalid setting: freeze=3"),
    (_set(["config", "init"], ""), "field 'config' holds an invalid setting: init=''"),
    (_set(["config", "lr_backbone"], -1), "field 'config' holds an invalid setting: lr_backbone=-1"),
]


@pytest.mark.parametrize("change, message", TAMPERED)
def test_every_tampered_description_field_is_named_on_resume(tmp_path, change, message):
    path, config = _stopped_run(tmp_path)
    _, description = load_checkpoint(path)
    change(description)
    _rewrite(path, description=description)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace("[", r"\[")) as error:
        run(config, resume=True)
    assert "\n" not in str(error.value)


def test_a_description_nested_too_deeply_is_refused_in_one_line(tmp_path):
    path, config = _stopped_run(tmp_path)
    state, _ = load_checkpoint(path)
    save_weights(path, state, metadata={KEY: "[" * 100_000 + "]" * 100_000})
    with pytest.raises(DescriptionError, match="nested too deeply"):
        run(config, resume=True)


def test_a_nan_in_the_recorded_metrics_is_refused(tmp_path):
    path, config = _stopped_run(tmp_path, limit_train=32)  # 2 steps an epoch: one finished epoch
    _, description = load_checkpoint(path)
    description["metrics"][0]["train_loss"] = math.nan
    _rewrite(path, description=description)
    finite = r"field 'metrics\[0\].train_loss' must be a finite number >= 0, got nan"
    with pytest.raises(DescriptionError, match=finite):
        run(config, resume=True)


def test_a_spec_that_does_not_match_the_tensors_is_refused(tmp_path):
    path, _ = _stopped_run(tmp_path)
    _, description = load_checkpoint(path)
    wider = {**TINY.to_dict(), "stages": [{"blocks": 1, "width": 4, "stride": 1},
                                          {"blocks": 1, "width": 16, "stride": 2}]}
    description["spec"] = description["config"]["spec"] = wider
    _rewrite(path, description=description)
    misfit = r"layer2.0.conv1.weight has shape \[8, 4, 3, 3\], expected \[16, 4, 3, 3\]"
    with pytest.raises(CheckpointError, match=misfit):
        run(quick(tmp_path, dtype="float32", spec=wider), resume=True)  # the tampered run's own settings
    with pytest.raises(DescriptionError, match="field 'spec' does not describe its tensors"):
        loop.spec_of_checkpoint(path)


@pytest.mark.parametrize("change, message", [TAMPERED[1], TAMPERED[5], TAMPERED[7],
                                             next(case for case in TAMPERED if "must name each" in case[1])])
def test_tampered_checkpoints_fail_train_resume_and_eval_in_one_line(tmp_path, change, message):
    out = tmp_path / "run"
    args = ["train", "--spec", _spec_file(tmp_path), "--backend", "numpy", "--dtype", "float32", "--epochs", "2",
            "--batch-size", "16", "--limit-train", "32", "--lr", "0.05", "--out", out]
    assert invoke(*args, "--stop-after", "3")[0].exit_code == 0
    _, description = load_checkpoint(out / "last.safetensors")
    change(description)
    _rewrite(out / "last.safetensors", description=description)
    for result, lines in (invoke(*args, "--resume"),
                          invoke("eval", "--weights", out / "last.safetensors", "--backend", "numpy")):
        assert result.exit_code == 2, result.output
        assert len(lines) == 1 and lines[0].startswith("portres: error: checkpoint ") and message in lines[0], lines


def test_eval_refuses_a_checkpoint_whose_spec_does_not_match_its_tensors(tmp_path):
    path, _ = _stopped_run(tmp_path)
    _, description = load_checkpoint(path)
    description["spec"] = {**TINY.to_dict(), "num_classes": 7}
    _rewrite(path, description=description)
    result, lines = invoke("eval", "--weights", path, "--backend", "numpy")
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "fc.weight has shape [10, 8], expected [7, 8]" in lines[0] and "field 'spec'" in lines[0], lines


# -- image size ------------------------------------------------------------------------------------


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a data set fails the test: a bad size must be refused before any image is allocated."""
    def load(*args, **options):
        raise AssertionError(f"the data set was loaded with {options}")
    monkeypatch.setattr(portres.data, "load", load)


def test_an_image_size_too_large_is_refused_before_loading(tmp_path, no_loading):
    assert importlib.import_module("portres.cli.app").MAX_IMAGE_SIZE == loop.MAX_IMAGE_SIZE  # one bound
    with pytest.raises(TrainingError, match="image_size=100000 must be an integer from 1 to 4096"):
        run(quick(tmp_path, data_options={"image_size": 100000}))
    result, lines = invoke("train", "--arch", "resnet20", "--backend", "numpy", "--image-size", "100000",
                           "--out", tmp_path / "cli")
    assert result.exit_code == 2 and len(lines) == 1 and "1<=x<=4096" in lines[0], result.output
    result, lines = invoke("eval", "--weights", tmp_path / "none.safetensors", "--arch", "resnet20", "--backend",
                           "numpy", "--image-size", "100000")
    assert result.exit_code == 2 and len(lines) == 1 and "1<=x<=4096" in lines[0], result.output


def test_out_of_memory_names_the_train_commands_own_options(tmp_path, monkeypatch):
    def exhausted(config):
        raise MemoryError("Unable to allocate 5.6 GiB for an array")
    monkeypatch.setattr(loop, "load_data", exhausted)
    result, lines = invoke("train", "--arch", "resnet20", "--backend", "numpy", "--out", tmp_path / "run")
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "5.6 GiB" in lines[0] and "--batch-size or --image-size" in lines[0] and "--input-size" not in lines[0]
