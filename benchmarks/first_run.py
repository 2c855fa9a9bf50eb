"""Does a first training run learn? Validation curves of `bd3 pretrain` variants against the
unigram and bigram models of the same data.

    python benchmarks/first_run.py --out bench-runs --steps 800 \\
        --variant t="--estimator t" --variant k="--estimator k"     # train (2 at a time, 1 thread each), then report
    python benchmarks/first_run.py --report bench-runs/t bench-runs/k  # report existing runs

Each variant is ``NAME="extra bd3 pretrain options"``; every run gets ``--steps``,
``--save-every`` (a validation every N steps) and ``--seed``, and runs with
``OMP_NUM_THREADS=--threads`` (``--parallel`` runs at once). The report gives, per run, the
validation NELBO (with its 95 % interval) at every checkpoint, the first step whose interval
lies wholly below the bigram model's NELBO on the same validation rows, the final
perplexity, and the wall time. The load average is printed; times are comparable only at a
fixed load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bd3.data.shards import unigram_perplexity
from bd3.evaluate.baselines import bigram_perplexity
from bd3.runs.load import open_run, run_shards


def train(variants: dict[str, str], out: Path, steps: int, save_every: int, seed: int, threads: int, parallel: int) -> list[Path]:
    pending = list(variants.items())
    running: list[tuple[subprocess.Popen, float, str]] = []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out.mkdir(parents=True, exist_ok=True)
    while pending or running:
        while pending and len(running) < parallel:
            name, extra = pending.pop(0)
            if (out / name / "best.json").exists() and any((out / name).glob("metrics.jsonl")):
                print(f"{name}: exists, skipped", flush=True)
                continue
            cmd = ["bd3", "pretrain", "--steps", str(steps), "--save-every", str(save_every), "--seed", str(seed), "--out", str(out / name),
                   "--force", *shlex.split(extra)]
            print("$ " + " ".join(cmd), flush=True)
            log = open(out / f"{name}.log", "w")
            running.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), time.time(), name))
        time.sleep(5)
        for job in list(running):
            if job[0].poll() is not None:
                running.remove(job)
                print(f"{job[2]}: exit {job[0].returncode} after {time.time() - job[1]:.0f} s", flush=True)
    return [out / name for name in variants]


def report(paths: list[Path]) -> None:
    print(f"load {os.getloadavg()[0]:.2f}")
    baselines = {}
    for path in paths:
        run = open_run(path)
        cfg = run.config
        shards = run_shards(run)
        valid = shards.rows("valid")[: cfg.train.eval_batches * cfg.train.batch_size]
        key = str(shards.path)
        if key not in baselines:
            baselines[key] = (math.log(unigram_perplexity(shards.unigram_counts("train"), valid)),
                              math.log(bigram_perplexity(shards.rows("train"), valid, shards.vocab_size)))
        uni, bi = baselines[key]
        records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        vals = [r for r in records if r.get("event") == "validation"]
        summary = next((r for r in records if r.get("event") == "summary"), None)
        below = next((v["step"] for v in vals if math.log(v["valid_ppl_ci95"][1]) < bi), None)
        curve = ", ".join(f"{v['step']}: {v['valid_nelbo']:.3f}" for v in vals)
        print(f"\n{path.name}: {cfg.diffusion.algo} block {cfg.diffusion.block_size} estimator {cfg.diffusion.estimator} "
              f"lr {cfg.train.lr} warmup {cfg.train.warmup_steps} batch {cfg.train.batch_size}")
        print(f"  unigram NELBO {uni:.3f} (ppl {math.exp(uni):.1f}), bigram {bi:.3f} (ppl {math.exp(bi):.1f})")
        print(f"  validation NELBO by step: {curve}")
        print(f"  first step wholly below the bigram: {below}")
        if summary:
            low, high = summary["valid_ppl_ci95"]
            print(f"  final: ppl {summary['valid_ppl']:.2f} ({low:.2f}-{high:.2f}), {summary['elapsed_s'] / 60:.1f} min")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", default=[], help='NAME="bd3 pretrain options"')
    ap.add_argument("--out", type=Path, default=Path("bench-runs"))
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--report", type=Path, nargs="*", default=None)
    args = ap.parse_args()
    if args.report:
        return report(args.report)
    variants = dict(v.split("=", 1) for v in args.variant)
    report(train(variants, args.out, args.steps, args.save_every, args.seed, args.threads, args.parallel))


if __name__ == "__main__":
    sys.exit(main())
