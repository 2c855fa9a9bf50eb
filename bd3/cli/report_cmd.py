"""`bd3 report`: run directories -> bd3.evaluate.report -> a table, and files with --out."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from bd3.cli import options as o


def report(
    runs: Annotated[Optional[list[Path]], typer.Argument(help="Run directories to compare.", metavar="RUN...", show_default=False)] = None,
    out: Annotated[
        Optional[Path],
        typer.Option(help="Also write report.md, report.json, report.html (self-contained) and the figures into this folder.", show_default=False),
    ] = None,
    force: o.Force = False,
    json_: o.Json = False,
) -> None:
    """Runs side by side: algorithm, block size, clip, steps, tokens seen, validation
    perplexity with its 95 % interval, zero-shot, generative perplexity, model calls per
    token, wall time. Training numbers come from each run's metrics.jsonl and config.json,
    evaluation numbers from what `bd3 eval` and `bd3 variance` saved in RUN/eval/ (the newest
    of each kind). Runs of different data or tokenizers are refused.

    With --out, the figures (training loss and validation NELBO against tokens seen; NELBO
    variance against the clip interval; perplexity by block size; gen PPL against NFE)
    need matplotlib: pip install 'bd3[plot]'.

    Examples:

    \b
      bd3 report runs/*
      bd3 report runs/ar runs/mdlm runs/bs4 --out results/ladder
      bd3 report runs/* --json > runs.json
    """
    if not runs:
        raise typer.BadParameter("give at least one run directory, e.g. bd3 report runs/*.", param_hint="RUN")
    from rich.console import Console

    from bd3.evaluate import report as report_lib

    if out is not None:
        report_lib.check_out(out, force)  # before reading every run
    result = report_lib.collect(runs)
    if json_:
        print(json.dumps(result, indent=2))
    else:
        console = Console(file=sys.stdout)
        if not console.is_terminal:  # a pipe or a file: one line per run, however wide
            console = Console(file=sys.stdout, width=250)
        console.print(report_lib.terminal_table(result))
    if out is not None:
        written = report_lib.write_report(result, out, force)
        print(f"Wrote {len(written)} files to {out}", file=sys.stderr)
        if not report_lib.has_matplotlib():
            print(report_lib.PLOT_HINT, file=sys.stderr)
