"""benchmarks/gpu_check.py on a machine without a GPU: its plan, its offline install from carried wheels,
the lines it writes for each result, and (slow) the whole check simulated on the CPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = load_gpu_check()


def run_script(*args: str, timeout: float = 120, **extra_env: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("OUT", "GPU_CHECK_TARGETS")}
    env.update(extra_env)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def make_wheel(folder: Path, name: str) -> Path:
    """A one-module wheel, as pip writes them: the package and its .dist-info (METADATA, WHEEL, RECORD)."""
    path = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    files = {f"{name}/__init__.py": "VALUE = 42\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in files.items():
            wheel.writestr(member, text)
    return path


def test_the_dry_run_plans_every_check_on_every_gpu_target():
    result = run_script("--dry-run")
    assert result.returncode == 0, result.stderr
    plan = result.stdout
    for backend, device in (("torch", "cuda"), ("tinygrad", "CUDA"), ("mlx", "gpu"), ("tinygrad", "NV")):
        for dtype in ("float32", "float16", "bfloat16"):
            assert f"parity resnet50 --backends {backend} --device {device} --dtype {dtype} --json\n" in plan
        assert f"parity resnet20 --backends {backend} --device {device} --dtype float32 --json --grads" in plan
        for batch in (1, 64):
            assert f"bench --backend {backend} --device {device} --arch resnet50 --input-size 224 --batch {batch} " \
                   in plan
        assert f"--device {device} --arch resnet50 --input-size 224 --batch 64 --dtype float32 --warmup 2 " \
               "--iters 10 --json --train" in plan
    assert "SKIP    gradient parity mlx gpu float64 resnet20: MLX's GPU computes no float64" in plan
    assert "float16, bfloat16" in plan and "compares in float32 or float64 only" in plan
    # a step's time cap never exceeds what the 10 minutes allow
    caps = [int(line[1:4]) for line in plan.splitlines() if line.startswith("[")]
    assert caps and max(caps) <= 240


def test_without_a_gpu_it_says_so_and_runs_nothing(tmp_path):
    result = run_script("--site", str(tmp_path / "site"))
    assert result.returncode == 0
    assert "no NVIDIA GPU here" in result.stdout and "--sim" in result.stdout


def test_portres_and_what_is_missing_install_offline_from_the_carried_wheels(tmp_path):
    wheels, site, index = tmp_path / "wheels", tmp_path / "site", tmp_path / "index"
    wheels.mkdir()
    make_wheel(wheels, "gpucheck_probe")
    # a package index that has the module the wheels lack: consulting it at all would install it
    (index / "gpucheck-absent").mkdir(parents=True)
    on_index = make_wheel(index, "gpucheck_absent")
    (index / "gpucheck-absent" / "index.html").write_text(f'<a href="../{on_index.name}">{on_index.name}</a>')
    build_existed = (ROOT / "build").exists()
    result = run_script("--install-only", "--site", str(site), "--wheels", str(wheels),
                        "--require", "gpucheck_probe", "--require", "gpucheck_absent",
                        PIP_INDEX_URL=index.as_uri(), PIP_EXTRA_INDEX_URL="")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"OK      install portres into {site}" in result.stdout
    assert f"OK      install gpucheck_probe from {wheels}" in result.stdout
    assert "SKIP    install gpucheck_absent: not installed and no wheel for it" in result.stdout
    assert not (site / "gpucheck_absent").exists()  # offline: the index was never asked
    assert f"PYTHONPATH={site}" in result.stdout
    # the installed copy is the working tree's, and it runs from the site folder
    probe = subprocess.run([sys.executable, "-c", "import portres, gpucheck_probe; print(portres.__file__, "
                            "gpucheck_probe.VALUE)"], env={**os.environ, "PYTHONPATH": str(site)},
                           capture_output=True, text=True, cwd=tmp_path)
    assert probe.stdout.split() == [str(site / "portres" / "__init__.py"), "42"], probe.stderr
    assert (site / "portres" / "backends" / "base.py").read_text() == (ROOT / "backends" / "base.py").read_text()
    if not build_existed:  # pip builds a local folder in place: the script builds a copy of the tree instead
        assert not (ROOT / "build").exists()
    # a second run starts from an empty folder: what the first installed is gone unless asked for again
    again = run_script("--install-only", "--site", str(site), "--wheels", str(wheels))
    assert again.returncode == 0 and not (site / "gpucheck_probe").exists()


def test_a_site_folder_it_did_not_make_is_left_alone(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = run_script("--install-only", "--site", str(tmp_path))
    assert result.returncode == 2
    assert "did not put there" in result.stdout
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("status, out, err, expected", [
    (0, '{"passed": true, "logits_error": 1e-7, "tolerance": 1e-4, "error": null}', "", "PASS"),
    (1, '{"passed": false, "logits_error": 0.3, "tolerance": 1e-4, "divergence": "layer1.0.conv1", "error": null}',
     "", "FAIL"),
    (2, '{"passed": false, "error": "ValueError: tinygrad device NV is not usable here"}', "", "SKIP"),
    (2, "", "portres: error: backend 'mlx' cannot run: mlx is not installed", "SKIP"),
    (None, "", "", "TIMEOUT"),
    (-11, "", "Segmentation fault", "ERROR"),
])
def test_each_parity_outcome_gets_its_line(status, out, err, expected):
    check = gpu_check.classify_parity("forward parity tinygrad NV float32 resnet50", status, out, err, 60, False)
    assert check.status == expected
    line = check.line()
    assert line.startswith(expected) and "\n" not in line
    if expected == "FAIL":
        assert "3.0e-01" in line and "layer1.0.conv1" in line
    if expected == "SKIP":
        assert "cannot run" in line or "not usable" in line
        assert "portres: error:" not in line


@pytest.mark.parametrize("status, err, expected", [
    (0, "", "BENCH"),
    (2, "portres: error: backend 'tinygrad' cannot run: tinygrad is not installed", "SKIP"),
    (1, "portres: error: tinygrad: RuntimeError: all buffers must be on the same device", "ERROR"),
    (None, "", "TIMEOUT"),
])
def test_each_bench_outcome_gets_its_line_and_only_a_result_a_row(status, err, expected):
    records = []
    out = '{"backend": "torch", "images_per_s": 812.5, "latency_median_s": 0.0788, "first_call_s": 1.5}'
    check = gpu_check.classify_bench("bench torch cuda resnet50 inference batch 64", "torch", status, out, err, 150,
                                     records)
    assert check.status == expected and "portres: error:" not in check.line()
    assert len(records) == (expected == "BENCH")
    if expected == "BENCH":
        assert "812.5 images/s, median 78.8 ms, first call 1.5 s" in check.line()


def test_only_a_numerical_failure_makes_the_exit_status_nonzero():
    make = gpu_check.Check
    assert gpu_check.exit_status([make("PASS", "a"), make("SKIP", "b"), make("TIMEOUT", "c"), make("ERROR", "d")]) == 0
    assert gpu_check.exit_status([make("PASS", "a"), make("FAIL", "b")]) == 1


def test_a_target_that_cannot_run_is_reported_once_then_left_out():
    target = gpu_check.Target("tinygrad", "NV")
    unusable = [sys.executable, "-c", "import sys; print('no NV here', file=sys.stderr); sys.exit(2)"]

    def classify(status, out, err, limit):
        return gpu_check.classify_parity("first", status, out, err, limit, False)

    deadline = gpu_check.Deadline(600)
    first = gpu_check.Step("first", target, unusable, 60, classify).execute(dict(os.environ), deadline)
    assert first.status == "SKIP" and first.detail == "no NV here"
    second = gpu_check.Step("second", target, unusable, 60, classify).execute(dict(os.environ), deadline)
    assert second is None and target.skipped == 1


def test_a_step_past_the_budget_is_skipped_not_started():
    target = gpu_check.Target("torch", "cuda")
    step = gpu_check.Step("late", target, [sys.executable, "-c", "raise SystemExit(1)"], 60, None)
    check = step.execute(dict(os.environ), gpu_check.Deadline(gpu_check.RESERVE_S + 1))
    assert check.status == "SKIP" and "out of time" in check.detail


def test_the_gpu_section_replaces_the_last_one_and_sits_before_the_gpu_note():
    begin, end = gpu_check.BEGIN, gpu_check.END
    document = "# Benchmarks\n\n## resnet50\n| a |\n\n## GPUs\n\n- note\n"
    once = gpu_check.splice(document, f"{begin}\n## GPU check: one\n{end}\n")
    assert once.index("GPU check: one") < once.index("## GPUs") and once.startswith("# Benchmarks\n\n## resnet50")
    twice = gpu_check.splice(once, f"{begin}\n## GPU check: two\n{end}\n")
    assert "GPU check: one" not in twice and twice.count(begin) == 1 and "- note" in twice
    assert gpu_check.splice("# B\n", f"{begin}\nx\n{end}\n").endswith(f"{begin}\nx\n{end}\n")


@pytest.mark.slow
def test_the_whole_check_simulated_on_the_cpu(tmp_path):
    """The GPU run's steps on torch's CPU device at small sizes (~25 s on 2 busy cores), with a target that
    cannot run here (tinygrad NV) reported and left out."""
    output, out_dir = tmp_path / "BENCHMARKS.md", tmp_path / "out"
    output.write_text("# Benchmarks\n\n## GPUs\n\n- none here\n")
    result = run_script("--sim", "--targets", "torch:cpu,tinygrad:NV", "--site", str(tmp_path / "site"),
                        "--output", str(output), "--out-dir", str(out_dir), timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.split("== GPU check summary ==")[1]
    for dtype in ("float32", "float16", "bfloat16"):
        assert f"PASS    forward parity torch cpu {dtype} resnet20" in summary
    assert "PASS    gradient parity torch cpu float32 resnet20" in summary
    assert "PASS    gradient parity torch cpu float64 resnet20" in summary
    assert "SKIP    forward parity tinygrad NV float32 resnet20:" in summary
    assert "SKIP    tinygrad NV: its 7 other checks" in summary
    written = output.read_text()
    assert written.index(gpu_check.BEGIN) < written.index("## GPUs")
    assert "### resnet20 (" in written and "### Training resnet20, 32x32" in written
    assert "| torch | 4 |" in written and "| torch | 1 |" in written
    assert (out_dir / "gpu_check_rows.md").read_text() in written
    assert len((out_dir / "gpu_check_records.jsonl").read_text().splitlines()) == 3


def test_tinygrad_finds_the_nvrtc_of_torchs_cuda_wheels(tmp_path, monkeypatch):
    """torch's CUDA 13 wheels put libnvrtc.so.13 in site-packages/nvidia/cu13/lib, where tinygrad 0.14 does
    not look: the check's environment names it, and tinygrad's own library lookup then finds it."""
    pytest.importorskip("tinygrad")
    site_packages = tmp_path / "site-packages"
    lib, include = site_packages / "nvidia" / "cu13" / "lib", site_packages / "nvidia" / "cu13" / "include"
    lib.mkdir(parents=True)
    include.mkdir()
    for name in ("libnvrtc.so.13", "libnvrtc-builtins.so.13.0", "libnvrtc.so.13.0.88"):
        (lib / name).write_bytes(b"\x7fELF" + bytes(60))  # tinygrad skips files that are not ELF
    (include / "cuda_fp16.h").write_text("// half\n")
    monkeypatch.setattr(gpu_check, "site_packages_dirs", lambda: [site_packages])
    monkeypatch.setattr(gpu_check, "ldconfig", lambda: "")
    monkeypatch.delenv("NVRTC_PATH", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    env, found = gpu_check.cuda_environment()
    assert env["NVRTC_PATH"] == str(lib / "libnvrtc.so.13") and f"NVRTC: {lib / 'libnvrtc.so.13'}" in found
    assert str(lib) in env["LD_LIBRARY_PATH"].split(os.pathsep)
    if not any(Path(h, "cuda_fp16.h").exists() for h in gpu_check.CUDA_HEADER_DIRS):
        assert env["CUDA_PATH"] == str(include.parent)  # tinygrad hands NVRTC -I$CUDA_PATH/include
    lookup = "from tinygrad.runtime.support.c import DLL; print(DLL.findlib('nvrtc', ['nvrtc'], []))"
    for variables in ({"NVRTC_PATH": env["NVRTC_PATH"]}, {"LD_LIBRARY_PATH": env["LD_LIBRARY_PATH"]}):
        clean = {k: v for k, v in os.environ.items() if k not in ("NVRTC_PATH", "LD_LIBRARY_PATH")}
        seen = subprocess.run([sys.executable, "-c", lookup], env={**clean, **variables}, capture_output=True,
                              text=True, timeout=60)
        assert seen.stdout.strip() == str(lib / "libnvrtc.so.13"), (variables, seen.stderr)


def test_the_matrix_names_devices_and_keeps_the_gpu_checks_rows(tmp_path):
    """`make matrix` rewrites BENCHMARKS.md: the GPU check's block survives it, and tinygrad's rows say which
    of its devices ran (CPU or CL), as a GPU's rows do."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import run_matrix
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert run_matrix.backend_and_device("tinygrad@CL") == ("tinygrad", "CL")
    assert run_matrix.backend_and_device("mlx") == ("mlx", None)
    record = {"backend": "tinygrad", "device": "CL", "beam": 2}
    assert run_matrix.row_name(record) == "tinygrad CL (BEAM=2)"
    assert run_matrix.row_name({"backend": "torch", "device": "cpu"}) == "torch"
    assert run_matrix.row_name({"backend": "torch", "device": "cuda"}) == "torch cuda"
    block = f"{run_matrix.GPU_CHECK_BEGIN}\n## H200\n| rows |\n{run_matrix.GPU_CHECK_END}"
    document = f"# Benchmarks\n\n{block}\n## GPUs\n"
    assert run_matrix.gpu_check_block(document) == block + "\n"
    assert run_matrix.gpu_check_block("# Benchmarks\n") == ""
    assert block in run_matrix.report([], [], tmp_path / "no-log.md", run_matrix.gpu_check_block(document))
