"""Data parallel training on the frameworks' own engines: MLX ranks (ring over loopback), tinygrad's
devices in one process, torch ranks (gloo), each held against an independent float64 NumPy reference.

N replicas with per-replica batch b equal one process that averages the N per-shard gradients of b
images each ("ghost batch": each shard's BN normalises with its own statistics); with sync BN they
equal one process with batch N*b. Runs are tiny (a few steps of a 2-stage net on 48 digits) and stop
before evaluation, because the cost here is the frameworks' start-up and compilation, not the steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_train import TINY, Quiet

import portres
from portres import backends, data
from portres.cli import main
from portres.training import launch
from portres.training import replicas as parallel
from portres.training.checkpoint import load_checkpoint
from portres.training.grads import loss_and_grads
from portres.training.loop import TrainConfig, load_data, make_lr_schedule, make_optimizer, network_for, train
from portres.weights import init_params

HAS = set(backends.available())
needs = {name: pytest.mark.skipif(name not in HAS, reason=f"{name} is not installed") for name in
         ("mlx", "tinygrad", "torch")}
TOLERANCE = 1e-5  # relative L2 error of the final weights against the float64 reference


def settings(tmp_path, name="run", **overrides) -> TrainConfig:
    """48 digits in global batches of 16: three steps an epoch; stopped after two (before any evaluation)."""
    fields = dict(out=str(tmp_path / name), spec=TINY.to_dict(), data="digits", epochs=1, batch_size=16,
                  limit_train=48, lr=0.2, seed=3, stop_after_steps=2)
    return TrainConfig(**{**fields, **overrides})


def reference_state(config: TrainConfig, shards: int, steps: int, backend: str = "numpy") -> dict[str, np.ndarray]:
    """What ``steps`` data-parallel steps of ``config`` must give, computed in one process: each global batch
    cut into ``shards`` equal parts, one gradient per part (``loss_and_grads`` on ``backend``: each part's
    own BN statistics), their mean applied by the optimiser in float64 NumPy; the BN running statistics the
    mean of the parts'. On the run's own backend this isolates the data-parallel machinery: against the
    float64 reference a float32 run can differ by 1e-2 in early layers' gradients where an activation sits
    within rounding of a ReLU's kink (seen on MLX: one of 8,192 elements)."""
    config = dataclasses.replace(config, distributed=False, devices=None, sync_bn=False).resolved()
    dataset = load_data(config)
    spec = network_for(config, dataset)
    optimizer = make_optimizer(config)
    per_epoch = len(dataset.train_labels) // config.batch_size
    schedule = make_lr_schedule(config, per_epoch)
    params = {name: value.astype(np.float64) for name, value in init_params(spec, config.seed).items()}
    names = [name for name in params if not name.endswith(("running_mean", "running_var"))]
    slots = optimizer.init({name: params[name] for name in names})
    step = 0
    for epoch in range(config.epochs):
        with data.batches(dataset.train_images, dataset.train_labels, config.batch_size, mean=dataset.mean,
                          std=dataset.std, shuffle=True, seed=config.seed, epoch=epoch, augment=config.augment,
                          drop_last=True) as batches:
            for images, labels in batches:
                if step == steps:
                    return params
                with one_core_like_a_rank():
                    parts = [loss_and_grads(spec, backend, params, x, y) for x, y in
                             zip(np.split(images, shards), np.split(labels, shards))]
                grads = {name: sum(part[1][name] for part in parts) / shards for name in names}
                stats = {name: sum(part[2][name] for part in parts) / shards for name in parts[0][2]}
                updated, slots = optimizer.update({name: params[name] for name in names}, grads, slots,
                                                  schedule(step), step + 1)
                params = {**updated, **stats}
                step += 1
    return params


@contextlib.contextmanager
def one_core_like_a_rank():
    """This thread on one core while the reference computes, as each local rank runs (portres pins its
    ranks to a share of the cores): MLX on several cores splits a batch across CPU streams, whose float32
    sums round differently, enough to flip a ReLU at its kink on digits' flat backgrounds."""
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, cores)


def relative_error(state: dict, reference: dict) -> float:
    names = sorted(reference)
    got = np.concatenate([np.ravel(state[name]).astype(np.float64) for name in names])
    want = np.concatenate([np.ravel(reference[name]) for name in names])
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def update_error(state: dict, reference: dict, start: dict) -> float:
    """Relative error of what training changed (weights minus their initial values): far more sensitive
    than the weights' error, which the unchanged initial values dilute."""
    names = sorted(name for name in reference if not name.endswith(("running_mean", "running_var")))
    got = np.concatenate([np.ravel(state[name]).astype(np.float64) - start[name].ravel() for name in names])
    want = np.concatenate([np.ravel(reference[name]) - start[name].ravel() for name in names])
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def check_against_reference(config: TrainConfig, summary: dict, shards: int) -> None:
    state, description = load_checkpoint(Path(config.out) / "last.safetensors")
    steps = description["position"]["step"]
    assert steps == summary["steps_done"] == 2
    reference = reference_state(config, shards, steps, config.backend)
    start = {name: value.astype(np.float64) for name, value in init_params(TINY, config.seed).items()}
    model = {name: value for name, value in state.items() if not name.startswith("optimizer/")}
    assert relative_error(model, reference) < TOLERANCE
    assert update_error(model, reference, start) < 1e-4
    # the other way of cutting the batch is far off (float64 suffices to show it): the test can tell them apart
    other = reference_state(config, 1 if shards > 1 else 2, steps)
    assert update_error(model, other, start) > 100 * update_error(model, reference, start)


def check_replicas_identical(summary: dict, replicas: int) -> None:
    hashes = summary["replica_state_sha256"]
    assert summary["replicas"] == replicas and len(hashes) == replicas
    assert len(set(hashes)) == 1, hashes


# -- two processes on loopback: MLX (ring) and torch (gloo) ----------------------------------------------


@pytest.mark.parametrize("backend", [pytest.param(name, marks=needs[name]) for name in ("mlx", "torch")])
@pytest.mark.parametrize("sync_bn", [False, True], ids=["per-replica-bn", "sync-bn"])
def test_process_ranks_match_the_reference(tmp_path, backend, sync_bn):
    config = settings(tmp_path, backend=backend, sync_bn=sync_bn)
    summary = launch.local_training(config, 2, resume=False)
    check_replicas_identical(summary, 2)
    assert summary["processes"] == 2 and summary["sync_bn"] == sync_bn
    check_against_reference(config, summary, shards=1 if sync_bn else 2)


@needs["mlx"]
@pytest.mark.slow
def test_mlx_resumes_with_another_number_of_processes(tmp_path):
    # sync BN makes the replica count irrelevant to the arithmetic: 2 ranks then 1 process equal 1 process
    whole = settings(tmp_path, "whole", backend="mlx", epochs=2, stop_after_steps=None, eval_every=5, lr=0.05)
    train(whole, progress=Quiet())
    parts = settings(tmp_path, "parts", backend="mlx", epochs=2, stop_after_steps=2, eval_every=5, lr=0.05,
                     sync_bn=True)
    launch.local_training(parts, 2, resume=False)
    resumed = train(settings(tmp_path, "parts", backend="mlx", epochs=2, stop_after_steps=4, eval_every=5, lr=0.05),
                    resume=True, progress=Quiet())
    assert resumed["steps_done"] == 4
    finished = launch.local_training(settings(tmp_path, "parts", backend="mlx", epochs=2, stop_after_steps=None,
                                                eval_every=5, lr=0.05, sync_bn=True), 2, resume=True)
    assert finished["finished"] and finished["steps_done"] == 6
    a, _ = load_checkpoint(tmp_path / "whole" / "last.safetensors")
    b, _ = load_checkpoint(tmp_path / "parts" / "last.safetensors")
    error = relative_error(b, {name: value.astype(np.float64) for name, value in a.items()})
    print(f"resumed across process counts vs one process: {error:.2e}")
    assert error < TOLERANCE
    lines = (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]  # one writer, one line per epoch


def _children(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return [int(child) for task in tasks for child in (task / "children").read_text().split()]
    except OSError:
        return []


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    values = dict(entry.split(b"=", 1) for entry in environ if b"=" in entry)
    rank = values.get(b"MLX_RANK", values.get(b"RANK"))
    return None if rank is None else int(rank)


def start_local_run(tmp_path, *extra) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "portres.cli", "train", "--spec", str(tmp_path / "tiny.json"), "--data",
               "digits", "--backend", "mlx", "--epochs", "500", "--batch-size", "16", "--limit-train", "48",
               "--lr", "0.05", "--checkpoint-every", "1", "--out", str(out), "--processes", "2", *extra]
    (tmp_path / "tiny.json").write_text(TINY.to_json())
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), out


def wait_for_rank(parent: subprocess.Popen, rank: int, out: Path) -> int:
    deadline = time.monotonic() + 300  # hang detection, not timing: a generous limit on waiting for the ranks
    while time.monotonic() < deadline:
        ranks = {_rank_of(pid): pid for pid in _children(parent.pid)}
        if rank in ranks and (out / "last.safetensors").exists():
            return ranks[rank]
        assert parent.poll() is None, parent.communicate()
        time.sleep(0.2)
    raise AssertionError("the ranks never wrote a checkpoint")


@needs["mlx"]
@pytest.mark.slow
def test_a_killed_rank_stops_the_run_with_a_clear_error(tmp_path):
    parent, out = start_local_run(tmp_path)
    victim = wait_for_rank(parent, 1, out)
    time.sleep(1.0)  # a few more steps and checkpoints
    os.kill(victim, signal.SIGKILL)
    # hang detection, not timing (no test asserts a duration): the launcher must end the run by itself; the
    # generous timeout only keeps a launcher that never would from hanging the suite
    _, stderr = parent.communicate(timeout=300)
    assert parent.returncode == 2
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("portres: error: rank 1 was killed by SIGKILL") and "--resume" in last, stderr
    assert "rank 0: lost contact with the other ranks during" in stderr
    state, description = load_checkpoint(out / "last.safetensors")  # intact, and finite
    assert description["position"]["step"] >= 1 and all(np.isfinite(v).all() for v in state.values())
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]


@needs["mlx"]
@pytest.mark.slow
def test_a_hung_rank_is_given_up_on_after_the_timeout(tmp_path):
    parent, out = start_local_run(tmp_path, "--timeout", "4")
    victim = wait_for_rank(parent, 1, out)
    os.kill(victim, signal.SIGSTOP)  # alive, holding its sockets open, answering nothing
    try:
        _, stderr = parent.communicate(timeout=60)
    finally:
        with pytest.raises(ProcessLookupError):  # the launcher ended it too
            os.kill(victim, signal.SIGCONT)
    assert parent.returncode == 2
    assert "portres: error: rank 0: waited 4 s for the other ranks during " in stderr, stderr
    load_checkpoint(out / "last.safetensors")


def _rank_environment(rank: int, hostfile: Path) -> dict:
    environment = {key: value for key, value in os.environ.items() if key not in parallel.LAUNCHER_VARIABLES}
    return {**environment, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}


@needs["mlx"]
def test_ranks_started_with_different_seeds_refuse_to_train(tmp_path):
    # what mlx.launch does, by hand: a hostfile and MLX_RANK, and here one rank with another seed
    ports = launch.choose_ports(2)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in ports]))
    (tmp_path / "tiny.json").write_text(TINY.to_json())
    ranks = [subprocess.Popen([sys.executable, "-m", "portres.cli", "train", "--spec", str(tmp_path / "tiny.json"),
                               "--backend", "mlx", "--batch-size", "16", "--limit-train", "48", "--out",
                               str(tmp_path / "run"), "--distributed", "--seed", str(rank), "--timeout", "60"],
                              env=_rank_environment(rank, hostfile), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in range(2)]
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [2, 2], outputs
    for _, stderr in outputs:
        assert stderr.strip().splitlines()[-1] == (
            "portres: error: rank 1 was started with another seed than rank 0: start every rank with the same "
            "command (same network, --seed and settings, the same portres version)"), stderr
    assert not (tmp_path / "run" / "last.safetensors").exists()


@needs["mlx"]
def test_a_port_in_use_is_one_line_with_the_fix(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = CliRunner().invoke(main, ["train", "--arch", "resnet20", "--backend", "mlx", "--processes", "2",
                                           "--port", str(port), "--out", str(tmp_path / "run")])
        assert result.exit_code == 2
        assert f"port {port} on 127.0.0.1 is in use" in result.output and "--port" in result.output
        assert result.output.strip().count("\n") == 0, result.output
        # under a launcher the rank itself finds its address taken
        hostfile = tmp_path / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], ["127.0.0.1:1"]]))
        rank = subprocess.run([sys.executable, "-m", "portres.cli", "train", "--arch", "resnet20", "--backend", "mlx",
                               "--distributed", "--out", str(tmp_path / "run")], env=_rank_environment(0, hostfile),
                              capture_output=True, text=True, timeout=120)
    assert rank.returncode == 2
    assert rank.stderr.strip().splitlines()[-1].startswith(
        f"portres: error: rank 0 cannot listen on 127.0.0.1:{port}: the port is in use"), rank.stderr


# -- tinygrad: two devices in one process -------------------------------------------------------------


@needs["tinygrad"]
@pytest.mark.slow  # tinygrad compiles the step's kernels for each configuration: minutes on 2 cores
@pytest.mark.parametrize("sync_bn", [False, True], ids=["per-replica-bn", "sync-bn"])
def test_tinygrad_devices_match_the_reference(tmp_path, sync_bn):
    config = settings(tmp_path, backend="tinygrad", devices=("CPU:0", "CPU:1"), sync_bn=sync_bn)
    summary = train(config, progress=Quiet())
    check_replicas_identical(summary, 2)
    check_against_reference(config, summary, shards=1 if sync_bn else 2)


# -- portres bench --train --processes ----------------------------------------------------------------


@needs["mlx"]
def test_bench_times_data_parallel_training_per_rank_and_in_all(tmp_path):
    (tmp_path / "tiny.json").write_text(TINY.to_json())
    result = CliRunner().invoke(main, ["bench", "--train", "--processes", "1,2", "--backend", "mlx", "--spec",
                                       str(tmp_path / "tiny.json"), "--input-size", "16", "--batch", "4", "--iters",
                                       "2", "--warmup", "1", "--json"])
    assert result.exit_code == 0, result.output
    one, two = [json.loads(line) for line in result.stdout.splitlines()]
    assert "processes" not in one and one["batch"] == 4
    assert two["processes"] == 2 and two["batch_per_rank"] == 4 and len(two["step_median_s_per_rank"]) == 2
    assert two["images_per_s"] == pytest.approx(2 * two["images_per_s_per_rank"])
    counts = portres.summary(TINY, input_size=16)
    assert two["all_reduce_bytes"] == 4 * (counts.params + counts.buffers)  # every gradient and BN statistic
    assert two["all_reduce_median_s"] > 0


@pytest.mark.parametrize("args, message", [
    (["--processes", "2"], "--processes times data-parallel training: add --train"),
    (["--train", "--processes", "2", "--backend", "tinygrad"], "tinygrad replicates over devices in one process"),
    (["--train", "--processes", "0"], "process counts are positive integers"),
])
def test_bench_refuses_processes_it_cannot_time(args, message):
    result = CliRunner().invoke(main, ["bench", "--depth", "20", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.strip().count("\n") == 0, result.output


# -- launchers, settings and bad input (no framework needed) ------------------------------------------


def test_local_ranks_are_stopped_when_one_dies_and_the_others_would_wait_forever():
    # rank 1 dies at once; rank 0 would sleep for an hour: the launcher stops it after the grace period.
    # Hang detection, not timing (no test asserts a duration): the launcher runs in a subprocess whose
    # generous timeout is the only limit, and a launcher that never stops rank 0 fails the test there.
    rank = ("import os, signal, time\n"
            "if os.environ['MLX_RANK'] == '1':\n    os.kill(os.getpid(), signal.SIGKILL)\n"
            "time.sleep(3600)\n")
    launcher = ("import sys\nfrom portres.training import launch\nfrom portres.training import replicas as parallel\n"
                "try:\n    launch.run_local([sys.executable, '-c', sys.argv[1]], 2, 'mlx', grace_s=1.0,\n"
                "                       hint='; the end')\n"
                "except parallel.DistributedError as error:\n    print(error)\n")
    process = subprocess.Popen([sys.executable, "-c", launcher, rank], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and any rank it left behind
        process.communicate()
        pytest.fail("the launcher never stopped rank 0 after rank 1 died")
    assert process.returncode == 0, stderr
    assert stdout.strip() == "rank 1 was killed by SIGKILL; the end", (stdout, stderr)


def test_a_rank_that_fails_says_why_through_the_launcher():
    code = ("import os, sys\n"
            "if os.environ['MLX_RANK'] == '1':\n"
            "    sys.exit(print('portres: error: rank 1 has no data set here', file=sys.stderr) or 2)\n")
    with pytest.raises(parallel.DistributedError, match="^rank 1 exited with status 2: rank 1 has no data set here$"):
        launch.run_local([sys.executable, "-c", code], 2, "mlx", grace_s=1.0)
    rank_zero = "import os, sys; sys.exit(2 if os.environ['MLX_RANK'] == '0' else 0)"
    with pytest.raises(parallel.AlreadyReported):  # rank 0 prints its own line: nothing to add
        launch.run_local([sys.executable, "-c", rank_zero], 2, "mlx", grace_s=1.0)


def test_launchers_are_recognised_by_their_environment(tmp_path):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([["10.0.0.1:5000"], ["10.0.0.2:5000"], ["10.0.0.3:5000"]]))
    ring = parallel.detect_launcher({"MLX_RANK": "2", "MLX_HOSTFILE": str(hostfile)})
    assert (ring.name, ring.engine, ring.rank, ring.world, ring.address) == ("mlx.launch (ring)", "mlx", 2, 3,
                                                                           "10.0.0.3:5000")
    assert parallel.detect_launcher({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4"}) == \
        parallel.Launcher("mpirun", "mlx", 1, 4)
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert parallel.detect_launcher(torchrun) == parallel.Launcher("torchrun", "torch", 1, 2)
    assert parallel.detect_launcher({"HOME": "/root"}) is None


@pytest.mark.parametrize("batch_size, replicas, sync_bn, message", [
    (64, 3, False, "--batch-size 64 does not divide among 3 replicas: use a multiple of 3 (e.g. 63 or 66)"),
    (2, 2, False, "leaves 1 image per replica; batch norm needs at least 2 per replica: raise it to 4 or add "
                  "--sync-bn"),
])
def test_batches_must_divide_among_the_replicas(batch_size, replicas, sync_bn, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parallel.check_batch(batch_size, replicas, sync_bn)
    parallel.check_batch(batch_size * replicas * 2, replicas, sync_bn)


def test_ports_are_distinct_and_a_busy_one_is_named():
    ports = launch.choose_ports(4)
    assert len(set(ports)) == 4
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        with pytest.raises(ValueError, match=f"port {port} on 127.0.0.1 is in use"):
            launch.choose_ports(2, port)


def test_local_ranks_get_the_environment_a_launcher_sets(tmp_path):
    mlx = launch.rank_environments("mlx", 2, [4001, 4002], tmp_path)
    assert [(env["MLX_RANK"], env["MLX_HOSTFILE"]) for env in mlx] == [(str(rank), str(tmp_path / "hostfile.json"))
                                                                        for rank in range(2)]
    assert json.loads((tmp_path / "hostfile.json").read_text()) == [["127.0.0.1:4001"], ["127.0.0.1:4002"]]
    torch = launch.rank_environments("torch", 2, [4001], tmp_path)
    assert [(env["RANK"], env["WORLD_SIZE"], env["MASTER_PORT"]) for env in torch] == [("0", "2", "4001"),
                                                                                      ("1", "2", "4001")]
    assert all(parallel.detect_launcher(env).name == "portres --processes" for env in mlx + torch)


@pytest.mark.parametrize("args, message", [
    (["--backend", "mlx", "--processes", "2", "--batch-size", "63"],
     "--batch-size 63 does not divide among 2 replicas: use a multiple of 2 (e.g. 62 or 64)"),
    (["--backend", "mlx", "--distributed"], "--distributed found no launcher's environment"),
    (["--backend", "numpy", "--processes", "2"], "the numpy backend does not run ranks in several processes"),
    (["--backend", "tinygrad", "--processes", "2"], "tinygrad replicates over devices in one process: --devices"),
    (["--backend", "mlx", "--devices", "cpu,gpu"], "--devices runs tinygrad's multi-device tensors in one process"),
    (["--backend", "tinygrad", "--devices", "CPU:0,CPU:0"], "--devices lists a device twice"),
    (["--backend", "mlx", "--sync-bn"], "--sync-bn synchronises batch statistics across replicas: add"),
    (["--backend", "mlx", "--processes", "2", "--distributed"], "--distributed and --processes exclude each other"),
    (["--backend", "mlx", "--port", "4000"], "--port chooses the loopback ports of --processes N"),
])
def test_bad_data_parallel_settings_are_one_line_with_status_2(tmp_path, args, message):
    if args[1] != "numpy" and args[1] not in HAS:
        pytest.skip(f"{args[1]} is not installed")
    result = CliRunner().invoke(main, ["train", "--arch", "resnet20", "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.strip().count("\n") == 0, result.output


def test_a_launcher_without_distributed_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ValueError, match="started by torchrun \\(rank 1\\) but without --distributed"):
        train(settings(tmp_path, backend="numpy"), progress=Quiet())
