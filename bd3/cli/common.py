"""Glue shared by the commands: resolving runs, loading models and shards, printing."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bd3.data.shards import TokenShards, cached_shards
from bd3.data.tokenizer import Tokenizer
from bd3.errors import Bd3Error, cannot_write
from bd3.model import DiT
from bd3.runs import Run, load_strict, resolve_run

err = Console(stderr=True)


def open_run(path: Path | None) -> Run:
    return Run.open(resolve_run(path))


def load_model(run: Run, device: torch.device, which: str = "ema") -> DiT:
    """The run's model with its newest checkpoint's weights (EMA by default), strictly."""
    cfg = run.config
    model = DiT(cfg.model, cfg.data.vocab_size)
    ckpt = run.latest_checkpoint()
    load_strict(model, run.weights(which, ckpt), ckpt / f"{which}.safetensors")
    return model.to(device).eval()


def run_tokenizer(run: Run) -> Tokenizer:
    tok = Tokenizer.from_file(run.tokenizer_path, name=run.config.data.tokenizer)
    expected = run.config.data.tokenizer_sha256
    if expected and tok.sha256 != expected:
        raise Bd3Error(f"{run.tokenizer_path} does not match the tokenizer recorded in {run.path / 'config.json'}; restore the run's tokenizer.json.")
    return tok


def shards_for(data: str, tokenizer: str, length: int, vocab_size: int, wrap: str | None = None) -> TokenShards:
    """A `bd3 tokenize` folder as is (its row format must be ``wrap`` when given), else the
    cached shards for (data, tokenizer, length, wrap; default special)."""
    p = Path(data)
    if p.is_dir() and (p / "meta.json").exists():
        shards = TokenShards(p)
        if wrap is not None and shards.wrap != wrap:
            raise Bd3Error(f"The shards in {p} have {shards.wrap} rows, not {wrap}; tokenize again with --wrap {wrap}, or leave --wrap out.")
        return shards
    return cached_shards(data, tokenizer, length, vocab_size=vocab_size, wrap=wrap or "special")


def run_shards(run: Run, length: int | None = None) -> TokenShards:
    """Token shards of the run's own data, tokenized with the run's own tokenizer."""
    cfg = run.config
    run_tokenizer(run)  # a tokenizer.json that does not match the run is named first
    shards = shards_for(cfg.data.data, str(run.tokenizer_path), length or cfg.model.length, 0, cfg.data.wrap)
    if cfg.data.tokenizer_sha256 and shards.meta["tokenizer_sha256"] != cfg.data.tokenizer_sha256:
        raise Bd3Error(f"The data in {shards.path} was tokenized with another tokenizer than run {run.path}.")
    return shards


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
    return "" if v is None else str(v)
