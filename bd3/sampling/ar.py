"""Token-by-token sampling for the causal (AR) model, with a KV cache."""

from __future__ import annotations

from collections.abc import Callable

import torch

from bd3.sampling.block import SampleStats
from bd3.sampling.rules import sample_categorical, token_probs


@torch.no_grad()
def sample_ar(
    model,
    *,
    batch: int,
    max_tokens: int,
    length: int,
    mask_id: int,
    bos_id: int,
    generator: torch.Generator,
    top_p: float = 0.9,
    temperature: float = 1.0,
    report_every: int = 16,
    on_block: Callable[[torch.Tensor], bool | None] | None = None,
) -> tuple[torch.Tensor, SampleStats]:
    """``max_tokens`` tokens per row (BOS included); the cache slides past ``length``."""
    device = model.vocab_embed.embedding.device
    cache = model.new_kv_cache(batch, length)
    x = torch.full((batch, 1), bos_id, dtype=torch.long, device=device)
    stats = SampleStats(tokens=batch)
    for i in range(1, max_tokens):
        cache.make_room(1)
        logits = model(x[:, -1:], positions=torch.tensor([i - 1], device=device), kv_cache=cache)[:, -1]
        cache.commit(1)
        new = sample_categorical(token_probs(logits, mask_id, temperature, top_p), generator)
        x = torch.cat([x, new[:, None]], dim=1)
        stats.nfe += 1
        stats.tokens += batch
        if on_block is not None and (i + 1) % report_every == 0 and on_block(x):
            break
    if on_block is not None and x.shape[1] % report_every:
        on_block(x)
    return x, stats
