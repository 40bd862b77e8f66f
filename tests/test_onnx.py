"""ONNX export and the onnxruntime backend: checked graphs, agreement with the float64 reference,
dynamic batch, unfolded BN, NaN, bad input, and a clear message when onnx is missing."""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import portres
from portres import backends, parity
from portres.cli import main
from portres.interop.onnx import OnnxGraphBuilder, export_onnx

REASON = backends.unavailable_reason("onnxruntime")
needs_onnx = pytest.mark.skipif(REASON is not None, reason=str(REASON))
EXPORTED = ["resnet18", "resnet50", "resnext50_32x4d", "resnetv2_18", "resnet50d", "resnet20"]


def session(source):
    import onnxruntime

    data = source if isinstance(source, str) else source.SerializeToString()  # a path or a ModelProto
    return onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])


@functools.cache
def _case(name: str):
    spec = portres.get(name)
    images, params = parity.parity_case(spec, parity.parity_input_size(spec), batch=3, seed=0)
    return spec, images, params, portres.build(spec, "numpy", params)(images)


def case(name: str):
    """3 random images, random weights with calibrated BN statistics, and the float64 logits
    (made once per network; the images are a fresh copy each time)."""
    spec, images, params, logits = _case(name)
    return spec, images.copy(), params, logits


@needs_onnx
@pytest.mark.parametrize("name", EXPORTED)
def test_an_exported_file_passes_the_checker_and_agrees_with_the_reference(tmp_path, name):
    import onnx

    spec, images, params, reference = case(name)
    path = tmp_path / f"{name}.onnx"
    export_onnx(spec, params, path)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert (model.opset_import[0].version, model.ir_version) == (17, 8)
    (graph_input,), (graph_output,) = model.graph.input, model.graph.output
    assert (graph_input.name, graph_output.name) == ("input", "logits")
    assert graph_input.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [d.dim_value for d in graph_output.type.tensor_type.shape.dim][1] == spec.num_classes
    assert not any(node.op_type == "BatchNormalization" for node in model.graph.node)  # folded by default
    runner = session(str(path))
    # one file, two batch sizes: the batch dimension is dynamic
    assert parity.relative_error(runner.run(None, {"input": images})[0], reference) < 1e-4
    assert parity.relative_error(runner.run(None, {"input": images[:1]})[0], reference[:1]) < 1e-4


@needs_onnx
@pytest.mark.parametrize("name", ["resnet18", "resnetv2_18", "resnet20"])
def test_unfolded_batch_norm_exports_batch_normalization_nodes(name):
    spec, images, params, reference = case(name)
    model = export_onnx(spec, params, fold_batch_norm=False)
    norms = sum(node.op_type == "BatchNormalization" for node in model.graph.node)
    assert norms == sum(op.kind == "batch_norm" for op in portres.make_plan(spec).ops) > 0
    assert parity.relative_error(session(model).run(None, {"input": images})[0], reference) < 1e-4


@needs_onnx
def test_graph_names_follow_the_plan():
    model = export_onnx("resnet20")
    initializers = {tensor.name for tensor in model.graph.initializer}
    assert {"conv1.weight", "conv1.bias", "fc.weight", "fc.bias"} <= initializers  # bn1 folded into conv1
    outputs = {output for node in model.graph.node for output in node.output}
    assert {"bn1", "layer1.0.add", "layer2.0.shortcut.pad", "avgpool", "logits"} <= outputs
    option_a = [node.op_type for node in model.graph.node if node.name.startswith("layer2.0.shortcut")]
    assert option_a == ["Slice", "Pad"]


@needs_onnx
@pytest.mark.parametrize("opset", [13, 21])
def test_other_opsets_and_a_pinned_input_size(opset):
    spec, images, params, reference = case("resnet50d")
    model = export_onnx(spec, params, opset=opset, input_size=64)
    assert model.opset_import[0].version == opset
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, 64, 64]
    assert parity.relative_error(session(model).run(None, {"input": images})[0], reference) < 1e-4


@needs_onnx
@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_nan_in_one_image_makes_its_logits_nan_and_leaves_the_others(name):
    spec, images, params, reference = case(name)
    images[0, 1, 3, 4] = np.nan
    logits = session(export_onnx(spec, params)).run(None, {"input": images})[0]
    assert np.isnan(logits[0]).all()
    assert parity.relative_error(logits[1:], reference[1:]) < 1e-4


@needs_onnx
def test_weights_are_loaded_strictly_and_a_failed_export_leaves_the_old_file(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old")
    params = portres.init_params(portres.get("resnet20"))
    del params["fc.bias"]
    with pytest.raises(portres.WeightsError, match="fc.bias"):
        export_onnx("resnet20", params, path)
    assert path.read_bytes() == b"old"
    with pytest.raises(portres.WeightsError, match="cannot write"):
        export_onnx("resnet20", path=tmp_path / "missing" / "model.onnx")
    with pytest.raises(ValueError, match="opset 9 is not supported"):
        export_onnx("resnet20", opset=9)
    with pytest.raises(KeyError, match="resnet21"):
        export_onnx("resnet21")


@needs_onnx
def test_symbolic_values_support_arithmetic():
    builder = OnnxGraphBuilder()
    x = builder.input("input", ["batch", 2])
    y = 2.0 * builder.relu(x) + np.asarray([1.0, -1.0], np.float32) + x * x
    data = np.asarray([[-1.0, 3.0], [2.0, -0.5]], np.float32)
    out = session(builder.finish({"y": y})).run(None, {"input": data})[0]
    np.testing.assert_allclose(out, 2 * np.maximum(data, 0) + [1.0, -1.0] + data * data)


# -- the onnxruntime backend -----------------------------------------------------------------


@needs_onnx
def test_the_backend_agrees_through_the_whole_graph_and_op_by_op():
    spec, images, params, reference = case("resnet50d")
    model = portres.build(spec, "onnxruntime", params)
    assert model.backend.name == "onnxruntime" and "onnxruntime" in backends.available()
    assert parity.relative_error(model(images), reference) < 1e-4
    ref_features = portres.build(spec, "numpy", params).features(images)
    stages = dict(model.plan.features)
    by_op = model.values(images, list(stages.values()), names=stages)  # op by op, one-node sessions
    features = model.features(images)  # the compiled graph with the stage outputs
    assert set(features) == set(by_op) == set(ref_features)
    for key in features:
        assert parity.relative_error(features[key], ref_features[key]) < 1e-4, key
        assert parity.relative_error(by_op[key], ref_features[key]) < 1e-4, key
    # one session per primitive and attribute set, not one per op
    assert 0 < len(model.backend._op_sessions) < len(model.plan.ops) / 3


@needs_onnx
def test_max_pool_with_nan_and_minus_inf_windows_matches_the_reference():
    from portres.backends.numpy import Backend as Reference

    x = np.random.default_rng(0).standard_normal((1, 2, 6, 6)).astype(np.float32)
    x[0, 0, 1, 1] = np.nan
    x[0, 1, :3, :3] = -np.inf  # a window of only -inf
    x[0, 1, 4, 4] = np.inf
    exact = portres.build("resnet18", "onnxruntime").backend.for_nonfinite_input()
    expected = Reference().max_pool(x.astype(np.float64), 3, 2, 1)
    assert parity.relative_error(exact.max_pool(x, 3, 2, 1), expected) == 0.0
    # the whole graph with that spelling is valid ONNX too
    import onnx

    from portres.interop.onnx import trace_plan

    plan, params = portres.fold_batch_norm(portres.make_plan("resnet18"), portres.init_params("resnet18"))
    onnx.checker.check_model(trace_plan(plan, params, nan_exact=True), full_check=True)


@needs_onnx
def test_bfloat16_is_refused_and_float16_runs():
    with pytest.raises(ValueError, match="cannot compute in bfloat16"):
        portres.build("resnet20", "onnxruntime", dtype="bfloat16")
    spec, images, params, reference = case("resnet20")
    model = portres.build(spec, "onnxruntime", params, dtype="float16")
    assert parity.relative_error(model(images), reference) < 2e-2


@needs_onnx
def test_devices_and_info():
    module = backends.load("onnxruntime")
    assert "cpu" in module.devices()
    assert "CPUExecutionProvider" in module.info()["execution_providers"]
    with pytest.raises(ValueError, match="onnxruntime devices are cpu, cuda"):
        portres.build("resnet20", "onnxruntime", device="metal")


# -- the command line ----------------------------------------------------------------------------


def run(*args):
    return CliRunner().invoke(main, list(args))


@needs_onnx
def test_cli_export_writes_a_checked_file_from_a_weights_file(tmp_path):
    spec, images, params, reference = case("resnet20")
    weights = tmp_path / "resnet20.safetensors"
    portres.save_weights(weights, params)
    out = tmp_path / "resnet20.onnx"
    result = run("export", "resnet20", "--weights", str(weights), "--format", "onnx", "-o", str(out), "--no-fold")
    assert result.exit_code == 0, result.output
    assert "check_model(full_check=True): ok" in result.stdout and "BatchNormalization 19" in result.stdout
    assert "seeded" not in result.output
    assert parity.relative_error(session(str(out)).run(None, {"input": images})[0], reference) < 1e-4


@needs_onnx
def test_cli_export_without_weights_says_they_are_random(tmp_path):
    spec_file = tmp_path / "mine.json"
    spec_file.write_text(dataclasses.replace(portres.get("resnet20"), name="mine").to_json())
    result = run("export", "--spec", str(spec_file), "-o", str(tmp_path / "mine.onnx"), "--opset", "21")
    assert result.exit_code == 0, result.output
    assert "opset 21" in result.stdout and "seeded random weights (seed 0)" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["export", "resnet20", "-o", "/nonexistent-dir/x.onnx"], "cannot write /nonexistent-dir/x.onnx"),
    (["export", "resnet20", "--weights", "/nonexistent.safetensors"], "weights file /nonexistent.safetensors"),
    (["export", "resnet20", "--format", "tflite"], "'tflite' is not 'onnx'"),
    (["export", "resnet20", "--opset", "7"], "7 is not in the range 13<=x<=21"),
    (["export", "resnet50", "--input-size", "16"], "at least 32 pixels"),
    (["export"], "give exactly one of NAME or --spec FILE.json"),
])
def test_cli_export_user_errors_are_one_line_and_status_2(args, message):
    if REASON is not None and "cannot write" in message:
        pytest.skip(REASON)
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1


# -- without onnx ------------------------------------------------------------------------------------


def python(code: str) -> list[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()


def test_without_onnx_export_and_the_backend_name_the_extra(tmp_path):
    out = python("import sys\n"
                 "sys.modules['onnx'] = None\n"  # blocks the import, as if onnx were not installed
                 "import portres\n"
                 "from portres import backends\n"
                 "from portres.interop.onnx import export_onnx, OnnxUnavailable\n"
                 "print(backends.unavailable_reason('onnxruntime'))\n"
                 "try:\n    export_onnx('resnet20')\n"
                 "except OnnxUnavailable as e:\n    print(e)\n"
                 "from click.testing import CliRunner\n"
                 "from portres.cli import main\n"
                 f"r = CliRunner().invoke(main, ['export', 'resnet20', '-o', {str(tmp_path / 'x.onnx')!r}])\n"
                 "print(r.exit_code, r.output.strip())\n")
    assert "pip install 'portres[onnx]'" in out[0]
    assert out[1].startswith("ONNX export needs the onnx package: pip install 'portres[onnx]'")
    assert out[2].startswith("2 portres: error: ONNX export needs the onnx package")
    assert not (tmp_path / "x.onnx").exists()


def test_without_onnxruntime_the_backend_is_unavailable_with_the_extra():
    out = python("import sys\n"
                 "sys.modules['onnxruntime'] = None\n"
                 "import portres\n"
                 "from portres import backends\n"
                 "print(backends.unavailable_reason('onnxruntime'))\n"
                 "print('onnxruntime' in backends.available())\n")
    assert out == ["onnxruntime is not installed: pip install 'portres[onnx]'", "False"]


def test_importing_portres_and_its_cli_loads_neither_onnx_nor_onnxruntime():
    out = python("import sys, portres, portres.cli, portres.interop.onnx, portres.backends\n"
                 "portres.backends.available()\n"
                 "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime')))")
    assert out == ["[]"]
