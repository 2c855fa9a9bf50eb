"""The data layer: documents, tokenizers and memory-mapped token shards.

* :mod:`bd3.data.sources`: built-in corpora, local files and hub sets -> documents.
* :mod:`bd3.data.tokenizer`: gpt2, bert-base-uncased, trained/shipped BPE, tokenizer.json.
* :mod:`bd3.data.shards`: tokenise once into fixed-length rows; cache; read back.
* :mod:`bd3.data.build_bpe`: regenerates the shipped ``web-bpe`` tokenizer.

The names below are re-exported lazily, so ``import bd3.data`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "read_documents": "sources",
    "iter_documents": "sources",
    "describe_source": "sources",
    "BUILTIN_SETS": "sources",
    "HUB_SETS": "sources",
    "Tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "train_bpe": "tokenizer",
    "TokenShards": "shards",
    "tokenize": "shards",
    "cached_shards": "shards",
    "unigram_perplexity": "shards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bd3.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"bd3.data.{_EXPORTS[name]}"), name)
