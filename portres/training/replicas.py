"""Data-parallel replicas: the group a training run takes part in, and what its ranks agree on.

Three ways to run N replicas of one training run, each on an engine a backend already ships:

- ``--distributed``: this process is one rank of a group a launcher started - ``mlx.launch`` (MLX's
  ring over TCP; also its MPI, NCCL and JACCL backends), ``mpirun`` (MLX over MPI) or ``torchrun``
  (``torch.distributed``: gloo on CPUs, NCCL on GPUs). Rank and world come from the launcher's
  environment (:func:`detect_launcher`).
- ``--processes N``: portres starts N ranks on this machine itself, on the loopback interface, with
  the environment ``mlx.launch`` or ``torchrun`` would set (:mod:`portres.training.launch`).
- ``--devices CPU:0,CPU:1``: tinygrad's multi-device tensors in one process (batch sharded along
  its first axis, parameters replicated; tinygrad reduces the gradients itself).

Every replica trains on its slice of each global batch (``batch_size`` images, which must divide
among the replicas); between the gradients and the optimiser the train step calls the backend's
``all_reduce_mean`` on the gradients and the BN running statistics, so every replica applies the
same update and holds identical weights after every step. Batch statistics are the replica's own
(as torch DDP) unless ``sync_bn`` asks for the global batch's.

Only rank 0 writes (metrics, checkpoints, plots, summary); it also decides the starting state
(fresh or resumed from its checkpoint) and sends it to the other ranks, so ranks on other machines
need no copy of the output directory, and a run resumes with any number of processes. At start the
ranks compare hashes of their settings (a rank started with another seed or network is refused),
and a watchdog stops a rank that waits on its peers longer than ``timeout_s``.

    >>> group = join("mlx", distributed=True)     # this rank's group (under mlx.launch), or Replicas()
    >>> lowering = group.wrap(lowering, sync_bn=False)   # the backend with all_reduce_mean
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .. import backends

LAUNCHER_VARIABLES = ("MLX_RANK", "MLX_HOSTFILE", "MLX_WORLD_SIZE", "MLX_JACCL_COORDINATOR", "MLX_IBV_DEVICES",
                      "NCCL_HOST_IP", "NCCL_PORT", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK",
                      "PMI_SIZE", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT", "PORTRES_LAUNCHER")
PROCESS_BACKENDS = ("mlx", "torch")  # backends whose framework runs one rank per process
DEVICE_BACKENDS = ("tinygrad",)  # backends whose framework runs several devices in one process
DEFAULT_TIMEOUT_S = 300.0  # how long a rank waits on its peers before it gives up


class DistributedError(RuntimeError):
    """Replicas that cannot start or go on: a missing launcher, ranks that disagree, a lost peer."""


class AlreadyReported(DistributedError):
    """A local run failed and its rank 0 has already printed why (one line): nothing to add."""


def engine_message(error: BaseException) -> str:
    """The telling part of a framework's error: its last line, without gloo's advice paragraph."""
    lines = str(error).strip().splitlines()
    return lines[-1].split(" This is typically caused")[0] if lines else type(error).__name__


# -- who this process is ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Launcher:
    """What started this process, as its environment says."""

    name: str  # e.g. "mlx.launch (ring)", "mpirun", "torchrun", "portres --processes"
    engine: str  # the framework family it starts ranks for: "mlx" or "torch"
    rank: int  # this process's rank
    world: int | None  # number of processes, when the environment says
    address: str | None = None  # this rank's own host:port, when it listens on one (ring)


def detect_launcher(environ=None) -> Launcher | None:
    """The launcher that started this process, from the variables it set; None when none did.

        >>> detect_launcher({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
        Launcher(name='torchrun', engine='torch', rank=1, world=2, address=None)
    """
    env = os.environ if environ is None else environ
    ours = env.get("PORTRES_LAUNCHER")

    def number(name):
        try:
            return int(env[name])
        except (KeyError, ValueError):
            return None

    if "MLX_RANK" in env and "MLX_HOSTFILE" in env:
        world, address = None, None
        with contextlib.suppress(OSError, ValueError, TypeError, IndexError):
            hosts = json.loads(Path(env["MLX_HOSTFILE"]).read_text())
            world = len(hosts)
            address = hosts[number("MLX_RANK")][0]
        return Launcher(ours or "mlx.launch (ring)", "mlx", number("MLX_RANK") or 0, world, address)
    if "MLX_RANK" in env and "MLX_JACCL_COORDINATOR" in env:
        return Launcher("mlx.launch (jaccl)", "mlx", number("MLX_RANK") or 0, None)
    if "MLX_RANK" in env and "MLX_WORLD_SIZE" in env:
        return Launcher("mlx.launch (nccl)", "mlx", number("MLX_RANK") or 0, number("MLX_WORLD_SIZE"))
    if "OMPI_COMM_WORLD_RANK" in env:
        return Launcher("mpirun", "mlx", number("OMPI_COMM_WORLD_RANK") or 0, number("OMPI_COMM_WORLD_SIZE"))
    if "PMI_RANK" in env:
        return Launcher("mpirun", "mlx", number("PMI_RANK") or 0, number("PMI_SIZE"))
    if "RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env:
        return Launcher(ours or "torchrun", "torch", number("RANK") or 0, number("WORLD_SIZE"))
    return None


def missing_launcher_message(backend: str) -> str:
    """How to start ranks of ``backend`` when ``--distributed`` finds no launcher."""
    start = {"mlx": "mlx.launch -n 2 -- $(which python) -m portres.cli train ... --distributed",
             "torch": "torchrun --nproc-per-node 2 -m portres.cli train ... --distributed"}.get(backend)
    how = f"start every rank with a launcher ({start}), or" if start else "run"
    return (f"--distributed found no launcher's environment (mlx.launch sets MLX_RANK and MLX_HOSTFILE, mpirun "
            f"OMPI_COMM_WORLD_RANK, torchrun RANK and WORLD_SIZE): {how} let portres start local ranks with "
            "--processes 2")


def check_parallel_settings(backend: str, *, distributed: bool = False, processes: int | None = None,
                            devices: tuple[str, ...] | None = None, device: str | None = None,
                            sync_bn: bool = False) -> None:
    """Refuse combinations of the data-parallel settings that cannot work, saying what to use instead."""
    ways = [name for name, given in (("--distributed", distributed), ("--processes", processes is not None),
                                     ("--devices", devices is not None)) if given]
    if len(ways) > 1:
        raise ValueError(f"{' and '.join(ways)} exclude each other: --distributed under a launcher, --processes N "
                         "to start local ranks, --devices for tinygrad's devices in one process")
    if sync_bn and not ways:
        raise ValueError("--sync-bn synchronises batch statistics across replicas: add --processes N, "
                         "--distributed or --devices")
    if (distributed or processes is not None) and backend not in PROCESS_BACKENDS:
        alternative = "; tinygrad replicates over devices in one process: --devices CPU:0,CPU:1" \
            if backend in DEVICE_BACKENDS else ""
        raise ValueError(f"the {backend} backend does not run ranks in several processes (mlx and torch do)"
                         f"{alternative}")
    if devices is not None:
        if backend not in DEVICE_BACKENDS:
            raise ValueError(f"--devices runs tinygrad's multi-device tensors in one process; {backend} runs one "
                             "device per process: use --processes N (or a launcher with --distributed)")
        if device is not None:
            raise ValueError("give --device (one device) or --devices (replicas), not both")
        if len(devices) < 1 or any(not d for d in devices):
            raise ValueError(f"--devices needs a comma-separated list of devices, e.g. CPU:0,CPU:1, not {devices!r}")
        if len(set(d.upper() for d in devices)) != len(devices):
            raise ValueError(f"--devices lists a device twice ({','.join(devices)}): each replica needs its own, "
                             "e.g. CPU:0,CPU:1")


def check_batch(batch_size: int, replicas: int, sync_bn: bool) -> None:
    """The global batch must divide among the replicas, and each replica's BN needs two images."""
    if batch_size % replicas:
        lower, upper = batch_size // replicas * replicas, -(-batch_size // replicas) * replicas
        raise ValueError(f"--batch-size {batch_size} does not divide among {replicas} replicas: use a multiple of "
                         f"{replicas} (e.g. {lower or upper} or {upper}); it is the global batch")
    if batch_size // replicas < 2 and not sync_bn:
        raise ValueError(f"--batch-size {batch_size} leaves {batch_size // replicas} image per replica; batch norm "
                         f"needs at least 2 per replica: raise it to {2 * replicas} or add --sync-bn")


# -- the replicas a training run uses ------------------------------------------------------------


def portres_version() -> str:
    try:
        return importlib.metadata.version("portres")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class Replicas:
    """One process, one replica: what training does without data parallelism (every hook a no-op)."""

    rank = 0  # this process's rank
    processes = 1  # processes taking part
    replicas = 1  # data-parallel replicas in all (processes x replicas per process)
    description = "1 replica"

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes metrics, checkpoints, plots and the summary."""
        return self.rank == 0

    def local_device(self, device: str | None) -> str | None:
        return device

    def wrap(self, lowering, sync_bn: bool):
        """The backend variant a replica trains with (with ``all_reduce_mean`` when there are several)."""
        return lowering

    def local_rows(self, count: int) -> slice:
        """This process's share of ``count`` rows (a global batch, a test set): contiguous, in rank order."""
        return slice(count * self.rank // self.processes, count * (self.rank + 1) // self.processes)

    def sum_host(self, values) -> np.ndarray:
        """Element-wise sum over the processes of a small float64 vector (metrics, counts)."""
        return np.asarray(values, np.float64)

    def share_from_writer(self, make):
        """``make()`` run on rank 0 - ``(arrays, info)``: NumPy arrays and JSON - and the same on every rank.
        An error raised by ``make`` (a checkpoint that does not fit) is raised on every rank."""
        return make()

    def agree(self, fields: dict) -> None:
        """Check that every rank runs with the same ``fields`` (each JSON-able)."""

    def collective(self, activity: str, hint=None):
        """Context for a phase in which ranks wait on each other (``activity`` names it in messages)."""
        return contextlib.nullcontext()

    def replica_hashes(self, lowering, state: dict) -> list[str]:
        """SHA-256 of every replica's copy of ``state`` (all equal when training is consistent)."""
        return lowering.replica_hashes(state)

    def close(self) -> None:
        pass


class DeviceReplicas(Replicas):
    """tinygrad's devices in one process: the batch sharded along its first axis, parameters replicated."""

    def __init__(self, devices: tuple[str, ...]):
        self.devices = tuple(devices)
        self.replicas = len(self.devices)
        self.description = f"{self.replicas} replicas on {','.join(self.devices)} (one process)"

    def wrap(self, lowering, sync_bn: bool):
        return lowering.data_parallel(self.devices, sync_bn=sync_bn)


class Watchdog:
    """Stops this process when it has waited on its peers for ``timeout_s``: a rank that hung (or was
    stopped, or whose machine went away) would otherwise hold every other rank forever. Armed only while
    the ranks wait on each other (``arm``/``disarm``); on expiry it prints one line and exits with 2."""

    def __init__(self, rank: int, timeout_s: float):
        self.rank, self.timeout_s = rank, timeout_s
        self._lock = threading.Lock()
        self._armed: tuple[float, str, object] | None = None  # (since, activity, hint)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="portres-watchdog", daemon=True)
        self._thread.start()

    def arm(self, activity: str, hint=None) -> None:
        with self._lock:
            self._armed = (time.monotonic(), activity, hint)

    def disarm(self) -> None:
        with self._lock:
            self._armed = None

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(min(1.0, self.timeout_s / 4)):
            with self._lock:
                armed = self._armed
            if armed is None or time.monotonic() - armed[0] < self.timeout_s:
                continue
            _, activity, hint = armed
            extra = hint() if callable(hint) else (hint or "")
            sys.stdout.flush()
            sys.stderr.write(f"portres: error: rank {self.rank}: waited {self.timeout_s:.0f} s for the other ranks "
                             f"during {activity}: a rank hung, was stopped or cannot be reached{extra}; raise "
                             "--timeout if its steps legitimately take longer\n")
            sys.stderr.flush()
            os._exit(2)  # the main thread is blocked inside the framework's collective: nothing else can stop it


class ProcessReplicas(Replicas):
    """This process as one rank of a group a launcher started, on its framework's engine (the backend's
    ``ProcessGroup``), with a watchdog."""

    def __init__(self, backend: str, launcher: Launcher, timeout_s: float, device: str | None = None):
        self.launcher, self.timeout_s = launcher, timeout_s
        self.rank = launcher.rank
        self.watchdog = Watchdog(launcher.rank, timeout_s)
        world = f" of {launcher.world}" if launcher.world else ""
        self.watchdog.arm(f"start-up (rank {launcher.rank}{world} connecting to the others under {launcher.name})")
        try:
            self.engine = backends.load(backend, device).ProcessGroup(launcher, timeout_s=timeout_s, device=device)
        except Exception:
            self.watchdog.stop()
            raise
        self.watchdog.disarm()
        if launcher.world is not None and self.engine.size != launcher.world:
            raise DistributedError(f"{launcher.name} started {launcher.world} ranks but {self.engine.size} joined")
        self.rank, self.processes = self.engine.rank, self.engine.size
        self.replicas = self.processes
        self.description = f"{self.processes} processes ({self.engine.name}, started by {launcher.name})"

    def local_device(self, device: str | None) -> str | None:
        return self.engine.local_device(device)

    def wrap(self, lowering, sync_bn: bool):
        return lowering.data_parallel(self.engine, sync_bn=sync_bn)

    def sum_host(self, values) -> np.ndarray:
        return self.engine.sum_host(np.asarray(values, np.float64))

    def _broadcast_bytes(self, payload: bytes | None) -> bytes:
        size = int(self.sum_host([len(payload) if self.rank == 0 else 0])[0])
        buffer = np.frombuffer(payload, np.uint8) if self.rank == 0 else np.zeros(size, np.uint8)
        return self.engine.broadcast(np.ascontiguousarray(buffer)).tobytes()

    def share_from_writer(self, make):
        with self.collective("start-up (rank 0 sends the starting state)"):
            arrays, info = {}, None
            if self.rank == 0:
                try:
                    arrays, info = make()
                except Exception as error:  # every rank must stop at once, with rank 0's reason, not time out
                    reason = str(error) if isinstance(error, (ValueError, OSError)) \
                        else f"{type(error).__name__}: {error}"
                    self._broadcast_bytes(json.dumps({"error": reason}).encode())
                    raise
            header = {"info": info, "arrays": [[name, value.dtype.str, list(value.shape)]
                                               for name, value in arrays.items()]} if self.rank == 0 else None
            header = json.loads(self._broadcast_bytes(json.dumps(header).encode() if self.rank == 0 else None))
            if "error" in header:
                raise DistributedError(f"rank 0 could not start: {header['error']}")
            payload = b"".join(np.ascontiguousarray(value).tobytes() for value in arrays.values()) \
                if self.rank == 0 else None
            data, offset, shared = self._broadcast_bytes(payload), 0, {}
            for name, dtype, shape in header["arrays"]:
                size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
                shared[name] = np.frombuffer(data, dtype, count=size // np.dtype(dtype).itemsize,
                                             offset=offset).reshape(shape).copy()
                offset += size
            return (arrays, info) if self.rank == 0 else (shared, header["info"])

    def _gather_hashes(self, digests: list[bytes]) -> np.ndarray:
        """Every rank's ``digests`` (equal-length byte strings): an array (processes, len(digests), bytes)."""
        width = len(digests[0])
        table = np.zeros((self.processes, len(digests), width), np.float64)
        table[self.rank] = np.frombuffer(b"".join(digests), np.uint8).reshape(len(digests), width)
        return self.sum_host(table.reshape(-1)).reshape(table.shape)

    def agree(self, fields: dict) -> None:
        names = sorted(fields)
        digests = [hashlib.sha256(json.dumps(fields[name], sort_keys=True).encode()).digest()[:8] for name in names]
        with self.collective("start-up (comparing the ranks' settings)"):
            table = self._gather_hashes(digests)
        for rank in range(1, self.processes):
            differing = [name for index, name in enumerate(names) if not np.array_equal(table[rank, index],
                                                                                         table[0, index])]
            if differing:
                raise DistributedError(f"rank {rank} was started with another {' and '.join(differing)} than rank 0: "
                                       "start every rank with the same command (same network, --seed and "
                                       "settings, the same portres version)")

    @contextlib.contextmanager
    def collective(self, activity: str, hint=None):
        self.watchdog.arm(activity, hint)
        try:
            yield
        except DistributedError:
            raise
        except Exception as error:
            if not self.engine.lost_peer(error):
                raise
            extra = hint() if callable(hint) else (hint or "")
            raise DistributedError(f"rank {self.rank}: lost contact with the other ranks during {activity} "
                                   f"({engine_message(error)}): a rank stopped or was killed{extra}") from None
        finally:
            self.watchdog.disarm()

    def replica_hashes(self, lowering, state: dict) -> list[str]:
        mine = super().replica_hashes(lowering, state)[0]
        with self.collective("the final comparison of the replicas"):
            table = self._gather_hashes([bytes.fromhex(mine)])
        return [bytes(row[0].astype(np.uint8)).hex() for row in table]

    def close(self) -> None:
        self.watchdog.stop()
        self.engine.close()


def join(backend: str, *, distributed: bool = False, devices: tuple[str, ...] | None = None,
         device: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Replicas:
    """The replicas this process takes part in: one (the default), tinygrad's ``devices``, or - with
    ``distributed`` - this rank of the group a launcher started (connecting to the other ranks here).

        >>> join("tinygrad", devices=("CPU:0", "CPU:1")).replicas
        2
    """
    if devices is not None:
        return DeviceReplicas(devices)
    launcher = detect_launcher()
    if not distributed:
        if launcher is not None:
            raise ValueError(f"this process was started by {launcher.name} (rank {launcher.rank}) but without "
                             "--distributed: add --distributed, or every rank would train alone into the same --out")
        return Replicas()
    if launcher is None:
        raise DistributedError(missing_launcher_message(backend))
    if launcher.engine != backend:
        starters = {"mlx": "mlx.launch or mpirun", "torch": "torchrun"}
        raise DistributedError(f"{launcher.name} started this rank, but the {backend} backend's ranks are started by "
                               f"{starters.get(backend, 'a launcher')} (or portres --processes N)")
    return ProcessReplicas(backend, launcher, timeout_s, device)
