"""The ``portres`` click group, its error contract and helpers shared by the verb modules.

User errors (unknown preset, invalid spec file, bad argument, missing framework) print one
``portres: error: ...`` line on stderr and exit with status 2, never a traceback.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import click

from portres import zoo
from portres.plan import make_plan
from portres.spec import ResNetSpec, SpecError
from portres.weights import WeightsError

MAX_IMAGE_SIZE = 4096  # portres.training.loop.MAX_IMAGE_SIZE (not imported: the CLI loads training code lazily)
IMAGE_SIZE = click.IntRange(min=1, max=MAX_IMAGE_SIZE)  # --image-size of train, eval, gradflow and lesion

USER_ERRORS = (SpecError, WeightsError, ValueError, KeyError, OSError, RuntimeError, MemoryError)


def fail(message: str) -> None:
    """The one line every user error prints; the exit status is 2."""
    click.echo(f"portres: error: {message}", err=True)
    sys.exit(2)


def _quiet_broken_pipe() -> None:
    """`portres list | head`: the reader left, which is not an error. Point stdout at /dev/null so
    the interpreter's final flush cannot complain either, and exit 0."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(0)


class _Group(click.Group):
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except BrokenPipeError:
            _quiet_broken_pipe()
        except click.exceptions.NoArgsIsHelpError as error:  # bare `portres`: the help, not an error
            click.echo(error.ctx.get_help())
            sys.exit(0)
        except click.UsageError as error:  # click would print the usage block; one line is enough
            where = f" (see `{error.ctx.command_path} --help`)" if error.ctx else ""
            fail(f"{error.format_message()}{where}")
        except click.ClickException as error:
            fail(error.format_message())
        except click.exceptions.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except BrokenPipeError:  # before click's own handler, which exits 1 ("a backend disagrees" here)
            _quiet_broken_pipe()
        except MemoryError as error:  # NumPy says how much it could not allocate
            fail(f"out of memory{f' ({error})' if str(error) else ''}: {self._memory_hint(ctx)}")
        except USER_ERRORS as error:
            fail(str(error))

    def _memory_hint(self, ctx) -> str:
        """What the verb that ran out of memory can lower: its own batch and image size options only."""
        name = "train" if ctx.invoked_subcommand == "_rank" else ctx.invoked_subcommand  # a rank of `train`
        command = self.get_command(ctx, name) if name else None
        given = {opt for param in getattr(command, "params", ()) for opt in param.opts}
        options = [opt for opt in _SIZE_OPTIONS if opt in given]
        return f"lower {' or '.join(options)}, or use a smaller network" if options else "use a smaller network"


_SIZE_OPTIONS = ("--batch", "--batch-size", "--input-size", "--image-size")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="portres")
def main():
    """One ResNet description, lowered to tinygrad, MLX (and torch), checked against float64 NumPy."""


# -- helpers --------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list], right: set[int] | None = None) -> str:
    """A plain-text table; columns in ``right`` are right-aligned (numbers)."""
    right = right or set()
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    fmt = lambda row: "  ".join(c.rjust(w) if i in right else c.ljust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(row) for row in cells[1:]])


def _spec_options() -> tuple[list[str], str]:
    """How the running verb lets a user name a network: its own options only, for messages."""
    ctx = click.get_current_context(silent=True)
    params = {param.name: param for param in ctx.command.params} if ctx else {}
    ways, by_name = [], "NAME"
    if "name" in params:
        is_option = isinstance(params["name"], click.Option)
        by_name = "--arch NAME" if is_option else "NAME"
        ways.append(by_name)
    if "spec_file" in params:
        ways.append("--spec FILE.json")
    if "depth" in params:
        ways.append("--depth N")
    return ways or ["NAME"], by_name


def load_spec(name: str | None, spec_file: str | None, depth: int | None = None) -> ResNetSpec:
    """The spec from exactly one of NAME (or --arch NAME), --spec FILE or --depth N."""
    given = [x for x in (name, spec_file, depth) if x is not None]
    if len(given) != 1:
        ways, _ = _spec_options()
        listed = ways[0] if len(ways) == 1 else f"{', '.join(ways[:-1])} or {ways[-1]}"
        raise click.UsageError(f"give exactly one of {listed}" if len(ways) > 1 else f"give {listed}")
    if spec_file is not None:
        path = Path(spec_file)
        if not path.is_file():
            raise FileNotFoundError(f"spec file {spec_file} does not exist")
        try:
            spec = ResNetSpec.from_json(path.read_text(encoding="utf-8"))
            make_plan(spec)  # what only the ops show (e.g. groups that do not divide a conv's input) fails here
            return spec
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"spec file {spec_file} cannot be read: {error}") from None
        except SpecError as error:
            raise SpecError(f"{spec_file}: {error}") from None
    if depth is not None:
        if f"resnet{depth}" not in zoo.names():
            _, by_name = _spec_options()
            raise ValueError(f"unknown depth {depth}: ImageNet ResNets have depth "
                             f"{'/'.join(map(str, zoo.IMAGENET_DEPTHS))}, CIFAR ResNets "
                             f"{'/'.join(map(str, zoo.CIFAR_DEPTHS))}; other presets by name: {by_name}")
        return zoo.get(f"resnet{depth}")
    return zoo.get(name)


def millions(n: int) -> str:
    return f"{n / 1e6:,.2f}M"


def giga(n: float) -> str:
    return f"{n / 1e9:,.3f}G"


def backend_list(value: str | None, include_numpy: bool) -> list[str]:
    from portres import backends as registry

    if value in (None, "all"):
        names = [n for n in registry.available() if include_numpy or n != "numpy"]
        if not names:
            raise ValueError("no backend is available here: pip install 'portres[all]'")
        return names
    names = list(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    if not names:
        raise click.UsageError(f"no backend named in {value!r}; give e.g. tinygrad,mlx or 'all'")
    for n in names:
        if n not in registry.NAMES:
            raise ValueError(f"unknown backend {n!r}; choose from {', '.join(registry.NAMES)} or 'all'")
    return names


def json_line(record) -> str:
    """Strict JSON (RFC 8259): NaN and infinities become null, never `NaN`/`Infinity`."""
    from portres.records import strict_json

    return strict_json(record)


def fmt_error(x: float) -> str:
    return "inf/NaN" if not math.isfinite(x) else f"{x:.2e}"


def data_options(image_size: int | None) -> dict:
    """The data set options a verb's ``--image-size`` sets (none when it is not given)."""
    return {} if image_size is None else {"image_size": image_size}


def data_for(path, data: str | None, image_size: int | None, fallback: str | None) -> tuple[str | None, dict]:
    """The data set (and options) to read ``path``'s network with: the one given, else the one a training
    checkpoint was trained on (its image size too), else ``fallback``; a mismatch with the checkpoint is said."""
    from portres.training.checkpoint import CheckpointError, DescriptionError
    from portres.training.loop import data_of_checkpoint

    trained_on, trained_options = None, {}
    if path is not None:
        try:
            trained_on, trained_options = data_of_checkpoint(path)
        except DescriptionError:  # a checkpoint, but altered: refused, not read as a plain weights file
            raise
        except CheckpointError:  # a plain weights file: nothing recorded
            pass
    chosen = data or trained_on or fallback
    if data is not None and trained_on is not None and data != trained_on:
        click.echo(f"note: {path} was trained on {trained_on}; reading it on {data} as asked", err=True)
    if image_size is not None:
        return chosen, data_options(image_size)
    return chosen, trained_options if chosen == trained_on else {}
