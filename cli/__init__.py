"""The ``portres`` command line: one module per verb family, registered on one click group.

User errors (unknown preset, invalid spec file, bad argument, missing framework) print one
``portres: error: ...`` line on stderr and exit with status 2, never a traceback; status 1
means "ran, and a backend disagrees".
"""

from . import bench, catalog, convert, experiments, export, parity, predict, train  # noqa: F401 - importing a verb module registers its commands
from .app import main

__all__ = ["main"]
