"""An inference-only view of a :class:`bd3.model.DiT` for the samplers.

Sampling calls the backbone once per generated token on a few positions, so the time goes
to per-operation overhead, not arithmetic. This engine computes the same function as
``DiT.hidden_states`` / ``DiT.logits`` (pinned by tests to 1e-5) with about half the
operations:

- time conditioning is off, so every adaLN modulation is a constant: shift and scale are
  folded into the LayerNorm weight and bias, the residual gates into the output
  projections, once;
- rotary cos/sin tables are computed once (angles in float64, as the model) and grown as
  positions grow;
- q and k are rotated together (``x * cos + roll(x) * sign * sin``);
- ``query`` (B, Q) asks for the hidden states of Q positions per row only: the last layer
  then computes attention and its MLP at those positions only (the others still give keys
  and values).

The KV cache layout is the model's (:class:`bd3.model.KVCache`: K after rotary, and V).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bd3.model.backends import attend_with
from bd3.model.kv_cache import KVCache


class _Layer:
    __slots__ = ("fc1_b", "fc1_wt", "fc2_b", "fc2_wt", "out_wt", "qkv_b", "qkv_wt")


def _fold_norm(weight: torch.Tensor, bias: torch.Tensor | None, linear_w: torch.Tensor, linear_b: torch.Tensor | None):
    """``linear(norm(x) * weight + bias)`` == ``norm(x) @ W' + b'``: W' (in, out) contiguous."""
    wt = linear_w.t().double()
    b = torch.zeros(wt.shape[1], dtype=torch.float64, device=wt.device) if linear_b is None else linear_b.double()
    if bias is not None:
        b = b + bias.double() @ wt
    wt = weight.double()[:, None] * wt
    return wt.to(linear_w.dtype).contiguous(), b.to(linear_w.dtype)


class Engine:
    """``Engine(model)``: the model's weights, folded for inference (a snapshot: build a new
    engine after changing the weights)."""

    def __init__(self, model) -> None:
        cfg = model.cfg
        self.model = model
        self.causal = cfg.causal
        self.D, self.H = cfg.hidden_dim, cfg.n_heads
        self.hd = cfg.hidden_dim // cfg.n_heads
        self.n_layers = cfg.n_layers
        self.length = cfg.length
        self.vocab_size = model.vocab_size
        emb = model.vocab_embed.embedding
        self.device, self.dtype = emb.device, emb.dtype
        # xformers runs the sampler's attention too; flex does not: the shapes change every
        # call (the cache grows), which would recompile its kernel, and a block or two of
        # queries leaves no tiles to skip. SDPA it is, for flex and sdpa.
        self.xformers = getattr(model, "attn", "sdpa") == "xformers"
        with torch.no_grad():
            self.embedding = emb.detach()
            if self.causal:
                c = None
            else:  # the constant conditioning vector, through the model's own public API
                c = model.hidden_states(torch.zeros(1, 1, dtype=torch.long, device=self.device))[1]
            self.layers = [self._fold(block, c) for block in model.blocks]
            out = model.output_layer
            w, shift = out.norm_final.weight.detach(), None
            if c is not None:
                shift, scale = out.adaLN_modulation(c)[0].chunk(2, dim=-1)
                w = w * (1 + scale)
            self.head_wt, self.head_b = _fold_norm(w, shift, out.linear.weight, out.linear.bias)
            self._head_w = None  # (V, D), built when first needed
            self.inv_freq = model.rotary_emb.inv_freq.detach().double()
        self._cos = self._sin = None
        self._grow(max(self.length, 64))

    def _fold(self, block, c) -> _Layer:
        """adaLN shift/scale and the LayerNorm weights go into the next linear layer, the
        gates into the residual branches' output layers."""
        L = _Layer()
        w1, w2 = block.norm1.weight.detach(), block.norm2.weight.detach()
        out_w, fc2_w, fc2_b = block.attn_out.weight.detach(), block.mlp[2].weight.detach(), block.mlp[2].bias.detach()
        shift1 = shift2 = None
        if c is not None:
            shift1, scale1, gate1, shift2, scale2, gate2 = block.adaLN_modulation(c)[0].chunk(6, dim=-1)
            w1, w2 = w1 * (1 + scale1), w2 * (1 + scale2)
            out_w = out_w * gate1[:, None]
            fc2_w, fc2_b = fc2_w * gate2[:, None], fc2_b * gate2
        L.qkv_wt, L.qkv_b = _fold_norm(w1, shift1, block.attn_qkv.weight, None)
        L.fc1_wt, L.fc1_b = _fold_norm(w2, shift2, block.mlp[0].weight, block.mlp[0].bias)
        L.out_wt = out_w.t().contiguous()
        L.fc2_wt, L.fc2_b = fc2_w.t().contiguous(), fc2_b.clone()
        return L

    # -- rotary ---------------------------------------------------------------------

    def _grow(self, n: int) -> None:
        pos = torch.arange(n, dtype=torch.float64, device=self.device)
        freqs = pos[:, None] * self.inv_freq.to(self.device)[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        half = self.hd // 2
        sign = torch.ones(self.hd, dtype=torch.float64, device=self.device)
        sign[:half] = -1.0
        self._cos = emb.cos().to(self.dtype)
        self._sin = (emb.sin() * sign).to(self.dtype)  # rotate_half(x) * sin == roll(x) * (sign * sin)

    def _rotary(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start + n > self._cos.shape[0]:
            self._grow(max(2 * self._cos.shape[0], start + n))
        return self._cos[start : start + n], self._sin[start : start + n]

    # -- the backbone ---------------------------------------------------------------

    def new_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        return KVCache(self.n_layers, batch, self.H, self.hd, capacity or self.length, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def hidden(
        self,
        tokens: torch.Tensor,
        start: int = 0,
        *,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
        query: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """The last residual stream of ``tokens`` (B, S) at rotary positions start..start+S-1:
        (B, S, D), or (B, Q, D) at the positions ``query`` (B, Q) of each row.

        With ``cache`` the tokens attend to the cached tokens and (per ``mask``, (S, kv)
        boolean or additive float, default all) to each other; their K/V are written after
        the cached ones. ``causal`` (without a cache or mask): causal attention.
        """
        B, S = tokens.shape
        D, H, hd = self.D, self.H, self.hd
        x = F.embedding(tokens, self.embedding)
        cos, sin = self._rotary(start, S)
        cos, sin = cos[None, :, None, None, :], sin[None, :, None, None, :]
        if causal and cache is None and mask is None and query is not None:
            mask = torch.ones(S, S, dtype=torch.bool, device=tokens.device).tril_()  # queries subset: explicit
        xformers = self.xformers and (mask is None or mask.dtype == torch.bool)
        if mask is not None and mask.dtype == torch.bool and not xformers:
            mask = torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill_(~mask, -torch.inf)
        is_causal = causal and cache is None and mask is None
        last = self.n_layers - 1
        x = x.view(B * S, D)
        for i, L in enumerate(self.layers):
            qkv = torch.addmm(L.qkv_b, F.layer_norm(x, (D,)), L.qkv_wt).view(B, S, 3, H, hd)
            qk = qkv[:, :, :2]
            qk = torch.addcmul(qk * cos, qk.roll(hd // 2, dims=-1), sin)  # (B, S, 2, H, hd)
            q, k, v = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
            if cache is not None:
                k, v = cache.update(i, k, v)
            m = mask
            if xformers:  # every query (a bias covers whole rows); the asked ones are kept below
                a = attend_with("xformers", q, k, v, m, is_causal)
            if i == last and query is not None:
                Q = query.shape[1]
                rows = query[:, None, :, None].expand(B, H, Q, hd)
                if xformers:
                    a = a.gather(2, rows)
                else:
                    q = q.gather(2, rows)
                x = x.view(B, S, D).gather(1, query[:, :, None].expand(B, Q, D)).view(B * Q, D)
                if m is not None and not xformers:
                    m = m[query][:, None]  # (B, 1, Q, kv)
                S = Q
            if not xformers:
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=is_causal)
            x = torch.addmm(x, a.transpose(1, 2).reshape(B * S, D), L.out_wt)
            h = F.gelu(torch.addmm(L.fc1_b, F.layer_norm(x, (D,)), L.fc1_wt), approximate="tanh")
            x = torch.addmm(x, h, L.fc2_wt).add_(L.fc2_b)
        x = x.view(B, S, D)
        return x

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The output layer on any (..., D) selection of hidden states."""
        shape = h.shape[:-1]
        h = F.layer_norm(h.reshape(-1, self.D), (self.D,))
        if 2 <= h.shape[0] <= 12:  # a few rows: W @ h^T is 1.3-2x faster than h @ W^T here
            if self._head_w is None:
                self._head_w = self.head_wt.t().contiguous()
            return torch.addmm(self.head_b[:, None], self._head_w, h.t()).t().reshape(*shape, -1)
        return torch.addmm(self.head_b, h, self.head_wt).view(*shape, -1)
