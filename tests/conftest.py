"""Three tiers of one suite:

* ``make test`` (what CI runs, under 20 minutes on 2 cores): every test; a zoo-parametrised test
  runs a *framework* backend only on one network per distinct architecture (the shallowest of
  resnet18/34, of resnet50/101/152, of resnet20/32/.../1202, ...: deeper twins repeat the same
  blocks, so they add time, not coverage). The NumPy reference still covers every entry.
  tinygrad, which compiles every network anew, runs the forward parity on those networks but the
  HEAVY_NETWORKS and its other zoo-parametrised tests on resnet20; the float64 gradient parity
  leaves out HEAVY_NETWORKS.
* ``make test-full`` (``PORTRES_FULL_ZOO=1``): every zoo entry on every backend, tinygrad included
  where the default tier runs it on a few networks (its kernels compile for about a minute per
  network on 2 cores).
* ``make test-fast`` (``--fast``): the inner loop: the reference, one small network per framework
  and the mechanics, in a few minutes; it keeps a zoo-parametrised test only for FAST_NETWORKS,
  runs tinygrad only where FAST_TINYGRAD says, and drops tests marked ``slow``.
"""

from __future__ import annotations

import os

from portres import backends, zoo

FAST_NETWORKS = {"resnet20"}
FAST_TINYGRAD = ("test_float32_parity_for_every_zoo_entry", "test_float64_gradient_parity_for_every_zoo_entry")
FULL_ZOO = os.environ.get("PORTRES_FULL_ZOO") == "1"


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
# distinct architectures whose size (not their kind of block) makes them slow: their grouped, wide and deep
# bottleneck blocks are covered by resnext50_32x4d, resnet50 and resnetv2_50; the full tier runs them everywhere
HEAVY_NETWORKS = {"resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "resnetv2_164"}


def pytest_addoption(parser):
    parser.addoption("--fast", action="store_true", help="the inner-loop tier (see tests/conftest.py)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: left out by --fast (long runs, sweeps, subprocess kills)")


def _params(item) -> dict:
    return item.callspec.params if hasattr(item, "callspec") else {}


def _zoo_network(item) -> str | None:
    network = _params(item).get("name")
    return network if isinstance(network, str) and network in zoo.names() else None


def _in_default_tier(item) -> bool:
    network = _zoo_network(item)
    frameworks = {value for value in _params(item).values()
                  if isinstance(value, str) and value != "numpy" and value in backends.NAMES}
    if network is None or not frameworks:
        return True
    if network not in REPRESENTATIVES:
        return False
    if "tinygrad" in frameworks:  # compiles every network anew: the zoo's forward parity, else resnet20 alone
        return network in FAST_NETWORKS or (item.originalname == "test_float32_parity_for_every_zoo_entry"
                                            and network not in HEAVY_NETWORKS)
    return item.originalname != "test_float64_gradient_parity_for_every_zoo_entry" or network not in HEAVY_NETWORKS


def _in_fast_tier(item) -> bool:
    if item.get_closest_marker("slow"):
        return False
    network = _zoo_network(item)
    if network is not None and network not in FAST_NETWORKS:
        return False
    if any(isinstance(value, str) and value == "tinygrad" for value in _params(item).values()):
        return item.originalname in FAST_TINYGRAD
    return True


def pytest_collection_modifyitems(config, items):
    if config.getoption("--fast"):
        keep = _in_fast_tier
    elif FULL_ZOO:
        return
    else:
        keep = _in_default_tier
    kept = [item for item in items if keep(item)]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept
