"""What a training run depends on: ``TrainConfig``, the data sets' recipes, and their checks.

Kept apart from the loop so that the checkpoint reader (which refuses a checkpoint whose recorded
settings no run could have had) and the launcher of local ranks (which sends the config to each
rank as JSON) reach it without importing the loop.

    >>> config = TrainConfig(arch="resnet20", data="digits", out="runs/r20").resolved()
    >>> config.epochs, config.batch_size     # the digits recipe
    (10, 64)
    >>> TrainConfig.from_dict(dataclasses.asdict(config)) == config
    True
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .. import data as datasets
from ..data import streaming as streamed
from ..plan import make_plan
from ..spec import ResNetSpec, SpecError
from ..zoo import resolve
from .grads import check_hyperparameters
from .replicas import DEFAULT_TIMEOUT_S, check_batch, check_parallel_settings

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
    timeout_s: float = DEFAULT_TIMEOUT_S  # how long a rank waits on the others before it gives up
    overwrite: bool = False  # replace the run in ``out`` (its checkpoints, metrics, summary) instead of refusing
    init: str | None = None  # start from these weights (any layout, or a checkpoint), loaded leniently
    freeze: str | None = None  # hold this part and everything before it still: "stem", "layer2", ..., "backbone"
    lr_backbone: float | None = None  # the trained backbone's learning rate, as a factor of the classifier's
    # data="folder" read from disk batch by batch the ImageNet way: random-resized-crop + flip training, resize +
    # centre crop evaluation, the network's preset mean/std; image_size is the crops' side (default: the preset's)
    stream: bool = False

    @classmethod
    def from_dict(cls, fields: dict) -> TrainConfig:
        """A config from ``dataclasses.asdict(config)`` sent through JSON (its lists back to tuples).

            >>> TrainConfig.from_dict({"out": "runs/r20", "arch": "resnet20", "milestones": [82, 123]}).milestones
            (82, 123)
        """
        fields = dict(fields)
        for name in ("milestones", "devices"):
            if fields.get(name) is not None:
                fields[name] = tuple(fields[name])
        return cls(**fields)

    def resolved(self) -> TrainConfig:
        """This config with the recipe's defaults filled in and every field checked."""
        if self.data not in RECIPES and self.data not in datasets.names():
            raise TrainingError(f"unknown data set {self.data!r}; known: {', '.join(datasets.names())}")
        recipe = RECIPES.get(self.data, RECIPES["folder"])
        filled = {key: recipe[key] if getattr(self, key) is None else getattr(self, key)
                  for key in ("epochs", "batch_size", "lr", "weight_decay", "schedule")}
        if self.augment == "recipe":
            filled["augment"] = streamed.TRAIN_AUGMENT if self.stream is True else recipe["augment"]
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
        self._check_stream()
        for name in ("lr", "weight_decay", "momentum", "warmup_epochs"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise TrainingError(f"{name}={value!r} must be a finite number >= 0")
        if self.lr <= 0:
            raise TrainingError(f"lr={self.lr!r} must be > 0")
        if self.batch_size < 2:
            raise TrainingError("batch_size must be at least 2: train-mode batch norm normalises over the batch")
        for name in ("init", "freeze"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise TrainingError(f"{name}={value!r} must be null or a non-empty string")
        lr_backbone = self.lr_backbone
        if lr_backbone is not None and (isinstance(lr_backbone, bool) or not isinstance(lr_backbone, (int, float))
                                        or not math.isfinite(lr_backbone) or lr_backbone <= 0):
            raise TrainingError(f"lr_backbone={lr_backbone!r} must be a finite number > 0 (a factor of the learning "
                                "rate)")
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
            check_parallel_settings(self.backend, distributed=self.distributed, devices=self.devices,
                                    device=self.device, sync_bn=self.sync_bn)
            if self.devices is not None:
                check_batch(self.batch_size, len(self.devices), self.sync_bn)
        except ValueError as error:
            raise TrainingError(str(error)) from None

    def _check_stream(self) -> None:
        if not isinstance(self.stream, bool):
            raise TrainingError(f"stream={self.stream!r} must be True or False")
        if not self.stream:
            if self.augment == streamed.TRAIN_AUGMENT:
                raise TrainingError(f"augment={self.augment!r} crops photos read from disk: add stream=True "
                                    "(--stream) with data='folder'")
            return
        if self.data != "folder":
            raise TrainingError(f"stream=True reads an image folder from disk, not {self.data!r}: use data='folder' "
                                "(--data folder --data-dir DIR)")
        if self.augment not in (streamed.TRAIN_AUGMENT, None):
            raise TrainingError(f"augment={self.augment!r} does not apply to a streamed folder: it trains with "
                                f"{streamed.TRAIN_AUGMENT!r} (the recipe) or none")
        unknown = sorted(set(self.data_options) - set(streamed.STREAM_OPTIONS))
        if unknown:
            raise TrainingError(f"a streamed folder does not take {', '.join(unknown)}; it takes "
                                f"{', '.join(streamed.STREAM_OPTIONS)}")
        color = self.data_options.get("color", "rgb")
        if color not in streamed.COLORS:
            raise TrainingError(f"color={color!r} must be one of {', '.join(streamed.COLORS)}")

    def recipe(self) -> dict:
        """The fields a resumed run must share with the run it continues (where and how fast may differ)."""
        return {key: value for key, value in dataclasses.asdict(self).items() if key not in _WHERE}


# what a resumed run may change: where and how fast it runs (any number of replicas continues a run)
_WHERE = {"out", "backend", "device", "checkpoint_every", "stop_after_steps", "data_dir", "eval_every", "distributed",
          "devices", "sync_bn", "timeout_s", "overwrite"}


# settings added after checkpoints were first written: a checkpoint without them had their defaults (None, False)
_ADDED = {"init", "freeze", "lr_backbone", "stream"}


def with_added_defaults(recipe: dict) -> dict:
    """A checkpoint's recorded ``recipe`` with the settings added since it was written at their defaults, as
    the run that wrote it had them.

        >>> with_added_defaults({"seed": 3})["stream"]
        False
    """
    defaults = {field.name: field.default for field in dataclasses.fields(TrainConfig) if field.name in _ADDED}
    return {**defaults, **recipe}


def check_recipe(path, fields: dict, bad) -> None:
    """Refuse the ``config`` of a checkpoint's description (``TrainConfig.recipe()`` as JSON) unless it is one
    a run could have had; ``bad(field, problem)`` makes the error (see ``checkpoint.read_description``)."""
    known = [field.name for field in dataclasses.fields(TrainConfig) if field.name not in _WHERE]
    for name in known:
        if name not in fields and name not in _ADDED:
            raise bad(f"config.{name}", "is missing")
    for name in fields:
        if name not in known:
            raise bad(f"config.{name}", "is not a training setting")
    try:
        config = TrainConfig(out=str(path), **fields).resolved()
    except (TypeError, ValueError) as error:
        raise bad("config", f"holds an invalid setting: {error}") from None
    try:
        make_plan(resolve(config.arch) if config.arch is not None else ResNetSpec.from_dict(config.spec))
    except (SpecError, KeyError, ValueError) as error:
        raise bad("config.arch" if config.arch is not None else "config.spec", f"names no network: {error}") from None
