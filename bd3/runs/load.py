"""Opening a run for use: its model loaded strictly, its tokenizer checked, its token shards."""

from __future__ import annotations

from pathlib import Path

import torch

from bd3.data.shards import TokenShards, cached_shards
from bd3.data.tokenizer import Tokenizer
from bd3.errors import Bd3Error
from bd3.model import DiT
from bd3.runs.rundir import Run, load_strict, resolve_run


def open_run(path: Path | None) -> Run:
    """The run at ``path``, or the newest under ./runs when ``path`` is None."""
    return Run.open(resolve_run(path))


def load_model(run: Run, device: torch.device, which: str = "ema") -> DiT:
    """The run's model with its newest checkpoint's weights (EMA by default), strictly."""
    cfg = run.config
    model = DiT(cfg.model, cfg.data.vocab_size)
    ckpt = run.latest_checkpoint()
    load_strict(model, run.weights(which, ckpt), ckpt / f"{which}.safetensors")
    return model.to(device).eval()


def run_tokenizer(run: Run) -> Tokenizer:
    """The run's own tokenizer.json, checked against the hash its config records."""
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
