"""Starting local ranks: ``portres train --processes N`` runs N ranks on this machine, on loopback.

Each rank gets the environment its framework's launcher (``mlx.launch``, ``torchrun``) would set -
that knowledge is the backend's (``ProcessGroup.launch_environments`` in backends/mlx.py and
backends/torch.py) - and, when there are enough cores, its own share of them. The ranks' ports stay
bound by this process until they end, so no other program can take one meanwhile; rank 0 writes,
the others' errors are kept and the first failure is reported as one line.

    >>> summary = local_training(TrainConfig(arch="resnet20", data="digits", backend="mlx", out="runs/r20"), 2,
    ...                          resume=False)
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
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

from .. import backends
from ..backends.base import cpu_cores
from .checkpoint import checkpoint_hint
from .replicas import LAUNCHER_VARIABLES, AlreadyReported, DistributedError

LOOPBACK = "127.0.0.1"


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


def hold_ports(ports: list[int], shared: bool, first: int | None = None) -> list[socket.socket]:
    """The ranks' ports, bound on loopback by this process from now until the ranks end; raises ValueError
    naming a port another program holds. ``shared``: the ranks bind beside the held sockets (SO_REUSEPORT).

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
            if shared and hasattr(socket, "SO_REUSEPORT"):
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


def rank_environments(backend: str, processes: int, ports: list[int], workdir: Path) -> list[dict]:
    """The environment of each local rank: this one's without any launcher's variables, plus what the
    backend's launcher would set (``ProcessGroup.launch_environments``: MLX's ring a hostfile and MLX_RANK,
    torchrun MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK), with one core share each for the BLAS.

    Every rank listens on loopback only (``LOOPBACK``: the ring binds the hostfile's addresses; torch ranks
    use the store the launcher serves and gloo binds the loopback interface)."""
    base = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    base["PORTRES_LAUNCHER"] = "portres --processes"
    threads = max(1, cpu_cores() // processes)
    group = backends.load(backend).ProcessGroup
    return [{**base, **variables} for variables in group.launch_environments(processes, ports, workdir, threads,
                                                                              LOOPBACK)]


def _core_ids() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _core_shares(processes: int) -> list[list[int] | None]:
    """Cores for each rank: an equal share when there are enough (no two ranks fight for one core), else none."""
    cores = _core_ids()
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
    (:func:`hold_ports`), and a rendezvous the backend's ranks need is served here, on loopback
    (``ProcessGroup.serve_rendezvous``: torch's store).
    Rank 0 writes to this process's stderr (and to ``stdout``: None inherits, ``subprocess.PIPE``
    captures it into the returned object); the others' stderr is kept for their error messages. When a
    rank fails, the rest get ``grace_s`` to notice and stop, then are terminated; the failure is raised
    as one :class:`DistributedError` line (``hint`` appended), or as :class:`AlreadyReported` when rank 0
    failed first and has said why.

        >>> run_local([sys.executable, "-m", "portres.cli", "_rank", "config.json"], 2, "mlx")
    """
    group = backends.load(backend).ProcessGroup  # what the backend's ranks need: ports, a rendezvous
    ports = choose_ports(group.ports_needed(processes), port)
    held = hold_ports(ports, group.SHARES_PORTS, port)  # until the ranks end: no other program can take one meanwhile
    store = None
    try:
        store = group.serve_rendezvous(held, processes)  # torch's store takes its held socket; MLX needs none
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
