"""The bench's mechanics on a tiny spec: fields, sane values, argument errors. Never speed."""

import json
import math

import pytest
from click.testing import CliRunner

import portres
from portres import backends, bench
from portres.cli import main

TINY = portres.ResNetSpec(name="tiny", block="basic", stem=portres.StemSpec(kind="cifar", width=4, max_pool=False),
                          stages=(portres.StageSpec(1, 4, 1), portres.StageSpec(1, 8, 2)), num_classes=3)
RUNNABLE = backends.available()
FIELDS = ("images_per_s", "latency_median_s", "latency_p90_s", "latency_min_s", "first_call_s", "build_s",
          "gflop_per_s", "peak_rss_bytes")


@pytest.fixture
def tiny_spec_file(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(TINY.to_json())
    return str(path)


def invoke(*args):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("backend", RUNNABLE)
def test_bench_json_record_has_every_field_positive_and_finite(tiny_spec_file, backend):
    result = invoke("bench", "--backend", backend, "--spec", tiny_spec_file, "--batch", "2", "--input-size", "16",
                    "--iters", "2", "--warmup", "1", "--json")
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    for field in FIELDS:
        assert math.isfinite(record[field]) and record[field] > 0, field
    assert record["latency_min_s"] <= record["latency_median_s"] <= record["latency_p90_s"]
    assert record["images_per_s"] == pytest.approx(2 / record["latency_median_s"])
    assert record["backend"] == backend and record["batch"] == 2 and record["network"] == "tiny"
    assert record["framework"] and record["cpu_count"] >= 1


def test_bench_table_puts_backends_side_by_side_with_profile(tiny_spec_file):
    result = invoke("bench", "--backend", "all", "--spec", tiny_spec_file, "--batch", "1", "--input-size", "16",
                    "--iters", "1", "--warmup", "0", "--profile")
    assert result.exit_code == 0, result.output
    for backend in RUNNABLE:
        assert f"\n{backend} " in result.stdout
    assert "per-op profile" in result.stdout and "conv2d 3x3" in result.stdout


def test_run_in_subprocess_returns_the_record():
    config = bench.BenchConfig("numpy", TINY.to_dict(), batch=1, input_size=8, warmup=0, iters=1, profile=True)
    record = bench.run_in_subprocess(config)
    assert record["dtype"] == "float64" and record["profile"][0]["seconds"] > 0
    assert abs(sum(p["share"] for p in record["profile"]) - 1) < 1e-9


@pytest.mark.parametrize("args, message", [
    (["--backend", "jax"], "unknown backend 'jax'"),
    (["--depth", "51"], "unknown depth 51: ImageNet ResNets have depth 18/34/50/101/152"),
    (["--batch", "0"], "Invalid value for '--batch': 0 is not in the range x>=1"),
    (["--seed", "-1"], "Invalid value for '--seed'"),
    (["--arch", "resnet18", "--input-size", "16"], "input 16x16 is too small for resnet18"),
    (["--depth", "18", "--arch", "resnet18"], "exactly one of"),
])
def test_bad_arguments_are_one_line_and_status_2(args, message):
    result = invoke("bench", *args)
    assert result.exit_code == 2
    assert result.output.startswith("portres: error: ") and result.output.count("\n") == 1, result.output
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("option", ["--batch", "--iters", "--input-size"])
def test_non_positive_counts_are_rejected(option):
    result = invoke("bench", "--backend", "numpy", option, "0")
    assert result.exit_code == 2 and "0 is not in the range x>=1" in result.output
    assert "--help" in result.output


def test_a_dtype_the_backend_lacks_is_a_user_error(tiny_spec_file):
    result = invoke("bench", "--backend", "numpy", "--spec", tiny_spec_file, "--dtype", "float16",
                    "--input-size", "16", "--iters", "1")
    assert result.exit_code == 2
    assert "numpy: the numpy backend computes in float64 or float32, not 'float16'" in result.output


def test_a_crashed_benchmark_process_is_reported_not_raised(monkeypatch):
    class Killed:
        returncode, stdout = -9, ""

    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: Killed())
    with pytest.raises(bench.BenchError, match="killed by the OS, most likely out of memory: lower --batch"):
        bench.run_in_subprocess(bench.BenchConfig("numpy", TINY.to_dict(), batch=4))


def test_default_batch_per_device():
    assert bench.default_batch(False) == 16 and bench.default_batch(True) == 64
