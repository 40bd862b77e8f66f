"""Training checkpoints: one safetensors file with everything needed to continue exactly.

Tensors: the model's parameters and BN statistics under their usual names (so a checkpoint is
also a weights file: ``load_weights`` skips the rest) and the optimiser's slots under
``optimizer/<slot>.<parameter>``. Metadata (``portres.checkpoint``, JSON): the spec, the
training recipe, the optimiser's configuration, the position (epoch, batch, step), the running
sums of the epoch in progress, and the metrics so far. There are no RNG states to save: data
order and augmentation are pure functions of (seed, epoch, batch) - see ``portres.data.batches``.

Files are written atomically (a unique temporary file, fsync, rename), so a crash or kill -9
while writing leaves the previous checkpoint intact.

    >>> save_checkpoint("runs/r20/last.safetensors", state, metadata)
    >>> state, metadata = load_checkpoint("runs/r20/last.safetensors")
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..weights import WeightsError, _open_weights_file, read_metadata, save_weights

KEY = "portres.checkpoint"  # the metadata entry holding the JSON description
VERSION = 1  # bumped when the layout changes


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: the message names the file, the problem and the fix."""


def save_checkpoint(path, state: dict[str, np.ndarray], metadata: dict) -> None:
    """Write ``state`` (NumPy arrays) and ``metadata`` (JSON-able) to ``path`` atomically."""
    description = json.dumps({"version": VERSION, **metadata}, allow_nan=False)
    save_weights(path, state, metadata={KEY: description})


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
    if not isinstance(description, dict):
        raise CheckpointError(f"{path}: its checkpoint description is not a JSON object")
    if description.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format {description.get('version')!r} is not {VERSION}; "
                              "it was written by another portres version")
    return description


def load_checkpoint(path) -> tuple[dict[str, np.ndarray], dict]:
    """``(state, description)`` from ``path``: every tensor as stored (float64 stays float64)."""
    description = read_description(path)
    try:
        with _open_weights_file(Path(path)) as entries:
            state = {name: entry.read() for name, entry in entries.items()}
    except WeightsError as error:
        raise CheckpointError(f"{path} is corrupt: {error}") from None
    return state, description
