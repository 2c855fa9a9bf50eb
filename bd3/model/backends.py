"""Attention backends on GPUs: FlexAttention block masks and xformers attention biases.

A mask reaches attention as a :class:`~bd3.model.mask.Mask` (which of bd3's masks, and its
layout), or as an explicit boolean table (S_q, S_kv) (True = may attend). Each backend makes
its own form once per mask and shape, cached:

- ``sdpa``: the boolean table (bd3.model.attention: SDPA, or the tiled CPU kernel).
- ``flex``: a FlexAttention ``BlockMask`` made by ``create_block_mask`` from the mask's
  function (:meth:`Mask.mod`), or from a lookup into an explicit table.
- ``xformers``: ``memory_efficient_attention`` with an attention bias: block-diagonal
  classes where they fit (the training mask at block size = length, where ``x_t`` and
  ``x_0`` are independent sequences: ``BlockDiagonalMask``, and for the x_t queries alone
  ``BlockDiagonalPaddedKeysMask``), ``LowerTriangularMask`` for causal attention, and an
  additive tensor bias everywhere else (the block-diffusion and sampler masks are not
  block-diagonal).

Unmasked and causal attention (MDLM, the AR model, a KV cache without a mask) is SDPA's for
``flex`` (flash kernels). ``resolve_attn`` turns ``auto`` into a backend that can run.
"""

from __future__ import annotations

import importlib.util
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bd3.choices import ATTN_BACKENDS
from bd3.errors import Bd3Error
from bd3.model.mask import Mask

FLEX_TILE = 128  # FlexAttention's block-sparsity granularity (queries and keys per tile)


def flex_available(device: torch.device | None = None) -> bool:
    """FlexAttention is in this torch (and, for CUDA, triton compiles its kernels)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return device is None or device.type != "cuda" or has_triton()


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def resolve_attn(name: str, device: torch.device) -> str:
    """``auto`` -> flex on CUDA (else xformers if installed, else sdpa), sdpa on CPU; a
    backend that cannot run on ``device`` is a one-line error."""
    if name not in ATTN_BACKENDS:
        raise Bd3Error(f"Unknown attention backend {name!r}; choose {', '.join(ATTN_BACKENDS)}.")
    cuda = device.type == "cuda"
    if name == "auto":
        if cuda and flex_available(device):
            return "flex"
        return "xformers" if cuda and xformers_available() else "sdpa"
    if name == "flex":
        if not flex_available(device):
            raise Bd3Error(f"--attn flex needs torch.nn.attention.flex_attention and triton (torch >= 2.5; this is {torch.__version__}); use --attn sdpa.")
        if not cuda:
            raise Bd3Error(f"--attn flex runs on CUDA only (FlexAttention has no backward on {device.type}); use --attn sdpa or auto.")
    if name == "xformers":
        if not xformers_available():
            raise Bd3Error("--attn xformers needs xformers: pip install 'bd3[xformers]' after torch (so it never replaces it), or use --attn auto.")
        if not cuda:
            raise Bd3Error(f"--attn xformers runs on CUDA only (xformers has no {device.type} kernels); use --attn sdpa or auto.")
    return name


# -- per-mask caches ----------------------------------------------------------------------


_cache: dict[int, dict] = {}  # id(table) -> key -> value, dropped with the table
_by_mask: dict[tuple, object] = {}  # (Mask, shape, ...) -> value
MAX_MASKS = 64  # kept per cache at most (a sampler's cached passes change shape as the cache grows)


def _cached(mask: torch.Tensor | Mask, key: tuple, make: Callable):
    """``make()`` once per (mask, key): a description by value, a table by identity."""
    if isinstance(mask, Mask):
        key = (mask, *key)
        if key not in _by_mask:
            if len(_by_mask) >= MAX_MASKS:
                _by_mask.clear()
            _by_mask[key] = make()
        return _by_mask[key]
    per_mask = _cache.get(id(mask))
    if per_mask is None:
        per_mask = _cache[id(mask)] = {}
        weakref.finalize(mask, _cache.pop, id(mask), None)
    if key not in per_mask:
        per_mask[key] = make()
    return per_mask[key]


# -- flex -------------------------------------------------------------------------------


@torch.compiler.disable
def flex_block_mask(mask: Mask | torch.Tensor, rows: int, cols: int, device, tile: int = FLEX_TILE):
    """The FlexAttention ``BlockMask`` of ``mask`` for its first ``rows`` queries and
    ``cols`` keys."""
    from torch.nn.attention.flex_attention import create_block_mask

    def make():
        if isinstance(mask, Mask):
            mod = mask.mod
        else:
            table = mask.clone()  # not the mask itself: the cache entry must not keep it alive
            mod = lambda q, k: table[q, k]  # noqa: E731
        return create_block_mask(lambda b, h, q, k: mod(q, k), None, None, rows, cols, device=device, BLOCK_SIZE=tile)

    return _cached(mask, ("flex", rows, cols, tile, str(device)), make)


_flex_compiled = None


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask | torch.Tensor) -> torch.Tensor:
    """FlexAttention over (B, H, S, d) tensors under ``mask`` (its first S_q rows),
    compiled (inside a compiled model, as part of its graph)."""
    from torch.nn.attention.flex_attention import flex_attention

    global _flex_compiled
    block_mask = flex_block_mask(mask, q.shape[2], k.shape[2], q.device)
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask)
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled(q, k, v, block_mask=block_mask)


# -- xformers ---------------------------------------------------------------------------


def tensor_bias(mask: Mask | torch.Tensor, rows: int, cols: int, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """The first ``rows`` queries of ``mask`` as an additive bias (0 / -inf) of ``dtype``,
    its rows padded to a multiple of 8 elements in memory (xformers reads the bias in aligned
    chunks)."""

    def make():
        table = mask.dense(rows, cols, device) if isinstance(mask, Mask) else mask[:rows]
        storage = torch.zeros(rows, -(-cols // 8) * 8, dtype=dtype, device=table.device)
        return storage[:, :cols].masked_fill_(~table, float("-inf"))

    return _cached(mask, ("bias", rows, cols, dtype, str(device)), make)


def xformers_bias(mask: Mask | torch.Tensor | None, rows: int, cols: int, batch: int, dtype: torch.dtype,
                  causal: bool = False, device="cpu"):
    """``(attn_bias, folded)`` for ``memory_efficient_attention`` on the first ``rows``
    queries against ``cols`` keys; ``folded``: the batch goes into the sequence axis (q, k,
    v reshaped to batch 1), as the block-diagonal classes need."""
    from xformers.ops.fmha import attn_bias as xb

    if mask is None:
        return (xb.LowerTriangularMask() if causal else None), False
    if isinstance(mask, Mask) and mask.kind == "causal" and mask.cached == 0 and rows == cols:
        return xb.LowerTriangularMask(), False
    if isinstance(mask, Mask) and mask.kind == "block_diff" and mask.block_size == mask.length and rows in (mask.length, 2 * mask.length):
        L = mask.length  # x_t and x_0 are independent sequences

        def make():
            if rows == 2 * L:
                return xb.BlockDiagonalMask.from_seqlens([L] * (2 * batch))
            # the x_t queries alone: their own sequence, the first half of each row's keys
            return xb.BlockDiagonalPaddedKeysMask.from_seqlens([L] * batch, 2 * L, [L] * batch)

        return _cached(mask, ("xformers", rows, batch), make), True
    return tensor_bias(mask, rows, cols, dtype, device), False


def xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask | torch.Tensor | None, is_causal: bool = False) -> torch.Tensor:
    """``memory_efficient_attention`` over (B, H, S, d) tensors (it takes (B, S, H, d))."""
    import xformers.ops as xops

    B, H, S_q, d = q.shape
    bias, folded = xformers_bias(mask, S_q, k.shape[2], B, q.dtype, is_causal, q.device)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if folded:
        q, k, v = (t.reshape(1, -1, H, d) for t in (q, k, v))
    elif isinstance(bias, torch.Tensor):
        bias = bias.expand(B, H, *bias.shape)
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias)
    return out.reshape(B, S_q, H, d).transpose(1, 2)


def attend_with(backend: str, q, k, v, mask: Mask | torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """flex or xformers attention (the caller handles sdpa)."""
    table = isinstance(mask, torch.Tensor)
    if backend == "flex":
        if mask is None or (table and mask.dtype != torch.bool):  # nothing to make sparse: SDPA's flash kernels
            if mask is not None and mask.shape[-2] != q.shape[2]:
                mask = mask[..., : q.shape[2], :]  # queries for a prefix of the positions
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return flex(q, k, v, mask)
    if backend == "xformers":
        if table and mask.dtype != torch.bool:
            raise ValueError("the xformers backend takes boolean masks")
        return xformers(q, k, v, mask, is_causal)
    raise ValueError(f"unknown attention backend {backend!r}")
