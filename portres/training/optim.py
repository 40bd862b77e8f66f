"""SGD and AdamW written once for every backend.

The update rules use only the arrays' arithmetic operators (``+ - * /``, ``** 0.5``, unary ``-``), which
NumPy, tinygrad, MLX and torch arrays all provide, so one implementation serves every backend and no
framework is imported here. Everything is functional with explicit state, so a whole train step can be
compiled (``mx.compile``, ``TinyJit``)::

    opt = SGD(momentum=0.9, weight_decay=1e-4, decay_filter=no_decay_for_norms_and_biases)
    state = opt.init(params)                                   # {"momentum_buffer.<name>": array}
    params, state = opt.update(params, grads, state, lr=0.1, step=1)

``params``, ``grads`` and ``state`` are flat dicts ``name -> backend array``; ``state`` keys are
``"<slot>.<parameter name>"`` with torch's slot names (``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``).
``lr_scale`` (``{name: factor}``, optional) multiplies some parameters' learning rate, as torch's parameter
groups do (``--lr-backbone``): weight decay and AdamW's decoupled decay use the scaled rate too.
``lr`` and ``step`` (the 1-based count of updates, this one included) may be Python numbers or 0-d arrays
of the backend; pass arrays to a compiled step so that a new value does not retrace it. For checkpoints
the caller converts ``state`` to NumPy and back and records ``opt.config()``; :func:`from_config` rebuilds
the optimiser so that a resume can refuse a mismatched one.

Precision: with ``step`` a float32 array, AdamW's bias correction ``1 - beta2 ** step`` is rounded in
float32 (about 1e-5 relative at the first steps, as in torch's ``capturable=True`` path); with a Python
int it is exact, as in torch's default path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from .checks import require

DecayFilter = Callable[[str, tuple], bool]  # (parameter name, shape) -> apply weight decay to it?


def decay_all(name: str, shape: tuple) -> bool:
    """Weight-decay every parameter (torch's default). Example: ``decay_all("fc.bias", (10,))`` -> True."""
    return True


def no_decay_for_norms_and_biases(name: str, shape: tuple) -> bool:
    """Exempt 1-D parameters from weight decay: biases and norm-layer affine parameters are 1-D, conv and
    linear weights are not. Decided by shape because names cannot tell a deep stem's BN (``conv1.1.weight``)
    from a conv; this is the timm/torchvision recipe.

    Example: ``no_decay_for_norms_and_biases("conv1.1.weight", (32,))`` -> False.
    """
    return len(shape) > 1


DECAY_FILTERS = {f.__name__: f for f in (decay_all, no_decay_for_norms_and_biases)}


def _check_trees(params: dict, grads: dict, state: dict, slots: tuple[str, ...]) -> None:
    expected_state = {f"{slot}.{name}" for slot in slots for name in params}
    for what, got, expected in (("grads", set(grads), set(params)), ("state", set(state), expected_state)):
        if got != expected:
            missing, unexpected = sorted(expected - got), sorted(got - expected)
            raise ValueError(f"{what} do not match params: missing {missing[:5]}, unexpected {unexpected[:5]}"
                             f"{'; build state with opt.init(params)' if what == 'state' else ''}")


class _Optimizer:
    slots: tuple[str, ...] = ()  # names of the per-parameter state arrays
    decay_filter: DecayFilter

    def init(self, params: dict) -> dict:
        """Zero state shaped like ``params`` (``p * 0``, so it has each array's type, dtype and device)."""
        return {f"{slot}.{name}": p * 0 for slot in self.slots for name, p in params.items()}

    def _decays(self, name: str, p) -> bool:
        return self.weight_decay != 0 and self.decay_filter(name, tuple(p.shape))

    def config(self) -> dict:
        """A JSON-able description; ``from_config(opt.config()) == opt``. The decay filter is recorded by name
        (built-ins: ``DECAY_FILTERS``); a custom one must be passed again to :func:`from_config`."""
        fields = asdict(self)
        fields["decay_filter"] = self.decay_filter.__name__
        return {"optimizer": type(self).__name__, **{k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in fields.items()}}


@dataclass(frozen=True)
class SGD(_Optimizer):
    """torch.optim.SGD with dampening 0: ``g += wd*p; b = momentum*b + g; g = g + momentum*b if nesterov
    else b; p -= lr*g``. Example: ``SGD(momentum=0.9, weight_decay=5e-4).update(params, grads, state, 0.1, 1)``.
    """

    momentum: float = 0.0  # heavy-ball coefficient; 0 keeps no state
    nesterov: bool = False  # use the Nesterov form g + momentum*b (needs momentum > 0)
    weight_decay: float = 0.0  # L2 coefficient added to the gradient
    decay_filter: DecayFilter = decay_all  # which parameters weight decay applies to

    def __post_init__(self) -> None:
        require(self.momentum >= 0, "momentum", self.momentum, "must be >= 0")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        require(not self.nesterov or self.momentum > 0, "nesterov", self.nesterov, "needs momentum > 0")

    @property
    def slots(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.momentum else ()

    def update(self, params: dict, grads: dict, state: dict, lr, step=None, lr_scale=None) -> tuple[dict, dict]:
        """One step: returns ``(new_params, new_state)``; ``step`` is unused by SGD."""
        _check_trees(params, grads, state, self.slots)
        new_params, new_state = {}, {}
        for name, p in params.items():
            lr_here = _scaled(lr, lr_scale, name)
            g = grads[name] + self.weight_decay * p if self._decays(name, p) else grads[name]
            if self.momentum:
                buffer = self.momentum * state[f"momentum_buffer.{name}"] + g
                new_state[f"momentum_buffer.{name}"] = buffer
                g = g + self.momentum * buffer if self.nesterov else buffer
            new_params[name] = p - lr_here * g
        return new_params, new_state


@dataclass(frozen=True)
class AdamW(_Optimizer):
    """torch.optim.AdamW (no amsgrad): decoupled decay ``p *= 1 - lr*wd``, bias-corrected moments, ``eps``
    added after the square root. Example: ``AdamW(weight_decay=0.05).update(params, grads, state, 1e-3, 1)``.
    """

    betas: tuple[float, float] = (0.9, 0.999)  # decay rates of the first and second moment averages
    eps: float = 1e-8  # added to the denominator after the square root
    weight_decay: float = 1e-2  # decoupled decay coefficient (torch's default)
    decay_filter: DecayFilter = decay_all  # which parameters weight decay applies to
    slots = ("exp_avg", "exp_avg_sq")

    def __post_init__(self) -> None:
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", self.betas,
               "must be two numbers in [0, 1)")
        object.__setattr__(self, "betas", tuple(self.betas))  # a list from JSON compares equal to the tuple
        require(self.eps >= 0, "eps", self.eps, "must be >= 0")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")

    def update(self, params: dict, grads: dict, state: dict, lr, step, lr_scale=None) -> tuple[dict, dict]:
        """One step: returns ``(new_params, new_state)``; ``step`` is 1-based (1 for the first update)."""
        _check_trees(params, grads, state, self.slots)
        beta1, beta2 = self.betas
        # float ** array falls back to array.__rpow__ (checked on tinygrad, MLX, torch and NumPy)
        correction1 = 1 - beta1 ** step
        correction2_sqrt = (1 - beta2 ** step) ** 0.5
        new_params, new_state = {}, {}
        for name, p in params.items():
            lr_here = _scaled(lr, lr_scale, name)
            step_size = lr_here / correction1
            g = grads[name]
            if self._decays(name, p):
                p = p * (1 - lr_here * self.weight_decay)
            exp_avg = beta1 * state[f"exp_avg.{name}"] + (1 - beta1) * g
            exp_avg_sq = beta2 * state[f"exp_avg_sq.{name}"] + (1 - beta2) * (g * g)
            denominator = exp_avg_sq ** 0.5 / correction2_sqrt + self.eps
            new_params[name] = p - step_size * exp_avg / denominator
            new_state[f"exp_avg.{name}"], new_state[f"exp_avg_sq.{name}"] = exp_avg, exp_avg_sq
        return new_params, new_state


def _scaled(lr, lr_scale, name: str):
    """``lr`` times ``lr_scale[name]`` where one is given (a factor of 1 leaves ``lr`` itself)."""
    factor = lr_scale.get(name, 1.0) if lr_scale else 1.0
    return lr if factor == 1.0 else lr * factor


OPTIMIZERS = {cls.__name__: cls for cls in (SGD, AdamW)}


def from_config(config: dict, decay_filter: DecayFilter | None = None) -> SGD | AdamW:
    """Rebuild an optimiser from :meth:`config`; pass ``decay_filter`` when it was a custom function.

    Example: ``from_config({"optimizer": "SGD", "momentum": 0.9}) == SGD(momentum=0.9)``.
    """
    fields = dict(config)
    cls = OPTIMIZERS.get(fields.pop("optimizer", None))
    require(cls is not None, "optimizer", config.get("optimizer"), f"must be one of {sorted(OPTIMIZERS)}")
    known = set(cls.__dataclass_fields__)
    require(set(fields) <= known, "config", sorted(set(fields) - known), f"unknown {cls.__name__} fields")
    name = fields.get("decay_filter")
    if decay_filter is not None:
        require(name in (None, decay_filter.__name__), "decay_filter", decay_filter.__name__,
               f"the configuration was made with {name!r}")
        fields["decay_filter"] = decay_filter
    elif name is not None:
        require(name in DECAY_FILTERS, "decay_filter", name,
               f"is not built in ({sorted(DECAY_FILTERS)}); pass the function: from_config(config, decay_filter=f)")
        fields["decay_filter"] = DECAY_FILTERS[name]
    return cls(**fields)
