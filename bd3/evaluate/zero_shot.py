"""Zero-shot perplexity: a run evaluated on other corpora with the reference's protocol.

Documents are concatenated WITHOUT an EOS between them and cut into rows of
``[BOS] + (L - 2) tokens + [EOS]`` (the reference's ``insert_valid_eos=False``,
``insert_valid_special=True``). The paper's hub sets are detokenized as the reference does
and use their evaluation split (PTB, WikiText and the scientific papers: validation; LM1B,
LAMBADA, AG News: test), also when read from a local copy. The built-in held-out sets and
local files are used whole, with a newline after each document (paragraph, JSONL record),
so the joined text is text that occurs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bd3.choices import ZERO_SHOT_SETS
from bd3.data.detokenizers import DETOKENIZERS
from bd3.data.shards import cached_shards
from bd3.data.sources import HUB_SETS
from bd3.errors import Bd3Error


def zero_shot_rows(name: str, tokenizer_json: Path, length: int, data: str | None = None) -> np.ndarray:
    """The evaluation rows of zero-shot set ``name`` (or of ``data``, a local copy of it);
    a ``name`` that is not a set is a local file, folder or glob, evaluated whole."""
    if data is not None and name not in ZERO_SHOT_SETS:
        raise Bd3Error(f"Unknown zero-shot set {name!r}; choose from {', '.join(ZERO_SHOT_SETS)}, or pass --data FILE.")
    hub = name in HUB_SETS
    split = "valid" if hub and data is None else "all"
    shards = cached_shards(
        data or name, str(tokenizer_json), length, vocab_size=0, eos_between=False,
        detokenizer=(name if name in DETOKENIZERS else None) if hub else "paragraphs", splits=(split,),
    )
    return shards.rows(split)


def unseen_share(train_counts: np.ndarray, rows: np.ndarray) -> float:
    """The share of the tokens of ``rows`` (BOS at position 0 excluded, as perplexity does)
    whose id never occurs in the training data with unigram counts ``train_counts``."""
    tokens = np.asarray(rows)[:, 1:].reshape(-1)
    unseen = np.asarray(train_counts) == 0
    return float(unseen[tokens].mean()) if tokens.size else 0.0
