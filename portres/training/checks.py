"""Argument checks shared by the optimisers and the schedules: one line naming the argument.

    >>> require(0.1 > 0, "lr", 0.1, "must be > 0")            # passes silently
    >>> require(-1 > 0, "lr", -1, "must be > 0")
    Traceback (most recent call last):
    ValueError: lr=-1: must be > 0
"""

from __future__ import annotations


def require(condition: bool, argument: str, value, requirement: str) -> None:
    """Raise ``ValueError("argument=value: requirement")`` unless ``condition`` holds."""
    if not condition:
        raise ValueError(f"{argument}={value!r}: {requirement}")
