"""``python -m portres.cli``: the ``portres`` command, for launchers that start an interpreter
(``mlx.launch -n 2 -- $(which python) -m portres.cli train ... --distributed``)."""

from . import main

main()
