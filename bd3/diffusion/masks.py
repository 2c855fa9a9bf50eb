"""Block attention masks (True = may attend), defined once as a mask function.

``block_diff_mask_mod(q, k, length, block_size)`` is the single definition of the training
mask over the 2L input ``[x_t ; x_0]``; every backend (dense SDPA here, FlexAttention and
xformers on GPUs) is tested against its materialisation.
"""

from __future__ import annotations

from functools import lru_cache

import torch


def block_diff_mask_mod(q: torch.Tensor, k: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Whether query ``q`` may attend to key ``k`` in the 2L training sequence.

    Three parts (paper eq. 11; reference ``block_diff_mask``):
    - block-diagonal: a token sees its own block within its own stream (x_t or x_0);
    - offset block-causal: an x_t token sees clean x_0 blocks strictly before its own;
    - block-causal: the clean stream x_0 sees its own and earlier blocks.
    """
    q_clean, k_clean = q >= length, k >= length
    bq = (q - length * q_clean) // block_size
    bk = (k - length * k_clean) // block_size
    diagonal = (bq == bk) & (q_clean == k_clean)
    offset_causal = (bq > bk) & k_clean & ~q_clean
    causal = (bq >= bk) & k_clean & q_clean
    return diagonal | offset_causal | causal


@lru_cache(maxsize=16)
def block_diff_mask(length: int, block_size: int, device: str = "cpu") -> torch.Tensor:
    """The dense (2L, 2L) boolean training mask, built once per (L, L', device) and shared."""
    idx = torch.arange(2 * length, device=device)
    return block_diff_mask_mod(idx[:, None], idx[None, :], length, block_size)


@lru_cache(maxsize=16)
def block_causal_mask(n: int, block_size: int, device: str = "cpu") -> torch.Tensor:
    """(n, n) block-causal mask: a token sees its own and earlier blocks (the clean stream)."""
    b = torch.arange(n, device=device) // block_size
    return b[:, None] >= b[None, :]
