"""Gradient flow at initialisation (or for trained weights): how the gradient reaches the early
layers of plain and residual networks.

For one batch, with batch norm in training mode, per network:

- the norm of the loss's gradient with respect to each block's input (from the output back to the
  input) and with respect to each conv's weight;
- the standard deviation of each 3x3 conv's response after its batch norm (He et al. 2015,
  Figure 7; in pre-activation nets the conv's own output, which goes to the addition). At
  initialisation a train-mode BN makes every response's deviation 1 by construction: it says
  something for trained weights, whose BN scales have been learned;
- the *shattered gradients* measure (Balduzzi et al. 2017): along a short line of inputs
  ``x_t = x_0 + t d`` (``x_0`` the batch's first image, ``t`` evenly spaced in [-1, 1], ``d``
  Gaussian noise whose deviation is ``line_radius`` (1%) of the data's), the gradient of a fixed
  direction ``u`` of the logits, ``sum_t <u, f(x_t)>``, with respect to the input and to each
  block's input; reported is the mean Pearson correlation between the gradients at neighbouring
  points. Smooth (residual) networks keep it near 1; deep
  plain networks' gradients decorrelate like white noise. The points of the line form one batch.

Every number is computed from gradients the backends compute themselves (autodiff with zero
probes on frameworks, the hand-written reverse walker on the NumPy reference), in float64 by
default, so they agree across backends to rounding.

    >>> flow = gradient_flow("resnet56", "mlx")
    >>> flow.blocks[0]["grad_norm"], flow.input_line_correlation
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .. import data as datasets
from ..model import check_images, plan_and_params
from ..parity import parity_input_size
from ..plan import INPUT, make_plan
from ..spec import ResNetSpec
from ..training.grads import training_backend
from ..zoo import resolve
from .probes import Objective, gradients

BATCH = 16  # images in the batch the loss is taken on
LINE_POINTS = 32  # points on the line of inputs (one batch)
# half the line's length per pixel, relative to the data's deviation: at 1%, neighbouring points' gradients in
# resnet20/56 correlate at 0.99/0.98 at init, in plain20 at 0.94, in plain56 at -0.01 (at 0.3%, still -0.01)
LINE_RADIUS = 0.01


@dataclass
class NetworkFlow:
    """The gradient-flow numbers of one network (see the module docstring)."""

    network: str  # the spec's name
    family: str  # "residual", "plain" or "pre-activation"
    backend: str  # where it was computed
    dtype: str  # in what precision
    weights: str  # "init (seed N)" or the weights file
    batch: int  # images in the loss's batch
    input_size: int  # image side
    loss: float  # the batch's mean cross-entropy
    blocks: list  # per block: block, input (value), grad_norm, line_correlation, weight_grad_norm, response_std
    output: dict  # the last block's output: value, grad_norm, line_correlation
    convs: list  # per conv: conv, block, kernel, grad_norm, weight_norm
    responses: list  # per 3x3 conv: conv, value, std
    input_line_correlation: float  # shattered-gradients measure at the image
    line_radius: float  # the line's half-length per pixel, relative to the data's deviation
    line_gradient: list  # the image gradient at one pixel along the line, scaled to max |.| = 1 (for the plot)

    def to_dict(self) -> dict:
        return asdict(self)


def family_of(spec: ResNetSpec) -> str:
    if not spec.residual:
        return "plain"
    return "pre-activation" if spec.is_preactivation else "residual"


def neighbour_correlation(grads: np.ndarray) -> float:
    """Mean Pearson correlation between consecutive rows' gradients (each row flattened)."""
    flat = grads.reshape(grads.shape[0], -1).astype(np.float64)
    flat = flat - flat.mean(1, keepdims=True)
    norms = np.linalg.norm(flat, axis=1)
    products = (flat[:-1] * flat[1:]).sum(1)
    scale = norms[:-1] * norms[1:]
    return float(np.mean(np.where(scale > 0, products / np.where(scale > 0, scale, 1.0), 0.0)))


def line_of_inputs(image: np.ndarray, points: int, scale: float, seed: int) -> np.ndarray:
    """``points`` images ``image + t d`` for ``t`` in ``linspace(-1, 1)``, ``d`` ~ N(0, scale^2) per pixel."""
    direction = np.random.default_rng([seed, 1]).standard_normal(image.shape) * scale
    steps = np.linspace(-1.0, 1.0, points)[:, None, None, None]
    return image[None] + steps * direction[None]


def _responses(plan) -> list[tuple[str, str]]:
    """(3x3 conv, the value that is its response): the BN it feeds (v1, plain) or its own output (v2)."""
    readers: dict[str, list] = {}
    for op in plan.ops:
        for value in op.inputs:
            readers.setdefault(value, []).append(op)
    pairs = []
    for op in plan.ops:
        if op.kind == "conv2d" and op.layer.kernel_size == 3:
            after = readers.get(op.output, [])
            norm = next((reader for reader in after if reader.kind == "batch_norm" and len(after) == 1), None)
            pairs.append((op.name, norm.output if norm is not None and not plan.spec.is_preactivation else op.output))
    return pairs


def gradient_flow(spec, backend: str = "numpy", *, weights=None, images=None, labels=None, batch: int = BATCH,
                  input_size: int | None = None, line_points: int = LINE_POINTS, line_radius: float = LINE_RADIUS,
                  seed: int = 0,
                  dtype: str | None = "float64", device: str | None = None) -> NetworkFlow:
    """The gradient-flow numbers of ``spec`` (a ResNetSpec or preset name) on ``backend``.

    ``weights``: a weights file or checkpoint, a mapping, or None (``init_params(spec, seed)``).
    ``images``/``labels``: the batch (NCHW, normalised; labels as class indices), or None for
    ``batch`` Gaussian images of side ``input_size`` (default: 32 for CIFAR stems) with random labels.

        >>> gradient_flow("plain20", "numpy", batch=4, line_points=8).input_line_correlation
    """
    spec = resolve(spec)
    spec.require_classifier("gradient flow (a cross-entropy's gradients)")
    plan = make_plan(spec)
    rng = np.random.default_rng(seed)
    if images is None:
        size = input_size or parity_input_size(spec)  # small and quick, as parity checks
        images = rng.standard_normal((batch, spec.in_channels, size, size))
        labels = rng.integers(0, spec.num_classes, batch) if labels is None else labels
    images = np.asarray(images, np.float64)
    if labels is None or len(labels) != images.shape[0] or images.shape[0] < 2:
        raise ValueError(f"gradient flow needs a batch of at least 2 images with one label each "
                         f"(got {images.shape[0]} images, {None if labels is None else len(labels)} labels)")
    if not isinstance(line_points, int) or line_points < 3:
        raise ValueError(f"line_points={line_points!r} must be an integer >= 3 (neighbours along the line)")
    if not (isinstance(line_radius, (int, float)) and 0 < line_radius < math.inf):
        raise ValueError(f"line_radius={line_radius!r} must be a number > 0 (e.g. 0.01: 1% of the data's deviation)")
    check_images(plan, images, min_batch=2)
    _, _, params = plan_and_params(spec, weights, seed=seed)
    described = f"init (seed {seed})" if weights is None else (str(weights) if isinstance(weights, str) else "given")
    lowering = training_backend(backend, device, dtype)
    arrays = lowering.load_params(plan, params)
    blocks = plan.blocks
    last_output = blocks[-1].output if blocks else plan.features[0][1]
    probed = [block.input for block in blocks] + [last_output]
    responses = _responses(plan)

    on_batch = gradients(plan, lowering, arrays, images, Objective.cross_entropy(labels, spec.num_classes), probed,
                         keep=[value for _, value in responses], param_grads=True)
    direction = np.random.default_rng([seed, 2]).standard_normal(spec.num_classes)
    line = line_of_inputs(images[0], line_points, line_radius * (float(images.std()) or 1.0), seed)
    on_line = gradients(plan, lowering, arrays, line,
                        Objective("linear", np.tile(direction / np.linalg.norm(direction), (line_points, 1))),
                        [INPUT, *probed])

    norm = lambda array: float(np.linalg.norm(array))  # noqa: E731
    block_of = {op_name: block.name for op_name, block in plan.block_of.items()}  # the stem's convs: "stem"
    convs = [{"conv": op.name, "block": block_of.get(op.name, "stem"), "kernel": op.layer.kernel_size,
              "grad_norm": norm(on_batch.param_grads[f"{op.name}.weight"]),
              "weight_norm": norm(params[f"{op.name}.weight"])}
             for op in plan.ops if op.kind == "conv2d"]
    response_rows = [{"conv": conv, "value": value, "std": float(np.std(on_batch.kept[value]))}
                     for conv, value in responses]
    rows = []
    for block in blocks:
        own = [row for row in convs if row["block"] == block.name]
        stds = [row["std"] for row in response_rows if block_of.get(row["conv"], "stem") == block.name]
        rows.append({"block": block.name, "input": block.input, "grad_norm": norm(on_batch.value_grads[block.input]),
                     "line_correlation": neighbour_correlation(on_line.value_grads[block.input]),
                     "weight_grad_norm": math.sqrt(sum(row["grad_norm"] ** 2 for row in own)),
                     "response_std": float(np.mean(stds)) if stds else math.nan})
    image_grads = on_line.value_grads[INPUT]
    pixel = np.unravel_index(np.argmax(np.abs(image_grads).mean(0)), image_grads.shape[1:])
    trace = image_grads[(slice(None), *pixel)]
    return NetworkFlow(
        network=spec.name, family=family_of(spec), backend=backend, dtype=lowering.dtype, weights=described,
        batch=int(images.shape[0]), input_size=int(images.shape[-1]), loss=on_batch.objective, blocks=rows,
        output={"value": last_output, "grad_norm": norm(on_batch.value_grads[last_output]),
                "line_correlation": neighbour_correlation(on_line.value_grads[last_output])},
        convs=convs, responses=response_rows, input_line_correlation=neighbour_correlation(image_grads),
        line_radius=float(line_radius),
        line_gradient=(trace / (np.abs(trace).max() or 1.0)).tolist())


def data_batch(spec: ResNetSpec, data: str, data_dir=None, batch: int = BATCH, *, fit: bool = True, **options):
    """``(spec, normalised test images, labels)``: the first ``batch`` test images; the spec is fitted to the
    data set's channels and classes (``fit``: a preset) or only checked against them (a trained network)."""
    dataset = datasets.load(data, data_dir, **options)
    fitted = datasets.fit_spec(spec, dataset) if fit and (spec.in_channels != dataset.in_channels or
                                                         spec.num_classes != dataset.num_classes) else spec
    datasets.check_fits(dataset, fitted)
    images = datasets.normalize(dataset.test_images[:batch], dataset.mean, dataset.std)
    return fitted, images, np.asarray(dataset.test_labels[:batch])
