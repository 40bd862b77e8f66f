"""The functional core of training: loss and gradients of one batch on any backend.

    >>> loss, grads, running_stats = portres.loss_and_grads("resnet20", "mlx", params, images, labels)
    >>> grads["conv1.weight"].shape, running_stats["bn1.running_var"].shape
    ((16, 3, 3, 3), (16,))

Frameworks differentiate with their own autodiff (tinygrad's ``Tensor.gradient``,
``mx.value_and_grad``, torch autograd); the NumPy reference chains hand-written backward
primitives over the plan (:mod:`portres.training.backprop`). Either way the forward pass is
the one walker with batch norm in training mode (:func:`portres.walker.run_plan_train`).
"""

from __future__ import annotations

import math

import numpy as np

from ..model import check_images
from ..plan import INPUT, Plan, make_plan
from ..walker import run_plan_train
from ..weights import load_weights
from .backprop import backward


def check_labels(labels, count: int, num_classes: int) -> np.ndarray:
    """``labels`` as int64 after checking there is one integer class in ``[0, num_classes)`` per image."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu" and not (labels.dtype.kind == "f" and np.all(labels == np.round(labels))):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.shape != (count,):
        raise ValueError(f"expected one label per image ({count}), got labels of shape {labels.shape}")
    outside = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if outside.size:
        raise ValueError(f"labels must lie in [0, {num_classes}): label {labels[outside[0]]} at index {outside[0]} "
                         f"does not; the network has {num_classes} classes (num_classes in the spec)")
    return labels.astype(np.int64)


def soft_targets(labels: np.ndarray, num_classes: int, label_smoothing: float, dtype) -> np.ndarray:
    """One-hot rows mixed with the uniform distribution: ``(1 - s) * onehot + s / K`` (PyTorch's rule)."""
    targets = np.full((labels.size, num_classes), label_smoothing / num_classes, dtype=np.float64)
    targets[np.arange(labels.size), labels] += 1.0 - label_smoothing
    return targets.astype(dtype)


def check_hyperparameters(label_smoothing: float, bn_momentum: float) -> None:
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing < 1.0):
        raise ValueError(f"label_smoothing={label_smoothing!r} must be a number in [0, 1)")
    if not (isinstance(bn_momentum, (int, float)) and 0.0 <= bn_momentum <= 1.0):
        raise ValueError(f"bn_momentum={bn_momentum!r} must be a number in [0, 1] (PyTorch's default: 0.1)")


def training_backend(backend: str, device: str | None = None, dtype: str | None = None,
                     macs_per_step: float | None = None):
    """The backend object a training computation runs on (float32; float64 for the NumPy reference); with no
    ``device``, the backend's default for steps of ``macs_per_step`` multiply-adds (tinygrad picks by it)."""
    from .. import backends

    if backend not in backends.TRAINABLE and backend in backends.NAMES:
        raise backends.BackendUnavailable(f"backend {backend!r} computes no gradients: train with "
                                          f"{', '.join(backends.TRAINABLE)}")
    module = backends.load(backend, device)
    if device is None:
        device = module.Backend.default_device(training_macs_per_step=macs_per_step)
    lowering = module.Backend(device=device, dtype=dtype)
    if lowering.dtype not in ("float32", "float64"):
        raise ValueError(f"training runs in float32 (or float64, for checks), not {lowering.dtype}")
    return lowering


def trainable_names(plan: Plan, frozen=frozenset()) -> list[str]:
    """The parameters training updates, in plan order: the trainable ones not ``frozen`` (``--freeze``)."""
    return [name for name, (_, trainable) in plan.param_shapes().items() if trainable and name not in frozen]


def frozen_norms(plan: Plan, frozen: frozenset[str]) -> frozenset[str]:
    """The BN ops whose parameters are all ``frozen``: they run in eval mode with their statistics untouched."""
    return frozenset(op.name for op in plan.ops if op.kind == "batch_norm" and set(op.param_shapes()) <= frozen)


LOGITS = "logits"  # key of the train-mode logits among a gradient function's auxiliary outputs


def gradient_function(plan: Plan, lowering, *, bn_momentum: float = 0.1, frozen=frozenset()):
    """``f(trainable, buffers, images, targets) -> (loss, logits, running_stats, grads)`` on backend
    arrays: the one definition of a training forward and backward, for :func:`loss_and_grads` and
    the train step. Frameworks differentiate it with their autodiff (``value_and_grad``); the NumPy
    reference runs it forward keeping every value and chains its hand-written backward primitives
    (which of the two: :func:`uses_reference_backward`).

    ``frozen`` names parameters and buffers that do not train (``portres train --freeze``): they come in
    ``buffers``, get no gradient, and the BNs they make up run in eval mode (statistics untouched).
    """
    norms = frozen_norms(plan, frozenset(frozen))
    if uses_reference_backward(lowering):
        wanted = trainable_names(plan, frozen)

        def reference(trainable, buffers, images, targets):
            every_value = tuple(op.output for op in plan.ops) + (INPUT,)
            arrays = {**trainable, **buffers}
            values, running_stats = run_plan_train(plan, lowering, arrays, images, momentum=bn_momentum,
                                                   keep=every_value, frozen_norms=norms)
            logits = values[plan.output]
            loss = lowering.cross_entropy(logits, targets)
            grads = backward(plan, lowering, arrays, values, lowering.cross_entropy_backward(logits, targets),
                             trainable=wanted)
            return loss, logits, running_stats, grads

        return reference

    differentiated = lowering.for_training()

    def loss_fn(trainable, buffers, images, targets):
        values, running_stats = run_plan_train(plan, differentiated, {**trainable, **buffers}, images,
                                               momentum=bn_momentum, frozen_norms=norms)
        logits = values[plan.output]
        return differentiated.cross_entropy(logits, targets), {**running_stats, LOGITS: logits}

    def framework(trainable, buffers, images, targets):
        loss, aux, grads = lowering.value_and_grad(lambda t: loss_fn(t, buffers, images, targets))(trainable)
        logits = aux.pop(LOGITS)
        return loss, logits, aux, grads

    return framework


def loss_and_grads(spec, backend: str, params, images, labels, *, device: str | None = None,
                   dtype: str | None = None, label_smoothing: float = 0.0,
                   bn_momentum: float = 0.1) -> tuple[float, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Mean softmax cross-entropy of the train-mode logits of one batch, its gradients and the
    updated BN running statistics: ``(loss, grads, running_stats)``, all NumPy.

    ``spec``: a ResNetSpec or preset name; ``params``: a mapping or weights file (strictly
    checked, as ``load_weights``); ``images``: NCHW, at least 2 (train-mode BN needs a batch);
    ``labels``: one class index per image. ``grads`` has one entry per trainable parameter in
    plan order (float64 on the NumPy reference, float32 elsewhere, or the ``dtype`` asked for);
    ``running_stats`` one per BN buffer. Nothing is mutated.

        >>> loss, grads, stats = portres.loss_and_grads("resnet20", "numpy", portres.init_params("resnet20"),
        ...                                             np.random.rand(4, 3, 32, 32), [0, 1, 2, 3])
    """
    plan = make_plan(spec)
    check_hyperparameters(label_smoothing, bn_momentum)
    params = load_weights(params, plan)
    images = check_images(plan, images, min_batch=2)
    labels = check_labels(labels, images.shape[0], plan.spec.num_classes)
    lowering = training_backend(backend, device, dtype)
    targets = soft_targets(labels, plan.spec.num_classes, label_smoothing, np.dtype(lowering.dtype))
    arrays = lowering.load_params(plan, params)
    trainable = {name: arrays[name] for name in trainable_names(plan)}
    buffers = {name: value for name, value in arrays.items() if name not in trainable}
    compute = gradient_function(plan, lowering, bn_momentum=bn_momentum)
    loss, _, running_stats, grads = compute(trainable, buffers, lowering.from_numpy(images),
                                            lowering.from_numpy(targets))
    loss = float(lowering.to_numpy(loss))
    if not math.isfinite(loss):
        raise FloatingPointError(f"the loss is {loss}: inputs or weights hold NaN/inf, or the network overflows")
    return (loss, {name: lowering.to_numpy(grads[name]) for name in trainable},
            {name: lowering.to_numpy(value) for name, value in running_stats.items()})


def uses_reference_backward(lowering) -> bool:
    """Whether gradients on ``lowering`` come from portres's hand-written backward (the NumPy reference)
    rather than the framework's autodiff: the one place that choice is made.

        >>> uses_reference_backward(training_backend("numpy")), uses_reference_backward(training_backend("mlx"))
        (True, False)
    """
    return not lowering.autodiff
