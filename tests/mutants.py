"""Mutation checks: deliberate bugs the suite must catch, each in a numerical test.

Each mutant is one textual patch (an exact string replaced in one file) applied to a throw-away copy
of the working tree (tracked and untracked, not ignored, files; never the live tree), where a pytest
selection then runs. A mutant is *caught* when a test it names as a catcher goes red; it *survives*
when the selection stays green, and is *caught elsewhere* when only other tests fail (an import
error, a crash: an accident, not a numerical test). The script exits 1 unless every mutant is caught.

    python tests/mutants.py                  # each mutant against its quick selection (a few minutes)
    python tests/mutants.py --full           # each mutant against the whole of `pytest --fast`, every red named
    python tests/mutants.py --only mlx-bn    # one mutant (a name or a prefix of one); --list lists them

The quick selection of each mutant is the part of `pytest --fast` most likely to catch it (of the default
tier, `make test`, for a mutant marked fast=False), run up to its first failure; --full runs the whole
inner-loop tier (`make test-fast`) for every mutant, --fast ones and the others alike, and names every
test that went red, so a mutant caught by accident elsewhere shows.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    what: str  # the bug, in words
    path: str  # file it patches, relative to the repository root
    old: str  # exact text, found once in the file
    new: str  # what replaces it
    catchers: tuple[str, ...]  # node-id prefixes of the tests that must go red
    quick: tuple[str, ...]  # pytest arguments of the quick selection
    fast: bool = True  # caught in `pytest --fast` (make test-fast); False: in the default tier (make test)


MUTANTS = [
    Mutant("mlx-bn-identity", "MLX's eval-mode batch_norm returns its input",
           "backends/mlx.py",
           "        scale = weight * mx.rsqrt(var + eps)\n        return x * scale + (bias - mean * scale)\n",
           "        return x\n",
           ("tests/test_parity.py::test_float32_parity_for_every_zoo_entry",
            "tests/test_parity.py::test_float64_forward_parity", "tests/test_parity.py::test_low_precision_parity"),
           ("tests/test_parity.py", "-k", "mlx and unfolded")),
    Mutant("tinygrad-bn-shift", "tinygrad's eval-mode batch_norm shifted by 1e-2",
           "backends/tinygrad.py",
           "return x * scale.reshape(1, -1, 1, 1) + (bias - mean * scale).reshape(1, -1, 1, 1)",
           "return x * scale.reshape(1, -1, 1, 1) + (bias - mean * scale).reshape(1, -1, 1, 1) + 1e-2",
           ("tests/test_parity.py::test_float32_parity_for_every_zoo_entry",
            "tests/test_parity.py::test_float64_forward_parity"),
           ("tests/test_parity.py", "-k", "tinygrad and unfolded")),
    Mutant("zero-pad-backward-halved", "the reference's zero_pad_backward halved",
           "backends/numpy_backward.py",
           "        return grad[:, :, padding:grad.shape[2] - padding, padding:grad.shape[3] - padding]\n",
           "        return grad[:, :, padding:grad.shape[2] - padding, padding:grad.shape[3] - padding] * 0.5\n",
           ("tests/test_backward.py::test_single_input_primitive_backward",
            "tests/test_namemaps.py::test_zero_pad_backward_matches_finite_differences"),
           ("tests/test_backward.py", "tests/test_namemaps.py", "-k", "zero_pad")),
    Mutant("relu-before-add", "a v1 block's last ReLU moved before the residual add (same parameters and MACs)",
           "portres/plan.py",
           "    if spec.residual:\n"
           "        shortcut = _shortcut(b, spec, p, block_input, block_input, cin, cout, stride)\n"
           "        x = b.add(f\"{p}add\", Add(), x, shortcut)\n"
           "    return b.add(f\"{p}relu{last}\", ReLU(), x)\n",
           "    x = b.add(f\"{p}relu{last}\", ReLU(), x)\n"
           "    if spec.residual:\n"
           "        shortcut = _shortcut(b, spec, p, block_input, block_input, cin, cout, stride)\n"
           "        x = b.add(f\"{p}add\", Add(), x, shortcut)\n"
           "    return x\n",
           ("tests/test_golden.py::test_the_reference_computes_what_the_frameworks_compute",),
           ("tests/test_golden.py",)),
    Mutant("float64-grads-in-float32", "float64 framework gradients computed in float32",
           "portres/training/grads.py",
           "    lowering = backends.load(backend, device).Backend(device=device, dtype=dtype)\n",
           "    lowering = backends.load(backend, device).Backend(\n"
           "        device=device, dtype=\"float32\" if dtype == \"float64\" and backend != \"numpy\" else dtype)\n",
           ("tests/test_gradients.py::test_float64_gradient_parity_for_every_zoo_entry",
            "tests/test_gradients.py::test_gradient_parity_of_every_layer_kind"),
           ("tests/test_gradients.py", "-k", "float64_gradient_parity or every_layer_kind")),
    # beyond the list: the other gaps issue 17 closed
    Mutant("conv-bias-grad-halved", "the reference's conv bias gradient halved",
           "portres/training/backprop.py",
           "            grads[f\"{name}.bias\"] = grad.sum((0, 2, 3))\n",
           "            grads[f\"{name}.bias\"] = grad.sum((0, 2, 3)) * 0.5\n",
           ("tests/test_backward.py::test_conv2d_bias_backward",),
           ("tests/test_backward.py", "-k", "bias")),
    Mutant("mlx-shifted-gemm-weight-grad", "MLX's hand-written shifted-GEMM weight gradient off by 1e-6 (relative)",
           "backends/_mlx_kernels.py",
           "    grad_weight = grad_taps.reshape(kernel, kernel, c, out_channels).transpose(3, 0, 1, 2)\n",
           "    grad_weight = grad_taps.reshape(kernel, kernel, c, out_channels).transpose(3, 0, 1, 2) * (1 + 1e-6)\n",
           ("tests/test_gradients.py::test_mlx_shifted_gemm_conv_and_its_hand_written_gradient",
            "tests/test_gradients.py::test_float64_gradient_parity_for_every_zoo_entry",
            "tests/test_gradients.py::test_gradient_parity_of_every_layer_kind"),
           ("tests/test_gradients.py", "-k", "mlx and (float64_gradient_parity or shifted_gemm)")),
    Mutant("mlx-float64-conv-in-float32", "MLX's float64 forward convs computed by MLX's own (float32) conv",
           "backends/mlx.py",
           "        exact = self.dtype == \"float64\"\n",
           "        exact = False\n",
           ("tests/test_parity.py::test_float64_forward_parity",),
           ("tests/test_parity.py", "-k", "float64_forward and mlx")),
    Mutant("torch-float16-avg-pool-1pct", "torch's avg_pool off by 1% in float16 only",
           "backends/torch.py",
           "    def avg_pool(self, x, kernel_size, stride):\n",
           "    def avg_pool(self, x, kernel_size, stride):\n"
           "        if x.dtype == torch.float16:\n"
           "            return F.avg_pool2d(x, kernel_size, stride, ceil_mode=True, count_include_pad=False) * 1.01\n",
           ("tests/test_parity.py::test_low_precision_parity",),
           ("tests/test_parity.py", "-k", "low_precision and resnet50d and torch"), fast=False),
    # issue 19/20's additions: MLX's Winograd convs, the streamed loader's crops, tinygrad's default device
    Mutant("mlx-winograd-filter-sign", "a sign flipped in Winograd F(4x4,3x3)'s filter transform",
           "backends/_mlx_kernels.py",
           "[[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],",
           "[[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, 1 / 6],",
           ("tests/test_mlx_kernels.py::test_winograd_conv_equals_the_reference_in_float64_and_float32",
            "tests/test_mlx_kernels.py::test_winograd_conv_hand_written_gradient_equals_the_reference_in_float64"),
           ("tests/test_mlx_kernels.py", "-k", "winograd_conv")),
    Mutant("stream-flip-vertical", "streamed training flips images upside down instead of left to right",
           "portres/data/streaming.py",
           "return np.ascontiguousarray(array[:, :, ::-1]) if flip else array",
           "return np.ascontiguousarray(array[:, ::-1, :]) if flip else array",
           ("tests/test_imagenet.py::test_training_batches_are_a_pure_function_of_seed_epoch_and_batch",),
           ("tests/test_imagenet.py", "-k", "pure_function")),
    Mutant("stream-same-crops-every-batch", "streamed training draws every batch's crops from one seed",
           "portres/data/streaming.py",
           "rng = np.random.default_rng([seed, epoch, index])",
           "rng = np.random.default_rng([seed, epoch])",
           ("tests/test_imagenet.py::test_training_batches_are_a_pure_function_of_seed_epoch_and_batch",),
           ("tests/test_imagenet.py", "-k", "pure_function")),
    Mutant("tinygrad-small-steps-on-cl", "tinygrad's default device sends small training steps to OpenCL too",
           "backends/tinygrad.py",
           "return \"CPU\" if small or opencl.compute_units < 2 else chosen",
           "return \"CPU\" if opencl.compute_units < 2 else chosen",
           ("tests/test_tinygrad_device.py::test_training_and_bench_ask_for_the_work_at_hand",
            "tests/test_tinygrad_device.py::test_on_a_cpu_only_machine_with_pocl_inference_and_large_steps_go_to_every_core"),
           ("tests/test_tinygrad_device.py",)),
]


def working_tree_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    return [Path(name) for name in listed if name and (ROOT / name).is_file()]


def make_copy(destination: Path) -> None:
    """The working tree as it is now, with portres.backends and portres.cli importable from the copy."""
    for name in working_tree_files():
        (destination / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, destination / name)
    # the editable install maps portres.backends and portres.cli to the live tree's backends/ and cli/; links
    # in the copy's package come first on the path, so the copy's own files are imported
    for package in ("backends", "cli"):
        (destination / "portres" / package).symlink_to(Path("..") / package, target_is_directory=True)


def patch(tree: Path, mutant: Mutant) -> None:
    path = tree / mutant.path
    text = path.read_text()
    found = text.count(mutant.old)
    if found != 1:
        raise SystemExit(f"mutant {mutant.name}: its text is found {found} times in {mutant.path}, not once: "
                         "update tests/mutants.py")
    path.write_text(text.replace(mutant.old, mutant.new))


def environment(tree: Path) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in ("PORTRES_FULL_ZOO", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.pop("PORTRES_EXPECT_BACKENDS", None)  # the mutants need no particular backend (a missing one: survives)
    return env


def check_imports_from(tree: Path) -> None:
    code = "import portres, portres.backends, portres.cli; print(portres.__file__, portres.backends.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=environment(tree), capture_output=True,
                         text=True, check=True).stdout
    if any(not Path(path).resolve().is_relative_to(tree.resolve()) for path in out.split()):
        raise SystemExit(f"the copy imports portres from outside itself ({out.strip()}): mutants would not apply")


FAILED = re.compile(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$")


def run_pytest(tree: Path, arguments: list[str], timeout: float, fast: bool = True,
               first_failure: bool = True) -> tuple[int, list[str], str]:
    command = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
               *(["-x"] if first_failure else []), *(["--fast"] if fast else []), *arguments]
    try:
        done = subprocess.run(command, cwd=tree, env=environment(tree), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, [], f"timed out after {timeout:.0f} s"
    red = [match.group(1) for line in done.stdout.splitlines() if (match := FAILED.match(line))]
    return done.returncode, red, done.stdout[-3000:] + done.stderr[-2000:]


def verdict(mutant: Mutant, code: int, red: list[str]) -> str:
    if code == -1:
        return "TIMEOUT"
    if code == 0 or not red:
        return "SURVIVED" if code in (0, 5) else f"ERROR (pytest exit {code}, no failed test named)"
    if any(test.startswith(catcher) for test in red for catcher in mutant.catchers):
        return "caught"
    return "CAUGHT ELSEWHERE"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="run the whole of `pytest --fast` for each mutant")
    parser.add_argument("--only", action="append", default=[], help="a mutant's name or a prefix (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selections")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per pytest run (default 1800)")
    args = parser.parse_args(argv)

    chosen = [m for m in MUTANTS if not args.only or any(m.name.startswith(prefix) for prefix in args.only)]
    if args.list or not chosen:
        for mutant in MUTANTS:
            print(f"{mutant.name:30s} {mutant.what} ({mutant.path})")
        return 0 if args.list else 2
    selection = (lambda mutant: []) if args.full else (lambda mutant: list(mutant.quick))

    results = []
    with tempfile.TemporaryDirectory(prefix="portres-mutants-") as scratch:
        pristine = Path(scratch) / "pristine"
        pristine.mkdir()
        make_copy(pristine)
        check_imports_from(pristine)
        if not args.no_baseline:  # the selections must be green before any mutant is applied
            for mutant in chosen if not args.full else chosen[:1]:
                code, red, tail = run_pytest(pristine, selection(mutant), args.timeout, mutant.fast or args.full)
                if code != 0:
                    print(f"baseline of {mutant.name}'s selection is not green (exit {code}, red: {red}):\n{tail}")
                    return 1
            print(f"baseline: {'pytest --fast' if args.full else 'every quick selection'} is green", flush=True)
        for mutant in chosen:
            tree = Path(scratch) / mutant.name
            shutil.copytree(pristine, tree, symlinks=True)
            patch(tree, mutant)
            check_imports_from(tree)
            started = time.monotonic()
            code, red, tail = run_pytest(tree, selection(mutant), args.timeout, mutant.fast or args.full,
                                         first_failure=not args.full)
            seconds = time.monotonic() - started
            outcome = verdict(mutant, code, red)
            results.append((mutant, outcome))
            tier = "" if mutant.fast or args.full else " [make test tier]"
            print(f"{mutant.name:30s} {outcome:16s} {seconds:6.0f} s  {mutant.what}{tier}", flush=True)
            for test in red:
                print(f"    red: {test}")
            if outcome != "caught":
                print("    " + tail.replace("\n", "\n    "))
            shutil.rmtree(tree, ignore_errors=True)
    caught = sum(outcome == "caught" for _, outcome in results)
    print(f"{caught} of {len(results)} mutants caught by the tests named for them"
          f"{' (pytest --fast)' if args.full else ' (quick selections)'}")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
