"""NELBO estimators side by side on a trained run: the spread of one evaluation pass under
``t`` (the reference's protocol) and ``k``, the time of a pass, and the exact value.

    python benchmarks/estimators.py runs/NAME                       # block sizes 4, 16 and the length (MDLM)
    python benchmarks/estimators.py runs/NAME --rows 128 --passes 16 --block-sizes 4 8 --exact 4 8

For each block size (the run's weights evaluated there, as ``bd3 eval --block-size``; block
size = length is MDLM's bound, the same numbers as an MDLM model with these weights) both
estimators run ``--passes`` passes over the first ``--rows`` validation rows with the same
seeds; the table gives the per-pass standard deviation of the per-token NELBO, the variance
ratio t / k, and seconds per pass (equal cost per pass: one forward over each row). ``--exact``
block sizes also get the exact value (every mask pattern) and its time, and whether each
estimator's mean lies within 3 standard errors of it. Threads: ``--threads`` (default 2);
the load average is printed: rerun when other work shares the cores.

Also the bigram baseline of the run's data (``bd3.evaluate.baselines``) next to the unigram.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from bd3.data.shards import unigram_perplexity
from bd3.diffusion.estimators import maskable_positions
from bd3.diffusion.objective import exact_nelbo
from bd3.evaluate.baselines import bigram_perplexity
from bd3.evaluate.perplexity import nelbo_perplexity
from bd3.runs.load import load_model, open_run, run_shards  # the helpers `bd3 eval` opens a run with


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--passes", type=int, default=16)
    ap.add_argument("--block-sizes", type=int, nargs="+", default=None)
    ap.add_argument("--exact", type=int, nargs="*", default=[4, 8])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=str, default=None, help="also write the rows to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    run = open_run(args.run)
    cfg = run.config
    model = load_model(run, torch.device("cpu"))
    shards = run_shards(run)
    rows = shards.rows("valid")[: args.rows]
    train_rows = shards.rows("train")
    print(f"run {run.path}: {cfg.diffusion.algo}, trained at block size {cfg.diffusion.block_size}; {len(rows)} rows x {rows.shape[1]}; "
          f"load {os.getloadavg()[0]:.2f}, {args.threads} threads")
    print(f"baselines on these rows: unigram {unigram_perplexity(shards.unigram_counts('train'), rows):.2f}, "
          f"bigram {bigram_perplexity(train_rows, rows, shards.vocab_size):.2f}")
    sizes = args.block_sizes or [4, 16, cfg.model.length]
    out = []
    for bs in sizes:
        d = replace(cfg.diffusion, block_size=bs)
        res, secs = {}, {}
        for est in ("t", "k"):
            start = time.perf_counter()
            res[est] = nelbo_perplexity(model, rows, d, cfg.data.mask_id, estimator=est, batch_size=args.batch_size, passes=args.passes, seed=0)
            secs[est] = (time.perf_counter() - start) / args.passes
        std = {e: float(np.std(np.log(res[e]["ppl_passes"]), ddof=1)) for e in res}
        row = {"block_size": bs, **{f"{e}_mean": res[e]["nelbo"] for e in res}, **{f"{e}_pass_std": std[e] for e in res},
               "variance_ratio": (std["t"] / std["k"]) ** 2, **{f"{e}_s_per_pass": secs[e] for e in res}}
        if bs in args.exact:
            start = time.perf_counter()
            with torch.no_grad():
                sums = [exact_nelbo(model, x, d, cfg.data.mask_id, maskable_positions(x.shape, d.ignore_bos), (0.0, 1e-3))
                        for x in (torch.from_numpy(np.asarray(rows[i : i + args.batch_size], dtype=np.int64)) for i in range(0, len(rows), args.batch_size))]
            exact = sum(s[0].sum().item() for s in sums) / (len(rows) * (rows.shape[1] - 1))
            reference = sum(s[1].sum().item() for s in sums) / (len(rows) * (rows.shape[1] - 1))
            row.update(exact=exact, exact_reference_interval=reference, exact_s=time.perf_counter() - start,
                       k_within_3se=abs(res["k"]["nelbo"] - exact) < 3 * res["k"]["nelbo_se"],
                       t_within_3se=abs(res["t"]["nelbo"] - reference) < 3 * res["t"]["nelbo_se"])
        out.append(row)
        print(json.dumps(row), flush=True)

    print("\n| block size | t: mean NELBO | t: std per pass | k: mean NELBO | k: std per pass | Var t / Var k | s per pass (t, k) | exact (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in out:
        exact = f"{r['exact']:.4f} ({r['exact_s']:.0f} s)" if "exact" in r else ""
        print(f"| {r['block_size']} | {r['t_mean']:.4f} | {r['t_pass_std']:.4f} | {r['k_mean']:.4f} | {r['k_pass_std']:.4f} | "
              f"{r['variance_ratio']:.1f} | {r['t_s_per_pass']:.2f}, {r['k_s_per_pass']:.2f} | {exact} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
