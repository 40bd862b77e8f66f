"""PyTorch peer: the same plan and weights through ``torch.nn.functional``, so users can
compare portres's backends with what they would otherwise run, in one process.

Activations stay logically NCHW; on CPU they are stored channels_last (NHWC in memory),
which oneDNN convolves fastest (see BENCHMARKS.md).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os

import numpy as np

try:
    import torch
    import torch.nn.functional as F
except ImportError as error:  # pragma: no cover - guarded by backends.unavailable_reason
    raise ImportError(f"the torch backend needs PyTorch: pip install 'portres[torch]' ({error})") from None

from .base import AbstractBackend

NAME = "torch"
FOLD_BATCH_NORM = True
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def devices() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def info() -> dict:
    return {"framework": f"torch {importlib.metadata.version('torch')}", "devices": devices(),
            "default_device": "cpu", "blas": torch.__config__.show().split("BLAS_INFO=")[-1].split(",")[0]
            if "BLAS_INFO=" in torch.__config__.show() else "unknown"}


class Backend(AbstractBackend):
    """``torch.nn.functional`` on logically NCHW tensors. ``group``/``sync_bn``: one replica of a
    data-parallel group (see ``data_parallel``)."""

    name = NAME
    autodiff = True

    def __init__(self, device: str | None = None, dtype: str | None = None, channels_last: bool = True, *,
                 group: ProcessGroup | None = None, sync_bn: bool = False):
        self.device = device or "cpu"
        if self.device.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ValueError(f"torch devices are cpu, cuda and mps, not {self.device!r}")
        if self.device.split(":")[0] not in devices():
            raise ValueError(f"torch device {self.device!r} is not available here; available: {', '.join(devices())}")
        self.dtype = dtype or "float32"
        if self.dtype not in DTYPES:
            raise ValueError(f"torch backend dtypes are {', '.join(DTYPES)}, not {self.dtype!r}")
        self._dtype = DTYPES[self.dtype]
        self.channels_last = channels_last
        self._format = torch.channels_last if channels_last else torch.contiguous_format
        self.threads = f"{torch.get_num_threads()} intra-op threads" if self.device == "cpu" else "device"
        if sync_bn and group is None:
            raise ValueError("sync_bn sums batch statistics over a data-parallel group: pass group")
        self.group, self.sync_bn = group, sync_bn

    def options(self) -> dict:
        return {"device": self.device, "dtype": self.dtype, "channels_last": self.channels_last,
                "group": self.group, "sync_bn": self.sync_bn}

    def _to_device(self, x: np.ndarray) -> torch.Tensor:
        host = np.float64 if self.dtype == "float64" else np.float32
        t = torch.from_numpy(np.ascontiguousarray(x, host)).to(self.device, self._dtype)
        return t.contiguous(memory_format=self._format) if t.ndim == 4 else t

    def from_numpy(self, x: np.ndarray) -> torch.Tensor:
        return self._to_device(x)

    def to_numpy(self, x: torch.Tensor) -> np.ndarray:
        x = x.detach().cpu()
        return (x if x.dtype == torch.float64 else x.float()).contiguous().numpy()

    def load_params(self, plan, params: dict) -> dict:
        return {name: self._to_device(value) for name, value in params.items()}

    def compile(self, forward):
        def run(params, x):
            with torch.inference_mode():
                return forward(params, x)
        return run

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        elif self.device == "mps":
            torch.mps.synchronize()

    def memory(self) -> dict:
        if self.device.startswith("cuda"):
            return {"device_peak_memory_bytes": torch.cuda.max_memory_allocated()}
        return {}

    # -- primitives (logical NCHW) --

    def conv2d(self, x, weight, bias, stride, padding, groups):
        return F.conv2d(x, weight, bias, stride=stride, padding=padding, groups=groups)

    def batch_norm(self, x, weight, bias, mean, var, eps):
        return F.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)

    def channel_affine(self, x, scale, shift):
        return torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1))

    # -- training --

    def batch_norm_train(self, x, weight, bias, eps):
        count = x.shape[0] * x.shape[2] * x.shape[3]
        if self.sync_bn:  # the global batch's statistics, as torch's SyncBatchNorm (gradients all-reduced too)
            (y,), mean, var = self.synchronized_batch_norm(
                [x], count, weight, bias, eps, channel_sum=lambda a: a.sum(dim=(0, 2, 3)), rsqrt=torch.rsqrt,
                per_channel=lambda v: v.view(1, -1, 1, 1))
            return y, mean, var
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        y = F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)
        return y, mean, var * (count / (count - 1))

    def cross_entropy(self, logits, targets):
        return F.cross_entropy(logits, targets)  # soft targets: -(targets * log_softmax).sum(1).mean()

    def value_and_grad(self, loss_fn):
        """``loss_fn(trainable) -> (loss, aux)`` -> ``f(trainable) -> (loss, aux, grads)`` by torch autograd."""
        def run(trainable: dict):
            leaves = {name: value.detach().requires_grad_(True) for name, value in trainable.items()}
            with torch.enable_grad():
                loss, aux = loss_fn(leaves)
                grads = torch.autograd.grad(loss, list(leaves.values()))
            return loss.detach(), {name: value.detach() for name, value in aux.items()}, dict(zip(leaves, grads))

        return run

    def relu(self, x):
        return F.relu(x)

    def max_pool(self, x, kernel_size, stride, padding):
        return F.max_pool2d(x, kernel_size, stride, padding)

    def zero_pad(self, x, padding):
        return F.pad(x, (padding, padding, padding, padding))

    def avg_pool(self, x, kernel_size, stride):
        return F.avg_pool2d(x, kernel_size, stride, ceil_mode=True, count_include_pad=False)

    def subsample(self, x, stride):
        return x[:, :, ::stride, ::stride]

    def pad_channels(self, x, before, after):
        return F.pad(x, (0, 0, 0, 0, before, after))

    def add(self, x, y):
        return x + y

    def global_avg_pool(self, x):
        return x.mean(dim=(2, 3))

    def linear(self, x, weight, bias):
        return F.linear(x, weight, bias)


# -- data parallel: this process as one rank of a group (portres.training.replicas) -------------------


class ProcessGroup:
    """This process's place in the group ``torchrun`` (or ``portres --processes``) started, on
    ``torch.distributed`` (gloo on CPUs, NCCL on CUDA devices), and the collectives training needs.

        >>> group = ProcessGroup(launcher)           # under torchrun: RANK, WORLD_SIZE, MASTER_ADDR/PORT
        >>> group.sum_host(np.array([1.0]))          # array([2.])
    """

    def __init__(self, launcher, *, timeout_s: float | None = None, device: str | None = None):
        import torch.distributed as dist
        import torch.distributed.nn.functional as differentiable

        self._dist = dist
        cuda = (device or "cpu").startswith("cuda")
        self.backend = "nccl" if cuda else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
        try:
            dist.init_process_group(self.backend, timeout=timeout)
        except (RuntimeError, ValueError) as error:
            text = str(error).splitlines()[0] if str(error) else type(error).__name__
            if "address already in use" in text.lower() or "eaddrinuse" in text.lower():
                raise RuntimeError(f"rank {launcher.rank} cannot listen on MASTER_PORT "
                                   f"{os.environ.get('MASTER_PORT')}: the port is in use: start with another port "
                                   "(torchrun --master-port P; portres --port P)") from None
            raise RuntimeError(f"torch.distributed ({self.backend}) did not start under {launcher.name}: {text}") \
                from None
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.name = f"torch.distributed {self.backend}"
        self.all_sum = differentiable.all_reduce  # its backward all-reduces the gradient (sync BN)
        self._host = torch.device(f"cuda:{self.local_rank}") if cuda else torch.device("cpu")

    def local_device(self, device: str | None) -> str | None:
        if device == "cuda":  # one GPU per rank, as torchrun's LOCAL_RANK says
            return f"cuda:{self.local_rank}"
        return device

    def all_reduce_mean(self, tree: dict) -> dict:
        """The mean over the ranks of every tensor in ``tree``: one all-reduce of them all, flattened."""
        values = list(tree.values())
        flat = torch.cat([value.reshape(-1) for value in values])
        self._dist.all_reduce(flat)
        flat /= self.size
        parts = torch.split(flat, [value.numel() for value in values])
        return {name: part.view_as(value) for (name, value), part in zip(tree.items(), parts)}

    def sum_host(self, values: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.array(values, np.float64)).to(self._host)
        self._dist.all_reduce(tensor)
        return tensor.cpu().numpy()

    def broadcast(self, data: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.array(data, np.uint8)).to(self._host)
        self._dist.broadcast(tensor, src=0)
        return tensor.cpu().numpy()

    @staticmethod
    def lost_peer(error: BaseException) -> bool:
        text = str(error).lower()
        return isinstance(error, RuntimeError) and any(mark in text for mark in (
            "connection", "peer", "gloo", "nccl", "closed", "timed out", "timeout", "broken pipe"))

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()

    # -- starting ranks on this machine (portres train --processes N: portres.training.launch) --

    SHARES_PORTS = False  # the store listens on the launcher's held socket itself

    @staticmethod
    def ports_needed(processes: int) -> int:
        """Loopback ports ``processes`` local ranks need: one, the rendezvous store's."""
        return 1

    @staticmethod
    def serve_rendezvous(held: list, processes: int):
        """torch.distributed's rendezvous store for local ranks, served by the launching process on the socket
        it holds (``held.pop()``, bound to loopback; the store takes it). Left to torch, rank 0 would serve it
        (env://) on every interface - TCPStore binds the wildcard address whatever MASTER_ADDR says - where any
        host that reaches this one could join the group or write its keys. The ranks connect as clients, as
        they do under torchrun's agent (TORCHELASTIC_USE_AGENT_STORE)."""
        import torch.distributed as dist

        listener = held.pop()
        # the libuv store serves a given listening socket from torch 2.8 on; before, only the classic one does
        classic = {"use_libuv": False} if torch.__version__ < (2, 8) else {}
        try:
            listener.listen()
            host, port = listener.getsockname()[:2]
            store = dist.TCPStore(host, port, processes, True, wait_for_workers=False,
                                  master_listen_fd=listener.fileno(), **classic)
        except BaseException:
            listener.close()
            raise
        listener.detach()  # the store owns the descriptor now and closes it
        return store

    @staticmethod
    def launch_environments(processes: int, ports: list[int], workdir, threads: int, host: str) -> list[dict]:
        """What ``torchrun`` sets for each of ``processes`` ranks on ``host`` (MASTER_ADDR/PORT: the store on
        ``ports[0]``, RANK, WORLD_SIZE, LOCAL_RANK), with ``threads`` OpenMP threads each.

        Every rank listens on loopback only: ranks use the store :meth:`serve_rendezvous` serves
        (TORCHELASTIC_USE_AGENT_STORE: no rank serves one), and gloo binds its pairs' sockets to the loopback
        interface (GLOO_SOCKET_IFNAME; by default it takes the address the host name resolves to, often one
        every host on the network can reach)."""
        return [{"MASTER_ADDR": host, "MASTER_PORT": str(ports[0]), "RANK": str(rank), "WORLD_SIZE": str(processes),
                 "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(processes), "OMP_NUM_THREADS": str(threads),
                 "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "0",
                 "GLOO_SOCKET_IFNAME": loopback_interface()} for rank in range(processes)]


def loopback_interface() -> str:
    """The loopback interface's name (Linux ``lo``, macOS ``lo0``), for gloo's GLOO_SOCKET_IFNAME."""
    import socket

    names = {name for _, name in socket.if_nameindex()} if hasattr(socket, "if_nameindex") else set()
    return next((name for name in ("lo", "lo0") if name in names), "lo")
