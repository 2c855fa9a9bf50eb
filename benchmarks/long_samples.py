"""Samples longer than the context (the paper's Table 6): end-of-text tokens per stretch.

    bd3 sample runs/bs4 --max-tokens 512 --num-samples 8 --format jsonl > bs4.jsonl
    python benchmarks/long_samples.py runs/bs4=bs4.jsonl runs/raw-bs4=raw-bs4.jsonl

Each argument is ``RUN=SAMPLES.jsonl`` (the JSONL of `bd3 sample --format jsonl`). Per run,
the generated end-of-text (EOS) tokens of its samples are counted in each stretch of the
context length L (positions 0..L-1 of the sample, its prompt not counted; L..2L-1; ...), as
a mean per sample with a 95 % interval over the samples. Next to it, the rate in the run's
own validation rows (EOS per L tokens), which a model that keeps writing text like its data
should keep in every stretch. Where the rows are ``[BOS] + text + [EOS]`` (``--wrap
special``), the BOS position is left out and the EOS that closes every row is counted, so
that rate is the text's own plus one per row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bd3.evaluate.intervals import mean_interval
from bd3.runs.load import open_run, run_shards, run_tokenizer


def stretch_counts(tokens: list[int], prompt: int, length: int, eos_id: int) -> list[int]:
    """Generated EOS tokens in each full stretch of ``length`` positions (the first ``prompt``
    tokens are not counted)."""
    generated = np.asarray(tokens) == eos_id
    generated[:prompt] = False
    return [int(generated[i * length : (i + 1) * length].sum()) for i in range(len(tokens) // length)]


def data_rate(rows: np.ndarray, wrap: str, eos_id: int, length: int) -> float:
    """EOS per ``length`` tokens of ``rows``; a special row's position 0 (its BOS, which may
    share the EOS id) is not text."""
    text = rows[:, 1:] if wrap == "special" else rows
    return float((text == eos_id).sum()) * length / text.size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pairs", nargs="+", metavar="RUN=SAMPLES.jsonl")
    args = ap.parse_args()
    for pair in args.pairs:
        run_dir, samples = pair.split("=", 1)
        run = open_run(Path(run_dir))
        tok = run_tokenizer(run)
        length = run.config.model.length
        records = [json.loads(line) for line in Path(samples).read_text().splitlines() if line.strip()]
        counts = np.array([stretch_counts(r["tokens"], r["prompt_tokens"], length, tok.eos_id) for r in records])
        rate = data_rate(np.asarray(run_shards(run).rows("valid")), run.config.data.wrap, tok.eos_id, length)
        cells = []
        for k in range(counts.shape[1]):
            m = mean_interval(counts[:, k])
            cells.append(f"{m['mean']:.1f} ({m['ci95'][0]:.1f}-{m['ci95'][1]:.1f})")
        print(f"| {run.path.name} | {run.config.data.wrap} | {len(records)} | {rate:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
