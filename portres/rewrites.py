"""Plan rewrites: the same network computed by other ops, or a network with parts taken out.

- :func:`fold_batch_norm`: eval-mode BN folded into the conv before it (or a per-channel affine),
  the rewrite every framework backend runs;
- :func:`delete_blocks`: residual branches (or shape-keeping plain blocks) deleted, the lesion study's.

    >>> plan, params = fold_batch_norm(make_plan("resnet20"), portres.init_params("resnet20"))
    >>> any(op.kind == "batch_norm" for op in plan.ops)
    False
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .plan import ChannelAffine, Op, Plan


def fold_batch_norm(plan: Plan, params: dict) -> tuple[Plan, dict]:
    """Fold eval-mode BN into the ops around it: the rewrite every framework backend runs.

    ``conv -> bn`` becomes one conv with a bias; a BN that follows no conv (pre-activation
    nets) becomes a per-channel ``channel_affine`` with its statistics folded in. Either way
    the op writes the BN's value name, so later ops and the reference's per-op values line
    up. Params are float32 NumPy arrays; the arithmetic is done in float64 and rounded once.

        >>> folded_plan, folded_params = fold_batch_norm(plan, portres.init_params(plan.spec))
    """
    readers: dict[str, int] = {}
    for op in plan.ops:
        for value in op.inputs:
            readers[value] = readers.get(value, 0) + 1
    by_output = {op.output: op for op in plan.ops}
    features = {value for _, value in plan.features}
    folded_into: dict[str, Op] = {}  # bn op name -> the conv it absorbs
    for op in plan.ops:
        if op.kind != "batch_norm":
            continue
        source = by_output.get(op.inputs[0])
        if source is not None and source.kind == "conv2d" and readers[source.output] == 1 \
                and op.inputs[0] not in features:
            folded_into[op.name] = source
    absorbed = {conv.name: bn_name for bn_name, conv in folded_into.items()}

    def scale_and_shift(bn: Op) -> tuple[np.ndarray, np.ndarray]:
        stat = lambda suffix: params[f"{bn.name}.{suffix}"].astype(np.float64)  # noqa: E731
        scale = stat("weight") / np.sqrt(stat("running_var") + bn.layer.eps)
        return scale, stat("bias") - stat("running_mean") * scale

    norms = {op.name for op in plan.ops if op.kind == "batch_norm"}  # every one is folded away below
    ops, new_params = [], {key: value for key, value in params.items() if key.rsplit(".", 1)[0] not in norms}
    for op in plan.ops:
        if op.name in folded_into:
            continue
        if op.name in absorbed:
            bn = plan.op(absorbed[op.name])
            scale, shift = scale_and_shift(bn)
            weight = params[f"{op.name}.weight"].astype(np.float64)
            bias = params[f"{op.name}.bias"].astype(np.float64) if op.layer.bias else 0.0
            new_params[f"{op.name}.weight"] = (weight * scale[:, None, None, None]).astype(np.float32)
            new_params[f"{op.name}.bias"] = (bias * scale + shift).astype(np.float32)
            op = Op(op.name, dataclasses.replace(op.layer, bias=True), op.inputs, bn.output)
        elif op.kind == "batch_norm":
            # computing rsqrt(var + eps) once here, not per element: inside mx.compile MLX
            # fused it into the activation pass (resnetv2_50 batch 16: 12.7 -> 21 images/s)
            scale, shift = scale_and_shift(op)
            new_params[f"{op.name}.scale"] = scale.astype(np.float32)
            new_params[f"{op.name}.shift"] = shift.astype(np.float32)
            op = Op(op.name, ChannelAffine(op.layer.channels), op.inputs, op.output)
        ops.append(op)
    return dataclasses.replace(plan, ops=tuple(ops)), new_params


def delete_blocks(plan: Plan, blocks) -> Plan:
    """The plan with the named blocks (``"layer2.3"``) deleted: the lesion rewrite (Veit et al. 2016).

    A *residual* block loses its residual branch and becomes its shortcut: ``relu(x + F(x))``
    becomes ``relu(shortcut(x))`` in v1 (identity, option-A padding or projection, whatever the
    block has; the ReLU after the addition stays, and on an identity shortcut of a post-ReLU
    input it changes nothing), ``x + F(x)`` becomes ``shortcut(x)`` in v2 (a v2 projection keeps
    the BN-ReLU it reads). This computes what the network computes with that branch's output
    zeroed. A *plain* block (no shortcut) is deleted whole - its convs, norms and ReLUs - and
    its output becomes its input, which is possible only where the block keeps the shape
    (stride 1, as many channels out as in); deleting a block that changes it raises
    ``ValueError``. Deleted ops' parameters are no longer part of the plan; value names of the
    remaining ops are unchanged, so features and per-op values line up with the intact plan.

        >>> lesioned = delete_blocks(make_plan("resnet56"), ["layer1.3", "layer3.0"])
        >>> sum(op.kind == "add" for op in lesioned.ops)
        25
    """
    if isinstance(blocks, str):
        blocks = [blocks]
    by_name = {block.name: block for block in plan.blocks}
    names = list(by_name)
    wanted = list(dict.fromkeys(blocks))
    unknown = [block for block in wanted if block not in names]
    if unknown:
        listed = f"{names[0]} ... {names[-1]}" if len(names) > 4 else ", ".join(names)
        raise ValueError(f"{plan.spec.name} has no block {unknown[0]!r}; its blocks are {listed} "
                         f"(layerS.B: stage S from 1, block B from 0)" if names else
                         f"{plan.spec.name} has no blocks to delete")
    ops = list(plan.ops)
    alias: dict[str, str] = {}  # deleted value -> the value that now stands for it
    removable: set[str] = set()  # op names that go once nothing reads them
    for block in wanted:
        members = [op for op in ops if plan.block_of.get(op.name) is by_name[block]]
        add = next((op for op in members if op.kind == "add"), None)
        if add is not None:  # residual: the add's output becomes the shortcut value (its second input)
            alias[add.output] = add.inputs[1]
            ops.remove(add)
            removable.update(op.name for op in members if op is not add)
            continue
        produced = {op.output for op in members}
        entry = next(name for op in members for name in op.inputs if name not in produced)
        convs = [op.layer for op in members if op.kind == "conv2d"]
        if any(conv.stride != 1 for conv in convs) or convs[0].in_channels != convs[-1].out_channels:
            raise ValueError(f"cannot delete the plain block {block} of {plan.spec.name}: it changes the shape "
                             f"({convs[0].in_channels} -> {convs[-1].out_channels} channels, stride "
                             f"{max(conv.stride for conv in convs)}), so nothing can stand in for it; delete a block "
                             "that keeps the shape")
        alias[members[-1].output] = entry
        for op in members:
            ops.remove(op)
    resolve = lambda value: resolve(alias[value]) if value in alias else value  # noqa: E731
    ops = [dataclasses.replace(op, inputs=tuple(resolve(v) for v in op.inputs)) for op in ops]
    features = tuple((name, resolve(value)) for name, value in plan.features)
    output = resolve(plan.output)
    while True:  # drop branch ops nothing reads any more (a v2 projection still reads its block's BN-ReLU)
        read = {value for op in ops for value in op.inputs} | {value for _, value in features} | {output}
        dead = [op for op in ops if op.name in removable and op.output not in read]
        if not dead:
            break
        ops = [op for op in ops if op not in dead]
    return dataclasses.replace(plan, ops=tuple(ops), features=features, output=output)


