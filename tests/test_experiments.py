"""The experiments' mechanics on tiny networks: the lesion rewrite against an independent
construction (the branch's output zeroed) on every backend, gradients at values inside the network
against finite differences and across backends, path gradients, the degradation run's outputs, the
lesion study, the zoo entries the experiments need, and the commands' error contract. Never
timings, never accuracy targets (docs/experiments.md has real runs)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from click.testing import CliRunner

import portres
from portres import backends, zoo
from portres.cli import main
from portres.data import DataError
from portres.experiments.degradation import DegradationConfig, main_path_depth, run_degradation
from portres.experiments.gradflow import gradient_flow, neighbour_correlation
from portres.experiments.lesion import deletable_blocks, lesion_parity, lesion_study, lesioned_model, path_gradients
from portres.experiments.probes import INPUT, Objective, gradients
from portres.parity import parity_case, relative_error
from portres.plan import make_plan
from portres.rewrites import delete_blocks
from portres.spec import ResNetSpec, StageSpec, StemSpec
from portres.training.grads import training_backend
from portres.training.loop import TrainConfig, train
from portres.walker import run_plan, run_plan_train
from portres.weights import init_params

FRAMEWORKS = [name for name in backends.available() if name != "numpy"]
# tinygrad compiles every new graph (about a minute for a tiny network's backward on 2 busy cores): by default it
# runs one gradient test and two lesion checks; PORTRES_FULL_ZOO=1 runs it everywhere (as tests/test_gradients.py)
FULL = os.environ.get("PORTRES_FULL_ZOO") == "1"
QUICK_FRAMEWORKS = [name for name in FRAMEWORKS if FULL or name != "tinygrad"]
# gradients: every framework but the inference-only ones (onnxruntime)
TRAINING_FRAMEWORKS = [name for name in FRAMEWORKS if name in backends.TRAINABLE]
QUICK_TRAINING_FRAMEWORKS = [name for name in QUICK_FRAMEWORKS if name in backends.TRAINABLE]
CIFAR_STEM = StemSpec(kind="cifar", width=4, max_pool=False)
TINY = {  # every block kind and shortcut the lesion rewrite meets, at a few hundred parameters
    "v1_basic_A": ResNetSpec(name="v1_basic_A", block="basic", shortcut="A", stem=CIFAR_STEM,
                             stages=(StageSpec(2, 4, 1), StageSpec(1, 8, 2)), num_classes=5),
    "v1_bottleneck_B": ResNetSpec(name="v1_bottleneck_B", block="bottleneck", shortcut="B", stem=CIFAR_STEM,
                                  stages=(StageSpec(1, 2, 1), StageSpec(1, 2, 2)), num_classes=5),
    "v2_basic_A": ResNetSpec(name="v2_basic_A", block="preact_basic", shortcut="A", stem=CIFAR_STEM,
                             stages=(StageSpec(2, 4, 1), StageSpec(1, 8, 2)), num_classes=5),
    "v2_bottleneck_B": ResNetSpec(name="v2_bottleneck_B", block="preact_bottleneck", shortcut="B",
                                  bottleneck_stride_at="1x1", stem=CIFAR_STEM,
                                  stages=(StageSpec(1, 2, 1), StageSpec(1, 2, 2)), num_classes=5),
}
PLAIN = ResNetSpec(name="tiny_plain", block="basic", residual=False, stem=CIFAR_STEM,
                   stages=(StageSpec(2, 4, 1), StageSpec(2, 8, 2)), num_classes=5)
# digits-shaped (1 channel, 10 classes) twins for the runs on real data
DIGITS_RESIDUAL = ResNetSpec(name="tiny_res", block="basic", shortcut="A", stem=CIFAR_STEM, in_channels=1,
                             stages=(StageSpec(2, 4, 1), StageSpec(1, 8, 2)), num_classes=10)
DIGITS_PLAIN = ResNetSpec.from_dict({**DIGITS_RESIDUAL.to_dict(), "name": "tiny_plain", "residual": False})
SIZE = 8  # image side of the tiny cases


def zeroed_branch(spec, params: dict, block: str) -> dict:
    """``params`` with the residual branch of ``block`` made to output exactly zero: its last op's
    scale and shift (a BN, v1) or weights (a conv, v2) set to 0. An independent way to the function
    the lesion rewrite must compute."""
    plan = make_plan(spec)
    add = plan.op(f"{block}.add")
    last = next(op for op in plan.ops if op.output == add.inputs[0])
    zeroed = dict(params)
    suffixes = ("weight", "bias") if last.kind == "batch_norm" else ("weight",)
    for suffix in suffixes:
        zeroed[f"{last.name}.{suffix}"] = np.zeros_like(params[f"{last.name}.{suffix}"])
    return zeroed


# -- the lesion rewrite ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, backend", [(name, backend) for name in TINY for backend in ["numpy", *FRAMEWORKS]
                                           if backend in QUICK_FRAMEWORKS or name in ("v1_basic_A", "v2_bottleneck_B")
                                           or backend == "numpy"])
def test_deleting_a_residual_block_equals_zeroing_its_branch(name, backend):
    spec = TINY[name]
    images, params = parity_case(spec, SIZE, batch=2, seed=1)
    blocks = [block.name for block in make_plan(spec).blocks]
    for block in (blocks[0], blocks[-1]):  # an identity or projection shortcut, and a shape-changing block
        lesioned = lesioned_model(spec, backend, params, [block])
        zeroed = portres.build(spec, backend, zeroed_branch(spec, params, block))
        reference = lesioned_model(spec, "numpy", params, [block], dtype="float64")(images)
        tolerance = 1e-12 if backend == "numpy" else 1e-4
        assert relative_error(lesioned(images), zeroed(images)) < tolerance
        assert relative_error(lesioned(images), reference) < tolerance
        assert relative_error(reference, portres.build(spec, "numpy", params)(images)) > 1e-3  # it did change


def test_the_rewrite_removes_the_branch_and_keeps_what_the_shortcut_reads():
    plan = make_plan(TINY["v2_bottleneck_B"])
    lesioned = delete_blocks(plan, ["layer2.0"])
    kept = [op.name for op in lesioned.ops if op.name.startswith("layer2.0.")]
    # the v2 projection reads the block's BN-ReLU, so those stay; the branch's convs and the add go
    assert kept == ["layer2.0.bn1", "layer2.0.relu1", "layer2.0.downsample.0"]
    assert "layer2.0.conv1.weight" not in lesioned.param_shapes()
    assert dict(lesioned.features)["layer2"] == "layer2.0.downsample.0"
    assert sum(op.kind == "add" for op in lesioned.ops) == sum(op.kind == "add" for op in plan.ops) - 1
    v1 = delete_blocks(make_plan(TINY["v1_basic_A"]), "layer1.1")
    assert [op.name for op in v1.ops if op.name.startswith("layer1.1.")] == ["layer1.1.relu2"]  # relu(x) stays
    assert v1.op("layer1.1.relu2").inputs == ("layer1.0.relu2",)


def test_deleting_a_plain_block_passes_its_input_on():
    spec = PLAIN
    plan = make_plan(spec)
    images, params = parity_case(spec, SIZE, batch=2, seed=2)
    from portres.backends.numpy import Backend

    reference = Backend()
    lesioned = lesioned_model(spec, "numpy", params, ["layer2.1"], dtype="float64")(images)
    # independently: run the intact plan, and let the block after layer2.1 (the head) read layer2.1's input
    saved = {}

    def substitute(op, args):
        if op.name == "layer2.1.conv1":
            saved["input"] = args[0]
        if op.name == "avgpool":
            args[0] = saved["input"]

    expected = run_plan(plan, reference, reference.load_params(plan, params), reference.from_numpy(images),
                        before_op=substitute)[plan.output]
    assert relative_error(lesioned, expected) < 1e-12
    assert deletable_blocks(plan) == ["layer1.0", "layer1.1", "layer2.1"]  # layer2.0 changes the shape


@pytest.mark.parametrize("blocks, message", [
    (["layer9.0"], "has no block 'layer9.0'"),
    (["layer2.0"], "cannot delete the plain block layer2.0"),
])
def test_impossible_deletions_are_refused(blocks, message):
    with pytest.raises(ValueError, match=message):
        delete_blocks(make_plan(PLAIN), blocks)


def test_deleting_every_block_leaves_stem_shortcuts_and_head():
    plan = make_plan(TINY["v1_basic_A"])
    lesioned = delete_blocks(plan, [block.name for block in plan.blocks])
    assert not any(op.kind in ("conv2d", "add") and op.name.startswith("layer") for op in lesioned.ops)
    images, params = parity_case(TINY["v1_basic_A"], SIZE, batch=2)
    every = [block.name for block in plan.blocks]
    assert np.isfinite(lesioned_model(TINY["v1_basic_A"], "numpy", params, every)(images)).all()


@pytest.mark.parametrize("name", ["v1_basic_A", "v2_bottleneck_B"])
def test_lesioned_plans_pass_forward_parity_on_every_framework(name):
    if not FRAMEWORKS:
        pytest.skip("no framework installed")
    results = lesion_parity(TINY[name], FRAMEWORKS, ["layer1.0", "layer2.0"], input_size=SIZE)
    assert [result.backend for result in results] == FRAMEWORKS
    assert all(result.passed for result in results), results


# -- gradients at values inside the network ----------------------------------------------------------


def test_value_gradients_match_finite_differences_on_the_reference():
    spec = TINY["v1_basic_A"]
    plan = make_plan(spec)
    reference = training_backend("numpy")
    rng = np.random.default_rng(0)
    images = rng.standard_normal((3, 3, SIZE, SIZE))
    arrays = reference.load_params(plan, init_params(plan, 0, randomize_batch_norm=True))
    objective = Objective.cross_entropy(rng.integers(0, 5, 3), 5)
    inside = plan.blocks[1].input
    result = gradients(plan, reference, arrays, images, objective, [INPUT, inside])
    shapes = {INPUT: images.shape, inside: result.value_grads[inside].shape}
    for value in (INPUT, inside):
        direction = rng.standard_normal(shapes[value])

        def loss(step, value=value, direction=direction):
            kept, _ = run_plan_train(plan, reference, arrays, images, momentum=None,
                                     probes={value: step * direction})
            return objective.value(kept[plan.output])

        numeric = (loss(1e-6) - loss(-1e-6)) / 2e-6
        assert numeric == pytest.approx(float((result.value_grads[value] * direction).sum()), rel=1e-5)


@pytest.mark.parametrize("backend", TRAINING_FRAMEWORKS)
def test_probe_gradients_equal_the_reference_walkers(backend):
    spec = ResNetSpec(name="two_blocks", block="preact_basic", shortcut="A", stem=CIFAR_STEM,
                      stages=(StageSpec(1, 4, 1), StageSpec(1, 8, 2)), num_classes=5)
    plan = make_plan(spec)
    rng = np.random.default_rng(1)
    images = rng.standard_normal((4, 3, SIZE, SIZE))
    params = init_params(plan, 0, randomize_batch_norm=True)
    values = [INPUT] + [block.input for block in plan.blocks]
    objective = Objective("linear", rng.standard_normal((4, 5)))
    results = []
    for name in ("numpy", backend):
        lowering = training_backend(name, dtype="float64")
        results.append(gradients(plan, lowering, lowering.load_params(plan, params), images, objective, values,
                                 param_grads=True))
    reference, computed = results
    assert computed.objective == pytest.approx(reference.objective, rel=1e-10)
    for value in values:
        assert relative_error(computed.value_grads[value], reference.value_grads[value]) < 1e-8, value
    for name, grad in reference.param_grads.items():
        assert relative_error(computed.param_grads[name], grad) < 1e-8, name


def test_neighbour_correlation():
    row = np.random.default_rng(0).standard_normal((1, 50))
    assert neighbour_correlation(np.repeat(row, 4, 0)) == pytest.approx(1.0)
    assert neighbour_correlation(np.concatenate([row, -row, row])) == pytest.approx(-1.0)
    assert abs(neighbour_correlation(np.random.default_rng(1).standard_normal((200, 400)))) < 0.02


@pytest.mark.parametrize("backend", QUICK_TRAINING_FRAMEWORKS)
def test_gradflow_numbers_agree_across_backends(backend):
    options = dict(batch=3, input_size=SIZE, line_points=4, seed=2)
    numbers = []
    for name in ("numpy", backend):
        flow = gradient_flow(TINY["v1_bottleneck_B"], name, **options).to_dict()
        numbers.append(flow)
    reference, computed = numbers
    assert computed["loss"] == pytest.approx(reference["loss"], rel=1e-10)
    for key in ("blocks", "convs", "responses"):
        assert len(computed[key]) == len(reference[key]) > 0
        for mine, theirs in zip(computed[key], reference[key]):
            for field, value in theirs.items():
                if isinstance(value, float):
                    assert mine[field] == pytest.approx(value, rel=1e-4, abs=1e-12), (key, field)
    assert computed["input_line_correlation"] == pytest.approx(reference["input_line_correlation"], rel=1e-4)
    assert computed["output"]["grad_norm"] == pytest.approx(reference["output"]["grad_norm"], rel=1e-4)


def test_gradflow_reports_every_block_conv_and_3x3_response():
    spec = TINY["v1_basic_A"]
    flow = gradient_flow(spec, "numpy", batch=2, input_size=SIZE, line_points=3)
    plan = make_plan(spec)
    assert [row["block"] for row in flow.blocks] == [block.name for block in plan.blocks]
    assert [row["conv"] for row in flow.convs] == [op.name for op in plan.ops if op.kind == "conv2d"]
    # v1: the response of each 3x3 conv is the BN after it; at init a train-mode BN makes its deviation ~1
    assert [row["value"] for row in flow.responses] == [row["conv"].replace("conv", "bn") for row in flow.convs]
    assert all(abs(row["std"] - 1) < 1e-3 for row in flow.responses)
    assert all(row["grad_norm"] > 0 and math.isfinite(row["line_correlation"]) for row in flow.blocks)
    assert len(flow.line_gradient) == 3 and max(abs(v) for v in flow.line_gradient) == pytest.approx(1.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"line_points": 2}, "line_points=2 must be an integer >= 3"),
    ({"line_radius": 0}, "line_radius=0 must be a number > 0"),
    ({"input_size": 1}, "too small"),
    ({"batch": 1}, "at least 2 images"),
])
def test_gradflow_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gradient_flow(TINY["v1_basic_A"], "numpy", **{"input_size": SIZE, **kwargs})


# -- paths -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", QUICK_TRAINING_FRAMEWORKS)
def test_path_gradients_agree_across_backends(backend):
    spec = TINY["v1_basic_A"]
    plan = make_plan(spec)
    rng = np.random.default_rng(3)
    images, labels = rng.standard_normal((3, 3, SIZE, SIZE)), rng.integers(0, 5, 3)
    params = init_params(plan, 0, randomize_batch_norm=True)
    found = []
    for name in ("numpy", backend):
        lowering = training_backend(name, dtype="float64")
        found.append(path_gradients(plan, lowering, lowering.load_params(plan, params), images, labels, samples=2))
    reference, computed = found
    assert reference["n"] == 3 and reference["lengths"] == [0, 1, 2, 3] and reference["count"] == [1, 3, 3, 1]
    assert reference["samples"] == [1, 2, 2, 1]  # every subset when there are no more than the samples asked
    assert sum(reference["share_of_gradient"]) == pytest.approx(1.0)
    assert sum(reference["share_of_paths"]) == pytest.approx(1.0)
    np.testing.assert_allclose(computed["gradient_norm"], reference["gradient_norm"], rtol=1e-8)


def test_the_paths_add_up_to_the_whole_gradient_in_a_linear_view():
    """With one residual block, the gradient through the branch plus the one through the shortcut is
    the whole gradient (v2: the add is the block's last op, so nothing follows it to mix them)."""
    spec = ResNetSpec(name="one_block", block="preact_basic", shortcut="A", stem=CIFAR_STEM,
                      stages=(StageSpec(1, 4, 1),), num_classes=5)
    plan = make_plan(spec)
    reference = training_backend("numpy")
    rng = np.random.default_rng(4)
    images, labels = rng.standard_normal((3, 3, SIZE, SIZE)), rng.integers(0, 5, 3)
    arrays = reference.load_params(plan, init_params(plan, 0, randomize_batch_norm=True))
    objective = Objective.cross_entropy(labels, 5)
    target = plan.blocks[0].input
    whole = gradients(plan, reference, arrays, images, objective, [target]).value_grads[target]
    parts = [gradients(plan, reference, arrays, images, objective, [target],
                       detached=[("layer1.0.add", index)]).value_grads[target] for index in (0, 1)]
    np.testing.assert_allclose(parts[0] + parts[1], whole, rtol=1e-10, atol=1e-14)
    assert np.linalg.norm(parts[0]) > 0 and np.linalg.norm(parts[1]) > 0


def test_plain_networks_have_no_paths():
    plan = make_plan(PLAIN)
    reference = training_backend("numpy")
    with pytest.raises(ValueError, match="no residual blocks"):
        path_gradients(plan, reference, reference.load_params(plan, init_params(plan)),
                       np.zeros((2, 3, SIZE, SIZE)), np.array([0, 1]))


# -- runs on real data -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny degradation run (numpy, a few steps): its results and checkpoints serve the later tests."""
    out = tmp_path_factory.mktemp("degradation")
    config = DegradationConfig(out=str(out), nets=(DIGITS_PLAIN, DIGITS_RESIDUAL), backend="numpy", epochs=2,
                               batch_size=16, limit_train=32, lr=0.05)
    return out, run_degradation(config, progress=Quiet())


class Quiet:
    def update(self, text, final=False):
        pass

    def note(self, text):
        pass


def test_a_degradation_run_writes_each_net_and_the_report(trained):
    out, results = trained
    assert [row["network"] for row in results["nets"]] == ["tiny_plain", "tiny_res"]
    assert [row["family"] for row in results["nets"]] == ["plain", "residual"]
    for row in results["nets"]:
        assert (out / row["network"] / "last.safetensors").is_file()
        assert [point["epoch"] for point in row["curve"]] == [1, 2]
        assert row["final_train_error"] == row["curve"][-1]["train_error"] and row["finished"]
        assert row["params"] == portres.summary(DIGITS_RESIDUAL, input_size=32).params
        assert row["paper_test_error_percent"] is None  # digits: no paper numbers
    written = json.loads((out / "results.json").read_text())
    assert written["nets"][1]["curve"] == results["nets"][1]["curve"]
    assert written["recipe"]["epochs"] == 2 and written["recipe"]["seed"] == 0
    report = (out / "report.md").read_text()
    assert "| tiny_plain | plain | 8 |" in report and "degradation.png" in report
    assert (out / "degradation.png").stat().st_size > 1000
    assert results["effect"] == {}  # one depth per family: nothing to compare


def test_a_finished_degradation_run_resumes_without_training_again(trained):
    out, results = trained
    config = DegradationConfig(out=str(out), nets=(DIGITS_PLAIN, DIGITS_RESIDUAL), backend="numpy", epochs=2,
                               batch_size=16, limit_train=32, lr=0.05)
    again = run_degradation(config, resume=True, progress=Quiet())
    assert [row["curve"] for row in again["nets"]] == [row["curve"] for row in results["nets"]]


def test_the_effect_compares_the_shallowest_and_deepest_of_each_family():
    from portres.experiments.degradation import effect

    rows = [{"network": name, "family": family, "depth": depth, "final_train_error": error}
            for name, family, depth, error in (("plain20", "plain", 20, 0.0), ("plain56", "plain", 56, 0.5),
                                               ("resnet20", "residual", 20, 0.0), ("resnet56", "residual", 56, 0.1))]
    found = effect(rows)
    assert found["plain"]["shown"] and not found["residual"]["shown"]
    assert (found["residual"]["shallow"], found["residual"]["deep"]) == ("resnet20", "resnet56")


def test_degradation_settings_are_checked_before_anything_trains(tmp_path):
    with pytest.raises(ValueError, match="listed twice"):
        run_degradation(DegradationConfig(out=str(tmp_path), nets=("resnet20", "resnet20")))
    with pytest.raises(KeyError, match="unknown preset 'resnet21'"):
        run_degradation(DegradationConfig(out=str(tmp_path), nets=("resnet21",)))
    with pytest.raises(ValueError, match="lr=-1"):
        run_degradation(DegradationConfig(out=str(tmp_path), nets=("resnet20",), lr=-1.0))
    # a network the data cannot feed (total stride 32 on 16x16 digits) is refused before the first one trains
    with pytest.raises(DataError, match="too small for resnet18"):
        run_degradation(DegradationConfig(out=str(tmp_path), nets=("plain20", "resnet18"), backend="numpy"))
    assert not list(tmp_path.iterdir())


def test_a_lesion_study_of_a_trained_checkpoint(trained):
    out, _ = trained
    study = lesion_study(DIGITS_RESIDUAL, "numpy", str(out / "tiny_res" / "last.safetensors"), "digits", draws=2,
                         path_samples=1, path_batch=4)
    assert study.blocks == ["layer1.0", "layer1.1", "layer2.0"] and study.deletable == study.blocks
    assert [row["block"] for row in study.single] == study.blocks
    assert [row["k"] for row in study.random] == [1, 2, 3] and [row["draws"] for row in study.random] == [2, 2, 1]
    assert all(0 <= row["min"] <= row["mean"] <= row["max"] <= 1 for row in study.random)
    assert study.paths["count"] == [1, 3, 3, 1] and sum(study.paths["share_of_gradient"]) == pytest.approx(1)
    single = {row["block"]: row["test_error"] for row in study.single}
    model = lesioned_model(DIGITS_RESIDUAL, "numpy", str(out / "tiny_res" / "last.safetensors"), ["layer1.1"])
    from portres import data

    digits = data.load("digits")
    logits = model(data.normalize(digits.test_images, digits.mean, digits.std))
    assert single["layer1.1"] == pytest.approx(float(np.mean(logits.argmax(1) != digits.test_labels)))
    plain = lesion_study(DIGITS_PLAIN, "numpy", str(out / "tiny_plain" / "last.safetensors"), "digits", draws=1)
    assert plain.deletable == ["layer1.0", "layer1.1"] and plain.paths == {}


# -- the zoo -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, depth, blocks", [
    ("resnetv2_20", 20, 3), ("resnetv2_56", 56, 9), ("resnetv2_110", 110, 18), ("resnetv2_164", 164, 18),
    ("resnetv2_1001", 1001, 111), ("plain1202", 1202, 200), ("plain56", 56, 9),
])
def test_the_cifar_twins_have_their_depth(name, depth, blocks):
    spec = portres.get(name)
    assert main_path_depth(spec) == depth and [stage.blocks for stage in spec.stages] == [blocks] * 3
    assert spec.stem.kind == "cifar" and [stage.width for stage in spec.stages] == [16, 32, 64]
    if depth in (164, 1001):  # He et al. 2016: bottlenecks output 4x (64/128/256), stride on the 1x1, projections
        assert spec.block == "preact_bottleneck" and spec.feature_width == 256
        assert spec.bottleneck_stride_at == "1x1" and spec.shortcut == "B"
    elif name.startswith("resnetv2_"):
        assert spec.block == "preact_basic" and spec.feature_width == 64 and spec.shortcut == "A"


def test_every_cifar_resnet_has_a_plain_twin():
    for depth in zoo.CIFAR_DEPTHS:
        plain, residual = portres.get(f"plain{depth}"), portres.get(f"resnet{depth}")
        assert not plain.residual and plain.stages == residual.stages and zoo.entry(f"plain{depth}").family == "plain"


# -- commands ----------------------------------------------------------------------------------------


def test_gradflow_and_lesion_commands(trained, tmp_path):
    out, _ = trained
    checkpoint = str(out / "tiny_res" / "last.safetensors")
    runner = CliRunner()
    flowed = runner.invoke(main, ["gradflow", checkpoint, "--data", "digits", "--backend", "numpy", "--batch", "3",
                                  "--line-points", "3", "--json", "--plot", str(tmp_path / "g.png")])
    assert flowed.exit_code == 0, flowed.output
    flow = json.loads(flowed.stdout.splitlines()[0])
    assert flow["network"] == "tiny_res" and flow["weights"] == checkpoint and len(flow["blocks"]) == 3
    assert (tmp_path / "g.png").stat().st_size > 1000
    table = runner.invoke(main, ["experiment", "gradflow", checkpoint, "--data", "digits", "--backend", "numpy",
                                 "--batch", "3", "--line-points", "3"])
    assert table.exit_code == 0 and "layer2.0" in table.stdout and "grad corr" in table.stdout, table.output
    lesioned = runner.invoke(main, ["lesion", "--weights", checkpoint, "--weights",
                                    str(out / "tiny_plain" / "last.safetensors"), "--backend", "numpy", "--draws",
                                    "1", "--path-samples", "1", "--path-batch", "2", "--json", "--plot",
                                    str(tmp_path / "l.png")])
    assert lesioned.exit_code == 0, lesioned.output
    studies = [json.loads(line) for line in lesioned.stdout.splitlines()]
    assert [study["family"] for study in studies] == ["residual", "plain"]
    assert (tmp_path / "l.png").stat().st_size > 1000


def test_the_degradation_command(tmp_path):
    result = CliRunner().invoke(main, ["experiment", "degradation", "--nets", "plain20", "--backend", "numpy",
                                       "--epochs", "1", "--batch-size", "8", "--limit-train", "8", "--out",
                                       str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert "plain20" in result.stdout and (tmp_path / "d" / "report.md").is_file()
    again = CliRunner().invoke(main, ["experiment", "degradation", "--nets", "plain20", "--backend", "numpy",
                                      "--epochs", "1", "--batch-size", "8", "--limit-train", "8", "--out",
                                      str(tmp_path / "d")])
    assert again.exit_code == 2 and "--overwrite" in again.output, again.output  # a finished run is never replaced
    replaced = CliRunner().invoke(main, ["experiment", "degradation", "--nets", "plain20", "--backend", "numpy",
                                         "--epochs", "1", "--batch-size", "8", "--limit-train", "8", "--out",
                                         str(tmp_path / "d"), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output


@pytest.mark.parametrize("args, message", [
    (["gradflow", "resnet21"], "unknown preset 'resnet21'"),
    (["gradflow", "resnet20", "plain20", "--weights", "w.safetensors"], "--weights belongs to one network"),
    (["gradflow", "resnet20", "--line-points", "2"], "--line-points"),
    (["gradflow", "/nonexistent.safetensors"], "no checkpoint at /nonexistent.safetensors"),
    (["gradflow", "resnet20", "--backend", "jax"], "unknown backend 'jax'"),
    (["lesion", "--weights", "/nonexistent.safetensors"], "no weights file at /nonexistent.safetensors"),
    (["lesion", "--arch", "resnet20", "--weights", "a", "--weights", "b"], "--arch names the network of one"),
    (["lesion"], "Missing option '--weights'"),
    (["experiment", "degradation", "--nets", "resnet20,resnet21"], "unknown preset 'resnet21'"),
    (["experiment", "degradation", "--nets", ","], "--nets names no network"),
    (["experiment", "degradation", "--lr", "0"], "lr=0.0 must be > 0"),
    (["gradflow", "resnet20", "--data", "digits", "--image-size", "100000"], "100000 is not in the range 1<=x<=4096"),
    (["lesion", "--weights", "w.safetensors", "--image-size", "5000"], "5000 is not in the range 1<=x<=4096"),
])
def test_command_errors_are_one_line_with_status_2(args, message, tmp_path):
    result = CliRunner().invoke(main, [*args, *(["--out", str(tmp_path)] if "degradation" in args else [])])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.strip().count("\n") == 0, result.output


def test_a_weights_file_that_is_no_checkpoint_needs_arch(tmp_path, trained):
    out, _ = trained
    path = tmp_path / "plain.safetensors"
    portres.save_weights(path, init_params(DIGITS_RESIDUAL))
    result = CliRunner().invoke(main, ["lesion", "--weights", str(path), "--backend", "numpy"])
    assert result.exit_code == 2 and "name the network with --arch" in result.output, result.output


def test_training_on_the_new_presets_starts(tmp_path):
    """The new CIFAR presets adapt to a data set like the others (one step each, the reference)."""
    for name in ("resnetv2_20", "resnetv2_164"):
        summary = train(TrainConfig(out=str(tmp_path / name), arch=name, data="digits", backend="numpy", epochs=1,
                                    batch_size=4, limit_train=4, stop_after_steps=1), progress=Quiet())
        assert summary["steps_done"] == 1
