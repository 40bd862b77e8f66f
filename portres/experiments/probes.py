"""Gradients with respect to values inside a network (a block's input, the image), on every backend.

Frameworks differentiate a function with respect to its arguments, so each value ``v`` whose
gradient is wanted gets a zero *probe* array added right after the op that writes it: everything
downstream reads ``v + 0``, and the gradient with respect to the probe is the gradient with respect
to ``v``. The NumPy reference needs no probes: its reverse walker keeps the gradient of every value
(``portres.training.backprop.backward(..., value_grads=...)``). The two are computed independently,
so comparing them checks both.

An op can also read a *detached* copy of one of its inputs (same numbers, no gradient through that
edge): :func:`gradients` with ``detached={(op name, argument index), ...}``. That is how
:mod:`portres.experiments.lesion` sends the gradient down a single path of a residual network.

Batch norm runs in training mode (each batch's own statistics), as in training; running statistics
are not updated: nothing here trains. The forward pass is the plan's own train-mode walker
(:func:`portres.walker.run_plan_train` with ``probes`` and ``constants``).

    >>> result = gradients(plan, lowering, arrays, images, Objective.cross_entropy(labels, 10), ["layer1.0.relu2"])
    >>> result.value_grads["layer1.0.relu2"].shape
    (16, 16, 32, 32)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..losses import softmax_cross_entropy
from ..plan import INPUT, Plan
from ..training.backprop import backward
from ..training.grads import soft_targets, trainable_names, uses_reference_backward
from ..walker import run_plan_train

PROBE = "probe:"  # prefix of the probe arrays among the differentiated arguments
DETACHED = "@detached"  # suffix of the value name an op reads instead of a detached input


@dataclass(frozen=True)
class Objective:
    """The scalar that is differentiated, from the logits ``(N, K)``: the mean cross-entropy against
    soft targets (``kind="cross_entropy"``), or ``sum(logits * weights)`` (``kind="linear"``: the
    gradient of one direction in logit space, as in the shattered-gradients analysis)."""

    kind: str  # "cross_entropy" or "linear"
    targets: np.ndarray  # (N, K): soft targets, or the weight of each logit

    @classmethod
    def cross_entropy(cls, labels, num_classes: int) -> Objective:
        return cls("cross_entropy", soft_targets(np.asarray(labels), num_classes, 0.0, np.float64))

    def on(self, lowering, logits, targets):
        """The objective on backend arrays."""
        if self.kind == "cross_entropy":
            return lowering.cross_entropy(logits, targets)
        return (logits * targets).sum()

    def grad_of_logits(self, lowering, logits: np.ndarray) -> np.ndarray:
        """Its gradient with respect to the logits (NumPy reference)."""
        if self.kind == "cross_entropy":
            return lowering.cross_entropy_backward(logits, self.targets)
        return self.targets

    def value(self, logits: np.ndarray) -> float:
        if self.kind == "cross_entropy":
            return float(softmax_cross_entropy(logits, self.targets))
        return float((logits * self.targets).sum())


@dataclass
class Gradients:
    objective: float  # the objective's value
    value_grads: dict  # value name -> gradient (NumPy, NCHW), one per value asked for
    param_grads: dict  # trainable parameter -> gradient (NumPy, OIHW), when asked for
    kept: dict  # value name -> forward value (NumPy), one per value in ``keep``


def detach_inputs(plan: Plan, detached) -> Plan:
    """``plan`` with each ``(op name, argument index)`` in ``detached`` reading ``<value>@detached``
    instead: a value the caller supplies as a constant (see :func:`gradients`)."""
    detached = set(detached)
    ops = []
    for op in plan.ops:
        inputs = tuple(value + DETACHED if (op.name, index) in detached else value
                       for index, value in enumerate(op.inputs))
        ops.append(dataclasses.replace(op, inputs=inputs) if inputs != op.inputs else op)
    return dataclasses.replace(plan, ops=tuple(ops))


def forward_values(plan: Plan, lowering, arrays: dict, images: np.ndarray, values=None) -> dict:
    """The train-mode forward values named in ``values`` (every value if None), as NumPy arrays: pass
    them to :func:`gradients` as ``forward`` to differentiate several times after one forward pass."""
    values = tuple(op.output for op in plan.ops) + (INPUT,) if values is None else tuple(values)
    kept, _ = run_plan_train(plan, lowering, arrays, lowering.from_numpy(images), momentum=None, keep=values)
    return {value: lowering.to_numpy(kept[value]) for value in values}


def gradients(plan: Plan, lowering, arrays: dict, images: np.ndarray, objective: Objective, values=(), *,
              detached=(), keep=(), param_grads: bool = False, forward: dict | None = None) -> Gradients:
    """The objective of the train-mode forward pass on ``images`` and its gradient with respect to
    each value named in ``values`` (``INPUT`` is the image), and to every trainable parameter if
    ``param_grads``; ``keep`` names forward values to return as well.

    ``lowering`` is a training backend (``portres.training.grads.training_backend``), ``arrays``
    its parameters (``lowering.load_params``); NumPy in, NumPy out (NCHW). ``detached``: ``(op name,
    argument index)`` pairs whose input the op reads as a constant. ``forward``: the forward values
    from :func:`forward_values` on the same images, reused for the detached inputs (and by the NumPy
    reference instead of its own forward pass, for which it needs every value).
    """
    values, keep = list(dict.fromkeys(values)), list(dict.fromkeys(keep))
    rewired = detach_inputs(plan, detached) if detached else plan
    detached_values = sorted({plan.op(name).inputs[index] for name, index in detached})
    if uses_reference_backward(lowering):
        return _reference(plan, rewired, lowering, arrays, images, objective, values, keep, detached_values,
                          param_grads, forward)
    x = lowering.from_numpy(images)
    constants = {}
    if detached_values:  # the detached inputs' numbers, from a forward pass whose graph is then dropped
        if forward is None or any(value not in forward for value in detached_values):
            forward = forward_values(plan, lowering, arrays, images, detached_values)
        constants = {value + DETACHED: lowering.from_numpy(forward[value]) for value in detached_values}
    shapes = plan.shapes(images.shape[2:])
    probes = {PROBE + value: lowering.from_numpy(np.zeros((images.shape[0], *shapes[value]))) for value in values}
    names = trainable_names(plan) if param_grads else []
    fixed = {name: value for name, value in arrays.items() if name not in names}
    targets = lowering.from_numpy(objective.targets)
    differentiated = lowering.for_gradients()  # the whole batch on one stream: probes see every image

    def objective_fn(arguments):
        params = {**fixed, **{name: arguments[name] for name in names}}
        kept, _ = run_plan_train(rewired, differentiated, params, x, momentum=None, keep=keep, constants=constants,
                                 probes={value: arguments[PROBE + value] for value in values})
        logits = kept[plan.output] if plan.output in keep else kept.pop(plan.output)
        return objective.on(differentiated, logits, targets), kept

    arguments = {**{name: arrays[name] for name in names}, **probes}
    value, kept, grads = lowering.value_and_grad(objective_fn)(arguments)
    return Gradients(float(lowering.to_numpy(value)),
                     {v: lowering.to_numpy(grads[PROBE + v]) for v in values},
                     {name: lowering.to_numpy(grads[name]) for name in names},
                     {v: lowering.to_numpy(kept[v]) for v in keep})


def _reference(plan, rewired, lowering, arrays, images, objective, values, keep, detached_values, param_grads,
               given) -> Gradients:
    """The NumPy reference: every forward value kept, then its hand-written reverse walker."""
    every_value = tuple(op.output for op in plan.ops) + (INPUT,)
    if given is not None and all(value in given for value in every_value):
        forward = {value: lowering.from_numpy(given[value]) for value in every_value}
    else:
        forward, _ = run_plan_train(plan, lowering, arrays, lowering.from_numpy(images), keep=every_value)
    forward.update({value + DETACHED: forward[value] for value in detached_values})
    logits = forward[plan.output]
    value_grads = dict.fromkeys(values)
    # ops whose output reaches the logits only through detached edges get no gradient: the reverse walker
    # runs without them (and their parameters' gradients are zero, as autodiff reports them)
    read = {rewired.output}
    live = []
    for op in reversed(rewired.ops):
        if op.output in read:
            live.append(op)
            read.update(op.inputs)
    reachable = dataclasses.replace(rewired, ops=tuple(reversed(live)))
    grads = backward(reachable, lowering, arrays, forward, objective.grad_of_logits(lowering, logits), value_grads)
    if param_grads:
        grads = {name: grads[name] if name in grads else np.zeros_like(arrays[name]) for name in trainable_names(plan)}
    missing = [value for value, grad in value_grads.items() if grad is None]
    for value in missing:  # no gradient reaches it (e.g. behind a detached edge): zero, as autodiff reports
        value_grads[value] = np.zeros_like(forward[value])
    return Gradients(objective.value(logits), value_grads, grads if param_grads else {},
                     {v: forward[v] for v in keep})
