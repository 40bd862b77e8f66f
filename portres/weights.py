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
import dataclasses
import json
import math
import os
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import interop
from .analysis import nearest_presets
from .interop import keras, pth
from .plan import INPUT, Plan, as_plan
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


def load_weights(source, spec: ResNetSpec | Plan, *, dtype="float32", layout: str = "torchvision",
                 strict: bool = True, seed: int = 0):
    """Check ``source`` (a path or a mapping) against ``spec``; return copies in ``dtype``.

    ``strict=False`` (transfer learning) returns ``(params, report)`` instead: see
    :func:`load_weights_leniently`, which it calls with ``seed``.

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
    if not strict:
        return load_weights_leniently(source, spec, dtype=dtype, layout=layout, seed=seed)
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


# -- lenient loading (transfer learning) -------------------------------------------------------


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_weights_leniently` did with each tensor (portres names; ``skipped``: the source's).

        >>> params, report = load_weights("r18.safetensors", five_class_spec, strict=False)
        >>> report.reinitialised
        {'fc.weight': 'the file has 1000 classes, this network 5', 'fc.bias': '...'}
        >>> report.summary()
        'loaded 100 of 102 tensors from r18.safetensors; re-initialised fc.weight, fc.bias (the file has ...)'
    """

    source: str  # the file (or "the given mapping")
    loaded: tuple[str, ...] = ()  # taken from the source as they are
    adapted: dict[str, str] = field(default_factory=dict)  # name -> how (the input conv: another channel count)
    reinitialised: dict[str, str] = field(default_factory=dict)  # name -> why (the classifier: another class count)
    skipped: dict[str, str] = field(default_factory=dict)  # the source's name -> why it was not used

    @property
    def total(self) -> int:
        """The network's tensors (each loaded, adapted or re-initialised)."""
        return len(self.loaded) + len(self.adapted) + len(self.reinitialised)

    def summary(self) -> str:
        """One line: how many tensors were loaded, and each group adapted, re-initialised or skipped, with why."""
        parts = [f"loaded {len(self.loaded)} of {self.total} tensors from {self.source}"]
        for verb, entries in (("adapted", self.adapted), ("re-initialised", self.reinitialised),
                              ("skipped", self.skipped)):
            by_reason: dict[str, list[str]] = {}
            for name, reason in entries.items():
                by_reason.setdefault(reason, []).append(name)
            parts += [f"{verb} {listed(names)} ({reason})" for reason, names in by_reason.items()]
        return "; ".join(parts)


def classifier_names(plan: Plan) -> list[str]:
    """The parameters of the classifier (the linear layers after the last stage): what a new class count
    re-initialises and what ``--lr-backbone`` leaves at the full learning rate.

        >>> classifier_names(make_plan("resnet18"))
        ['fc.weight', 'fc.bias']
    """
    return [name for op in as_plan(plan).ops if op.kind == "linear" for name in op.param_shapes()]


def input_conv_names(plan: Plan) -> list[str]:
    """The weights of the convolutions that read the image: adapted when the input channel count differs.

        >>> input_conv_names(make_plan("resnet50d"))
        ['conv1.0.weight']
    """
    return [f"{op.name}.weight" for op in as_plan(plan).ops if op.kind == "conv2d" and INPUT in op.inputs]


def adapt_input_conv(weight: np.ndarray, in_channels: int) -> np.ndarray:
    """A first conv's ``weight`` (O, I, kH, kW) made for ``in_channels`` input channels, as timm's
    ``adapt_input_conv`` does: to 1 channel the RGB weights are summed (space-to-depth stems: each RGB
    triple: a grey image then gives the response its RGB copy gave); to any other count they are repeated
    ``ceil(C / 3)`` times, cut to C and scaled by ``3 / C``, which keeps the response's scale. Computed in
    float64, returned in the weight's dtype.

        >>> adapt_input_conv(np.ones((8, 3, 3, 3), np.float32), 1)[0, 0, 0, 0]
        3.0
        >>> adapt_input_conv(np.ones((8, 3, 3, 3)), 4).shape
        (8, 4, 3, 3)
    """
    weight = np.asarray(weight)
    out, given, height, width = weight.shape
    wide = weight.astype(np.float64)
    if in_channels == 1 and given > 3 and given % 3 == 0:
        adapted = wide.reshape(out, given // 3, 3, height, width).sum(axis=2)
    elif in_channels == 1 and given == 3:
        adapted = wide.sum(axis=1, keepdims=True)
    elif given == 3:
        adapted = np.tile(wide, (1, math.ceil(in_channels / 3), 1, 1))[:, :in_channels] * (3 / in_channels)
    else:
        raise WeightsError(f"an input conv of {given} channels cannot be adapted to {in_channels}: only RGB weights "
                           "(3 input channels) are")
    return adapted.astype(weight.dtype if weight.dtype.kind == "f" else np.float64)


def load_weights_leniently(source, spec: ResNetSpec | Plan, *, dtype="float32", layout: str = "auto",
                           seed: int = 0) -> tuple[dict[str, np.ndarray], LoadReport]:
    """``(params, report)``: every tensor of ``source`` whose name and shape fit ``spec``, the rest made as
    :func:`init_params` makes them (``seed``). What ``load_weights(..., strict=False)`` and
    ``portres train --init`` do.

    Only the ends of the network may differ from the source's: the classifier is re-initialised when its
    class count differs (or the source has none: a headless file); the input conv is adapted as timm does
    (:func:`adapt_input_conv`) when the input channel count differs; a headless ``spec`` skips the
    source's classifier. Anything else - a backbone tensor missing, of another shape or extra - means the
    file is another network's, and is refused in one line (naming the preset it looks like).

        >>> params, report = load_weights_leniently("runs/a/best.safetensors", portres.resnet(20, num_classes=5))
        >>> report.summary()
        'loaded 64 of 66 tensors from runs/a/best.safetensors; re-initialised fc.weight, fc.bias (...)'
    """
    plan = as_plan(spec)
    target = _float_dtype(dtype)
    interop.schemes(layout)
    with contextlib.ExitStack() as stack:
        if isinstance(source, (str, os.PathLike)):
            origin = str(source)
            entries = stack.enter_context(open_weights_file(source))
            given = {name: entry for name, entry in entries.items() if not is_training_state(name)}
            described = {name: (tuple(entry.shape), np.dtype(entry.dtype)) for name, entry in given.items()}
            read = lambda name: given[name].read()  # noqa: E731
        elif isinstance(source, Mapping):
            origin = "the given mapping"
            try:
                given = {str(k): to_numpy(v) for k, v in source.items() if not is_training_state(str(k))}
            except Exception as error:  # noqa: BLE001 - any unconvertible object is a user error here
                raise WeightsError(f"weights from {origin}: a value is not an array ({error})") from None
            described = {name: (array.shape, array.dtype) for name, array in given.items()}
            read = lambda name: given[name]  # noqa: E731
        else:
            raise WeightsError(f"weights must be a file path or a mapping of name -> array, got "
                               f"{type(source).__name__}")
        params, report = _fit_leniently(origin, plan, described, read, layout, target, seed)
    return params, report


def _fit_leniently(origin: str, plan: Plan, described: dict, read, layout: str, target: np.dtype, seed: int
                   ) -> tuple[dict[str, np.ndarray], LoadReport]:
    """Decide each tensor's fate from the names and shapes alone (a file that does not fit is refused unread),
    then read what is used."""
    spelled, rename = _lenient_names(described, plan, layout)  # source name -> spelled; spelled -> (name, transform)
    by_name = {name: (foreign, transform) for foreign, (name, transform) in rename.items()}
    source_of = {foreign: original for original, foreign in spelled.items()}
    classifier, input_convs = set(classifier_names(plan)), set(input_conv_names(plan))
    taken, loaded, adapted, reinitialised, skipped, problems, missing, extra = {}, [], {}, {}, {}, [], [], []
    for name, (shape, _) in plan.param_shapes().items():
        foreign, transform = by_name[name]
        original = source_of.get(foreign)
        if original is None:
            if name in classifier:
                reinitialised[name] = "the file has no classifier"
            else:
                missing.append(name)
            continue
        given_shape, given_dtype = tuple(described[original][0]), described[original][1]
        if given_dtype.kind not in NUMERIC_KINDS:
            problems.append(f"{original}: dtype {given_dtype} is not numeric")
        elif given_shape == tuple(transform.foreign_shape(shape)):
            taken[name] = original
            loaded.append(name)
        elif name in input_convs and (channels := _input_channels(transform, shape, given_shape)) is not None:
            if channels == 3 or (shape[1] == 1 and channels % 3 == 0):
                taken[name] = original
                adapted[name] = f"the file has {channels} input channels, this network {shape[1]}"
            else:
                problems.append(f"{original}: {channels} input channels cannot be adapted to {shape[1]} (only RGB "
                                "weights can)")
        elif name in classifier:
            reinitialised[name] = _class_count_change(plan, described, by_name, source_of)
        else:
            problems.append(f"{original}: shape {shortened(str(list(given_shape)))}, expected "
                            f"{list(transform.foreign_shape(shape))}")
    head = _source_classifier(plan, layout, spelled)
    for original, foreign in spelled.items():
        if foreign not in rename:
            if original in head:
                skipped[original] = "this network has no classifier"
            else:
                extra.append(original)
    for names, what in ((missing, "missing from the file"), (extra, f"not in {plan.spec.name}")):
        if names:
            problems.insert(0, f"{len(names):,} tensors {what} ({', '.join(capped(names, limit=3))})")
    if not problems:
        fresh = init_params(plan, seed) if reinitialised else {}
        result = {name: fresh[name].astype(target) for name in reinitialised}  # seeded init: finite, small
        for name, original in taken.items():
            value = by_name[name][1].to_portres(read(original))
            if name in adapted:
                value = adapt_input_conv(value, plan.param_shapes()[name][0][1])
            result[name], problem = _cast(original, value, target)
            if problem:
                problems.append(problem)
    if problems:
        shapes = {name: shape for name, (shape, _) in described.items()}
        hint = _looks_like(shapes, plan).strip().replace("\n", " ") if layout in ("torchvision", "auto") else ""
        shown = "; ".join(capped(problems, "more", limit=4))
        raise WeightsError(f"weights from {origin} do not fit {plan.spec.name}, even leniently (only the classifier "
                           f"and the input conv may differ): {shown}{'; ' + hint if hint else ''}")
    report = LoadReport(origin, tuple(loaded), adapted, reinitialised, skipped)
    return {name: result[name] for name in plan.param_shapes()}, report


def _input_channels(transform, shape: tuple, given_shape: tuple) -> int | None:
    """The input channels of a source conv weight of ``given_shape`` that differs from ``shape`` (portres
    layout) in them alone, or None."""
    for channels in set(given_shape):
        if tuple(transform.foreign_shape((shape[0], channels, *shape[2:]))) == given_shape:
            return channels
    return None


def _lenient_names(described: dict, plan: Plan, layout: str) -> tuple[dict[str, str], dict]:
    """``({source name: its spelling under the scheme}, {spelling: (portres name, transform)})``. The scheme is
    ``layout``'s or, for ``"auto"``, the one with the most of the source's names (a head of another class
    count, or none, must not stop a scheme from being recognised, as it stops :func:`interop.detect`)."""
    if layout == "torchvision":
        return {name: name for name in described}, interop.identity_map(plan)
    candidates = [interop.match(scheme, list(described), plan) for scheme in interop.schemes(layout)]
    applicable = [candidate for candidate in candidates if candidate.name_map is not None]
    if not applicable:
        raise WeightsError(f"no naming scheme of layout {layout!r} can name {plan.spec.name}'s weights: "
                           + "; ".join(candidate.describe() for candidate in candidates))
    scheme = max(applicable, key=lambda candidate: candidate.matched).scheme  # the first of a tie: torchvision's
    spelled = {name: scheme.normalize(name) for name in described}
    return spelled, scheme.name_map(plan)


def _class_count_change(plan: Plan, described: dict, by_name: dict, source_of: dict) -> str:
    """Why the classifier is re-initialised: the class counts of the file and of ``plan``."""
    linear = next(op for op in reversed(plan.ops) if op.kind == "linear")
    bias = source_of.get(by_name[f"{linear.name}.bias"][0])
    shape = described[bias][0] if bias is not None else ()
    theirs = f"{shape[0]} classes" if len(shape) == 1 else "another classifier"
    return f"the file has {theirs}, this network {linear.layer.out_features}"


def _source_classifier(plan: Plan, layout: str, spelled: dict[str, str]) -> set[str]:
    """The source's names of a classifier, for a headless ``plan`` (which has none): those the same network
    with one class has, under the scheme the source's names fit."""
    if plan.spec.num_classes:
        return set()
    headed = as_plan(dataclasses.replace(plan.spec, num_classes=1))
    spelling, rename = _lenient_names(dict.fromkeys(spelled), headed, layout)
    head = {foreign for foreign, (name, _) in rename.items() if name in classifier_names(headed)}
    return {original for original, foreign in spelling.items() if foreign in head}

# Re-exported from tensorfiles for callers that know them here (training/, the CLI, tests).
__all__ = ["TRAINING_STATE", "LoadReport", "WeightsError", "adapt_input_conv", "capped", "classifier_names",
           "describe_weights_file", "init_params", "input_conv_names", "is_training_state", "listed", "load_weights",
           "load_weights_leniently", "nearest_presets", "open_weights_file", "read_metadata", "read_weights_file",
           "save_weights"]
