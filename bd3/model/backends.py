"""Attention backends on GPUs: FlexAttention block masks and xformers attention biases.

Every mask reaches the model as the dense boolean (S_q, S_kv) tensor (True = may attend) that
bd3.diffusion.masks (or the sampler) built; that stays the one definition. A backend turns it
into its own form once per mask, cached with it:

- ``sdpa``: the dense mask itself (bd3.model.attention: SDPA, or the tiled CPU kernel).
- ``flex``: a FlexAttention ``BlockMask`` made by ``create_block_mask`` from the mask's
  function. The masks bd3 builds are recognised (and checked equal to the tensor): the
  training mask over ``[x_t ; x_0]`` uses ``block_diff_mask_mod``; the sampler's
  block-causal mask is that function's clean-stream part; the sampler's cached pass
  (pending clean blocks and a noisy block, queries offset against the cached keys) is
  built from the block-causal one. Any other mask is looked up from the tensor.
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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bd3.choices import ATTN_BACKENDS
from bd3.diffusion.masks import block_diff_mask_mod
from bd3.errors import Bd3Error

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


# -- what a dense mask is ---------------------------------------------------------------


def block_causal_mod(block_size: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Block-causal attention: the training mask with an empty x_t stream (every token
    clean), i.e. its x_0 part."""
    return lambda q, k: block_diff_mask_mod(q, k, 0, block_size)


def cached_pass_mod(cached: int, pending: int, block_size: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The sampler's cached pass: queries ``[pending clean tokens ; noisy block]``, keys
    ``[cached ; pending ; noisy]``. The clean tokens see the cache, and each other
    block-causally (their queries offset by ``cached`` against the keys), never the noisy
    block; the noisy block sees everything."""
    causal = block_causal_mod(block_size)

    def mod(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        kp = k - cached
        return (q >= pending) | (k < cached) | ((kp < pending) & causal(q, kp))

    return mod


@dataclass(frozen=True)
class MaskDef:
    """A dense mask's definition: ``mod(q, k)`` -> may attend, over index tensors."""

    kind: str  # block_diff | block_causal | cached | dense
    mod: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    length: int = 0  # block_diff: L (the mask is 2L x 2L)
    block_size: int = 0


def dense_of(mod: Callable, rows: int, cols: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``mod`` evaluated on every (query, key) pair: (rows, cols) bool."""
    return mod(torch.arange(rows, device=device)[:, None], torch.arange(cols, device=device)[None, :])


def _candidates(mask: torch.Tensor) -> list[MaskDef]:
    S_q, S_kv = mask.shape
    out = []
    if S_q == S_kv and S_q % 2 == 0:
        L, bs = S_q // 2, int(mask[0, : S_q // 2].sum())
        if bs and L % bs == 0:
            out.append(MaskDef("block_diff", lambda q, k: block_diff_mask_mod(q, k, L, bs), L, bs))
    if S_q == S_kv and int(mask[0].sum()):
        out.append(MaskDef("block_causal", block_causal_mod(int(mask[0].sum())), block_size=int(mask[0].sum())))
    if S_kv > S_q:
        cached, pending = S_kv - S_q, int((~mask[:, -1]).sum())
        bs = int(mask[0, cached:].sum()) if pending else 1
        if bs:
            out.append(MaskDef("cached", cached_pass_mod(cached, pending, bs), block_size=bs))
    return out


def describe(mask: torch.Tensor) -> MaskDef:
    """The definition of a dense boolean mask (cached with it): one of bd3's masks when it
    equals one, else a lookup into the tensor."""
    return _cached(mask, ("def",), lambda: _describe(mask))


def _describe(mask: torch.Tensor) -> MaskDef:
    for d in _candidates(mask):
        if torch.equal(dense_of(d.mod, *mask.shape, mask.device), mask):
            return d
    table = mask.clone()  # not the mask itself: the cache entry must not keep it alive
    return MaskDef("dense", lambda q, k: table[q, k])


_cache: dict[int, dict] = {}  # id(mask) -> key -> value, dropped with the mask


def _cached(mask: torch.Tensor, key: tuple, make: Callable):
    per_mask = _cache.get(id(mask))
    if per_mask is None:
        per_mask = _cache[id(mask)] = {}
        weakref.finalize(mask, _cache.pop, id(mask), None)
    if key not in per_mask:
        per_mask[key] = make()
    return per_mask[key]


# -- flex -------------------------------------------------------------------------------


@torch.compiler.disable
def flex_block_mask(mask: torch.Tensor, rows: int, tile: int = FLEX_TILE):
    """The FlexAttention ``BlockMask`` of ``mask[:rows]`` (the first ``rows`` queries)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def make():
        d = describe(mask)
        return create_block_mask(
            lambda b, h, q, k: d.mod(q, k), None, None, rows, mask.shape[1], device=mask.device, BLOCK_SIZE=tile
        )

    return _cached(mask, ("flex", rows, tile), make)


def block_mask_dense(block_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """What FlexAttention computes under ``block_mask``, as dense (Q, KV) bool masks: from
    the forward's per-query-tile key tiles and from the backward's per-key-tile query tiles.
    A pair counts when its tile is full, or partial and the mask function allows it."""
    from torch.nn.attention.flex_attention import create_mask

    b = block_mask
    Q, KV = b.seq_lengths
    tq, tk = b.BLOCK_SIZE
    shape = (-(-Q // tq), -(-KV // tk))
    allowed = create_mask(b.mask_mod, None, None, Q, KV, device=b.kv_indices.device)[0, 0]
    out = []
    for num, idx, full_num, full_idx, transposed in (
        (b.kv_num_blocks, b.kv_indices, b.full_kv_num_blocks, b.full_kv_indices, False),
        (b.q_num_blocks, b.q_indices, b.full_q_num_blocks, b.full_q_indices, True),
    ):
        partial = _pairs(_tiles(num, idx, shape, transposed), tq, tk, Q, KV)
        full = _pairs(_tiles(full_num, full_idx, shape, transposed), tq, tk, Q, KV)
        out.append(full.to(allowed.device) | (partial.to(allowed.device) & allowed))
    return out[0], out[1]


def _tiles(num, idx, shape: tuple[int, int], transposed: bool) -> torch.Tensor:
    """(query tiles, key tiles) bool from the (batch 0, head 0) lists of tile indices."""
    dense = torch.zeros(shape[::-1] if transposed else shape, dtype=torch.bool)
    if num is not None:
        for r, (n, row) in enumerate(zip(num[0, 0].tolist(), idx[0, 0].cpu())):
            dense[r, row[:n].long()] = True
    return dense.t() if transposed else dense


def _pairs(tiles: torch.Tensor, tq: int, tk: int, Q: int, KV: int) -> torch.Tensor:
    return tiles.repeat_interleave(tq, 0).repeat_interleave(tk, 1)[:Q, :KV]


_flex_compiled = None


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """FlexAttention over (B, H, S, d) tensors under the dense ``mask`` (its first S_q rows),
    compiled (inside a compiled model, as part of its graph)."""
    from torch.nn.attention.flex_attention import flex_attention

    global _flex_compiled
    block_mask = flex_block_mask(mask, q.shape[2])
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask)
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled(q, k, v, block_mask=block_mask)


# -- xformers ---------------------------------------------------------------------------


def tensor_bias(mask: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """``mask[:rows]`` as an additive bias (0 / -inf) of ``dtype``, its rows padded to a
    multiple of 8 elements in memory (xformers reads the bias in aligned chunks)."""

    def make():
        cols = mask.shape[1]
        storage = torch.zeros(rows, -(-cols // 8) * 8, dtype=dtype, device=mask.device)
        return storage[:, :cols].masked_fill_(~mask[:rows], float("-inf"))

    return _cached(mask, ("bias", rows, dtype), make)


def xformers_bias(mask: torch.Tensor | None, rows: int, batch: int, dtype: torch.dtype, causal: bool = False):
    """``(attn_bias, folded)`` for ``memory_efficient_attention`` on the first ``rows``
    queries; ``folded``: the batch goes into the sequence axis (q, k, v reshaped to batch 1),
    as the block-diagonal classes need."""
    from xformers.ops.fmha import attn_bias as xb

    if mask is None:
        return (xb.LowerTriangularMask() if causal else None), False
    d = describe(mask)
    if d.kind == "block_diff" and d.block_size == d.length and rows in (d.length, 2 * d.length):
        L = d.length  # x_t and x_0 are independent sequences

        def make():
            if rows == 2 * L:
                return xb.BlockDiagonalMask.from_seqlens([L] * (2 * batch))
            # the x_t queries alone: their own sequence, the first half of each row's keys
            return xb.BlockDiagonalPaddedKeysMask.from_seqlens([L] * batch, 2 * L, [L] * batch)

        return _cached(mask, ("xformers", rows, batch), make), True
    return tensor_bias(mask, rows, dtype), False


def xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool = False) -> torch.Tensor:
    """``memory_efficient_attention`` over (B, H, S, d) tensors (it takes (B, S, H, d))."""
    import xformers.ops as xops

    B, H, S_q, d = q.shape
    bias, folded = xformers_bias(mask, S_q, B, q.dtype, is_causal)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if folded:
        q, k, v = (t.reshape(1, -1, H, d) for t in (q, k, v))
    elif isinstance(bias, torch.Tensor):
        bias = bias.expand(B, H, *bias.shape)
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias)
    return out.reshape(B, S_q, H, d).transpose(1, 2)


def attend_with(backend: str, q, k, v, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """flex or xformers attention (the caller handles sdpa)."""
    if backend == "flex":
        if mask is None or mask.dtype != torch.bool:  # nothing to make sparse: SDPA's flash kernels
            if mask is not None and mask.shape[-2] != q.shape[2]:
                mask = mask[..., : q.shape[2], :]  # queries for a prefix of the positions
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return flex(q, k, v, mask)
    if backend == "xformers":
        if mask is not None and mask.dtype != torch.bool:
            raise ValueError("the xformers backend takes boolean masks")
        return xformers(q, k, v, mask, is_causal)
    raise ValueError(f"unknown attention backend {backend!r}")
