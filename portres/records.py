"""Records as strict JSON (RFC 8259): what reports, results files and ``--json`` lines write."""

from __future__ import annotations

import json
import math


def finite_or_null(value):
    """``value`` with every NaN and infinity (in nested dicts, lists, tuples) replaced by None.

        >>> finite_or_null({"loss": float("nan"), "errors": [0.5, float("inf")]})
        {'loss': None, 'errors': [0.5, None]}
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def strict_json(value, **dumps_options) -> str:
    """``json.dumps`` that never writes ``NaN``/``Infinity`` (they become null)."""
    return json.dumps(finite_or_null(value), allow_nan=False, **dumps_options)
