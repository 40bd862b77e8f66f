"""The command line: output, JSON, and one-line errors with exit status 2."""

import json

import pytest
from click.testing import CliRunner

import portres
from portres import backends
from portres.cli import main

FRAMEWORKS = [name for name in backends.available() if name != "numpy"]


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_help_lists_every_verb():
    result = run("--help")
    assert result.exit_code == 0
    for verb in ("list", "summary", "spec", "backends", "parity", "bench"):
        assert verb in result.output


def test_summary_resnet50_prints_the_issue_numbers():
    result = run("summary", "resnet50")
    assert result.exit_code == 0
    assert "25,557,032 parameters" in result.output and "4.089 GMACs" in result.output
    assert "layer4" in result.output and "2048x7x7" in result.output


def test_summary_json_and_ops_and_input_size():
    data = json.loads(run("summary", "resnet20", "--json").output)
    assert data["params"] == 269_722 and data["input_size"] == [32, 32]
    assert data["ops"][0]["name"] == "conv1"
    assert "layer1.0.conv1" in run("summary", "resnet18", "--ops").output
    assert json.loads(run("summary", "resnet18", "--input-size", "448", "--json").output)["macs"] > 7e9


def test_summary_of_a_custom_spec_file(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(portres.resnet(50, name="mine", groups=32, width_per_group=4).to_json())
    result = run("summary", "--spec", str(path))
    assert result.exit_code == 0 and "25,028,904 parameters" in result.output


def test_list_shows_every_preset_with_counts():
    rows = json.loads(run("list", "--json").output)
    assert [r["name"] for r in rows] == portres.zoo.names()
    assert {r["name"]: r["params"] for r in rows}["resnet56"] == 853_018
    text = run("list").output
    assert "resnext101_64x4d" in text and "83,455,272" in text


def test_spec_prints_round_trippable_json():
    result = run("spec", "resnet50d")
    assert portres.ResNetSpec.from_json(result.output) == portres.get("resnet50d")


@pytest.mark.parametrize("args, message", [
    (["summary", "resnet51"], "unknown preset 'resnet51'; closest: "),
    (["spec", "resnet_50"], "unknown preset 'resnet_50'"),
    (["summary", "--spec", "/nonexistent.json"], "spec file /nonexistent.json does not exist"),
    (["summary", "resnet20", "--input-size", "2"], "input 2x2 is too small for resnet20"),
    (["parity", "--depth", "51"], "unknown depth 51"),
    (["summary", "resnet18", "--input-size", "x"], "Invalid value for '--input-size'"),
    (["frobnicate"], "No such command 'frobnicate'"),
    (["parity", "resnet20", "--backends", "jax"], "unknown backend 'jax'"),
    (["parity", "resnet20", "--backends", ""], "no backend named in ''"),
    (["parity", "resnet20", "--backends", ","], "no backend named in ','"),
    (["parity", "resnet20", "--backends", "numpy", "--dtype", "float16"], "in float64 or float32, not float16"),
    (["parity", "resnet50", "--batch", "100000"], "needs about"),
    (["summary"], "give exactly one of NAME or --spec FILE.json"),
    (["parity"], "give exactly one of NAME, --spec FILE.json or --depth N"),
    (["bench", "--depth", "51"], "other presets by name: --arch NAME"),
])
def test_user_errors_are_one_line_with_status_2(args, message):
    result = run(*args)
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0, result.output
    assert result.output.startswith("portres: error: ") and message in result.output
    assert "Traceback" not in result.output


def test_invalid_spec_file_is_a_user_error(tmp_path):
    path = tmp_path / "bad.json"
    data = portres.get("resnet18").to_dict()
    data["groups"] = 0
    path.write_text(json.dumps(data))
    result = run("summary", "--spec", str(path))
    assert result.exit_code == 2 and "groups=0 must be >= 1" in result.output and str(path) in result.output
    path.write_text("{not json")
    assert "not valid JSON" in run("summary", "--spec", str(path)).output


def test_name_and_spec_together_is_a_usage_error(tmp_path):
    result = run("summary", "resnet18", "--spec", "x.json")
    assert result.exit_code == 2 and "exactly one of" in result.output and result.output.count("\n") == 1


def test_unreadable_spec_file_names_the_file(tmp_path):
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    result = run("summary", "--spec", str(path))
    assert result.exit_code == 2 and f"spec file {path} cannot be read" in result.output


def test_backends_reports_versions_and_blas():
    result = run("backends", "--json")
    report = {r["backend"]: r for r in json.loads(result.output)}
    assert report["numpy"]["available"]
    for name in FRAMEWORKS:
        assert report[name]["available"] and report[name]["framework"].startswith(name)
    if "mlx" in FRAMEWORKS:
        assert report["mlx"]["blas"]


@pytest.mark.skipif(not FRAMEWORKS, reason="no framework backend installed")
def test_parity_command_passes_and_reports_each_backend():
    result = run("parity", "resnet20", "--backends", ",".join(FRAMEWORKS))
    assert result.exit_code == 0, result.output
    for name in FRAMEWORKS:
        assert name in result.output
    records = [json.loads(line) for line in run("parity", "--depth", "20", "--json").output.splitlines()]
    assert {r["backend"] for r in records} == set(FRAMEWORKS) and all(r["passed"] for r in records)


@pytest.mark.skipif("mlx" not in FRAMEWORKS, reason="mlx not installed")
def test_parity_command_fails_and_names_the_op_when_a_primitive_is_broken(monkeypatch):
    module = backends.load("mlx")
    original = module.Backend.relu
    monkeypatch.setattr(module.Backend, "relu", lambda self, x: original(self, x) + 0.01)
    result = run("parity", "resnet20", "--backends", "mlx")
    assert result.exit_code == 1
    assert "FAIL" in result.output and "diverges first at relu (relu)" in result.output


@pytest.mark.skipif("tinygrad" not in FRAMEWORKS, reason="tinygrad not installed")
def test_parity_reports_a_backend_that_cannot_run_as_error():
    result = run("parity", "resnet20", "--backends", "tinygrad", "--dtype", "bfloat16")
    if result.exit_code == 0:
        pytest.skip("this machine's clang compiles bfloat16")
    assert result.exit_code == 2 and "ERROR" in result.output and "could not run" in result.output


def test_messages_only_offer_options_the_verb_has():
    assert "--depth" not in run("summary").output  # summary has no --depth
    assert "--arch" not in run("parity", "--depth", "51").output  # parity takes NAME, not --arch


def test_bare_portres_prints_the_help_without_an_error():
    result = run()
    assert result.exit_code in (0, 2) and "Usage:" in result.output and "error:" not in result.output
    assert "parity" in result.output


def test_a_missing_framework_in_parity_exits_2(monkeypatch):
    monkeypatch.setattr(backends, "unavailable_reason",
                        lambda name, device=None: "torch is not installed: pip install 'portres[torch]'"
                        if name == "torch" else None)
    result = run("parity", "resnet20", "--backends", "torch")
    assert result.exit_code == 2 and "portres[torch]" in result.output and result.output.count("\n") == 1


def _strict_json(line: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(line, parse_constant=refuse)


@pytest.mark.skipif(not FRAMEWORKS, reason="no framework backend installed")
def test_parity_json_is_strict_when_a_backend_returns_nan(monkeypatch):
    backend = FRAMEWORKS[0]
    module = backends.load(backend)
    monkeypatch.setattr(module.Backend, "relu", lambda self, x: x * float("nan"))
    result = run("parity", "resnet20", "--backends", backend, "--json")
    assert result.exit_code == 1
    (record,) = [_strict_json(line) for line in result.stdout.splitlines()]
    assert record["logits_error"] is None and record["passed"] is False


def test_broken_pipe_ends_quietly():
    import subprocess
    import sys

    script = "from portres.cli import main; main(['summary', 'resnet1202', '--ops'])"
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.readline()
    child.stdout.close()  # like `| head -1`
    assert child.wait(timeout=60) == 0
    assert child.stderr.read() == b""
