"""`.ci/system-deps` (run by `make setup`) installs an OpenCL CPU runtime only where no OpenCL driver is
registered - an ICD file whose library is there, named by path or by bare file name (Debian's pocl.icd names
libpocl.so.2.10.0, which `ldconfig -p` lists only as libpocl.so.2) - and the ICD loader where it is missing.
Faked machines: `ldconfig`, `apt-get`, `id` and `clang` are stand-ins on PATH, the ICD files a temporary
OCL_ICD_VENDORS directory."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "system-deps"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or os.uname().sysname != "Linux",
                                reason="the set-up script's Linux branch")


def stand_in(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(0o755)


def run_setup(tmp_path, icd_lines: dict[str, str], libraries: list[str], files: list[str]) -> list[str]:
    """Run the script on a faked machine; the apt-get install lines it ran."""
    bin_dir, vendors, lib_dir = tmp_path / "bin", tmp_path / "vendors", tmp_path / "lib"
    for directory in (bin_dir, vendors, lib_dir):
        directory.mkdir()
    for name in files:
        (lib_dir / name).touch()
    for name, line in icd_lines.items():
        (vendors / name).write_text(line.replace("LIB", str(lib_dir)) + "\n")
    listed = "".join(f"\t{name} (libc6,x86-64) => {lib_dir}/{name}\\n" for name in libraries)
    stand_in(bin_dir, "ldconfig", f'printf "{len(libraries)} libs found in cache\\n{listed}"')
    calls = tmp_path / "apt-calls"
    stand_in(bin_dir, "apt-get", f'echo "$*" >> {calls}')
    stand_in(bin_dir, "id", "echo 0")
    stand_in(bin_dir, "clang", "exit 0")
    environment = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "OCL_ICD_VENDORS": str(vendors)}
    done = subprocess.run(["bash", str(SCRIPT)], env=environment, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [line for line in (calls.read_text().splitlines() if calls.exists() else []) if " install " in line]


BLAS = ["libopenblas.so.0", "libOpenCL.so.1"]  # OpenBLAS and the OpenCL ICD loader are there


def test_a_driver_named_by_its_bare_versioned_file_name_counts(tmp_path):
    installs = run_setup(tmp_path, {"pocl.icd": "libpocl.so.2.10.0"}, BLAS + ["libpocl.so.2"],
                         ["libpocl.so.2", "libpocl.so.2.10.0"])
    assert installs == []


def test_a_driver_named_by_path_counts(tmp_path):
    assert run_setup(tmp_path, {"intel.icd": "LIB/libintelocl.so"}, BLAS, ["libintelocl.so"]) == []


@pytest.mark.parametrize("icd_lines", [{}, {"pocl.icd": "libpocl.so.2.10.0"}, {"gone.icd": "LIB/libgone.so"}],
                         ids=["no ICD file", "a removed package's ICD file", "a path that is gone"])
def test_without_a_working_driver_pocl_is_installed(tmp_path, icd_lines):
    installs = run_setup(tmp_path, icd_lines, BLAS, [])
    assert len(installs) == 1 and "pocl-opencl-icd" in installs[0].split(), installs
    assert not {"libopenblas0-pthread", "ocl-icd-libopencl1"} & set(installs[0].split())


def test_a_driver_without_the_icd_loader_gets_the_loader(tmp_path):
    installs = run_setup(tmp_path, {"pocl.icd": "libpocl.so.2.10.0"}, ["libopenblas.so.0", "libpocl.so.2"],
                         ["libpocl.so.2.10.0"])
    assert len(installs) == 1 and "ocl-icd-libopencl1" in installs[0].split(), installs
    assert "pocl-opencl-icd" not in installs[0].split()
