"""The DiT backbone of the reference implementation, its rotary embeddings and KV cache."""

from bd3.model.dit import DiT
from bd3.model.kv_cache import KVCache

__all__ = ["DiT", "KVCache"]
