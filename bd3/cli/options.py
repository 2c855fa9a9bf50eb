"""Options shared by several commands, defined once."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import typer

RunArg = Annotated[
    Optional[Path],
    typer.Argument(help="Run directory. Default: the newest run under ./runs.", show_default=False),
]


def _check_device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise typer.BadParameter(f"{value!r} is not a device; use auto, cpu, cuda or cuda:N.")
    return value


Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", callback=_check_device)]
Seed = Annotated[int, typer.Option(help="Random seed.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")]
Precision = Annotated[str, typer.Option(help="auto (bf16 autocast where the hardware has it), fp32 or bf16.")]
BatchSize = Annotated[int, typer.Option(help="Sequences per batch.", min=1)]
BlockSize = Annotated[Optional[int], typer.Option(help="Block size L' (must divide the length).", min=1, show_default=False)]
Data = Annotated[
    str,
    typer.Option(
        help="Built-in set (web, devil, jargon, mhcc), hub set (owt, lm1b, wikitext103, ...), "
        "text/jsonl/parquet path or glob, or a folder written by `bd3 tokenize`."
    ),
]
Tokenizer = Annotated[str, typer.Option(help="gpt2, bert-base-uncased, bpe (trained on the data; shipped for web) or path/to/tokenizer.json.")]
VocabSize = Annotated[int, typer.Option(help="Vocabulary size when training a BPE tokenizer.", min=16)]
Length = Annotated[int, typer.Option(help="Context length L in tokens.", min=8)]


def _check_clip(value: tuple[float, float] | None) -> tuple[float, float] | None:
    if value is not None and not (0.0 <= value[0] <= value[1] <= 1.0 and value[1] > 0.0):
        raise typer.BadParameter(f"[{value[0]}, {value[1]}] must lie inside [0, 1] with BETA <= OMEGA, for example 0.45 0.95.")
    return value


Clip = Annotated[
    Optional[tuple[float, float]],
    typer.Option(
        help="Clip interval BETA OMEGA: draw t from U[beta, omega] during training.", show_default=False, callback=_check_clip
    ),
]
