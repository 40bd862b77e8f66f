"""The training state as a type: trainable parameters, BN buffers and optimiser slots, held apart.

As in equinox, the state is data beside the model, never inside it: a train step maps one
``TrainState`` to the next and keeps nothing else. Each field is a dict ``name -> array`` of one
backend (or of NumPy, between the device and a checkpoint): ``params`` the trainable parameters,
``buffers`` the BN running statistics, ``slots`` the optimiser's per-parameter arrays
(``"<slot>.<parameter>"``, torch's slot names: see ``portres.training.optim``).

    >>> state = TrainState(params={"fc.weight": w}, buffers={}, slots={"momentum_buffer.fc.weight": w * 0})
    >>> state.to_numpy(backend).params["fc.weight"].shape

A checkpoint stores the three in one file (``portres.training.checkpoint``: the slots under the
``optimizer/`` prefix); a backend's compiled step carries them as one flat dict (:meth:`arrays`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

FIELDS = ("params", "buffers", "slots")


@dataclass(frozen=True, eq=False)
class TrainState:
    """One replica's training state: ``params`` (trained), ``buffers`` (BN running statistics), ``slots``
    (the optimiser's), each ``{name: array}``."""

    params: dict
    buffers: dict
    slots: dict
    # the flat dict this state was made from or last handed out (see ``arrays``)
    _arrays: dict | None = dataclasses.field(default=None, repr=False)

    @property
    def model(self) -> dict:
        """The parameters and BN buffers: what evaluating the network needs (a weights file's tensors)."""
        return {**self.params, **self.buffers}

    def arrays(self) -> dict:
        """Every array in one flat dict keyed ``(field, name)``: what a backend's compiled step carries.

        The same dict each time for one state, and a state made by :meth:`from_arrays` hands back the dict
        it was made from: tinygrad's JIT updates the dict it captured in place and needs it back each step.

            >>> TrainState({"w": 1}, {}, {}).arrays()
            {('params', 'w'): 1}
        """
        if self._arrays is None:
            flat = {(kind, name): value for kind in FIELDS for name, value in getattr(self, kind).items()}
            object.__setattr__(self, "_arrays", flat)
        return self._arrays

    @classmethod
    def from_arrays(cls, arrays: dict) -> TrainState:
        """The state :meth:`arrays` flattened (the dict is kept, not copied)."""
        fields = {kind: {} for kind in FIELDS}
        for (kind, name), value in arrays.items():
            fields[kind][name] = value
        return cls(**fields, _arrays=arrays)

    def to_numpy(self, lowering) -> TrainState:
        """This state as NumPy arrays (parameters in portres's layout: OIHW convs)."""
        return TrainState(**{kind: {name: lowering.to_numpy(value) for name, value in getattr(self, kind).items()}
                             for kind in FIELDS})

