"""`bd3 sample`: options -> bd3.sampling.generate -> text (or JSONL) on stdout, block by block."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from bd3.cli import options as o
from bd3.cli.common import err, load_model, open_run, run_tokenizer
from bd3.errors import Bd3Error
from bd3.runtime import resolve_device
from bd3.sampling.block import RULES, STOPS, Decoding
from bd3.sampling.generate import generate
from bd3.sampling.text import SampleWriter

FORMATS = ("text", "jsonl")


def sample(
    run: o.RunArg = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens per sample, BOS and prompt included (fewer when a sample stops). Beyond the model length a sliding window keeps the last length - block size tokens.", min=2)] = 512,
    num_samples: Annotated[int, typer.Option(help="Number of samples.", min=1)] = 1,
    batch_size: Annotated[Optional[int], typer.Option(help="Samples generated together. Default: all of them.", min=1, show_default=False)] = None,
    prompt: Annotated[Optional[str], typer.Option(help="Text the samples continue.", show_default=False)] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(help="Read the prompt from this file ('-': stdin).", show_default=False)] = None,
    block_size: o.BlockSize = None,
    sampler: Annotated[Optional[str], typer.Option(help="Update rule inside a block: first-hitting (one position per row per model call), ddpm (--steps per block), threshold (--threshold). Default: first-hitting, or the rule --steps / --threshold imply.", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help="ddpm steps per block (implies --sampler ddpm). Default: the block size.", min=1, show_default=False)] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Confidence decoding: unmask every position whose most likely token has probability above P, at least one per call (implies --sampler threshold; default 0.9).", min=0.0, max=1.0, show_default=False)] = None,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 disables, 0 is greedy).", min=0.0, max=1.0)] = 0.9,
    temperature: Annotated[float, typer.Option(help="Softmax temperature.", min=1e-4)] = 1.0,
    stop: Annotated[str, typer.Option(help="End a sample early: eos (at its end-of-text token), entropy (when its last 256 tokens have a unigram entropy below 4 nats), both, or none.")] = "none",
    kv_cache: Annotated[bool, typer.Option(help="Reuse the K/V of finished blocks (exact within the model length).")] = True,
    format_: Annotated[str, typer.Option("--format", help="text, or jsonl (one object per sample: text, tokens, model calls, seconds, stop reason).")] = "text",
    seed: o.Seed = 1,
    device: o.Device = "auto",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads. Default: chosen while sampling, by timing the model calls: one while other processes keep the other cores busy (more threads would stall), all of torch's when they are free and faster.", min=1, show_default=False)] = None,
) -> None:
    """Generate text. Blocks are denoised left to right with a KV cache; text streams to
    stdout as blocks finish, a one-line summary goes to stderr.

    Examples:

    \b
      bd3 sample --max-tokens 16000 | less
      bd3 sample runs/owt-bs4 --num-samples 8 --batch-size 8 --format jsonl > samples.jsonl
      bd3 sample --prompt "In the beginning" --max-tokens 256 --stop eos
      bd3 sample --sampler ddpm --steps 8 --top-p 0.95 --seed 3
      bd3 sample --threshold 0.9        # confidence decoding: fewer model calls
    """
    if format_ not in FORMATS:
        raise typer.BadParameter(f"{format_!r} is not one of {', '.join(FORMATS)}.", param_hint="--format")
    if stop not in STOPS:
        raise typer.BadParameter(f"{stop!r} is not one of {', '.join(STOPS)}.", param_hint="--stop")
    rule = _rule(sampler, steps, threshold)
    if prompt is not None and prompt_file is not None:
        raise typer.BadParameter("give --prompt or --prompt-file, not both.", param_hint="--prompt-file")
    r = open_run(run)
    cfg = r.config
    algo, L = cfg.diffusion.algo, cfg.model.length
    if algo == "ar":
        for name, value in (("--block-size", block_size), ("--sampler", sampler), ("--steps", steps), ("--threshold", threshold)):
            if value is not None:
                raise typer.BadParameter(f"does not apply to an ar run ({r.path}), which samples token by token.", param_hint=name)
    if algo == "mdlm" and block_size is not None:
        raise typer.BadParameter(
            f"does not apply to an mdlm run ({r.path}): it denoises its whole context of {L} tokens, then slides by {L // 2}.",
            param_hint="--block-size",
        )
    bs = block_size or cfg.diffusion.block_size
    if algo == "bd3lm" and L % bs:
        raise typer.BadParameter(f"{bs} does not divide the model length {L}.", param_hint="--block-size")
    tok = run_tokenizer(r)
    ids = [cfg.data.bos_id]
    if prompt is not None or prompt_file is not None:
        ids += tok.encode(prompt if prompt is not None else _read_prompt(prompt_file))
    if len(ids) >= L:
        raise Bd3Error(
            f"The prompt is {len(ids) - 1} tokens; with BOS it must be shorter than the model's context of {L} tokens. "
            f"Shorten it to at most {L - 2} tokens."
        )
    if len(ids) >= max_tokens:
        raise typer.BadParameter(
            f"{max_tokens} leaves no room after the prompt's {len(ids)} tokens (BOS included).", param_hint="--max-tokens"
        )
    decoding = Decoding(rule=rule, steps=steps, threshold=0.9 if threshold is None else threshold, top_p=top_p,
                        temperature=temperature, stop=stop)
    dev = resolve_device(device)
    model = load_model(r, dev)
    batch_size = min(batch_size or num_samples, num_samples)
    writer = SampleWriter(tok, sys.stdout, format_, num_samples, ids)
    start = time.perf_counter()
    try:
        samples = generate(model, cfg, num_samples=num_samples, batch_size=batch_size, max_tokens=max_tokens, prompt=ids,
                           block_size=bs, decoding=decoding, kv_cache=kv_cache, seed=seed, threads=threads,
                           on_block=writer.on_block)
    except BrokenPipeError:  # the reader left (`bd3 sample | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    elapsed = time.perf_counter() - start
    new = sum(s.new_tokens for s in samples)
    calls = sum(s.nfe for s in samples)
    stops = {}
    for s in samples:
        stops[s.stop] = stops.get(s.stop, 0) + 1
    how = "token by token" if algo == "ar" else f"{rule}, block {L if algo == 'mdlm' else bs}" + ("" if kv_cache or algo == "mdlm" else ", no KV cache")
    err.print(
        f"{num_samples} sample(s), {new} new tokens in {elapsed:.1f}s: {new / max(elapsed, 1e-9):.1f} tokens/s, "
        f"{calls / max(new, 1):.2f} model calls per token ({how}; stops: "
        + ", ".join(f"{k} {v}" for k, v in sorted(stops.items())) + ")",
        highlight=False,
        markup=False,
        soft_wrap=True,  # one line, whatever the terminal's width
    )


def _rule(sampler: str | None, steps: int | None, threshold: float | None) -> str:
    """The update rule from --sampler, or the one --steps / --threshold imply."""
    if sampler is not None and sampler not in RULES:
        raise typer.BadParameter(f"{sampler!r} is not one of {', '.join(RULES)}.", param_hint="--sampler")
    if steps is not None and threshold is not None:
        raise typer.BadParameter("--steps (ddpm) and --threshold (confidence decoding) are different rules; give one.", param_hint="--threshold")
    implied = "ddpm" if steps is not None else "threshold" if threshold is not None else None
    if sampler is not None and implied is not None and sampler != implied:
        name = "--steps" if steps is not None else "--threshold"
        raise typer.BadParameter(f"applies to --sampler {implied}, not {sampler}.", param_hint=name)
    return sampler or implied or "first-hitting"


def _read_prompt(path: Path) -> str:
    if str(path) == "-":
        return sys.stdin.read()
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Bd3Error(f"The prompt file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise Bd3Error(f"Cannot read the prompt file {path}: {e}") from None
