"""Training throughput of bd3: tokens/s, model FLOP/s against a measured matmul peak, memory.

    python benchmarks/train.py                            # tiny L=128 (block 4, 16) and nano
    python benchmarks/train.py --configs all              # + tiny at L=1024 (minutes per step)
    python benchmarks/train.py --configs tiny-128-4 --precision fp32
    python benchmarks/train.py --configs tiny-128-4 --profile 25    # torch.profiler's top ops
    python benchmarks/train.py --foreach-adamw            # AdamW(foreach=True) instead of the loop's fused

Configurations: ``tiny-128-4``, ``tiny-128-16``, ``tiny-1024-4``, ``tiny-1024-16`` (the
reference's ``tiny``: width 256, 8 layers, 8 heads, cond 64, dropout 0.1, with the GPT-2
vocabulary, 50,258 with the mask token; ``SIZE-L-BLOCK``) and ``nano`` (the default
``bd3 pretrain`` model: ``nano`` at L=128, the built-in BPE's 8,192 tokens, block 16).
Batch 16 throughout, 2 threads (``--threads``), random tokens.

Each configuration runs in its own process, so its peak RSS is its own, and times the step of
``bd3.train.loop.train`` built from bd3's pieces: autocast forward + loss (``diffusion_loss``),
``zero_grad``, backward, ``clip_grad_norm_(1.0)``, ``AdamW(fused=True).step()``,
``EMA.update``, ``loss.item()``. Tokens/s = B * L / the median step time over ``--steps``
steps after ``--warmup``. The 2048^3 matmul peak (fp32 and bf16) is measured in the same run,
and the load average is printed with each row: on a 2-core machine anything else running
shows up directly; re-run when the load is above ~1.

Model FLOPs per step, as bd3 executes them (``step_flops``); d = width, n = layers,
V = vocabulary, B = batch, L = length, M = masked x_t positions in the step (counted):

    linear layers   forward 2 FLOPs per multiply-add: per position and layer 2 * 12 d^2
                    (qkv 3 d^2, output d^2, MLP 8 d^2). Layers 1..n-1 run all 2L positions of
                    [x_t ; x_0]; the last layer runs qkv on all 2L (x_0 gives keys and values)
                    and the output projection and MLP on the L x_t positions only:
                    F_lin = 2 B d^2 (12 * 2L (n - 1) + 3 * 2L + 9 L); backward 2 F_lin.
    attention       per (query, key) pair and layer, 2 d for q k^T and 2 d for P V forward;
                    the backward recomputes q k^T and runs dV, dP, dQ, dK: 10 d. The pairs
                    are those bd3's tiled attention computes (bd3.model.attention): each tile
                    of T queries against every key tile its rows may see (about L^2 + 3 T L
                    of the (2L)^2 pairs, vs L (L + L') allowed); the last layer has x_t
                    queries only. F_att = 14 d B pairs.
    output layer    2 d V per masked position forward, 4 d V backward: F_out = 6 d V M.
    step            F_lin * 3 + F_att + F_out. Not counted: the embedding lookup, LayerNorm,
                    softmax and other element-wise work, the optimizer, the EMA.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

NAMED = {
    "tiny-128-4": ("tiny", 128, 4, 50258),
    "tiny-128-16": ("tiny", 128, 16, 50258),
    "tiny-1024-4": ("tiny", 1024, 4, 50258),
    "tiny-1024-16": ("tiny", 1024, 16, 50258),
    "nano": ("nano", 128, 16, 8192),
}
DEFAULT = ["tiny-128-4", "tiny-128-16", "nano"]
BATCH = 16


def loadavg() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


def cpu_time() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Median FLOP/s of an n^3 matmul (2 n^3 FLOPs) in ``dtype``."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def attention_pairs(L: int, block_size: int, rows: int) -> int:
    """(query, key) pairs per sequence and layer that bd3's tiled attention computes for the
    first ``rows`` queries of the 2L block-diffusion input (the dense SDPA fallback: all)."""
    from bd3.diffusion.masks import block_diff_mask
    from bd3.model.attention import _plan

    mask = block_diff_mask(L, block_size)
    plan = _plan(mask, rows)
    if plan.tiles is None:
        return rows * 2 * L
    return sum((t.q[1] - t.q[0]) * sum(b - a for a, b in t.runs) for t in plan.tiles)


def step_flops(d: int, n: int, V: int, B: int, L: int, block_size: int, masked: float, legacy: bool = False) -> dict[str, float]:
    """Forward + backward FLOPs of one training step as executed (the module docstring).
    ``legacy``: bd3 before these speed-ups (every layer on 2L positions, dense SDPA: 12 d per
    pair), for before/after rows."""
    if legacy:
        lin, pairs = 2 * B * d * d * 12 * 2 * L * n, n * (2 * L) ** 2
        att = 12 * d * B * pairs
    else:
        lin = 2 * B * d * d * (12 * 2 * L * (n - 1) + 3 * 2 * L + 9 * L)
        pairs = (n - 1) * attention_pairs(L, block_size, 2 * L) + attention_pairs(L, block_size, L)
        att = 14 * d * B * pairs
    out = 6 * d * V * masked
    return {"step": 3 * lin + att + out, "linear": 3 * lin, "attention": att, "output": out, "pairs": pairs}


def run_one(name: str, args) -> dict:
    """Build the model and the loop's pieces and time ``args.steps`` steps (one process)."""
    from bd3.config import DiffusionConfig, TrainConfig, model_config
    from bd3.diffusion.objective import diffusion_loss
    from bd3.model import DiT
    from bd3.runtime import autocast, resolve_precision
    from bd3.train.ema import EMA
    from bd3.train.loop import lr_at

    torch.set_num_threads(args.threads)
    size, L, bs, V = parse(name)
    device = torch.device("cpu")
    precision = resolve_precision(args.precision, device)
    mcfg = model_config(size, L)
    dcfg = DiffusionConfig(algo="bd3lm", block_size=bs, estimator=args.estimator)
    tcfg = TrainConfig(batch_size=BATCH)
    mask_id = V - 1
    torch.manual_seed(tcfg.seed)
    model = DiT(mcfg, V).to(device)
    model.train()
    kind = {"foreach": True} if args.foreach_adamw else {"fused": True}
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=tcfg.betas, weight_decay=tcfg.weight_decay, **kind)
    ema = EMA(model, tcfg.ema_decay)
    noise = torch.Generator(device=device).manual_seed(tcfg.seed)
    data = torch.Generator().manual_seed(0)
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    masked_rows = []  # rows that reach the output layer: the masked x_t positions
    fused = next((name for name in ("_nll", "nll") if hasattr(model, name)), None)  # the output layer + loss
    legacy = fused is None
    if fused is not None:
        nll = getattr(model, fused)
        setattr(model, fused, lambda h, *a: (masked_rows.append(h.shape[0]), nll(h, *a))[1])
    else:  # bd3 before the fused output layer + loss, for before/after comparisons
        model.output_layer.linear.register_forward_hook(lambda m, i, o: masked_rows.append(i[0].shape[0]))

    timings: list[dict] = []

    def step(i: int, record: bool) -> None:
        lr = lr_at(i, tcfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x0 = torch.randint(0, V - 1, (BATCH, L), generator=data)
        x0[:, 0] = 0
        c0, t0 = cpu_time(), time.perf_counter()
        with autocast(device, precision):
            losses = diffusion_loss(model, x0, dcfg, mask_id, generator=noise)
        loss = losses.mean
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss {loss.item()} at step {i}")
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        optimizer.step()
        t3 = time.perf_counter()
        ema.update(model)
        loss.item()
        t4 = time.perf_counter()
        if record:
            timings.append({
                "step": t4 - t0, "fwd": t1 - t0, "bwd": t2 - t1, "opt": t3 - t2, "ema": t4 - t3,
                "cpu": cpu_time() - c0, "masked": masked_rows[-1], "loss": loss.item(),
            })

    for i in range(args.warmup):
        step(i, False)
    load_before = loadavg()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(args.steps):
                step(args.warmup + i, True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile), file=sys.stderr)
    else:
        for i in range(args.steps):
            step(args.warmup + i, True)
    load_after = loadavg()

    med = {k: statistics.median(t[k] for t in timings) for k in ("step", "fwd", "bwd", "opt", "ema", "cpu")}
    masked = statistics.mean(t["masked"] for t in timings)
    flops = step_flops(mcfg.hidden_dim, mcfg.n_layers, V, BATCH, L, bs, masked, legacy)
    return {
        "config": name, "size": size, "L": L, "block": bs, "V": V, "batch": BATCH, "precision": precision,
        "adamw": "foreach" if args.foreach_adamw else "fused", "threads": args.threads, "legacy": legacy,
        "step_s": med["step"], "min_s": min(t["step"] for t in timings), "max_s": max(t["step"] for t in timings),
        "fwd_s": med["fwd"], "bwd_s": med["bwd"], "opt_s": med["opt"], "ema_s": med["ema"], "cpu_s": med["cpu"],
        "tokens_per_s": BATCH * L / med["step"], "masked": masked,
        "gflop_step": flops["step"] / 1e9, "gflop_linear": flops["linear"] / 1e9,
        "gflop_attention": flops["attention"] / 1e9, "gflop_output": flops["output"] / 1e9,
        "gflop_s": flops["step"] / med["step"] / 1e9,
        "rss_model_mb": rss_model, "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load": f"{load_before} -> {load_after}", "steps": len(timings),
    }


def parse(name: str) -> tuple[str, int, int, int]:
    if name in NAMED:
        return NAMED[name]
    size, L, bs = name.split("-")
    return size, int(L), int(bs), 8192 if size == "nano" else 50258


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(DEFAULT), help="comma-separated; 'all' adds L=1024")
    p.add_argument("--steps", type=int, default=7, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--estimator", choices=["k", "t"], help="the training estimator (default: bd3's)")
    p.add_argument("--foreach-adamw", action="store_true", help="AdamW(foreach=True) instead of the loop's fused=True")
    p.add_argument("--profile", type=int, default=0, help="print torch.profiler's top N operators")
    p.add_argument("--json", help="append one JSON line per configuration to this file")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return

    torch.set_num_threads(args.threads)
    names = list(NAMED) if args.configs == "all" else args.configs.split(",")
    peaks = {"fp32": matmul_peak(torch.float32) / 1e9, "bf16": matmul_peak(torch.bfloat16) / 1e9}
    print(f"matmul 2048^3, {args.threads} threads: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s "
          f"(load {loadavg()})")
    print("| config | precision | step s (median, min-max) | tokens/s | fwd / bwd / clip+AdamW / EMA s "
          "| GFLOP/step (linear / attention / output) | GFLOP/s | % of fp32 / bf16 peak | RSS after build -> peak MB | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--precision", args.precision, "--threads", str(args.threads), "--profile", str(args.profile)]
        if args.foreach_adamw:
            cmd.append("--foreach-adamw")
        if args.estimator:
            cmd += ["--estimator", args.estimator]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["peak_fp32_gflop_s"], r["peak_bf16_gflop_s"] = peaks["fp32"], peaks["bf16"]
        print(
            f"| {name}{' (before)' if r['legacy'] else ''} | {r['precision']}{', foreach AdamW' if args.foreach_adamw else ''} "
            f"| {r['step_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) | {r['tokens_per_s']:.0f} "
            f"| {r['fwd_s']:.3f} / {r['bwd_s']:.3f} / {r['opt_s']:.3f} / {r['ema_s']:.3f} "
            f"| {r['gflop_step']:.0f} ({r['gflop_linear']:.0f} / {r['gflop_attention']:.0f} / {r['gflop_output']:.0f}) "
            f"| {r['gflop_s']:.0f} | {100 * r['gflop_s'] / peaks['fp32']:.0f} % / {100 * r['gflop_s'] / peaks['bf16']:.0f} % "
            f"| {r['rss_model_mb']:.0f} -> {r['rss_peak_mb']:.0f} | {r['load']} |",
            flush=True,
        )
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
