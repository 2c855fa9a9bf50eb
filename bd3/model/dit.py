"""The reference's DiT backbone ("DDiT" of MDLM / BD3-LMs), re-implemented.

Rotary attention, adaLN modulation from a constant conditioning vector (time conditioning
is off: sigma = 0), LayerNorm without bias computed in float32, a separate input embedding
and output layer. Submodule names equal the released checkpoints' keys (less the
``backbone.`` prefix), so they import exactly. ``causal=True`` is the AR baseline: causal
attention and no adaLN.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from bd3.config import ModelConfig
from bd3.model.kv_cache import KVCache


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, computed in float32 outside autocast."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.layer_norm(x.float(), (self.dim,)) * self.weight


class Rotary(nn.Module):
    """GPT-NeoX style rotary embeddings (``rotate_half``, non-interleaved)."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (S, head_dim) for integer positions; angles in float64."""
        freqs = positions.double()[:, None] * self.inv_freq.double()[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of sigma (cos first), then Linear -> SiLU -> Linear."""

    def __init__(self, cond_dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
        args = sigma[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.n_heads = cfg.n_heads
        self.norm1 = LayerNorm(d)
        self.attn_qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.norm2 = LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
        self.dropout = cfg.dropout
        if not cfg.causal:
            self.adaLN_modulation = nn.Linear(cfg.cond_dim, 6 * d)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mod: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
        causal: bool,
        kv_cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        B, S, D = x.shape
        H = self.n_heads
        if mod is not None:
            shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
            h = _modulate(self.norm1(x), shift1, scale1)
        else:
            h = self.norm1(x)
        q, k, v = self.attn_qkv(h).view(B, S, 3, H, D // H).permute(2, 0, 3, 1, 4)  # each (B, H, S, d)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
            q = q.to(k.dtype)
        # With a cache the new tokens see every cached token and each other (one token at a
        # time for the AR model, one block at a time for the block models).
        is_causal = causal and attn_mask is None and kv_cache is None
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        a = self.attn_out(a.transpose(1, 2).reshape(B, S, D))
        drop = self.dropout if self.training else 0.0
        if mod is not None:
            x = x + gate1 * F.dropout(a, drop, self.training)
            x = x + gate2 * F.dropout(self.mlp(_modulate(self.norm2(x), shift2, scale2)), drop, self.training)
        else:
            x = x + F.dropout(a, drop, self.training)
            x = x + F.dropout(self.mlp(self.norm2(x)), drop, self.training)
        return x


class OutputLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.norm_final = LayerNorm(cfg.hidden_dim)
        self.linear = nn.Linear(cfg.hidden_dim, vocab_size)
        if not cfg.causal:
            self.adaLN_modulation = nn.Linear(cfg.cond_dim, 2 * cfg.hidden_dim)

    def forward(self, x: torch.Tensor, mod: torch.Tensor | None) -> torch.Tensor:
        h = self.norm_final(x)
        if mod is not None:
            shift, scale = mod.chunk(2, dim=-1)
            h = _modulate(h, shift, scale)
        return self.linear(h)


class DiT(nn.Module):
    """``DiT(model_cfg, vocab_size)``: tokens -> hidden states -> logits."""

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.vocab_embed = nn.Module()
        self.vocab_embed.embedding = nn.Parameter(torch.empty(vocab_size, cfg.hidden_dim))
        if not cfg.causal:
            self.sigma_map = TimestepEmbedder(cfg.cond_dim)
        self.rotary_emb = Rotary(cfg.head_dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.output_layer = OutputLayer(cfg, vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's init: embedding U(+-1/sqrt(D)), zero adaLN gates and output layer."""
        nn.init.kaiming_uniform_(self.vocab_embed.embedding, a=math.sqrt(5))
        for m in self.modules():
            if isinstance(m, (Block, OutputLayer)) and hasattr(m, "adaLN_modulation"):
                nn.init.zeros_(m.adaLN_modulation.weight)
                nn.init.zeros_(m.adaLN_modulation.bias)
        nn.init.zeros_(self.output_layer.linear.weight)
        nn.init.zeros_(self.output_layer.linear.bias)

    def _conditioning(self, device: torch.device) -> torch.Tensor | None:
        """silu(sigma_map(0)): the constant adaLN input, shape (1, cond_dim)."""
        if self.cfg.causal:
            return None
        return F.silu(self.sigma_map(torch.zeros(1, device=device)))

    def hidden_states(
        self,
        tokens: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the blocks. Returns the last residual stream (B, S, D) and the conditioning
        vector that :meth:`logits` needs.

        ``positions`` (S,) are the rotary positions (default 0..S-1; the 2L training input
        repeats 0..L-1 for both halves). ``attn_mask`` (S, S_kv) is boolean, True = attend;
        None means full attention, or causal attention for the AR model.
        """
        B, S = tokens.shape
        if positions is None:
            positions = torch.arange(S, device=tokens.device)
        x = F.embedding(tokens, self.vocab_embed.embedding)
        c = self._conditioning(tokens.device)
        cos, sin = self.rotary_emb.cos_sin(positions, torch.float32)
        for i, block in enumerate(self.blocks):
            mod = block.adaLN_modulation(c)[:, None, :] if c is not None else None
            x = block(x, cos, sin, mod, attn_mask, self.cfg.causal, kv_cache, i)
        return x, c

    def logits(self, h: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """The output layer on any (..., D) selection of hidden states."""
        mod = self.output_layer.adaLN_modulation(c) if c is not None else None
        if mod is not None and h.dim() == 3:
            mod = mod[:, None, :]
        return self.output_layer(h, mod)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        last: int | None = None,
    ) -> torch.Tensor:
        """Logits (B, S, V), or for the last ``last`` positions only."""
        h, c = self.hidden_states(tokens, positions=positions, attn_mask=attn_mask, kv_cache=kv_cache)
        if last is not None:
            h = h[:, -last:]
        return self.logits(h, c)

    def new_kv_cache(self, batch: int, capacity: int, dtype: torch.dtype | None = None) -> KVCache:
        p = self.vocab_embed.embedding
        return KVCache(
            self.cfg.n_layers, batch, self.cfg.n_heads, self.cfg.head_dim, capacity,
            dtype=dtype or p.dtype, device=p.device,
        )
