"""Denoisers: what the block sampler calls for p_theta(x0 | x_t) at a few positions.

A denoiser is called as ``denoiser(block, start, rows, pos) -> logits (N, V)``: the
current noisy block (B, W) of every row in the batch, the absolute position of its first
token, and N (row, position) pairs whose logits are wanted (rows ascending). It is told
the clean tokens that later blocks condition on (``commit(tokens, start)``) and which rows
to keep (``select(rows)``); ``calls`` counts backbone passes. Any callable with that
signature works (:class:`FunctionDenoiser` gives it no-op ``commit``/``select``), so tests
pin each update rule with a mock.

:class:`ModelDenoiser` runs a DiT three ways:

- ``kv_cache=True`` (block attention): the clean tokens' K/V are cached. Committing a block
  costs no extra pass: the next call runs ``[clean block ; new noisy block]`` under a mask
  (the clean block attends to the cache and itself, the noisy block to everything) and keeps
  the clean part's K/V. A prompt is written the same way, all its whole blocks in one pass.
  Beyond the model length the oldest cached tokens are dropped, so a block sees at most
  ``context`` clean tokens.
- ``kv_cache=False`` (block attention): every call recomputes the last ``context`` clean
  tokens and the block under the block-causal mask (exact same logits within the length).
- ``attention="full"`` (MDLM): the last ``context`` clean tokens and the block attend to
  each other without a mask (MDLM's semi-autoregressive window); no cache is possible.

The output layer runs only at the requested positions, and (with the engine) the last layer
computes only those queries.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bd3.diffusion.masks import block_causal_mask
from bd3.runtime import MODEL_PRECISIONS, autocast
from bd3.sampling.engine import Engine
from bd3.sampling.threads import ThreadTuner


class FunctionDenoiser:
    """A plain callable ``fn(block, start, rows, pos) -> logits`` as a denoiser."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, block, start, rows, pos):
        self.calls += 1
        return self.fn(block, start, rows, pos)

    def commit(self, tokens: torch.Tensor, start: int) -> None:
        pass

    def select(self, rows: torch.Tensor) -> None:
        pass


class ModelBackend:
    """``DiT.hidden_states`` / ``DiT.logits`` behind the engine's interface (the reference
    path, and a fallback for models the engine does not know); ``precision="bf16"`` runs
    them under bf16 autocast."""

    def __init__(self, model, precision: str = "fp32") -> None:
        self.model = model
        self.precision = precision
        self.length = model.cfg.length
        self.device = model.vocab_embed.embedding.device
        self._c = None

    def new_cache(self, batch: int, capacity: int | None = None):
        return self.model.new_kv_cache(batch, capacity or self.length)

    @torch.inference_mode()
    def hidden(self, tokens, start=0, *, cache=None, mask=None, query=None, causal=False):
        S = tokens.shape[1]
        positions = torch.arange(start, start + S, device=tokens.device)
        if causal and cache is None and mask is None:
            mask = torch.ones(S, S, dtype=torch.bool, device=tokens.device).tril_()
        with autocast(self.device, self.precision):
            h, self._c = self.model.hidden_states(tokens, positions=positions, attn_mask=mask, kv_cache=cache)
        if query is not None:
            h = h.gather(1, query[:, :, None].expand(-1, -1, h.shape[-1]))
        return h

    @torch.inference_mode()
    def logits(self, h):
        with autocast(self.device, self.precision):
            return self.model.logits(h, self._c).float()


def backend_for(model, engine: bool = True, precision: str = "fp32"):
    """The fast :class:`Engine` for a DiT (default), else :class:`ModelBackend`, at
    ``precision`` (fp32, bf16, or fp16 for the engine); an object that already has ``hidden``/``logits`` is used
    as is."""
    if hasattr(model, "hidden") and hasattr(model, "logits") and not hasattr(model, "hidden_states"):
        return model
    if engine:
        return Engine(model, precision)
    if precision not in MODEL_PRECISIONS:
        raise ValueError(f"precision {precision!r} needs the engine; the model itself runs in fp32 or bf16")
    return ModelBackend(model, precision)


def pack_queries(rows: torch.Tensor, pos: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) pairs, rows ascending -> a (batch, Q) query matrix (padded with
    position 0) and each pair's slot in it."""
    if rows.numel() == batch and rows.equal(torch.arange(batch, device=rows.device)):  # one per row
        return pos[:, None], torch.zeros_like(rows)
    counts = torch.bincount(rows, minlength=batch)
    Q = int(counts.max()) if rows.numel() else 1
    slot = torch.arange(rows.numel(), device=rows.device) - (counts.cumsum(0) - counts)[rows]
    query = torch.zeros(batch, Q, dtype=torch.long, device=rows.device)
    query[rows, slot] = pos
    return query, slot


class ModelDenoiser:
    """A DiT (or a backend) as the block sampler's denoiser; see the module docstring."""

    def __init__(
        self,
        model,
        batch: int,
        *,
        block_size: int,
        context: int,
        kv_cache: bool = True,
        attention: str = "block",
        engine: bool = True,
    ) -> None:
        if attention not in ("block", "full"):
            raise ValueError(f"attention must be 'block' or 'full', not {attention!r}")
        if kv_cache and attention != "block":
            raise ValueError("a KV cache needs block attention (clean tokens must not see noisy ones)")
        self.backend = backend_for(model, engine)
        self.block_size, self.context, self.attention = block_size, max(context, 0), attention
        self.calls = 0
        self.tuner = ThreadTuner(1)  # the sampler sets its own
        self.cache = self.backend.new_cache(batch, self.context + block_size) if kv_cache else None
        self.pending: torch.Tensor | None = None  # clean tokens not yet in the cache
        self.pending_start = 0
        self.ctx: torch.Tensor | None = None  # uncached: the clean context tokens
        self._masks: dict[tuple[int, int, int], torch.Tensor] = {}

    # -- the sampler's interface ----------------------------------------------------

    def commit(self, tokens: torch.Tensor, start: int) -> None:
        if self.cache is not None:
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

    def __call__(self, block: torch.Tensor, start: int, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        B, W = block.shape
        query, slot = pack_queries(rows, pos, B)
        self.calls += 1
        with self.tuner.call():
            if self.cache is not None:
                h = self._cached(block, start, query)
            else:
                n = 0 if self.ctx is None else self.ctx.shape[1]
                seq = block if n == 0 else torch.cat([self.ctx, block], dim=1)
                mask = None
                if self.attention == "block" and n:
                    mask = block_causal_mask(n + W, W, str(block.device))
                h = self.backend.hidden(seq, 0, mask=mask, query=query + n)
            return self.backend.logits(h[rows, slot])

    def _cached(self, block: torch.Tensor, start: int, query: torch.Tensor) -> torch.Tensor:
        cache, W = self.cache, block.shape[1]
        if self.pending is None:
            cache.make_room(W)
            return self.backend.hidden(block, start, cache=cache, query=query)
        # fold the pending clean tokens into this call; they must not see the noisy block
        m = self.pending.shape[1]
        cache.make_room(m + W)
        mask = self._fold_mask(cache.length, m, W, block.device)
        tokens = torch.cat([self.pending, block], dim=1)
        h = self.backend.hidden(tokens, self.pending_start, cache=cache, mask=mask, query=query + m)
        cache.commit(m)
        self.pending = None
        return h

    def _fold_mask(self, cached: int, m: int, W: int, device) -> torch.Tensor:
        key = (cached, m, W)
        mask = self._masks.get(key)
        if mask is None:
            mask = torch.ones(m + W, cached + m + W, dtype=torch.bool, device=device)
            mask[:m, cached : cached + m] = block_causal_mask(m, self.block_size, str(device))
            mask[:m, cached + m :] = False
            if len(self._masks) > 64:
                self._masks.clear()
            self._masks[key] = mask
        return mask
