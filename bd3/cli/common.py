"""Glue shared by the commands: printing tables and writing to stdout. Opening runs, their
models, tokenizers and shards is the library's (bd3.runs.load)."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager

from rich.console import Console
from rich.table import Table

from bd3.errors import cannot_write

err = Console(stderr=True)


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str]], as_json: bool, payload: dict | list) -> None:
    """A rich table on stdout, or ``payload`` as JSON with --json."""
    with stdout_writes():
        if as_json:
            print(json.dumps(payload, indent=2))
            return
        table = Table(title=title)
        for _, header in columns:
            table.add_column(header)
        for row in rows:
            table.add_row(*(_fmt(row.get(key)) for key, _ in columns))
        Console(file=sys.stdout).print(table)


@contextmanager
def stdout_writes():
    """Writes to stdout, flushed at the end; one that fails (a full disk, /dev/full) is one
    error line. BrokenPipeError (the reader left, `| head`) passes through for the caller."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the final flush at exit fails quietly
        raise cannot_write("standard output", e, "send the output to a disk with room") from None


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, float) for x in v):  # an interval
        return f"{v[0]:.4g}-{v[1]:.4g}"
    return "" if v is None else str(v)
