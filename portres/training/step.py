"""One training step - forward, backward, optimiser update - written once, compiled per backend.

The training state is one flat dict of backend arrays: the trainable parameters, the BN
running statistics and the optimiser's slots (``optimizer/<slot>.<parameter>``). A step maps
``(state, images, targets, lr, count) -> (new state, loss, logits)``; nothing else is kept
anywhere. Backends compile it their way (``mx.compile``; ``TinyJit`` with the state updated in
place; torch and NumPy run it as is).

    >>> step = make_train_step(plan, backend, SGD(momentum=0.9))
    >>> state = initial_state(plan, backend, params, optimizer)
    >>> state, loss, logits = step(state, images, targets, 0.1, 1)

Data parallel, one more step sits between the gradients and the optimiser: a backend prepared by
``portres.training.distributed`` has ``all_reduce_mean(tree)``, which averages the gradients and
the BN running statistics over the replicas (averaging the statistics at every step equals
averaging them at each checkpoint, since PyTorch's update rule is linear, and keeps every replica
identical). The loss and logits returned are this replica's.
"""

from __future__ import annotations

import numpy as np

from ..plan import Plan
from ..weights import TRAINING_STATE
from .grads import gradient_function, trainable_names


def initial_state(plan: Plan, lowering, params: dict[str, np.ndarray], optimizer,
                  optimizer_state: dict[str, np.ndarray] | None = None) -> dict:
    """The training state on ``lowering`` from NumPy parameters (and optimiser slots, when resuming).

    Fresh optimiser slots are made in NumPy (``optimizer.init`` on the NumPy parameters) so that
    every array starts as a real device buffer (tinygrad's JIT takes no lazy constants).
    """
    names = trainable_names(plan)
    slots = optimizer_state if optimizer_state is not None else optimizer.init({n: params[n] for n in names})
    numpy_state = {**params, **{TRAINING_STATE + key: value for key, value in slots.items()}}
    return lowering.load_params(plan, {name: np.asarray(value) for name, value in numpy_state.items()})


def split_state(state: dict) -> tuple[dict, dict]:
    """``(model parameters and BN buffers, optimiser slots without their prefix)``."""
    model = {name: value for name, value in state.items() if not name.startswith(TRAINING_STATE)}
    slots = {name[len(TRAINING_STATE):]: value for name, value in state.items() if name.startswith(TRAINING_STATE)}
    return model, slots


def make_train_step(plan: Plan, lowering, optimizer, *, bn_momentum: float = 0.1):
    """``step(state, images, targets, lr, count) -> (state, loss, logits)`` compiled for ``lowering``.

    ``images``/``targets`` are backend arrays (soft targets, see ``grads.soft_targets``); ``lr`` is
    the learning rate of this update and ``count`` its 1-based number (AdamW's bias correction):
    Python numbers, passed to compiled steps as arrays so that changing them never recompiles.
    """
    compute = gradient_function(plan, lowering, bn_momentum=bn_momentum)
    names = trainable_names(plan)
    # data parallel (portres.training.distributed): the backend averages a tree over the replicas
    average = getattr(lowering, "all_reduce_mean", None)

    def step(state, images, targets, lr, count):
        model, slots = split_state(state)
        trainable = {name: model[name] for name in names}
        buffers = {name: value for name, value in model.items() if name not in trainable}
        loss, logits, running_stats, grads = compute(trainable, buffers, images, targets)
        if average is not None:  # every replica applies the mean gradient and keeps the mean running statistics
            averaged = average({**grads, **running_stats})
            grads = {name: averaged[name] for name in grads}
            running_stats = {name: averaged[name] for name in running_stats}
        updated, slots = optimizer.update(trainable, grads, slots, lr, count)
        return {**updated, **running_stats, **{TRAINING_STATE + key: v for key, v in slots.items()}}, loss, logits

    compile_step = getattr(lowering, "compile_train_step", None)
    return compile_step(step) if compile_step is not None else step


def state_to_numpy(lowering, state: dict) -> dict[str, np.ndarray]:
    """The training state as NumPy arrays (parameters in portres's layout: OIHW convs)."""
    return {name: lowering.to_numpy(value) for name, value in state.items()}
