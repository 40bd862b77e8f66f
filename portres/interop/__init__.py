"""Weights in and out of other ecosystems: PyTorch checkpoints read and written without torch,
foreign naming schemes (timm, Keras, mlx-image) mapped onto portres's, and ONNX export. Each
conversion is proved numerically by the parity suite, like everything else here.

* :mod:`portres.interop.pth`: ``read_pth``, ``inspect_pth`` and ``write_pth`` for ``torch.save``
  checkpoints (``.pth``/``.pt``/``.bin``), read by an unpickler that runs nothing from the file;
  ``load_weights`` and ``save_weights`` use it for those suffixes.
* :mod:`portres.interop.convert`: ``convert_weights`` from one file format to another, checked
  against a network on the way (``portres convert``).
* Naming schemes (layouts): :mod:`~portres.interop.timm`, :mod:`~portres.interop.keras` and
  :mod:`~portres.interop.mlxim` each hold one pure function of a plan, ``name_map(plan) ->
  {foreign name: (portres name, Transform)}``; ``load_weights(source, spec, layout=...)`` reads
  through them, :func:`export_weights` writes through their inverses, and :func:`detect` picks the
  scheme a set of names was written in (``layout="auto"``)::

      >>> spec = portres.get("resnetv2_50")
      >>> timm_names = export_weights(portres.init_params(spec), spec, "timm")
      >>> "stages.0.blocks.0.norm1.weight" in timm_names
      True
      >>> detect(timm_names, spec).layout
      'timm'
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import numpy as np

from ..plan import Plan, as_plan
from ..tensorfiles import WeightsError
from .pth import CheckpointInfo, inspect_pth, read_pth, write_pth

LAYOUTS = ("torchvision", "timm", "keras", "mlxim")  # the naming schemes load_weights reads, besides "auto"


class NotApplicable(ValueError):
    """A naming scheme that has no name for some parameter of a plan (e.g. Keras for a deep stem)."""


@dataclass(frozen=True)
class Transform:
    """How a foreign tensor becomes portres's: an axis permutation, then dropping trailing unit axes.

        >>> HWIO.foreign_shape((64, 3, 7, 7))
        (7, 7, 3, 64)
    """

    name: str  # for messages, e.g. "HWIO->OIHW"
    permutation: tuple[int, ...] | None = None  # np.transpose axes taking the foreign array to portres's order
    unit_axes: int = 0  # trailing size-1 axes the foreign tensor has and portres's lacks (a 1x1 conv as a linear)

    def to_portres(self, array: np.ndarray) -> np.ndarray:
        if self.permutation is not None:
            array = array.transpose(self.permutation)
        if self.unit_axes:
            array = array.reshape(array.shape[:-self.unit_axes])
        return array

    def from_portres(self, array: np.ndarray) -> np.ndarray:
        array = array.reshape(array.shape + (1,) * self.unit_axes)
        if self.permutation is not None:
            array = array.transpose(np.argsort(self.permutation))
        return array

    def foreign_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape the foreign tensor has for a portres tensor of ``shape``."""
        shape = tuple(shape) + (1,) * self.unit_axes
        if self.permutation is None:
            return shape
        return tuple(shape[int(axis)] for axis in np.argsort(self.permutation))


IDENTITY = Transform("identity")
HWIO = Transform("HWIO->OIHW", (3, 2, 0, 1))  # Keras conv kernels: (height, width, in, out)
OHWI = Transform("OHWI->OIHW", (0, 3, 1, 2))  # MLX conv weights: (out, height, width, in)
IN_OUT = Transform("(in, out)->(out, in)", (1, 0))  # Keras Dense kernels
CONV_1X1 = Transform("(out, in, 1, 1)->(out, in)", unit_axes=2)  # timm's classifier head is a 1x1 conv

NameMap = dict[str, tuple[str, Transform]]  # foreign name -> (portres name, transform)


def _same(name: str) -> str:
    return name


@dataclass(frozen=True)
class Scheme:
    """One way of naming a network's tensors: a layout and, where it has several, a dialect."""

    layout: str  # one of LAYOUTS
    dialect: str  # "" for the layout's usual names; e.g. "weights.h5" for Keras 3's positional file paths
    module: str  # the interop module whose function builds the map
    function: str = "name_map"  # that function: plan -> NameMap (raises NotApplicable)
    normalize: Callable[[str], str] = _same  # a given name's canonical spelling (Keras 2's "kernel:0")

    @property
    def label(self) -> str:
        return f"{self.layout} ({self.dialect})" if self.dialect else self.layout

    def name_map(self, plan: Plan) -> NameMap:
        """``{foreign name: (portres name, transform)}`` for every parameter and buffer of ``plan``."""
        return _name_map(self, as_plan(plan))


def _strip_variable_suffix(name: str) -> str:
    return name[:-2] if name.endswith(":0") else name  # TF/Keras 2 variables are "layer/kernel:0"


SCHEMES = (
    Scheme("torchvision", "", __name__, "identity_map"),
    Scheme("timm", "", f"{__name__}.timm"),
    Scheme("keras", "", f"{__name__}.keras", normalize=_strip_variable_suffix),
    Scheme("keras", "weights.h5", f"{__name__}.keras", "positional_name_map"),
    Scheme("mlxim", "", f"{__name__}.mlxim"),
)


@functools.lru_cache(maxsize=64)
def _name_map(scheme: Scheme, plan: Plan) -> NameMap:
    module = importlib.import_module(scheme.module)
    return getattr(module, scheme.function)(plan)


def identity_map(plan: Plan) -> NameMap:
    """torchvision's names are portres's own (see :mod:`portres.weights`)."""
    return {name: (name, IDENTITY) for name in plan.param_shapes()}


def schemes(layout: str) -> tuple[Scheme, ...]:
    """The schemes ``load_weights(..., layout=layout)`` may read (every one for ``"auto"``)."""
    if layout == "auto":
        return SCHEMES
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {', '.join(map(repr, (*LAYOUTS, 'auto')))}")
    return tuple(scheme for scheme in SCHEMES if scheme.layout == layout)


@dataclass(frozen=True)
class Match:
    """How a set of given names fits one scheme's names for a plan."""

    scheme: Scheme  # the scheme tried
    name_map: NameMap | None  # its map, or None where it has no name for some parameter
    matched: int  # given names the scheme has
    unmatched: tuple[str, ...]  # given names it does not have
    missing: tuple[str, ...]  # its names that were not given
    why_not: str = ""  # why it does not apply to the plan, when name_map is None

    @property
    def complete(self) -> bool:
        return self.name_map is not None and not self.unmatched and not self.missing

    def describe(self, examples: int = 3) -> str:
        if self.name_map is None:
            return f"{self.scheme.label}: not applicable ({self.why_not})"
        text = f"{self.scheme.label}: {self.matched} of {self.matched + len(self.unmatched)} given names match"
        if self.unmatched:
            text += f"; not its names: {_examples(self.unmatched, examples)}"
        if self.missing:
            text += f"; {len(self.missing)} of its names missing, e.g. {_examples(self.missing, examples)}"
        return text


def _examples(names: Collection[str], count: int) -> str:
    names = list(names)
    shown = ", ".join(names[:count])
    return shown + (f" (+{len(names) - count} more)" if len(names) > count else "")


def match(scheme: Scheme, names: Collection[str], plan) -> Match:
    """How ``names`` (as given, before normalising) fit ``scheme``'s names for ``plan``."""
    plan = as_plan(plan)
    try:
        name_map = scheme.name_map(plan)
    except NotApplicable as error:
        return Match(scheme, None, 0, tuple(names), (), str(error))
    normalized = [scheme.normalize(name) for name in names]
    given = set(normalized)
    return Match(scheme, name_map, sum(name in name_map for name in given),
                 tuple(name for name in normalized if name not in name_map),
                 tuple(name for name in name_map if name not in given))


def detect(names: Collection[str], spec, layout: str = "auto") -> Scheme:
    """The one scheme of ``layout`` (all of them for ``"auto"``) whose names for ``spec`` are exactly ``names``.

    Where no scheme has every name, or several different ones do, a ``WeightsError`` lists
    for each scheme how many names matched and examples of those that did not. Schemes that
    map every name to the same parameter by the same transform (timm's ResNets use
    torchvision's names) are one answer, not an ambiguity.

        >>> detect(["conv1_conv/kernel", ...], portres.get("keras_resnet50")).layout
        'keras'
    """
    plan = as_plan(spec)
    names = list(names)
    candidates = schemes(layout)
    matches = [match(scheme, names, plan) for scheme in candidates]
    complete = [m for m in matches if m.complete]
    distinct = {tuple(sorted(m.name_map.items(), key=lambda item: item[0])): m for m in complete}
    if len(distinct) == 1:
        return complete[0].scheme
    report = "\n  ".join(m.describe() for m in matches)
    what = f"layout {layout!r}" if layout != "auto" else "any known naming scheme"
    if not complete:
        raise WeightsError(f"the weights' {len(names)} names do not all fit {what} for {plan.spec.name}; "
                           f"per scheme:\n  {report}\n  (names from several schemes mixed in one source cannot "
                           "be loaded: convert each part to one scheme first)")
    labels = ", ".join(m.scheme.label for m in complete)
    raise WeightsError(f"the weights' names fit several naming schemes for {plan.spec.name} ({labels}), which "
                       f"read them differently; pass layout= to choose one:\n  {report}")


def choose(names: Collection[str], spec, layout: str) -> Scheme:
    """The scheme to read ``names`` with: :func:`detect`'s for ``"auto"``; else the dialect of
    ``layout`` that has the most of them (the strict load then reports any misfit in its names)."""
    if layout == "auto":
        return detect(names, spec)
    plan = as_plan(spec)
    return max((match(scheme, names, plan) for scheme in schemes(layout)), key=lambda m: m.matched).scheme


def export_weights(params: Mapping[str, np.ndarray], spec, layout: str, dialect: str = "") -> dict[str, np.ndarray]:
    """``params`` (portres names and layouts) under ``layout``'s names and layouts: the inverse of loading.

        >>> keras_named = export_weights(params, portres.get("keras_resnet50"), "keras")
        >>> keras_named["conv1_conv/kernel"].shape
        (7, 7, 3, 64)
    """
    plan = as_plan(spec)
    chosen = [scheme for scheme in schemes(layout) if scheme.dialect == dialect]
    if layout == "auto" or not chosen:
        known = ", ".join(repr(s.dialect) for s in schemes(layout)) if layout != "auto" else "none"
        raise ValueError(f"export_weights needs a layout of {', '.join(map(repr, LAYOUTS))} and one of its "
                         f"dialects ({known}), got layout={layout!r}, dialect={dialect!r}")
    name_map = chosen[0].name_map(plan)
    return {foreign: np.ascontiguousarray(transform.from_portres(np.asarray(params[name])))
            for foreign, (name, transform) in name_map.items()}


__all__ = ["CONV_1X1", "HWIO", "IDENTITY", "IN_OUT", "LAYOUTS", "OHWI", "CheckpointInfo", "Match", "NotApplicable",
           "Scheme", "Transform", "choose", "detect", "export_weights", "inspect_pth", "match", "read_pth", "schemes",
           "write_pth"]
