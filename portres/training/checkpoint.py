"""Training checkpoints: one safetensors file with everything needed to continue exactly.

Tensors: the model's parameters and BN statistics under their usual names (so a checkpoint is
also a weights file: ``load_weights`` skips the rest) and the optimiser's slots under
``optimizer/<slot>.<parameter>``: a ``TrainState`` (``portres.training.state``) flattened, here
and nowhere else (:func:`state_tensors`, and back :func:`split_tensors`). Metadata
(``portres.checkpoint``, JSON): the spec, the training recipe, the optimiser's configuration, the
position (epoch, batch, step), the running sums of the epoch in progress, the metrics so far, and the
data set's class names (``class_names``: a list, one per output, or null) and its images' size and
normalisation (``data``: image_size, mean, std, and for a run streamed from a folder its resize_size,
interpolation, channel_order and scale; what ``portres.load`` preprocesses photos with); older
checkpoints lack those two.
There are no RNG states to save: data order and augmentation are pure functions of (seed, epoch,
batch) - see ``portres.data.batches``.

Files are written atomically (a unique temporary file, fsync, rename), so a crash or kill -9
while writing leaves the previous checkpoint intact.

A checkpoint is data from disk, so nothing in it is trusted: :func:`read_description` checks
every field of the description (one line naming the first bad one), and :func:`check_tensors`
every tensor and optimiser slot against the network and optimiser it is resumed with.

A run directory is held by one run at a time (:func:`run_directory`: an exclusive ``flock`` on
``OUT/.portres.lock``, which holds the holder's PID); the holder removes the temporary files a
killed writer left, and a new run refuses a directory that already holds something.

    >>> save_checkpoint("runs/r20/last.safetensors", state_tensors(numpy_state), metadata)
    >>> tensors, metadata = load_checkpoint("runs/r20/last.safetensors")
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
from pathlib import Path

import numpy as np

from ..plan import make_plan
from ..spec import ResNetSpec, SpecError
from ..weights import TRAINING_STATE, WeightsError, capped, open_weights_file, read_metadata, save_weights
from ..zoo import CHANNEL_ORDERS, INTERPOLATIONS, SCALES
from .config import check_recipe
from .optim import from_config
from .state import TrainState

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not protected from a concurrent second run
    fcntl = None

KEY = "portres.checkpoint"  # the metadata entry holding the JSON description
VERSION = 1  # bumped when the layout changes
LAST, BEST = "last.safetensors", "best.safetensors"  # a run directory's checkpoints: to resume from, the best weights
RUN_FILES = (LAST, BEST, "metrics.jsonl", "summary.json", "curves.png")  # what a run writes in its directory


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: the message names the file, the problem and the fix."""


class DescriptionError(CheckpointError):
    """A checkpoint whose description has a field that is missing, unknown, of the wrong type or out of range:
    the file is a portres checkpoint, but it was altered or damaged."""


class RunDirectoryError(ValueError):
    """An output directory a run may not write: another run holds it, or it holds something that would be lost."""


def state_tensors(state: TrainState, *, slots: bool = True) -> dict:
    """The tensors a checkpoint stores for ``state``: parameters and BN buffers under their names, and (with
    ``slots``) the optimiser's slots under ``optimizer/<slot>.<parameter>``.

        >>> sorted(state_tensors(TrainState({"fc.weight": w}, {}, {"momentum_buffer.fc.weight": b})))
        ['fc.weight', 'optimizer/momentum_buffer.fc.weight']
    """
    stored = {**state.params, **state.buffers}
    if slots:
        stored.update({TRAINING_STATE + name: value for name, value in state.slots.items()})
    return stored


def split_tensors(tensors: dict) -> tuple[dict, dict]:
    """``(model parameters and BN buffers, optimiser slots without their prefix)`` of a checkpoint's tensors."""
    model = {name: value for name, value in tensors.items() if not name.startswith(TRAINING_STATE)}
    slots = {name[len(TRAINING_STATE):]: value for name, value in tensors.items() if name.startswith(TRAINING_STATE)}
    return model, slots


def save_checkpoint(path, tensors: dict[str, np.ndarray], metadata: dict) -> None:
    """Write ``tensors`` (NumPy arrays: :func:`state_tensors`) and ``metadata`` (JSON-able) to ``path`` atomically."""
    description = json.dumps({"version": VERSION, **metadata}, allow_nan=False)
    save_weights(path, tensors, metadata={KEY: description})


def read_description(path) -> dict:
    """The JSON description of the checkpoint at ``path`` (``CheckpointError`` if it is not one)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        text = read_metadata(path).get(KEY)
    except WeightsError as error:
        raise CheckpointError(f"{path} is corrupt: {error}") from None
    if text is None:
        raise CheckpointError(f"{path} is a weights file, not a portres training checkpoint")
    try:
        description = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: its checkpoint description is not valid JSON ({error})") from None
    except RecursionError:  # thousands of nested brackets: no description is nested that deep
        raise DescriptionError(f"checkpoint {path}: its description is nested too deeply (the file was altered or "
                               "damaged: use an intact checkpoint)") from None
    if not isinstance(description, dict):
        raise CheckpointError(f"{path}: its checkpoint description is not a JSON object")
    if description.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format {description.get('version')!r} is not {VERSION}; "
                              "it was written by another portres version")
    _check_description(path, description)
    return description


def load_checkpoint(path) -> tuple[dict[str, np.ndarray], dict]:
    """``(state, description)`` from ``path``: every tensor as stored (float64 stays float64)."""
    description = read_description(path)
    try:
        with open_weights_file(Path(path)) as entries:
            state = {name: entry.read() for name, entry in entries.items()}
    except WeightsError as error:
        raise CheckpointError(f"{path} is corrupt: {error}") from None
    return state, description


def checkpoint_hint(out) -> str:
    """Where a stopped run in ``out`` can continue from: its last checkpoint, or that none was written yet.

        >>> checkpoint_hint("runs/r20")
        '; the last checkpoint runs/r20/last.safetensors (step 120) is intact: continue with --resume'
    """
    path = Path(out) / LAST
    try:
        step = read_description(path)["position"]["step"]
    except (CheckpointError, KeyError, TypeError):
        return f"; no checkpoint was written to {path} yet"
    return f"; the last checkpoint {path} (step {step}) is intact: continue with --resume"


# -- the description's fields ----------------------------------------------------------------------
# Each field: (test, what it must be). A tampered description must fail here with the field's name,
# not later as a KeyError, a TypeError in a format string or a backend's shape error.


def _integer(minimum: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _number(low: float, high: float = math.inf, optional: bool = False):
    return lambda v: (optional and v is None) or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   and math.isfinite(v) and low <= v <= high)


_COUNT, _FRACTION = (_integer(0), "must be a non-negative integer"), (_number(0, 1), "must be a number in [0, 1]")
_OPTIONAL_FRACTION = (_number(0, 1, optional=True), "must be null or a number in [0, 1]")
_AMOUNT = (_number(0), "must be a finite number >= 0")
_OBJECT = (lambda v: isinstance(v, dict), "must be a JSON object")
_FIELDS = {
    "version": (_integer(1), "must be a positive integer"),
    "spec": _OBJECT, "config": _OBJECT, "optimizer": _OBJECT, "position": _OBJECT,
    "backend": (lambda v: isinstance(v, str) and v != "", "must be a backend name"),
    "dtype": (lambda v: v in ("float32", "float64"), "must be 'float32' or 'float64'"),
    "metrics": (lambda v: isinstance(v, list), "must be a list of epoch records"),
    "finished_epoch": (lambda v: isinstance(v, bool), "must be true or false"),
    "replicas": (_integer(1), "must be a positive integer"),
}
MAX_CLASS_NAME = 1000  # characters of one class name (folder names are far shorter)
# fields that checkpoints written before them lack
_OPTIONAL_FIELDS = {
    "class_names": (lambda v: v is None or (isinstance(v, list) and all(isinstance(name, str) and
                                                                        len(name) <= MAX_CLASS_NAME for name in v)),
                    f"must be null or a list of class names (strings of at most {MAX_CLASS_NAME} characters)"),
    "data": (lambda v: _is_data_record(v), "must be a JSON object of image_size (two positive integers), mean and "
                                           "std (one finite number per channel, std > 0)"),
}


# what a streamed folder's run adds to the record (portres train --stream): its resize before the centre crop and
# its channels and scaling (DataConfig's fields of those names)
_STREAM_RECORD = {"resize_size", "interpolation", "channel_order", "scale"}


def _is_data_record(value) -> bool:
    """The training images' geometry and normalisation (``portres.load`` preprocesses photos the same way)."""
    if not isinstance(value, dict) or set(value) not in ({"image_size", "mean", "std"},
                                                         {"image_size", "mean", "std"} | _STREAM_RECORD):
        return False
    size, mean, std = value["image_size"], value["mean"], value["std"]
    numbers = lambda v, low: isinstance(v, list) and 0 < len(v) <= 4 and all(_number(low)(x) for x in v)  # noqa: E731
    valid = (isinstance(size, list) and len(size) == 2 and all(_integer(1)(side) for side in size)
             and numbers(mean, -math.inf) and numbers(std, 0) and len(mean) == len(std) and 0 not in std)
    if not valid or "resize_size" not in value:
        return valid
    return (size[0] == size[1] and _integer(size[0])(value["resize_size"]) and value["interpolation"] in INTERPOLATIONS
            and CHANNEL_ORDERS.get(value["channel_order"]) == len(mean) and value["scale"] in SCALES)
_POSITION = {"epoch": _COUNT, "batch": _COUNT, "step": _COUNT, "epoch_sums": _OBJECT,
             "best_test_top1_error": _OPTIONAL_FRACTION}
_EPOCH_SUMS = {"loss": _AMOUNT, "wrong": _COUNT, "seen": _COUNT, "seconds": _AMOUNT,
               "lr": (_number(0, optional=True), "must be null or a finite number >= 0")}
_RECORD = {"epoch": (_integer(1), "must be a positive integer"), "step": _COUNT, "lr": _AMOUNT, "train_loss": _AMOUNT,
           "train_error": _FRACTION, "test_loss": (_number(0, optional=True), "must be null or a finite number >= 0"),
           "test_top1_error": _OPTIONAL_FRACTION, "test_top5_error": _OPTIONAL_FRACTION, "images_per_s": _AMOUNT,
           "seconds": _AMOUNT}


def _fields(path, where: str, value: dict, schema: dict, optional: dict | None = None) -> None:
    """Every field of ``schema`` present in ``value`` and valid, those of ``optional`` valid where present,
    and no other."""
    for name, (test, requirement) in {**schema, **(optional or {})}.items():
        field = f"{where}{name}"
        if name not in value:
            if name in schema:
                raise _bad(path, field, "is missing")
            continue
        if not test(value[name]):
            raise _bad(path, field, f"{requirement}, got {_shown(value[name])}")
    for name in value:
        if name not in schema and name not in (optional or {}):
            raise _bad(path, f"{where}{name}", "is not part of a checkpoint description")


def _bad(path, field: str, problem: str) -> DescriptionError:
    return DescriptionError(f"checkpoint {path}: field {field!r} {problem} (the file was altered or damaged: use an "
                            "intact checkpoint)")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_description(path, description: dict) -> None:
    _fields(path, "", description, _FIELDS, _OPTIONAL_FIELDS)
    position = description["position"]
    _fields(path, "position.", position, _POSITION)
    sums = position["epoch_sums"]
    _fields(path, "position.epoch_sums.", sums, _EPOCH_SUMS)
    if sums["wrong"] > sums["seen"]:
        raise _bad(path, "position.epoch_sums.wrong", f"must be at most seen ({sums['seen']}), got {sums['wrong']}")
    if description["finished_epoch"] and position["batch"] != 0:
        raise _bad(path, "position.batch", f"must be 0 at the end of an epoch, got {position['batch']}")
    for index, record in enumerate(description["metrics"]):
        if not isinstance(record, dict):
            raise _bad(path, f"metrics[{index}]", f"must be a JSON object, got {_shown(record)}")
        _fields(path, f"metrics[{index}].", record, _RECORD)
        if record["epoch"] != index + 1:
            raise _bad(path, f"metrics[{index}].epoch", f"must be {index + 1} (one record per epoch), "
                                                        f"got {record['epoch']}")
    if len(description["metrics"]) != position["epoch"]:
        raise _bad(path, "metrics", f"must hold one record per finished epoch ({position['epoch']}), "
                                    f"got {len(description['metrics'])}")
    try:
        make_plan(ResNetSpec.from_dict(description["spec"]))  # the ops too: a spec can be valid field by field only
    except SpecError as error:
        raise _bad(path, "spec", f"is not a valid network: {error}") from None
    try:
        from_config(description["optimizer"])
    except (TypeError, ValueError) as error:
        raise _bad(path, "optimizer", f"is not a valid optimiser: {error}") from None
    check_recipe(path, description["config"], bad=lambda field, problem: _bad(path, field, problem))
    if position["epoch"] > description["config"]["epochs"]:
        raise _bad(path, "position.epoch", f"must be at most config.epochs ({description['config']['epochs']}), "
                                           f"got {position['epoch']}")


def check_class_names(path, description: dict, num_classes: int) -> None:
    """Refuse a description whose ``class_names`` do not name each of the ``num_classes`` outputs (checked once
    the tensors have shown how many there are: a tampered spec is reported as the spec's fault)."""
    class_names = description.get("class_names")
    if class_names is not None and len(class_names) != num_classes:
        raise _bad(path, "class_names", f"must name each of the network's {num_classes} classes, got "
                                        f"{len(class_names)} names")


# -- the tensors -----------------------------------------------------------------------------------


def check_tensors(path, described: dict[str, tuple[tuple[int, ...], str]], plan, dtype: str,
                  slots: dict[str, tuple[int, ...]] | None = None) -> None:
    """Refuse a checkpoint whose tensors (``{name: (shape, dtype)}``) do not fit ``plan`` in ``dtype``, or, when
    ``slots`` (``{slot name: shape}``, what the optimiser keeps) is given, whose optimiser slots do not: one
    ``CheckpointError`` listing every problem (the first few). A slot that broadcasts (shape ``(1,)``) would train
    on silently with wrong momentum, and missing slots would restart it from zero: both are refused."""
    problems = []
    model = {name: value for name, value in described.items() if not name.startswith(TRAINING_STATE)}
    expected = {name: tuple(shape) for name, (shape, _) in plan.param_shapes().items()}
    _compare(problems, "", model, expected, dtype)
    if slots is not None:
        stored = {name[len(TRAINING_STATE):]: value for name, value in described.items()
                  if name.startswith(TRAINING_STATE)}
        _compare(problems, "optimiser slot ", stored, slots, dtype)
    if problems:
        shown = "; ".join(capped(problems, limit=8))  # one line: fewer than a file's listing
        raise CheckpointError(f"checkpoint {path} does not fit {plan.spec.name} as it is resumed: {shown}")


def _compare(problems: list, what: str, given: dict, expected: dict, dtype: str) -> None:
    problems += [f"{what}{name} is missing" for name in expected if name not in given]
    problems += [f"{what}{name} is unexpected" for name in given if name not in expected]
    for name, shape in expected.items():
        if name not in given:
            continue
        given_shape, given_dtype = given[name]
        if tuple(given_shape) != shape:
            problems.append(f"{what}{name} has shape {list(given_shape)}, expected {list(shape)}")
        elif str(given_dtype) != dtype:
            problems.append(f"{what}{name} is {given_dtype}, expected {dtype}")


# -- the run directory -----------------------------------------------------------------------------

LOCK = ".portres.lock"  # in the run directory: flock'ed by the run writing there, holds its PID


@contextlib.contextmanager
def run_directory(out, outputs: tuple[str, ...], *, resume: bool, overwrite: bool):
    """Hold the run directory ``out`` for one run, for as long as the ``with`` block lasts.

    Locks ``out`` (another run holding it is refused, naming its PID), removes the temporary files a
    killed writer of ``outputs`` left behind (only while locked: a live run's temporaries are never
    touched), and, unless ``resume``, refuses a directory that holds anything, or with ``overwrite``
    deletes the previous run's ``outputs`` (and nothing else).
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunDirectoryError(f"cannot create the run directory {out}: {error.strerror or error}") from None
    descriptor = _lock(out)
    try:
        _remove_stale_temporaries(out, outputs)
        present = sorted(entry.name for entry in out.iterdir() if entry.name != LOCK)
        if present and not resume:
            if not overwrite:
                listed = ", ".join(present[:4]) + (f" and {len(present) - 4} more" if len(present) > 4 else "")
                raise RunDirectoryError(f"{out} is not empty (it holds {listed}): continue the run there with "
                                        "--resume, replace it with --overwrite, or give another --out")
            for name in outputs:
                (out / name).unlink(missing_ok=True)
        yield
    finally:
        os.close(descriptor)  # releases the lock; the file stays, so a waiting run locks the same file


def _lock(out: Path) -> int:
    path = out / LOCK
    # never through a symlink (truncating its target) nor on a FIFO or device planted at the lock's name
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK
    try:
        descriptor = os.open(path, flags, 0o666)
    except OSError as error:
        raise RunDirectoryError(f"cannot lock the run directory {out}: cannot open {path} "
                                f"({error.strerror or error}); remove it if it is not a plain file") from None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise RunDirectoryError(f"cannot lock the run directory {out}: {path} is not a plain file; remove it")
    if fcntl is None:
        return descriptor
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
        holder = holder if holder.isdigit() else "unknown"  # what the file holds is not trusted into the message
        os.close(descriptor)
        raise RunDirectoryError(f"{out} is in use by another run (PID {holder}): wait for it to finish, or give "
                                "another --out") from None
    except OSError as error:  # a file system without locks
        os.close(descriptor)
        raise RunDirectoryError(f"cannot lock the run directory {out} ({error.strerror or error}): give an --out on "
                                "a local file system") from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    return descriptor


def _remove_stale_temporaries(out: Path, outputs: tuple[str, ...]) -> None:
    """Delete what a writer killed mid-write left: ``.<name[:32]>.<16 hex digits>.tmp`` (the names
    ``tensorfiles.create_temporary`` gives) for this run's own ``outputs``, nothing else."""
    names = "|".join(re.escape(name[:32]) for name in outputs)
    temporary = re.compile(rf"\.(?:{names})\.[0-9a-f]{{16}}\.tmp")
    for entry in out.iterdir():
        if temporary.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
