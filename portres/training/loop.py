"""The training loop: data, steps, evaluation, metrics, checkpoints, resume.

    >>> from portres.training.loop import TrainConfig, train
    >>> summary = train(TrainConfig(arch="resnet20", data="digits", backend="mlx", out="runs/r20"))
    >>> summary["best_test_top1_error"] < 0.03
    True

Each epoch appends one JSON line to ``OUT/metrics.jsonl``; ``OUT/last.safetensors`` (every
epoch and every ``checkpoint_every`` steps) holds everything needed to resume exactly, and
``OUT/best.safetensors`` the weights with the lowest test error. A run resumed with
``resume=True`` produces the same weights as one that was never interrupted (on backends
that compute deterministically: see README, "Training").

Data parallel (``distributed``, ``devices``; :mod:`portres.training.distributed`): each replica
trains on its slice of every global batch of ``batch_size`` images; only rank 0 writes.

One run writes ``OUT`` at a time (rank 0 holds a lock on it for the whole run), and a new run
refuses an ``OUT`` that holds anything unless it resumes (``resume=True``) or replaces the run
there (``TrainConfig(overwrite=True)``). A run that diverges stops with a ``TrainingError``
naming the step and learning rate, and leaves the last good checkpoint as it was: nothing
non-finite is written to ``metrics.jsonl``, ``summary.json`` or a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import data as datasets
from ..plan import Plan, make_plan, run_plan
from ..spec import ResNetSpec, SpecError
from ..weights import _atomic_write, describe_weights_file, init_params
from ..zoo import resolve
from . import distributed as parallel
from .checkpoint import (
    CheckpointError,
    DescriptionError,
    check_tensors,
    load_checkpoint,
    read_description,
    run_directory,
    save_checkpoint,
)
from .grads import check_hyperparameters, soft_targets, trainable_names, training_backend
from .optim import SGD, AdamW, no_decay_for_norms_and_biases
from .schedules import make_schedule
from .step import initial_state, make_train_step, split_state, state_to_numpy

# What each data set trains with unless told otherwise. CIFAR: He et al. 2016, section 4.2 (batch 128,
# lr 0.1 divided by 10 at 32k and 48k of 64k iterations = 164 epochs, weight decay 1e-4, momentum 0.9,
# 4-pixel pad + crop + flip). digits: a small budget that reaches >= 97% test accuracy in minutes.
RECIPES = {
    "cifar10": {"epochs": 164, "batch_size": 128, "lr": 0.1, "weight_decay": 1e-4, "schedule": "multistep",
                "augment": "pad_crop_flip"},
    "cifar100": {"epochs": 164, "batch_size": 128, "lr": 0.1, "weight_decay": 1e-4, "schedule": "multistep",
                 "augment": "pad_crop_flip"},
    "digits": {"epochs": 10, "batch_size": 64, "lr": 0.1, "weight_decay": 5e-4, "schedule": "cosine", "augment": None},
    "folder": {"epochs": 30, "batch_size": 64, "lr": 0.1, "weight_decay": 1e-4, "schedule": "cosine",
               "augment": "flip"},
}


MAX_IMAGE_SIZE = 4096  # pixels a side: larger images cannot train here, and loading them would exhaust memory first


class TrainingError(ValueError):
    """Training cannot go on (diverged, or a checkpoint that does not fit): what happened and what to do."""


def check_data_options(options) -> None:
    """Refuse data set options that cannot be right before any image is loaded (an ``image_size`` of
    100000 would allocate gigabytes before failing)."""
    if not isinstance(options, dict) or not all(isinstance(key, str) for key in options):
        raise TrainingError(f"data_options={options!r} must map option names to values, e.g. {{'image_size': 16}}")
    size = options.get("image_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_IMAGE_SIZE):
        raise TrainingError(f"image_size={size!r} must be an integer from 1 to {MAX_IMAGE_SIZE} (pixels a side)")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; ``None`` fields take the data set's recipe (see ``RECIPES``)."""

    out: str  # output directory: metrics.jsonl, last/best checkpoints, curves.png, summary.json
    arch: str | None = None  # a preset name (its input channels and classes adapt to the data set)
    spec: dict | None = None  # or a full spec (ResNetSpec.to_dict()); it must fit the data set as is
    data: str = "digits"  # data set name (portres.data.names())
    data_dir: str | None = None  # where the data set's files are (CIFAR archives, image folders)
    data_options: dict = field(default_factory=dict)  # loader options, e.g. {"image_size": 16}
    backend: str = "numpy"  # numpy, tinygrad, mlx or torch
    device: str | None = None  # the backend's device (None: its default)
    dtype: str | None = None  # float32 (frameworks) or float64 (the reference's default)
    epochs: int | None = None  # passes over the training set
    batch_size: int | None = None  # images per step (the last partial batch of an epoch is dropped)
    optimizer: str = "sgd"  # "sgd" or "adamw"
    lr: float | None = None  # peak learning rate
    momentum: float = 0.9  # SGD momentum (AdamW: beta1 stays 0.9)
    nesterov: bool = False  # Nesterov momentum (SGD)
    weight_decay: float | None = None  # L2 (SGD) or decoupled (AdamW) weight decay
    decay_norms_and_biases: bool = True  # False exempts BN scales/shifts and biases (1-D parameters)
    schedule: str | None = None  # "constant", "multistep" or "cosine"
    milestones: tuple[int, ...] | None = None  # multistep: epochs at which the rate is divided by 10
    warmup_epochs: float = 0.0  # linear warm-up in front of the schedule
    label_smoothing: float = 0.0  # mix the one-hot targets with the uniform distribution
    bn_momentum: float = 0.1  # weight of each batch's statistics in the BN running statistics
    augment: str | None = "recipe"  # "pad_crop_flip", "flip", None, or "recipe" (the data set's)
    seed: int = 0  # weights, data order and augmentation all derive from it
    eval_every: int = 1  # evaluate on the test split every N epochs (and after the last)
    limit_train: int | None = None  # train on the first N images only (quick runs)
    checkpoint_every: int | None = None  # also checkpoint every N steps (besides every epoch)
    stop_after_steps: int | None = None  # stop (checkpointed) after this many steps in all; resume later
    distributed: bool = False  # this process is one rank of a group a launcher started (mlx.launch, torchrun)
    devices: tuple[str, ...] | None = None  # tinygrad: one replica per device, all in this process
    sync_bn: bool = False  # BN normalises with the global batch's statistics, not each replica's own
    timeout_s: float = parallel.DEFAULT_TIMEOUT_S  # how long a rank waits on the others before it gives up
    overwrite: bool = False  # replace the run in ``out`` (its checkpoints, metrics, summary) instead of refusing

    def resolved(self) -> TrainConfig:
        """This config with the recipe's defaults filled in and every field checked."""
        if self.data not in RECIPES and self.data not in datasets.names():
            raise TrainingError(f"unknown data set {self.data!r}; known: {', '.join(datasets.names())}")
        recipe = RECIPES.get(self.data, RECIPES["folder"])
        filled = {key: recipe[key] if getattr(self, key) is None else getattr(self, key)
                  for key in ("epochs", "batch_size", "lr", "weight_decay", "schedule")}
        if self.augment == "recipe":
            filled["augment"] = recipe["augment"]
        config = dataclasses.replace(self, **filled)
        config._check()
        return config

    def _check(self) -> None:
        if (self.arch is None) == (self.spec is None):
            raise TrainingError("give exactly one of arch (a preset name) or spec")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "eval_every": self.eval_every}
        for name, value in {**positive, "limit_train": self.limit_train, "checkpoint_every": self.checkpoint_every,
                            "stop_after_steps": self.stop_after_steps}.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise TrainingError(f"{name}={value!r} must be a positive integer")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise TrainingError(f"seed={self.seed!r} must be a non-negative integer")
        for name in ("nesterov", "decay_norms_and_biases", "distributed", "sync_bn", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise TrainingError(f"{name}={getattr(self, name)!r} must be True or False")
        check_data_options(self.data_options)
        for name in ("lr", "weight_decay", "momentum", "warmup_epochs"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise TrainingError(f"{name}={value!r} must be a finite number >= 0")
        if self.lr <= 0:
            raise TrainingError(f"lr={self.lr!r} must be > 0")
        if self.batch_size < 2:
            raise TrainingError("batch_size must be at least 2: train-mode batch norm normalises over the batch")
        if self.optimizer not in ("sgd", "adamw"):
            raise TrainingError(f"optimizer={self.optimizer!r} must be 'sgd' or 'adamw'")
        milestones = self.milestones
        if milestones is not None and (self.schedule != "multistep" or not isinstance(milestones, (tuple, list))
                                       or any(not isinstance(m, int) or not 0 < m < self.epochs for m in milestones)):
            raise TrainingError(f"milestones={self.milestones!r} need --schedule multistep and epochs in "
                                f"(0, {self.epochs})")
        if self.warmup_epochs >= self.epochs:
            raise TrainingError(f"warmup_epochs={self.warmup_epochs} must be below epochs={self.epochs}")
        if not isinstance(self.timeout_s, (int, float)) or not 0 < self.timeout_s < math.inf:  # summary.json holds it
            raise TrainingError(f"timeout_s={self.timeout_s!r} must be a finite number of seconds > 0")
        try:
            check_hyperparameters(self.label_smoothing, self.bn_momentum)
            parallel.check_parallel_settings(self.backend, distributed=self.distributed, devices=self.devices,
                                             device=self.device, sync_bn=self.sync_bn)
            if self.devices is not None:
                parallel.check_batch(self.batch_size, len(self.devices), self.sync_bn)
        except ValueError as error:
            raise TrainingError(str(error)) from None

    def recipe(self) -> dict:
        """The fields a resumed run must share with the run it continues (where and how fast may differ)."""
        return {key: value for key, value in dataclasses.asdict(self).items() if key not in _WHERE}


# what a resumed run may change: where and how fast it runs (any number of replicas continues a run)
_WHERE = {"out", "backend", "device", "checkpoint_every", "stop_after_steps", "data_dir", "eval_every", "distributed",
          "devices", "sync_bn", "timeout_s", "overwrite"}


def check_recipe(path, fields: dict, bad) -> None:
    """Refuse the ``config`` of a checkpoint's description (``TrainConfig.recipe()`` as JSON) unless it is one
    a run could have had; ``bad(field, problem)`` makes the error (see ``checkpoint.read_description``)."""
    known = [field.name for field in dataclasses.fields(TrainConfig) if field.name not in _WHERE]
    for name in known:
        if name not in fields:
            raise bad(f"config.{name}", "is missing")
    for name in fields:
        if name not in known:
            raise bad(f"config.{name}", "is not a training setting")
    try:
        config = TrainConfig(out=str(path), **fields).resolved()
    except (TypeError, ValueError) as error:
        raise bad("config", f"holds an invalid setting: {error}") from None
    try:
        resolve(config.arch) if config.arch is not None else ResNetSpec.from_dict(config.spec)
    except (SpecError, KeyError, ValueError) as error:
        raise bad("config.arch" if config.arch is not None else "config.spec", f"names no network: {error}") from None


# -- pieces ----------------------------------------------------------------------------------------


def load_data(config: TrainConfig):
    """The data set, cut to ``limit_train`` training images if asked."""
    dataset = datasets.load(config.data, config.data_dir, **config.data_options)
    if config.limit_train is not None and config.limit_train < len(dataset.train_labels):
        dataset = dataclasses.replace(dataset, train_images=dataset.train_images[:config.limit_train],
                                      train_labels=dataset.train_labels[:config.limit_train])
    return dataset


def network_for(config: TrainConfig, dataset) -> ResNetSpec:
    """A preset adapted to the data set's channels and classes, or a spec that must fit as is."""
    spec = datasets.fit_spec(resolve(config.arch), dataset) if config.arch is not None \
        else ResNetSpec.from_dict(config.spec)
    datasets.check_fits(dataset, spec)
    return spec


def make_optimizer(config: TrainConfig):
    decay_filter = {} if config.decay_norms_and_biases else {"decay_filter": no_decay_for_norms_and_biases}
    if config.optimizer == "adamw":
        return AdamW(betas=(config.momentum, 0.999), weight_decay=config.weight_decay, **decay_filter)
    return SGD(momentum=config.momentum, nesterov=config.nesterov, weight_decay=config.weight_decay, **decay_filter)


def steps_per_epoch(config: TrainConfig, train_count: int) -> int:
    steps = train_count // config.batch_size
    if steps < 1:
        raise TrainingError(f"batch_size={config.batch_size} exceeds the {train_count} training images: lower it")
    return steps


def make_lr_schedule(config: TrainConfig, per_epoch: int):
    total = config.epochs * per_epoch
    milestones = None if config.milestones is None else [m * per_epoch for m in config.milestones]
    return make_schedule(config.schedule, config.lr, total, milestones, round(config.warmup_epochs * per_epoch))


def evaluation_sums(plan: Plan, lowering, params: dict, images: np.ndarray, labels: np.ndarray, mean, std,
                    batch_size: int = 256, forward=None) -> np.ndarray:
    """``[summed loss, top-1 misses, top-5 misses, images]`` of eval-mode (running BN statistics) logits on
    ``images``: sums, so that shares of a test set evaluated apart add up. ``forward`` may be a compiled
    ``(params, x) -> logits`` to reuse between calls."""
    forward = forward or lowering.compile(lambda p, x: run_plan(plan, lowering, p, x)[plan.output])
    total_loss, top1, top5, count = 0.0, 0, 0, 0
    num_classes = plan.spec.num_classes
    if len(labels) == 0:  # a process whose share of a small test set is empty
        return np.zeros(4)
    with datasets.batches(images, labels, batch_size, mean=mean, std=std, prefetch=0) as batches:
        for x, y in batches:
            logits = np.asarray(lowering.to_numpy(forward(params, lowering.from_numpy(x))), np.float64)
            shifted = logits - logits.max(1, keepdims=True)
            log_probabilities = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
            total_loss += float(-log_probabilities[np.arange(len(y)), y].sum())
            ranked = np.argsort(-logits, axis=1)
            top1 += int((ranked[:, 0] != y).sum())
            top5 += int((ranked[:, :min(5, num_classes)] != y[:, None]).all(1).sum())
            count += len(y)
    return np.array([total_loss, top1, top5, count], np.float64)


def evaluate(plan: Plan, lowering, params: dict, images: np.ndarray, labels: np.ndarray, mean, std,
             batch_size: int = 256, forward=None) -> dict:
    """Eval-mode (running BN statistics) loss and top-1/top-5 error on ``images``; ``forward`` may be
    a compiled ``(params, x) -> logits`` to reuse between calls."""
    total_loss, top1, top5, count = evaluation_sums(plan, lowering, params, images, labels, mean, std, batch_size,
                                                    forward)
    return {"loss": total_loss / count, "top1_error": top1 / count, "top5_error": top5 / count}


class Progress:
    """One status line on stderr: a live bar on a terminal, a line every few seconds otherwise."""

    def __init__(self, stream=None, every_s: float = 10.0):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s, self.last = every_s, 0.0

    def update(self, text: str, final: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            self.stream.write(f"\r\033[K{text}" + ("\n" if final else ""))
        elif final or now - self.last >= self.every_s:
            self.stream.write(text + "\n")
            self.last = now
        self.stream.flush()

    def note(self, text: str) -> None:
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()


# -- the loop --------------------------------------------------------------------------------------


LAST, BEST = "last.safetensors", "best.safetensors"
RUN_FILES = (LAST, BEST, "metrics.jsonl", "summary.json", "curves.png")  # what a run writes in its directory


def train(config: TrainConfig, *, resume: bool = False, progress: Progress | None = None) -> dict:
    """Run (or continue, with ``resume``) the training ``config`` describes; returns the summary.

    ``config.out`` must be empty or new unless ``resume`` (continue the run there) or ``config.overwrite``
    (replace it); while the run lasts no other run can write there (``RunDirectoryError`` naming its PID)."""
    config = config.resolved()
    if resume and config.overwrite:
        raise TrainingError("resume continues the run in out, overwrite replaces it: give one of them, not both")
    group = parallel.join(config.backend, distributed=config.distributed, devices=config.devices,
                          device=config.device, timeout_s=config.timeout_s)
    # the run directory's lock is taken by rank 0 at start-up and held until the run ends;
    # overflow is reported as divergence, so NumPy's warnings about it would only repeat it
    try:
        with contextlib.ExitStack() as holding, np.errstate(over="ignore", invalid="ignore"):
            return _train(config, group, resume, (progress or Progress()) if group.is_writer else Silent(), holding)
    finally:
        group.close()


class Silent:
    """The progress of ranks other than 0: they train in step with rank 0 and say nothing."""

    def update(self, text: str, final: bool = False) -> None:
        pass

    def note(self, text: str) -> None:
        pass


def _train(config: TrainConfig, group: parallel.Replicas, resume: bool, progress,
           holding: contextlib.ExitStack) -> dict:
    out = Path(config.out)
    try:
        parallel.check_batch(config.batch_size, group.replicas, config.sync_bn)
    except ValueError as error:
        raise TrainingError(str(error)) from None
    dataset = load_data(config)
    spec = network_for(config, dataset)
    plan = make_plan(spec)
    lowering = group.wrap(training_backend(config.backend, group.local_device(config.device), config.dtype),
                          config.sync_bn)
    optimizer = make_optimizer(config)
    per_epoch = steps_per_epoch(config, len(dataset.train_labels))
    schedule = make_lr_schedule(config, per_epoch)
    dtype = np.dtype(lowering.dtype)
    # ranks started with other settings would train different models in lock step: refuse at once
    group.agree({"network": spec.to_dict(), "seed": config.seed, "recipe": {**config.recipe(), "seed": None},
                 "resume": resume, "backend": [config.backend, lowering.dtype], "sync_bn": config.sync_bn,
                 "portres version": parallel.portres_version()})

    def starting_point():  # rank 0 decides; every other rank receives the same arrays and position
        holding.enter_context(run_directory(out, RUN_FILES, resume=resume, overwrite=config.overwrite))
        if resume and (out / LAST).exists():
            numpy_state, description = load_checkpoint(out / LAST)
            _check_resumable(out / LAST, description, config, spec, optimizer, plan, dtype.name, per_epoch)
            return numpy_state, {"position": description["position"], "metrics": description["metrics"],
                                 "note": f"resuming {out / LAST}: epoch {description['position']['epoch'] + 1}, "
                                         f"step {description['position']['step']}"}
        (out / "metrics.jsonl").write_text("")
        fresh = {"epoch": 0, "batch": 0, "step": 0, "epoch_sums": _empty_sums(), "best_test_top1_error": None}
        return init_params(plan, config.seed), {"position": fresh, "metrics": [],
                                                "note": f"nothing to resume in {out}: starting afresh" if resume else
                                                None}

    numpy_state, start = group.share_from_writer(starting_point)
    position, metrics = start["position"], start["metrics"]
    model, slots = split_state(numpy_state)
    state = initial_state(plan, lowering, model, optimizer, slots or None)  # fresh slots when starting afresh
    if start["note"]:
        progress.note(start["note"])
    progress.note(f"{spec.name} ({sum(np.prod(s) for s, t in plan.param_shapes().values() if t):,} parameters) on "
                  f"{config.backend} {lowering.device} {lowering.dtype}"
                  f"{'' if group.replicas == 1 else f', {group.description}'}; {config.data}: "
                  f"{len(dataset.train_labels):,} training / {len(dataset.test_labels):,} test images; "
                  f"{config.epochs} epochs of {per_epoch} steps")

    step_fn = make_train_step(plan, lowering, optimizer, bn_momentum=config.bn_momentum)
    eval_forward = lowering.compile(lambda p, x: run_plan(plan, lowering, p, x)[plan.output])
    where_to_continue = lambda: parallel.checkpoint_hint(out) if group.is_writer else ""  # noqa: E731

    def diverged(step: int, problem: str) -> TrainingError:
        """Stop at ``step`` (1-based), before anything of it is written: the last checkpoint stays good."""
        return TrainingError(
            f"training diverged at step {step} (epoch {(step - 1) // per_epoch + 1}, lr {schedule(step - 1):.4g}): "
            f"{problem}. The last good checkpoint is {out / LAST}"
            f"{'' if (out / LAST).exists() else ' (none was written yet)'}; lower --lr or add --warmup-epochs, "
            "then start again with --overwrite (or --resume to continue from it)")

    def finite_state() -> dict[str, np.ndarray]:
        """The state as NumPy arrays, refused when the last update overflowed (its loss was still finite)."""
        numpy_state = state_to_numpy(lowering, state)
        broken = [name for name, value in numpy_state.items() if not np.isfinite(value).all()]
        if broken:
            raise diverged(position["step"], f"{', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''} "
                                             "hold NaN/inf after its update")
        return numpy_state

    def checkpoint(path: Path, finished_epoch: bool, numpy_state: dict[str, np.ndarray]) -> None:
        description = {"spec": spec.to_dict(), "config": config.recipe(), "optimizer": optimizer.config(),
                       "backend": config.backend, "dtype": lowering.dtype, "position": position, "metrics": metrics,
                       "finished_epoch": finished_epoch, "replicas": group.replicas}
        if path.name == BEST:
            numpy_state = split_state(numpy_state)[0]
        if group.is_writer:
            save_checkpoint(path, numpy_state, description)

    started = time.monotonic()
    stopped_early = False
    while position["epoch"] < config.epochs:
        epoch = position["epoch"]
        sums = position["epoch_sums"]
        epoch_started = time.monotonic() - sums["seconds"]
        with datasets.batches(dataset.train_images, dataset.train_labels, config.batch_size, mean=dataset.mean,
                              std=dataset.std, shuffle=True, seed=config.seed, epoch=epoch, augment=config.augment,
                              drop_last=True, start_batch=position["batch"]) as batches:
            for images, labels in batches:
                lr = schedule(position["step"])
                mine = group.local_rows(len(labels))  # this process's slice of the global batch
                images, labels = images[mine], labels[mine]
                targets = soft_targets(labels, spec.num_classes, config.label_smoothing, dtype)
                with group.collective(f"step {position['step'] + 1}", where_to_continue):
                    state, loss, logits = step_fn(state, lowering.from_numpy(images), lowering.from_numpy(targets),
                                                  lr, position["step"] + 1)
                    wrong = int((np.asarray(lowering.to_numpy(logits)).argmax(1) != labels).sum())
                    loss_sum, wrong, seen = group.sum_host([float(lowering.to_numpy(loss)) * len(labels), wrong,
                                                            len(labels)])
                loss, wrong, seen = loss_sum / seen, int(wrong), int(seen)  # over the global batch
                if not math.isfinite(loss):
                    raise diverged(position["step"] + 1, f"the loss is {loss}")
                position["step"] += 1
                position["batch"] += 1
                sums.update(loss=sums["loss"] + loss_sum, wrong=sums["wrong"] + wrong,
                            seen=sums["seen"] + seen, seconds=time.monotonic() - epoch_started, lr=lr)
                rate = sums["seen"] / max(sums["seconds"], 1e-9)
                left = (per_epoch - position["batch"]) * config.batch_size / rate
                progress.update(f"epoch {epoch + 1}/{config.epochs} step {position['batch']}/{per_epoch} "
                                f"loss {sums['loss'] / sums['seen']:.4f} acc {1 - sums['wrong'] / sums['seen']:.3f} "
                                f"{rate:.0f} img/s ETA {left:.0f}s")
                if config.checkpoint_every and position["step"] % config.checkpoint_every == 0:
                    checkpoint(out / LAST, False, finite_state())
                if config.stop_after_steps is not None and position["step"] >= config.stop_after_steps:
                    stopped_early = True
                    break
        if stopped_early and position["batch"] < per_epoch:
            checkpoint(out / LAST, False, finite_state())
            break
        numpy_state = finite_state()  # before anything of this epoch is evaluated or written
        record = {"epoch": epoch + 1, "step": position["step"], "lr": sums["lr"],
                  "train_loss": sums["loss"] / sums["seen"], "train_error": sums["wrong"] / sums["seen"],
                  "test_loss": None, "test_top1_error": None, "test_top5_error": None,
                  "images_per_s": sums["seen"] / max(sums["seconds"], 1e-9), "seconds": sums["seconds"]}
        last_epoch = epoch + 1 == config.epochs
        if (epoch + 1) % config.eval_every == 0 or last_epoch:
            model, _ = split_state(state)
            mine = group.local_rows(len(dataset.test_labels))  # the test set is shared out among the processes
            with group.collective(f"the evaluation after epoch {epoch + 1}", where_to_continue):
                totals = group.sum_host(evaluation_sums(plan, lowering, model, dataset.test_images[mine],
                                                        dataset.test_labels[mine], dataset.mean, dataset.std,
                                                        forward=eval_forward))
            loss_sum, top1, top5, count = totals
            record.update(test_loss=loss_sum / count, test_top1_error=top1 / count, test_top5_error=top5 / count)
        broken = [key for key, value in record.items() if isinstance(value, float) and not math.isfinite(value)]
        if broken:  # finite weights so large that the test logits overflow
            raise diverged(position["step"], f"{', '.join(broken)} after epoch {epoch + 1} is not finite")
        metrics.append(record)
        if group.is_writer:
            with open(out / "metrics.jsonl", "a") as file:
                file.write(json.dumps(record, allow_nan=False) + "\n")
        test = "" if record["test_top1_error"] is None else \
            f", test error {record['test_top1_error']:.4f} (top-5 {record['test_top5_error']:.4f})"
        progress.update(f"epoch {epoch + 1}/{config.epochs}: train loss {record['train_loss']:.4f}, train error "
                        f"{record['train_error']:.4f}{test}, {record['images_per_s']:.0f} img/s, "
                        f"{record['seconds']:.1f} s", final=True)
        position.update(epoch=epoch + 1, batch=0, epoch_sums=_empty_sums())
        improved = record["test_top1_error"] is not None and (
            position["best_test_top1_error"] is None or record["test_top1_error"] < position["best_test_top1_error"])
        if improved:
            position["best_test_top1_error"] = record["test_top1_error"]
        checkpoint(out / LAST, True, numpy_state)
        if improved:
            checkpoint(out / BEST, True, numpy_state)
        if stopped_early:
            break

    summary = {"network": spec.name, "spec": spec.to_dict(), "backend": config.backend, "device": lowering.device,
               "dtype": lowering.dtype, "data": config.data, "epochs_done": position["epoch"],
               "steps_done": position["step"], "finished": position["epoch"] >= config.epochs,
               "best_test_top1_error": position["best_test_top1_error"],
               "final": metrics[-1] if metrics else None, "seconds_this_run": time.monotonic() - started,
               "config": dataclasses.asdict(config)}
    if group.replicas > 1:  # every replica's copy of the final state, hashed where it lives: all equal
        summary.update(replicas=group.replicas, processes=group.processes, rank=group.rank, sync_bn=config.sync_bn,
                       replica_state_sha256=group.replica_hashes(lowering, state))
        if len(set(summary["replica_state_sha256"])) > 1:
            progress.note("warning: the replicas' final states differ (see replica_state_sha256 in summary.json)")
    if not group.is_writer:
        return summary
    text = json.dumps(summary, indent=2, allow_nan=False) + "\n"
    _atomic_write(out / "summary.json", lambda file: file.write(text.encode()))
    plot_note = write_curves(out / "curves.png", metrics, f"{spec.name} on {config.data} ({config.backend})")
    if plot_note:
        progress.note(plot_note)
    return summary


def _empty_sums() -> dict:
    return {"loss": 0.0, "wrong": 0, "seen": 0, "seconds": 0.0, "lr": None}


def _check_resumable(path: Path, description: dict, config: TrainConfig, spec: ResNetSpec, optimizer, plan: Plan,
                     dtype: str, per_epoch: int) -> None:
    """A checkpoint continues only the run it came from: same network, optimiser and recipe; and only if its
    tensors and optimiser slots fit that network and optimiser, and its position the data's epochs."""
    if description.get("spec") != spec.to_dict():
        raise CheckpointError(f"{path} was written for the network {description.get('spec', {}).get('name')!r}, not "
                              f"{spec.name!r}: resume with the same --arch/--spec, or use another --out")
    if description.get("optimizer") != optimizer.config():
        raise CheckpointError(f"{path} was written with the optimiser {description.get('optimizer')}, not "
                              f"{optimizer.config()}: resume with the same optimiser settings, or use another --out")
    saved = description.get("config", {})
    mine = json.loads(json.dumps(config.recipe()))  # tuples as lists, as in the file
    differing = sorted(key for key in set(saved) | set(mine) if saved.get(key) != mine.get(key))
    if differing:
        changes = ", ".join(f"{key} {saved.get(key)!r} -> {mine.get(key)!r}" for key in differing)
        raise CheckpointError(f"{path} belongs to a run with other settings ({changes}): resume with the same "
                              "settings, or use another --out")
    position = description["position"]
    if position["batch"] > per_epoch or position["step"] != position["epoch"] * per_epoch + position["batch"]:
        raise DescriptionError(f"checkpoint {path}: field 'position' (epoch {position['epoch']}, batch "
                               f"{position['batch']}, step {position['step']}) is not a position of this run's "
                               f"epochs of {per_epoch} steps (the file was altered, or the data set changed)")
    shapes = plan.param_shapes()
    slots = {f"{slot}.{name}": shapes[name][0] for slot in optimizer.slots for name in trainable_names(plan)}
    check_tensors(path, describe_weights_file(path), plan, dtype, slots)


def write_curves(path: Path, metrics: list[dict], title: str) -> str | None:
    """Loss and error per epoch, train and test (``curves.png``); a note instead when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"skipped {path.name}: plotting needs matplotlib (pip install 'portres[plot]')"
    if not metrics:
        return None
    epochs = [m["epoch"] for m in metrics]
    figure, (loss_axis, error_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, label in ((loss_axis, "loss", "loss"), (error_axis, "error", "top-1 error")):
        axis.plot(epochs, [m[f"train_{key}"] for m in metrics], label="train")
        tested = [(m["epoch"], m["test_top1_error" if key == "error" else "test_loss"]) for m in metrics
                  if m["test_loss"] is not None]
        if tested:
            axis.plot(*zip(*tested), label="test", marker="o", markersize=3)
        axis.set_xlabel("epoch")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    error_axis.set_ylim(bottom=0)
    figure.suptitle(title)
    figure.tight_layout()
    try:  # atomically, so that a killed run leaves a temporary the next one removes (see checkpoint.run_directory)
        _atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=100))
    finally:
        plt.close(figure)
    return None


def spec_of_checkpoint(path) -> ResNetSpec:
    """The network a checkpoint (last or best) was trained as; refused when its tensors are not that network's."""
    description = read_description(path)
    spec = ResNetSpec.from_dict(description["spec"])
    try:
        check_tensors(path, describe_weights_file(path), make_plan(spec), description["dtype"])
    except CheckpointError as error:
        raise DescriptionError(f"{error} (its field 'spec' does not describe its tensors)") from None
    return spec


def data_of_checkpoint(path) -> tuple[str | None, dict]:
    """``(data set name, its options such as image_size)`` a checkpoint was trained on (None if not recorded)."""
    config = read_description(path).get("config")
    config = config if isinstance(config, dict) else {}
    options = config.get("data_options")
    return config.get("data"), dict(options) if isinstance(options, dict) else {}
