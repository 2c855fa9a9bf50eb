"""Attention masks by description: callers say which mask they mean, each backend builds its own.

A :class:`Mask` names one of bd3's masks and its layout; :meth:`Mask.mod` is its definition
over (query, key) index tensors (True = may attend) and :meth:`Mask.dense` its boolean table,
made once per shape. SDPA and the sampling engine take the table, FlexAttention a block mask
made from ``mod``, xformers a bias class chosen by the kind (bd3.model.backends).

- ``block_diff(length, block_size)``: the training input ``[x_t ; x_0]`` (2L positions),
  :func:`bd3.diffusion.masks.block_diff_mask_mod`;
- ``block_causal(block_size)``: a token sees its own and earlier blocks (clean tokens);
- ``causal(cached)``: a token sees itself and earlier ones, after ``cached`` tokens in a KV cache;
- ``cached_pass(cached, pending, block_size)``: the sampler's KV-cached call that folds
  ``pending`` clean tokens into a noisy block's pass: queries ``[pending ; noisy block]``,
  keys ``[cached ; pending ; noisy block]``; the clean tokens see the cache and each other
  block-causally, never the noisy block; the noisy block sees everything.

A query prefix (the first ``rows`` queries, as when the last layer computes only the x_t
half) takes the first rows of the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from bd3.diffusion.masks import block_diff_mask_mod

KINDS = ("block_diff", "block_causal", "causal", "cached_pass")


@dataclass(frozen=True)
class Mask:
    kind: str
    block_size: int = 1
    length: int = 0  # block_diff: L (the input is 2L)
    cached: int = 0  # causal, cached_pass: tokens already in the KV cache
    pending: int = 0  # cached_pass: clean tokens before the noisy block

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown mask kind {self.kind!r}; one of {', '.join(KINDS)}")

    @classmethod
    def block_diff(cls, length: int, block_size: int) -> Mask:
        return cls("block_diff", block_size, length=length)

    @classmethod
    def block_causal(cls, block_size: int) -> Mask:
        return cls("block_causal", block_size)

    @classmethod
    def causal(cls, cached: int = 0) -> Mask:
        return cls("causal", cached=cached)

    @classmethod
    def cached_pass(cls, cached: int, pending: int, block_size: int) -> Mask:
        return cls("cached_pass", block_size, cached=cached, pending=pending)

    def mod(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Whether query ``q`` may attend to key ``k`` (index tensors, broadcast)."""
        bs = self.block_size
        if self.kind == "block_diff":
            return block_diff_mask_mod(q, k, self.length, bs)
        if self.kind == "block_causal":
            return q // bs >= k // bs
        if self.kind == "causal":
            return k <= q + self.cached
        kp = k - self.cached  # cached_pass: key index within [pending ; noisy block]
        return (q >= self.pending) | (k < self.cached) | ((kp < self.pending) & (q // bs >= kp // bs))

    def dense(self, rows: int, cols: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(rows, cols) bool: the first ``rows`` queries against ``cols`` keys (shared: do
        not modify)."""
        return _dense(self, rows, cols, str(device))


@lru_cache(maxsize=64)
def _dense(mask: Mask, rows: int, cols: int, device: str) -> torch.Tensor:
    return mask.mod(torch.arange(rows, device=device)[:, None], torch.arange(cols, device=device)[None, :])
