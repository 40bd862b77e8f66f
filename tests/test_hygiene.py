"""Import hygiene and backend availability messages."""

import subprocess
import sys
from pathlib import Path

import pytest

from portres import backends

FRAMEWORKS = ("mlx", "tinygrad", "torch")
ROOT = Path(__file__).resolve().parents[1]


def python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_import_portres_loads_no_framework():
    out = python("import sys, portres, portres.cli, portres.parity, portres.backends, portres.backends._blas\n"
                 "portres.backends.available()\n"
                 f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}))")
    assert out.strip() == "[]"


def test_building_numpy_models_loads_no_framework():
    out = python("import sys, numpy as np, portres\n"
                 "portres.build('resnet20', 'numpy')(np.zeros((1, 3, 32, 32)))\n"
                 f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}))")
    assert out.strip() == "[]"


def test_a_missing_framework_names_the_pip_extra():
    # make tinygrad look uninstalled: a None entry in sys.modules blocks the import
    code = ("import sys\n"
            "sys.modules['tinygrad'] = None\n"
            "import portres\n"
            "from portres import backends\n"
            "print(backends.unavailable_reason('tinygrad'))\n"
            "print('tinygrad' in backends.available())\n"
            "try:\n    portres.build('resnet20', 'tinygrad')\n"
            "except backends.BackendUnavailable as e:\n    print(e)\n")
    out = python(code).splitlines()
    assert out[0] == "tinygrad is not installed: pip install 'portres[tinygrad]'"
    assert out[1] == "False"
    assert "backend 'tinygrad' cannot run" in out[2] and "portres[tinygrad]" in out[2]


def test_tinygrad_without_clang_says_how_to_fix(monkeypatch):
    monkeypatch.setattr(backends.shutil, "which", lambda name: None)
    monkeypatch.setattr(backends.platform, "system", lambda: "Linux")
    reason = backends.unavailable_reason("tinygrad")
    if reason and "not installed" in reason:
        pytest.skip("tinygrad is not installed")
    assert "clang" in reason and "apt-get install clang" in reason
    assert backends.unavailable_reason("tinygrad", device="CUDA") is None  # only the CPU device needs clang


def test_unknown_backend_is_rejected():
    with pytest.raises(backends.BackendUnavailable, match="unknown backend 'jax'"):
        backends.load("jax")


@pytest.mark.skipif("mlx" not in backends.available(), reason="mlx not installed")
def test_mlx_reports_an_optimized_blas_on_linux():
    import platform

    info = backends.load("mlx").info()
    assert isinstance(info["blas_rejected"], list)
    if platform.system() == "Linux":  # a DYNAMIC_ARCH OpenBLAS comes with portres[mlx] (scipy-openblas32)
        assert info["blas"].startswith("OpenBLAS") and info["blas_core"], (info["blas"], info["blas_rejected"])


def test_choosing_mlx_blas_imports_no_framework_and_loads_nothing_unsafe():
    # selection probes in subprocesses: this process loads no BLAS and no framework while choosing
    out = python("import os, sys, portres.backends._blas as b\n"
                 "s = b.select()\n"
                 f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}))\n"
                 "candidates = {os.path.realpath(c.path) for c in b.candidates()}\n"
                 "mapped = {line.split()[-1] for line in open('/proc/self/maps')} if sys.platform == 'linux' else ()\n"
                 "print(sorted(candidates & set(mapped)))")
    assert out.splitlines() == ["[]", "[]"]


def test_every_backend_implements_every_primitive_the_walker_calls():
    """Read from the source, so a framework that is not installed is checked too; a primitive added
    to the walker but not to one backend fails here, not deep in a parity run."""
    import ast
    import re

    walker = (ROOT / "portres" / "walker.py").read_text()
    called = set(re.findall(r"primitives\.(\w+)\(", walker.split("def apply_op", 1)[1].split("\ndef ", 1)[0]))
    assert called == set(backends.PRIMITIVES), "backends.PRIMITIVES is out of date with apply_op"
    def methods_of(path, class_name):
        tree = ast.parse(path.read_text())
        (cls,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == class_name]
        return cls, {node.name for node in cls.body if isinstance(node, ast.FunctionDef)}

    for name in backends.NAMES:
        backend, methods = methods_of(ROOT / "backends" / f"{name}.py", "Backend")
        if "Forwarding" in {ast.unparse(base) for base in backend.bases}:
            # onnxruntime forwards every primitive through call_primitive to the ONNX graph builder, which
            # implements them (graph nodes, or one-node sessions)
            assert "call_primitive" in methods, f"{name} forwards primitives but defines no call_primitive"
            _, methods = methods_of(ROOT / "portres" / "interop" / "onnx.py", "OnnxGraphBuilder")
        assert set(backends.PRIMITIVES) <= methods, f"{name} lacks {sorted(set(backends.PRIMITIVES) - methods)}"
