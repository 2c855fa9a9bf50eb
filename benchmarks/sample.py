"""Sampling throughput of bd3: tokens/s and model calls per token, KV-cached vs uncached.

    python benchmarks/sample.py                                  # the full grid (slow on 2 cores)
    python benchmarks/sample.py --models tiny --tokens 512 --blocks 16 --batches 1 --cache on
    python benchmarks/sample.py --models nano --tokens 16000 --blocks 16 --batches 1 --cache on --repeats 1
    python benchmarks/sample.py --models tiny --tokens 1024 --blocks 16 --batches 8   # the 10x target
    python benchmarks/sample.py --models nano --tokens 512 --blocks 16 --batches 1 --cache on --profile 25

Models (random weights, N(0, 0.02), which is all speed depends on):

- ``nano``: the default ``bd3 pretrain`` model (width 256, 4 layers, 4 heads, L = 128) with
  the built-in BPE's 8,192 tokens;
- ``tiny``: the reference's ``tiny`` (width 256, 8 layers, 8 heads, L = 1024) with the
  GPT-2 vocabulary (50,258 with the mask token), as in ``reference-performance.md``.

Each configuration generates ``--tokens`` tokens per sample (BOS included) for ``--batches``
samples with the first-hitting rule (``--rule``) through ``bd3.sampling.sample_blocks`` and
the CPU engine, exactly as ``bd3 sample`` does. tokens/s counts generated tokens (all rows) over wall time,
median of ``--repeats`` runs after one short warm-up; ``NFE/token`` is model calls per
generated token per sample (1 for first-hitting), ``passes/token`` backbone passes per
generated token of the batch (batching shares a pass between rows).

``--precision fp32 fp16 bf16`` (all by default) builds the engine as ``bd3 sample --precision``
does.

Uncached (``--cache off``): every call recomputes the context (up to L - block tokens) and
the block. With ``--uncached estimate`` (the default) it is timed on ``--points`` blocks at
evenly spaced context lengths (a prompt of that length puts the block there) and the time
of every block of the sample is interpolated from them: a full uncached run of 1024 tokens
at batch 8 takes about 10 minutes here. ``--uncached full`` runs it.

The load average (``/proc/loadavg``) is printed with each result: the machine has 2 cores,
often shared; measure again when it is above ~1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bd3.config import ModelConfig, model_config
from bd3.model import DiT
from bd3.sampling.block import sample_blocks
from bd3.sampling.denoiser import ModelDenoiser
from bd3.sampling.engine import Engine

MODELS = {
    "nano": (lambda: model_config("nano", 128), 8192),
    "tiny": (lambda: ModelConfig(hidden_dim=256, n_heads=8, n_layers=8, cond_dim=64, length=1024, dropout=0.1), 50258),
}


class Counting:
    """An engine that counts backbone passes."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.passes = engine, 0
        self.device = engine.device

    def new_kv_cache(self, *a, **k):
        return self.engine.new_kv_cache(*a, **k)

    def __call__(self, *a, **k):
        self.passes += 1
        return self.engine(*a, **k)


def build(name: str, precision: str = "fp32") -> tuple[Counting, ModelConfig, int]:
    make, vocab = MODELS[name]
    cfg = make()
    model = DiT(cfg, vocab).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return Counting(Engine(model, precision, threads=THREADS)), cfg, vocab


THREADS = None  # --threads


def run(engine: Counting, cfg: ModelConfig, vocab: int, *, tokens, block, batch, cache, rule, seed, prompt=None):
    engine.passes = 0
    t = time.perf_counter()
    den = ModelDenoiser(engine, block_size=block, context=cfg.length - block, kv_cache=cache)
    out = sample_blocks(den, samples=list(range(batch)), max_tokens=tokens, block_size=block, length=cfg.length,
                        mask_id=vocab - 1, bos_id=0, seed=seed, rule=rule, prompt=prompt)
    dt = time.perf_counter() - t
    new = sum(s.new_tokens for s in out)
    return dt, new, sum(s.nfe for s in out) / new, engine.passes / new


def uncached_estimate(engine, cfg, vocab, *, tokens, block, batch, rule, points):
    """Seconds for a whole uncached sample, interpolated from a few timed blocks."""
    n_blocks = -(-tokens // block)
    window = cfg.length - block
    ks = sorted({round(i * (n_blocks - 1) / max(points - 1, 1)) for i in range(points)})
    timed = {}
    for k in ks:
        ctx = min(k * block, window)
        if ctx in timed:
            continue
        prompt = [0] + [(7 * i) % (vocab - 2) + 1 for i in range(1, ctx)] if ctx else None
        dt, *_ = run(engine, cfg, vocab, tokens=ctx + block, block=block, batch=batch, cache=False, rule=rule, seed=0,
                     prompt=prompt)
        timed[ctx] = dt
    xs = sorted(timed)
    total = 0.0
    for k in range(n_blocks):
        c = min(k * block, window)
        j = min(max(i for i, x in enumerate(xs) if x <= c), len(xs) - 2) if len(xs) > 1 else 0
        if len(xs) == 1:
            total += timed[xs[0]]
            continue
        x0, x1 = xs[j], xs[j + 1]
        total += timed[x0] + (timed[x1] - timed[x0]) * (c - x0) / (x1 - x0)
    return total, batch * (tokens - 1)


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["nano", "tiny"], choices=sorted(MODELS))
    ap.add_argument("--tokens", nargs="+", type=int, default=[512, 1024])
    ap.add_argument("--blocks", nargs="+", type=int, default=[4, 16])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--cache", nargs="+", default=["on", "off"], choices=["on", "off"])
    ap.add_argument("--precision", nargs="+", default=["fp32", "fp16", "bf16"], choices=["fp32", "fp16", "bf16"],
                    help="The sampler's precision (bd3 sample --precision; auto is bf16 on CPUs with native bf16).")
    ap.add_argument("--rule", default="first-hitting", choices=["first-hitting", "ddpm", "threshold"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--uncached", default="estimate", choices=["estimate", "full"])
    ap.add_argument("--points", type=int, default=4, help="Timed blocks for the uncached estimate.")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads while sampling (default: bd3's choice, one thread for small calls).")
    ap.add_argument("--profile", type=int, default=0, help="Print the top-N operators of one run.")
    args = ap.parse_args()
    global THREADS
    THREADS = args.threads
    print(f"torch {torch.__version__}, threads {args.threads or 'auto'} (torch: {torch.get_num_threads()}), "
          f"{os.cpu_count()} CPUs, rule {args.rule}")
    print("| model | precision | tokens | block | batch | KV cache | tok/s (median, min-max) | NFE/token | passes/token | ms/pass "
          "| cached / uncached | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, precision in [(n, p) for n in args.models for p in args.precision]:
        engine, cfg, vocab = build(name, precision)
        run(engine, cfg, vocab, tokens=64, block=16, batch=1, cache=True, rule=args.rule, seed=99)  # warm-up
        for tokens in args.tokens:
            for block in args.blocks:
                for batch in args.batches:
                    speed = {}
                    for cache in args.cache:
                        on = cache == "on"
                        if args.profile:
                            from torch.profiler import profile

                            with profile() as prof:
                                run(engine, cfg, vocab, tokens=tokens, block=block, batch=batch, cache=on, rule=args.rule, seed=0)
                            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))
                        if on or args.uncached == "full":
                            res = [run(engine, cfg, vocab, tokens=tokens, block=block, batch=batch, cache=on, rule=args.rule,
                                       seed=r) for r in range(args.repeats)]
                            rates = sorted(new / dt for dt, new, _, _ in res)
                            nfe, passes = res[0][2], res[0][3]
                            ms = statistics.median(dt / (p * new) * 1e3 for dt, new, _, p in res)
                            label = f"{statistics.median(rates):.1f} ({rates[0]:.1f}-{rates[-1]:.1f})"
                        else:
                            dt, new = uncached_estimate(engine, cfg, vocab, tokens=tokens, block=block, batch=batch,
                                                        rule=args.rule, points=args.points)
                            rates, nfe, passes, ms = [new / dt], 1.0, 1.0 / batch, dt / (new / batch) * 1e3
                            label = f"{rates[0]:.1f} (estimate)"
                        speed[cache] = statistics.median(rates)
                        ratio = f"{speed['on'] / speed['off']:.1f}x" if len(speed) == 2 else ""
                        print(f"| {name} (L={cfg.length}, V={vocab}) | {precision} | {tokens} | {block} | {batch} | {cache} | {label} | "
                              f"{nfe:.2f} | {passes:.3f} | {ms:.1f} | {ratio} | {loadavg()} |", flush=True)


if __name__ == "__main__":
    main()
