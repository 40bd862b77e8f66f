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

Data parallel (``distributed``, ``devices``; :mod:`portres.training.replicas`): each replica
trains on its slice of every global batch of ``batch_size`` images; only rank 0 writes.

The run's settings are a :class:`TrainConfig` (:mod:`portres.training.config`); its state a
``TrainState`` (parameters, buffers and optimiser slots apart: :mod:`portres.training.state`),
flattened only where checkpoints are written and read; where it stands a :class:`Position`.

One run writes ``OUT`` at a time (rank 0 holds a lock on it for the whole run), and a new run
refuses an ``OUT`` that holds anything unless it resumes (``resume=True``) or replaces the run
there (``TrainConfig(overwrite=True)``). A run that diverges stops with a ``TrainingError``
naming the step and learning rate, and leaves the last good checkpoint as it was: nothing
non-finite is written to ``metrics.jsonl``, ``summary.json`` or a checkpoint.

Fine-tuning (``init``, ``freeze``, ``lr_backbone``): the run starts from a weights file loaded leniently
(``load_weights(..., strict=False)``: a new classifier, an adapted input conv), holds the frozen parts
still (:mod:`portres.training.transfer`) and records the data set's class names in its checkpoints.

Image folders the ImageNet way (``stream``): the folder is read from disk batch by batch
(:class:`portres.data.streaming.StreamedFolder`): random-resized-crop + flip for training, resize + centre crop
for the tests, the network's preset preprocessing at ``image_size``; checkpoints record it (``data``), so that
``portres.load`` prepares photos as the tests were prepared.
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
from ..analysis import summary
from ..data import streaming as streamed
from ..losses import log_softmax
from ..plan import Plan, make_plan
from ..spec import ResNetSpec
from ..tensorfiles import atomic_write
from ..walker import run_plan
from ..weights import WeightsError, describe_weights_file, init_params, load_weights
from ..zoo import DataConfig, data_config, resolve
from .checkpoint import (
    BEST,
    LAST,
    RUN_FILES,
    CheckpointError,
    DescriptionError,
    check_class_names,
    check_tensors,
    checkpoint_hint,
    load_checkpoint,
    read_description,
    run_directory,
    save_checkpoint,
    split_tensors,
    state_tensors,
)
from .config import MAX_IMAGE_SIZE, RECIPES, TrainConfig, TrainingError, check_data_options, with_added_defaults
from .grads import soft_targets, trainable_names, training_backend
from .optim import SGD, AdamW, no_decay_for_norms_and_biases
from .replicas import Replicas, check_batch, join, portres_version
from .schedules import make_schedule
from .state import TrainState
from .step import initial_state, make_train_step
from .transfer import frozen_parameters, learning_rate_scales

# the settings and their checks live in portres.training.config; named here too, where callers have found them
__all__ = ["BEST", "LAST", "MAX_IMAGE_SIZE", "RECIPES", "RUN_FILES", "Position", "Progress", "TrainConfig",
           "TrainingError", "batch_sums", "check_data_options", "data_of_checkpoint", "evaluate", "evaluation_sums",
           "load_data", "make_lr_schedule", "make_optimizer", "network_for", "spec_of_checkpoint", "steps_per_epoch",
           "stream_data_config", "streamed_checkpoint", "train", "write_curves"]


# -- pieces ----------------------------------------------------------------------------------------


def load_data(config: TrainConfig):
    """The data set, cut to ``limit_train`` training images if asked: in memory, or with ``config.stream`` a
    :class:`~portres.data.streaming.StreamedFolder` (scanned, every file's header checked, nothing decoded)."""
    if config.stream:
        folder = streamed.open_streamed_folder(config.data_dir, stream_data_config(config))
        if config.limit_train is not None and config.limit_train < len(folder.train_labels):
            folder = folder.limited(config.limit_train)
        return folder
    dataset = datasets.load(config.data, config.data_dir, **config.data_options)
    if config.limit_train is not None and config.limit_train < len(dataset.train_labels):
        dataset = dataclasses.replace(dataset, train_images=dataset.train_images[:config.limit_train],
                                      train_labels=dataset.train_labels[:config.limit_train])
    return dataset


def stream_data_config(config: TrainConfig) -> DataConfig:
    """How a streamed run (``config.stream``) prepares its images: the network's preset preprocessing (mean,
    std, interpolation; :func:`portres.data_config`) for the ``color`` option's channels, at ``image_size``
    (default: the preset's input size), resized in the preset's ratio
    (:func:`~portres.data.streaming.streamed_data_config`).

        >>> stream_data_config(TrainConfig(out="r", arch="resnet18", data="folder", stream=True,
        ...                                data_options={"image_size": 64})).resize_size
        73
    """
    spec = resolve(config.arch) if config.arch is not None else ResNetSpec.from_dict(config.spec)
    channels = streamed.COLORS[config.data_options.get("color", "rgb")]
    spec = dataclasses.replace(spec, in_channels=channels)  # a spec of other channels fails check_fits later
    return streamed.streamed_data_config(data_config(spec), config.data_options.get("image_size"))


def network_for(config: TrainConfig, dataset) -> ResNetSpec:
    """A preset adapted to the data set's channels and classes, or a spec that must fit as is."""
    spec = datasets.fit_spec(resolve(config.arch), dataset) if config.arch is not None \
        else ResNetSpec.from_dict(config.spec)
    make_plan(spec)  # checked against its ops before any data is read or written
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
    if len(labels) == 0:  # a process whose share of a small test set is empty
        return np.zeros(4)
    with datasets.batches(images, labels, batch_size, mean=mean, std=std, prefetch=0) as batches:
        return batch_sums(plan, lowering, params, batches, forward)


def batch_sums(plan: Plan, lowering, params: dict, batches, forward=None) -> np.ndarray:
    """:func:`evaluation_sums` over ``batches`` of ``(float32 inputs, int64 labels)``, e.g. a streamed folder's
    test batches (:meth:`~portres.data.streaming.StreamedFolder.test_batches`)."""
    forward = forward or lowering.compile(lambda p, x: run_plan(plan, lowering, p, x)[plan.output])
    total_loss, top1, top5, count = 0.0, 0, 0, 0
    num_classes = plan.spec.num_classes
    for x, y in batches:
        logits = np.asarray(lowering.to_numpy(forward(params, lowering.from_numpy(x))), np.float64)
        log_probabilities = log_softmax(logits)
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


def train(config: TrainConfig, *, resume: bool = False, progress: Progress | None = None) -> dict:
    """Run (or continue, with ``resume``) the training ``config`` describes; returns the summary.

    ``config.out`` must be empty or new unless ``resume`` (continue the run there) or ``config.overwrite``
    (replace it); while the run lasts no other run can write there (``RunDirectoryError`` naming its PID)."""
    config = config.resolved()
    if resume and config.overwrite:
        raise TrainingError("resume continues the run in out, overwrite replaces it: give one of them, not both")
    group = join(config.backend, distributed=config.distributed, devices=config.devices, device=config.device,
                 timeout_s=config.timeout_s)
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


@dataclass
class EpochSums:
    """The running sums of the epoch in progress (over the global batches so far)."""

    loss: float = 0.0  # summed loss of every image seen
    wrong: int = 0  # top-1 misses
    seen: int = 0  # images
    seconds: float = 0.0  # time spent on the epoch's steps (across resumes)
    lr: float | None = None  # the last step's learning rate


@dataclass
class Position:
    """Where a run stands, as its checkpoints record it (their description's ``position``)."""

    epoch: int = 0  # epochs finished
    batch: int = 0  # batches of the epoch in progress done
    step: int = 0  # steps done in all
    epoch_sums: EpochSums = field(default_factory=EpochSums)
    best_test_top1_error: float | None = None  # the lowest test error so far (best.safetensors)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> Position:
        """A position from its description (checked by ``checkpoint.read_description``)."""
        return cls(**{**fields, "epoch_sums": EpochSums(**fields["epoch_sums"])})


def _train(config: TrainConfig, group: Replicas, resume: bool, progress, holding: contextlib.ExitStack) -> dict:
    run = _Run.start(config, group, resume, progress, holding)
    started = time.monotonic()
    while run.position.epoch < config.epochs:
        stopped_early = run.train_epoch()
        if stopped_early and run.position.batch < run.per_epoch:
            run.checkpoint(LAST, False, run.finite_state())
            break
        run.finish_epoch()
        if stopped_early:
            break
    return run.summary(time.monotonic() - started)


@dataclass
class _Run:
    """One run as it trains: what it was set up with, where it stands, and its state."""

    config: TrainConfig
    group: Replicas
    progress: object
    out: Path
    dataset: object
    spec: ResNetSpec
    plan: Plan
    lowering: object
    optimizer: object
    per_epoch: int
    schedule: object
    position: Position
    metrics: list
    state: TrainState
    step: object  # the compiled train step
    forward: object  # the compiled eval-mode forward

    @classmethod
    def start(cls, config: TrainConfig, group: Replicas, resume: bool, progress, holding) -> _Run:
        """Set the run up: data, network, backend, optimiser, and its starting point, fresh or resumed (rank 0
        decides and holds the run directory; every other rank receives the same arrays and position)."""
        out = Path(config.out)
        try:
            check_batch(config.batch_size, group.replicas, config.sync_bn)
        except ValueError as error:
            raise TrainingError(str(error)) from None
        dataset = load_data(config)
        spec = network_for(config, dataset)
        plan = make_plan(spec)
        # a step: forward and backward, about three passes over this replica's share of the batch
        macs_per_step = 3 * summary(plan, dataset.image_size).macs * config.batch_size / group.replicas
        lowering = group.wrap(training_backend(config.backend, group.local_device(config.device), config.dtype,
                                               macs_per_step), config.sync_bn)
        optimizer = make_optimizer(config)
        frozen = frozen_parameters(plan, config.freeze)  # a part that does not exist fails before anything is written
        lr_scale = learning_rate_scales(plan, config.lr_backbone, frozen)
        per_epoch = steps_per_epoch(config, len(dataset.train_labels))
        schedule = make_lr_schedule(config, per_epoch)
        dtype = np.dtype(lowering.dtype)
        # ranks started with other settings would train different models in lock step: refuse at once
        group.agree({"network": spec.to_dict(), "seed": config.seed, "recipe": {**config.recipe(), "seed": None},
                     "resume": resume, "backend": [config.backend, lowering.dtype], "sync_bn": config.sync_bn,
                     "portres version": portres_version()})

        def starting_point():  # on rank 0 only: (checkpoint tensors, JSON info)
            initial, loaded = None, None
            if config.init is not None and not (resume and (out / LAST).exists()):
                # read before the run directory is touched: a file that does not fit leaves nothing written
                try:
                    initial, report = load_weights(config.init, plan, dtype=dtype.name, layout="auto", strict=False,
                                                   seed=config.seed)
                except WeightsError as error:  # which option it was, for a message that names only the file
                    raise TrainingError(f"--init: {error}") from None
                loaded = f"--init: {report.summary()}"
            holding.enter_context(run_directory(out, RUN_FILES, resume=resume, overwrite=config.overwrite))
            if resume and (out / LAST).exists():
                tensors, description = load_checkpoint(out / LAST)
                _check_resumable(out / LAST, description, config, spec, optimizer, plan, dtype.name, per_epoch,
                                 frozen)
                return tensors, {"position": description["position"], "metrics": description["metrics"],
                                 "note": f"resuming {out / LAST}: epoch {description['position']['epoch'] + 1}, "
                                         f"step {description['position']['step']}"}
            (out / "metrics.jsonl").write_text("")
            notes = [f"nothing to resume in {out}: starting afresh" if resume else None, loaded]
            return (init_params(plan, config.seed) if initial is None else initial), {
                "position": Position().to_dict(), "metrics": [], "note": "\n".join(n for n in notes if n) or None}

        tensors, start = group.share_from_writer(starting_point)
        model, slots = split_tensors(tensors)
        state = initial_state(plan, lowering, model, optimizer, slots or None, frozen)  # fresh slots if starting
        if start["note"]:
            progress.note(start["note"])
        trained = sum(np.prod(s) for n, (s, t) in plan.param_shapes().items() if t and n not in frozen)
        progress.note(f"{spec.name} ({trained:,} parameters{f' trained, {config.freeze} frozen' if frozen else ''}) "
                      f"on {config.backend} {lowering.device} {lowering.dtype}"
                      f"{'' if group.replicas == 1 else f', {group.description}'}; {config.data}: "
                      f"{len(dataset.train_labels):,} training / {len(dataset.test_labels):,} test images; "
                      f"{config.epochs} epochs of {per_epoch} steps")
        return cls(config=config, group=group, progress=progress, out=out, dataset=dataset, spec=spec, plan=plan,
                   lowering=lowering, optimizer=optimizer, per_epoch=per_epoch, schedule=schedule,
                   position=Position.from_dict(start["position"]), metrics=start["metrics"], state=state,
                   step=make_train_step(plan, lowering, optimizer, bn_momentum=config.bn_momentum, frozen=frozen,
                                        lr_scale=lr_scale),
                   forward=lowering.compile(lambda p, x: run_plan(plan, lowering, p, x)[plan.output]))

    def where_to_continue(self) -> str:
        return checkpoint_hint(self.out) if self.group.is_writer else ""

    def diverged(self, step: int, problem: str) -> TrainingError:
        """Stop at ``step`` (1-based), before anything of it is written: the last checkpoint stays good."""
        out = self.out
        return TrainingError(
            f"training diverged at step {step} (epoch {(step - 1) // self.per_epoch + 1}, lr "
            f"{self.schedule(step - 1):.4g}): {problem}. The last good checkpoint is {out / LAST}"
            f"{'' if (out / LAST).exists() else ' (none was written yet)'}; lower --lr or add --warmup-epochs, "
            "then start again with --overwrite (or --resume to continue from it)")

    def finite_state(self) -> TrainState:
        """The state as NumPy arrays, refused when the last update overflowed (its loss was still finite)."""
        numpy_state = self.state.to_numpy(self.lowering)
        broken = [name for name, value in state_tensors(numpy_state).items() if not np.isfinite(value).all()]
        if broken:
            raise self.diverged(self.position.step, f"{', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''} "
                                                    "hold NaN/inf after its update")
        return numpy_state

    def checkpoint(self, name: str, finished_epoch: bool, numpy_state: TrainState) -> None:
        """Write ``numpy_state`` and the position to ``OUT/name`` (rank 0); the best weights without the slots."""
        config = self.config
        description = {"spec": self.spec.to_dict(), "config": config.recipe(), "optimizer": self.optimizer.config(),
                       "backend": config.backend, "dtype": self.lowering.dtype, "position": self.position.to_dict(),
                       "metrics": self.metrics, "finished_epoch": finished_epoch, "replicas": self.group.replicas,
                       "class_names": list(self.dataset.class_names), "data": self.data_record()}
        if self.group.is_writer:
            save_checkpoint(self.out / name, state_tensors(numpy_state, slots=name != BEST), description)

    def data_record(self) -> dict:
        """The checkpoints' ``data``: the inputs' size and normalisation (and a streamed folder's resize, crop and
        channels), what ``portres.load`` prepares photos with."""
        dataset = self.dataset
        if isinstance(dataset, streamed.StreamedFolder):
            return dataset.record()
        return {"image_size": list(dataset.image_size), "mean": dataset.mean.tolist(), "std": dataset.std.tolist()}

    def training_batches(self, start_batch: int):
        """The epoch in progress's batches from ``start_batch`` on (the same whether resumed or not)."""
        config, dataset, epoch = self.config, self.dataset, self.position.epoch
        if isinstance(dataset, streamed.StreamedFolder):
            return dataset.train_batches(config.batch_size, seed=config.seed, epoch=epoch, augment=config.augment,
                                         start_batch=start_batch)
        return datasets.batches(dataset.train_images, dataset.train_labels, config.batch_size, mean=dataset.mean,
                                std=dataset.std, shuffle=True, seed=config.seed, epoch=epoch, augment=config.augment,
                                drop_last=True, start_batch=start_batch)

    def test_sums(self) -> np.ndarray:
        """:func:`evaluation_sums` of this process's share of the test set (summed over the processes by the caller)."""
        dataset = self.dataset
        mine = self.group.local_rows(len(dataset.test_labels))  # the test set is shared out among the processes
        if isinstance(dataset, streamed.StreamedFolder):
            with dataset.test_batches(256, mine) as batches:
                return batch_sums(self.plan, self.lowering, self.state.model, batches, forward=self.forward)
        return evaluation_sums(self.plan, self.lowering, self.state.model, dataset.test_images[mine],
                               dataset.test_labels[mine], dataset.mean, dataset.std, forward=self.forward)

    def train_epoch(self) -> bool:
        """The rest of the epoch in progress, a step per global batch; True when ``stop_after_steps`` stopped it."""
        config, group, lowering, position = self.config, self.group, self.lowering, self.position
        epoch, sums = position.epoch, position.epoch_sums
        epoch_started = time.monotonic() - sums.seconds
        with self.training_batches(position.batch) as batches:
            for images, labels in batches:
                lr = self.schedule(position.step)
                mine = group.local_rows(len(labels))  # this process's slice of the global batch
                images, labels = images[mine], labels[mine]
                targets = soft_targets(labels, self.spec.num_classes, config.label_smoothing, np.dtype(lowering.dtype))
                with group.collective(f"step {position.step + 1}", self.where_to_continue):
                    self.state, loss, logits = self.step(self.state, lowering.from_numpy(images),
                                                         lowering.from_numpy(targets), lr, position.step + 1)
                    wrong = int((np.asarray(lowering.to_numpy(logits)).argmax(1) != labels).sum())
                    loss_sum, wrong, seen = group.sum_host([float(lowering.to_numpy(loss)) * len(labels), wrong,
                                                            len(labels)])
                loss, wrong, seen = loss_sum / seen, int(wrong), int(seen)  # over the global batch
                if not math.isfinite(loss):
                    raise self.diverged(position.step + 1, f"the loss is {loss}")
                position.step += 1
                position.batch += 1
                sums.loss, sums.wrong, sums.seen = sums.loss + loss_sum, sums.wrong + wrong, sums.seen + seen
                sums.seconds, sums.lr = time.monotonic() - epoch_started, lr
                rate = sums.seen / max(sums.seconds, 1e-9)
                left = (self.per_epoch - position.batch) * config.batch_size / rate
                self.progress.update(f"epoch {epoch + 1}/{config.epochs} step {position.batch}/{self.per_epoch} "
                                     f"loss {sums.loss / sums.seen:.4f} acc {1 - sums.wrong / sums.seen:.3f} "
                                     f"{rate:.0f} img/s ETA {left:.0f}s")
                if config.checkpoint_every and position.step % config.checkpoint_every == 0:
                    self.checkpoint(LAST, False, self.finite_state())
                if config.stop_after_steps is not None and position.step >= config.stop_after_steps:
                    return True
        return False

    def evaluation(self, epoch: int) -> dict:
        """The epoch's record: its training sums, and its test loss and errors when an evaluation is due."""
        config, sums = self.config, self.position.epoch_sums
        record = {"epoch": epoch + 1, "step": self.position.step, "lr": sums.lr, "train_loss": sums.loss / sums.seen,
                  "train_error": sums.wrong / sums.seen, "test_loss": None, "test_top1_error": None,
                  "test_top5_error": None, "images_per_s": sums.seen / max(sums.seconds, 1e-9),
                  "seconds": sums.seconds}
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            with self.group.collective(f"the evaluation after epoch {epoch + 1}", self.where_to_continue):
                totals = self.group.sum_host(self.test_sums())
            loss_sum, top1, top5, count = totals
            record.update(test_loss=loss_sum / count, test_top1_error=top1 / count, test_top5_error=top5 / count)
        return record

    def finish_epoch(self) -> None:
        """Evaluate the epoch just trained, record it (metrics.jsonl, the progress line) and checkpoint it."""
        config, position = self.config, self.position
        epoch = position.epoch
        numpy_state = self.finite_state()  # before anything of this epoch is evaluated or written
        record = self.evaluation(epoch)
        broken = [key for key, value in record.items() if isinstance(value, float) and not math.isfinite(value)]
        if broken:  # finite weights so large that the test logits overflow
            raise self.diverged(position.step, f"{', '.join(broken)} after epoch {epoch + 1} is not finite")
        self.metrics.append(record)
        if self.group.is_writer:
            with open(self.out / "metrics.jsonl", "a") as file:
                file.write(json.dumps(record, allow_nan=False) + "\n")
        test = "" if record["test_top1_error"] is None else \
            f", test error {record['test_top1_error']:.4f} (top-5 {record['test_top5_error']:.4f})"
        self.progress.update(f"epoch {epoch + 1}/{config.epochs}: train loss {record['train_loss']:.4f}, train error "
                             f"{record['train_error']:.4f}{test}, {record['images_per_s']:.0f} img/s, "
                             f"{record['seconds']:.1f} s", final=True)
        position.epoch, position.batch, position.epoch_sums = epoch + 1, 0, EpochSums()
        improved = record["test_top1_error"] is not None and (
            position.best_test_top1_error is None or record["test_top1_error"] < position.best_test_top1_error)
        if improved:
            position.best_test_top1_error = record["test_top1_error"]
        self.checkpoint(LAST, True, numpy_state)
        if improved:
            self.checkpoint(BEST, True, numpy_state)

    def summary(self, seconds: float) -> dict:
        """The run's summary (``summary.json`` and ``curves.png``, written by rank 0); ``seconds``: this run's."""
        config, group, position, spec, lowering = self.config, self.group, self.position, self.spec, self.lowering
        summary = {"network": spec.name, "spec": spec.to_dict(), "backend": config.backend, "device": lowering.device,
                   "dtype": lowering.dtype, "data": config.data, "epochs_done": position.epoch,
                   "steps_done": position.step, "finished": position.epoch >= config.epochs,
                   "best_test_top1_error": position.best_test_top1_error,
                   "final": self.metrics[-1] if self.metrics else None, "seconds_this_run": seconds,
                   "config": dataclasses.asdict(config)}
        if group.replicas > 1:  # every replica's copy of the final state, hashed where it lives (as stored): all equal
            summary.update(replicas=group.replicas, processes=group.processes, rank=group.rank, sync_bn=config.sync_bn,
                           replica_state_sha256=group.replica_hashes(lowering, state_tensors(self.state)))
            if len(set(summary["replica_state_sha256"])) > 1:
                self.progress.note("warning: the replicas' final states differ (see replica_state_sha256 in "
                                   "summary.json)")
        if not group.is_writer:
            return summary
        text = json.dumps(summary, indent=2, allow_nan=False) + "\n"
        atomic_write(self.out / "summary.json", lambda file: file.write(text.encode()))
        plot_note = write_curves(self.out / "curves.png", self.metrics,
                                 f"{spec.name} on {config.data} ({config.backend})")
        if plot_note:
            self.progress.note(plot_note)
        return summary


def _check_resumable(path: Path, description: dict, config: TrainConfig, spec: ResNetSpec, optimizer, plan: Plan,
                     dtype: str, per_epoch: int, frozen: frozenset = frozenset()) -> None:
    """A checkpoint continues only the run it came from: same network, optimiser and recipe; and only if its
    tensors and optimiser slots fit that network and optimiser, and its position the data's epochs."""
    if description.get("spec") != spec.to_dict():
        raise CheckpointError(f"{path} was written for the network {description.get('spec', {}).get('name')!r}, not "
                              f"{spec.name!r}: resume with the same --arch/--spec, or use another --out")
    if description.get("optimizer") != optimizer.config():
        raise CheckpointError(f"{path} was written with the optimiser {description.get('optimizer')}, not "
                              f"{optimizer.config()}: resume with the same optimiser settings, or use another --out")
    saved = with_added_defaults(description.get("config", {}))
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
    slots = {f"{slot}.{name}": shapes[name][0] for slot in optimizer.slots for name in trainable_names(plan, frozen)}
    check_tensors(path, describe_weights_file(path), plan, dtype, slots)
    check_class_names(path, description, spec.num_classes)


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
        atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=100))
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
    check_class_names(path, description, spec.num_classes)
    return spec


def streamed_checkpoint(path) -> bool:
    """Whether the checkpoint ``path`` was trained on a folder streamed the ImageNet way (``stream``), so that
    its test split is read the same way (resize + centre crop as its ``data`` record says)."""
    config = read_description(path).get("config")
    return isinstance(config, dict) and config.get("stream") is True


def data_of_checkpoint(path) -> tuple[str | None, dict]:
    """``(data set name, its options such as image_size)`` a checkpoint was trained on (None if not recorded)."""
    config = read_description(path).get("config")
    config = config if isinstance(config, dict) else {}
    options = config.get("data_options")
    return config.get("data"), dict(options) if isinstance(options, dict) else {}
