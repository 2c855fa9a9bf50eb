"""The reference's DiT backbone ("DDiT" of MDLM / BD3-LMs), re-implemented.

Rotary attention, adaLN modulation from a constant conditioning vector (time conditioning
is off: sigma = 0; SEDD passes ``sigma`` per sample, as the reference), LayerNorm without
bias computed in float32, a separate input embedding and output layer. Submodule names
equal the released checkpoints' keys (less the ``backbone.`` prefix), so they import
exactly. ``causal=True`` is the AR baseline: causal attention and no adaLN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bd3.config import ModelConfig
from bd3.model.attention import attend
from bd3.model.fused_nll import linear_masked_nll
from bd3.model.kv_cache import KVCache
from bd3.model.mask import Mask


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, computed in float32 outside autocast."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``LN(x) * weight``, then ``* (1 + scale) + shift`` (adaLN) when given. The
        modulation is one vector for every row (time conditioning is off), so it folds into
        the LayerNorm's own weight and bias: one fused float32 kernel instead of four passes."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            if scale is None:
                return F.layer_norm(x.float(), (self.dim,)) * self.weight
            if scale.numel() == self.dim:
                weight = self.weight * (1 + scale.reshape(self.dim)).float()
                return F.layer_norm(x.float(), (self.dim,), weight, shift.reshape(self.dim).float())
            return _modulate(F.layer_norm(x.float(), (self.dim,)) * self.weight, shift, scale)


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


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with the first half of the head dimension negated, for :func:`rotate`."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX rotary embedding ``x * cos + rotate_half(x) * sin`` in three kernels:
    ``rotate_half(x) * sin`` is ``swap_halves(x) * signed_sin(sin)``. The one formulation:
    the model, the sampling engine and its scripted layer loop all call it."""
    swapped = x.unflatten(-1, (2, x.shape[-1] // 2)).flip(-2).flatten(-2)
    return torch.addcmul(x * cos, swapped, sin_signed)


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


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout with 16 random bits per element: one 64-bit draw serves four
    elements, about five times faster on a CPU than ``F.dropout`` (whose Bernoulli draws are
    one at a time and single-threaded). ``p`` is rounded to a multiple of 2^-16 (0.1 ->
    0.100006) and the survivors are scaled by the exact 1 / (1 - p) of that rounding."""
    drop = round(p * 65536)
    if drop == 0:
        return x
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
    keep = (bits.view(torch.int16)[:n] >= drop - 32768).view(x.shape)
    return torch.where(keep, x, 0).mul_(65536 / (65536 - drop))


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
        attn_mask: Mask | torch.Tensor | None,
        causal: bool,
        kv_cache: KVCache | None,
        layer: int,
        first: int | None = None,
        attn: str = "sdpa",
    ) -> torch.Tensor:
        """``first``: only the first ``first`` positions are queries and outputs (the others
        still give keys and values), as the last layer needs for the x_t half. ``attn``: the
        attention backend (bd3.model.backends)."""
        B, S, D = x.shape
        H = self.n_heads
        shift1 = scale1 = gate1 = shift2 = scale2 = gate2 = None
        if mod is not None:
            shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        qkv = self.attn_qkv(self.norm1(x, shift1, scale1)).view(B, S, 3, H, D // H)
        # q and k rotated together; cos and sin (S, 1, 1, d), sin signed (see ``rotate``).
        # Each of q, k, v is (B, H, S, d), stored (B, S, H, d) as the projection made it.
        qk, v = qkv.split([2, 1], dim=2)  # split/unbind: their backward is one copy, not a zero fill per slice
        q, k = (t.transpose(1, 2) for t in rotate(qk, cos, sin).unbind(2))
        v = v.squeeze(2).transpose(1, 2)
        if first is not None:
            q, x, S = q[:, :, :first], x[:, :first], first
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
            q = q.to(k.dtype)
        # With a cache the new tokens see every cached token and each other (one token at a
        # time for the AR model, one block at a time for the block models).
        is_causal = causal and attn_mask is None and kv_cache is None
        a = attend(q, k, v, attn_mask, is_causal=is_causal, backend=attn)
        a = self.attn_out(a.transpose(1, 2).reshape(B, S, D))
        x = self._residual(x, gate1, a)
        return self._residual(x, gate2, self.mlp(self.norm2(x, shift2, scale2)))

    def _residual(self, x: torch.Tensor, gate: torch.Tensor | None, branch: torch.Tensor) -> torch.Tensor:
        """``x + gate * dropout(branch)`` (one kernel for the gate and the sum)."""
        if self.training and self.dropout > 0:
            branch = dropout(branch, self.dropout)
        return x + branch if gate is None else torch.addcmul(x, gate, branch)


class OutputLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.norm_final = LayerNorm(cfg.hidden_dim)
        self.linear = nn.Linear(cfg.hidden_dim, vocab_size)
        if not cfg.causal:
            self.adaLN_modulation = nn.Linear(cfg.cond_dim, 2 * cfg.hidden_dim)

    def forward(self, x: torch.Tensor, mod: torch.Tensor | None) -> torch.Tensor:
        shift, scale = mod.chunk(2, dim=-1) if mod is not None else (None, None)
        return self.linear(self.norm_final(x, shift, scale))


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
        self.attn = "sdpa"  # the attention backend: a runtime choice (bd3.model.backends), not saved
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

    @property
    def device(self) -> torch.device:
        return self.vocab_embed.embedding.device

    def conditioning(self, sigma: torch.Tensor | None = None) -> torch.Tensor | None:
        """silu(sigma_map(0)): the constant adaLN input, shape (1, cond_dim) (what the
        sampling engine folds into its weights); with ``sigma`` (B,) (SEDD's time
        conditioning) silu(sigma_map(sigma)), one row per sample. None for the AR model."""
        if self.cfg.causal:
            return None
        if sigma is not None:
            return F.silu(self.sigma_map(sigma))
        return F.silu(self.sigma_map(torch.zeros(1, device=self.device)))

    def _hidden_states(
        self,
        tokens: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        attn_mask: Mask | torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        first: int | None = None,
        sigma: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The blocks, the first half of :meth:`forward`: the last residual stream (B, S, D)
        and the conditioning vector that :meth:`_logits` and :meth:`_nll` need ((B, cond_dim)
        with ``sigma``). ``positions`` (S,) and ``attn_mask`` as :meth:`forward`'s (each
        attention backend builds its own form of a :class:`~bd3.model.mask.Mask`). ``first``:
        return only the first ``first`` positions (B, first, D); the last layer then computes
        only those (training needs the x_t half; the x_0 half matters only as keys and values).
        """
        S = tokens.shape[1]
        if positions is None:
            positions = torch.arange(S, device=tokens.device)
        x = F.embedding(tokens, self.vocab_embed.embedding)
        c = self.conditioning(sigma)
        cos, sin = self.rotary_emb.cos_sin(positions, self._compute_dtype(x))
        cos, sin = cos[:, None, None, :], signed_sin(sin)[:, None, None, :]
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            mod = block.adaLN_modulation(c)[:, None, :] if c is not None else None
            x = block(x, cos, sin, mod, attn_mask, self.cfg.causal, kv_cache, i, first if i == last else None, self.attn)
        if first is not None and not self.blocks:
            x = x[:, :first]
        return x, c

    @staticmethod
    def _compute_dtype(x: torch.Tensor) -> torch.dtype:
        """The dtype q and k have in the blocks: autocast's where it is on, else x's."""
        device = x.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype

    def _logits(self, h: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """The output layer on any (..., D) selection of hidden states."""
        mod = self.output_layer.adaLN_modulation(c) if c is not None else None
        if mod is not None and h.dim() == 3:
            mod = mod[:, None, :]
        return self.output_layer(h, mod)

    def _nll(self, h: torch.Tensor, c: torch.Tensor | None, targets: torch.Tensor, mask_id: int) -> torch.Tensor:
        """-log p(targets) (N,) float32 from hidden states ``h`` (N, D), the mask token
        excluded: ``masked_nll(self._logits(h, c), targets, mask_id)`` with the output layer
        and the cross-entropy fused (bd3.model.fused_nll), so the (N, V) float32 logits are
        never materialised and their backward needs no vocabulary-sized element-wise work."""
        out = self.output_layer
        shift, scale = out.adaLN_modulation(c).chunk(2, dim=-1) if c is not None else (None, None)
        x = out.norm_final(h, shift, scale)
        return linear_masked_nll(x, out.linear.weight, out.linear.bias, targets, mask_id)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        positions: torch.Tensor | int | None = None,
        attn_mask: Mask | torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        select: torch.Tensor | None = None,
        sigma: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        mask_id: int | None = None,
    ) -> torch.Tensor:
        """The one forward that training, evaluation and sampling call.

        Logits (B, S, V) of ``tokens`` (B, S); with ``select`` (B, n) bool, n <= S, only at
        its True entries: (N, V) in row-major order (for n < S the last layer computes the
        first n positions' queries only). With ``targets`` (the token ids at those
        positions: (N,), or (B, S) without ``select``) and ``mask_id``: -log p(targets),
        float32, of the targets' shape, the mask token excluded, the output layer and the
        cross-entropy fused (bd3.model.fused_nll: the logits are never materialised).

        ``positions``: the rotary positions (S,), or an int, the first of S consecutive ones
        (default 0; the 2L training input repeats 0..L-1). ``attn_mask``: a
        :class:`~bd3.model.mask.Mask` or an explicit (S, S_kv) boolean table (True: attend); None
        is full attention (causal for the AR model). ``kv_cache``: the tokens also attend to the
        cached ones, and their K/V are written after them (:class:`~bd3.model.kv_cache.KVCache`).
        ``sigma`` (B,): SEDD's time conditioning; the adaLN conditioning stays inside."""
        S = tokens.shape[1]
        if isinstance(positions, int):
            positions = torch.arange(positions, positions + S, device=tokens.device)
        first = None if select is None or select.shape[1] == S else select.shape[1]
        h, c = self._hidden_states(tokens, positions=positions, attn_mask=attn_mask, kv_cache=kv_cache, first=first, sigma=sigma)
        per_row = c is not None and c.shape[0] > 1  # one conditioning vector per row (sigma)
        if select is not None:
            h, c = h[select], c[select.nonzero()[:, 0]] if per_row else c
        if targets is None:
            return self._logits(h, c)
        if select is None:
            h, c = h.reshape(-1, h.shape[-1]), c.repeat_interleave(S, 0) if per_row else c
        return self._nll(h, c, targets.reshape(-1), mask_id).view(targets.shape)

    def new_kv_cache(self, batch: int, capacity: int, dtype: torch.dtype | None = None) -> KVCache:
        p = self.vocab_embed.embedding
        return KVCache(
            self.cfg.n_layers, batch, self.cfg.n_heads, self.cfg.head_dim, capacity,
            dtype=dtype or p.dtype, device=p.device,
        )
