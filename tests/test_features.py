"""Backbones: stage outputs on every backend's compiled path, feature_info, the pooled embedding,
headless specs (num_classes=0) and ONNX graphs of the stage outputs (`portres export --features`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from click.testing import CliRunner

import portres
from portres import backends, parity
from portres.cli import main
from portres.plan import make_plan
from portres.spec import SpecError

BACKENDS = backends.available()
FRAMEWORKS = [name for name in BACKENDS if name != "numpy"]


def case(name: str, size: int, batch: int = 2, seed: int = 0):
    spec = portres.get(name)
    params = portres.init_params(spec, seed, randomize_batch_norm=True)  # identity BN would hide a wrong stage
    images = np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)
    return spec, params, images


@pytest.fixture(scope="module")
def resnet20_case():
    spec, params, images = case("resnet20", 32)
    return spec, params, images, portres.build(spec, "numpy", params).values(
        images, [value for _, value in make_plan(spec).features], names=dict(make_plan(spec).features))


class CountingCompile:
    """Wraps a backend's compile: how often it compiled, and how often the compiled functions ran."""

    def __init__(self, backend):
        self.compile, self.compiled, self.calls = backend.compile, 0, 0

    def __call__(self, forward):
        self.compiled += 1
        run = self.compile(forward)

        def counted(params, x):
            self.calls += 1
            return run(params, x)

        return counted


@pytest.mark.parametrize("backend", BACKENDS)
def test_features_equal_the_reference_stage_outputs_through_the_compiled_path(backend, resnet20_case):
    spec, params, images, reference = resnet20_case
    model = portres.build(spec, backend, params)
    counting = CountingCompile(model.backend)
    model.backend.compile = counting  # an instance attribute: this model's backend only
    features = model.features(images)
    assert list(features) == ["stem", "layer1", "layer2", "layer3"]
    for name, value in features.items():
        assert value.shape == reference[name].shape and value.dtype in (np.float32, np.float64)
        assert parity.relative_error(value, reference[name]) < parity.TOLERANCE["float32"], name
    again = model.features(images)  # the same compiled function, not a second trace
    assert counting.compiled == 1 and counting.calls == 2
    assert all(np.array_equal(again[name], features[name]) for name in features)
    some = model.features(images, ["layer3", "layer1"])  # another set of outputs: one more compiled function
    assert list(some) == ["layer3", "layer1"] and counting.compiled == 2
    assert parity.relative_error(some["layer1"], reference["layer1"]) < parity.TOLERANCE["float32"]


@pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx is not installed")
def test_mlx_joins_each_stage_output_across_its_cpu_streams(resnet20_case):
    spec, params, images, reference = resnet20_case
    model = portres.build(spec, "mlx", params, device="cpu", cpu_streams=2)  # one image per stream
    features = model.features(images, ["stem", "layer3"])
    assert features["layer3"].shape == (2, 64, 8, 8)
    for name in features:
        assert parity.relative_error(features[name], reference[name]) < parity.TOLERANCE["float32"], name


@pytest.mark.parametrize("backend", [name for name in BACKENDS if name != "tinygrad"])
def test_features_of_an_imagenet_network_at_64_pixels(backend):
    spec, params, images = case("resnet18", 64, batch=1)
    reference = portres.build(spec, "numpy", params)
    expected = reference.features(images, ["layer2", "layer4"])
    got = portres.build(spec, backend, params).features(images, ("layer2", "layer4"))
    assert got["layer4"].shape == (1, 512, 2, 2) and got["layer2"].shape == (1, 128, 8, 8)
    for name in expected:
        assert parity.relative_error(got[name], expected[name]) < parity.TOLERANCE["float32"], name


def test_features_stop_at_the_last_stage_asked_for():
    plan = make_plan("resnet18")
    cut = plan.truncated([dict(plan.features)["layer2"]])
    assert cut.output == dict(plan.features)["layer2"] and cut.ops[-1].output == cut.output
    assert not any(op.name.startswith(("layer3", "layer4", "fc")) for op in cut.ops)
    assert plan.truncated([plan.output]).ops == plan.ops


def test_a_nan_input_runs_the_exact_variant_there_too():
    spec, params, images = case("resnet20", 32, batch=1)
    images[0, 0, 0, 0] = np.nan
    for backend in BACKENDS:
        features = portres.build(spec, backend, params).features(images, ["stem"])
        assert np.isnan(features["stem"]).any(), backend


def test_unknown_stages_are_refused_with_the_choices():
    model = portres.build("resnet20")
    with pytest.raises(ValueError, match="unknown stage 'layer4' of resnet20: choose from stem, layer1, layer2, lay"):
        model.features(np.zeros((1, 3, 32, 32)), ["layer1", "layer4"])
    with pytest.raises(ValueError, match="none given"):
        model.features(np.zeros((1, 3, 32, 32)), [])
    assert list(model.features(np.zeros((1, 3, 32, 32)), "layer2")) == ["layer2"]  # one name as a string


def test_feature_info_of_resnet50_and_resnet20():
    assert portres.build("resnet50").feature_info == [
        {"name": "stem", "channels": 64, "reduction": 4},
        {"name": "layer1", "channels": 256, "reduction": 4},
        {"name": "layer2", "channels": 512, "reduction": 8},
        {"name": "layer3", "channels": 1024, "reduction": 16},
        {"name": "layer4", "channels": 2048, "reduction": 32},
    ]
    assert make_plan("resnet20").feature_info() == [
        {"name": "stem", "channels": 16, "reduction": 1},
        {"name": "layer1", "channels": 16, "reduction": 1},
        {"name": "layer2", "channels": 32, "reduction": 2},
        {"name": "layer3", "channels": 64, "reduction": 4},
    ]
    # read off the plan: Keras v2 strides the last block of a stage, and its info says the same
    assert [info["reduction"] for info in make_plan("keras_resnet50v2").feature_info()] == [4, 8, 16, 32, 32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_embed_is_the_classifier_input(backend):
    spec, params, images = case("resnet20", 32)
    reference = portres.build(spec, "numpy", params)
    expected = reference.features(images, ["layer3"])["layer3"].mean(axis=(2, 3))
    embedding = portres.build(spec, backend, params).embed(images)
    assert embedding.shape == (2, 64)
    assert parity.relative_error(embedding, expected) < parity.TOLERANCE["float32"]
    if backend == "numpy":  # the logits are the fc of exactly this
        logits = embedding @ params["fc.weight"].T.astype(np.float64) + params["fc.bias"]
        assert parity.relative_error(reference(images), logits) < 1e-12


def test_a_preactivation_embedding_is_after_the_final_norm():
    spec, params, images = case("resnetv2_18", 32, batch=1)
    model = portres.build(spec, "numpy", params)
    logits = model.embed(images) @ params["fc.weight"].T.astype(np.float64) + params["fc.bias"]
    assert parity.relative_error(model(images), logits) < 1e-12


# -- headless specs -----------------------------------------------------------------------------


def headless(name: str):
    return dataclasses.replace(portres.get(name), num_classes=0)


def test_a_headless_spec_has_no_classifier():
    spec = headless("resnet50")
    plan = make_plan(spec)
    assert plan.output == plan.pooled == "avgpool" and not any(op.kind == "linear" for op in plan.ops)
    assert not any(name.startswith("fc.") for name in portres.init_params(spec))
    assert portres.summary(spec).params == portres.summary("resnet50").params - (2048 * 1000 + 1000)
    assert portres.ResNetSpec.from_json(spec.to_json()).num_classes == 0
    with pytest.raises(SpecError, match="num_classes=-1 must be >= 0"):
        dataclasses.replace(spec, num_classes=-1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_headless_model_returns_the_pooled_embedding(backend):
    spec, params, images = case("resnet20", 32)
    head_free = {name: value for name, value in params.items() if not name.startswith("fc.")}
    full = portres.build(spec, "numpy", params)
    model = portres.build(dataclasses.replace(spec, num_classes=0), backend, head_free)
    expected = full.features(images, ["layer3"])["layer3"].mean(axis=(2, 3))
    output = model(images)
    assert output.shape == (2, 64)
    assert parity.relative_error(output, expected) < parity.TOLERANCE["float32"]
    assert parity.relative_error(output, full.embed(images)) < parity.TOLERANCE["float32"]
    assert np.allclose(model.embed(images), output, rtol=1e-5, atol=1e-6)
    assert model.class_names is None


def test_the_classifier_weights_do_not_load_into_a_headless_spec():
    with pytest.raises(portres.WeightsError, match="fc.weight"):
        portres.build(headless("resnet20"), "numpy", portres.init_params("resnet20"))


# -- ONNX graphs of the stage outputs ------------------------------------------------------------


def test_export_features_writes_the_stage_outputs(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    spec, params, images = case("resnet18", 64, batch=2)
    portres.save_weights(tmp_path / "w.safetensors", params)
    path = tmp_path / "backbone.onnx"
    result = CliRunner().invoke(main, ["export", "resnet18", "--weights", str(tmp_path / "w.safetensors"),
                                       "--features", "-o", str(path)])
    assert result.exit_code == 0, result.output
    assert "'layer3' (256 channels, 1/16)" in result.output
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    assert names == ["stem", "layer1", "layer2", "layer3", "layer4"]
    import onnx

    graph = onnx.load(str(path)).graph
    assert not any(init.name.startswith("fc.") for init in graph.initializer)  # the graph stops at layer4
    expected = portres.build(spec, "numpy", params).features(images)
    for name, value in zip(names, session.run(None, {"input": images})):
        assert parity.relative_error(value, expected[name]) < parity.TOLERANCE["float32"], name


def test_export_of_a_headless_spec_says_its_output_width(tmp_path):
    pytest.importorskip("onnx")
    spec_file = tmp_path / "headless.json"
    spec_file.write_text(headless("resnet20").to_json())
    result = CliRunner().invoke(main, ["export", "--spec", str(spec_file), "-o", str(tmp_path / "h.onnx")])
    assert result.exit_code == 0, result.output
    assert "output 'logits': batch x 64" in result.output


def test_torchvision_layer3_and_pooled_outputs_agree():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    spec, params, images = case("resnet50", 64, batch=1)
    net = torchvision.models.resnet50()
    net.load_state_dict({name: torch.from_numpy(value) for name, value in params.items()}, strict=False)
    net.eval()
    with torch.no_grad():
        x = torch.from_numpy(images)
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        layer3 = net.layer3(net.layer2(net.layer1(x)))
        pooled = torch.flatten(net.avgpool(net.layer4(layer3)), 1)
    model = portres.build(spec, "numpy", params)
    assert parity.relative_error(model.features(images, ["layer3"])["layer3"], layer3.numpy()) < 1e-4
    assert parity.relative_error(model.embed(images), pooled.numpy()) < 1e-4
