"""Data-parallel training on the frameworks' own engines, around one extra step of the train step.

Three ways to run N replicas of one training run, each on an engine a backend already ships:

- ``--distributed``: this process is one rank of a group a launcher started - ``mlx.launch`` (MLX's
  ring over TCP; also its MPI, NCCL and JACCL backends), ``mpirun`` (MLX over MPI) or ``torchrun``
  (``torch.distributed``: gloo on CPUs, NCCL on GPUs). Rank and world come from the launcher's
  environment (:func:`detect_launcher`).
- ``--processes N``: portres starts N ranks on this machine itself, on the loopback interface, with
  the environment ``mlx.launch`` or ``torchrun`` would set (:func:`run_local`).
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
import ctypes
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

# Variables launchers set. A child of `portres train --processes` must not inherit its parent's.
LAUNCHER_VARIABLES = ("MLX_RANK", "MLX_HOSTFILE", "MLX_WORLD_SIZE", "MLX_JACCL_COORDINATOR", "MLX_IBV_DEVICES",
                      "NCCL_HOST_IP", "NCCL_PORT", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK",
                      "PMI_SIZE", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT", "PORTRES_LAUNCHER")
PROCESS_BACKENDS = ("mlx", "torch")  # backends whose framework runs one rank per process
DEVICE_BACKENDS = ("tinygrad",)  # backends whose framework runs several devices in one process
DEFAULT_TIMEOUT_S = 300.0  # how long a rank waits on its peers before it gives up
LOOPBACK = "127.0.0.1"


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


def state_sha256(state: dict[str, np.ndarray]) -> str:
    """One hash of a whole state (names, dtypes, shapes and bytes), to compare replicas bit for bit."""
    digest = hashlib.sha256()
    for name in sorted(state):
        value = np.ascontiguousarray(state[name])
        digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


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
        """``state_sha256`` of every replica's copy of the state (all equal when training is consistent)."""
        hashes = getattr(lowering, "replica_hashes", None)
        return hashes(state) if hashes else [state_sha256({n: lowering.to_numpy(v) for n, v in state.items()})]

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
        from .. import backends

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


# -- starting local ranks (--processes N) ---------------------------------------------------------


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _port_in_use(port: int, first: int | None, count: int) -> str:
    if first is not None:
        fix = (f"pick another --port (ranks use {first}-{first + count - 1}), or leave --port out and portres "
               "picks free ones")
    else:
        fix = "run again (portres picks other free ports), or choose them with --port"
    return f"port {port} on {LOOPBACK} is in use (another program, or a run that has not ended): {fix}"


def choose_ports(count: int, first: int | None = None) -> list[int]:
    """``count`` ports on the loopback interface: ``first, first + 1, ...`` when given (checked free), else
    ports the OS reports free."""
    if first is not None:
        ports = list(range(first, first + count))
        if ports[-1] > 65535:
            raise ValueError(f"--port {first} leaves no room for {count} ranks below 65536: pick a lower one")
        busy = [port for port in ports if not port_is_free(port)]
        if busy:
            raise ValueError(_port_in_use(busy[0], first, count))
        return ports
    probes = []
    try:
        for _ in range(count):  # held open together, so the OS hands out distinct ports
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probe.bind((LOOPBACK, 0))
            probes.append(probe)
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def hold_ports(ports: list[int], backend: str, first: int | None = None) -> list[socket.socket]:
    """The ranks' ports, bound on loopback by this process from now until the ranks end; raises ValueError
    naming a port another program holds.

    A port chosen free can be taken before the rank binds it; worse, MLX's ring binds with SO_REUSEPORT, so a
    program holding the port with SO_REUSEPORT too is not refused but shares it: the kernel hands it some of
    the connections meant for a rank, and the run waits out --timeout. So each port is checked without SO_REUSEPORT (any
    holder refuses that) and then kept bound: MLX ranks bind beside the held socket (SO_REUSEPORT, same user
    only; it never listens, so it takes no connection), torch's store listens on the held socket itself."""
    held: list[socket.socket] = []
    try:
        for port in ports:
            if not port_is_free(port):
                raise ValueError(_port_in_use(port, first, len(ports)))
            hold = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(hold)
            if backend == "mlx" and hasattr(socket, "SO_REUSEPORT"):
                hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                hold.bind((LOOPBACK, port))
            except OSError:  # taken between the check and the bind
                raise ValueError(_port_in_use(port, first, len(ports))) from None
    except BaseException:
        for hold in held:
            hold.close()
        raise
    return held


def torch_store(listener: socket.socket, processes: int):
    """torch.distributed's rendezvous store for local ranks, served by this process on ``listener`` (bound to
    loopback). Left to torch, rank 0 would serve it (env://) on every interface - TCPStore binds the wildcard
    address whatever MASTER_ADDR says - where any host that reaches this one could join the group or write
    its keys. The ranks connect as clients, as they do under torchrun's agent (TORCHELASTIC_USE_AGENT_STORE)."""
    import torch
    import torch.distributed as dist

    # the libuv store serves a given listening socket from torch 2.8 on; before, only the classic one does
    classic = {"use_libuv": False} if torch.__version__ < (2, 8) else {}
    try:
        listener.listen()
        store = dist.TCPStore(LOOPBACK, listener.getsockname()[1], processes, True, wait_for_workers=False,
                              master_listen_fd=listener.fileno(), **classic)
    except BaseException:
        listener.close()
        raise
    listener.detach()  # the store owns the descriptor now and closes it
    return store


def loopback_interface() -> str:
    """The loopback interface's name (Linux ``lo``, macOS ``lo0``), for gloo's GLOO_SOCKET_IFNAME."""
    names = {name for _, name in socket.if_nameindex()} if hasattr(socket, "if_nameindex") else set()
    return next((name for name in ("lo", "lo0") if name in names), "lo")


def rank_environments(backend: str, processes: int, ports: list[int], workdir: Path) -> list[dict]:
    """The environment of each local rank: what ``mlx.launch`` (ring: a hostfile, MLX_RANK) or ``torchrun``
    (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK) would set, and one core share each for the BLAS.

    Every rank listens on loopback only: the ring binds the hostfile's 127.0.0.1 addresses; torch ranks use
    the store :func:`torch_store` serves on ``ports[0]`` (TORCHELASTIC_USE_AGENT_STORE: no rank serves one),
    and gloo binds its pairs' sockets to the loopback interface (GLOO_SOCKET_IFNAME; by default it takes
    the address the host name resolves to, often one every host on the network can reach)."""
    base = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    base["PORTRES_LAUNCHER"] = "portres --processes"
    threads = str(max(1, len(_cores()) // processes))
    if backend == "mlx":
        hostfile = workdir / "hostfile.json"  # the ring backend's format: one list of addresses per rank
        hostfile.write_text(json.dumps([[f"{LOOPBACK}:{port}"] for port in ports]))
        return [{**base, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(rank)} for rank in range(processes)]
    return [{**base, "MASTER_ADDR": LOOPBACK, "MASTER_PORT": str(ports[0]), "RANK": str(rank),
             "WORLD_SIZE": str(processes), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(processes),
             "OMP_NUM_THREADS": threads, "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "0",
             "GLOO_SOCKET_IFNAME": loopback_interface()} for rank in range(processes)]


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _core_shares(processes: int) -> list[list[int] | None]:
    """Cores for each rank: an equal share when there are enough (no two ranks fight for one core), else none."""
    cores = _cores()
    if processes > len(cores) or not hasattr(os, "sched_setaffinity"):
        return [None] * processes
    share = len(cores) // processes
    return [cores[rank * share:(rank + 1) * share] for rank in range(processes)]


def _child_setup(cores: list[int] | None):
    def setup():
        if sys.platform.startswith("linux"):  # die with the parent: no orphaned ranks training on
            with contextlib.suppress(Exception):
                ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if cores is not None:
            os.sched_setaffinity(0, cores)

    return setup


def _how_it_ended(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _last_error_line(path: Path) -> str | None:
    with contextlib.suppress(OSError):
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("portres: error:")]
        if errors:
            return errors[-1][len("portres: error:"):].strip()
        if lines:
            return lines[-1]
    return None


def run_local(command: list[str], processes: int, backend: str, *, port: int | None = None,
              stdout=None, grace_s: float = 10.0, hint: str = "") -> subprocess.CompletedProcess | None:
    """Run ``command`` as ``processes`` ranks of ``backend`` on this machine (loopback) and wait for all.

    Each rank gets the launcher environment of :func:`rank_environments` and, when there are enough
    cores, its own share of them. The ranks' ports stay bound by this process until they end
    (:func:`hold_ports`), and torch's rendezvous store is served here, on loopback (:func:`torch_store`).
    Rank 0 writes to this process's stderr (and to ``stdout``: None inherits, ``subprocess.PIPE``
    captures it into the returned object); the others' stderr is kept for their error messages. When a
    rank fails, the rest get ``grace_s`` to notice and stop, then are terminated; the failure is raised
    as one :class:`DistributedError` line (``hint`` appended), or as :class:`AlreadyReported` when rank 0
    failed first and has said why.

        >>> run_local([sys.executable, "-m", "portres.cli", "_rank", "config.json"], 2, "mlx")
    """
    ports = choose_ports(processes if backend == "mlx" else 1, port)
    held = hold_ports(ports, backend, port)  # until the ranks end: no other program can take one meanwhile
    store = None
    try:
        if backend == "torch":
            store = torch_store(held.pop(), processes)
        return _run_ranks(command, processes, backend, ports, stdout, grace_s, hint)
    finally:
        del store  # the torch store stops listening now, not when a traceback holding this frame goes
        for hold in held:
            hold.close()


def _run_ranks(command, processes, backend, ports, stdout, grace_s, hint) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="portres-ranks-") as workdir:
        workdir = Path(workdir)
        environments = rank_environments(backend, processes, ports, workdir)
        logs = [workdir / f"rank{rank}.stderr" for rank in range(processes)]
        children, files = [], []
        try:
            for rank, (environment, cores) in enumerate(zip(environments, _core_shares(processes))):
                err = None if rank == 0 else open(logs[rank], "w")  # noqa: SIM115 - closed below
                files += [err] if err else []
                children.append(subprocess.Popen(
                    command, env=environment, stdin=subprocess.DEVNULL, stdout=stdout if rank == 0 else
                    subprocess.DEVNULL, stderr=err, preexec_fn=_child_setup(cores)))
            output = _wait_for_ranks(children, grace_s, stdout)
        except BaseException:
            for child in children:
                _stop(child)
            raise
        finally:
            for file in files:
                file.close()
        codes = [child.returncode for child in children]
        if all(code == 0 for code in codes):
            return subprocess.CompletedProcess(command, 0, output.stdout)
        failed = output.first_failure
        code = codes[failed]
        if failed == 0 and code == 2:
            error = AlreadyReported(f"rank 0 exited with status 2{hint}")
        else:
            said = _last_error_line(logs[failed]) if failed else None
            error = DistributedError(f"rank {failed} {_how_it_ended(code)}" + (f": {said}" if said else "") + hint)
        error.stdout = output.stdout  # rank 0's, when captured
        raise error


class _Output:
    def __init__(self):
        self.first_failure: int | None = None
        self.stdout = None


def _wait_for_ranks(children: list[subprocess.Popen], grace_s: float, stdout) -> _Output:
    output = _Output()
    reader = None
    if stdout == subprocess.PIPE:  # rank 0's output, read on a thread so that a full pipe never blocks it
        chunks: list[bytes] = []
        reader = threading.Thread(target=lambda: chunks.append(children[0].stdout.read()), daemon=True)
        reader.start()
    deadline = None
    while [child.poll() for child in children].count(None):  # poll every child: any() would stop at a live one
        if output.first_failure is None:
            failed = [rank for rank, child in enumerate(children) if child.returncode not in (None, 0)]
            if failed:  # a rank killed by a signal is the cause; the others' errors are its consequence
                killed = [rank for rank in failed if children[rank].returncode < 0]
                output.first_failure = (killed or failed)[0]
                deadline = time.monotonic() + grace_s
        if deadline is not None and time.monotonic() > deadline:
            for child in children:
                _stop(child)
            break
        time.sleep(0.05)
    for child in children:
        child.wait()
    if output.first_failure is None:
        failed = [rank for rank, child in enumerate(children) if child.returncode != 0]
        killed = [rank for rank in failed if children[rank].returncode < 0]
        output.first_failure = (killed or failed or [None])[0]
    if reader is not None:
        reader.join()
        output.stdout = b"".join(chunks).decode(errors="replace")
    return output


def _stop(child: subprocess.Popen, wait_s: float = 5.0) -> None:
    if child.poll() is not None:
        return
    child.terminate()
    with contextlib.suppress(ProcessLookupError):
        os.kill(child.pid, signal.SIGCONT)  # a stopped (SIGSTOP) rank only acts on SIGTERM once continued
    try:
        child.wait(wait_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def checkpoint_hint(out) -> str:
    """Where a stopped run can continue from: its last checkpoint, or that none was written yet."""
    from .checkpoint import CheckpointError, read_description
    from .loop import LAST

    path = Path(out) / LAST
    try:
        step = read_description(path)["position"]["step"]
    except (CheckpointError, KeyError, TypeError):
        return f"; no checkpoint was written to {path} yet"
    return f"; the last checkpoint {path} (step {step}) is intact: continue with --resume"


def local_training(config, processes: int, *, resume: bool, port: int | None = None) -> dict:
    """Train ``config`` (a TrainConfig) with ``processes`` local ranks; returns rank 0's summary.

        >>> summary = local_training(TrainConfig(arch="resnet20", data="digits", backend="mlx", out="runs/r20"), 2,
        ...                          resume=False)
    """
    config = dataclasses.replace(config, distributed=True)
    with tempfile.TemporaryDirectory(prefix="portres-run-") as workdir:
        path = Path(workdir) / "config.json"
        path.write_text(json.dumps({"config": dataclasses.asdict(config), "resume": resume}))
        try:
            run_local([sys.executable, "-m", "portres.cli", "_rank", str(path)], processes, config.backend,
                      port=port)
        except AlreadyReported:
            raise
        except DistributedError as error:
            raise DistributedError(f"{error}{checkpoint_hint(config.out)}") from None
    return json.loads((Path(config.out) / "summary.json").read_text())


def config_from_json(fields: dict):
    """A TrainConfig from ``dataclasses.asdict`` sent through JSON (lists back to tuples)."""
    from .loop import TrainConfig

    fields = dict(fields)
    for name in ("milestones", "devices"):
        if fields.get(name) is not None:
            fields[name] = tuple(fields[name])
    return TrainConfig(**fields)
