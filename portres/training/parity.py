"""Gradient parity: one batch through the float64 reference's hand-written backward and each
framework's autodiff, compared like the forward pass (relative L2 error).

    >>> from portres.training import parity
    >>> [r.passed for r in parity.check_grads("resnet20", ["mlx"], input_size=32)]
    [True]

Thresholds in float32: the loss 1e-5, all gradients concatenated 1e-4, each parameter's
gradient 1e-3, the updated BN running statistics 1e-5. Backends also compute in float64, where
the thresholds are 100x tighter still. Deep train-mode BN networks at initialisation are
chaotic: NumPy's own float32 gradients of plain110 differ from its float64 ones by 140% (of
resnet50 at 64x64 by 2%), because rounding is amplified about 1e9-fold through 110 layers and
a ReLU input within rounding of zero flips its gradient. So every zoo entry is held to the
reference in float64, whatever its conditioning (plain110, the worst, is off by 2e-7 there),
and in float32 where float32 arithmetic itself can meet the float32 thresholds.

On failure the report names the first parameter, in plan order from the output backwards,
whose gradient diverges: the op a broken backward sits in (or just before).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..parity import parity_input_size, relative_error
from ..plan import make_plan
from ..weights import init_params
from .grads import loss_and_grads, trainable_names

TOLERANCES = {
    "float32": {"loss": 1e-5, "grads": 1e-4, "parameter": 1e-3, "running_stats": 1e-5},
    "float64": {"loss": 1e-7, "grads": 1e-6, "parameter": 1e-5, "running_stats": 1e-7},
}


def gradient_case(spec, input_size: int, batch: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Random images and labels, and weights with random (non-trivial) BN scales, shifts and statistics."""
    plan = make_plan(spec)
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, plan.spec.in_channels, input_size, input_size)).astype(np.float32)
    labels = rng.integers(0, plan.spec.num_classes, batch)
    return images, labels, init_params(plan, seed, randomize_batch_norm=True)


def gate_margin(spec, params: dict, images: np.ndarray) -> float:
    """How far the case's gradient gates are from flipping, relative to the values' scale: the
    smallest ``|x| / rms(x)`` over every ReLU input and the smallest gap between the two largest
    values of a max-pool window (over its input's rms; windows of ReLU zeros pass no gradient
    and do not count), in the float64 train-mode forward pass.

    A float32 gradient can only be compared with a float64 one where float32 rounding cannot
    push a value across a kink: where the margin is well above float32's rounding (~1e-7 per op).
    """
    from ..backends.numpy import Backend
    from ..walker import run_plan_train

    plan = make_plan(spec)
    gated = [op for op in plan.ops if op.kind in ("relu", "max_pool")]
    reference = Backend()
    values, _ = run_plan_train(plan, reference, reference.load_params(plan, params), reference.from_numpy(images),
                               keep=tuple({name for op in gated for name in op.inputs}))
    margin = math.inf
    for op in gated:
        x = values[op.inputs[0]]
        scale = math.sqrt(float(np.mean(x * x))) or 1.0
        if op.kind == "relu":
            margin = min(margin, float(np.min(np.abs(x))) / scale)
        else:
            layer = op.layer
            padded = np.pad(x, ((0, 0), (0, 0), (layer.padding,) * 2, (layer.padding,) * 2), constant_values=-np.inf)
            windows = np.lib.stride_tricks.sliding_window_view(padded, (layer.kernel_size,) * 2, axis=(2, 3))
            windows = windows[:, :, ::layer.stride, ::layer.stride].reshape(*x.shape[:2], -1, layer.kernel_size**2)
            top_two = np.partition(windows, -2, axis=-1)[..., -2:]
            live = top_two[..., 1] != 0  # an all-zero window after a ReLU passes no gradient, whatever it picks
            gaps = (top_two[..., 1] - top_two[..., 0])[live]
            margin = min(margin, float(np.min(gaps, initial=np.inf)) / scale)
    return margin


FLOAT32_GATE_MARGIN = 1e-4  # gates this far (relative) from their kinks stay put under float32 rounding


def gate_safe_case(spec, input_size: int, batch: int = 4, seed: int = 0, min_margin: float = FLOAT32_GATE_MARGIN,
                   attempts: int = 200) -> tuple[np.ndarray, np.ndarray, dict]:
    """The first of the seeds ``seed, seed + 1, ...`` whose :func:`gradient_case` has every gradient
    gate at least ``min_margin`` from flipping (``ValueError`` if none within ``attempts``)."""
    for candidate in range(seed, seed + attempts):
        case = gradient_case(spec, input_size, batch, candidate)
        if gate_margin(spec, case[2], case[0]) >= min_margin:
            return case
    raise ValueError(f"no case within {attempts} seeds keeps every ReLU and max-pool gate {min_margin:g} from "
                     "its kink: use a smaller network, input or batch")


@dataclass
class GradParityResult:
    backend: str  # backend name
    device: str  # device it ran on
    dtype: str = "float32"  # compute dtype (sets the thresholds)
    loss_error: float = math.inf  # relative error of the loss
    grads_error: float = math.inf  # relative L2 error of all gradients concatenated
    parameter_errors: dict = field(default_factory=dict)  # parameter name -> relative L2 error of its gradient
    running_stats_error: float = math.inf  # relative L2 error of all updated BN statistics concatenated
    error: str | None = None  # why the backend could not run at all

    @property
    def worst_parameter(self) -> tuple[str, float]:
        if not self.parameter_errors:
            return ("-", math.inf)
        return max(self.parameter_errors.items(), key=lambda item: item[1])

    @property
    def tolerance(self) -> dict:
        return TOLERANCES[self.dtype]

    @property
    def divergence(self) -> str | None:
        """The first parameter from the output backwards whose gradient is off, with its error."""
        for name, error in reversed(list(self.parameter_errors.items())):
            if not error < self.tolerance["parameter"]:
                return f"{name}: gradient relative error {error:.3g}"
        return None

    @property
    def passed(self) -> bool:
        tolerance = self.tolerance
        return (self.error is None and self.loss_error < tolerance["loss"] and self.grads_error < tolerance["grads"]
                and self.running_stats_error < tolerance["running_stats"] and bool(self.parameter_errors)
                and all(e < tolerance["parameter"] for e in self.parameter_errors.values()))

    def to_dict(self) -> dict:
        name, worst = self.worst_parameter
        return {"backend": self.backend, "device": self.device, "dtype": self.dtype, "loss_error": self.loss_error,
                "grads_error": self.grads_error, "worst_parameter": name, "worst_parameter_error": worst,
                "running_stats_error": self.running_stats_error, "passed": self.passed,
                "divergence": self.divergence, "error": self.error, "parameter_errors": self.parameter_errors}


def _concatenated(arrays: dict, names) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[name], np.float64).ravel() for name in names])


def compare_grads(result: GradParityResult, reference: tuple, computed: tuple, plan) -> GradParityResult:
    """Fill ``result`` from ``(loss, grads, running_stats)`` of the reference and of a backend."""
    (ref_loss, ref_grads, ref_stats), (loss, grads, stats) = reference, computed
    names = trainable_names(plan)
    result.loss_error = relative_error(np.array([loss]), np.array([ref_loss]))
    result.grads_error = relative_error(_concatenated(grads, names), _concatenated(ref_grads, names))
    # A gradient that is zero but for rounding has no relative error to speak of: a conv bias that a
    # train-mode BN normalises away (Keras' ResNets) gets exactly 0 plus each framework's rounding. So a
    # parameter's error is taken relative to at least the `grads` tolerance of its share of the whole
    # gradient's norm; any gradient above that share is held to its own norm as before.
    total = _concatenated(ref_grads, names)
    share = lambda size: result.tolerance["grads"] * np.linalg.norm(total) * math.sqrt(size / total.size)  # noqa: E731
    result.parameter_errors = {name: _parameter_error(grads[name], ref_grads[name], share) for name in names}
    result.running_stats_error = relative_error(_concatenated(stats, ref_stats), _concatenated(ref_stats, ref_stats))
    return result


def _parameter_error(grad, reference, share) -> float:
    grad, reference = np.asarray(grad, np.float64), np.asarray(reference, np.float64)
    floor = share(reference.size)
    if not np.linalg.norm(reference) < floor or grad.shape != reference.shape or not np.isfinite(grad).all():
        return relative_error(grad, reference)
    return float(np.linalg.norm(grad - reference) / floor)


def check_grads(spec, backends, *, input_size: int | None = None, batch: int = 4, seed: int = 0,
                device: str | None = None, dtype: str = "float32", label_smoothing: float = 0.0,
                bn_momentum: float = 0.1) -> list[GradParityResult]:
    """Gradient parity of each backend in ``backends`` against the float64 reference on one random batch.

    A backend that cannot run is reported (``error``) and the others still run.
    """
    if dtype not in TOLERANCES:
        raise ValueError(f"gradient parity runs in {' or '.join(TOLERANCES)}, not {dtype!r}")
    plan = make_plan(spec)
    images, labels, params = gradient_case(plan.spec, input_size or parity_input_size(plan.spec), batch, seed)
    options = {"label_smoothing": label_smoothing, "bn_momentum": bn_momentum}
    reference = loss_and_grads(plan.spec, "numpy", params, images, labels, dtype="float64", **options)
    results = []
    for name in backends:
        result = GradParityResult(name, device or "-", dtype)
        try:
            computed = loss_and_grads(plan.spec, name, params, images, labels, device=device, dtype=dtype, **options)
            compare_grads(result, reference, computed, plan)
        except Exception as error:  # noqa: BLE001 - reported per backend, the others still run
            result.error = f"{type(error).__name__}: {error}"
        results.append(result)
    return results
