"""GPU check: forward and gradient parity and ResNet-50 speed on an NVIDIA GPU, offline, in 10 minutes.

    bash benchmarks/gpu_check.sh                     # or: make gpu-check (a Linux machine with an NVIDIA GPU)
    bash benchmarks/gpu_check.sh --dry-run           # the plan: installs and commands, nothing run
    bash benchmarks/gpu_check.sh --sim               # the same steps on the CPU at small sizes
    python benchmarks/gpu_check.py --download-wheels # or: make gpu-wheels (a networked machine): fills .whl/

What it does, each step under its own time limit and all of them within --budget seconds:

1. installs portres from this working tree, and whatever it needs that the machine lacks (numpy, click,
   tinygrad, ...), into a target folder (--site) from the wheels in .whl/ with `pip --no-index` (no
   network); the machine's own torch stays in use. MLX's CUDA build (mlx-cuda-13, ~90 MB) is installed
   from .whl/ when it is there, else from the package index when it can be reached, else skipped;
2. points tinygrad at the NVRTC that torch's CUDA wheels bring (NVRTC_PATH) and the driver's libcuda;
3. runs `portres parity` (forward: float32, float16, bfloat16) and `portres parity --grads` (float32, then
   float64 where the device has it) on each target - tinygrad CUDA and NV, MLX gpu, torch cuda;
4. runs `portres bench` on ResNet-50 inference (batch 1 and 64) and a training step (batch 64) on each;
5. writes the bench rows into BENCHMARKS.md (the tables benchmarks/run_matrix.py writes), and prints a
   summary: one line per check, each failure or skip with its reason.

Exit status 1 only if a check that ran disagreed with the reference (numerically); skips, time-outs and
targets that cannot run here are reported and leave it 0. Status 2 if portres itself could not be set up.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what `make gpu-wheels` carries: portres's own needs (pyproject.toml), tinygrad at the version the lowering is
# written against, and setuptools to build portres offline where the machine's is older than pyproject asks
CARRIED_WHEELS = ["tinygrad>=0.14,<0.15", "setuptools>=77", "numpy>=1.24", "click>=8.1", "safetensors>=0.4"]
REQUIRED = ["numpy", "click"]  # portres cannot start without them
OPTIONAL = ["tinygrad", "safetensors"]  # a target that needs a missing one is skipped
MLX_CUDA = ["mlx>=0.32.1,<0.33", "mlx-cuda-13>=0.32.1,<0.33"]  # the MLX build for CUDA 13 (driver >= 580)
# make gpu-wheels fetches for Python 3.12 on x86-64 Linux (the GPU machine these checks were written for)
WHEEL_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64", "manylinux1_x86_64"]
GPU_TARGETS = "torch:cuda,tinygrad:CUDA,mlx:gpu,tinygrad:NV"
SIM_TARGETS = "torch:cpu,tinygrad:CPU,mlx:cpu"
NO_FLOAT64 = {("mlx", "gpu")}  # MLX's GPU computes no float64
# where tinygrad's NVRTC compiles look for cuda_fp16.h / cuda_bf16.h unless CUDA_PATH says (compiler_cuda.py)
CUDA_HEADER_DIRS = ("/usr/local/cuda/include", "/usr/include", "/opt/cuda/include")
RESERVE_S = 20  # kept back from the last steps for writing the rows and the summary
MIN_STEP_S = 15  # a step with less time left than this is skipped rather than started


@dataclasses.dataclass
class Sizes:
    """What each check runs on; --sim shrinks it so the whole check runs on a CPU in minutes."""
    parity_net: str = "resnet50"
    grads_net: str = "resnet20"
    bench_net: str = "resnet50"
    bench_input: int = 224
    infer_batches: tuple[int, ...] = (64, 1)
    train_batch: int = 64
    warmup: int = 2
    iters: int = 10


SIM_SIZES = Sizes(parity_net="resnet20", grads_net="resnet20", bench_net="resnet20", bench_input=32,
                  infer_batches=(4, 1), train_batch=4, warmup=1, iters=2)


@dataclasses.dataclass
class Check:
    """One line of the summary: PASS, FAIL (numerical), SKIP, TIMEOUT, ERROR (crashed) or BENCH."""
    status: str
    what: str
    detail: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        took = f" [{self.seconds:.0f} s]" if self.seconds else ""
        return f"{self.status:<7} {self.what}" + (f": {self.detail}" if self.detail else "") + took


class Deadline:
    """The time left of the whole check's budget, and each step's share of it.

    >>> Deadline(100).step_limit(30) <= 30
    True
    """

    def __init__(self, budget_s: float):
        self.end = time.monotonic() + budget_s

    def left(self) -> float:
        return self.end - time.monotonic()

    def step_limit(self, cap_s: float) -> float:
        """Seconds this step may take: its cap, or what is left less the reserve; 0 if too little is left."""
        limit = min(cap_s, self.left() - RESERVE_S)
        return limit if limit >= MIN_STEP_S else 0.0


class Stopped(Exception):
    """SIGTERM (the wrapper's `timeout`): stop the step in flight, still print the summary."""


def _on_sigterm(signum, frame):
    raise Stopped()


def run(command: list[str], env: dict, limit_s: float) -> tuple[int | None, str, str]:
    """Run ``command`` in its own process group; kill the group at ``limit_s``. ``(None, ...)``: timed out.

    >>> run([sys.executable, "-c", "print(1)"], dict(os.environ), 30)[:2]
    (0, '1\\n')
    """
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, cwd=ROOT)
    try:
        out, err = child.communicate(timeout=limit_s)
        return child.returncode, out, err
    except (subprocess.TimeoutExpired, Stopped, KeyboardInterrupt) as stop:
        os.killpg(child.pid, signal.SIGKILL)  # the group: portres bench runs each backend in a child of its own
        out, err = child.communicate()
        if isinstance(stop, subprocess.TimeoutExpired):
            return None, out, err
        raise


def last_line(text: str) -> str:
    """The last non-empty line of a process's output: where an error says what it is."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# -- set-up: wheels, the target folder, the CUDA libraries ---------------------------------------------------


def download_wheels(folder: Path, python_version: str, with_mlx_cuda: bool) -> int:
    """Fill ``folder`` with the wheels the GPU machine may lack (run where pip reaches the package index)."""
    folder.mkdir(exist_ok=True)
    wanted = CARRIED_WHEELS + (MLX_CUDA if with_mlx_cuda else [])
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
               python_version, "--implementation", "cp", "-d", str(folder)]
    for tag in WHEEL_PLATFORMS + (["manylinux_2_35_x86_64"] if with_mlx_cuda else []):
        command += ["--platform", tag]
    status = subprocess.call(command + wanted)
    total = sum(path.stat().st_size for path in folder.glob("*.whl"))
    print(f"{folder}: {len(list(folder.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB (the device tool carries "
          "64 MiB in all, working tree included)")
    return status


def find_module(name: str) -> bool:
    importlib.invalidate_caches()
    return importlib.util.find_spec(name) is not None


def distribution_installed(name: str) -> bool:
    from importlib import metadata

    try:
        metadata.distribution(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def setuptools_is_recent() -> bool:
    from importlib import metadata

    try:
        return int(metadata.version("setuptools").split(".")[0]) >= 77
    except (metadata.PackageNotFoundError, ValueError):
        return False


def pip_install(arguments: list[str], site: Path, wheels: Path | None, limit_s: float) -> tuple[bool, str]:
    """``pip install --target site`` from ``wheels`` only (``None``: from the package index)."""
    offline = ["--no-index", "--find-links", str(wheels)] if wheels is not None else []
    command = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
               "--no-compile", "--upgrade", "--target", str(site), *offline, *arguments]
    status, out, err = run(command, dict(os.environ), limit_s)
    if status is None:
        return False, f"pip took over {limit_s:.0f} s"
    return status == 0, last_line(err) or last_line(out)


def install_portres(site: Path, wheels: Path, limit_s: float) -> tuple[bool, str]:
    """Install portres from this working tree into ``site``, offline.

    The sources are copied first: pip builds a local folder in place, and its build/ must not land in the tree.
    """
    with tempfile.TemporaryDirectory(prefix="portres-src-") as source:
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(ROOT / name, source)
        for name in ("portres", "backends", "cli"):
            shutil.copytree(ROOT / name, Path(source) / name, ignore=shutil.ignore_patterns("__pycache__"))
        # pyproject asks for setuptools >= 77: the machine's when it is recent, else the carried wheel
        isolation = ["--no-build-isolation"] if setuptools_is_recent() else []
        return pip_install([*isolation, source], site, wheels, limit_s)


def network_reachable(host: str = "pypi.org") -> bool:
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


SITE_MARK = ".made-by-gpu-check"


def fresh_site(site: Path) -> str | None:
    """Empty ``site`` for this run (packages left by an earlier one would shadow the machine's); only a folder
    this script made is ever removed. Returns why it cannot, or None."""
    if site.exists():
        if not (site / SITE_MARK).exists() and any(site.iterdir()):
            return f"--site {site} holds files that gpu_check did not put there: name a new or empty folder"
        shutil.rmtree(site)
    site.mkdir(parents=True)
    (site / SITE_MARK).write_text("portres GPU check install target; removed and remade by each run\n")
    return None


def set_up(site: Path, wheels: Path, extra: list[str], want_mlx_cuda: bool, deadline: Deadline,
           checks: list[Check]) -> bool:
    """Install portres and what is missing into ``site`` (first on sys.path and PYTHONPATH); False if portres
    cannot run. Each install or skip goes into ``checks``."""
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    start = time.monotonic()
    ok, message = install_portres(site, wheels, deadline.step_limit(90) or 30)
    if not ok:
        checks.append(Check("ERROR", "install portres from the working tree", message))
        return False
    checks.append(Check("OK", f"install portres into {site}", "", time.monotonic() - start))
    for name in REQUIRED + OPTIONAL + extra:
        if find_module(name):
            continue
        start = time.monotonic()
        ok, message = pip_install([name], site, wheels, deadline.step_limit(60) or 30)
        if ok and find_module(name):
            checks.append(Check("OK", f"install {name} from {wheels}", "", time.monotonic() - start))
        else:
            level = "ERROR" if name in REQUIRED else "SKIP"
            checks.append(Check(level, f"install {name}", f"not installed and no wheel for it in {wheels} "
                                f"(make gpu-wheels fills it): {message}"))
            if name in REQUIRED:
                return False
    if want_mlx_cuda:
        install_mlx_cuda(site, wheels, deadline, checks)
    return True


def install_mlx_cuda(site: Path, wheels: Path, deadline: Deadline, checks: list[Check]) -> None:
    """MLX's CUDA build: already there, from .whl/, or from the package index; else one skip line."""
    if distribution_installed("mlx-cuda-13") or distribution_installed("mlx-cuda-12") \
            or distribution_installed("mlx-cuda"):
        return
    start = time.monotonic()
    # --no-deps: its CUDA libraries (cuBLAS, cuDNN, NVRTC for CUDA 13) are torch's, found on LD_LIBRARY_PATH
    ok, message = pip_install(MLX_CUDA, site, wheels, deadline.step_limit(60) or 20)
    where = str(wheels)
    if not ok and network_reachable():
        ok, message = pip_install(MLX_CUDA, site, None, deadline.step_limit(150))
        where = "the package index"
    elif not ok:
        message = f"mlx-cuda-13 (~90 MB) is not in {wheels} and pypi.org cannot be reached"
    if ok:
        checks.append(Check("OK", f"install mlx-cuda-13 from {where}", "", time.monotonic() - start))
    else:
        checks.append(Check("SKIP", "install mlx's CUDA build", message))


def site_packages_dirs() -> list[Path]:
    return [Path(p) for p in sys.path if p and Path(p).is_dir() and Path(p).name in ("site-packages", "dist-packages")]


def cuda_environment() -> tuple[dict, list[str]]:
    """Environment for the GPU runs: the CUDA libraries of torch's wheels on LD_LIBRARY_PATH, NVRTC_PATH for
    tinygrad (it looks for libnvrtc.so[.N] on LD_LIBRARY_PATH, /usr/lib*, /usr/local/cuda/targets/*/lib),
    CUDA_PATH only where the fp16/bf16 headers NVRTC includes are nowhere tinygrad looks. Also what it found."""
    env, found = {}, []
    library_dirs = []
    for base in site_packages_dirs():  # torch's CUDA 12 wheels: nvidia/<lib>/lib; CUDA 13: nvidia/cu13/lib
        library_dirs += sorted(glob.glob(str(base / "nvidia" / "*" / "lib")))
    libcuda = next((m.group(1) for m in re.finditer(r"libcuda\.so\.1 \(.*?\) => (\S+)", ldconfig())), None)
    for folder in ("/usr/local/nvidia/lib64", "/usr/local/nvidia/lib", "/usr/lib/x86_64-linux-gnu", "/usr/lib64"):
        if libcuda is None and Path(folder, "libcuda.so.1").exists():
            libcuda = str(Path(folder, "libcuda.so.1"))
    if libcuda:
        library_dirs.append(str(Path(libcuda).parent))
        found.append(f"libcuda: {libcuda}")
    if library_dirs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(dict.fromkeys(
            library_dirs + [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d]))
    nvrtc = os.environ.get("NVRTC_PATH") or next(
        (path for folder in library_dirs + ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]
         for path in sorted(glob.glob(f"{folder}/libnvrtc.so.*"))
         if re.fullmatch(r"libnvrtc\.so\.\d+", Path(path).name)), None)
    if nvrtc:
        env["NVRTC_PATH"] = nvrtc
        found.append(f"NVRTC: {nvrtc}")
    if not os.environ.get("CUDA_PATH") and not any(Path(h, "cuda_fp16.h").exists() for h in CUDA_HEADER_DIRS):
        include = next((Path(p).parent for base in site_packages_dirs()
                        for p in sorted(glob.glob(str(base / "nvidia" / "*" / "include" / "cuda_fp16.h")))), None)
        if include:
            env["CUDA_PATH"] = str(include.parent)  # tinygrad passes -I$CUDA_PATH/include to NVRTC
            found.append(f"CUDA headers: {include}")
    return env, found


def ldconfig() -> str:
    """``ldconfig -p``: where the dynamic linker finds libraries (libcuda.so.1 where the driver put it)."""
    try:
        return subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def nvidia_gpus() -> list[str]:
    """'NVIDIA H200, 580.159.04, 143771 MiB' per GPU, from nvidia-smi; [] where there is none."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


# -- the checks -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    backend: str
    device: str
    unusable: str = ""  # why, once its first check could not run
    ran: bool = False  # one of its checks ran: later skips are that check's own
    skipped: int = 0  # checks left out once it proved unusable (one summary line says how many)

    @property
    def name(self) -> str:
        return f"{self.backend} {self.device}"


def parse_targets(text: str) -> list[Target]:
    """``"torch:cuda,tinygrad:CUDA"`` -> targets; the device names are portres's (``--device``).

    >>> [t.name for t in parse_targets("torch:cuda, tinygrad:NV")]
    ['torch cuda', 'tinygrad NV']
    """
    targets = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        backend, _, device = part.partition(":")
        if not backend or not device:
            raise SystemExit(f"gpu_check: target {part!r} is not backend:device, e.g. tinygrad:CUDA (--targets)")
        targets.append(Target(backend, device))
    return targets


def json_records(text: str) -> list[dict]:
    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def classify_parity(what: str, status: int | None, out: str, err: str, limit_s: float, grads: bool) -> Check:
    """One parity run's line: PASS / FAIL (exit 1: a backend disagrees) / SKIP (exit 2: cannot run here) /
    TIMEOUT / ERROR (crashed).

    >>> classify_parity("x", 1, '{"passed": false, "logits_error": 0.5, "tolerance": 1e-4, "divergence": "conv1"}',
    ...                 "", 60, grads=False).status
    'FAIL'
    """
    if status is None:
        return Check("TIMEOUT", what, f"no result within {limit_s:.0f} s")
    record = next(iter(json_records(out)), {})
    if status in (0, 1) and record and not record.get("error"):
        if grads:
            detail = (f"loss {record['loss_error']:.1e}, gradients {record['grads_error']:.1e}, worst "
                      f"{record['worst_parameter']} {record['worst_parameter_error']:.1e}")
        else:
            detail = f"logits {record['logits_error']:.1e} (tol {record['tolerance']:.0e})"
        if record.get("divergence"):
            detail += f"; diverges first at {record['divergence']}"
        return Check("PASS" if status == 0 and record.get("passed") else "FAIL", what, detail)
    reason = record.get("error") or last_line(err) or last_line(out) or f"exit status {status}"
    return Check("SKIP" if status == 2 else "ERROR", what, reason.removeprefix("portres: error: "))


def classify_bench(what: str, backend: str, status: int | None, out: str, err: str, limit_s: float,
                   records: list[dict]) -> Check:
    """One bench run's line; its record joins ``records``."""
    if status is None:
        return Check("TIMEOUT", what, f"no result within {limit_s:.0f} s")
    found = [r for r in json_records(out) if r.get("backend") == backend]
    if status == 0 and found:
        records.append(found[0])
        return Check("BENCH", what, f"{found[0]['images_per_s']:.1f} images/s, median "
                     f"{found[0]['latency_median_s'] * 1e3:.1f} ms, first call {found[0]['first_call_s']:.1f} s")
    reason = (last_line(err) or f"exit status {status}").removeprefix("portres: error: ")
    # the target cannot run here (a skip), or it ran and broke (an error: no numbers, so no failure either)
    cannot = any(words in reason for words in ("cannot run", "not usable", "not available", "not installed"))
    return Check("SKIP" if cannot else "ERROR", what, reason)


@dataclasses.dataclass
class Step:
    """One check: its command and how to read what the command printed, or a skip known in advance."""
    what: str
    target: Target
    command: list[str] | None = None
    cap_s: float = 0.0
    classify: object = None  # (status, stdout, stderr, limit_s) -> Check
    skip: str = ""

    def execute(self, env: dict, deadline: Deadline) -> Check | None:
        """Run within its share of the budget. A target whose first check cannot run is left out after it
        (None: counted in ``target.skipped``, reported once at the end)."""
        if self.target.unusable:
            self.target.skipped += 1
            return None
        if self.skip:
            return Check("SKIP", self.what, self.skip)
        limit = deadline.step_limit(self.cap_s)
        if not limit:
            return Check("SKIP", self.what, f"out of time: {max(deadline.left(), 0):.0f} s of the budget left")
        start = time.monotonic()
        status, out, err = run(self.command, env, limit)
        check = self.classify(status, out, err, limit)
        check.seconds = time.monotonic() - start
        if check.status in ("SKIP", "ERROR") and not self.target.ran:
            self.target.unusable = check.detail
        elif check.status not in ("SKIP", "ERROR"):
            self.target.ran = True
        return check


def parity_step(target: Target, sizes: Sizes, dtype: str, grads: bool, cap_s: float) -> Step:
    network = sizes.grads_net if grads else sizes.parity_net
    what = f"{'gradient' if grads else 'forward'} parity {target.name} {dtype} {network}"
    command = [sys.executable, "-m", "portres.cli", "parity", network, "--backends", target.backend, "--device",
               target.device, "--dtype", dtype, "--json"] + (["--grads"] if grads else [])
    return Step(what, target, command, cap_s,
                lambda status, out, err, limit: classify_parity(what, status, out, err, limit, grads))


def bench_step(target: Target, sizes: Sizes, batch: int, train: bool, cap_s: float, records: list[dict]) -> Step:
    what = f"bench {target.name} {sizes.bench_net} {'training' if train else 'inference'} batch {batch}"
    iters = sizes.iters * (4 if batch == 1 else 1)  # as run_matrix.py: batch 1 passes are short and noisy
    command = [sys.executable, "-m", "portres.cli", "bench", "--backend", target.backend, "--device", target.device,
               "--arch", sizes.bench_net, "--input-size", str(sizes.bench_input), "--batch", str(batch),
               "--dtype", "float32", "--warmup", str(sizes.warmup), "--iters", str(iters), "--json"] + \
        (["--train"] if train else [])
    return Step(what, target, command, cap_s,
                lambda status, out, err, limit: classify_bench(what, target.backend, status, out, err, limit, records))


def plan_steps(targets: list[Target], sizes: Sizes, records: list[dict]) -> list[Step]:
    """The checks in the order they run: what matters most first, so a short budget drops the least.

    Every target's float32 forward parity comes first (it also finds the targets that cannot run here); then
    the rest on each framework's first device, and only then on its second (tinygrad NV after tinygrad CUDA:
    the same lowering, compiled again).

    >>> steps = plan_steps(parse_targets("torch:cuda,tinygrad:CUDA,tinygrad:NV"), Sizes(), [])
    >>> [s.what for s in steps[:4]]  # doctest: +NORMALIZE_WHITESPACE
    ['forward parity torch cuda float32 resnet50', 'forward parity tinygrad CUDA float32 resnet50',
     'forward parity tinygrad NV float32 resnet50', 'gradient parity torch cuda float32 resnet20']
    """
    first_devices = [t for i, t in enumerate(targets) if t.backend not in {u.backend for u in targets[:i]}]
    steps = [parity_step(t, sizes, "float32", False, 150) for t in targets]
    for group in (first_devices, [t for t in targets if t not in first_devices]):
        steps += [parity_step(t, sizes, "float32", True, 150) for t in group]
        steps += [parity_step(t, sizes, dtype, False, 120) for dtype in ("float16", "bfloat16") for t in group]
        steps += [bench_step(t, sizes, batch, False, 150, records) for batch in sizes.infer_batches for t in group]
        steps += [bench_step(t, sizes, sizes.train_batch, True, 240, records) for t in group]
        for t in group:
            step = parity_step(t, sizes, "float64", True, 120)
            if (t.backend, t.device) in NO_FLOAT64:
                step.skip = "MLX's GPU computes no float64"
            steps.append(step)
    if targets:  # cli/parity.py compares gradients in float32 and float64 only
        steps.append(Step(f"gradient parity float16, bfloat16 on {', '.join(t.name for t in targets)}", targets[0],
                          skip="portres parity --grads compares in float32 or float64 only"))
    return steps


def dry_run(targets: list[Target], sizes: Sizes, site: Path, wheels: Path) -> None:
    """Print what would run: the installs and each check's command with its time cap; nothing runs."""
    print(f"install: pip install --no-index --find-links {wheels} --no-deps --target {site}: portres from {ROOT}, "
          f"then each of {', '.join(REQUIRED + OPTIONAL)} that is missing; mlx-cuda-13 (for mlx:gpu) from "
          f"{wheels} or the package index, else skipped")
    for step in plan_steps(targets, sizes, []):
        if step.skip:
            print(Check("SKIP", step.what, step.skip).line())
        else:
            print(f"[{step.cap_s:>3.0f} s] portres {' '.join(step.command[3:])}")


# -- BENCHMARKS.md --------------------------------------------------------------------------------------------

BEGIN, END = "<!-- gpu-check: written by benchmarks/gpu_check.py -->", "<!-- /gpu-check -->"  # as run_matrix's


def format_rows(payload: dict) -> str:
    """The GPU section: run_matrix's own tables for the bench records, under the machine and versions."""
    import run_matrix  # benchmarks/run_matrix.py: the tables `make matrix` writes

    records = payload["records"]
    tables = ["#" + line if line.startswith("## ") else line for line in run_matrix.tables(records)]
    meta = payload["meta"]
    frameworks = sorted({r["framework"] for r in records})
    head = [BEGIN, f"## {meta['title']}", "",
            "Written by `benchmarks/gpu_check.sh` (`make gpu-check`): float32, seeded weights, input on the device, "
            "median of timed passes after warm-up; rows named with a device in brackets ran on a second device of "
            "that framework.", "",
            f"- date: {meta['date']}",
            f"- machine: {meta['gpu']}; {meta['cpu']}, {meta['cpus']} CPUs; {meta['system']}",
            f"- Python {meta['python']}; {meta['portres']}; " + ("; ".join(frameworks) or "no framework ran"),
            f"- devices: {meta['devices']}",
            *[f"- {line}" for line in meta.get("environment", [])], ""]
    checks = ["### Checks", "", *[f"- {line}" for line in meta["checks"]], ""]
    return "\n".join(head + tables + checks + [END]) + "\n"


def splice(document: str, section: str) -> str:
    """Put ``section`` in place of the last GPU-check section, else before '## GPUs', else at the end.

    >>> splice("# B\\n\\n## GPUs\\nx\\n", f"{BEGIN}\\nnew\\n{END}\\n").index("new") < splice(
    ...     "# B\\n\\n## GPUs\\nx\\n", f"{BEGIN}\\nnew\\n{END}\\n").index("## GPUs")
    True
    """
    if BEGIN in document and END in document:
        before, rest = document.split(BEGIN, 1)
        return before + section.rstrip("\n") + rest.split(END, 1)[1]
    marker = "\n## GPUs\n"
    if marker in document:
        before, after = document.split(marker, 1)
        return before + "\n" + section + marker.lstrip("\n") + after
    return document.rstrip("\n") + "\n\n" + section


def portres_version() -> str:
    """'portres 0.1.0 (git 1a2b3c4)', the commit where the tree is a git checkout."""
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return f"portres {version.group(1) if version else '?'}" + (f" (git {commit})" if commit else "")


def write_rows(records: list[dict], meta: dict, output: Path | None, out_dir: Path | None, env: dict) -> Check:
    """Format the section in a child process (it imports portres and run_matrix; this one imports neither)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"records": records, "meta": meta}, f)
    try:
        status, out, err = run([sys.executable, __file__, "--format-rows", f.name], env, 120)
    finally:
        os.unlink(f.name)
    if status != 0:
        return Check("ERROR", "write the rows", last_line(err) or f"exit status {status}")
    written = []
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "gpu_check_rows.md").write_text(out)
        written.append(str(out_dir / "gpu_check_rows.md"))
    if output is not None:
        output.write_text(splice(output.read_text() if output.exists() else "# Benchmarks\n", out))
        written.append(str(output))
    return Check("OK", "rows written", ", ".join(written) or "nowhere (--output, --out-dir)")


# -- main -------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--dry-run", action="store_true", help="print the installs and commands, run nothing")
    parser.add_argument("--sim", action="store_true", help=f"the CPU twin: targets {SIM_TARGETS}, resnet20 at 32x32")
    parser.add_argument("--targets", default=os.environ.get("GPU_CHECK_TARGETS"),
                        help=f"backend:device list (default {GPU_TARGETS}; env GPU_CHECK_TARGETS)")
    parser.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", 570)),
                        help="seconds for everything (default 570; env GPU_CHECK_BUDGET_S)")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="the carried wheels (default .whl/)")
    parser.add_argument("--site", type=Path, default=Path(tempfile.gettempdir()) / "portres-gpu-site",
                        help="where missing packages and portres are installed (first on PYTHONPATH)")
    parser.add_argument("--require", action="append", default=[], metavar="MODULE",
                        help="also make sure MODULE imports, installing it from the wheels (repeatable)")
    parser.add_argument("--install-only", action="store_true", help="set up, print the environment, stop")
    parser.add_argument("--output", type=Path, help="the benchmarks file (default BENCHMARKS.md; --sim: none)")
    parser.add_argument("--out-dir", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                        help="also write the rows, log and records here (default $OUT where it is set)")
    parser.add_argument("--merge-rows", type=Path, metavar="FILE",
                        help="splice a saved gpu_check_rows.md into --output (BENCHMARKS.md) and stop")
    parser.add_argument("--download-wheels", action="store_true", help="fill --wheels from the package index, stop")
    parser.add_argument("--python-version", default="3.12", help="with --download-wheels (default 3.12)")
    parser.add_argument("--with-mlx-cuda", action="store_true",
                        help="with --download-wheels: MLX's CUDA build too (~90 MB: more than the device tool carries)")
    parser.add_argument("--format-rows", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.format_rows:
        sys.stdout.write(format_rows(json.loads(Path(args.format_rows).read_text())))
        return 0
    if args.download_wheels:
        return download_wheels(args.wheels, args.python_version, args.with_mlx_cuda)
    output = args.output if args.output or args.sim else ROOT / "BENCHMARKS.md"
    if args.merge_rows:
        output.write_text(splice(output.read_text() if output.exists() else "# Benchmarks\n",
                                 args.merge_rows.read_text()))
        print(f"gpu_check: {args.merge_rows} spliced into {output}")
        return 0
    targets = parse_targets(args.targets or (SIM_TARGETS if args.sim else GPU_TARGETS))
    sizes = SIM_SIZES if args.sim else Sizes()
    if args.dry_run:
        dry_run(targets, sizes, args.site, args.wheels)
        return 0
    gpus = nvidia_gpus()
    if not gpus and not args.sim and not args.install_only:
        print("gpu_check: no NVIDIA GPU here (nvidia-smi lists none): nothing to check. --sim runs the same "
              "steps on the CPU, --dry-run shows them.")
        return 0
    if problem := fresh_site(args.site):
        print(f"gpu_check: {problem}")
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    deadline, checks, records = Deadline(args.budget), [], []
    started = datetime.datetime.now(datetime.timezone.utc)
    log_lines: list[str] = []

    def report(check: Check) -> None:
        checks.append(check)
        log_lines.append(check.line())
        print(check.line(), flush=True)

    print(f"gpu_check: {', '.join(gpus) or 'no NVIDIA GPU here'}{' (simulation on the CPU)' if args.sim else ''}; "
          f"budget {args.budget:.0f} s",
          flush=True)
    setup_checks: list[Check] = []
    wants_mlx_cuda = bool(gpus) and any(t.backend == "mlx" and t.device == "gpu" for t in targets)
    try:
        ready = set_up(args.site, args.wheels, args.require, wants_mlx_cuda, deadline, setup_checks)
    except (Stopped, KeyboardInterrupt):
        setup_checks.append(Check("TIMEOUT", "set-up", "stopped from outside while installing"))
        ready = False
    for check in setup_checks:
        report(check)
    if not ready:
        if setup_checks[-1].status == "TIMEOUT":  # a time-out, as elsewhere, is no failure of a check
            print("gpu_check: stopped during the set-up; nothing checked")
            return 0
        print("gpu_check: portres cannot run here; nothing checked")
        return 2
    cuda_env, found = cuda_environment() if gpus else ({}, [])
    for line in found:
        print(f"        {line}")
    base_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not base_env.get("PYTHON", "0").isdigit():  # tinygrad reads PYTHON as an integer switch: not a path here
        base_env.pop("PYTHON")
    gpu_env = {**base_env, **cuda_env}
    if args.install_only:
        for key in ("PYTHONPATH", "LD_LIBRARY_PATH", "NVRTC_PATH", "CUDA_PATH"):
            if key in gpu_env:
                print(f"{key}={gpu_env[key]}")
        return 0

    try:
        for step in plan_steps(targets, sizes, records):
            if check := step.execute(base_env if step.target.device.lower() == "cpu" else gpu_env, deadline):
                report(check)
    except (Stopped, KeyboardInterrupt):  # the rows of what finished are still written
        report(Check("TIMEOUT", "the whole check", "stopped from outside; the steps after this did not run"))

    for t in targets:
        if t.skipped:
            report(Check("SKIP", f"{t.name}: its {t.skipped} other checks", "it cannot run here (its first check "
                         "says why)"))
    used = {f"{t.backend} {t.device}" for t in targets if not t.unusable}
    meta = {"title": f"GPU check: {gpus[0].split(',')[0] if gpus else 'CPU simulation'} "
                     f"({started.date().isoformat()})",
            "date": started.strftime("%Y-%m-%d %H:%M UTC"),
            "gpu": "; ".join(gpus) or "no GPU (simulation on the CPU)",
            "cpu": records[0]["cpu"] if records else platform.processor() or "unknown",
            "cpus": os.cpu_count(), "system": f"{platform.system()} {platform.release()} {platform.machine()}",
            "python": platform.python_version(), "devices": ", ".join(sorted(used)) or "none usable",
            "portres": portres_version(),
            "environment": found, "checks": [c.line() for c in checks if c.status != "OK"]}
    for r in records:  # run_matrix's tables name rows by backend: a framework's second device gets a bracket
        first = next(t for t in targets if t.backend == r["backend"])
        if r["device"].lower() != first.device.lower():
            r["backend"] = f"{r['backend']} ({r['device']})"
    if records:
        report(write_rows(records, meta, output, args.out_dir, base_env))
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "gpu_check_records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (args.out_dir / "gpu_check_summary.txt").write_text("\n".join(log_lines) + "\n")

    counts = {status: sum(c.status == status for c in checks) for status in
              ("PASS", "FAIL", "SKIP", "TIMEOUT", "ERROR", "BENCH")}
    print("\n== GPU check summary ==")
    for check in checks:
        if check.status != "OK":
            print(check.line())
    print(", ".join(f"{n} {s.lower()}" for s, n in counts.items()) +
          f"; {time.monotonic() - deadline.end + args.budget:.0f} s of {args.budget:.0f}")
    return exit_status(checks)


def exit_status(checks: list[Check]) -> int:
    """1 if a check that ran disagreed with the reference; skips, time-outs and crashes leave it 0.

    >>> exit_status([Check("SKIP", "a"), Check("FAIL", "b")])
    1
    """
    return 1 if any(check.status == "FAIL" for check in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
