"""Weights from one file format to another, checked against a network on the way (``portres convert``).

The source is loaded strictly (:func:`portres.load_weights`), each tensor's dtype kept where
the destination can store it, and what changed is returned as a :class:`ConversionReport`:

    >>> report = convert_weights("resnet50.pth", "resnet50.safetensors")
    >>> report.network, report.unwrapped
    ('resnet50', '')
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from .. import zoo
from ..analysis import nearest_presets
from ..spec import ResNetSpec
from ..tensorfiles import TORCH_FORMATS, WRITE_FORMATS, capped, is_training_state, listed
from ..weights import describe_weights_file, load_weights, save_weights
from . import pth

_WIDTHS = {"float16": np.float16, "float32": np.float32, "float64": np.float64}
_BFLOAT16_MAX = float.fromhex("0x1.fep127")  # the largest finite bfloat16, also a float32


@dataclasses.dataclass
class ConversionReport:
    """What ``convert_weights`` did to each tensor on its way from one file to another."""

    source: str  # the file read
    destination: str  # the file written
    network: str  # the spec the weights were checked against
    recognised: list[str]  # presets recognised from the names and shapes when none was given, else []
    mapped: int = 0  # tensors written
    dropped: list[str] = dataclasses.field(default_factory=list)  # source tensors not written (BN step counters)
    renamed: dict[str, str] = dataclasses.field(default_factory=dict)  # source name -> name written
    transposed: list[str] = dataclasses.field(default_factory=list)  # written with permuted axes (name maps)
    dtype_changes: dict[str, int] = dataclasses.field(default_factory=dict)  # "float32 -> float16" -> tensors
    unwrapped: str = ""  # where the state_dict sat in the checkpoint, e.g. "['state_dict']"
    lossy: list[str] = dataclasses.field(default_factory=list)  # values saturated or flushed (--allow-lossy)


def convert_weights(source, destination, spec: ResNetSpec | None = None, *, dtype: str | None = None,
                    allow_lossy: bool = False) -> ConversionReport:
    """Load ``source`` strictly for ``spec`` and write it to ``destination`` (format from its suffix).

    Without ``spec``, the zoo preset whose names and shapes the file matches exactly is used.
    Each tensor keeps its dtype where the destination can store it (bfloat16 only in a torch
    checkpoint: elsewhere it is widened to float32, exactly), or takes ``dtype``. A cast
    that loses more than rounding (see ``_cast``: values beyond the new dtype's range, or a
    tensor mostly below its normal range) is refused unless ``allow_lossy`` (overflowing values
    then saturate at the largest finite value, and the report lists each loss); rounding is
    what a narrower dtype means and is not counted as loss.

        >>> convert_weights("resnet50.pth", "resnet50.safetensors").mapped
        267
    """
    source, destination = Path(source), Path(destination)
    if destination.suffix not in WRITE_FORMATS:
        raise ValueError(f"{destination}: cannot write {destination.suffix or 'a file without a suffix'}; "
                         "give DESTINATION the suffix .safetensors, .npz or .pth (.pt, .bin)")
    to_torch = destination.suffix in TORCH_FORMATS
    if dtype == "bfloat16" and not to_torch:
        raise ValueError(f"{destination}: bfloat16 is written to torch checkpoints (.pth) only; NumPy has no "
                         "bfloat16, so .safetensors and .npz get float32 or float16 here")
    if dtype not in (None, "bfloat16", *_WIDTHS):
        raise ValueError(f"dtype {dtype!r}: choose float32, float16 or bfloat16")
    described = describe_weights_file(source)  # names, shapes and stored dtypes; no tensor data read yet
    recognised = []
    if spec is None:
        spec, recognised = _recognise(source, {name: shape for name, (shape, _) in described.items()})
    report = ConversionReport(str(source), str(destination), spec.name, recognised)
    prefix = ""
    if source.suffix in TORCH_FORMATS:
        layout = pth.inspect_pth(source)
        report.unwrapped = "".join(f"[{key!r}]" for key in layout.wrapper)
        prefix = layout.stripped_prefix
    stored = {name: kind for name, (_, kind) in described.items()}
    exact = "float64" if any(kind in ("float64", "int64", "int32") for kind in stored.values()) else "float32"
    params = load_weights(source, spec, dtype=exact)  # strict: every misfit is reported at once, nothing written
    report.dropped = [name for name in described if name not in params]
    if prefix:
        report.renamed = {prefix + name: name for name in described if name in params}
    arrays, bfloat16, losses = {}, [], []
    for name, value in params.items():
        before = stored[name]
        after = dtype or (before if before in _WIDTHS or (before == "bfloat16" and to_torch) else "float32")
        arrays[name], loss = _cast(value, after, allow_lossy)
        if loss:
            losses.append(f"{name}: {loss}")
        if after == "bfloat16":
            bfloat16.append(name)
        if after != before:
            change = f"{before} -> {after}"
            report.dtype_changes[change] = report.dtype_changes.get(change, 0) + 1
    if losses and not allow_lossy:
        losses_shown = "\n  ".join(capped(losses))
        raise ValueError(f"nothing was written to {destination}: converting would lose values:\n  {losses_shown}\n"
                         "choose a wider --dtype, or pass --allow-lossy to saturate and flush them")
    report.lossy = losses
    if bfloat16:
        pth.write_pth(destination, arrays, bfloat16=bfloat16)
    else:
        save_weights(destination, arrays)
    report.mapped = len(arrays)
    return report


def _recognise(source: Path, shapes: dict[str, tuple[int, ...]]) -> tuple[ResNetSpec, list[str]]:
    best, matched, total = nearest_presets(shapes)
    given = sum(not is_training_state(name) for name in shapes)
    if matched == given == total:
        return zoo.get(best[0]), best
    closest = ""
    if matched:
        closest = f"; the closest preset is {listed(best, ' or ')} ({matched} of its {total} tensors match)"
    raise ValueError(f"{source} does not match any preset exactly by names and shapes{closest}; give the network "
                     "with --arch NAME or --spec FILE.json")


def _cast(value: np.ndarray, dtype: str, allow_lossy: bool) -> tuple[np.ndarray, str]:
    """``value`` in ``dtype`` (bfloat16: as float32, rounded by the writer) and what would be lost, if anything.

    Lossy means more than rounding: a value beyond the dtype's range (it would become inf), or
    a tensor whose relative L2 error exceeds the dtype's unit roundoff, which rounding alone
    never does, so many of its values must sit below the dtype's normal range (or flush to 0).
    A few tiny values rounding to zero in a tensor of ordinary ones is rounding, not loss.
    """
    bfloat16 = dtype == "bfloat16"
    narrow = np.float32 if bfloat16 else _WIDTHS[dtype]
    largest = _BFLOAT16_MAX if bfloat16 else float(np.finfo(narrow).max)
    roundoff = 2.0**-8 if bfloat16 else float(np.finfo(narrow).eps) / 2
    with np.errstate(over="ignore"):
        cast = value.astype(narrow)
    rounded = pth.round_to_bfloat16(cast) if bfloat16 else cast
    overflow = ~np.isfinite(rounded)
    losses = []
    if overflow.any():
        worst = float(np.abs(value[overflow]).max())
        losses.append(f"{int(overflow.sum())} values overflow {dtype} (largest {worst:.6g}, {dtype}'s largest "
                      f"{largest:.6g})")
        if allow_lossy:
            cast = np.clip(value, -largest, largest).astype(narrow)
            rounded = pth.round_to_bfloat16(cast) if bfloat16 else cast
    scale = float(np.linalg.norm(value.astype(np.float64)))
    error = float(np.linalg.norm(rounded.astype(np.float64) - value)) / scale if scale else 0.0
    if not overflow.any() and error > roundoff:
        tiny = float(np.finfo(np.float32 if bfloat16 else narrow).tiny)  # bfloat16 has float32's exponent range
        below = int(((np.abs(value) < tiny) & (value != 0)).sum())
        zeroed = int(((rounded == 0) & (value != 0)).sum())
        losses.append(f"relative error {error:.3g} in {dtype}, above its rounding error {roundoff:.2g}: {below} of "
                      f"{value.size} values lie below its normal range ({tiny:.3g}), {zeroed} become 0")
    return cast, "; ".join(losses)
