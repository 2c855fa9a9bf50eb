"""The values bd3's options accept, in a module that imports nothing heavy.

The command line checks option values against these before torch, numpy or the data
libraries are imported (help, completion and usage errors stay fast); the library modules
that act on the values import them from here.
"""

from __future__ import annotations

from bd3.config import PRECISIONS

ATTN_BACKENDS = ("auto", "sdpa", "flex", "xformers")  # bd3.model.backends
MODEL_PRECISIONS = tuple(p for p in PRECISIONS if p != "auto")  # what `auto` resolves to: fp32, bf16 (autocast)
SAMPLE_PRECISIONS = (*MODEL_PRECISIONS, "fp16")  # the sampling engine's: fp16 weights are its own
RULES = ("first-hitting", "ddpm", "threshold")  # update rules inside a block (bd3.sampling.block)
STOPS = ("none", "eos", "entropy", "both")  # per-row stop rules
HELD_OUT = ("devil", "jargon", "mhcc")  # built-in sets never trained on by default
ZERO_SHOT_SETS = ("ptb", "wikitext2", "wikitext103", "lm1b", "lambada", "ag_news", "pubmed", "arxiv", *HELD_OUT)
