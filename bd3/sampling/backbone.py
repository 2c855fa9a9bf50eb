"""The sampling engine's layer loop, written so that TorchScript can compile it.

A sampling call of a small model is a few hundred small operations, and from Python each
one costs some interpreter time before any arithmetic, a noticeable share of a call at the
reference's ``tiny`` size (benchmarks/README.md, "Sampling"). :class:`~bd3.sampling.engine.Engine`
therefore runs :func:`layers` compiled by ``torch.jit.script`` (same operations, same
results, bit for bit; pinned by a test), and runs it as plain Python where scripting is not
available (:func:`scripted` says which).

Why TorchScript, which is deprecated, and not ``torch.compile``: ``torch.compile`` generates
and compiles C++ on first use and again for every new KV-cache length (the sampler's shapes
change every block), which costs more than a whole sample at this size; TorchScript
compiles this function once, in well under a second, with no compiler. This module is the
only TorchScript in bd3; if ``torch.jit`` goes away, :func:`scripted` returns None and the
engine runs :func:`layers` as Python (slower, the same results).

No ``from __future__ import annotations`` here: TorchScript reads the annotations.
"""

import functools
import warnings
from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from bd3.model.dit import rotate


class Weights(NamedTuple):
    """The engine's linear layers, one kind for all (see :class:`~bd3.sampling.engine.Linear`):
    ``packed`` for ``"fp16"`` (bias included), else ``weight`` and ``bias``."""

    kind: str
    packed: List[torch.classes.quantized.LinearPackedParamsBase]
    weight: List[Tensor]
    bias: List[Optional[Tensor]]


def linear(x: Tensor, w: Weights, j: int, gelu: bool = False, residual: Optional[Tensor] = None) -> Tensor:
    """Product ``j`` of ``w``: ``x @ W.T + b``, optionally through the tanh GELU or added to
    a residual."""
    if w.kind == "fp16":
        y = torch.ops.quantized.linear_dynamic_fp16(x, w.packed[j])
    elif w.kind == "onednn":
        if residual is not None and residual.dtype == x.dtype:
            return torch.ops.mkldnn._linear_pointwise(x, residual, w.weight[j], w.bias[j], "add")  # the binary overload
        if gelu:
            return torch.ops.mkldnn._linear_pointwise(x, w.weight[j], w.bias[j], "gelu", [], "tanh")
        y = torch.ops.mkldnn._linear_pointwise(x, w.weight[j], w.bias[j], "none", [], "")
    else:
        b = w.bias[j]
        y = x @ w.weight[j] if b is None else torch.addmm(b, x, w.weight[j])
    if gelu:
        y = F.gelu(y, approximate="tanh")
    return y if residual is None else residual + y


def layers(
    x: Tensor,
    B: int,
    S: int,
    w: Weights,
    heads: int,
    dtype: torch.dtype,
    compute: torch.dtype,
    cos: Tensor,
    sin: Tensor,
    cache_k: Optional[Tensor],
    cache_v: Optional[Tensor],
    length: int,
    mask: Optional[Tensor],
    query: Optional[Tensor],
    is_causal: bool,
) -> Tensor:
    """The transformer layers on the embedded tokens ``x`` (B*S, D): the last residual
    stream (B, S, D), or (B, Q, D) at the positions ``query`` (B, Q).

    Per layer four products (qkv, out, fc1, fc2: entries 4i..4i+3 of ``w``) in ``compute``, LayerNorm (its affine folded into the
    next product), the residual stream, rotary and attention in ``dtype``. ``cos``/``sin``
    (1, S, 1, 1, hd): rotary tables with the sign of ``rotate_half`` folded into ``sin``
    (:func:`bd3.model.dit.rotate`). With ``cache_k``/``cache_v`` (layers, B, H, capacity,
    hd) the tokens' K/V are written after the ``length`` cached ones and attention runs over
    both; ``mask`` (S, kv) is additive. At the last layer only the ``query`` positions are
    computed (the others still give keys and values)."""
    D = x.shape[1]
    hd = D // heads
    n = len(w.bias) // 4
    end = length + S
    for i in range(n):
        h = F.layer_norm(x, [D]).to(compute)
        qkv = linear(h, w, 4 * i).to(dtype).view(B, S, 3, heads, hd)
        qk = qkv[:, :, :2]
        qk = rotate(qk, cos, sin)  # rotary on q and k together
        q, k, v = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        if cache_k is not None and cache_v is not None:
            cache_k[i, :, :, length:end] = k
            cache_v[i, :, :, length:end] = v
            k, v = cache_k[i, :, :, :end], cache_v[i, :, :, :end]
        m = mask
        if i == n - 1 and query is not None:
            Q = query.shape[1]
            q = q.gather(2, query[:, None, :, None].expand(B, heads, Q, hd))
            x = x.view(B, S, D).gather(1, query[:, :, None].expand(B, Q, D)).view(B * Q, D)
            if m is not None:
                m = m[query][:, None]  # (B, 1, Q, kv)
            S = Q
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=is_causal)
        x = linear(a.transpose(1, 2).reshape(B * S, D).to(compute), w, 4 * i + 1, residual=x)
        h = linear(F.layer_norm(x, [D]).to(compute), w, 4 * i + 2, gelu=True)
        x = linear(h, w, 4 * i + 3, residual=x)
    return x.view(B, S, D)


@functools.cache
def scripted():
    """:func:`layers` compiled by TorchScript (once per process), or None where that fails
    (a torch without FBGEMM's or oneDNN's operators, or without TorchScript).

    It runs without TorchScript's graph optimisations: they would fuse a product and the
    residual addition into one ``addmm`` (other rounding), and gain nothing measurable here;
    so the compiled function computes exactly what the Python one does."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.script's deprecation notice
            compiled = torch.jit.script(layers)
    except Exception:  # noqa: BLE001 - any failure means: run it as Python
        return None

    def run(*args):
        with torch.jit.optimized_execution(False):
            return compiled(*args)

    return run
