"""`bd3 sample`: options -> the block (or AR) sampler -> text on stdout, block by block."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Annotated, Optional

import torch
import typer

from bd3.cli import options as o
from bd3.cli.common import err, load_model, open_run, run_tokenizer
from bd3.runtime import resolve_device
from bd3.sampling.ar import sample_ar
from bd3.sampling.block import sample_blocks
from bd3.sampling.text import TextStream, render

FORMATS = ("text", "jsonl")


def sample(
    run: o.RunArg = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens per sample, BOS included, rounded up to whole blocks; beyond the model length a sliding window is used.", min=2)] = 512,
    num_samples: Annotated[int, typer.Option(help="Number of samples.", min=1)] = 1,
    batch_size: Annotated[Optional[int], typer.Option(help="Samples generated together. Default: all of them.", min=1, show_default=False)] = None,
    block_size: o.BlockSize = None,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 disables).", min=0.0, max=1.0)] = 0.9,
    temperature: Annotated[float, typer.Option(help="Softmax temperature.", min=1e-4)] = 1.0,
    kv_cache: Annotated[bool, typer.Option(help="Reuse the K/V of finished blocks (exact within the model length).")] = True,
    format_: Annotated[str, typer.Option("--format", help="text, or jsonl (one object per sample).")] = "text",
    seed: o.Seed = 1,
    device: o.Device = "auto",
) -> None:
    """Generate text. Each model call unmasks one position per row (first-hitting) and the
    finished blocks are cached; text streams to stdout as blocks finish, a summary goes to
    stderr.

    Examples:

    \b
      bd3 sample --max-tokens 16000 | less
      bd3 sample runs/owt-bs4 --num-samples 8 --format jsonl > samples.jsonl
      bd3 sample --block-size 4 --top-p 0.95 --seed 3
    """
    if format_ not in FORMATS:
        raise typer.BadParameter(f"{format_!r} is not one of {', '.join(FORMATS)}.", param_hint="--format")
    r = open_run(run)
    cfg = r.config
    bs = block_size or cfg.diffusion.block_size
    if cfg.diffusion.algo == "bd3lm" and cfg.model.length % bs:
        raise typer.BadParameter(f"{bs} does not divide the model length {cfg.model.length}.", param_hint="--block-size")
    tok = run_tokenizer(r)
    dev = resolve_device(device)
    model = load_model(r, dev)
    batch_size = min(batch_size or num_samples, num_samples)
    try:
        _generate(model, cfg, tok, dev, block_size=bs, num_samples=num_samples, batch_size=batch_size, max_tokens=max_tokens,
                  top_p=top_p, temperature=temperature, kv_cache=kv_cache, format_=format_, seed=seed)
    except BrokenPipeError:  # the reader left (`bd3 sample | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _generate(model, cfg, tok, dev, *, block_size, num_samples, batch_size, max_tokens, top_p, temperature, kv_cache,
              format_, seed) -> None:
    """Batches of samples; text streams when one sample is generated at a time."""
    generator = torch.Generator(device=dev).manual_seed(seed)
    start, tokens, nfe, done = time.perf_counter(), 0, 0, 0
    while done < num_samples:
        b = min(batch_size, num_samples - done)
        stream = TextStream(tok, sys.stdout) if format_ == "text" and b == 1 else None
        t0 = time.perf_counter()
        common = dict(batch=b, max_tokens=max_tokens, length=cfg.model.length, mask_id=cfg.data.mask_id, bos_id=cfg.data.bos_id,
                      generator=generator, top_p=top_p, temperature=temperature, on_block=stream.update if stream else None)
        if cfg.diffusion.algo == "ar":
            x, stats = sample_ar(model, **common)
        else:
            x, stats = sample_blocks(model, block_size=block_size, kv_cache=kv_cache, **common)
        seconds = time.perf_counter() - t0
        x = x.cpu()
        for i, row in enumerate(x.tolist()):
            if format_ == "jsonl":
                obj = {"text": render(row, tok), "tokens": row, "nfe": stats.nfe, "seconds": seconds, "stop": "length"}
                print(json.dumps(obj), flush=True)
            elif stream is not None:
                stream.finish()
            else:
                print(render(row, tok) + "\n", flush=True)
            if format_ == "text" and done + i + 1 < num_samples:
                print("\n" + "=" * 80 + "\n", flush=True)
        tokens += x.numel()
        nfe += stats.nfe * b
        done += b
    elapsed = time.perf_counter() - start
    err.print(
        f"{num_samples} sample(s), {tokens} tokens in {elapsed:.1f}s: {tokens / elapsed:.1f} tokens/s, "
        f"{nfe / tokens:.2f} model calls per token"
    )
