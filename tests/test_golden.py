"""The architecture is ResNet: portres's float64 reference against outputs the real frameworks computed.

Every backend runs the same plan, so a mistake in portres/plan.py (a ReLU before the add, a stride
on the wrong conv, Keras v2's layer order) passes every parity test. tests/golden/data holds, for
one network per distinct zoo architecture, the logits and stage-output summaries that torchvision,
timm, Keras or a loop-written torch forward of the papers computed in float64 with seeded weights
(tests/golden/make_golden.py says exactly how; tests/golden/seeded.py holds the weights, images and
summaries both sides share). Here the NumPy reference computes the same, no framework installed, and
every relative L2 error must stay below 1e-9: float64 on both sides leaves ~1e-15, any wrong layer
leaves ~1e-1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import architecture_representatives  # tests/ is on sys.path (rootdir conftest)
from golden import seeded

import portres
from portres.parity import relative_error

DATA = Path(__file__).resolve().parent / "golden" / "data"
TOLERANCE = 1e-9
# The identity-mappings paper's appendix takes the first unit's shortcut after conv1's BN-ReLU; the
# preset adds the bare conv1 output (see make_golden.py). resnetv2_20.preset_first_unit checks the rest.
PAPER_FIRST_UNIT = ("resnetv2_20: the preset's first block adds the bare conv1 output to its residual, where "
                    "He et al. 2016 (identity mappings, appendix) adds BN-ReLU(conv1): see tests/golden/make_golden.py")
EXPECTED_TO_DIFFER = {"resnetv2_20": PAPER_FIRST_UNIT}
CASES = sorted(architecture_representatives()) + ["resnetv2_20.preset_first_unit"]


def load(case: str) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(DATA / f"{case}.npz", allow_pickle=False) as file:
        arrays = {key: file[key] for key in file.files}
    return arrays, json.loads(str(arrays.pop("meta")))


def reference_errors(case: str) -> dict[str, float]:
    """``{"logits" | "<stage>.sketch" | "<stage>.means": relative L2 error}`` of the NumPy reference."""
    golden, meta = load(case)
    spec = portres.get(case.partition(".")[0])
    shapes = {name: shape for name, (shape, _) in portres.make_plan(spec).param_shapes().items()}
    assert seeded.fingerprint(shapes) == meta["param_fingerprint"], (
        f"{case}: the plan's parameter names/shapes are not those of {meta['source']}")
    model = portres.build(spec, "numpy", seeded.weights(shapes))
    assert model.backend.dtype == "float64"
    images = seeded.images(meta["input_size"], meta["batch"])
    computed = {"logits": model(images), **seeded.summarize(model.features(images))}
    assert sorted(computed) == sorted(golden), f"{case}: stages {sorted(computed)} vs golden {sorted(golden)}"
    return {key: relative_error(computed[key], golden[key]) for key in golden}


@pytest.mark.parametrize("name", [  # "name": conftest.py's tiers keep resnet20 alone in --fast
    pytest.param(case, marks=pytest.mark.xfail(strict=True, reason=EXPECTED_TO_DIFFER[case]))
    if case in EXPECTED_TO_DIFFER else case for case in CASES])
def test_the_reference_computes_what_the_frameworks_compute(name):
    errors = reference_errors(name)
    bad = {key: f"{error:.3g}" for key, error in errors.items() if not error < TOLERANCE}
    assert not bad, f"{name} differs from its golden output (relative L2 error > {TOLERANCE:g}): {bad}"


def test_every_distinct_architecture_has_a_golden_file_that_says_how_it_was_made():
    present = sorted(path.stem for path in DATA.glob("*.npz"))
    assert present == sorted(CASES), "regenerate with tests/golden/make_golden.py (see its first line)"
    for case in CASES:
        _, meta = load(case)
        for field in ("source", "framework", "input_size", "weight_seed", "image_seed", "date", "param_count"):
            assert meta[field] not in ("", None), (case, field)
        spec = portres.get(case.partition(".")[0])
        assert meta["input_size"] == seeded.input_size(spec.stem.kind)
        shapes = portres.make_plan(spec).param_shapes().values()
        assert meta["param_count"] == sum(int(np.prod(shape)) for shape, _ in shapes)  # buffers included
