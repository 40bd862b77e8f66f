"""Three tiers of one suite:

* ``make test`` (what CI runs, about 25 minutes on 2 cores): every test, every zoo entry on every
  framework. A zoo-parametrised test runs the shallowest network of each distinct architecture
  (the shallowest of resnet18/34, of resnet50/101/152, of resnet20/32/.../1202, ...: REPRESENTATIVES)
  on the full case, and the deeper twins and the HEAVY_NETWORKS on a reduced one: the forward parity
  at the smallest input the network accepts (32x32 for ImageNet stems, 8x8 for CIFAR ones) on one
  image (:func:`forward_case`), the float64 gradient parity on two images (:func:`gradient_case`) on
  one framework each, MLX and torch in turn (:func:`gradient_frameworks`). tinygrad, which compiles
  every network anew, runs the forward parity (BN folded) on the representatives but the
  HEAVY_NETWORKS, both ways on TINYGRAD_DEEP, and its other zoo-parametrised tests on resnet20 alone.
* ``make test-full`` (``PORTRES_FULL_ZOO=1``): every zoo entry on every backend on the full case,
  tinygrad included (its kernels compile for about a minute per network on 2 cores).
* ``make test-fast`` (``--fast``): the inner loop: the reference, one small network per framework
  and the mechanics, in a few minutes; it keeps a zoo-parametrised test only for FAST_NETWORKS,
  runs tinygrad only where FAST_TINYGRAD says, and drops tests marked ``slow``.
* ``--opencl`` (``make test`` runs it after the main run where tinygrad finds an OpenCL device): the same
  tests with tinygrad on its CL device (``DEV=CL``; pocl on a CPU-only machine): forward parity of every
  distinct architecture (REPRESENTATIVES, but the heavy ones), float64 forward parity, gradient parity of
  resnet20 and the small networks covering every layer kind, and the low-precision tests (OPENCL_TESTS).

  Where it runs, the main run leaves those tests to it, but for the inner loop's (FAST_TINYGRAD on
  resnet20), which stay on the CPU device: tinygrad's lowering is checked in depth on one device per run.

Everywhere else tinygrad runs on the device a test names, or on its CPU device (``DEV=CPU`` below, unless
the environment sets ``DEV``): the short compiles keep the main run within its time.

``PORTRES_EXPECT_BACKENDS="numpy,tinygrad,..."`` (the Makefile's test targets set it) names the
backends the run must find: a framework that failed to install then fails the run at its start,
instead of its tests silently not being collected.
"""

from __future__ import annotations

import os

import pytest

# before any test imports tinygrad, which reads DEV once (portres's own default would pick OpenCL's
# every-core device for large work: see backends/tinygrad.py default_device)
os.environ.setdefault("DEV", "CPU")

from portres import backends, zoo  # noqa: E402

FAST_NETWORKS = {"resnet20"}
FAST_TINYGRAD = ("test_float32_parity_for_every_zoo_entry", "test_float64_gradient_parity_for_every_zoo_entry",
                 "test_float64_forward_parity")
FULL_ZOO = os.environ.get("PORTRES_FULL_ZOO") == "1"
EXPECT_VARIABLE = "PORTRES_EXPECT_BACKENDS"


def _architecture(name: str) -> str:
    """A zoo entry's architecture without its depth: entries that differ only in blocks per stage share it."""
    spec = zoo.resolve(name).to_dict()
    spec.pop("name", None)
    spec["stages"] = [{key: value for key, value in stage.items() if key != "blocks"} for stage in spec["stages"]]
    return repr(sorted(spec.items()))


def architecture_representatives() -> set[str]:
    """The shallowest zoo entry of each distinct architecture (16 of the zoo's entries today)."""
    chosen: dict[str, str] = {}
    for name in zoo.names():
        key, blocks = _architecture(name), sum(stage.blocks for stage in zoo.resolve(name).stages)
        if key not in chosen or blocks < sum(stage.blocks for stage in zoo.resolve(chosen[key]).stages):
            chosen[key] = name
    return set(chosen.values())


REPRESENTATIVES = architecture_representatives()
# distinct architectures whose size (not their kind of block) makes them slow: the default tier runs them
# on the reduced case, like the deeper twins, and tinygrad leaves them to the full tier
HEAVY_NETWORKS = {"resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "resnetv2_164"}
# the deep twins tinygrad runs by default (the reduced case): plain110 is where float32 drifts most
TINYGRAD_DEEP = {"plain110"}
# tinygrad cases left to the full tier, where another test of the default tier checks the same on tinygrad
# (the stored torchvision outputs test runs `portres predict` on resnet50 on every backend)
TINYGRAD_FULL_TIER = {"test_predictions_agree_across_backends"}


def reduced(name: str) -> bool:
    """Whether this tier runs zoo entry ``name`` on the reduced case (deeper twins and heavy networks)."""
    return not FULL_ZOO and (name not in REPRESENTATIVES or name in HEAVY_NETWORKS)


def forward_case(name: str) -> tuple[int, int]:
    """(input size, batch) of the forward parity of zoo entry ``name`` in this tier."""
    from portres.parity import parity_input_size
    from portres.plan import make_plan

    spec = zoo.resolve(name)
    if reduced(name):  # the smallest input the network accepts (CIFAR: 8x8, so the last stage is 2x2), one image
        return max(make_plan(spec).total_stride, 8), 1
    return parity_input_size(spec), 2


def gradient_case(name: str) -> tuple[int, int]:
    """(input size, batch) of the float64 gradient parity of zoo entry ``name`` in this tier.

    The reduced case keeps the input size: a framework's float64 backward costs the same at 32x32 as
    at 64x64 (per-op overhead dominates), and at 32x32 an ImageNet network's last train-mode BNs see
    one value per image, which makes the gradients chaotic (resnet101 at 32x32, 2 images: 1e-4 apart
    in float64; at 64x64: 4e-12). It takes 2 images instead of 4.
    """
    from portres.parity import parity_input_size

    return parity_input_size(zoo.resolve(name)), 2 if reduced(name) else 4


def gradient_frameworks(name: str) -> tuple[str, ...]:
    """The frameworks the float64 gradient parity of zoo entry ``name`` runs on in this tier: every one,
    but a network on the reduced case runs on one, MLX and torch in turn (in zoo order), since a
    framework's float64 backward of a deep network takes 10-40 s on 2 cores."""
    if not reduced(name):
        return backends.TRAINABLE
    rotation = [backend for backend in ("mlx", "torch") if backend in backends.available(training=True)]
    on_reduced = [network for network in zoo.names() if reduced(network)]
    return (rotation[on_reduced.index(name) % len(rotation)],) if rotation else ()


# the tinygrad tests the --opencl tier runs on the CL device (zoo-parametrised ones on OPENCL_NETWORKS)
# (the forward parity on every distinct architecture; the rest on resnet20 and small networks)
OPENCL_TESTS = ("test_float32_parity_for_every_zoo_entry", "test_float64_forward_parity",
                "test_float64_gradient_parity_for_every_zoo_entry", "test_gradient_parity_of_every_layer_kind",
                "test_random_small_networks_agree_in_float32", "test_low_precision_parity")
OPENCL_NETWORKS = (REPRESENTATIVES - HEAVY_NETWORKS) | FAST_NETWORKS


def pytest_addoption(parser):
    parser.addoption("--fast", action="store_true", help="the inner-loop tier (see tests/conftest.py)")
    parser.addoption("--opencl", action="store_true", help="tinygrad's parity suites on its OpenCL device")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: left out by --fast (long runs, sweeps, subprocess kills)")
    if config.getoption("--opencl"):
        os.environ["DEV"] = "CL"  # tinygrad is imported later, by the test modules


def missing_expected_backends(expected: str | None) -> list[str]:
    """One line per backend named in ``expected`` (comma-separated) that cannot run here, saying why and
    which pip extra installs it."""
    lines = []
    for name in [part.strip() for part in (expected or "").split(",") if part.strip()]:
        if name not in backends.NAMES:
            lines.append(f"{EXPECT_VARIABLE} names {name!r}, which is no backend: choose from "
                         f"{', '.join(backends.NAMES)}")
            continue
        reason = backends.unavailable_reason(name)
        if reason is not None:
            hint = backends.install_hint(name)
            extra = "" if hint in reason else f" (it installs with {hint})"
            lines.append(f"{EXPECT_VARIABLE}: the {name} backend is not available: {reason}{extra}")
    return lines


def opencl_problem() -> str | None:
    """Why the --opencl tier cannot run here, or None."""
    reason = backends.unavailable_reason("tinygrad", "CL")
    if reason is None and backends.load("tinygrad").opencl_device() is None:
        reason = "tinygrad finds no OpenCL device (Debian/Ubuntu: sudo apt-get install pocl-opencl-icd)"
    return reason


def pytest_sessionstart(session):
    if session.config.getoption("--opencl") and (problem := opencl_problem()):
        raise pytest.UsageError(f"--opencl: {problem}")
    missing = missing_expected_backends(os.environ.get(EXPECT_VARIABLE))
    if missing:  # its tests would not be collected, and the run would stay green without them
        raise pytest.UsageError("\n".join(missing))


def _params(item) -> dict:
    return item.callspec.params if hasattr(item, "callspec") else {}


def _zoo_network(item) -> str | None:
    network = _params(item).get("name")
    return network if isinstance(network, str) and network in zoo.names() else None


def opencl_tier_runs() -> bool:
    """Whether ``make test`` runs the --opencl tier after the main run (tinygrad finds an OpenCL device)."""
    return os.environ.get("PORTRES_OPENCL_TIER", "auto") != "off" and opencl_problem() is None


def _in_default_tier(item, opencl_tier: bool = False) -> bool:
    network = _zoo_network(item)
    frameworks = {value for value in _params(item).values()
                  if isinstance(value, str) and value != "numpy" and value in backends.NAMES}
    if "tinygrad" in frameworks and item.originalname in TINYGRAD_FULL_TIER:
        return False
    if opencl_tier and "tinygrad" in frameworks and _in_opencl_tier(item):
        return item.originalname in FAST_TINYGRAD and network in FAST_NETWORKS  # the rest: on CL
    if network is None or "tinygrad" not in frameworks:
        return True  # every other framework runs every zoo entry (deep twins and heavy ones on the reduced case)
    # tinygrad compiles every network anew: the zoo's forward parity on the representatives (but the heavy
    # ones) and TINYGRAD_DEEP, everything else on resnet20
    if network in FAST_NETWORKS:
        return True
    if item.originalname != "test_float32_parity_for_every_zoo_entry":
        return False
    if network in TINYGRAD_DEEP:
        return True
    return network in REPRESENTATIVES and network not in HEAVY_NETWORKS and _params(item).get("bn") != "unfolded"


def _in_fast_tier(item) -> bool:
    if item.get_closest_marker("slow"):
        return False
    network = _zoo_network(item)
    if network is not None and network not in FAST_NETWORKS:
        return False
    if any(isinstance(value, str) and value == "tinygrad" for value in _params(item).values()):
        return item.originalname in FAST_TINYGRAD
    return True


def _in_opencl_tier(item) -> bool:
    on_tinygrad = any(isinstance(value, str) and value == "tinygrad" for value in _params(item).values())
    if not on_tinygrad or item.originalname not in OPENCL_TESTS:
        return False
    network = _zoo_network(item)
    if item.originalname != "test_float32_parity_for_every_zoo_entry":
        return network is None or network in FAST_NETWORKS
    return network in OPENCL_NETWORKS and _params(item).get("bn") != "unfolded"


def pytest_collection_modifyitems(config, items):
    if config.getoption("--opencl"):
        keep = _in_opencl_tier
    elif config.getoption("--fast"):
        keep = _in_fast_tier
    elif FULL_ZOO:
        return
    else:
        opencl_tier = opencl_tier_runs()
        keep = lambda item: _in_default_tier(item, opencl_tier)  # noqa: E731
    kept = [item for item in items if keep(item)]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept
