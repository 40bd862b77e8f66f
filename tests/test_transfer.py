"""Transfer learning (issue 19, item 7): ``portres train --init/--freeze/--lr-backbone`` and
``load_weights(..., strict=False)``, on tiny synthetic image folders: a backbone pretrained on ten
colour classes, then a new five-class head trained on top of it with the backbone frozen bit for bit.
Every bad input is refused in one line with exit status 2 and nothing written."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner
from test_train import FRAMEWORKS, TINY, Quiet, quick

import portres
from portres.cli import main
from portres.plan import make_plan
from portres.training.checkpoint import KEY, CheckpointError, load_checkpoint, read_description
from portres.training.loop import TrainConfig, train
from portres.training.optim import SGD, AdamW
from portres.training.transfer import frozen_parameters, learning_rate_scales
from portres.weights import (
    WeightsError,
    adapt_input_conv,
    init_params,
    load_weights,
    read_weights_file,
    save_weights,
)

# ten well-separated colours: class k is a noisy patch of colour k, so a linear head on pooled features can tell them
PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [128, 128, 128]])


def colour_folder(root, classes, per_class=20, seed=0, side=8):
    """An ImageFolder tree (train/ and test/) of noisy solid-colour PNGs, one class per colour."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("test", per_class // 2)):
        for k in classes:
            folder = root / split / f"colour{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = PALETTE[k][None, None] + rng.integers(-40, 41, (side, side, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{index}.png")
    return root


def invoke(*args):
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    return result, result.output.strip().splitlines()


COMMON = ["--arch", "resnet20", "--data", "folder", "--image-size", 8, "--backend", "numpy", "--dtype", "float32",
          "--batch-size", 20, "--lr", 0.05]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A resnet20 trained for one epoch on ten colour classes (``A/best.safetensors``), and a five-class folder."""
    pytest.importorskip("PIL")
    root = tmp_path_factory.mktemp("transfer")
    ten = colour_folder(root / "ten", range(10))
    five = colour_folder(root / "five", [0, 2, 4, 6, 8], seed=1)
    result, lines = invoke("train", *COMMON, "--data-dir", ten, "--epochs", 1, "--out", root / "A")
    assert result.exit_code == 0, result.output
    return root / "A" / "best.safetensors", five, root


def test_fine_tuning_a_frozen_backbone_keeps_it_bit_identical_and_trains_a_new_head(pretrained, tmp_path):
    weights, five, _ = pretrained
    out = tmp_path / "B"
    result, lines = invoke("train", *COMMON, "--data-dir", five, "--epochs", 3, "--out", out, "--init", weights,
                           "--freeze", "backbone")
    assert result.exit_code == 0, result.output
    report = [line for line in lines if line.startswith("--init: ")]
    assert report == [f"--init: loaded 95 of 97 tensors from {weights}; re-initialised fc.weight, fc.bias (the file "
                      "has 10 classes, this network 5)"]
    before = read_weights_file(weights)
    after, description = load_checkpoint(out / "last.safetensors")
    backbone = [name for name in before if not name.startswith("fc.")]
    assert len(backbone) == 95
    assert [name for name in backbone if before[name].tobytes() != after[name].tobytes()] == []  # BN statistics too
    assert after["fc.weight"].shape == (5, 64) and after["fc.bias"].shape == (5,)
    assert not any(name.startswith("optimizer/") and not name.endswith(("fc.weight", "fc.bias")) for name in after)
    assert description["class_names"] == ["colour0", "colour2", "colour4", "colour6", "colour8"]
    assert {key: description["config"][key] for key in ("init", "freeze", "lr_backbone")} == \
        {"init": str(weights), "freeze": "backbone", "lr_backbone": None}
    best = json.loads((out / "summary.json").read_text())["best_test_top1_error"]
    assert best < 0.5  # chance is 0.8 error on five classes


def test_without_freeze_the_backbone_trains_and_a_partial_freeze_holds_only_its_prefix(pretrained, tmp_path):
    weights, five, _ = pretrained
    before = read_weights_file(weights)
    for freeze, held in ((None, set()), ("layer1", {"stem", "layer1"})):
        config = TrainConfig(out=str(tmp_path / f"run-{freeze}"), arch="resnet20", data="folder", data_dir=str(five),
                             data_options={"image_size": 8}, backend="numpy", dtype="float32", batch_size=20, lr=0.05,
                             epochs=1, stop_after_steps=2, init=str(weights), freeze=freeze)
        train(config, progress=Quiet())
        after, _ = load_checkpoint(tmp_path / f"run-{freeze}" / "last.safetensors")
        plan = make_plan(dataclasses.replace(portres.get("resnet20"), num_classes=5))
        for op in plan.ops:
            for name in op.param_shapes():
                if name.startswith("fc."):
                    continue
                unchanged = before[name].tobytes() == after[name].tobytes()
                zero_init = name.endswith("bias") and not before[name].any()  # a BN shift may stay 0 a step or two
                if plan.parts[op.name] in held:
                    assert unchanged, name
                elif not zero_init and op.kind in ("conv2d", "batch_norm"):
                    assert not unchanged, name


@pytest.mark.parametrize("backend", FRAMEWORKS)
def test_frozen_parts_stay_bit_identical_on_every_framework(tmp_path, backend):
    init = tmp_path / "init.safetensors"
    save_weights(init, init_params(TINY, seed=5))
    train(quick(tmp_path, backend=backend, dtype="float32", stop_after_steps=2, init=str(init), freeze="layer1",
                lr_backbone=0.5), progress=Quiet())
    after, _ = load_checkpoint(tmp_path / "run" / "last.safetensors")
    before = read_weights_file(init)
    plan = make_plan(TINY)
    changed = {plan.parts[op.name] for op in plan.ops for name in op.param_shapes()
               if before[name].tobytes() != after[name].tobytes()}
    assert changed == {"layer2", "head"}  # stem and layer1 frozen; layer2 trained at half the rate, fc at full


def test_a_checkpoint_with_optimiser_slots_initialises_a_run(pretrained):
    _, _, root = pretrained
    five = dataclasses.replace(portres.get("resnet20"), num_classes=5)
    params, report = load_weights(root / "A" / "last.safetensors", five, strict=False)
    assert len(report.loaded) == 95 and report.skipped == {} and set(report.reinitialised) == {"fc.weight", "fc.bias"}


def test_resume_keeps_the_transfer_settings(pretrained, tmp_path):
    weights, five, _ = pretrained
    settings = dict(out=str(tmp_path / "run"), arch="resnet20", data="folder", data_dir=str(five),
                    data_options={"image_size": 8}, backend="numpy", dtype="float32", batch_size=20, lr=0.05, epochs=1,
                    init=str(weights), freeze="layer1", lr_backbone=0.5)
    train(TrainConfig(**settings, stop_after_steps=2), progress=Quiet())
    with pytest.raises(CheckpointError, match=r"other settings \(freeze 'layer1' -> 'layer2'\)"):
        train(TrainConfig(**{**settings, "freeze": "layer2"}), resume=True, progress=Quiet())
    summary = train(TrainConfig(**settings), resume=True, progress=Quiet())
    assert summary["finished"] and summary["steps_done"] == 5
    after, _ = load_checkpoint(tmp_path / "run" / "last.safetensors")
    before = read_weights_file(weights)
    assert after["layer1.2.bn2.running_var"].tobytes() == before["layer1.2.bn2.running_var"].tobytes()
    assert after["layer2.0.conv1.weight"].tobytes() != before["layer2.0.conv1.weight"].tobytes()


def test_a_checkpoint_from_before_class_names_transfer_and_stream_settings_still_resumes(tmp_path):
    config = quick(tmp_path, dtype="float32")
    train(quick(tmp_path, dtype="float32", stop_after_steps=3), progress=Quiet())
    path = tmp_path / "run" / "last.safetensors"
    state, description = load_checkpoint(path)
    assert description["class_names"] == [str(digit) for digit in range(10)]
    del description["class_names"]
    for key in ("init", "freeze", "lr_backbone", "stream"):
        del description["config"][key]
    save_weights(path, state, metadata={KEY: json.dumps(description)})
    assert "class_names" not in read_description(path)
    assert train(config, resume=True, progress=Quiet())["finished"]


# -- load_weights(strict=False) ---------------------------------------------------------------------


def test_the_input_conv_is_adapted_as_timm_does():
    weight = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32)
    assert np.allclose(adapt_input_conv(weight, 1), weight[:, 0:1] + weight[:, 1:2] + weight[:, 2:3], rtol=1e-6)
    for channels in (2, 4, 5, 7):
        repeated = np.concatenate([weight] * 3, axis=1)[:, :channels]  # RGB RGB RGB, cut to C
        expected = repeated * (3 / channels)
        adapted = adapt_input_conv(weight, channels)
        assert adapted.shape == (8, channels, 3, 3) and adapted.dtype == np.float32
        assert np.allclose(adapted, expected, rtol=1e-6), channels
    space_to_depth = np.random.default_rng(1).standard_normal((8, 12, 3, 3))  # four RGB triples
    assert np.allclose(adapt_input_conv(space_to_depth, 1), space_to_depth.reshape(8, 4, 3, 3, 3).sum(2))
    with pytest.raises(WeightsError, match="only RGB weights"):
        adapt_input_conv(np.ones((8, 2, 3, 3)), 4)


def test_a_lenient_load_reports_what_it_loaded_adapted_and_reinitialised(tmp_path):
    source = init_params("resnet20", seed=1)
    path = tmp_path / "r20.safetensors"
    save_weights(path, source)
    grey_five = dataclasses.replace(portres.get("resnet20"), num_classes=5, in_channels=1)
    params, report = load_weights(path, grey_five, strict=False, seed=7)
    assert len(report.loaded) == 94 and report.total == 97
    assert report.adapted == {"conv1.weight": "the file has 3 input channels, this network 1"}
    assert report.reinitialised == {"fc.weight": "the file has 10 classes, this network 5",
                                    "fc.bias": "the file has 10 classes, this network 5"}
    assert report.skipped == {}
    assert report.summary() == (f"loaded 94 of 97 tensors from {path}; adapted conv1.weight (the file has 3 input "
                                "channels, this network 1); re-initialised fc.weight, fc.bias (the file has 10 "
                                "classes, this network 5)")
    fresh = init_params(grey_five, seed=7)
    assert np.array_equal(params["fc.weight"], fresh["fc.weight"]) and params["fc.weight"].shape == (5, 64)
    assert np.allclose(params["conv1.weight"], source["conv1.weight"].sum(1, keepdims=True))
    assert all(np.array_equal(params[name], source[name]) for name in report.loaded)
    assert list(params) == list(make_plan(grey_five).param_shapes())
    with pytest.raises(WeightsError, match="fc.weight: shape"):  # strict stays strict
        load_weights(path, grey_five)


def test_a_lenient_load_reads_other_layouts_and_adapts_their_input_conv():
    from portres import interop

    spec = portres.get("keras_resnet50")
    source = init_params(spec, seed=2)
    keras_named = interop.export_weights(source, spec, "keras", "")  # HWIO kernels under Keras' names
    grey = dataclasses.replace(spec, num_classes=5, in_channels=1)
    params, report = load_weights(keras_named, grey, strict=False, layout="auto")
    assert set(report.adapted) == {"conv1.weight"} and set(report.reinitialised) == {"fc.weight", "fc.bias"}
    assert np.allclose(params["conv1.weight"], source["conv1.weight"].sum(1, keepdims=True), rtol=1e-6)
    assert np.array_equal(params["layer4.2.conv3.weight"], source["layer4.2.conv3.weight"])


def test_headless_files_and_headless_networks_load_leniently():
    source = init_params("resnet20", seed=1)
    headless_file = {name: value for name, value in source.items() if not name.startswith("fc.")}
    params, report = load_weights(headless_file, "resnet20", strict=False)
    assert report.reinitialised == {"fc.weight": "the file has no classifier", "fc.bias": "the file has no classifier"}
    assert np.array_equal(params["fc.bias"], init_params("resnet20")["fc.bias"])
    headless = dataclasses.replace(portres.get("resnet20"), num_classes=0)
    params, report = load_weights(source, headless, strict=False)
    skipped = "this network has no classifier"
    assert report.skipped == {"fc.weight": skipped, "fc.bias": skipped}
    assert "fc.weight" not in params and len(report.loaded) == len(params) == 95


@pytest.mark.parametrize("source, spec, message", [
    ("resnet32", "resnet20", "60 tensors not in resnet20 .*looks like resnet32"),
    ("resnet20", "resnet32", "60 tensors missing from the file .*looks like resnet20"),
    ("resnet20", "wide_resnet16_4" if "wide_resnet16_4" in portres.zoo.names() else "resnet18", "expected"),
])
def test_a_file_of_another_network_is_refused_in_one_line(source, spec, message):
    with pytest.raises(WeightsError, match=message) as error:
        load_weights(init_params(source), spec, strict=False)
    assert "\n" not in str(error.value) and "even leniently" in str(error.value)


# -- --lr-backbone --------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", [SGD(momentum=0.9, weight_decay=1e-3), AdamW(weight_decay=0.05)])
def test_the_backbone_learning_rate_is_scaled_in_one_step(optimizer):
    rng = np.random.default_rng(0)
    params = {"conv.weight": rng.standard_normal((2, 3)), "fc.weight": rng.standard_normal((2, 2))}
    grads = {name: rng.standard_normal(value.shape) for name, value in params.items()}
    state = optimizer.init(params)
    lr, factor = 0.1, 0.25
    scaled, _ = optimizer.update(params, grads, state, lr, 1, lr_scale={"conv.weight": factor})
    full, _ = optimizer.update(params, grads, state, lr, 1)
    one = {name: {"conv.weight": factor, "fc.weight": 1.0}[name] * lr for name in params}
    for name, p in params.items():
        g = grads[name]
        if isinstance(optimizer, SGD):  # first step: the momentum buffer is the decayed gradient
            expected = p - one[name] * (g + optimizer.weight_decay * p)
        else:  # first step: m/(sqrt(v)) = sign(g), up to eps; decay decoupled with the group's rate
            m, v = (1 - 0.9) * g / (1 - 0.9), (1 - 0.999) * g * g / (1 - 0.999)
            expected = p * (1 - one[name] * optimizer.weight_decay) - one[name] * m / (np.sqrt(v) + optimizer.eps)
        assert np.allclose(scaled[name], expected, rtol=1e-12, atol=1e-15), name
    assert np.array_equal(scaled["fc.weight"], full["fc.weight"])
    assert not np.allclose(scaled["conv.weight"], full["conv.weight"])


def test_lr_backbone_scales_every_trained_backbone_parameter_and_not_the_classifier(tmp_path):
    """Two one-step runs from the same weights: the backbone's change is the factor times the full-rate one."""
    init = tmp_path / "init.safetensors"
    save_weights(init, init_params(TINY, seed=3))
    changes = {}
    for factor in (None, 0.1):
        out = tmp_path / f"run-{factor}"
        train(quick(tmp_path, name=out.name, stop_after_steps=1, init=str(init), lr_backbone=factor, weight_decay=0.0),
              progress=Quiet())
        after, _ = load_checkpoint(out / "last.safetensors")
        start = read_weights_file(init)
        changes[factor] = {name: after[name].astype(np.float64) - start[name] for name in start}
    plan = make_plan(TINY)
    assert set(learning_rate_scales(plan, 0.1, frozenset())) == \
        {name for name, (_, trainable) in plan.param_shapes().items() if trainable and not name.startswith("fc.")}
    for name, (_, trainable) in plan.param_shapes().items():
        if not trainable:
            continue
        expected = changes[None][name] * (1.0 if name.startswith("fc.") else 0.1)
        assert np.allclose(changes[0.1][name], expected, rtol=1e-9, atol=1e-12), name


# -- bad input: one line, exit status 2, nothing written ---------------------------------------------------


def _corrupt(root):
    path = root / "corrupt.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return path


def _other_network(root):
    path = root / "r32.safetensors"
    save_weights(path, init_params("resnet32"))
    return path


@pytest.mark.parametrize("options, message", [
    (lambda root: ["--init", root / "missing.safetensors"], "missing.safetensors"),
    (lambda root: ["--init", _corrupt(root)], "corrupt.safetensors"),
    (lambda root: ["--init", _other_network(root)], "looks like resnet32"),
    (lambda root: ["--freeze", "layer9"], "--freeze 'layer9' is not a part of resnet20; its parts are stem, layer1, "
                                          "layer2, layer3, backbone"),
    (lambda root: ["--lr-backbone", 0], "lr_backbone=0.0 must be a finite number > 0"),
    (lambda root: ["--lr-backbone", -2], "lr_backbone=-2.0 must be a finite number > 0"),
    (lambda root: ["--freeze", "backbone", "--lr-backbone", 0.1], "the whole backbone is frozen"),
])
def test_bad_transfer_options_are_refused_in_one_line_with_nothing_written(pretrained, tmp_path, options, message):
    _, five, _ = pretrained
    out = tmp_path / "out"
    result, lines = invoke("train", *COMMON, "--data-dir", five, "--epochs", 1, "--out", out, *options(tmp_path))
    assert result.exit_code == 2, result.output
    errors = [line for line in lines if line.startswith("portres: error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert not out.exists()


def test_freeze_parts_come_from_the_plan():
    plan = make_plan("resnet18")
    stem = frozen_parameters(plan, "stem")
    assert stem == {"conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"}
    backbone = frozen_parameters(plan, "backbone")
    assert backbone == set(plan.param_shapes()) - {"fc.weight", "fc.bias"}
    layer2 = frozen_parameters(plan, "layer2")
    assert "layer2.1.bn2.running_var" in layer2 and "layer3.0.conv1.weight" not in layer2
    assert "layer2.0.downsample.0.weight" in layer2


def test_a_trained_run_loads_with_its_class_names_and_predicts_with_its_own_preprocessing(pretrained):
    """portres.load on a run directory: the folder's class names, and photos prepared as training prepared its
    images (squashed to the training size, normalised with the data set's own mean and std) - not the preset's
    CIFAR statistics, which would shift every input."""
    from portres import data as datasets
    from portres.images import preprocess

    weights, _, root = pretrained
    model = portres.load(weights.parent, "numpy")
    dataset = datasets.load("folder", root / "ten", image_size=8)
    assert model.class_names == tuple(dataset.class_names) == tuple(f"colour{k}" for k in range(10))
    config = model.data_config
    assert (config.input_size, config.resize_size, config.channel_order) == (8, None, "RGB")
    np.testing.assert_array_equal(np.float32(config.mean), dataset.mean)
    np.testing.assert_array_equal(np.float32(config.std), dataset.std)
    image = sorted((root / "ten" / "test" / "colour3").glob("*.png"))[0]
    expected = datasets.normalize(dataset.test_images[dataset.test_labels == 3][:1], dataset.mean, dataset.std)
    np.testing.assert_allclose(preprocess([image], config=config), expected, rtol=0, atol=1e-5)
    result, lines = invoke("predict", image, "--weights", weights.parent, "--backend", "numpy", "--json", "--top", 1)
    assert result.exit_code == 0, result.output
    (top,) = json.loads(lines[-1])["top"]
    logits = model(expected)
    assert top["class"] == int(logits.argmax()) and top["label"] == f"colour{top['class']}"


def test_a_tampered_data_record_is_refused_naming_the_field(pretrained, tmp_path):
    weights, _, _ = pretrained
    tensors = read_weights_file(weights)
    description = read_description(weights)
    description["data"]["std"] = [0.0, 1.0, 1.0]
    altered = tmp_path / "altered.safetensors"
    save_weights(altered, tensors, metadata={KEY: json.dumps(description)})
    with pytest.raises(CheckpointError, match="field 'data' must be"):
        read_description(altered)
