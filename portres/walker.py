"""The one forward walker: a plan executed op by op with a backend's primitives.

:func:`run_plan` runs batch norm in eval mode (inference, parity, features); :func:`run_plan_train`
in training mode, with PyTorch's running-statistics update and the hooks the probes use. Both are
:func:`_walk`, which drops each value after its last reader.

    >>> values = run_plan(make_plan("resnet20"), numpy_backend, params, images)
    >>> values[plan.output].shape
    (2, 10)
"""

from __future__ import annotations

from .plan import INPUT, Op, Plan


def apply_op(primitives, op: Op, args: list, params: dict):
    """Run one op with a backend's primitives (the set is listed in ``portres.backends``)."""
    layer, name = op.layer, op.name
    kind = layer.kind
    if kind == "conv2d":
        return primitives.conv2d(args[0], params[f"{name}.weight"], params.get(f"{name}.bias"),
                                 layer.stride, layer.padding, layer.groups)
    if kind == "batch_norm":
        return primitives.batch_norm(args[0], params[f"{name}.weight"], params[f"{name}.bias"],
                                     params[f"{name}.running_mean"], params[f"{name}.running_var"], layer.eps)
    if kind == "channel_affine":
        return primitives.channel_affine(args[0], params[f"{name}.scale"], params[f"{name}.shift"])
    if kind == "relu":
        return primitives.relu(args[0])
    if kind == "max_pool":
        return primitives.max_pool(args[0], layer.kernel_size, layer.stride, layer.padding)
    if kind == "zero_pad":
        return primitives.zero_pad(args[0], layer.padding)
    if kind == "avg_pool":
        return primitives.avg_pool(args[0], layer.kernel_size, layer.stride)
    if kind == "subsample":
        return primitives.subsample(args[0], layer.stride)
    if kind == "pad_channels":
        return primitives.pad_channels(args[0], layer.before, layer.after)
    if kind == "add":
        return primitives.add(args[0], args[1])
    if kind == "global_avg_pool":
        return primitives.global_avg_pool(args[0])
    if kind == "linear":
        return primitives.linear(args[0], params[f"{name}.weight"], params[f"{name}.bias"])
    raise NotImplementedError(f"no lowering for op kind {kind!r}")


def run_plan(plan: Plan, primitives, params: dict, x, keep: tuple[str, ...] = (), before_op=None) -> dict:
    """Execute ``plan`` on ``x`` (batch norm in eval mode); returns ``{value name: array}`` for the
    output and ``keep``.

    Values are dropped after their last reader, so peak memory stays that of one block.
    ``before_op(op, args)``, if given, runs before each op (and may update ``params``).
    Each block's output goes through the backend's ``end_block`` (lazy frameworks cut their graph
    there; elsewhere it returns its argument).
    """
    block_outputs = plan.block_outputs
    apply = lambda op, args: apply_op(primitives, op, args, params)  # noqa: E731
    cut = lambda value, result: primitives.end_block(result) if value in block_outputs else result  # noqa: E731
    return _walk(plan, apply, x, keep, before_op=before_op, after_op=cut)


def run_plan_train(plan: Plan, primitives, params: dict, x, *, momentum: float | None = 0.1,
                   keep: tuple[str, ...] = (), probes: dict | None = None,
                   constants: dict | None = None, frozen_norms=frozenset()) -> tuple[dict, dict]:
    """Execute ``plan`` with batch norm in training mode; returns ``(values, running_stats)``.

    Each BN normalises with its batch's mean and biased variance (the backend's
    ``batch_norm_train`` primitive returns them with the unbiased variance), and its running
    statistics are updated with PyTorch's rule, written here once for every backend:
    ``running = (1 - momentum) * running + momentum * batch`` (unbiased variance). BN state
    is passed in ``params`` and returned, never kept anywhere else (``momentum=None``: none are
    computed, for passes that do not train). Plans are never folded in training, and graphs are
    not cut at block ends (that would cut tinygrad's gradients).

    For gradients with respect to values inside the network (:mod:`portres.experiments.probes`):
    ``probes`` maps value names (``INPUT`` too) to arrays added to the value once it is written,
    and ``constants`` maps extra value names to arrays ops may read (e.g. a detached copy).

    ``frozen_norms`` names BN ops of a frozen part (``portres train --freeze``): they run in eval mode
    with their running statistics, which are neither updated nor returned.

        >>> values, stats = run_plan_train(plan, backend, params, images)
        >>> sorted(stats)[:2]
        ['bn1.running_mean', 'bn1.running_var']
    """
    running_stats: dict = {}

    def apply(op: Op, args: list):
        if op.kind != "batch_norm" or op.name in frozen_norms:
            return apply_op(primitives, op, args, params)
        name = op.name
        y, mean, var = primitives.batch_norm_train(args[0], params[f"{name}.weight"], params[f"{name}.bias"],
                                                   op.layer.eps)
        if momentum is not None:
            for suffix, batch in (("running_mean", mean), ("running_var", var)):
                running_stats[f"{name}.{suffix}"] = params[f"{name}.{suffix}"] * (1 - momentum) + batch * momentum
        return y

    if probes:
        add_probe = lambda value, result: primitives.add(result, probes[value]) if value in probes else result  # noqa: E731
    else:
        add_probe = None
    return _walk(plan, apply, x, keep, after_op=add_probe, constants=constants), running_stats


def _walk(plan: Plan, apply, x, keep, *, before_op=None, after_op=None, constants=None) -> dict:
    """The one forward walker: ``apply(op, args)`` for each op in order, values dropped after their
    last reader. ``before_op(op, args)`` runs before an op; ``after_op(value name, result)`` may
    replace what is written (``INPUT`` included)."""
    wanted = set(keep) | {plan.output}
    last_use = plan.last_uses()
    x = after_op(INPUT, x) if after_op is not None else x
    values = {**(constants or {}), INPUT: x}
    kept = {INPUT: x} if INPUT in wanted else {}
    for index, op in enumerate(plan.ops):
        args = [values[name] for name in op.inputs]
        if before_op is not None:
            before_op(op, args)
        result = apply(op, args)
        if after_op is not None:
            result = after_op(op.output, result)
        values[op.output] = result
        if op.output in wanted:
            kept[op.output] = result
        for name in set(op.inputs):
            if last_use[name] == index:
                del values[name]
    return kept
