"""A KV cache passed to ``DiT.forward``: K (after rotary) and V of clean blocks, per layer.

Every call writes the K/V of its input tokens into the slots right after the cached ones
and attends over cache + new tokens; ``commit`` then keeps them (one pass over a finished,
clean block) so the next block sees them. Beyond the capacity a sliding window drops the
oldest tokens (``make_room``).
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

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens' K/V after the cached ones; return the K/V to attend over."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} > {self.capacity}; call make_room first")
        self.k[layer, :, :, self.length : end] = k.to(self.k.dtype)
        self.v[layer, :, :, self.length : end] = v.to(self.v.dtype)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def commit(self, n: int) -> None:
        """Keep the ``n`` tokens the last forward pass wrote."""
        self.length += n

    def make_room(self, n: int) -> None:
        """Drop the oldest cached tokens so that ``n`` new ones fit (the sliding window)."""
        drop = self.length + n - self.capacity
        if drop > 0:
            keep = self.length - drop
            self.k[:, :, :, :keep] = self.k[:, :, :, drop : self.length].clone()
            self.v[:, :, :, :keep] = self.v[:, :, :, drop : self.length].clone()
            self.length = keep

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (rows that stopped early cost nothing more)."""
        self.k = self.k[:, rows]
        self.v = self.v[:, rows]
