"""Attention under a boolean mask, computing only the tiles the mask allows.

``attend(q, k, v, mask)`` equals ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask)``
for a boolean ``mask`` (S_q, S_kv), True = may attend. SDPA computes every (query, key) pair
whatever the mask, and the block-diffusion training mask over ``[x_t ; x_0]`` allows only
about a quarter of them (L (L + L') of (2L)^2). So when training on a CPU the queries are cut
into tiles (32 or more); each tile attends, in one softmax, to the key tiles where its rows
allow anything (an x_0 tile: the x_0 prefix; an x_t tile: its own tile and the x_0 prefix),
with the mask restricted to them: about L^2 + 3 T L pairs instead of 4 L^2. The tiles run as
batched matmuls in float32 (the CPU flash-attention kernel is slow at head dimension 32, its
backward 5-7x its forward), and the backward recomputes each tile's probabilities instead of
keeping them, so the memory stays linear in the length, as flash attention's.

The mask stays the one definition: a :class:`~bd3.model.mask.Mask` becomes its boolean
table (made once per shape and shared by every layer), the tiling is derived from that and
cached with it, with its restricted parts as additive masks made once per dtype. Elsewhere (inference, CUDA, float masks, a few queries, causal,
inside torch.compile) this is plain SDPA; FlexAttention and xformers are in bd3.model.backends.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bd3.model.backends import attend_with
from bd3.model.mask import Mask

MIN_TILE = 32  # queries (and keys) per tile, at least
MAX_TILES = 32  # longer sequences get larger tiles, so the number of kernel calls stays bounded
MAX_DENSITY = 0.7  # tile only when at most this share of the (query, key) pairs is computed


@dataclass
class _Tile:
    q: tuple[int, int]  # query range [start, end)
    runs: list[tuple[int, int]]  # key ranges [start, end) that the tile's queries may see
    mask: torch.Tensor | None  # (queries, keys of the runs concatenated) bool; None = all


@dataclass
class _Plan:
    tiles: list[_Tile] | None  # None: dense SDPA is as good
    additive: dict = field(default_factory=dict)  # dtype -> per tile: float mask or None


_plans: dict[int, dict[int, _Plan]] = {}  # id(mask) -> query rows -> plan, dropped with the mask


def _plan(mask: torch.Tensor, rows: int) -> _Plan:
    """The tiling of ``mask[:rows]``."""
    per_mask = _plans.get(id(mask))
    if per_mask is None:
        per_mask = _plans[id(mask)] = {}
        weakref.finalize(mask, _plans.pop, id(mask), None)
    if rows not in per_mask:
        per_mask[rows] = _make_plan(mask[:rows])
    return per_mask[rows]


def tile_size(n_queries: int) -> int:
    """Queries per tile: MIN_TILE, doubled until there are at most MAX_TILES tiles."""
    tile = MIN_TILE
    while tile * MAX_TILES < n_queries:
        tile *= 2
    return tile


def _make_plan(m: torch.Tensor) -> _Plan:
    S_q, S_kv = m.shape
    if S_q <= MIN_TILE or not bool(m.any(dim=1).all()):  # few queries, or one that sees no key: SDPA
        return _Plan(None)
    T = tile_size(S_q)
    n_q, n_kv = -(-S_q // T), -(-S_kv // T)
    padded = torch.zeros(n_q * T, n_kv * T, dtype=torch.bool, device=m.device)
    padded[:S_q, :S_kv] = m
    allowed = padded.view(n_q, T, n_kv, T).any(dim=3).any(dim=1).cpu()  # (n_q, n_kv)
    tiles, pairs = [], 0
    for i in range(n_q):
        q0, q1 = i * T, min(S_q, (i + 1) * T)
        runs: list[list[int]] = []
        for j in allowed[i].nonzero().flatten().tolist():
            if runs and runs[-1][1] == j:
                runs[-1][1] = j + 1
            else:
                runs.append([j, j + 1])
        kv = [(a * T, min(S_kv, b * T)) for a, b in runs]
        sub = torch.cat([m[q0:q1, k0:k1] for k0, k1 in kv], dim=1)
        tiles.append(_Tile((q0, q1), kv, None if bool(sub.all()) else sub))
        pairs += sub.numel()
    use = n_q > 1 and pairs <= MAX_DENSITY * S_q * S_kv
    return _Plan(tiles if use else None)


def _additive(plan: _Plan, dtype: torch.dtype) -> list[torch.Tensor | None]:
    dtype = torch.promote_types(dtype, torch.float32)  # scores are float32 (float64 for float64)
    if dtype not in plan.additive:
        plan.additive[dtype] = [
            None if t.mask is None else torch.zeros(t.mask.shape, dtype=dtype, device=t.mask.device).masked_fill_(~t.mask, float("-inf"))
            for t in plan.tiles
        ]
    return plan.additive[dtype]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask | torch.Tensor | None, *, is_causal: bool = False,
    backend: str = "sdpa",
) -> torch.Tensor:
    """SDPA over (B, H, S, d) tensors; ``mask`` a :class:`Mask`, a (S_q, S_kv) bool or float
    table, or None. Only the first S_q rows of a longer table are used (queries for a prefix
    of the positions). ``backend`` flex or xformers: the same attention through
    bd3.model.backends (CUDA)."""
    if backend != "sdpa":
        return attend_with(backend, q, k, v, mask, is_causal)
    S_q = q.shape[2]
    if isinstance(mask, Mask):
        mask = mask.dense(S_q, k.shape[2], q.device)
    mask_q = mask if mask is None or mask.shape[-2] == S_q else mask[..., :S_q, :]
    tiled = (  # training on a CPU: inference keeps SDPA, whose forward alone is cheap enough
        mask is not None and not is_causal and mask.dtype == torch.bool and mask.dim() == 2 and S_q > MIN_TILE
        and q.device.type == "cpu" and q.dtype == k.dtype == v.dtype
        and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        and not torch.compiler.is_compiling()  # compiled: SDPA, which inductor lowers
    )
    if tiled:
        plan = _plan(mask, S_q)
        if plan.tiles is not None:
            with torch.autocast(q.device.type, enabled=False):  # float32 inside, whatever autocast says
                return _TiledAttention.apply(q, k, v, plan, _additive(plan, q.dtype))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_q, is_causal=is_causal)


class _TiledAttention(torch.autograd.Function):
    """Attention tile by tile with batched matmuls (the CPU flash kernel is slow at head
    dimension 32, its backward especially). Each query tile sees all its keys at once (the
    runs gathered), so its softmax is exact in one call. Everything inside runs in float32
    (with head dimension 32 the matmuls are small, and bf16 would round the scores); inputs
    and outputs keep their dtype. Nothing per pair is kept: the backward recomputes the
    probabilities, so the memory is linear in the length."""

    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan, masks):
        B, H, S_q, d = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)
        qs, kf, vf = _heads_major(q, acc).mul_(d**-0.5), _heads_major(k, acc), _heads_major(v, acc)
        out = q.new_empty(B, S_q, H, d).transpose(1, 2)  # stored (B, S, H, d), as the projections
        for tile, m in zip(plan.tiles, masks):
            q0, q1 = tile.q
            p = _probs(qs[:, :, q0:q1], _gather(kf, tile.runs), m)
            out[:, :, q0:q1] = torch.matmul(p, _gather(vf, tile.runs))
        ctx.save_for_backward(q, k, v)
        ctx.plan, ctx.masks = plan, masks
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        B, H, S_q, d = q.shape
        S_kv = k.shape[2]
        acc = torch.promote_types(q.dtype, torch.float32)
        scale = d**-0.5
        qs, kf = _heads_major(q, acc).mul_(scale), _heads_major(k, acc)
        vf = _heads_major(v, acc)
        g = _heads_major(grad_out, acc)
        dq = q.new_empty(B, H, S_q, d, dtype=acc)
        dk = q.new_zeros(B, H, S_kv, d, dtype=acc)
        dv = q.new_zeros(B, H, S_kv, d, dtype=acc)
        for tile, m in zip(ctx.plan.tiles, ctx.masks):
            q0, q1 = tile.q
            gi = g[:, :, q0:q1]
            p = _probs(qs[:, :, q0:q1], _gather(kf, tile.runs), m)  # (B, H, T, K)
            _scatter_add(dv, tile.runs, torch.matmul(p.transpose(-1, -2), gi))
            dp = torch.matmul(gi, _gather(vf, tile.runs).transpose(-1, -2))
            ds = torch._softmax_backward_data(dp, p, -1, acc)  # dL/d(scaled scores)
            dq[:, :, q0:q1] = torch.matmul(ds, _gather(kf, tile.runs))  # (bmm into a strided out= is slow)
            _scatter_add(dk, tile.runs, torch.matmul(ds.transpose(-1, -2), qs[:, :, q0:q1]))
        return dq.mul_(scale).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def _heads_major(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (B, H, S, d) as a contiguous tensor of ``dtype``, so that tiles of it are batched
    matrices without copies."""
    return torch.empty(x.shape, dtype=dtype, device=x.device).copy_(x)


def _gather(x: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
    """The keys (or values) of a tile's runs, (B, H, K, d)."""
    if len(runs) == 1:
        return x[:, :, runs[0][0] : runs[0][1]]
    return torch.cat([x[:, :, a:b] for a, b in runs], dim=2)


def _scatter_add(grad: torch.Tensor, runs: list[tuple[int, int]], part: torch.Tensor) -> None:
    start = 0
    for a, b in runs:
        grad[:, :, a:b] += part[:, :, start : start + b - a]
        start += b - a


def _probs(qs: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) of a query tile over its keys, (B, H, T, K)."""
    s = torch.matmul(qs, keys.transpose(-1, -2))
    if mask is not None:
        s.add_(mask)
    return torch.softmax(s, dim=-1)
