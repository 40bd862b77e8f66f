"""Security of local data-parallel ranks (``portres train --processes N``): what they listen on, and what a
program squatting their ports can do to them.

Attacks reproduced:

- **A host on the network joins a local run.** torch's env:// rendezvous made rank 0 serve its TCPStore on
  every interface (``*:PORT``, whatever MASTER_ADDR says), and gloo binds its pairs' sockets to the address
  the host name resolves to: any host that can reach the machine could join the group or write its keys.
  Every socket a running ``--processes 2`` run listens on (the launcher and its ranks, read from
  /proc/net/tcp and /proc/net/tcp6) must be on loopback, for MLX's ring and for torch's gloo; torch ranks'
  environment (checked without torch too) binds gloo to the loopback interface and has no rank serve a store.
- **A local program squats the ports a run picked** (between portres choosing a free port and the rank
  binding it; with SO_REUSEPORT, which MLX's ring sets, the squatter even shares the port and takes some of
  the ranks' connections). The run used to wait out ``--timeout`` and report "a rank hung"; it must stop at
  once with one ``portres: error:`` line naming the port, status 2.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import TINY

from portres import backends
from portres.training import launch

HAS = set(backends.available())
needs = {name: pytest.mark.skipif(name not in HAS, reason=f"{name} is not installed") for name in ("mlx", "torch")}
linux = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from /proc/net")
BACKENDS = [pytest.param(name, marks=needs[name]) for name in ("mlx", "torch")]


# -- who listens where: /proc ------------------------------------------------------------------------------


def _listening() -> dict[str, tuple[str, int]]:
    """Every listening TCP socket on this machine: inode -> (address, port), from /proc/net/tcp{,6}."""
    found = {}
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] != "0A":  # TCP_LISTEN
                    continue
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found[fields[9]] = (socket.inet_ntop(family, raw), int(port, 16))
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:["):-1])
    return inodes


def _descendants(pid: int) -> list[int]:
    children = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                children += [int(child) for child in (task / "children").read_text().split()]
    return children + [grandchild for child in children for grandchild in _descendants(child)]


def _mlx_rank(pid: int) -> str | None:
    with contextlib.suppress(OSError):
        for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if entry.startswith(b"MLX_RANK="):
                return entry[len(b"MLX_RANK="):].decode()
    return None


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


# -- defect: listening beyond loopback ---------------------------------------------------------------------


@linux
@pytest.mark.slow  # two ranks import their framework and train a few steps on 2 cores: ~15 s
@pytest.mark.parametrize("backend", BACKENDS)
def test_local_ranks_listen_on_loopback_only(tmp_path, backend):
    (tmp_path / "tiny.json").write_text(TINY.to_json())
    command = [sys.executable, "-m", "portres.cli", "train", "--spec", str(tmp_path / "tiny.json"), "--data",
               "digits", "--backend", backend, "--epochs", "1", "--batch-size", "16", "--limit-train", "48",
               "--out", str(tmp_path / "run"), "--processes", "2"]
    with open(tmp_path / "stderr", "w") as err:
        parent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
    seen: dict[str, tuple[str, int]] = {}
    paused, paused_at = None, None  # MLX: rank 1 held back, so that rank 0's ring listener stays open to be seen
    try:
        deadline = time.monotonic() + 300  # hang detection only
        while parent.poll() is None and time.monotonic() < deadline:
            processes = [parent.pid, *_descendants(parent.pid)]
            if backend == "mlx" and paused_at is None:
                rank_one = next((pid for pid in processes if _mlx_rank(pid) == "1"), None)
                if rank_one is not None:
                    os.kill(rank_one, signal.SIGSTOP)
                    paused, paused_at = rank_one, time.monotonic()
            listening = _listening()
            inodes = set().union(*(_socket_inodes(pid) for pid in processes))
            seen.update({inode: listening[inode] for inode in inodes & listening.keys()})
            if paused is not None and (seen or time.monotonic() - paused_at > 60):
                os.kill(paused, signal.SIGCONT)
                paused = None
            time.sleep(0.01)
    finally:
        if paused is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(paused, signal.SIGCONT)
        if parent.poll() is None:
            parent.kill()
        parent.wait()
    stderr = (tmp_path / "stderr").read_text()
    assert parent.returncode == 0, stderr
    # torch: the store and each rank's gloo listener; MLX: at least rank 0's ring socket
    assert len(seen) >= (3 if backend == "torch" else 1), (seen, stderr)
    exposed = sorted(address for address in seen.values() if not _is_loopback(address[0]))
    assert not exposed, f"listening beyond loopback: {exposed} (all: {sorted(seen.values())})"


def test_torch_ranks_are_told_to_bind_loopback_and_serve_no_store(tmp_path):
    # without torch: the environment portres gives torch ranks, which decides what torch binds
    for environment in launch.rank_environments("torch", 2, [4001], tmp_path):
        assert environment["MASTER_ADDR"] == "127.0.0.1"
        # gloo binds its pairs to this interface (by default: whatever address the host name resolves to)
        assert environment["GLOO_SOCKET_IFNAME"] in ("lo", "lo0")
        if hasattr(socket, "if_nameindex"):
            assert environment["GLOO_SOCKET_IFNAME"] in {name for _, name in socket.if_nameindex()}
        # every rank a client of the store portres serves on loopback: rank 0 serving it would bind every interface
        assert environment["TORCHELASTIC_USE_AGENT_STORE"] == "True"


# -- defect: a squatted port --------------------------------------------------------------------------------


def _squat() -> socket.socket:
    """A listening socket on a loopback port, shared the way MLX's ring shares its own (SO_REUSEPORT)."""
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if hasattr(socket, "SO_REUSEPORT"):
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    return squatter


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_port_squatted_after_portres_chose_it_is_named_at_once(tmp_path, backend):
    # rank 1's ring port (MLX; rank 0's is free) or the rendezvous port (torch), taken by another program
    # between portres choosing it and the rank binding it: here the chooser is made to pick a squatted port
    with contextlib.ExitStack() as stack:
        squatted = stack.enter_context(_squat()).getsockname()[1]
        if backend == "mlx":
            free = launch.choose_ports(1)[0]
            ports = [free, squatted]
        else:
            ports = [squatted]
        (tmp_path / "tiny.json").write_text(TINY.to_json())
        code = ("import sys\n"
                "from portres.training import launch\n"
                f"launch.choose_ports = lambda count, first=None: {ports}\n"
                "from portres.cli import main\n"
                "main(sys.argv[1:], prog_name='portres')\n")
        result = subprocess.run(
            [sys.executable, "-c", code, "train", "--spec", str(tmp_path / "tiny.json"), "--data", "digits",
             "--backend", backend, "--epochs", "1", "--batch-size", "16", "--limit-train", "48", "--timeout", "60",
             "--out", str(tmp_path / "run"), "--processes", "2"],
            capture_output=True, text=True, timeout=300)  # the timeout detects a hang only
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"portres: error: port {squatted} on 127.0.0.1 is in use"), result.stderr
    assert "--port" in lines[0]


def test_every_port_is_held_and_a_taken_one_is_named():
    # without MLX or torch: a port taken before the ranks bind it is named; the ones chosen stay held
    with _squat() as squatter:
        taken = squatter.getsockname()[1]
        free = launch.choose_ports(1)[0]
        with pytest.raises(ValueError, match=f"port {taken} on 127.0.0.1 is in use"):
            launch.hold_ports([free, taken], shared=True)
        assert launch.port_is_free(free)  # released again after the refusal
    held = launch.hold_ports([free], shared=True)
    try:
        assert not launch.port_is_free(free)  # nobody else can take it while the ranks start...
        with socket.socket() as rank:  # ...but an MLX rank binds beside it, as its ring does (SO_REUSEPORT)
            if hasattr(socket, "SO_REUSEPORT"):
                rank.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                rank.bind(("127.0.0.1", free))
                rank.listen()
    finally:
        for hold in held:
            hold.close()
    assert launch.port_is_free(free)
