"""Choosing MLX's BLAS: every decision with injected CPUs, configs and probes, then real probes in subprocesses."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from portres.backends import _blas
from portres.backends._blas import Candidate, Cpu, Report

AMD_EPYC = Cpu("AMD EPYC", frozenset({"sse4_2", "avx", "avx2", "fma"}))
XEON = Cpu("Intel Xeon Platinum", frozenset({"sse4_2", "avx", "avx2", "fma", "avx512f", "avx512cd", "avx512bw",
                                             "avx512dq", "avx512vl"}))
SKYLAKEX_BUILD = Report(True, config="OpenBLAS 0.3.31 NO_AFFINITY SKYLAKEX MAX_THREADS=4", corename="SKYLAKEX")
ZEN_BUILD = Report(True, config="OpenBLAS 0.3.29 NO_AFFINITY ZEN MAX_THREADS=8", corename="ZEN")
DYNAMIC_BUILD = Report(True, config="OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH NO_AFFINITY Zen MAX_THREADS=64",
                       corename="Zen")
UNKNOWN_CORE_BUILD = Report(True, config="OpenBLAS 0.3.30 NO_AFFINITY RISCV64_ZVL256B MAX_THREADS=8",
                            corename="RISCV64_ZVL256B")


class Fakes:
    """Injected identify/probe/build_shim that answer from tables and count their calls."""

    def __init__(self, identities, probes=None):
        self.identities, self.probes = identities, probes or {}
        self.identified, self.probed, self.shims = [], [], []

    def identify(self, path):
        self.identified.append(path)
        return self.identities[path]

    def probe(self, path, shim):
        self.probed.append((path, shim))
        return self.probes.get(path, Report(True))

    def build_shim(self, prefix, cache_dir):
        self.shims.append(prefix)
        return os.path.join(cache_dir, f"shim-{prefix}.so")

    def select(self, libraries, cpu, cache_dir, sources=None):
        found = [Candidate((sources or {}).get(p, "system"), p) for p in libraries]
        return _blas.select(found, cpu=cpu, identify=self.identify, probe=self.probe, build_shim=self.build_shim,
                            cache_dir=str(cache_dir))


@pytest.fixture
def library(tmp_path):
    """A file standing in for a shared library (only its path, size and mtime matter to the fakes)."""
    def make(name="libopenblas.so.0", content=b"\x7fELF fake"):
        path = tmp_path / "libs" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
        return str(path)
    return make


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def test_a_single_target_avx512_build_is_rejected_on_an_avx2_cpu_without_probing(library, cache):
    path = library()
    fakes = Fakes({path: SKYLAKEX_BUILD})
    selection = fakes.select([path], AMD_EPYC, cache)
    assert selection.path is None and fakes.probed == []
    (rejection,) = selection.rejected
    assert rejection.path == path
    assert rejection.reason == ("single-target SKYLAKEX build needs avx512f, avx512cd, avx512bw, avx512dq, "
                                "avx512vl, which this CPU (AMD EPYC) lacks")


def test_a_dynamic_arch_build_is_accepted_after_its_probe(library, cache):
    path = library()
    fakes = Fakes({path: DYNAMIC_BUILD})
    selection = fakes.select([path], AMD_EPYC, cache)
    assert selection.path == path and fakes.probed == [(path, None)]
    assert selection.corename == "Zen" and selection.version == "0.3.21" and selection.rejected == ()
    assert selection.describe() == f"OpenBLAS 0.3.21, core Zen (DYNAMIC_ARCH), system: {path}"


def test_a_zen_build_runs_on_an_avx512_intel_cpu(library, cache):
    path = library()
    assert Fakes({path: ZEN_BUILD}).select([path], XEON, cache).path == path  # ZEN needs only AVX2 and FMA


def test_an_unknown_core_or_cpu_is_left_to_the_probe(library, cache):
    path = library()
    fakes = Fakes({path: UNKNOWN_CORE_BUILD}, {path: Report(False, "the sgemm probe died with SIGILL")})
    assert fakes.select([path], AMD_EPYC, cache).rejected[0].reason == "the sgemm probe died with SIGILL"
    assert _blas.judge_core(SKYLAKEX_BUILD.config, "SKYLAKEX", Cpu("unknown", None)) is None
    assert _blas.judge_core("OpenBLAS 0.3.31 NO_AFFINITY SKYLAKEX MAX_THREADS=4", None, AMD_EPYC).startswith(
        "single-target SKYLAKEX build")  # the core read from the config when the core name is missing


def test_a_probe_that_dies_with_sigill_is_rejected_and_remembered(library, cache):
    path = library()
    died = Report(False, "the sgemm probe died with SIGILL (illegal instruction)")
    fakes = Fakes({path: UNKNOWN_CORE_BUILD}, {path: died})
    first = fakes.select([path], AMD_EPYC, cache)
    second = fakes.select([path], AMD_EPYC, cache)
    assert first.path is None and "SIGILL" in first.rejected[0].reason
    assert second.rejected == first.rejected
    assert len(fakes.identified) == 1 and len(fakes.probed) == 1  # the second selection read the cache


def test_a_wrong_result_is_rejected(library, cache):
    path = library()
    wrong = Report(False, "cblas_sgemm 67x45 @ 45x83 is wrong: relative error 1 against float64")
    selection = Fakes({path: DYNAMIC_BUILD}, {path: wrong}).select([path], AMD_EPYC, cache)
    assert selection.path is None and "is wrong" in selection.rejected[0].reason


def test_a_changed_library_or_another_cpu_is_probed_again(library, cache):
    path = library()
    fakes = Fakes({path: DYNAMIC_BUILD})
    fakes.select([path], AMD_EPYC, cache)
    fakes.select([path], AMD_EPYC, cache)
    assert len(fakes.probed) == 1
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same size, new mtime
    fakes.select([path], AMD_EPYC, cache)
    assert len(fakes.probed) == 2
    with open(path, "ab") as file:  # new size
        file.write(b"more")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # and the old mtime again
    fakes.select([path], AMD_EPYC, cache)
    assert len(fakes.probed) == 3
    fakes.select([path], XEON, cache)
    assert len(fakes.probed) == 4
    fakes.select([path], Cpu("AMD EPYC", AMD_EPYC.flags | {"avx512f"}), cache)  # same model, other flags
    assert len(fakes.probed) == 5


@pytest.mark.parametrize("garbage", [b"{not json", b"[1, 2]", b"\xff\xfe", b'{"format": 1, "probes": {"k": 3}}',
                                     b'{"format": 1, "probes": {"k": {"accepted": true, "prefix": 7}}}',
                                     b'{"format": 1, "probes": {"[\\"/gone/lib.so\\", 1, 2, \\"cpu\\", \\"\\"]": '
                                     b'{"accepted": true}}}'])  # a library that no longer exists
def test_a_corrupt_cache_is_ignored_and_replaced(library, cache, garbage):
    path = library()
    cache.mkdir()
    (cache / _blas.CACHE_FILE).write_bytes(garbage)
    fakes = Fakes({path: DYNAMIC_BUILD})
    assert fakes.select([path], AMD_EPYC, cache).path == path
    stored = json.loads((cache / _blas.CACHE_FILE).read_text())
    assert [entry["accepted"] for entry in stored["probes"].values()] == [True]
    assert [name for name in os.listdir(cache) if name.startswith(".blas-probes-")] == []  # no temporary left


def test_an_unwritable_cache_only_costs_probing_again(library, tmp_path):
    path = library()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    fakes = Fakes({path: DYNAMIC_BUILD})
    assert fakes.select([path], AMD_EPYC, blocker / "cache").path == path
    assert fakes.select([path], AMD_EPYC, blocker / "cache").path == path
    assert len(fakes.probed) == 2


def test_timeouts_and_load_errors_are_not_remembered(library, cache):
    path = library()
    fakes = Fakes({path: DYNAMIC_BUILD}, {path: Report(False, "the sgemm probe timed out after 60 s", cacheable=False)})
    fakes.select([path], AMD_EPYC, cache)
    fakes.select([path], AMD_EPYC, cache)
    assert len(fakes.probed) == 2  # a busy machine must not condemn a good library for good


def test_the_first_good_candidate_wins_and_those_before_it_say_why_not(library, cache, tmp_path):
    bad, good, later = library("skx.so"), library("dyn.so"), library("later.so")
    missing = str(tmp_path / "gone.so")
    fakes = Fakes({bad: SKYLAKEX_BUILD, good: DYNAMIC_BUILD, later: DYNAMIC_BUILD})
    selection = fakes.select([bad, missing, good, later], AMD_EPYC, cache, sources={bad: "PORTRES_BLAS"})
    assert selection.path == good and later not in fakes.identified
    assert [r.path for r in selection.rejected] == [bad, missing]
    assert selection.rejected_lines()[0].startswith(f"{bad} (PORTRES_BLAS): single-target SKYLAKEX build")
    assert "cannot be read" in selection.rejected[1].reason


def test_a_prefixed_build_gets_the_shim_and_a_missing_compiler_is_reported(library, cache):
    path = library("libscipy_openblas.so")
    prefixed = Report(True, config=DYNAMIC_BUILD.config, corename="Haswell", prefix="scipy_")
    fakes = Fakes({path: prefixed})
    selection = fakes.select([path], AMD_EPYC, cache, sources={path: "scipy-openblas32"})
    assert selection.shim == os.path.join(str(cache), "shim-scipy_.so") and fakes.probed == [(path, selection.shim)]
    assert selection.describe().endswith(f"scipy-openblas32 via a cblas shim: {path}")

    def no_compiler(prefix, cache_dir):
        raise _blas.ShimUnavailable("no C compiler")

    other = library("libscipy_openblas_other.so")
    fakes = Fakes({other: prefixed})
    found = [Candidate("scipy-openblas32", other)]
    for _ in range(2):
        selection = _blas.select(found, cpu=AMD_EPYC, identify=fakes.identify, probe=fakes.probe,
                                 build_shim=no_compiler, cache_dir=str(cache))
        assert selection.path is None and selection.rejected[0].reason == "no C compiler"
    assert len(fakes.identified) == 2  # not remembered: installing clang must help at once


def test_the_fallback_warns_once_with_the_fix(monkeypatch):
    monkeypatch.setattr(_blas, "_warned", False)
    fallback = _blas.Selection(None, rejected=(_blas.Rejection("/x/libopenblas.so.0", "system", "no good"),))
    with pytest.warns(_blas.BundledBlasWarning) as caught:
        _blas.warn_bundled(fallback)
        _blas.warn_bundled(fallback)
    (warning,) = caught
    message = str(warning.message)
    assert "/x/libopenblas.so.0 (system): no good" in message
    assert "apt-get install libopenblas0-pthread" in message and "pip install scipy-openblas32" in message
    assert "PORTRES_BLAS" in message and "PORTRES_BLAS" in fallback.describe()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _blas.warn_bundled(_blas.Selection("/some/lib.so"))  # a chosen library: silence


def test_the_shim_is_compiled_once_and_a_missing_compiler_says_what_to_install(tmp_path, monkeypatch):
    if COMPILER is None:
        pytest.skip("no C compiler")
    shim = _blas.build_shim("scipy_", str(tmp_path))
    assert os.path.isfile(shim) and os.listdir(tmp_path) == [os.path.basename(shim)]  # no work files left
    monkeypatch.setattr(_blas, "c_compiler", lambda: None)
    assert _blas.build_shim("scipy_", str(tmp_path)) == shim  # cached: no compiler needed any more
    with pytest.raises(_blas.ShimUnavailable, match="install clang"):
        _blas.build_shim("other_", str(tmp_path))


def test_cpuinfo_is_read_on_x86_and_arm():
    x86 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t: other\n"
    assert _blas._read_cpuinfo(x86) == Cpu("AMD EPYC", frozenset({"fpu", "sse2", "avx2", "fma"}))
    arm = "processor\t: 0\nFeatures\t: fp asimd atomics sve\nCPU implementer\t: 0x41\nCPU part\t: 0xd40\n"
    cpu = _blas._read_cpuinfo(arm)
    assert cpu.flags == {"fp", "asimd", "atomics", "sve"} and "0xd40" in cpu.model
    assert _blas.judge_core(None, "NEOVERSEV1", cpu) is None
    assert "needs sve2" in _blas.judge_core(None, "NEOVERSEN2", cpu)


def test_portres_blas_comes_first_and_is_kept_even_when_missing(tmp_path):
    found = _blas.candidates({"PORTRES_BLAS": str(tmp_path / "nope.so")})
    assert found[0] == Candidate("PORTRES_BLAS", str(tmp_path / "nope.so"))
    assert len({os.path.realpath(c.path) for c in found}) == len(found)  # the alternatives link counts once


def test_the_cache_lives_where_the_environment_says():
    assert _blas.default_cache_dir({"PORTRES_CACHE_DIR": "/c"}) == "/c"
    assert _blas.default_cache_dir({"XDG_CACHE_HOME": "/x"}) == os.path.join("/x", "portres")


# -- real libraries, real subprocesses --

DEBIAN_OPENBLAS = next((p for p in ("/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
                                    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0") if os.path.exists(p)), None)
COMPILER = _blas.c_compiler()

FAKE_BLAS = textwrap.dedent("""
    #include <signal.h>
    const char *openblas_get_config(void) { return "OpenBLAS 0.0.1 NO_AFFINITY PORTRESTESTCORE MAX_THREADS=1"; }
    const char *openblas_get_corename(void) { return "PORTRESTESTCORE"; }
    void cblas_sgemm(int o, int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
                     const float *b, int ldb, float beta, float *c, int ldc) {
        BODY
    }
""")


def compile_fake_blas(tmp_path, name, body):
    if COMPILER is None:
        pytest.skip("no C compiler")
    source, library = tmp_path / f"{name}.c", tmp_path / f"lib{name}.so"
    source.write_text(FAKE_BLAS.replace("BODY", body))
    subprocess.run([COMPILER, "-shared", "-fPIC", "-o", str(library), str(source)], check=True, capture_output=True)
    return str(library)


@pytest.mark.skipif(DEBIAN_OPENBLAS is None, reason="no Debian/Ubuntu libopenblas0 here")
def test_a_real_dynamic_arch_openblas_passes_its_probe(tmp_path):
    selection = _blas.select([Candidate("system", DEBIAN_OPENBLAS)], cache_dir=str(tmp_path))
    assert selection.path == DEBIAN_OPENBLAS, selection.rejected_lines()
    assert "DYNAMIC_ARCH" in selection.config and selection.corename


def test_a_real_library_that_raises_sigill_is_rejected_by_its_probe(tmp_path):
    library = compile_fake_blas(tmp_path, "sigill", "raise(SIGILL);")
    selection = _blas.select([Candidate("PORTRES_BLAS", library)], cache_dir=str(tmp_path / "cache"))
    assert selection.path is None
    assert "SIGILL" in selection.rejected[0].reason and selection.rejected[0].path == library


def test_a_real_library_that_computes_nothing_is_rejected_as_wrong(tmp_path):
    library = compile_fake_blas(tmp_path, "idle", "(void)c;")
    selection = _blas.select([Candidate("PORTRES_BLAS", library)], cache_dir=str(tmp_path / "cache"))
    assert selection.path is None and "is wrong: relative error" in selection.rejected[0].reason


def test_scipy_openblas32_works_through_a_compiled_shim(tmp_path):
    pytest.importorskip("scipy_openblas32")
    if COMPILER is None:
        pytest.skip("no C compiler")
    (candidate,) = [c for c in _blas.candidates({}) if c.source == "scipy-openblas32"]
    selection = _blas.select([candidate], cache_dir=str(tmp_path))
    assert selection.path == candidate.path, selection.rejected_lines()
    assert selection.prefix == "scipy_" and os.path.dirname(selection.shim) == str(tmp_path)
    # the shim forwards exactly MLX's three imports, and nothing CPU-specific went into it
    symbols = subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({candidate.path!r}, "
                              f"mode=ctypes.RTLD_GLOBAL); s = ctypes.CDLL({selection.shim!r}); "
                              "print([hasattr(s, 'cblas_' + n) for n in ('sgemm', 'dgemm', 'cgemm')])"],
                             capture_output=True, text=True, check=True).stdout
    assert symbols.strip() == "[True, True, True]"


def test_importing_mlx_first_warns_that_no_blas_could_be_loaded_for_it():
    pytest.importorskip("mlx.core")
    if sys.platform != "linux":
        pytest.skip("the BLAS is preloaded on Linux only")
    code = "import warnings; warnings.simplefilter('always')\nimport mlx.core\nimport portres.backends.mlx"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "mlx.core was imported before portres.backends.mlx" in done.stderr
    assert "import portres.backends.mlx (or call portres.build) before importing mlx" in done.stderr
