"""Reverse mode over the plan, for a backend without autodiff (the NumPy reference).

The forward pass keeps every value; the backward pass walks the ops in reverse and calls
the backend's hand-written ``<primitive>_backward`` for each, summing the gradients of values
read by several ops (a block's input feeds its convs and its shortcut). Written once, like
:func:`portres.walker.apply_op`, so the architecture stays in :mod:`portres.plan`.

    >>> values, stats = run_plan_train(plan, reference, params, images, keep=all_values)
    >>> grads = backward(plan, reference, params, values, grad_of_logits)
    >>> grads["fc.weight"].shape
    (10, 64)
"""

from __future__ import annotations

from ..plan import INPUT, Op, Plan


def backward_op(primitives, op: Op, args: list, grad, params: dict) -> tuple[list, dict]:
    """``(gradients of op.inputs, {parameter name: gradient})`` of one train-mode op."""
    layer, name, kind = op.layer, op.name, op.kind
    if kind == "conv2d":
        grad_x, grad_weight = primitives.conv2d_backward(grad, args[0], params[f"{name}.weight"], layer.stride,
                                                         layer.padding, layer.groups)
        grads = {f"{name}.weight": grad_weight}
        if layer.bias:
            grads[f"{name}.bias"] = grad.sum((0, 2, 3))
        return [grad_x], grads
    if kind == "batch_norm":
        grad_x, grad_weight, grad_bias = primitives.batch_norm_train_backward(grad, args[0], params[f"{name}.weight"],
                                                                              layer.eps)
        return [grad_x], {f"{name}.weight": grad_weight, f"{name}.bias": grad_bias}
    if kind == "linear":
        grad_x, grad_weight, grad_bias = primitives.linear_backward(grad, args[0], params[f"{name}.weight"])
        return [grad_x], {f"{name}.weight": grad_weight, f"{name}.bias": grad_bias}
    if kind == "add":
        return [grad, grad], {}
    if kind == "relu":
        return [primitives.relu_backward(grad, args[0])], {}
    if kind == "max_pool":
        return [primitives.max_pool_backward(grad, args[0], layer.kernel_size, layer.stride, layer.padding)], {}
    if kind == "zero_pad":
        return [primitives.zero_pad_backward(grad, layer.padding)], {}
    if kind == "avg_pool":
        return [primitives.avg_pool_backward(grad, args[0], layer.kernel_size, layer.stride)], {}
    if kind == "subsample":
        return [primitives.subsample_backward(grad, args[0], layer.stride)], {}
    if kind == "pad_channels":
        return [primitives.pad_channels_backward(grad, layer.before, layer.after)], {}
    if kind == "global_avg_pool":
        return [primitives.global_avg_pool_backward(grad, args[0])], {}
    raise NotImplementedError(f"no backward for op kind {kind!r} (training runs unfolded plans)")


def backward(plan: Plan, primitives, params: dict, values: dict, grad_output, value_grads: dict | None = None,
             trainable=None) -> dict:
    """Gradients of every trainable parameter, given every forward value and the output's gradient.

    ``value_grads``, if given, names values (its keys; ``INPUT`` too) whose gradients are wanted:
    each is set to the value's total gradient (``None`` if none reaches it).

    ``trainable``, if given, names the parameters wanted (``--freeze`` leaves out a prefix of the network):
    the walk stops before the first op that holds none of them and has none before it.
    """
    pending = {plan.output: grad_output}  # value name -> gradient accumulated so far
    grads: dict = {}
    ops = plan.ops
    if trainable is not None and value_grads is None:
        wanted = set(trainable)
        first = next((index for index, op in enumerate(ops) if wanted & set(op.param_shapes())), len(ops))
        ops = ops[first:]  # the ops before hold nothing trained: no gradient needs to reach them
    for op in reversed(ops):
        grad = pending.pop(op.output, None)
        if value_grads is not None and op.output in value_grads:
            value_grads[op.output] = grad
        if grad is None:  # nothing downstream depends on this value
            continue
        input_grads, param_grads = backward_op(primitives, op, [values[name] for name in op.inputs], grad, params)
        for name, input_grad in zip(op.inputs, input_grads):
            pending[name] = pending[name] + input_grad if name in pending else input_grad
        grads.update(param_grads)
    if value_grads is not None and INPUT in value_grads:
        value_grads[INPUT] = pending.get(INPUT)
    if trainable is None:
        trainable = [name for name, (_, is_trainable) in plan.param_shapes().items() if is_trainable]
    return {name: grads[name] for name in trainable}
