"""Seeded initialisation, weights files read and written by suffix, and strict loading.

Parameter names are the plan's: torchvision's state_dict keys wherever torchvision has
the model (``layer1.0.conv1.weight``, ``layer1.0.downsample.1.running_var``, ``fc.bias``).
Elsewhere the scheme is the analogous one:

* pre-activation blocks: ``bnK`` is the BN-ReLU *before* ``convK``; the network ends with
  ``final_bn``; projections are ``downsample.0`` (a bare 1x1 conv, as in timm's v2);
* deep stem (ResNet-D): timm's ``conv1.0 / conv1.1 / conv1.3 / conv1.4 / conv1.6`` then
  ``bn1``; avg-down shortcuts are ``downsample.1`` (conv) and ``downsample.2`` (BN);
* CIFAR: ``conv1``, ``bn1``, ``layer1..3``, ``fc``; option-A shortcuts have no parameters.

Files are never half-written and never half-read. The file I/O is :mod:`portres.tensorfiles`'
(safetensors, ``.npz``, all-or-nothing writes, the format table, :class:`WeightsError`); this
module dispatches on a file's suffix:

* ``save_weights`` checks every tensor as ``load_weights`` will, then writes through
  :func:`~portres.tensorfiles.atomic_write`: a crash, Ctrl-C or a concurrent writer leaves
  one complete old or new file and no temporary file.
* PyTorch checkpoints (``.pth``/``.pt``/``.bin``) are read and written by ``interop/pth.py``
  without torch and without running anything from their pickle; Keras' ``.h5`` files are read
  by ``interop/keras.py``.
* Reading validates a file's directory first and then reads only the tensors needed: a file
  that does not fit the spec is rejected unread.

    >>> import portres
    >>> params = portres.init_params(portres.get("resnet18"), seed=0)
    >>> params["conv1.weight"].shape
    (64, 3, 7, 7)
    >>> portres.save_weights("/tmp/r18.safetensors", params)
    >>> loaded = portres.load_weights("/tmp/r18.safetensors", portres.get("resnet18"))
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from . import interop
from .analysis import nearest_presets
from .interop import keras, pth
from .plan import Plan, as_plan
from .spec import ResNetSpec
from .tensorfiles import (
    KERAS_FORMATS,
    NUMERIC_KINDS,
    READ_FORMAT_NAMES,
    READ_FORMATS,
    SAFETENSORS,
    TORCH_FORMATS,
    TRAINING_STATE,
    WRITE_FORMAT_NAMES,
    WRITE_FORMATS,
    Entry,
    WeightsError,
    atomic_write,
    capped,
    checked_for_saving,
    is_training_state,
    listed,
    npz_entries,
    open_regular_file,
    safetensors_entries,
    safetensors_header,
    shortened,
    to_numpy,
    write_npz,
    write_safetensors,
)


def init_params(spec: ResNetSpec | Plan, seed: int = 0, *, randomize_batch_norm: bool = False) -> dict[str, np.ndarray]:
    """Deterministic float32 parameters and buffers for ``spec``.

    Convs: He-normal, fan-out (torchvision). Linear: U(±1/sqrt(fan_in)) for weight and bias
    (PyTorch's default). BN: scale 1 (0 where ``zero_init_last_bn``), shift 0, running mean
    0, variance 1. Each tensor draws from its own stream seeded by ``(seed, crc32(name))``,
    so values do not depend on plan order, platform or which other tensors exist.

    ``randomize_batch_norm=True`` draws non-trivial BN scales, shifts and running
    statistics instead (for parity tests: identity BN hides bugs).
    """
    plan = as_plan(spec)
    params: dict[str, np.ndarray] = {}
    for op in plan.ops:
        layer = op.layer
        for name, (shape, _) in op.param_shapes().items():
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            suffix = name.rsplit(".", 1)[1]
            if op.kind == "conv2d" and suffix == "weight":
                fan_out = shape[0] * shape[2] * shape[3]
                value = rng.standard_normal(shape) * math.sqrt(2.0 / fan_out)
            elif op.kind == "linear":
                value = rng.uniform(-1, 1, shape) / math.sqrt(layer.in_features)
            elif randomize_batch_norm:
                low_high = {"weight": (0.5, 1.5), "running_var": (0.5, 2.0)}
                if suffix in low_high:
                    value = rng.uniform(*low_high[suffix], shape)
                else:  # bias, running_mean
                    value = rng.normal(0.0, 0.2, shape)
            else:
                one = suffix == "running_var" or (suffix == "weight" and not layer.zero_init)
                value = np.full(shape, 1.0 if one else 0.0)
            params[name] = value.astype(np.float32)
    return params


# -- files: dispatch on the suffix ----------------------------------------------------------


def save_weights(path, params: Mapping[str, np.ndarray], *, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``params`` to ``path`` (``.safetensors``, ``.npz`` or torch's ``.pth``), atomically.

    Every tensor is first checked as :func:`load_weights` will check it (a non-empty string
    name the format can store, a numeric dtype, finite values); on any problem nothing is
    written and one :class:`WeightsError` lists them all. The file is replaced all or nothing
    (see ``atomic_write``): it keeps its permissions, and a symlink keeps its link.
    ``metadata`` (strings) goes into a safetensors file's ``__metadata__``.

        >>> save_weights("/tmp/r20.npz", init_params(portres.get("resnet20")))
    """
    path = Path(path)
    if path.suffix not in WRITE_FORMATS:
        raise WeightsError(f"{path}: unknown weights format {path.suffix!r}; use {WRITE_FORMAT_NAMES}")
    if metadata is not None:
        if path.suffix != ".safetensors":
            raise WeightsError(f"{path}: only .safetensors files carry metadata")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise WeightsError(f"{path}: metadata must map strings to strings")
    if path.suffix in TORCH_FORMATS:
        pth.write_pth(path, params)
        return
    arrays = checked_for_saving(path, params)
    if path.suffix == ".safetensors":
        header = safetensors_header(path, arrays, metadata or {})
        atomic_write(path, lambda file: write_safetensors(file, header, arrays))
    else:
        atomic_write(path, lambda file: write_npz(file, arrays))


def read_weights_file(path) -> dict[str, np.ndarray]:
    """Every tensor in a ``.safetensors``, ``.npz`` or torch ``.pth`` file, unchecked against any spec.

    The file's directory (every name, dtype, shape and size) is validated before any tensor
    data is read; a corrupt or unreadable file raises :class:`WeightsError` naming it.

        >>> read_weights_file("/tmp/r18.safetensors")["fc.bias"].shape
        (1000,)
    """
    with open_weights_file(path) as entries:
        return {name: entry.read() for name, entry in entries.items()}


def describe_weights_file(path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each tensor's shape and dtype as the file stores it (e.g. ``"bfloat16"``), from its directory alone.

        >>> describe_weights_file("/tmp/r18.safetensors")["fc.bias"]
        ((1000,), 'float32')
    """
    with open_weights_file(path) as entries:
        return {name: (entry.shape, entry.stored or str(entry.dtype)) for name, entry in entries.items()}


@contextlib.contextmanager
def open_weights_file(path, container: str | None = None) -> Iterator[dict[str, Entry]]:
    """The validated directory of a weights file; its entries can be read while the context is open.

    ``container`` (a suffix) overrides the one the path has, e.g. ``.pth`` for ``checkpoint.pth.tar``.

        >>> with open_weights_file("/tmp/r18.safetensors") as entries:
        ...     entries["fc.bias"].read().shape
        (1000,)
    """
    path = Path(path)
    container = container or path.suffix
    if container not in READ_FORMATS:
        raise WeightsError(f"{path}: unknown weights format {path.suffix!r}; use {READ_FORMAT_NAMES}")
    with open_regular_file(path) as file:
        if container == SAFETENSORS:
            yield safetensors_entries(path, file)
            return
        if container in TORCH_FORMATS:
            opened = pth.checkpoint_entries(path, file)
        elif container in KERAS_FORMATS:
            opened = keras.h5_entries(path, file)
        else:
            opened = npz_entries(path, file)
        with opened as entries:
            yield entries


def read_metadata(path) -> dict[str, str]:
    """The ``__metadata__`` of a ``.safetensors`` file (``{}`` for other formats), read from its header only."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    with open_weights_file(path):  # validates the whole header first
        pass
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        return dict(json.loads(file.read(length).decode("utf-8")).get("__metadata__") or {})


# -- strict loading -------------------------------------------------------------------------


def _float_dtype(dtype) -> np.dtype:
    try:
        target = np.dtype(dtype)
    except TypeError:
        target = None
    if target is None or target.kind != "f":
        raise WeightsError(f"dtype {dtype!r} is not a floating-point type; use 'float32', 'float16' or 'float64'")
    return target


def _cast(name: str, array: np.ndarray, target: np.dtype) -> tuple[np.ndarray | None, str | None]:
    """``array`` as a C-ordered copy in ``target``, or why not; finiteness is checked after the cast."""
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, not warned about
        value = np.array(array, dtype=target, order="C")
    if np.isfinite(value).all():
        return value, None
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return None, f"{name}: contains NaN or inf"
    largest = float(np.abs(array.astype(np.float64)).max())
    return None, (f"{name}: largest magnitude {largest:.6g} overflows {target} (largest finite "
                  f"{float(np.finfo(target).max):.6g}); rescale it or load with a wider dtype, e.g. dtype='float64'")


def load_weights(source, spec: ResNetSpec | Plan, *, dtype="float32", layout: str = "torchvision"
                 ) -> dict[str, np.ndarray]:
    """Check ``source`` (a path or a mapping) against ``spec``; return copies in ``dtype``.

    Strict: every missing, unexpected, misshapen, non-numeric or non-finite entry, and every
    value too large for ``dtype`` (checked after the cast), is reported in one
    :class:`WeightsError`. A torchvision ``state_dict`` loads as is (its
    ``num_batches_tracked`` counters are ignored). From a file, names, shapes and dtypes are
    checked from its directory first, so a file that does not fit is rejected without its
    data being read. Nothing is returned half-loaded.

    ``layout`` names the source's naming scheme: ``"torchvision"`` (portres's own names),
    ``"timm"``, ``"keras"`` (Keras Applications; ``.h5``/``.weights.h5``/``.keras`` files need
    h5py) or ``"mlxim"`` (mlx-image), mapped by :mod:`portres.interop` with their tensor layouts
    (HWIO, OHWI, ...) converted; ``"auto"`` picks the one scheme whose names fit exactly. Problems
    are reported in the source's own names.

        >>> params = load_weights("/tmp/r18.safetensors", portres.get("resnet18"), dtype="float32")
        >>> params["fc.weight"].dtype
        dtype('float32')
        >>> params = load_weights("resnet50.weights.h5", portres.get("keras_resnet50"), layout="keras")
    """
    plan = as_plan(spec)
    target = _float_dtype(dtype)
    interop.schemes(layout)  # an unknown layout fails before any file is opened
    expected = {name: shape for name, (shape, _) in plan.param_shapes().items()}
    if isinstance(source, (str, os.PathLike)):
        origin = str(source)
        with open_weights_file(source) as entries:
            given = {name: entry for name, entry in entries.items() if not is_training_state(name)}
            given, expected, rename = _foreign_names(given, expected, plan, layout)
            described = {name: (entry.shape, entry.dtype) for name, entry in given.items()}
            problems, fitting = _fit(expected, given, described)
            shapes = {name: shape for name, (shape, _) in described.items()}
            if problems:
                raise _misfit(origin, plan, problems, shapes if layout == "torchvision" else None)
            arrays = {name: given[name].read() for name in fitting}
    elif isinstance(source, Mapping):
        origin = "the given mapping"
        given = {str(k): v for k, v in source.items() if not is_training_state(str(k))}
        given, expected, rename = _foreign_names(given, expected, plan, layout)
        arrays, unconvertible = {}, []
        for name in [name for name in expected if name in given]:
            try:
                arrays[name] = to_numpy(given[name])
            except Exception as error:  # noqa: BLE001 - any unconvertible object is a user error here
                unconvertible.append(f"{name}: cannot convert {type(given[name]).__name__} to an array ({error})")
        problems, fitting = _fit(expected, given, {name: (array.shape, array.dtype) for name, array in arrays.items()})
        problems += unconvertible
        shapes = {name: tuple(value.shape) for name, value in given.items() if hasattr(value, "shape")}
    else:
        raise WeightsError(f"weights must be a file path or a mapping of name -> array, got {type(source).__name__}")
    result = {}
    for name in fitting:
        portres_name, transform = rename[name]
        result[portres_name], problem = _cast(name, transform.to_portres(arrays[name]), target)
        if problem:
            problems.append(problem)
    if problems:
        raise _misfit(origin, plan, problems, shapes if layout == "torchvision" else None)
    return {name: result[name] for name in plan.param_shapes()}  # plan order, whatever the source's


def _foreign_names(given: dict, expected: dict, plan: Plan, layout: str) -> tuple[dict, dict, dict]:
    """``given`` under the chosen scheme's spelling, the shapes it should have under its names,
    and ``{its name: (portres name, transform)}``; the scheme is ``layout``'s, or detected."""
    if layout == "torchvision":
        return given, expected, interop.identity_map(plan)
    scheme = interop.choose(given, plan, layout)
    renamed: dict = {}
    for name, value in given.items():
        spelled = scheme.normalize(name)
        if spelled in renamed:
            raise WeightsError(f"the weights name {shortened(repr(spelled))} twice (as {shortened(repr(name))} "
                               "and another spelling)")
        renamed[spelled] = value
    try:
        rename = scheme.name_map(plan)
    except interop.NotApplicable as error:
        raise WeightsError(f"layout {layout!r} cannot name {plan.spec.name}'s weights: {error}") from None
    return renamed, {name: transform.foreign_shape(expected[portres_name])
                     for name, (portres_name, transform) in rename.items()}, rename


def _fit(expected: dict, given: Mapping, described: dict) -> tuple[list[str], list[str]]:
    """Problems found from names, shapes and dtypes alone, and the names (in plan order) that fit."""
    problems, fitting = [], []
    missing = [name for name in expected if name not in given]
    unexpected = [name for name in given if name not in expected]
    if missing:
        problems.append(f"missing ({len(missing):,}): {listed(missing)}")
    if unexpected:
        hint = ""
        if all(name.startswith("module.") for name in unexpected):
            hint = " (every unexpected key starts with 'module.': strip the DataParallel prefix)"
        problems.append(f"unexpected ({len(unexpected):,}): {listed(unexpected)}{hint}")
    for name, shape in expected.items():
        if name not in described:
            continue
        actual_shape, actual_dtype = described[name]
        if actual_dtype.kind not in NUMERIC_KINDS:
            problems.append(f"{name}: dtype {actual_dtype} is not numeric")
        elif tuple(actual_shape) != tuple(shape):
            problems.append(f"{name}: shape {shortened(str(list(actual_shape)))}, expected {list(shape)}")
        else:
            fitting.append(name)
    return problems, fitting


def _misfit(origin: str, plan: Plan, problems: list[str], shapes: Mapping[str, tuple] | None = None) -> WeightsError:
    hint = _looks_like(shapes, plan) if shapes else ""
    return WeightsError(f"weights from {origin} do not fit {plan.spec.name}:\n  "
                        + "\n  ".join(capped(problems, "more problems")) + hint)


def _looks_like(shapes: Mapping[str, tuple], plan: Plan) -> str:
    """A hint naming the zoo preset the weights were made for, when that is not the one asked for."""
    given = {(name, tuple(shape)) for name, shape in shapes.items() if not is_training_state(name)}
    if given == {(name, tuple(shape)) for name, (shape, _) in plan.param_shapes().items()}:
        return ""  # names and shapes fit: the problem is elsewhere (a dtype, a value)
    best, matched, total = nearest_presets(shapes)
    if plan.spec.name in best or matched < 0.5 * max(len(given), total):
        return ""
    names = listed(best, " or ")
    if matched == len(given) == total:
        return f"\n  looks like {names} (every name and shape matches); load it with that preset"
    return f"\n  closest preset: {names} ({matched} of its {total} tensors match by name and shape)"


# Re-exported from tensorfiles for callers that know them here (training/, the CLI, tests).
__all__ = ["TRAINING_STATE", "WeightsError", "capped", "describe_weights_file", "init_params", "is_training_state",
           "listed", "load_weights", "nearest_presets", "open_weights_file", "read_metadata", "read_weights_file",
           "save_weights"]
