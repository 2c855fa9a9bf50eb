"""``python -m bd3`` (and ``torchrun -m bd3``) runs the CLI."""

from bd3.cli.main import run

run()
