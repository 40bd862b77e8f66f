"""Backend registry: which lowerings exist, which can run here, and why not.

Nothing here imports a framework; :func:`load` imports one backend module, which
imports its framework. Each backend module (``numpy.py``, ``tinygrad.py``, ``mlx.py``,
``torch.py``, ``onnxruntime.py``) mirrors the others: a ``Backend`` class, a subclass of
:class:`~portres.backends.base.AbstractBackend` (the contract: array I/O, parameter loading, ``compile``,
the primitive set the plan walker calls - conv2d, batch_norm, channel_affine, relu, max_pool, zero_pad,
avg_pool, subsample, pad_channels, add, global_avg_pool, linear - and the training hooks).

    >>> from portres import backends
    >>> "numpy" in backends.available()
    True
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import platform
import shutil
import sys
from dataclasses import dataclass

from .base import PRIMITIVES

NAMES = ("numpy", "tinygrad", "mlx", "torch", "onnxruntime")
TRAINABLE = ("numpy", "tinygrad", "mlx", "torch")  # with gradients (onnxruntime is an inference engine)


__all__ = ["NAMES", "PRIMITIVES", "TRAINABLE", "BackendUnavailable", "available", "install_hint", "load",
           "unavailable_reason"]


class BackendUnavailable(RuntimeError):
    """A backend that cannot run here; the message says how to fix it."""


@dataclass(frozen=True)
class _Requirement:
    module: str  # top-level import the backend needs
    extra: str | None  # pip extra of portres that installs it


_REQUIREMENTS = {
    "numpy": _Requirement("numpy", None),
    "tinygrad": _Requirement("tinygrad", "tinygrad"),
    "mlx": _Requirement("mlx", "mlx"),
    "torch": _Requirement("torch", "torch"),
    "onnxruntime": _Requirement("onnxruntime", "onnx"),
}


def install_hint(name: str) -> str:
    extra = _REQUIREMENTS[name].extra
    return f"pip install 'portres[{extra}]'" if extra else "pip install portres"


def _distribution_installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _installed(module: str) -> bool:
    if module in sys.modules:  # None there means "blocked": treat as not installed
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def unavailable_reason(name: str, device: str | None = None) -> str | None:
    """Why backend ``name`` cannot run here (on ``device``), or ``None`` if it can."""
    if name not in _REQUIREMENTS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose from {', '.join(NAMES)}")
    requirement = _REQUIREMENTS[name]
    if not _installed(requirement.module):
        return f"{requirement.module} is not installed: {install_hint(name)}"
    if name == "mlx" and platform.system() == "Linux" and "mlx.core" not in sys.modules:
        if not any(_distribution_installed(d) for d in ("mlx-cpu", "mlx-cuda", "mlx-cuda-12", "mlx-cuda-13")):
            return "mlx is installed without a Linux build of its core: pip install 'mlx[cpu]' (or 'portres[mlx]')"
    if name == "onnxruntime" and not _installed("onnx"):
        return ("onnxruntime runs graphs that portres builds with the onnx package, which is not installed: "
                f"{install_hint(name)}")
    if name == "tinygrad" and (device is None or device.upper().startswith("CPU")) \
            and platform.system() != "Darwin" and shutil.which("clang") is None:
        return ("tinygrad's CPU device compiles kernels with clang, which is not on PATH: "
                "install it (Debian/Ubuntu: sudo apt-get install clang) or pick another device")
    return None


def available(training: bool = False) -> list[str]:
    """Backends that can run here (``training``: and compute gradients), importing no framework that is missing."""
    return [name for name in (TRAINABLE if training else NAMES) if unavailable_reason(name) is None]


def load(name: str, device: str | None = None):
    """Import and return the backend module ``portres.backends.<name>``."""
    reason = unavailable_reason(name, device)
    if reason:
        raise BackendUnavailable(f"backend {name!r} cannot run: {reason}")
    return importlib.import_module(f"{__name__}.{name}")
