"""One training step - forward, backward, optimiser update - written once, compiled per backend.

A step maps ``(TrainState, images, targets, lr, count) -> (TrainState, loss, logits)``: the state
(``portres.training.state``: parameters, BN buffers and optimiser slots held apart) is all it
keeps. Backends compile it their way (``lowering.compile_train_step``: MLX on one stream;
``TinyJit`` with the state updated in place; torch and NumPy run it as is), over the state's
flat dict (:meth:`TrainState.arrays`), which their compiled steps carry.

    >>> step = make_train_step(plan, backend, SGD(momentum=0.9))
    >>> state = initial_state(plan, backend, params, optimizer)
    >>> state, loss, logits = step(state, images, targets, 0.1, 1)

Data parallel, one more step sits between the gradients and the optimiser: the backend's
``all_reduce_mean(tree)`` (the identity on one replica; ``portres.training.replicas`` prepares a
backend whose version averages the gradients and the BN running statistics over the replicas:
averaging the statistics at every step equals averaging them at each checkpoint, since PyTorch's
update rule is linear, and keeps every replica identical). The loss and logits returned are this
replica's.
"""

from __future__ import annotations

import numpy as np

from ..plan import Plan
from .grads import gradient_function, trainable_names
from .state import TrainState


def initial_state(plan: Plan, lowering, params: dict[str, np.ndarray], optimizer,
                  optimizer_state: dict[str, np.ndarray] | None = None, frozen=frozenset()) -> TrainState:
    """The training state on ``lowering`` from NumPy parameters and BN buffers (and optimiser slots,
    ``{"<slot>.<parameter>": array}``, when resuming).

    Fresh optimiser slots are made in NumPy (``optimizer.init`` on the NumPy parameters) so that
    every array starts as a real device buffer (tinygrad's JIT takes no lazy constants). ``frozen``
    parameters (``--freeze``) are held with the buffers: no slots, no updates.
    """
    names = trainable_names(plan, frozen)
    slots = optimizer_state if optimizer_state is not None else optimizer.init({n: params[n] for n in names})
    loaded = lowering.load_params(plan, {name: np.asarray(value) for name, value in {**params, **slots}.items()})
    trained = set(names)
    return TrainState(params={name: loaded[name] for name in names},
                      buffers={name: loaded[name] for name in params if name not in trained},
                      slots={name: loaded[name] for name in slots})


def make_train_step(plan: Plan, lowering, optimizer, *, bn_momentum: float = 0.1, frozen=frozenset(),
                    lr_scale: dict[str, float] | None = None):
    """``step(state, images, targets, lr, count) -> (state, loss, logits)`` compiled for ``lowering``.

    ``state`` is a :class:`TrainState`; ``images``/``targets`` are backend arrays (soft targets, see
    ``grads.soft_targets``); ``lr`` is the learning rate of this update and ``count`` its 1-based number
    (AdamW's bias correction): Python numbers, passed to compiled steps as arrays so that changing them
    never recompiles. ``frozen`` (``--freeze``): parameters held in the state's buffers, untouched, their BNs
    in eval mode; ``lr_scale`` (``--lr-backbone``): ``{parameter: factor}`` of the learning rate.
    """
    compute = gradient_function(plan, lowering, bn_momentum=bn_momentum, frozen=frozen)

    def update(state: TrainState, images, targets, lr, count) -> tuple[TrainState, object, object]:
        loss, logits, running_stats, grads = compute(state.params, state.buffers, images, targets)
        # every replica applies the mean gradient and keeps the mean running statistics (one replica: as is)
        averaged = lowering.all_reduce_mean({**grads, **running_stats})
        grads = {name: averaged[name] for name in grads}
        running_stats = {name: averaged[name] for name in running_stats}
        params, slots = optimizer.update(state.params, grads, state.slots, lr, count, lr_scale=lr_scale)
        # frozen parameters and frozen BNs' statistics pass through as they came (bit-identical)
        return TrainState(params, {**state.buffers, **running_stats}, slots), loss, logits

    def flat(arrays: dict, images, targets, lr, count):  # what backends compile: one flat dict in and out
        state, loss, logits = update(TrainState.from_arrays(arrays), images, targets, lr, count)
        return state.arrays(), loss, logits

    compiled = lowering.compile_train_step(flat)

    def step(state: TrainState, images, targets, lr, count) -> tuple[TrainState, object, object]:
        arrays, loss, logits = compiled(state.arrays(), images, targets, lr, count)
        return TrainState.from_arrays(arrays), loss, logits

    return step
