"""``portres convert``: weights from one file format to another, checked against a network on the way."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
import numpy as np

from portres import zoo
from portres.interop import pth
from portres.spec import ResNetSpec
from portres.weights import (
    _FORMATS,
    _TORCH_FORMATS,
    _is_counter,
    capped,
    describe_weights_file,
    listed,
    load_weights,
    nearest_presets,
    save_weights,
)

from .app import load_spec, main

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

    def lines(self) -> list[str]:
        """The report as the command prints it."""
        network = self.network
        if self.recognised:
            others = [name for name in self.recognised if name != self.network]
            same = f"; {listed(others)} {'has' if len(others) == 1 else 'have'} the same tensors" if others else ""
            network += f" (recognised from the names and shapes{same})"
        changes = ", ".join(f"{count} {change}" for change, count in self.dtype_changes.items())
        out = [f"{self.source} -> {self.destination} for {network}",
               f"  mapped:     {self.mapped} tensors" + (f" ({changes})" if changes else ", dtypes unchanged")]
        if self.unwrapped:
            out.append(f"  unwrapped:  the state_dict from checkpoint{self.unwrapped}")
        renamed = f"{len(self.renamed)}"
        if self.renamed:
            first, to = next(iter(self.renamed.items()))
            renamed += f" (e.g. {first} -> {to})"
        out.append(f"  renamed:    {renamed}")
        out.append(f"  transposed: {len(self.transposed)}")
        dropped = f"{len(self.dropped)}"
        if self.dropped:
            counters = sum(_is_counter(name) for name in self.dropped)
            dropped += f" (num_batches_tracked counters: {counters})" if counters == len(self.dropped) else ""
        out.append(f"  dropped:    {dropped}")
        out += [f"  lossy:      {line}" for line in capped(self.lossy)]  # one per tensor: hundreds in a big net
        return out


def convert_weights(source, destination, spec: ResNetSpec | None = None, *, dtype: str | None = None,
                    allow_lossy: bool = False) -> ConversionReport:
    """Load ``source`` strictly for ``spec`` and write it to ``destination`` (format from its suffix).

    Without ``spec``, the zoo preset whose names and shapes the file matches exactly is used.
    Each tensor keeps its dtype where the destination can store it (bfloat16 only in a torch
    checkpoint: elsewhere it is widened to float32, exactly), or takes ``dtype``. A cast that
    that loses more than rounding (see ``_cast``: values beyond the new dtype's range, or a
    tensor mostly below its normal range) is refused unless ``allow_lossy`` (overflowing values
    then saturate at the largest finite value, and the report lists each loss); rounding is
    what a narrower dtype means and is not counted as loss.

        >>> convert_weights("resnet50.pth", "resnet50.safetensors").mapped
        267
    """
    source, destination = Path(source), Path(destination)
    if destination.suffix not in _FORMATS:
        raise ValueError(f"{destination}: cannot write {destination.suffix or 'a file without a suffix'}; "
                         "give DESTINATION the suffix .safetensors, .npz or .pth (.pt, .bin)")
    to_torch = destination.suffix in _TORCH_FORMATS
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
    if source.suffix in _TORCH_FORMATS:
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
    given = sum(not _is_counter(name) for name in shapes)
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
    rounded = (pth._to_bfloat16_bits(cast).astype(np.uint32) << 16).view(np.float32) if bfloat16 else cast
    overflow = ~np.isfinite(rounded)
    losses = []
    if overflow.any():
        worst = float(np.abs(value[overflow]).max())
        losses.append(f"{int(overflow.sum())} values overflow {dtype} (largest {worst:.6g}, {dtype}'s largest "
                      f"{largest:.6g})")
        if allow_lossy:
            cast = np.clip(value, -largest, largest).astype(narrow)
            rounded = (pth._to_bfloat16_bits(cast).astype(np.uint32) << 16).view(np.float32) if bfloat16 else cast
    scale = float(np.linalg.norm(value.astype(np.float64)))
    error = float(np.linalg.norm(rounded.astype(np.float64) - value)) / scale if scale else 0.0
    if not overflow.any() and error > roundoff:
        tiny = float(np.finfo(np.float32 if bfloat16 else narrow).tiny)  # bfloat16 has float32's exponent range
        below = int(((np.abs(value) < tiny) & (value != 0)).sum())
        zeroed = int(((rounded == 0) & (value != 0)).sum())
        losses.append(f"relative error {error:.3g} in {dtype}, above its rounding error {roundoff:.2g}: {below} of "
                      f"{value.size} values lie below its normal range ({tiny:.3g}), {zeroed} become 0")
    return cast, "; ".join(losses)


@main.command()
@click.argument("source", type=click.Path())
@click.argument("destination", type=click.Path())
@click.option("--arch", "name", help="The preset the weights are for (default: recognised from names and shapes).")
@click.option("--spec", "spec_file", type=click.Path(), help="A spec JSON file instead of --arch.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
              help="Store every tensor in this dtype (default: keep each one's, where DESTINATION can store it).")
@click.option("--allow-lossy", is_flag=True,
              help="Write even when the new dtype loses more than rounding (overflowing values saturate).")
def convert(source, destination, name, spec_file, dtype, allow_lossy):
    """Convert weights between .pth/.pt/.bin, .safetensors and .npz, checked against the network.

    SOURCE is read strictly (every missing, unexpected or misshapen tensor is reported, nothing
    is written); torch checkpoints are read without torch and without running their pickle.
    The report says how many tensors were mapped, renamed, transposed and dropped, and which
    dtypes changed.
    """
    spec = load_spec(name, spec_file) if name is not None or spec_file is not None else None
    report = convert_weights(source, destination, spec, dtype=dtype, allow_lossy=allow_lossy)
    click.echo("\n".join(report.lines()))
