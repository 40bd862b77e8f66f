"""Learning-rate schedules: plain functions of the step.

A schedule is a callable ``schedule(t) -> float`` giving the learning rate of the update that follows ``t``
completed updates (``t = 0`` for the first update, so the optimiser's 1-based ``step`` is ``t + 1``). This is
torch's convention: ``schedule(t)`` is the lr after ``t`` calls of ``scheduler.step()``. Schedules are
frozen dataclasses, so they compare by value and print readably::

    >>> warmup(cosine(0.1, total_steps=1000), warmup_steps=50)
    Warmup(schedule=Cosine(lr=0.1, total_steps=1000, final_lr=0.0), warmup_steps=50, start_factor=0.1)
"""

from __future__ import annotations

import bisect
import math
import operator
from dataclasses import dataclass

from .checks import require

SCHEDULES = ("constant", "multistep", "cosine")  # names accepted by make_schedule (the CLI's --schedule)


def _step(t) -> int:
    t = operator.index(t)  # an int or NumPy integer; a float step is a caller's bug
    require(t >= 0, "step", t, "must be >= 0 (the number of updates already done)")
    return t


@dataclass(frozen=True)
class Constant:
    lr: float  # the learning rate at every step

    def __post_init__(self):
        require(self.lr >= 0, "lr", self.lr, "must be >= 0")

    def __call__(self, t: int) -> float:
        _step(t)
        return float(self.lr)


@dataclass(frozen=True)
class MultiStep:
    lr: float  # the learning rate before the first milestone
    milestones: tuple[int, ...]  # steps at which the rate is multiplied by gamma, strictly increasing
    gamma: float = 0.1  # factor applied at each milestone (the ResNet paper's /10)

    def __post_init__(self):
        require(self.lr >= 0, "lr", self.lr, "must be >= 0")
        object.__setattr__(self, "milestones", tuple(self.milestones))
        ms = self.milestones
        require(all(isinstance(m, int) and m > 0 for m in ms), "milestones", ms, "must be positive integers")
        require(all(a < b for a, b in zip(ms, ms[1:])), "milestones", ms, "must be strictly increasing")
        require(self.gamma > 0, "gamma", self.gamma, "must be > 0")

    def __call__(self, t: int) -> float:
        return self.lr * self.gamma ** bisect.bisect_right(self.milestones, _step(t))


@dataclass(frozen=True)
class Cosine:
    lr: float  # the learning rate at step 0
    total_steps: int  # steps from lr down to final_lr; later steps stay at final_lr
    final_lr: float = 0.0  # the learning rate reached at total_steps

    def __post_init__(self):
        require(self.lr >= 0, "lr", self.lr, "must be >= 0")
        require(isinstance(self.total_steps, int) and self.total_steps >= 1, "total_steps", self.total_steps,
               "must be an integer >= 1")
        require(0 <= self.final_lr <= self.lr, "final_lr", self.final_lr, f"must be in [0, lr={self.lr}]")

    def __call__(self, t: int) -> float:
        progress = min(_step(t), self.total_steps) / self.total_steps
        return self.final_lr + (self.lr - self.final_lr) * (1 + math.cos(math.pi * progress)) / 2


@dataclass(frozen=True)
class Warmup:
    schedule: object  # the schedule that follows the warm-up, started from its own step 0
    warmup_steps: int  # length of the linear ramp
    start_factor: float = 0.1  # the ramp starts at start_factor * schedule(0)

    def __post_init__(self):
        require(callable(self.schedule), "schedule", self.schedule, "must be a schedule (a callable of the step)")
        require(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "warmup_steps", self.warmup_steps,
               "must be an integer >= 0")
        require(0 < self.start_factor <= 1, "start_factor", self.start_factor, "must be in (0, 1]")

    def __call__(self, t: int) -> float:
        t = _step(t)
        if t >= self.warmup_steps:
            return self.schedule(t - self.warmup_steps)
        ramp = self.start_factor + (1 - self.start_factor) * t / self.warmup_steps
        return self.schedule(0) * ramp


def constant(lr: float) -> Constant:
    """The same rate at every step. Example: ``constant(0.1)(500)`` -> 0.1."""
    return Constant(lr)


def multistep(lr: float, milestones, gamma: float = 0.1) -> MultiStep:
    """``lr * gamma ** (milestones passed)``, torch's MultiStepLR; the ResNet paper's CIFAR recipe is
    ``multistep(0.1, [32000, 48000])``. Example: ``multistep(0.1, [10, 20])(10)`` -> 0.01."""
    return MultiStep(lr, milestones, gamma)


def cosine(lr: float, total_steps: int, final_lr: float = 0.0) -> Cosine:
    """Half a cosine from ``lr`` at step 0 to ``final_lr`` at ``total_steps``, then flat (torch's
    CosineAnnealingLR with ``T_max=total_steps, eta_min=final_lr`` up to ``total_steps``; torch would
    rise again after it). Example: ``cosine(0.1, 100)(50)`` -> 0.05."""
    return Cosine(lr, total_steps, final_lr)


def warmup(schedule, warmup_steps: int, start_factor: float = 0.1) -> Warmup:
    """A linear ramp in front of ``schedule``: ``schedule(0) * (start_factor + (1 - start_factor) *
    t / warmup_steps)`` for ``t < warmup_steps``, then ``schedule(t - warmup_steps)``. The wrapped schedule
    starts after the ramp, exactly as torch's ``SequentialLR([LinearLR(start_factor, total_iters=
    warmup_steps), schedule], milestones=[warmup_steps])``. Example: ``warmup(constant(1.0), 4)(2)`` -> 0.55.
    """
    return Warmup(schedule, warmup_steps, start_factor)


def make_schedule(name: str, lr: float, total_steps: int, milestones=None, warmup_steps: int = 0,
                  gamma: float = 0.1, final_lr: float = 0.0, start_factor: float = 0.1):
    """The CLI's schedule (``--schedule constant|multistep|cosine``) for a run of ``total_steps`` updates.

    ``milestones`` count from the start of the run (warm-up included) and default to 50% and 75% of it
    (the ResNet paper's 32k/48k of 64k); with a warm-up the wrapped schedule covers the remaining steps.
    Example: ``make_schedule("cosine", 0.1, 1000, warmup_steps=50)``.
    """
    require(name in SCHEDULES, "schedule", name, f"must be one of {', '.join(SCHEDULES)}")
    require(isinstance(total_steps, int) and total_steps >= 1, "total_steps", total_steps, "must be an integer >= 1")
    require(isinstance(warmup_steps, int) and 0 <= warmup_steps < total_steps, "warmup_steps", warmup_steps,
           f"must be an integer in [0, total_steps={total_steps})")
    require(milestones is None or name == "multistep", "milestones", milestones, "only apply to multistep")
    if name == "constant":
        main = constant(lr)
    elif name == "multistep":
        if milestones is None:
            milestones = sorted({m for m in (total_steps // 2, total_steps * 3 // 4) if m > 0})
        require(all(m > warmup_steps for m in milestones), "milestones", milestones,
               f"must come after warmup_steps={warmup_steps}")
        main = multistep(lr, [m - warmup_steps for m in milestones], gamma)
    else:
        main = cosine(lr, total_steps - warmup_steps, final_lr)
    return warmup(main, warmup_steps, start_factor) if warmup_steps else main
