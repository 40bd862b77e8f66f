"""Cross-backend parity: one set of weights and one input through the float64 reference
and a backend, compared by relative L2 error; on failure, the first op that diverges.

    >>> import portres.parity as parity
    >>> [r.passed for r in parity.check("resnet20", ["mlx"], input_size=32)]
    [True]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .model import build
from .plan import INPUT, make_plan
from .walker import run_plan
from .weights import init_params
from .zoo import resolve as resolve_spec

# float16: every framework is within 2.2e-3 on the networks tests/test_parity.py runs, and a primitive off by
# 1% puts a network off by 1e-2 or more (2e-2 let it through); bfloat16 reaches 1.6e-2 on its own
TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}


def relative_error(out, ref) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64 over the entries where ``ref`` is finite.

    Non-finite values must match exactly: ``inf`` is returned when ``out`` has NaN, +inf or
    -inf anywhere ``ref`` has not (or the other way round), or when the shapes differ. So NaN
    never passes, except where the reference itself is NaN at the same place.
    """
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if out.shape != ref.shape:
        return math.inf
    finite = np.isfinite(ref)
    if not finite.all():
        same_nan = np.array_equal(np.isnan(out), np.isnan(ref))
        if not (same_nan and np.array_equal(out[~finite & ~np.isnan(ref)], ref[~finite & ~np.isnan(ref)])):
            return math.inf
        out, ref = out[finite], ref[finite]
    if not np.all(np.isfinite(out)):
        return math.inf
    scale = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / (scale if scale > 0 else 1.0))


def calibrate_batch_norm(spec, params: dict, images: np.ndarray, seed: int = 0) -> dict:
    """Random running statistics on the scale each BN actually sees on ``images``.

    Statistics that ignore the data let activations grow ~2x per residual block (float32
    overflows in resnet1202). Matching each channel's true mean and variance instead makes
    the network chaotic (eval-mode BN with batch statistics amplifies rounding
    exponentially with depth: plain110 disagreed with float64 by 30%). So each BN gets one
    data-derived number, the RMS ``s`` of its input, and random statistics around it:
    mean ~ N(0, (0.2 s)^2), variance ~ s^2 U(0.5, 2). Runs the float64 reference op by op.
    """
    from .backends.numpy import Backend

    plan = make_plan(spec)
    rng = np.random.default_rng(seed)
    params = dict(params)
    params64 = {name: np.asarray(value, np.float64) for name, value in params.items()}

    def set_statistics(op, args):
        if op.kind != "batch_norm":
            return
        scale = math.sqrt(float(np.mean(args[0] ** 2))) + 1e-12
        channels = args[0].shape[1]
        params[f"{op.name}.running_mean"] = (0.2 * scale * rng.standard_normal(channels)).astype(np.float32)
        params[f"{op.name}.running_var"] = (scale**2 * rng.uniform(0.5, 2.0, channels)).astype(np.float32)
        for suffix in ("running_mean", "running_var"):
            params64[f"{op.name}.{suffix}"] = params[f"{op.name}.{suffix}"].astype(np.float64)

    run_plan(plan, Backend(), params64, np.asarray(images, np.float64), before_op=set_statistics)
    return params


def parity_case(spec, input_size: int, batch: int = 2, seed: int = 0) -> tuple[np.ndarray, dict]:
    """A random input and random non-trivial weights (BN affine random, statistics calibrated)."""
    spec = resolve_spec(spec)
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, spec.in_channels, input_size, input_size)).astype(np.float32)
    params = init_params(spec, seed, randomize_batch_norm=True)
    return images, calibrate_batch_norm(spec, params, images, seed)


@dataclass
class ParityResult:
    backend: str  # backend name
    device: str  # device it ran on
    dtype: str  # compute dtype
    tolerance: float  # relative L2 error allowed
    logits_error: float = math.inf  # relative L2 error of the logits
    stage_errors: dict = field(default_factory=dict)  # feature name -> relative L2 error
    max_abs_error: float = math.inf  # largest absolute logit difference
    divergence: str | None = None  # first op whose own output is off (filled on failure)
    error: str | None = None  # why the backend could not run at all

    @property
    def worst_stage(self) -> tuple[str, float]:
        if not self.stage_errors:
            return ("-", math.inf)
        return max(self.stage_errors.items(), key=lambda item: item[1])

    @property
    def passed(self) -> bool:
        errors = [self.logits_error, *self.stage_errors.values()]
        return self.error is None and all(e < self.tolerance for e in errors)

    def to_dict(self) -> dict:
        name, worst = self.worst_stage
        return {"backend": self.backend, "device": self.device, "dtype": self.dtype, "tolerance": self.tolerance,
                "logits_error": self.logits_error, "worst_stage": name, "worst_stage_error": worst,
                "stage_errors": self.stage_errors, "max_abs_error": self.max_abs_error,
                "passed": self.passed, "divergence": self.divergence, "error": self.error}


class Reference:
    """The float64 reference run for one case, keeping the values comparisons need.

    ``keep_all`` keeps every intermediate value (for :func:`locate_divergence`); at large
    inputs that is a lot of float64 memory, so :func:`check` makes it only on failure.
    """

    def __init__(self, spec, images: np.ndarray, params: dict, keep_all: bool = False):
        self.model = build(spec, "numpy", params)
        plan = self.model.plan
        keep = [op.output for op in plan.ops] if keep_all else [v for _, v in plan.features] + [plan.output]
        self.values = self.model.values(images, [INPUT, *keep])
        self.logits = self.values[plan.output]
        self.features = {name: self.values[value] for name, value in plan.features}


def parity_input_size(spec) -> int:
    """The input side parity checks run at, small to be quick: 32x32 for CIFAR stems, 64x64 otherwise
    (every stage still > 1x1). Not the size a network is usually run at: that is
    :func:`portres.zoo.default_input_size`.

        >>> parity_input_size("resnet50")
        64
    """
    return 32 if resolve_spec(spec).stem.kind == "cifar" else 64


def compare(model, images: np.ndarray, reference: Reference) -> ParityResult:
    """Compare ``model`` with ``reference``: logits through ``model(x)`` — the compiled path
    users run (TinyJit, mx.compile, MLX's per-core streams) — and every stage output."""
    plan, lowering = model.plan, model.backend
    result = ParityResult(lowering.name, lowering.device, lowering.dtype, TOLERANCE[lowering.dtype])
    logits = model(images)
    result.logits_error = relative_error(logits, reference.logits)
    both_finite = np.isfinite(logits) & np.isfinite(reference.logits) if logits.shape == \
        reference.logits.shape else None
    result.max_abs_error = float(np.max(np.abs(logits - reference.logits)[both_finite], initial=0.0)) \
        if both_finite is not None else math.inf
    features = model.features(images)
    result.stage_errors = {name: relative_error(features[name], reference.features[name]) for name, _ in plan.features}
    return result


def locate_divergence(model, reference: Reference) -> str | None:
    """The first op of ``model``'s plan whose output, fed the reference's inputs, is off.

    Each op runs alone on exact (reference) inputs, so accumulated rounding elsewhere
    cannot blame the wrong op. ``reference`` must have been made with ``keep_all=True``.
    """
    tolerance = TOLERANCE[model.backend.dtype]
    for op in model.plan.ops:
        args = [reference.values[name] for name in op.inputs]
        error = relative_error(model.run_op(op, args), reference.values[op.output])
        if error >= tolerance:
            return f"{op.name} ({op.kind}): relative error {error:.3g} on exact inputs"
    return None


def check_memory(spec, input_size: int, batch: int) -> None:
    """Refuse a parity run whose float64 reference alone would not fit in memory (``ValueError``)."""
    from .analysis import activation_bytes, available_memory_bytes

    need = activation_bytes(resolve_spec(spec), input_size, batch, itemsize=8)
    have = available_memory_bytes()
    if have is not None and need > 0.8 * have:
        raise ValueError(f"parity of {resolve_spec(spec).name} at batch {batch}, {input_size}x{input_size} needs about "
                         f"{need / 2**30:.1f} GiB for the float64 reference's activations, and "
                         f"{have / 2**30:.1f} GiB are available: lower --batch or --input-size")


def check(spec, backends, *, input_size: int | None = None, batch: int = 2, dtype: str = "float32", seed: int = 0,
          device: str | None = None, locate: bool = True) -> list[ParityResult]:
    """Parity of each backend in ``backends`` against the reference on one random case.

    A backend that cannot be built or crashes is reported (``error``), and the others still run.
    """
    spec = resolve_spec(spec)
    input_size = input_size or parity_input_size(spec)
    from .backends.numpy import DTYPES as NUMPY_DTYPES

    if "numpy" in backends and dtype not in NUMPY_DTYPES:
        raise ValueError(f"the numpy backend computes in {' or '.join(NUMPY_DTYPES)}, not {dtype}: "
                         "leave numpy out of the backends or choose float32")
    check_memory(spec, input_size, batch)
    images, params = parity_case(spec, input_size, batch, seed)
    reference = Reference(spec, images, params)
    full_reference = None
    results = []
    for name in backends:
        try:
            # float64 is held to the unfolded model: folding BN rounds the folded weights to float32
            model = build(spec, name, params, device=device, dtype=dtype,
                          fold_batch_norm_into_conv=False if dtype == "float64" else None)
            result = compare(model, images, reference)
            if not result.passed and locate:
                full_reference = full_reference or Reference(spec, images, params, keep_all=True)
                result.divergence = locate_divergence(model, full_reference)
        except Exception as error:  # noqa: BLE001 - reported per backend, the others still run
            result = ParityResult(name, device or "-", dtype, TOLERANCE.get(dtype, 0),
                                  error=f"{type(error).__name__}: {error}")
        results.append(result)
    return results
