"""``python -m stampede demo``: see ``stampede._demo``."""

from ._demo import cli

raise SystemExit(cli())
