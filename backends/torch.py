"""PyTorch peer: the same plan and weights through ``torch.nn.functional``, so users can
compare portres's backends with what they would otherwise run, in one process.

Activations stay logically NCHW; on CPU they are stored channels_last (NHWC in memory),
which oneDNN convolves fastest (see BENCHMARKS.md).
"""

from __future__ import annotations

import importlib.metadata

import numpy as np

try:
    import torch
    import torch.nn.functional as F
except ImportError as error:  # pragma: no cover - guarded by backends.unavailable_reason
    raise ImportError(f"the torch backend needs PyTorch: pip install 'portres[torch]' ({error})") from None

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


class Backend:
    name = NAME

    def __init__(self, device: str | None = None, dtype: str | None = None, channels_last: bool = True):
        self.device = device or "cpu"
        if self.device.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ValueError(f"torch devices are cpu, cuda and mps, not {self.device!r}")
        if self.device.split(":")[0] not in devices():
            raise ValueError(f"torch device {self.device!r} is not available here; available: {', '.join(devices())}")
        self.dtype = dtype or "float32"
        if self.dtype not in DTYPES:
            raise ValueError(f"torch backend dtypes are {', '.join(DTYPES)}, not {self.dtype!r}")
        self._dtype = DTYPES[self.dtype]
        self._format = torch.channels_last if channels_last else torch.contiguous_format
        self.threads = f"{torch.get_num_threads()} intra-op threads" if self.device == "cpu" else "device"

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

    def realize(self, x):
        return x

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
