"""``portres convert``: weights from one file format to another, checked against a network on the way.

The work is :func:`portres.interop.convert.convert_weights`'s; this module parses the options
and prints its report.
"""

from __future__ import annotations

import click

from portres.interop.convert import ConversionReport, convert_weights
from portres.weights import capped, is_training_state, listed

from .app import load_spec, main


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
    click.echo("\n".join(report_lines(report)))


def report_lines(report: ConversionReport) -> list[str]:
    """The report as the command prints it."""
    network = report.network
    if report.recognised:
        others = [name for name in report.recognised if name != report.network]
        same = f"; {listed(others)} {'has' if len(others) == 1 else 'have'} the same tensors" if others else ""
        network += f" (recognised from the names and shapes{same})"
    changes = ", ".join(f"{count} {change}" for change, count in report.dtype_changes.items())
    out = [f"{report.source} -> {report.destination} for {network}",
           f"  mapped:     {report.mapped} tensors" + (f" ({changes})" if changes else ", dtypes unchanged")]
    if report.unwrapped:
        out.append(f"  unwrapped:  the state_dict from checkpoint{report.unwrapped}")
    renamed = f"{len(report.renamed)}"
    if report.renamed:
        first, to = next(iter(report.renamed.items()))
        renamed += f" (e.g. {first} -> {to})"
    out.append(f"  renamed:    {renamed}")
    out.append(f"  transposed: {len(report.transposed)}")
    dropped = f"{len(report.dropped)}"
    if report.dropped:
        counters = sum(is_training_state(name) for name in report.dropped)
        dropped += f" (num_batches_tracked counters: {counters})" if counters == len(report.dropped) else ""
    out.append(f"  dropped:    {dropped}")
    out += [f"  lossy:      {line}" for line in capped(report.lossy)]  # one per tensor: hundreds in a big net
    return out
