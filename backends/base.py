"""The backend contract: what every backend object has, abstract or with its default.

Callers (the plan walker, ``portres.Model``, training, the bench) rely on every member below and
never probe a backend with ``hasattr``. A backend overrides the abstract members (array I/O,
``load_params``, ``compile`` and the twelve primitives of :data:`PRIMITIVES`) and only the hooks
whose default does not fit it::

    >>> from portres.backends.base import AbstractBackend
    >>> class Doubling(AbstractBackend):
    ...     name = "doubling"
    ...     def relu(self, x):
    ...         return 2 * max(x, 0)
    >>> Doubling().relu(3), Doubling().for_training().name, Doubling().all_reduce_mean({"w": 1})
    (6, 'doubling', {'w': 1})

Variants (gradient-friendly lowerings, a NaN-exact path, one replica of a data-parallel group) are
new instances made by :meth:`AbstractBackend.variant` from the constructor options the backend
lists in :meth:`AbstractBackend.options`, never copies with private fields changed. This module
imports no framework.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import operator
import os

import numpy as np

# what the plan walker calls on every backend (``portres.walker.apply_op``)
# device names that are not the host CPU (mlx: gpu; torch: cuda, mps; tinygrad: its GPU runtimes)
ACCELERATOR_DEVICES = ("gpu", "cuda", "mps", "metal", "amd", "nv", "qcom", "webgpu")

PRIMITIVES = ("conv2d", "batch_norm", "channel_affine", "relu", "max_pool", "zero_pad", "avg_pool", "subsample",
              "pad_channels", "add", "global_avg_pool", "linear")


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one).

        >>> cpu_cores() >= 1
        True
    """
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def state_sha256(state: dict[str, np.ndarray]) -> str:
    """One hash of a whole state (names, dtypes, shapes and bytes), to compare replicas bit for bit.

        >>> len(state_sha256({"w": np.zeros(3)}))
        64
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        value = np.ascontiguousarray(state[name])
        digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def two_pass_statistics(parts: list, count: int, *, channel_sum, per_channel=lambda v: v, each=None,
                        total=lambda v: v) -> tuple:
    """``(mean, centred parts, biased variance)`` per channel of a batch held as ``parts`` (slices of it),
    in two passes: the mean, then the centred sum of squares (no cancellation, unlike E[x^2] - E[x]^2).

    ``count``: values per channel in the whole batch; ``channel_sum(a)``: ``a`` summed over every axis
    but the channels; ``per_channel(v)``: a per-channel vector shaped to broadcast against a part;
    ``each(function, parts)``: ``function`` over the parts (default: in order; MLX runs each on its
    stream); ``total(v)``: partial sums added across processes (sync BN's all-reduce).

        >>> x = np.arange(6.0).reshape(3, 2)
        >>> mean, _, var = two_pass_statistics([x[:1], x[1:]], 3, channel_sum=lambda a: a.sum(0))
        >>> mean.tolist(), var.tolist()
        ([2.0, 3.0], [2.6666666666666665, 2.6666666666666665])
    """
    each = each or (lambda function, items: [function(item) for item in items])
    added = lambda partials: functools.reduce(operator.add, partials)  # noqa: E731 - no "0 +" as sum() has
    mean = total(added(each(channel_sum, parts))) / count
    centered = each(lambda part: part - per_channel(mean), parts)
    var = total(added(each(lambda c: channel_sum(c * c), centered))) / count
    return mean, centered, var


class AbstractBackend:
    """One backend: arrays, parameters, the primitives the plan walker calls, and training hooks.

    Attributes every backend sets: ``name`` (its module's NAME), ``device``, ``dtype`` (compute dtype
    name) and ``threads`` (a line for reports). ``autodiff``: whether the framework differentiates
    (``value_and_grad``); the NumPy reference is differentiated by portres's own backward instead.
    ``lock``: a context manager every call into the framework runs under (tinygrad's settings are
    process-wide, so its calls take turns). ``group``/``sync_bn``: the process group this backend is
    one replica of (see :meth:`data_parallel`) and whether batch norm uses every rank's batch.
    """

    name = "abstract"
    device = "cpu"
    dtype = "float32"
    threads = "unknown"
    autodiff = False
    lock = contextlib.nullcontext()  # reusable and re-entrant
    group = None
    sync_bn = False

    @classmethod
    def default_device(cls, training_macs_per_step: float | None = None) -> str | None:
        """The device this backend picks when none is given: for inference (``None``), or for training steps
        of ``training_macs_per_step`` multiply-adds; ``None``: the framework's own default (tinygrad chooses).

            >>> backends.load("tinygrad").Backend.default_device()   # 'CL' on a CPU-only machine with pocl
        """
        return None

    @property
    def accelerator(self) -> bool:
        """Whether the device is an accelerator (a GPU), not the host CPU: bench's default batch follows it."""
        return self.device.lower().split(":")[0] in ACCELERATOR_DEVICES

    def _missing(self, what: str) -> NotImplementedError:
        return NotImplementedError(f"the {self.name} backend has no {what}")

    # -- variants --

    def options(self) -> dict:
        """The constructor keywords that make a backend like this one (what :meth:`variant` starts from)."""
        return {"device": self.device, "dtype": self.dtype}

    def variant(self, **changes) -> AbstractBackend:
        """A new backend of this class with some constructor options changed.

            >>> exact = tinygrad_backend.variant(winograd=False)
        """
        return type(self)(**{**self.options(), **changes})

    def for_nonfinite_input(self) -> AbstractBackend:
        """The variant that inputs holding NaN/inf run on, where the fast path spreads them differently
        from the reference (tinygrad's Winograd tiles, onnxruntime's MaxPool); ``portres.Model`` picks it."""
        return self

    def for_gradients(self) -> AbstractBackend:
        """The variant training differentiates: lowerings whose gradients are fast (strided convs over
        the space-to-depth input, no Winograd), computing the same function."""
        return self

    def for_training(self) -> AbstractBackend:
        """The view a training computation's forward pass runs on: :meth:`for_gradients`, or where the
        backend has one its own training view (MLX on several CPU streams splits the batch across them;
        its activations are then the view's own and only the logits come out)."""
        return self.for_gradients()

    def data_parallel(self, group, *, sync_bn: bool = False) -> AbstractBackend:
        """This backend as one replica of ``group``, a process group of its module (``ProcessGroup``: its
        ``all_reduce_mean``, differentiable ``all_sum`` and ``size``): the train step averages gradients
        and running statistics through it, and with ``sync_bn`` batch norm uses every rank's batch."""
        if "group" not in self.options():
            raise self._missing("data-parallel training")
        return self.variant(group=group, sync_bn=sync_bn)

    # -- arrays and parameters --

    def from_numpy(self, x: np.ndarray):
        """``x`` (NCHW for images) as this backend's array, in its dtype and layout, on its device."""
        raise self._missing("from_numpy")

    def to_numpy(self, x) -> np.ndarray:
        """A backend array back as NumPy (NCHW for images; float32 or float64)."""
        raise self._missing("to_numpy")

    def load_params(self, plan, params: dict) -> dict:
        """``{name: backend array}`` for the NumPy ``params`` of ``plan`` (conv weights given as OIHW)."""
        raise self._missing("load_params")

    def compile(self, forward):
        """``forward(params, x) -> logits`` made fast (traced, jitted) for repeated calls with one params dict.
        ``forward`` may also return a tuple of arrays (stage outputs); the compiled function returns the same."""
        raise self._missing("compile")

    def realize(self, x):
        """``x`` computed (lazy frameworks evaluate it); returns ``x``."""
        return x

    def end_block(self, x):
        """A residual block's output: where a lazy framework cuts its graph (walker.run_plan calls it)."""
        return x

    def synchronize(self) -> None:
        """Wait until the device has finished the work queued so far (for timing)."""

    def memory(self) -> dict:
        """Device memory figures for reports (e.g. ``device_peak_memory_bytes``); empty when unknown."""
        return {}

    def search_kernels(self, beam: int) -> None:
        """Search kernel schedules ``beam`` wide when compiling (tinygrad's BEAM; 0: off). Backends
        without such a search ignore it."""

    # -- primitives (the plan walker's; activations NCHW as far as callers can tell) --

    def conv2d(self, x, weight, bias, stride, padding, groups):
        """Grouped 2-D convolution (weight OIHW as loaded; ``bias`` may be None), square stride and padding."""
        raise self._missing("conv2d")

    def batch_norm(self, x, weight, bias, mean, var, eps):
        """Eval-mode batch norm with the given running statistics."""
        raise self._missing("batch_norm")

    def channel_affine(self, x, scale, shift):
        """``x * scale + shift`` per channel (a folded batch norm)."""
        raise self._missing("channel_affine")

    def relu(self, x):
        """``max(x, 0)``; NaN stays NaN."""
        raise self._missing("relu")

    def max_pool(self, x, kernel_size, stride, padding):
        """Max pooling with -inf padding; a window holding NaN gives NaN."""
        raise self._missing("max_pool")

    def zero_pad(self, x, padding):
        """``padding`` zero rows and columns on every side."""
        raise self._missing("zero_pad")

    def avg_pool(self, x, kernel_size, stride):
        """Average pooling in ceil mode, dividing by the in-bounds pixels of each window."""
        raise self._missing("avg_pool")

    def subsample(self, x, stride):
        """Every ``stride``-th row and column (option A shortcuts)."""
        raise self._missing("subsample")

    def pad_channels(self, x, before, after):
        """Zero channels added before and after (option A shortcuts)."""
        raise self._missing("pad_channels")

    def add(self, x, y):
        """``x + y`` (a block's branch and shortcut)."""
        raise self._missing("add")

    def global_avg_pool(self, x):
        """The mean over height and width: (N, C)."""
        raise self._missing("global_avg_pool")

    def linear(self, x, weight, bias):
        """``x @ weight.T + bias``."""
        raise self._missing("linear")

    # -- training --

    def batch_norm_train(self, x, weight, bias, eps):
        """Train-mode batch norm: ``(y, batch mean, unbiased batch variance)``."""
        raise self._missing("training (batch_norm_train)")

    def cross_entropy(self, logits, targets):
        """Mean cross-entropy of ``logits`` against soft ``targets`` (rows summing to 1)."""
        raise self._missing("training (cross_entropy)")

    def value_and_grad(self, loss_fn):
        """``loss_fn(trainable) -> (loss, aux)`` -> ``f(trainable) -> (loss, aux, grads)`` by the framework's
        autodiff (where ``autodiff`` is True)."""
        raise self._missing("autodiff (value_and_grad): portres.training.grads differentiates it by hand")

    def compile_train_step(self, step):
        """``step(state, images, targets, lr, count)`` made fast for repeated calls; default: as it is."""
        return step

    def all_reduce_mean(self, tree: dict) -> dict:
        """The mean over every replica of each array in ``tree``; one replica: ``tree`` itself."""
        return tree if self.group is None else self.group.all_reduce_mean(tree)

    def replica_hashes(self, state: dict) -> list[str]:
        """SHA-256 of each replica's copy of ``state`` held by this process (one, by default)."""
        return [state_sha256({name: self.to_numpy(value) for name, value in state.items()})]

    def synchronized_batch_norm(self, parts: list, local_count: int, weight, bias, eps, *, channel_sum, rsqrt,
                                per_channel=lambda v: v, each=None) -> tuple:
        """Train-mode batch norm with every rank's batch (sync BN): ``(normalised parts, mean, unbiased
        variance)``, the statistics summed over ``group`` by its differentiable ``all_sum`` (whose backward
        sums the gradients too). ``parts`` hold this rank's batch (``local_count`` values per channel);
        the framework's ``channel_sum``, ``rsqrt``, ``per_channel`` and ``each`` as :func:`two_pass_statistics`."""
        count = local_count * self.group.size  # every rank holds an equal share of the global batch
        mean, centered, var = two_pass_statistics(parts, count, channel_sum=channel_sum, per_channel=per_channel,
                                                  each=each, total=self.group.all_sum)
        scale, shift = per_channel(weight * rsqrt(var + eps)), per_channel(bias)
        each = each or (lambda function, items: [function(item) for item in items])
        return each(lambda c: c * scale + shift, centered), mean, var * (count / (count - 1))


class Forwarding(AbstractBackend):
    """A backend whose twelve primitives all go through one method, :meth:`call_primitive`: a view of
    another backend (MLX's split batch, the bench's timed primitives), a graph builder's scope, or a
    backend that dispatches by name itself (onnxruntime).

        >>> class Logged(Forwarding):
        ...     def __init__(self, inner):
        ...         self.inner, self.calls = inner, []
        ...     def call_primitive(self, primitive, *args):
        ...         self.calls.append(primitive)
        ...         return getattr(self.inner, primitive)(*args)
    """

    def call_primitive(self, primitive: str, *args):
        """``primitive(*args)``, as this view computes it."""
        raise self._missing(primitive)


def _forwarder(primitive: str):
    def forward(self, *args):
        return self.call_primitive(primitive, *args)

    forward.__name__ = forward.__qualname__ = primitive
    forward.__doc__ = f"``{primitive}`` through :meth:`call_primitive`."
    return forward


for _primitive in PRIMITIVES:
    setattr(Forwarding, _primitive, _forwarder(_primitive))
del _primitive
