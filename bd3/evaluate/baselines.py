"""Count-based baselines a language model should beat: the bigram model.

A first training run is judged against these: a model stuck on the unigram plateau has
learned token frequencies only; below the bigram model it uses its context.
"""

from __future__ import annotations

import math

import numpy as np

DISCOUNT = 0.75  # absolute discount of the interpolated bigram model


def bigram_perplexity(train_rows: np.ndarray, valid_rows: np.ndarray, vocab_size: int, discount: float = DISCOUNT) -> float:
    """Perplexity of tokens 1..L-1 of each validation row given the token before it, under
    an interpolated absolute-discounting bigram model of the training rows (pairs within a
    row), backed off to an add-one unigram model."""
    train = np.asarray(train_rows, dtype=np.int64)
    valid = np.asarray(valid_rows, dtype=np.int64)
    unigram = np.bincount(train[:, 1:].ravel(), minlength=vocab_size).astype(np.float64)
    p_unigram = (unigram + 1.0) / (unigram.sum() + vocab_size)
    pair_codes, pair_counts = np.unique((train[:, :-1] * vocab_size + train[:, 1:]).ravel(), return_counts=True)
    prev_total = np.bincount(pair_codes // vocab_size, weights=pair_counts, minlength=vocab_size)
    prev_types = np.bincount(pair_codes // vocab_size, minlength=vocab_size).astype(np.float64)

    prev, nxt = valid[:, :-1].ravel(), valid[:, 1:].ravel()
    codes = prev * vocab_size + nxt
    where = np.searchsorted(pair_codes, codes).clip(max=len(pair_codes) - 1)
    count = np.where(pair_codes[where] == codes, pair_counts[where], 0).astype(np.float64)
    total = prev_total[prev]
    seen = total > 0
    safe = np.where(seen, total, 1.0)
    p = np.where(seen, np.maximum(count - discount, 0.0) / safe + discount * prev_types[prev] / safe * p_unigram[nxt], p_unigram[nxt])
    return math.exp(-np.log(p).mean())
