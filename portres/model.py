"""``portres.build``: a spec lowered to one backend, NumPy NCHW in, NumPy out.

    >>> import numpy as np, portres
    >>> model = portres.build("resnet20", "numpy")
    >>> model(np.zeros((2, 3, 32, 32), np.float32)).shape
    (2, 10)
    >>> sorted(model.features(np.zeros((1, 3, 32, 32))))
    ['layer1', 'layer2', 'layer3', 'stem']
    >>> model.embed(np.zeros((2, 3, 32, 32), np.float32)).shape   # the classifier's input
    (2, 64)
"""

from __future__ import annotations

import numpy as np

from .analysis import check_input_size
from .plan import INPUT, Op, Plan, make_plan
from .rewrites import fold_batch_norm
from .spec import ResNetSpec
from .walker import apply_op, run_plan
from .weights import WeightsError, init_params, load_weights
from .zoo import resolve as resolve_spec


class Model:
    """One spec on one backend. Parameters are explicit state held here, never global."""

    def __init__(self, spec: ResNetSpec, backend, plan: Plan, params: dict[str, np.ndarray], *,
                 class_names=None, data_config=None):
        self.spec = spec  # the architecture
        self._data_config = data_config  # how images become its inputs (None: the preset's, portres.data_config)
        self.backend = backend  # the backend's Backend object (device, dtype, primitives)
        self.plan = plan  # the plan it executes (BN may be folded into convs)
        self._class_names = None if class_names is None else checked_class_names(spec, class_names)
        self._compiled_outputs: dict = {}  # (exact variant?, plan values) -> compiled forward returning them
        # a backend whose framework keeps process-wide state has a real lock (tinygrad); calls then take turns
        self._lock = backend.lock
        self.params = backend.load_params(plan, params)  # backend arrays, keyed by parameter name
        self._forward = backend.compile(self._logits_on(backend))
        # where a backend's fast path spreads NaN/inf differently from the reference (tinygrad's Winograd
        # tiles), its for_nonfinite_input is an exact variant; inputs holding NaN/inf run there, so they
        # propagate as in the reference (a finite input never pays for this)
        exact = backend.for_nonfinite_input()
        self._exact = (exact, exact.compile(self._logits_on(exact))) if exact is not backend else None

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The label of each output class: the ones given (a checkpoint's), else ImageNet-1k's for a
        1000-class network, else None (then labels read ``class N``)."""
        if self._class_names is None:
            from .data.imagenet import class_names

            self._class_names = class_names(self.spec.num_classes)
        return self._class_names

    @property
    def data_config(self):
        """How an image becomes this network's input (:func:`portres.preprocess` with ``config=``): the one
        given (a ``portres train`` checkpoint's: its image size and its data set's mean and std), else
        the preset's (:func:`portres.data_config`)."""
        if self._data_config is None:
            from .zoo import data_config

            self._data_config = data_config(self.spec)
        return self._data_config

    def __repr__(self) -> str:
        return f"<portres.Model {self.spec.name} on {self.backend.name}:{self.backend.device} {self.backend.dtype}>"

    def _logits_on(self, backend):
        # the plan, not self: a forward that held the model would make a cycle, and a model (with its
        # framework's sessions and buffers) would then wait for the garbage collector instead of going at once
        plan = self.plan
        return lambda params, x: run_plan(plan, backend, params, x)[plan.output]

    def _lowering_for(self, x: np.ndarray) -> tuple:
        """(backend, compiled forward) for the NumPy input ``x``: the exact variant if it holds NaN/inf."""
        if self._exact is not None and not np.isfinite(x).all():
            return self._exact
        return self.backend, self._forward

    def check_input(self, x) -> np.ndarray:
        """``x`` as an array after checking rank, channels, size and dtype (``ValueError`` if wrong)."""
        return check_images(self.plan, x)

    def __call__(self, x) -> np.ndarray:
        """Logits ``(N, num_classes)`` for the NCHW batch ``x``."""
        x = self.check_input(x)
        backend, forward = self._lowering_for(x)
        with self._lock:
            return backend.to_numpy(forward(self.params, backend.from_numpy(x)))

    def forward(self, x_on_device):
        """Logits as a backend array, for an input already converted with
        ``model.backend.from_numpy``: no checks, no copies (what benchmarks time). Assumes a finite
        input; ``model(x)`` handles NaN/inf exactly."""
        return self._forward(self.params, x_on_device)

    @property
    def feature_info(self) -> list[dict]:
        """One dict per feature (the stem, then each stage): ``name``, ``channels`` and ``reduction``
        (input pixels per output pixel, per side), read off the plan.

            >>> portres.build("resnet50").feature_info[3]
            {'name': 'layer3', 'channels': 1024, 'reduction': 16}
        """
        return self.plan.feature_info()

    def features(self, x, stages=None) -> dict[str, np.ndarray]:
        """The stem's and stages' outputs (NCHW), keyed ``stem``, ``layer1``, ...: those named in
        ``stages`` (default: all), computed by the backend's compiled path and only as far as needed.

            >>> model.features(images, ["layer3"])["layer3"].shape
            (1, 1024, 14, 14)
        """
        by_name = dict(self.plan.features)
        names = list(by_name) if stages is None else list(dict.fromkeys([stages] if isinstance(stages, str)
                                                                         else stages))
        unknown = [name for name in names if name not in by_name]
        if unknown or not names:
            raise ValueError(f"unknown stage {', '.join(map(repr, unknown)) or '(none given)'} of "
                             f"{self.spec.name}: choose from {', '.join(by_name)}")
        outputs = self.compiled_values(x, [by_name[name] for name in names])
        return dict(zip(names, outputs))

    def embed(self, x) -> np.ndarray:
        """The globally pooled features ``(N, C)``: the classifier's input (a headless model's output).

            >>> portres.build("resnet50").embed(images).shape
            (1, 2048)
        """
        return self.compiled_values(x, [self.plan.pooled])[0]

    def compiled_values(self, x, values) -> list[np.ndarray]:
        """Plan values (by value name) for the NCHW batch ``x``, from a compiled forward pass that stops
        at the last of them (one compilation per set of values, kept)."""
        x = self.check_input(x)
        values = tuple(values)
        backend, _ = self._lowering_for(x)
        key = (backend is not self.backend, values)
        with self._lock:
            if key not in self._compiled_outputs:
                self._compiled_outputs[key] = backend.compile(self._values_on(backend, values))
            outputs = self._compiled_outputs[key](self.params, backend.from_numpy(x))
            return [backend.to_numpy(value) for value in outputs]

    def _values_on(self, backend, values: tuple[str, ...]):
        plan = self.plan.truncated(values)
        return lambda params, x: tuple(run_plan(plan, backend, params, x, keep=values)[value] for value in values)

    def values(self, x, keep, names: dict | None = None) -> dict[str, np.ndarray]:
        """Intermediate values by plan value name (``names`` maps new keys to value names), op by op
        (uncompiled: any values, e.g. for locating a divergence)."""
        x = self.check_input(x)
        backend, _ = self._lowering_for(x)
        with self._lock:
            kept = run_plan(self.plan, backend, self.params, backend.from_numpy(x), keep=tuple(keep))
            if names is None:
                return {name: backend.to_numpy(kept[name]) for name in keep}
            return {key: backend.to_numpy(kept[value]) for key, value in names.items()}

    def run_op(self, op: Op, inputs: list[np.ndarray]) -> np.ndarray:
        """Run a single op of the plan on given NCHW inputs (for locating divergences)."""
        with self._lock:
            args = [self.backend.from_numpy(np.asarray(a)) for a in inputs]
            return self.backend.to_numpy(apply_op(self.backend, op, args, self.params))


def checked_class_names(spec: ResNetSpec, names) -> tuple[str, ...]:
    """``names`` as a tuple of strings, one per output class of ``spec`` (``ValueError`` if not)."""
    names = tuple(names)
    if not all(isinstance(name, str) for name in names) or len(names) != spec.num_classes:
        raise ValueError(f"{len(names)} class names for {spec.name}'s {spec.num_classes} classes: "
                         "give one name (a string) per class")
    return names


def check_images(plan: Plan, x, min_batch: int = 1) -> np.ndarray:
    """``x`` as an array after checking it is a numeric NCHW batch ``plan`` can take (``ValueError`` if not)."""
    x = np.asarray(x)
    channels = plan.spec.in_channels
    if x.dtype.kind not in "fiu":
        raise ValueError(f"input dtype {x.dtype} is not numeric: pass a float array (N, {channels}, H, W)")
    if x.ndim != 4:
        raise ValueError(f"expected a 4-D NCHW array (batch, {channels}, height, width), got shape {x.shape}")
    if x.shape[1] != channels:
        hint = " (NHWC? use x.transpose(0, 3, 1, 2))" if x.shape[3] == channels else ""
        raise ValueError(f"expected {channels} input channels at axis 1 (NCHW), got shape {x.shape}{hint}")
    if x.shape[0] < min_batch:
        raise ValueError(f"expected a batch of at least {min_batch} image{'s' if min_batch > 1 else ''}, "
                         f"got shape {x.shape}")
    check_input_size(plan, x.shape[2:])
    return x


def plan_and_params(spec, params=None, *, seed: int = 0, fold: bool = False,
                    rewrite=None) -> tuple[ResNetSpec, Plan, dict[str, np.ndarray]]:
    """``(spec, plan, params)`` as :func:`build` runs them: ``spec`` resolved (a ResNetSpec or preset
    name), its plan, ``params`` loaded strictly (a mapping or weights file; ``None``:
    ``init_params(spec, seed)``), then the plan rewritten by ``rewrite(plan)`` if given (e.g. a
    lesion: the parameters it no longer uses are dropped) and BN folded into the convs if ``fold``.

        >>> spec, plan, params = plan_and_params("resnet20", fold=True)
        >>> "bn1.weight" in params
        False
    """
    spec = resolve_spec(spec)
    plan = make_plan(spec)
    params = init_params(plan, seed) if params is None else load_weights(params, plan)
    if rewrite is not None:
        plan = rewrite(plan)
        params = {name: params[name] for name in plan.param_shapes()}
    if fold:
        plan, params = fold_batch_norm(plan, params)
    return spec, plan, params


def build(spec, backend: str = "numpy", params=None, *, device: str | None = None, dtype: str | None = None,
          fold_batch_norm_into_conv: bool | None = None, seed: int = 0, class_names=None, data_config=None,
          **backend_options) -> Model:
    """Lower ``spec`` (a ResNetSpec or preset name) to ``backend``.

    ``params``: a mapping or weights file checked strictly against the spec (``None``:
    ``init_params(spec, seed)``). ``dtype``: the backend's compute dtype (``None``: float64
    for numpy, float32 elsewhere). BN folding defaults to what the backend prefers.
    ``backend_options`` go to the backend (mlx: ``cpu_streams``; torch: ``channels_last``).
    ``class_names``: one label per class (default: ImageNet's for 1000 classes, else none);
    ``data_config``: how images become inputs (default: the preset's, ``portres.data_config``).

        >>> logits = portres.build("resnet18", "tinygrad", device="CPU")(images)
    """
    from . import backends

    spec = resolve_spec(spec)
    module = backends.load(backend, device)
    lowering = module.Backend(device=device, dtype=dtype, **backend_options)
    fold = module.FOLD_BATCH_NORM if fold_batch_norm_into_conv is None else fold_batch_norm_into_conv
    spec, plan, params = plan_and_params(spec, params, seed=seed, fold=fold)
    _check_range(params, lowering.dtype)
    return Model(spec, lowering, plan, params, class_names=class_names, data_config=data_config)


def _check_range(params: dict[str, np.ndarray], dtype: str) -> None:
    """Weights (after any folding) must be finite in the dtype the backend computes in: a float16
    model would otherwise turn a large weight into inf without a word."""
    if dtype != "float16":  # float32 is checked by load_weights; bfloat16 and float64 have its range or more
        return
    limit = float(np.finfo(np.float16).max)
    over = [f"{name} (largest magnitude {float(np.max(np.abs(value))):.4g})" for name, value in params.items()
            if value.size and np.max(np.abs(value)) > limit]
    if over:
        raise WeightsError(f"weights too large for float16 (largest finite {limit:g}): {', '.join(over)}; "
                           "use float32 or bfloat16")


__all__ = ["Model", "build", "plan_and_params", "INPUT"]
