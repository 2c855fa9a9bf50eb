"""The sampler's automatic thread choice against a fixed thread count, idle and under load.

    python benchmarks/threads.py                          # nano, 512 tokens, block 16, idle and one busy core
    python benchmarks/threads.py --models tiny --tokens 256 --repeats 5

Each round samples ``--tokens`` tokens (first-hitting, KV cache, fp32, batch 1) with the
thread count bd3 chooses (``threads=None``: :class:`bd3.sampling.threads.ThreadTuner`
between one thread and :func:`bd3.runtime.default_threads`) and with each fixed count of
``--fixed``, in alternating order, ``--repeats`` times; the table gives the median tokens/s
of each and auto's ratio to the best fixed count. ``--load busy`` starts one process that
spins on one core (``os.sched_setaffinity``) for the whole measurement, the competing job
of a shared machine; ``idle`` runs without it. The load average is printed with each row:
other users of the machine count too.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sample import build, loadavg  # noqa: E402 (benchmarks/sample.py: the same models)

from bd3.runtime import default_threads  # noqa: E402
from bd3.sampling.block import sample_blocks  # noqa: E402
from bd3.sampling.denoiser import ModelDenoiser  # noqa: E402
from bd3.sampling.threads import ThreadTuner  # noqa: E402


def spin(core: int) -> None:
    """Keep one core busy until killed."""
    try:
        os.sched_setaffinity(0, {core})
    except (AttributeError, OSError):
        pass
    while True:
        pass


def rate(engine, cfg, vocab: int, tokens: int, threads: int | None, seed: int) -> float:
    torch.set_num_threads(default_threads())  # what `bd3 sample` sets before the tuner takes over
    t = time.perf_counter()
    engine.engine.tuner = ThreadTuner(threads)  # a fresh tuner (or a fixed count) for this run
    den = ModelDenoiser(engine, block_size=16, context=cfg.length - 16)
    out = sample_blocks(den, samples=[0], max_tokens=tokens, block_size=16, length=cfg.length, mask_id=vocab - 1,
                        bos_id=0, seed=seed, rule="first-hitting")
    return sum(s.new_tokens for s in out) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["nano"], choices=["nano", "tiny"])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--fixed", nargs="+", type=int, default=None, help="Fixed thread counts to compare (default: 1 and all).")
    ap.add_argument("--load", nargs="+", default=["idle", "busy"], choices=["idle", "busy"])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    fixed = args.fixed or sorted({1, default_threads()})
    cpus = os.cpu_count() or 1
    print(f"torch {torch.__version__}, {cpus} CPUs, default threads {default_threads()}")
    print("| model | load | " + " | ".join(f"{n} thread{'s' * (n > 1)} (tok/s)" for n in fixed)
          + " | auto (tok/s) | auto / best fixed | load average |")
    print("|---|---|" + "---|" * (len(fixed) + 3))
    for name in args.models:
        engine, cfg, vocab = build(name, "fp32")
        rate(engine, cfg, vocab, 64, None, 99)  # warm-up
        for load in args.load:
            busy = None
            if load == "busy":
                busy = multiprocessing.Process(target=spin, args=(cpus - 1,), daemon=True)
                busy.start()
                time.sleep(1.0)
            try:
                rates: dict[object, list[float]] = {n: [] for n in [*fixed, "auto"]}
                for r in range(args.repeats):
                    order = [*fixed, "auto"] if r % 2 == 0 else ["auto", *fixed]
                    for n in order:
                        rates[n].append(rate(engine, cfg, vocab, args.tokens, None if n == "auto" else n, seed=r))
            finally:
                if busy is not None:
                    busy.kill()
                    busy.join()
            med = {n: statistics.median(v) for n, v in rates.items()}
            best = max(med[n] for n in fixed)
            cells = " | ".join(f"{med[n]:.1f}" for n in fixed)
            print(f"| {name} {args.tokens}/16/1 | {load} | {cells} | {med['auto']:.1f} | {med['auto'] / best:.2f} | {loadavg()} |",
                  flush=True)


if __name__ == "__main__":
    main()
