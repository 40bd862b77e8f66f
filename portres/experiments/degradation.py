"""The degradation experiment (He et al. 2015, section 4.2 and Figure 6): plain networks train
worse as they get deeper, residual networks of the same depths do not.

Every network trains with one recipe, one seed and one data order (``portres.training.loop.train``,
so each run in ``OUT/<net>/`` has its metrics, checkpoints and ``--resume``); then ``OUT/results.json``,
``OUT/report.md`` (a table of depth, family, final training error, test error and parameters, with the
paper's CIFAR-10 test errors beside them when the data is CIFAR-10) and ``OUT/degradation.png``
(training error against epoch: plain dashed, residual solid) are written.

    >>> results = run_degradation(DegradationConfig(out="runs/degradation"))   # digits, MLX: minutes
    >>> results["effect"]["plain"]["shown"], results["effect"]["residual"]["shown"]
    (True, True)
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from .. import data as datasets
from ..analysis import summary as count
from ..plan import make_plan
from ..records import strict_json
from ..spec import ResNetSpec
from ..training.loop import Progress, TrainConfig, TrainingError, network_for, train
from ..zoo import resolve
from .gradflow import family_of

DEFAULT_NETS = ("plain20", "plain56", "resnet20", "resnet56")
# The digits budget: SGD lr 0.1, momentum 0.9, weight decay 1e-4, cosine, batch 64, 20 epochs (16 min on
# 2 CPU cores with MLX). Without warm-up resnet56 blew up in its first epoch (loss 5.6) and ended at 3.8%
# training error against resnet20's 0%; the paper warms its deepest CIFAR net up at lr/10 for the same
# reason. Measurements in docs/experiments.md.
DIGITS_RECIPE = {"epochs": 20, "batch_size": 64, "lr": 0.1, "weight_decay": 1e-4, "schedule": "cosine",
                 "warmup_fraction": 0.1}  # warm-up: the first tenth of the epochs (2 of 20)
# He et al. 2015, Table 6: CIFAR-10 test error (%) of the CIFAR ResNets (110: best of 5 runs; mean 6.61 +- 0.16).
PAPER_TEST_ERROR = {"resnet20": 8.75, "resnet32": 7.51, "resnet44": 7.17, "resnet56": 6.97, "resnet110": 6.43,
                    "resnet1202": 7.93}
# He et al. 2016 ("Identity mappings"), Table 3 / section 4: CIFAR-10 test error (%) of pre-activation nets.
PAPER_PREACT_TEST_ERROR = {"resnetv2_110": 6.37, "resnetv2_164": 5.46, "resnetv2_1001": 4.92}


@dataclass(frozen=True)
class DegradationConfig:
    """One degradation run; ``None`` fields take the data set's recipe (digits: ``DIGITS_RECIPE``;
    CIFAR: the paper's, ``portres.training.loop.RECIPES``: 164 epochs, batch 128, lr 0.1 divided by 10
    at 50% and 75%, weight decay 1e-4, pad-crop-flip)."""

    out: str  # output directory: one subdirectory per network, results.json, report.md, degradation.png
    nets: tuple = DEFAULT_NETS  # preset names (or ResNetSpecs that fit the data as they are)
    data: str = "digits"  # data set name
    data_dir: str | None = None  # where its files are (CIFAR)
    backend: str = "mlx"  # numpy, tinygrad, mlx or torch
    device: str | None = None  # the backend's device
    epochs: int | None = None  # passes over the training set
    batch_size: int | None = None  # images per step
    lr: float | None = None  # peak learning rate
    weight_decay: float | None = None  # L2 weight decay
    schedule: str | None = None  # "constant", "multistep" or "cosine"
    warmup_epochs: float | None = None  # linear warm-up from lr/10 in front of the schedule
    seed: int = 0  # weights, data order and augmentation of every network
    limit_train: int | None = None  # train on the first N images only (quick runs)
    overwrite: bool = False  # replace the runs already in OUT/<net>/ instead of refusing them

    def train_config(self, net) -> TrainConfig:
        """The ``TrainConfig`` of one network: the same recipe, seed and data order for all."""
        recipe = DIGITS_RECIPE if self.data == "digits" else {}
        chosen = {key: getattr(self, key) if getattr(self, key) is not None else recipe.get(key)
                  for key in ("epochs", "batch_size", "lr", "weight_decay", "schedule")}
        epochs = chosen["epochs"] if chosen["epochs"] is not None else 0
        warmup = self.warmup_epochs if self.warmup_epochs is not None else recipe.get("warmup_fraction", 0.0) * epochs
        name = net if isinstance(net, str) else net.name
        where = {"arch": net} if isinstance(net, str) else {"spec": net.to_dict()}
        return TrainConfig(out=str(Path(self.out) / name), data=self.data, data_dir=self.data_dir,
                           backend=self.backend, device=self.device, seed=self.seed, limit_train=self.limit_train,
                           warmup_epochs=warmup, overwrite=self.overwrite, **where, **chosen)


def main_path_depth(spec: ResNetSpec) -> int:
    """Weight layers on the main path (convs outside the shortcuts, plus the classifier): 20 for resnet20."""
    plan = make_plan(spec)
    shortcuts = {name for block in plan.blocks for name in block.shortcut}
    return sum(1 for op in plan.ops if op.kind in ("conv2d", "linear") and op.name not in shortcuts)


def _nets(config: DegradationConfig) -> list:
    nets = list(config.nets)
    if not nets:
        raise ValueError("give at least one network (e.g. plain20,plain56,resnet20,resnet56)")
    names = [net if isinstance(net, str) else getattr(net, "name", None) for net in nets]
    for net in nets:
        if isinstance(net, str):
            resolve(net)  # an unknown preset fails here, before anything trains
        elif not isinstance(net, ResNetSpec):
            raise ValueError(f"nets must be preset names or ResNetSpecs, not {type(net).__name__}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"network {repeated[0]!r} is listed twice: each network trains once, into OUT/<name>")
    return nets


def run_degradation(config: DegradationConfig, *, resume: bool = False, progress: Progress | None = None) -> dict:
    """Train every network of ``config`` and write the report; returns what ``results.json`` holds."""
    nets = _nets(config)
    configs = [config.train_config(net).resolved() for net in nets]  # every setting checked before training
    dataset = datasets.load(configs[0].data, configs[0].data_dir, **(configs[0].data_options or {}))
    for train_config in configs:  # and every network against the data (image size, channels, classes)
        network_for(train_config, dataset)
    progress = progress or Progress()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    rows = []
    for index, (net, train_config) in enumerate(zip(nets, configs), start=1):
        progress.note(f"[{index}/{len(nets)}] {train_config.arch or net.name} -> {train_config.out}")
        summary = train(train_config, resume=resume, progress=progress)
        rows.append(_row(summary, Path(train_config.out), config.data))
    results = {
        "experiment": "degradation", "data": config.data, "backend": config.backend,
        "recipe": {key: getattr(configs[0], key) for key in ("epochs", "batch_size", "lr", "momentum", "weight_decay",
                                                             "schedule", "warmup_epochs", "augment", "seed")},
        "seconds": time.monotonic() - started, "machine": _machine(), "nets": rows, "effect": effect(rows),
    }
    (out / "results.json").write_text(strict_json(results, indent=2) + "\n")
    (out / "report.md").write_text(report(results))
    from .plots import plot_degradation

    note = plot_degradation(out / "degradation.png", results)
    if note:
        progress.note(note)
    return results


def _row(summary: dict, out: Path, data: str) -> dict:
    spec = ResNetSpec.from_dict(summary["spec"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    # an epoch redone after a kill between its record and its checkpoint is recorded twice: the later counts
    metrics = sorted({record["epoch"]: record for record in records}.values(), key=lambda record: record["epoch"])
    if not metrics:
        raise TrainingError(f"{out} has no finished epoch: run again (or --resume)")
    final = metrics[-1]
    tested = [m["test_top1_error"] for m in metrics if m["test_top1_error"] is not None]
    paper = {**PAPER_TEST_ERROR, **PAPER_PREACT_TEST_ERROR}.get(spec.name) if data == "cifar10" else None
    size = spec.stem.kind == "cifar" and 32 or 224
    return {"network": spec.name, "family": family_of(spec), "depth": main_path_depth(spec),
            "params": count(spec, input_size=size).params, "epochs": final["epoch"],
            "final_train_error": final["train_error"], "final_test_error": final["test_top1_error"],
            "best_test_error": min(tested) if tested else None, "paper_test_error_percent": paper,
            "train_seconds": sum(m["seconds"] for m in metrics), "finished": summary["finished"],
            "curve": [{"epoch": m["epoch"], "train_error": m["train_error"], "test_error": m["test_top1_error"]}
                      for m in metrics]}


def effect(rows: list[dict]) -> dict:
    """Per family with two or more depths: the shallowest and deepest net's final training errors and
    whether the papers' finding shows (plain: the deeper trains worse; residual: the deeper no worse)."""
    found = {}
    for family, wanted in (("plain", "worse"), ("residual", "no worse"), ("pre-activation", "no worse")):
        members = sorted((row for row in rows if row["family"] == family), key=lambda row: row["depth"])
        if len(members) < 2:
            continue
        shallow, deep = members[0], members[-1]
        worse = deep["final_train_error"] > shallow["final_train_error"]
        found[family] = {"shallow": shallow["network"], "deep": deep["network"],
                         "shallow_train_error": shallow["final_train_error"],
                         "deep_train_error": deep["final_train_error"], "expected": f"deeper trains {wanted}",
                         "shown": worse if wanted == "worse" else not worse}
    return found


def report(results: dict) -> str:
    """``report.md``: the table and what it shows."""
    recipe = results["recipe"]
    cifar10 = results["data"] == "cifar10"
    lines = [f"# Degradation: plain vs residual networks on {results['data']}", "",
             f"Backend {results['backend']}; every network trained with the same recipe, seed and data order: "
             f"{recipe['epochs']} epochs, batch {recipe['batch_size']}, SGD lr {recipe['lr']} momentum "
             f"{recipe['momentum']}, weight decay {recipe['weight_decay']}, {recipe['schedule']} schedule"
             f"{_warmup(recipe)}, "
             f"augmentation {recipe['augment'] or 'none'}, seed {recipe['seed']}. "
             f"Wall time {results['seconds'] / 60:.1f} min ({results['machine']['cpus']} CPUs, "
             f"load average {results['machine']['load_average']} at the end).", "",
             "Final training error: the error on the training batches during the last epoch (as the papers' "
             "Figure 6 plots it); test error after the last epoch, and the best over the epochs.", ""]
    headers = ["network", "family", "depth", "parameters", "final train error", "test error", "best test error"]
    if cifar10:
        headers.append("paper test error (He et al.)")
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in results["nets"]:
        cells = [row["network"], row["family"], str(row["depth"]), f"{row['params']:,}",
                 percent(row["final_train_error"]), percent(row["final_test_error"]),
                 percent(row["best_test_error"])]
        if cifar10:
            paper = row["paper_test_error_percent"]
            cells.append("-" if paper is None else f"{paper:.2f}%")
        if not row["finished"]:
            cells[0] += " (unfinished)"
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if cifar10:
        lines += ["Paper numbers: He et al. 2015, Table 6 (ResNet-110: best of 5 runs; mean 6.61 +- 0.16), and He et "
                  "al. 2016 for pre-activation nets; the paper reports plain nets only as curves (Figure 6): "
                  "plain-56 trains and tests worse than plain-20.", ""]
    for family, found in results["effect"].items():
        verdict = "shown" if found["shown"] else "NOT shown"
        lines.append(f"- {family}: {found['deep']} final train error {percent(found['deep_train_error'])} vs "
                     f"{found['shallow']} {percent(found['shallow_train_error'])}: expected \"{found['expected']}\": "
                     f"{verdict}.")
    lines += ["", "![training error per epoch](degradation.png)", ""]
    return "\n".join(lines)


def _warmup(recipe: dict) -> str:
    epochs = recipe.get("warmup_epochs") or 0
    return f" after {epochs:g} epochs of linear warm-up from lr/10" if epochs else ""


def percent(value) -> str:
    """A fraction as a percentage with two decimals; "-" for a missing or non-finite one."""
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{100 * value:.2f}%"


def _machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor() or
            platform.machine(), "load_average": [round(value, 2) for value in load]}


