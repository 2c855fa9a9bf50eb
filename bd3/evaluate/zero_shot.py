"""Zero-shot perplexity: a run evaluated on other corpora with the reference's protocol.

Each set is detokenized as the reference does, documents are concatenated WITHOUT an EOS
between them, and cut into rows of ``[BOS] + (L - 2) tokens + [EOS]`` (the reference's
``insert_valid_eos=False``, ``insert_valid_special=True``). Hub sets use their evaluation
split (PTB, WikiText and the scientific papers: validation; LM1B, LAMBADA, AG News: test);
the built-in held-out sets and local files are used whole.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bd3.data.detokenizers import DETOKENIZERS
from bd3.data.shards import cached_shards
from bd3.data.sources import BUILTIN_SETS
from bd3.errors import Bd3Error

HELD_OUT = ("devil", "jargon", "mhcc")
ZERO_SHOT_SETS = ("ptb", "wikitext2", "wikitext103", "lm1b", "lambada", "ag_news", "pubmed", "arxiv", *HELD_OUT)


def zero_shot_rows(name: str, tokenizer_json: Path, length: int, data: str | None = None) -> np.ndarray:
    """The evaluation rows of zero-shot set ``name`` (or of ``data``, a local copy of it)."""
    if name not in ZERO_SHOT_SETS:
        raise Bd3Error(f"Unknown zero-shot set {name!r}; choose from {', '.join(ZERO_SHOT_SETS)}, or pass --data FILE.")
    source = data or name
    whole = data is not None or name in BUILTIN_SETS
    split = "all" if whole else "valid"
    shards = cached_shards(
        source, str(tokenizer_json), length, vocab_size=0, eos_between=False,
        detokenizer=name if name in DETOKENIZERS else None, splits=(split,),
    )
    return shards.rows(split)

