"""The denoiser: what every sampler calls for the model's predictions.

The protocol (:class:`Denoiser`): ``den(tokens, start, rows, pos, sigma=None) -> logits
(N, V)``, given the current tokens (B, W) of every row from absolute position ``start``
and N (row, position) pairs whose logits are wanted (row-major order); ``commit(tokens,
start)`` gives it the clean tokens that later calls condition on, ``select(rows)`` keeps
only these rows (rows that stopped); ``calls`` counts model calls. Tests pin each update
rule with a mock that implements it.

:class:`ModelDenoiser` implements it over a model's forward (the DiT itself or its CPU
engine, :mod:`bd3.sampling.engine`: the same call) in one of these layouts:

- ``attention="block"``, ``kv_cache=True``: the clean tokens' K/V are cached. Committing a
  block costs no extra pass: the next call runs ``[clean tokens ; new noisy block]``, the
  clean part attending to the cache and block-causally to itself, the noisy block to
  everything, and keeps the clean part's K/V. Beyond the model length the oldest cached
  tokens are dropped, so a block sees at most ``context`` clean tokens.
- ``attention="block"``, ``kv_cache=False``: every call recomputes the last ``context``
  clean tokens and the block under the block-causal mask (the same logits within the length).
- ``attention="full"``: the last ``context`` clean tokens and the block attend to each other
  without a mask (MDLM's semi-autoregressive window; SEDD with ``sigma`` and no context).
- ``attention="causal"`` (the AR model): every token a call gets is clean, so its K/V go
  into the cache at once (``commit`` has nothing to do); beyond the length the cache slides.

The output layer runs only at the requested positions (and the engine's last layer
computes only those queries).
"""

from __future__ import annotations

from typing import Protocol

import torch

from bd3.model.kv_cache import KVCache
from bd3.model.mask import Mask


class Denoiser(Protocol):
    calls: int

    def __call__(self, tokens: torch.Tensor, start: int, rows: torch.Tensor, pos: torch.Tensor,
                 sigma: torch.Tensor | None = None) -> torch.Tensor: ...

    def commit(self, tokens: torch.Tensor, start: int) -> None: ...

    def select(self, rows: torch.Tensor) -> None: ...


class ModelDenoiser:
    """A model's forward as a :class:`Denoiser`; see the module docstring. ``net``: the DiT
    or its engine (``net(tokens, positions=, attn_mask=, kv_cache=, select=, sigma=)``
    and ``net.new_kv_cache``)."""

    def __init__(
        self,
        net,
        *,
        attention: str = "block",
        block_size: int = 1,
        context: int = 0,
        kv_cache: bool = True,
    ) -> None:
        if attention not in ("block", "full", "causal"):
            raise ValueError(f"attention must be 'block', 'full' or 'causal', not {attention!r}")
        if kv_cache and attention == "full":
            raise ValueError("a KV cache needs block or causal attention (clean tokens must not see noisy ones)")
        self.net = net
        self.attention, self.block_size, self.context = attention, block_size, max(context, 0)
        self.kv_cache = kv_cache or attention == "causal"
        self.calls = 0
        self.cache: KVCache | None = None  # made at the first call, for its batch
        self.pending: torch.Tensor | None = None  # clean tokens not yet in the cache
        self.pending_start = 0
        self.ctx: torch.Tensor | None = None  # uncached: the clean context tokens

    def commit(self, tokens: torch.Tensor, start: int) -> None:
        if self.attention == "causal":
            return
        if self.kv_cache:
            if self.pending is None:
                self.pending, self.pending_start = tokens, start
            else:
                self.pending = torch.cat([self.pending, tokens], dim=1)
        elif self.context:
            ctx = tokens if self.ctx is None else torch.cat([self.ctx, tokens], dim=1)
            self.ctx = ctx[:, -self.context :]

    def select(self, rows: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache.select(rows)
        if self.pending is not None:
            self.pending = self.pending[rows]
        if self.ctx is not None:
            self.ctx = self.ctx[rows]

    def __call__(self, tokens: torch.Tensor, start: int, rows: torch.Tensor, pos: torch.Tensor,
                 sigma: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        if self.attention == "causal":
            return self._causal(tokens, start, rows, pos)
        if self.kv_cache:
            return self._cached(tokens, start, rows, pos)
        n = 0 if self.ctx is None else self.ctx.shape[1]
        seq = tokens if n == 0 else torch.cat([self.ctx, tokens], dim=1)
        mask = Mask.block_causal(tokens.shape[1]) if self.attention == "block" and n else None
        return self.net(seq, positions=0, attn_mask=mask, select=_select(rows, pos + n, seq.shape), sigma=sigma)

    def _kv(self, batch: int) -> KVCache:
        if self.cache is None:
            self.cache = self.net.new_kv_cache(batch, self.context + self.block_size)
        return self.cache

    def _causal(self, tokens, start, rows, pos) -> torch.Tensor:
        cache, S = self._kv(tokens.shape[0]), tokens.shape[1]
        cache.make_room(S)
        mask = Mask.causal(cache.length) if S > 1 else None
        logits = self.net(tokens, positions=start, attn_mask=mask, kv_cache=cache, select=_select(rows, pos, tokens.shape))
        cache.commit(S)
        return logits

    def _cached(self, block, start, rows, pos) -> torch.Tensor:
        cache, W = self._kv(block.shape[0]), block.shape[1]
        if self.pending is None:
            cache.make_room(W)
            return self.net(block, positions=start, kv_cache=cache, select=_select(rows, pos, block.shape))
        # fold the pending clean tokens into this call; they must not see the noisy block
        m = self.pending.shape[1]
        cache.make_room(m + W)
        mask = Mask.cached_pass(cache.length, m, self.block_size)
        tokens = torch.cat([self.pending, block], dim=1)
        logits = self.net(tokens, positions=self.pending_start, attn_mask=mask, kv_cache=cache,
                          select=_select(rows, pos + m, tokens.shape))
        cache.commit(m)
        self.pending = None
        return logits


def _select(rows: torch.Tensor, pos: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(B, S) bool, True at the (row, position) pairs."""
    sel = torch.zeros(shape, dtype=torch.bool, device=rows.device)
    sel[rows, pos] = True
    return sel
