"""Two tiers: the full suite (``make test``, what CI runs) and ``--fast`` (``make test-fast``), the
inner loop: the reference, one small network per framework and the mechanics, in a few minutes.

``--fast`` keeps a zoo-parametrised test only for the networks in FAST_NETWORKS, runs tinygrad
(whose kernels compile for about a minute per network on 2 cores) only where FAST_TINYGRAD says,
and drops tests marked ``slow``.
"""

from __future__ import annotations

from portres import zoo

FAST_NETWORKS = {"resnet20"}
FAST_TINYGRAD = ("test_float32_parity_for_every_zoo_entry", "test_float64_gradient_parity_for_every_zoo_entry")


def pytest_addoption(parser):
    parser.addoption("--fast", action="store_true", help="the inner-loop tier (see tests/conftest.py)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: left out by --fast (long runs, sweeps, subprocess kills)")


def _in_fast_tier(item) -> bool:
    if item.get_closest_marker("slow"):
        return False
    params = item.callspec.params if hasattr(item, "callspec") else {}
    network = params.get("name")
    if isinstance(network, str) and network in zoo.names() and network not in FAST_NETWORKS:
        return False
    if any(isinstance(value, str) and value == "tinygrad" for value in params.values()):
        return item.originalname in FAST_TINYGRAD
    return True


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--fast"):
        return
    kept = [item for item in items if _in_fast_tier(item)]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept
