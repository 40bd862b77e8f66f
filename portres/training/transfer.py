"""Fine-tuning's side of training: the parts ``--freeze`` holds still and the learning rates ``--lr-backbone``
scales. (Loading the pretrained weights is :func:`portres.weights.load_weights` with ``strict=False``.)

Parts come from the plan, never from parameter names: the stem and each stage are the plan's features
(``Plan.parts`` says which op is in which), and ``"backbone"`` is everything but the classifier.

    >>> plan = make_plan("resnet18")
    >>> freeze_choices(plan)
    ['stem', 'layer1', 'layer2', 'layer3', 'layer4', 'backbone']
    >>> sorted(frozen_parameters(plan, "stem"))[:2]
    ['bn1.bias', 'bn1.running_mean']
    >>> learning_rate_scales(plan, 0.1, frozen_parameters(plan, "layer2"))["layer3.0.conv1.weight"]
    0.1
"""

from __future__ import annotations

import math

from ..plan import Plan
from ..weights import classifier_names
from .config import TrainingError

BACKBONE = "backbone"  # every part but the classifier


def freeze_choices(plan: Plan) -> list[str]:
    """What ``--freeze`` accepts for ``plan``, in network order: the stem, each stage, then ``"backbone"``."""
    return [name for name, _ in plan.features] + [BACKBONE]


def frozen_parameters(plan: Plan, part: str | None) -> frozenset[str]:
    """The parameters and BN buffers of ``part`` and of everything before it (``None``: nothing frozen).

    A part that does not exist raises :class:`TrainingError` listing those that do."""
    if part is None:
        return frozenset()
    choices = freeze_choices(plan)
    if part not in choices:
        raise TrainingError(f"--freeze {part!r} is not a part of {plan.spec.name}; its parts are "
                            f"{', '.join(choices)} (each freezes itself and everything before it)")
    if part == BACKBONE:
        classifier = set(classifier_names(plan))
        names = {name for name in plan.param_shapes() if name not in classifier}
    else:
        held = set(choices[:choices.index(part) + 1])
        names = {name for op in plan.ops if plan.parts[op.name] in held for name in op.param_shapes()}
    trainable = {name for name, (_, is_trainable) in plan.param_shapes().items() if is_trainable}
    if trainable <= names:
        raise TrainingError(f"--freeze {part} leaves nothing of {plan.spec.name} to train (it has no classifier): "
                            f"freeze an earlier part ({', '.join(choices[:-2])})")
    return frozenset(names)


def learning_rate_scales(plan: Plan, factor: float | None, frozen: frozenset[str]) -> dict[str, float]:
    """``{parameter: factor}`` for each trained backbone parameter (the classifier keeps the full rate);
    ``{}`` without a factor. A factor with nothing to scale raises :class:`TrainingError`."""
    if factor is None:
        return {}
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
        raise TrainingError(f"--lr-backbone {factor!r} must be a finite number > 0 (a factor of the learning rate)")
    classifier = set(classifier_names(plan))
    scaled = {name: float(factor) for name, (_, trainable) in plan.param_shapes().items()
              if trainable and name not in frozen and name not in classifier}
    if not scaled or not classifier:
        why = "the whole backbone is frozen" if not scaled else \
            f"{plan.spec.name} has no classifier to keep at full rate"
        raise TrainingError(f"--lr-backbone scales the trained backbone's learning rate against the classifier's, but "
                            f"{why}: drop --lr-backbone{' or freeze less' if not scaled else ''}")
    return scaled
