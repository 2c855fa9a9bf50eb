"""A KV cache passed to ``DiT.forward``: K (after rotary) and V of clean blocks, per layer.

Every call writes the K/V of its input tokens into the slots right after the cached ones
and attends over cache + new tokens; ``commit`` then keeps some of them (the clean tokens of
that pass) so later calls see them, and the next call overwrites the rest. Beyond the
capacity a sliding window drops the oldest tokens (``make_room``). Rows can be dropped
(``select``) when their samples stop, so they cost nothing more.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_heads: int,
        head_dim: int,
        capacity: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layers, batch, n_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0  # cached (committed) tokens

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens' K/V (B, H, S, d) after the cached ones; return the K/V to
        attend over (B, H, length + S, d)."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} > {self.capacity}; call make_room first")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def commit(self, n: int) -> None:
        """Keep the first ``n`` tokens the last forward pass wrote."""
        if self.length + n > self.capacity:
            raise ValueError(f"KV cache overflow: {self.length + n} > {self.capacity}")
        self.length += n

    def make_room(self, n: int) -> int:
        """Drop the oldest cached tokens so that ``n`` new ones fit (the sliding window);
        returns how many were dropped."""
        if n > self.capacity:
            raise ValueError(f"{n} tokens do not fit in a KV cache of {self.capacity}")
        drop = self.length + n - self.capacity
        if drop <= 0:
            return 0
        keep = self.length - drop
        if keep > 0:
            # one copy per tensor; clone because the ranges overlap
            self.k[:, :, :, :keep] = self.k[:, :, :, drop : self.length].clone()
            self.v[:, :, :, :keep] = self.v[:, :, :, drop : self.length].clone()
        self.length = max(keep, 0)
        return drop

    def select(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only these batch rows, in this order (rows that stopped cost nothing more)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.k.device)
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)
