"""Residual networks as ensembles of paths (Veit, Wilber and Belongie 2016): lesion studies.

- **Deleting one block.** A residual block with its branch removed becomes its shortcut
  (:func:`portres.rewrites.delete_blocks`, a plan rewrite like BN folding, so it runs on every
  backend); the test error after deleting each block on its own shows how little any single one
  matters. In a plain network the same deletion - the block replaced by the identity, where the
  block keeps the shape - destroys it.
- **Deleting k random blocks**, k = 1..n, several draws each: the error grows smoothly with k.
- **Paths.** n residual blocks unroll into 2^n paths; C(n, k) of them pass through k residual
  branches (a binomial distribution of path lengths). The gradient a path of length k carries is
  estimated as in the paper: one train-mode forward pass, then backward passes that go through the
  branch of k randomly chosen blocks and through the shortcut of all others (the other edge of each
  addition is detached); its norm at the first block's input, averaged over draws, times C(n, k) is
  the gradient all paths of length k carry together. Most of it comes from short paths.

    >>> study = lesion_study("resnet56", "mlx", "runs/degradation/resnet56/best.safetensors", "digits")
    >>> study.single[0]
    {'block': 'layer1.0', 'test_error': 0.03...}
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import data as datasets
from ..model import Model, plan_and_params
from ..parity import relative_error
from ..plan import Plan, make_plan
from ..rewrites import delete_blocks
from ..training.grads import training_backend, uses_reference_backward
from ..training.loop import evaluate
from ..weights import load_weights
from ..zoo import resolve
from .gradflow import family_of
from .probes import Objective, forward_values, gradients

DRAWS = 5  # random draws of k deleted blocks per k
PATH_SAMPLES = 3  # random paths sampled per path length
PATH_BATCH = 32  # training images the path gradients are measured on


def deletable_blocks(plan: Plan) -> list[str]:
    """Blocks :func:`delete_blocks` can delete: every residual block; plain blocks that keep the shape."""
    names = []
    for block in plan.blocks:
        if block.add is not None:
            names.append(block.name)
            continue
        convs = [op.layer for op in plan.block_ops(block) if op.kind == "conv2d"]
        if all(conv.stride == 1 for conv in convs) and convs[0].in_channels == convs[-1].out_channels:
            names.append(block.name)
    return names


def lesioned_model(spec, backend: str, params: dict, blocks, *, device: str | None = None,
                   dtype: str | None = None, fold: bool | None = None) -> Model:
    """``spec`` with ``blocks`` deleted, built on ``backend`` like ``portres.build`` (BN folded into
    the convs where the backend prefers it: both rewrites compose)."""
    from .. import backends

    spec = resolve(spec)
    module = backends.load(backend, device)
    lowering = module.Backend(device=device, dtype=dtype)
    spec, plan, params = plan_and_params(spec, params, fold=module.FOLD_BATCH_NORM if fold is None else fold,
                                         rewrite=lambda intact: delete_blocks(intact, list(blocks)))
    return Model(spec, lowering, plan, params)


@dataclass
class LesionParity:
    backend: str  # backend compared with the float64 reference
    dtype: str  # its compute dtype
    blocks: list  # the deleted blocks
    logits_error: float  # relative L2 error of the logits
    passed: bool  # under the forward-parity tolerance (portres.parity.TOLERANCE)


def lesion_parity(spec, backends, blocks, *, input_size: int | None = None, batch: int = 2, seed: int = 0,
                  dtype: str = "float32") -> list[LesionParity]:
    """A lesioned plan on each backend against the float64 reference running the same lesioned plan,
    on the forward-parity case (random input, random BN statistics calibrated to the intact net)."""
    from ..parity import TOLERANCE, parity_case, parity_input_size

    spec = resolve(spec)
    images, params = parity_case(spec, input_size or parity_input_size(spec), batch, seed)
    reference = lesioned_model(spec, "numpy", params, blocks, dtype="float64")(images)
    results = []
    for name in backends:
        logits = lesioned_model(spec, name, params, blocks, dtype=dtype)(images)
        error = relative_error(logits, reference)
        results.append(LesionParity(name, dtype, list(blocks), error, error < TOLERANCE[dtype]))
    return results


@dataclass
class LesionStudy:
    """What :func:`lesion_study` measured (see the module docstring)."""

    network: str  # the spec's name
    family: str  # "residual", "plain" or "pre-activation"
    backend: str  # where it ran
    weights: str  # the weights file
    data: str  # the data set whose test split was used
    test_images: int  # images in the test split
    baseline_error: float  # top-1 test error of the intact network
    blocks: list  # every block's name, in order
    deletable: list  # the blocks that can be deleted
    single: list  # per deletable block: block, test_error
    random: list  # per k: k, draws, mean, std, min, max (test error after deleting k random blocks)
    paths: dict = field(default_factory=dict)  # residual nets: n, lengths, count, share_of_paths, gradient_norm,
    #                                            gradient_norm_std, samples, share_of_gradient

    def to_dict(self) -> dict:
        return asdict(self)


def _random_subsets(items: list, k: int, draws: int, rng) -> list[tuple]:
    """Up to ``draws`` distinct k-subsets of ``items`` (all of them when there are no more)."""
    total = math.comb(len(items), k)
    if total <= draws:
        from itertools import combinations

        return list(combinations(items, k))
    chosen: dict[tuple, None] = {}
    while len(chosen) < draws:
        picked = tuple(sorted(rng.choice(len(items), k, replace=False)))
        chosen[tuple(items[i] for i in picked)] = None
    return list(chosen)


def path_gradients(plan: Plan, lowering, arrays: dict, images: np.ndarray, labels: np.ndarray, *,
                   samples: int = PATH_SAMPLES, seed: int = 0, lengths=None) -> dict:
    """The gradient carried by paths of each length (see the module docstring): for each length k,
    ``samples`` draws of k blocks whose branch the backward pass goes through (shortcuts elsewhere),
    and the norm of the loss's gradient at the first residual block's input. Returns the lengths,
    path counts C(n, k), the mean and deviation of the norms, and each length's share of the total
    ``C(n, k) * mean norm``."""
    residual = [block for block in plan.blocks if block.add is not None]
    if not residual:
        raise ValueError(f"{plan.spec.name} has no residual blocks: paths exist only in residual networks")
    n = len(residual)
    lengths = list(range(n + 1)) if lengths is None else list(lengths)
    rng = np.random.default_rng([seed, 3])
    objective = Objective.cross_entropy(labels, plan.spec.num_classes)
    target = residual[0].input
    adds = [plan.op(block.add) for block in residual]
    forward = forward_values(plan, lowering, arrays, images, [value for add in adds for value in add.inputs]) \
        if not uses_reference_backward(lowering) else None
    means, stds, drawn = [], [], []
    for k in lengths:
        norms = []
        for through in _random_subsets(list(range(n)), k, samples, rng):
            # the branch of the blocks in `through` (their shortcut detached), the shortcut of all others
            detached = [(add.name, 1 if index in through else 0) for index, add in enumerate(adds)]
            result = gradients(plan, lowering, arrays, images, objective, [target], detached=detached, forward=forward)
            norms.append(float(np.linalg.norm(result.value_grads[target])))
        means.append(float(np.mean(norms)))
        stds.append(float(np.std(norms)))
        drawn.append(len(norms))
    counts = [math.comb(n, k) for k in lengths]
    totals = [count * mean for count, mean in zip(counts, means)]
    return {"n": n, "lengths": lengths, "count": counts,
            "share_of_paths": [count / 2**n for count in counts],
            "gradient_norm": means, "gradient_norm_std": stds, "samples": drawn,
            "share_of_gradient": [total / sum(totals) if sum(totals) > 0 else math.nan for total in totals]}


def lesion_study(spec, backend: str, weights, data: str = "digits", *, data_dir=None, data_options=None,
                 fit_to_data: bool = True, device: str | None = None, draws: int = DRAWS,
                 path_samples: int = PATH_SAMPLES, path_batch: int = PATH_BATCH, seed: int = 0,
                 progress=None) -> LesionStudy:
    """Test errors of ``spec`` with ``weights`` after single and random block deletions, and (residual
    networks) the path-length distribution and each length's share of the gradient.

    ``spec`` is fitted to the data set's channels and classes (``fit_to_data``: a preset; a checkpoint's own
    network is only checked against them); ``weights`` a weights file or training
    checkpoint (a mapping works too). ``progress(text)`` is called as it goes.
    """
    for name, value, least in (("draws", draws, 1), ("path_samples", path_samples, 1), ("path_batch", path_batch, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name}={value!r} must be an integer >= {least}")
    note = progress or (lambda text: None)
    dataset = datasets.load(data, data_dir, **(data_options or {}))
    spec = resolve(spec)
    if fit_to_data and (spec.in_channels, spec.num_classes) != (dataset.in_channels, dataset.num_classes):
        spec = datasets.fit_spec(spec, dataset)
    datasets.check_fits(dataset, spec)
    plan = make_plan(spec)
    params = load_weights(weights, plan)
    blocks = [block.name for block in plan.blocks]
    deletable = deletable_blocks(plan)
    if not deletable:
        raise ValueError(f"{spec.name} has no block that can be deleted (every plain block changes the shape)")
    from .. import backends

    module = backends.load(backend, device)
    lowering = module.Backend(device=device)

    def test_error(deleted) -> float:
        _, lesioned, lesioned_params = plan_and_params(spec, params, fold=module.FOLD_BATCH_NORM,
                                                       rewrite=lambda intact: delete_blocks(intact, list(deleted)))
        arrays = lowering.load_params(lesioned, lesioned_params)
        return evaluate(lesioned, lowering, arrays, dataset.test_images, dataset.test_labels, dataset.mean,
                        dataset.std)["top1_error"]

    baseline = test_error([])
    note(f"{spec.name}: intact test error {baseline:.4f}; deleting each of {len(deletable)} blocks")
    single = [{"block": block, "test_error": test_error([block])} for block in deletable]
    rng = np.random.default_rng([seed, 4])
    random_rows = []
    for k in range(1, len(deletable) + 1):
        errors = [test_error(subset) for subset in _random_subsets(deletable, k, draws, rng)]
        random_rows.append({"k": k, "draws": len(errors), "mean": float(np.mean(errors)), "std": float(np.std(errors)),
                            "min": float(np.min(errors)), "max": float(np.max(errors))})
        note(f"{spec.name}: {k} of {len(deletable)} blocks deleted: mean test error {random_rows[-1]['mean']:.4f}")
    paths = {}
    if any(block.add is not None for block in plan.blocks):
        # an inference engine (onnxruntime) has no gradients: the float64 reference computes them instead
        gradient_backend, gradient_device = (backend, device) if backend in backends.TRAINABLE else ("numpy", None)
        note(f"{spec.name}: gradient per path length ({path_samples} paths per length, batch {path_batch}, "
             f"on {gradient_backend})")
        training = training_backend(gradient_backend, gradient_device)
        images = datasets.normalize(dataset.train_images[:path_batch], dataset.mean, dataset.std)
        paths = path_gradients(plan, training, training.load_params(plan, params), images,
                               np.asarray(dataset.train_labels[:path_batch]), samples=path_samples, seed=seed)
    return LesionStudy(network=spec.name, family=family_of(spec), backend=backend,
                       weights=str(weights) if isinstance(weights, str) else "given", data=data,
                       test_images=len(dataset.test_labels), baseline_error=baseline, blocks=blocks,
                       deletable=deletable, single=single, random=random_rows, paths=paths)
