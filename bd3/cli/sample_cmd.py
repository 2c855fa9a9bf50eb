"""`bd3 sample`: options -> bd3.sampling.generate -> text (or JSONL) on stdout, block by block."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from bd3.cli import options as o
from bd3.errors import Bd3Error

FORMATS = ("text", "jsonl")


def sample(
    run: o.RunArg = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens per sample, BOS and prompt included (fewer when a sample stops). Beyond the model length a sliding window keeps the last length - block size tokens.", min=2)] = 512,
    num_samples: o.NumSamples = 1,
    batch_size: Annotated[Optional[int], typer.Option(help="Samples generated together. Default: all of them.", min=1, show_default=False)] = None,
    prompt: Annotated[Optional[str], typer.Option(help="Text the samples continue.", show_default=False)] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(help="Read the prompt from this file ('-': stdin).", show_default=False)] = None,
    block_size: o.BlockSize = None,
    sampler: o.Sampler = None,
    denoise_steps: o.DenoiseSteps = None,
    steps: o.OldSteps = None,
    threshold: o.Threshold = None,
    top_p: o.TopP = None,
    temperature: o.Temperature = 1.0,
    stop: o.Stop = "none",
    kv_cache: o.KvCache = True,
    format_: Annotated[str, typer.Option("--format", help="text, or jsonl (one object per sample: text, tokens, model calls, seconds, stop reason).")] = "text",
    seed: o.Seed = 1,
    device: o.Device = "auto",
    precision: o.SamplePrecision = "auto",
    attn: o.SampleAttn = "auto",
    threads: o.Threads = None,
) -> None:
    """Generate text. Blocks are denoised left to right with a KV cache; text streams to
    stdout as blocks finish, a one-line summary goes to stderr.

    Examples:

    \b
      bd3 sample --max-tokens 16000 | less
      bd3 sample runs/owt-bs4 --num-samples 8 --batch-size 8 --format jsonl > samples.jsonl
      bd3 sample --prompt "In the beginning" --max-tokens 256 --stop eos
      bd3 sample --sampler ddpm --denoise-steps 8 --top-p 0.95 --seed 3
      bd3 sample --threshold 0.9        # confidence decoding: fewer model calls
      bd3 sample --precision fp32       # exact float32 (auto: fp16 weights on x86 CPUs)
      bd3 sample runs/owt-sedd --denoise-steps 1000 --top-p 0.99   # a SEDD run: the analytic sampler
    """
    if format_ not in FORMATS:
        raise typer.BadParameter(f"{format_!r} is not one of {', '.join(FORMATS)}.", param_hint="--format")
    steps = o.denoise_steps(denoise_steps, steps)
    o.check_stop(stop)
    rule = o.sampling_rule(sampler, steps, threshold)  # usage errors before anything is opened
    if prompt is not None and prompt_file is not None:
        raise typer.BadParameter("give --prompt or --prompt-file, not both.", param_hint="--prompt-file")
    from bd3.cli.common import err, stdout_writes
    from bd3.model.backends import resolve_attn
    from bd3.runs.load import load_model, open_run, run_tokenizer
    from bd3.runtime import available_memory, configure_model, resolve_device, resolve_precision, use_threads
    from bd3.sampling.block import ENTROPY_WINDOW
    from bd3.sampling.engine import sampling_precision
    from bd3.sampling.generate import generate, max_sample_tokens, sample_memory
    from bd3.sampling.text import SampleWriter

    r = open_run(run)
    cfg = r.config
    algo, L = cfg.diffusion.algo, cfg.model.length
    bs = o.sampling_block_size(r, block_size, sampler, steps, threshold)
    if precision == "fp16" and algo == "sedd":
        raise typer.BadParameter("fp16 weights are for bd3lm, mdlm and ar runs; sample a SEDD run with fp32 or bf16.", param_hint="--precision")
    tok = run_tokenizer(r)
    ids = [cfg.data.start_id]  # BOS, or EOS for a run trained on raw rows
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
    free, need = available_memory(), sample_memory(num_samples, max_tokens, bs)
    if free is not None and need > free:
        raise typer.BadParameter(
            f"{max_tokens} tokens x {num_samples} sample(s) need about {need / 2**30:.1f} GiB of memory and "
            f"{free / 2**30:.1f} GiB is available; ask for at most {max_sample_tokens(free, num_samples, bs)} tokens per sample.",
            param_hint="--max-tokens",
        )
    decoding = o.decoding(r, sampler=sampler, steps=steps, threshold=threshold, top_p=top_p, temperature=temperature, stop=stop)
    dev = resolve_device(device)
    # fp16 weights are an engine feature; SEDD runs the DiT itself (bf16 autocast where it pays off)
    precision = resolve_precision(precision, dev) if algo == "sedd" else sampling_precision(precision, dev)
    model = configure_model(load_model(r, dev), resolve_attn(attn, dev))
    use_threads(threads, warn_if_loaded=False)  # without --threads the sampler adapts to a loaded machine itself
    batch_size = min(batch_size or num_samples, num_samples)
    writer = SampleWriter(tok, sys.stdout, format_, num_samples, ids, holdback=ENTROPY_WINDOW if decoding.entropy else 0)
    start = time.perf_counter()
    try:
        with stdout_writes():
            samples = generate(model, cfg, num_samples=num_samples, batch_size=batch_size, max_tokens=max_tokens, prompt=ids,
                               block_size=bs, decoding=decoding, kv_cache=kv_cache, seed=seed, precision=precision, threads=threads,
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
    if algo == "sedd":
        how = f"analytic sampler over {L} tokens, " + (f"{steps} steps" if steps else "one step per new token")
    if precision != "fp32":
        how += f", {precision}"
    err.print(
        f"{num_samples} sample(s), {new} new tokens in {elapsed:.1f}s: {new / max(elapsed, 1e-9):.1f} tokens/s, "
        f"{calls / max(new, 1):.2f} model calls per token ({how}; stops: "
        + ", ".join(f"{k} {v}" for k, v in sorted(stops.items())) + ")",
        highlight=False,
        markup=False,
        soft_wrap=True,  # one line, whatever the terminal's width
    )


def _read_prompt(path: Path) -> str:
    if str(path) == "-":
        return sys.stdin.read()
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Bd3Error(f"The prompt file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise Bd3Error(f"Cannot read the prompt file {path}: {e}") from None
