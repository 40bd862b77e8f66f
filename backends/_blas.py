"""Choosing the BLAS that MLX's Linux CPU build calls, without ever crashing on it.

MLX's Linux CPU wheel links the reference (netlib) BLAS, ~50x slower than an optimized
one, and resolves its ``cblas_*`` symbols through the global scope: a BLAS loaded with
``RTLD_GLOBAL`` before ``mlx.core`` wins. A wrong choice is not slow but fatal: a
single-target OpenBLAS built for AVX-512 (every ``cmeel-openblas`` release is
single-target) dies with SIGILL on a CPU without AVX-512, taking the process along.
So every candidate is judged before this process loads it:

1. it is identified in a subprocess (``openblas_get_config`` / ``openblas_get_corename``);
2. a single-target build whose core needs CPU flags this CPU lacks is rejected
   (:data:`CORE_FLAGS`); ``DYNAMIC_ARCH`` builds pick their kernels at run time;
3. a small ``cblas_sgemm`` runs in a subprocess and is checked against NumPy in float64.

Verdicts are cached per (library file, CPU) in ``blas-probes.json`` under
``$PORTRES_CACHE_DIR`` (default ``${XDG_CACHE_HOME:-~/.cache}/portres``), so an unknown
bad library costs one failed probe, once. Delete that file to probe again.

Candidates, in order of preference (:func:`candidates`): ``$PORTRES_BLAS`` (the user's
choice, still checked), ``scipy-openblas32`` (pip; ``DYNAMIC_ARCH``; its symbols carry a
``scipy_`` prefix, so a three-function forwarding library, compiled once here with the
machine's C compiler, gives MLX the ``cblas_*gemm`` names it imports), the system
OpenBLAS (Debian/Ubuntu ``libopenblas0-pthread`` is ``DYNAMIC_ARCH``; older distributions
ship whatever they ship, so it is judged like the rest), and ``cmeel-openblas``.

This module imports no framework (only the standard library; NumPy runs in the probe).

    >>> from portres.backends import _blas
    >>> selection = _blas.select()          # doctest: +SKIP
    >>> selection.describe()                # doctest: +SKIP
    'OpenBLAS 0.3.34, core Zen (DYNAMIC_ARCH), scipy-openblas32 via a cblas shim: /.../libscipy_openblas.so'
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# Bumped whenever the probe or the judgement changes, so old cached verdicts are not trusted.
PROBE_VERSION = 1
IDENTIFY_TIMEOUT_S = 30.0  # loading a library and reading two strings
PROBE_TIMEOUT_S = 60.0  # plus importing NumPy and two small sgemms, on a possibly busy machine
CACHE_FILE = "blas-probes.json"
FIX = ("install a DYNAMIC_ARCH OpenBLAS (Debian/Ubuntu: sudo apt-get install libopenblas0-pthread), "
       "or pip install scipy-openblas32 (needs a C compiler: clang or cc), "
       "or point PORTRES_BLAS at a working libopenblas.so")

_AVX512_SKYLAKE = ("avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")
_AVX512_COOPERLAKE = (*_AVX512_SKYLAKE, "avx512_bf16")

# OpenBLAS core (TARGET) -> CPU flags its kernels and compiler flags (-march/-mavx2...) assume,
# as /proc/cpuinfo names them ("flags" on x86, "Features" on Arm). Only single-target builds
# are judged by it; a core missing here is left to the probe.
CORE_FLAGS: dict[str, tuple[str, ...]] = {
    # x86-64
    "PRESCOTT": ("pni",),
    "CORE2": ("ssse3",),
    "ATOM": ("ssse3",),
    "PENRYN": ("ssse3", "sse4_1"),
    "DUNNINGTON": ("ssse3", "sse4_1"),
    "NEHALEM": ("ssse3", "sse4_1", "sse4_2"),
    "SANDYBRIDGE": ("sse4_2", "avx"),
    "HASWELL": ("avx", "avx2", "fma"),
    "ZEN": ("avx", "avx2", "fma"),
    "SKYLAKEX": _AVX512_SKYLAKE,
    "COOPERLAKE": _AVX512_COOPERLAKE,
    "SAPPHIRERAPIDS": (*_AVX512_COOPERLAKE, "avx512_fp16", "amx_tile", "amx_bf16"),
    "BARCELONA": ("pni", "sse4a"),
    "BULLDOZER": ("avx", "fma4", "xop"),
    "PILEDRIVER": ("avx", "fma", "fma4"),
    "STEAMROLLER": ("avx", "fma"),
    "EXCAVATOR": ("avx", "avx2", "fma"),
    # aarch64
    "ARMV8": ("asimd",),
    "CORTEXA53": ("asimd",),
    "CORTEXA57": ("asimd",),
    "CORTEXA72": ("asimd",),
    "CORTEXA73": ("asimd",),
    "THUNDERX2T99": ("asimd", "atomics"),
    "NEOVERSEN1": ("asimd", "atomics"),
    "NEOVERSEV1": ("asimd", "atomics", "sve"),
    "NEOVERSEN2": ("asimd", "atomics", "sve", "sve2"),
    "NEOVERSEV2": ("asimd", "atomics", "sve", "sve2"),
    "ARMV8SVE": ("asimd", "sve"),
    "A64FX": ("asimd", "sve"),
    "ARMV9SME": ("asimd", "sve", "sve2", "sme"),
}

_SIGNAL_MEANING = {
    "SIGILL": "illegal instruction: the library uses instructions this CPU lacks",
    "SIGSEGV": "segmentation fault",
    "SIGBUS": "bus error",
    "SIGABRT": "aborted",
    "SIGFPE": "arithmetic exception",
}


class BundledBlasWarning(RuntimeWarning):
    """MLX falls back to its bundled reference BLAS (about 50x slower); the message says how to fix it."""


class ShimUnavailable(RuntimeError):
    """The forwarding library for a prefixed OpenBLAS cannot be built here; the message says why."""


# -- the CPU --


@dataclass(frozen=True)
class Cpu:
    model: str  # human-readable CPU name, for messages ("AMD EPYC")
    flags: frozenset[str] | None  # instruction-set flags as /proc/cpuinfo names them; None when unknown

    @property
    def identity(self) -> str:
        """Cache key part: the model plus a hash of the flags (a VM can hide flags of the same model)."""
        digest = hashlib.sha256(" ".join(sorted(self.flags or ())).encode()).hexdigest()[:16]
        return f"{self.model} [{digest}]"


def _read_cpuinfo(text: str) -> Cpu:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block describes them all
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    flags = fields.get("flags", fields.get("features"))
    model = fields.get("model name") or fields.get("hardware") or (
        f"{platform.machine()} implementer {fields['cpu implementer']} part {fields['cpu part']}"
        if "cpu implementer" in fields and "cpu part" in fields else platform.processor() or platform.machine())
    return Cpu(model, frozenset(flags.split()) if flags is not None else None)


_DARWIN_FLAG_NAMES = {"avx1.0": "avx", "sse3": "pni", "sse4.1": "sse4_1", "sse4.2": "sse4_2"}


def cpu_info() -> Cpu:
    """This machine's CPU: model and flags, from /proc/cpuinfo (Linux) or sysctl (macOS, Intel).

        >>> "avx2" in cpu_info().flags   # doctest: +SKIP
        True
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
            return _read_cpuinfo(file.read())
    except OSError:
        pass
    if platform.system() == "Darwin":
        def sysctl(name):
            try:
                return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.SubprocessError):
                return ""
        words = (sysctl("machdep.cpu.features") + " " + sysctl("machdep.cpu.leaf7_features")).lower().split()
        flags = frozenset(_DARWIN_FLAG_NAMES.get(word, word) for word in words)
        return Cpu(sysctl("machdep.cpu.brand_string").strip() or platform.machine(), flags or None)
    return Cpu(platform.processor() or platform.machine(), None)


# -- candidates --


@dataclass(frozen=True)
class Candidate:
    source: str  # where it was found, for messages: "PORTRES_BLAS", "scipy-openblas32", "system", "cmeel-openblas"
    path: str  # the shared library MLX would call


def _system_paths() -> list[str]:
    triplets = dict.fromkeys(t for t in (sysconfig.get_config_var("MULTIARCH"), f"{platform.machine()}-linux-gnu") if t)
    paths = []
    for triplet in triplets:  # Debian/Ubuntu: an alternatives link, then each threading flavour
        paths += [f"/usr/lib/{triplet}/libopenblas.so.0"]
        paths += [f"/usr/lib/{triplet}/openblas-{kind}/libopenblas.so.0" for kind in ("pthread", "openmp", "serial")]
    paths += ["/usr/lib64/libopenblasp.so.0", "/usr/lib64/libopenblas.so.0",  # Fedora/RHEL (p: pthreads)
              "/usr/lib/libopenblas.so.0", "/usr/local/lib/libopenblas.so.0"]
    found = ctypes.util.find_library("openblas")  # a bare file name on Linux: look for it in the usual places
    if found:
        directories = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d]
        directories += [os.path.dirname(p) for p in paths]
        paths += [found] if os.sep in found else [os.path.join(d, found) for d in directories]
    return paths


def _scipy_openblas_path() -> str | None:
    spec = importlib.util.find_spec("scipy_openblas32")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    libraries = sorted(Path(list(spec.submodule_search_locations)[0], "lib").glob("libscipy_openblas*.so"))
    return str(libraries[0]) if libraries else None


def _cmeel_openblas_path() -> str | None:
    try:
        return str(importlib.metadata.distribution("cmeel-openblas").locate_file("cmeel.prefix/lib/libopenblas.so.0"))
    except importlib.metadata.PackageNotFoundError:
        return None


def candidates(environ: Mapping[str, str] | None = None) -> list[Candidate]:
    """Libraries to try, best first; files that do not exist are left out (except $PORTRES_BLAS).

        >>> [c.source for c in candidates()]   # doctest: +SKIP
        ['scipy-openblas32', 'system', 'cmeel-openblas']
    """
    environ = os.environ if environ is None else environ
    found = []
    if environ.get("PORTRES_BLAS"):
        found.append(Candidate("PORTRES_BLAS", environ["PORTRES_BLAS"]))
    scipy_openblas = _scipy_openblas_path()
    if scipy_openblas:
        found.append(Candidate("scipy-openblas32", scipy_openblas))
    found += [Candidate("system", path) for path in _system_paths() if os.path.isfile(path)]
    cmeel = _cmeel_openblas_path()
    if cmeel and os.path.isfile(cmeel):
        found.append(Candidate("cmeel-openblas", cmeel))
    unique: dict[str, Candidate] = {}
    for candidate in found:  # the alternatives link and its target are one library
        key = os.path.realpath(candidate.path) if os.path.exists(candidate.path) else candidate.path
        unique.setdefault(key, candidate)
    return list(unique.values())


# -- the judgement of a core --


def judge_core(config: str | None, corename: str | None, cpu: Cpu) -> str | None:
    """Why this build cannot run on ``cpu``, or None when it can (or only a probe can tell).

        >>> judge_core("OpenBLAS 0.3.21 HASWELL MAX_THREADS=8", "HASWELL", Cpu("Xeon E5-2670", frozenset({"avx"})))
        'single-target HASWELL build needs avx2, fma, which this CPU (Xeon E5-2670) lacks'
    """
    words = (config or "").split()
    if "DYNAMIC_ARCH" in words:
        return None  # picks its kernels from the CPU at run time
    core = (corename or "").strip().upper()
    if core not in CORE_FLAGS:
        core = next((w.upper() for w in words if w.upper() in CORE_FLAGS), core)
    needs = CORE_FLAGS.get(core)
    if needs is None or cpu.flags is None:
        return None  # unknown core or unknown CPU: the probe decides
    missing = [flag for flag in needs if flag not in cpu.flags]
    if not missing:
        return None
    return f"single-target {core} build needs {', '.join(missing)}, which this CPU ({cpu.model}) lacks"


# -- probing in a subprocess --


@dataclass(frozen=True)
class Report:
    ok: bool  # the step succeeded: the library was identified, or its sgemm was right
    reason: str = ""  # why not, when not ok
    config: str | None = None  # openblas_get_config(), None when not OpenBLAS
    corename: str | None = None  # openblas_get_corename(), None when not OpenBLAS
    prefix: str = ""  # prefix of its exported names: "" (cblas_sgemm) or "scipy_" (scipy-openblas32)
    cacheable: bool = True  # False when the outcome depends on the environment (load errors, timeouts)


# Runs in a child: argv = mode ("identify" or "sgemm"), library, shim ("" for none). Prints one JSON line.
_CHILD = r"""
import ctypes, json, sys
mode, path, shim = sys.argv[1], sys.argv[2], sys.argv[3]
def report(**fields):
    print(json.dumps(fields), flush=True)
    sys.exit(0)
try:
    library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)  # as MLX will see it
except OSError as error:
    report(ok=False, reason=f"cannot be loaded: {error}", cacheable=False)
prefix = next((p for p in ("", "scipy_") if hasattr(library, p + "cblas_sgemm")), None)
if prefix is None:
    report(ok=False, reason="exports no cblas_sgemm (nor scipy_cblas_sgemm)")
def text(name):
    function = getattr(library, prefix + name, None)
    if function is None:
        return None
    function.restype = ctypes.c_char_p
    return function().decode(errors="replace").strip()
config, corename = text("openblas_get_config"), text("openblas_get_corename")
if mode == "identify":
    report(ok=True, config=config, corename=corename, prefix=prefix)
import numpy as np
sgemm = (ctypes.CDLL(shim, mode=ctypes.RTLD_GLOBAL) if shim else library).cblas_sgemm
sgemm.restype = None
sgemm.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                       ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
rng = np.random.default_rng(0)
# odd sizes reach the edge kernels; 256^2 with a transposed B, alpha and beta reaches the main ones
for m, k, n, transposed, alpha, beta in ((67, 45, 83, False, 1.0, 0.0), (256, 256, 256, True, 0.5, 1.0)):
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((n, k) if transposed else (k, n), dtype=np.float32)
    c = rng.standard_normal((m, n), dtype=np.float32)
    expected = alpha * (a.astype(np.float64) @ (b.T if transposed else b).astype(np.float64)) + beta * c
    sgemm(ROW_MAJOR, NO_TRANS, TRANS if transposed else NO_TRANS, m, n, k, alpha, a.ctypes.data, k,
          b.ctypes.data, k if transposed else n, beta, c.ctypes.data, n)
    error = float(np.linalg.norm(c - expected) / np.linalg.norm(expected))
    if not error < 1e-4:  # NaN fails too
        report(ok=False, reason=f"cblas_sgemm {m}x{k} @ {k}x{n} is wrong: relative error {error:.3g} against float64",
               config=config, corename=corename, prefix=prefix)
report(ok=True, config=config, corename=corename, prefix=prefix)
"""


def _run_child(mode: str, path: str, shim: str | None, timeout: float) -> Report:
    command = [sys.executable, "-c", _CHILD, mode, path, shim or ""]
    try:  # cwd: a neutral directory, so no stray numpy.py shadows NumPy in the child
        done = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=timeout,
                              cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired:
        return Report(False, f"the {mode} probe timed out after {timeout:.0f} s", cacheable=False)
    except OSError as error:
        return Report(False, f"the {mode} probe could not start: {error}", cacheable=False)
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        meaning = _SIGNAL_MEANING.get(name)
        return Report(False, f"the {mode} probe died with {name}" + (f" ({meaning})" if meaning else ""))
    lines = done.stdout.strip().splitlines()
    try:
        fields = json.loads(lines[-1])
        return Report(bool(fields["ok"]), str(fields.get("reason", "")), fields.get("config"),
                      fields.get("corename"), str(fields.get("prefix") or ""), bool(fields.get("cacheable", True)))
    except (IndexError, ValueError, KeyError, TypeError):
        detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Report(False, f"the {mode} probe failed (exit status {done.returncode}): {detail}", cacheable=False)


def identify(path: str) -> Report:
    """Load ``path`` in a subprocess and read its OpenBLAS config, core name and symbol prefix."""
    return _run_child("identify", path, None, IDENTIFY_TIMEOUT_S)


def probe(path: str, shim: str | None) -> Report:
    """Run two small ``cblas_sgemm`` in a subprocess (through ``shim`` when given) and check them in float64."""
    return _run_child("sgemm", path, shim, PROBE_TIMEOUT_S)


# -- the forwarding shim for prefixed exports (scipy-openblas32) --

_GEMMS = {  # MLX's Linux CPU library imports exactly these three cblas functions; name -> type of alpha and beta
    "sgemm": "float",
    "dgemm": "double",
    "cgemm": "const void *",  # complex scalars are passed by pointer
}


def shim_source(prefix: str) -> str:
    """C source of a library defining ``cblas_?gemm`` as calls of ``<prefix>cblas_?gemm``."""
    lines = [f"/* portres: forwards the cblas gemm entry points MLX imports to {prefix}cblas_*gemm. */"]
    for name, scalar in _GEMMS.items():
        element = "void" if scalar.endswith("*") else scalar
        parameters = (f"int order, int trans_a, int trans_b, int m, int n, int k, {scalar} alpha, "
                      f"const {element} *a, int lda, const {element} *b, int ldb, {scalar} beta, "
                      f"{element} *c, int ldc")
        arguments = "order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc"
        lines += [f"extern void {prefix}cblas_{name}({parameters});",
                  f"void cblas_{name}({parameters}) {{ {prefix}cblas_{name}({arguments}); }}"]
    return "\n".join(lines) + "\n"


def c_compiler() -> str | None:
    """The C compiler used for the shim: $CC, clang (which tinygrad needs anyway), cc, gcc."""
    for name in (os.environ.get("CC"), "clang", "cc", "gcc"):
        found = name and shutil.which(name)
        if found:
            return found
    return None


def build_shim(prefix: str, cache_dir: str) -> str:
    """Compile (once, cached by source hash) the forwarding library for ``prefix``; return its path.

    No -march flag: the shim holds three tail calls and nothing CPU-specific.

        >>> build_shim("scipy_", default_cache_dir())   # doctest: +SKIP
        '/home/me/.cache/portres/cblas-shim-scipy-1f2e3d4c5b6a.so'
    """
    source = shim_source(prefix)
    name = f"cblas-shim-{prefix.strip('_') or 'none'}-{hashlib.sha256(source.encode()).hexdigest()[:12]}.so"
    target = os.path.join(cache_dir, name)
    if os.path.isfile(target):
        return target
    compiler = c_compiler()
    if compiler is None:
        raise ShimUnavailable(f"it exports {prefix}-prefixed names, and the forwarding shim MLX needs is built with "
                              "a C compiler, of which none is on PATH (install clang or set CC)")
    try:
        return _compile_shim(compiler, source, cache_dir, name)
    except OSError as error:  # a full disk, a vanished directory: no shim, no crash
        raise ShimUnavailable(f"building the forwarding shim failed: {error}") from None


def _compile_shim(compiler: str, source: str, cache_dir: str, name: str) -> str:
    target = os.path.join(cache_dir, name)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        work = tempfile.mkdtemp(dir=cache_dir)
    except OSError:  # an unwritable cache: build one for this process only
        work = tempfile.mkdtemp()
        target = os.path.join(work, name)
    source_path, output = os.path.join(work, "shim.c"), os.path.join(work, name)
    try:
        Path(source_path).write_text(source)
        try:
            done = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", output, source_path],
                                  capture_output=True, text=True, errors="replace", timeout=120)
        except subprocess.SubprocessError as error:
            raise ShimUnavailable(f"compiling the forwarding shim with {compiler} failed: {error}") from None
        if done.returncode != 0:
            detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ShimUnavailable(f"compiling the forwarding shim with {compiler} failed: {detail}")
        os.replace(output, target)  # atomic: a concurrent import sees no half-written library
    finally:
        if os.path.dirname(target) != work:
            shutil.rmtree(work, ignore_errors=True)
    return target


# -- the on-disk cache of verdicts --


def default_cache_dir(environ: Mapping[str, str] | None = None) -> str:
    """``$PORTRES_CACHE_DIR``, else ``${XDG_CACHE_HOME:-~/.cache}/portres``."""
    environ = os.environ if environ is None else environ
    if environ.get("PORTRES_CACHE_DIR"):
        return environ["PORTRES_CACHE_DIR"]
    return os.path.join(environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "portres")


def _well_formed(entry) -> bool:
    texts = ("reason", "prefix", "config", "corename")
    return (isinstance(entry, dict) and isinstance(entry.get("accepted"), bool)
            and all(isinstance(entry.get(name) or "", str) for name in texts))


def _library_exists(key: str) -> bool:
    try:
        return os.path.exists(json.loads(key)[0])
    except (ValueError, TypeError, IndexError, KeyError):
        return False


class _Cache:
    """Verdicts by key in one JSON file; unreadable or unwritable means "probe again", never an error."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, CACHE_FILE)

    def _read(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as file:
                data = json.load(file)
            entries = data["probes"] if data.get("format") == PROBE_VERSION else {}
            return {key: entry for key, entry in entries.items() if _well_formed(entry)}  # the rest: probe again
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            return {}

    def get(self, key: str) -> dict | None:
        return self._read().get(key)

    def put(self, key: str, entry: dict) -> None:
        try:
            os.makedirs(self.directory, exist_ok=True)
            entries = {k: e for k, e in self._read().items() if _library_exists(k)}  # merged; gone libraries dropped
            entries[key] = entry
            handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=".blas-probes-", suffix=".json")
            try:
                with os.fdopen(handle, "w", encoding="utf-8") as file:
                    json.dump({"format": PROBE_VERSION, "probes": entries}, file, indent=1, sort_keys=True)
                os.replace(temporary, self.path)
            except BaseException:
                os.unlink(temporary)
                raise
        except OSError:
            pass  # a read-only home: the verdict holds for this process only


# -- selection --


@dataclass(frozen=True)
class Rejection:
    path: str  # the library turned down
    source: str  # where it was found (Candidate.source)
    reason: str  # why, in words (for `portres backends`)

    def __str__(self) -> str:
        return f"{self.path} ({self.source}): {self.reason}"


@dataclass(frozen=True)
class Selection:
    path: str | None  # the library MLX's cblas calls reach; None: MLX's bundled reference BLAS
    source: str | None = None  # where it was found (Candidate.source)
    config: str | None = None  # openblas_get_config() of the chosen library
    corename: str | None = None  # openblas_get_corename(): the kernels in use on this CPU
    prefix: str = ""  # symbol prefix of its exports ("scipy_" needs the shim)
    shim: str | None = None  # forwarding library loaded after it, when prefix is not empty
    rejected: tuple[Rejection, ...] = field(default_factory=tuple)  # every candidate tried before it, and why not

    @property
    def version(self) -> str | None:
        words = (self.config or "").split()
        return words[1] if len(words) > 1 and words[0] == "OpenBLAS" else None

    def describe(self) -> str:
        """One line: name, version, core, path (or the fallback and its fix)."""
        if self.path is None:
            return f"reference BLAS bundled with mlx (about 50x slower): {FIX}"
        via = f"{self.source} via a cblas shim" if self.shim else self.source
        if self.config is None:
            return f"BLAS of unknown kind (no openblas_get_config), {via}: {self.path}"
        kind = "DYNAMIC_ARCH" if "DYNAMIC_ARCH" in self.config.split() else "single-target"
        return f"OpenBLAS {self.version or '?'}, core {self.corename or '?'} ({kind}), {via}: {self.path}"

    def rejected_lines(self) -> list[str]:
        return [str(rejection) for rejection in self.rejected]


def _examine(path: str, cpu: Cpu, cache_dir: str, identify, probe, build_shim) -> tuple[dict, bool]:
    """The verdict on one library (never loaded here) and whether it may be cached."""
    identity = identify(path)
    if not identity.ok:
        return {"accepted": False, "reason": identity.reason}, identity.cacheable
    facts = {"config": identity.config, "corename": identity.corename, "prefix": identity.prefix}
    why = judge_core(identity.config, identity.corename, cpu)
    if why:
        return {"accepted": False, "reason": why, **facts}, True
    shim = None
    if identity.prefix:
        try:
            shim = build_shim(identity.prefix, cache_dir)
        except ShimUnavailable as error:
            return {"accepted": False, "reason": str(error), **facts}, False
    result = probe(path, shim)
    if not result.ok:
        return {"accepted": False, "reason": result.reason, **facts}, result.cacheable
    return {"accepted": True, "reason": "", **facts}, True


def select(found: Iterable[Candidate] | None = None, *, cpu: Cpu | None = None,
           identify: Callable[[str], Report] = identify, probe: Callable[[str, str | None], Report] = probe,
           build_shim: Callable[[str, str], str] = build_shim, cache_dir: str | None = None) -> Selection:
    """The first candidate that is safe and correct on this CPU, and why each one before it was not.

    Nothing is loaded into this process: identification and the sgemm check run in
    subprocesses, and their verdicts are cached per (library file, CPU).

        >>> select().path   # doctest: +SKIP
        '/usr/lib/x86_64-linux-gnu/libopenblas.so.0'
    """
    found = candidates() if found is None else list(found)
    cpu = cpu_info() if cpu is None else cpu
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    cache = _Cache(cache_dir)
    coretype = os.environ.get("OPENBLAS_CORETYPE", "")  # overrides DYNAMIC_ARCH's own choice of kernels
    rejected = []
    for candidate in found:
        try:
            stat = os.stat(candidate.path)
        except OSError as error:
            rejected.append(Rejection(candidate.path, candidate.source, f"cannot be read ({error.strerror})"))
            continue
        key = json.dumps([os.path.realpath(candidate.path), stat.st_size, stat.st_mtime_ns, cpu.identity, coretype])
        verdict = cache.get(key)
        if verdict is None:
            verdict, cacheable = _examine(candidate.path, cpu, cache_dir, identify, probe, build_shim)
            if cacheable:
                cache.put(key, verdict)
        shim = None
        if verdict["accepted"] and verdict.get("prefix"):
            try:  # accepted from the cache, but the shim file may have been cleaned away
                shim = build_shim(verdict["prefix"], cache_dir)
            except ShimUnavailable as error:
                verdict = {"accepted": False, "reason": str(error)}
        if not verdict["accepted"]:
            rejected.append(Rejection(candidate.path, candidate.source, verdict.get("reason") or "rejected"))
            continue
        return Selection(candidate.path, candidate.source, verdict.get("config"), verdict.get("corename"),
                         verdict.get("prefix") or "", shim, tuple(rejected))
    return Selection(None, rejected=tuple(rejected))


# -- loading the choice into this process --


def preload(selection: Selection) -> Callable[[int], None] | None:
    """Load the chosen library (then its shim) with RTLD_GLOBAL; return its thread-count setter, if it has one.

    Call before ``import mlx.core``. Raises OSError if the library cannot be loaded after all.
    """
    if selection.path is None:
        return None
    library = ctypes.CDLL(selection.path, mode=ctypes.RTLD_GLOBAL)
    if selection.shim:
        ctypes.CDLL(selection.shim, mode=ctypes.RTLD_GLOBAL)
    setter = getattr(library, selection.prefix + "openblas_set_num_threads", None)
    if setter is None:
        return None
    setter.restype = None
    setter.argtypes = [ctypes.c_int]
    return lambda threads: setter(max(1, int(threads)))


_warned = False


def warn_bundled(selection: Selection) -> None:
    """Warn, once per process, that MLX runs on its bundled reference BLAS, with why and how to fix it."""
    global _warned
    if _warned or selection.path is not None:
        return
    _warned = True
    reasons = "; ".join(selection.rejected_lines()) or "no OpenBLAS found"
    warnings.warn(f"MLX will use its bundled reference BLAS, about 50x slower ({reasons}). Fix: {FIX}.",
                  BundledBlasWarning, stacklevel=3)
