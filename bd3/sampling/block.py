"""The block sampler: blocks left to right, masked diffusion inside each block.

Batched: every per-row rule works per row. With the first-hitting rule each model call
unmasks exactly one uniformly chosen masked position per row, and the output layer runs
only at those positions. A finished (clean) block is written into the KV cache by one
extra pass. Beyond the model length a sliding window keeps the last ``length - block_size``
tokens (cached K/V keep the context they were computed with; see design.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from bd3.diffusion.masks import block_causal_mask
from bd3.sampling.rules import sample_categorical, token_probs


@dataclass
class SampleStats:
    nfe: int = 0  # denoiser calls (the cache-writing pass is not counted)
    tokens: int = 0


def denoise_block(model, block: torch.Tensor, start: int, *, cache=None, context: torch.Tensor | None = None):
    """Hidden states (B, L', D) of a noisy block starting at token ``start``.

    With a KV cache the block attends to the cached clean tokens and to itself; without one
    the clean ``context`` and the block are recomputed under the block-causal mask.
    """
    block_size = block.shape[1]
    if cache is not None:
        positions = torch.arange(start, start + block_size, device=block.device)
        return model.hidden_states(block, positions=positions, kv_cache=cache)
    seq = torch.cat([context, block], dim=1)
    h, c = model.hidden_states(seq, attn_mask=block_causal_mask(seq.shape[1], block_size, str(block.device)))
    return h[:, -block_size:], c


def commit_block(model, cache, block: torch.Tensor, start: int) -> None:
    """One pass over a finished, clean block writes its K/V into the cache."""
    denoise_block(model, block, start, cache=cache)
    cache.commit(block.shape[1])


@torch.no_grad()
def sample_blocks(
    model,
    *,
    batch: int,
    max_tokens: int,
    block_size: int,
    length: int,
    mask_id: int,
    bos_id: int,
    generator: torch.Generator,
    top_p: float = 0.9,
    temperature: float = 1.0,
    kv_cache: bool = True,
    on_block: Callable[[torch.Tensor], bool | None] | None = None,
) -> tuple[torch.Tensor, SampleStats]:
    """Generate ``max_tokens`` tokens per row (BOS included), rounded up to whole blocks.

    ``on_block(x)`` is called with all tokens so far (B, n) after each finished block; it
    may return True to stop. Returns the tokens (B, n) and call statistics.
    """
    device = model.vocab_embed.embedding.device
    n_blocks = -(-max_tokens // block_size)
    window = length - block_size  # clean tokens kept as context
    cache = model.new_kv_cache(batch, length) if kv_cache else None
    x = torch.empty(batch, 0, dtype=torch.long, device=device)
    stats = SampleStats()
    rows = torch.arange(batch, device=device)
    for b in range(n_blocks):
        start = b * block_size
        block = torch.full((batch, block_size), mask_id, dtype=torch.long, device=device)
        if b == 0:
            block[:, 0] = bos_id
        if cache is not None:
            cache.make_room(block_size)
        while True:
            masked = block == mask_id
            if not masked.any():
                break
            # one uniformly chosen masked position per row that still has one
            active = masked.any(-1)
            choice = torch.rand(batch, block_size, generator=generator, device=device).masked_fill(~masked, -1.0).argmax(-1)
            context = None if cache is not None else (x[:, -window:] if window > 0 else x[:, :0])
            h, c = denoise_block(model, block, start, cache=cache, context=context)
            logits = model.logits(h[rows, choice], c)  # (B, V): the output layer at one position per row
            probs = token_probs(logits, mask_id, temperature, top_p)
            new = sample_categorical(probs, generator)
            block[rows[active], choice[active]] = new[active]
            stats.nfe += 1
        if cache is not None:
            commit_block(model, cache, block, start)
        x = torch.cat([x, block], dim=1)
        stats.tokens += batch * block_size
        if on_block is not None and on_block(x):
            break
    return x, stats
