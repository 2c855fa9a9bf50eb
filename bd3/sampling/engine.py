"""The CPU accelerator: an inference-only view of a :class:`bd3.model.DiT` for the samplers.

Sampling calls the backbone once per generated token on a few positions, so the time goes
to per-operation overhead, not arithmetic. :class:`Engine` has the model's forward
interface (``engine(tokens, positions=, attn_mask=, kv_cache=, select=)``, the same logits,
pinned by tests to 1e-5) with about half the operations:

- time conditioning is off, so every adaLN modulation is a constant: shift and scale are
  folded into the LayerNorm weight and bias, the residual gates into the output
  projections, once;
- the model's rotary cos/sin tables are computed once and grown as positions grow; q and k
  are rotated together;
- ``query`` (B, Q) asks for the hidden states of Q positions per row only: the last layer
  then computes attention and its MLP at those positions only (the others still give keys
  and values);
- on a CPU the linear layers run through oneDNN with weights packed once (:class:`Linear`),
  with the GELU and the residual additions fused into them: the sampler's products have
  1-128 rows, where ``addmm`` re-packs the weights on every call. One row through the output
  layer is two half-vocabulary products (:func:`_halves`), one per thread;
- ``precision="fp16"`` / ``"bf16"`` trade exactness for speed (see :class:`Engine`);
- the layer loop is :func:`bd3.sampling.backbone.layers`, compiled by TorchScript (no
  Python between operations; why TorchScript and not ``torch.compile``: see that module).

It runs on CPUs only, where it is tested equal to the model: :func:`inference_forward`
picks it (``auto``) on a CPU and the DiT itself elsewhere. The KV cache layout is the
model's (:class:`bd3.model.KVCache`: K after rotary, and V).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from bd3.choices import MODEL_PRECISIONS, SAMPLE_PRECISIONS
from bd3.errors import Bd3Error
from bd3.model.dit import signed_sin
from bd3.model.kv_cache import KVCache
from bd3.model.mask import Mask
from bd3.runtime import resolve_precision
from bd3.sampling import backbone
from bd3.sampling.threads import ThreadTuner


def _onednn(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build runs oneDNN's packed linear for this device and dtype."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 2, dtype=dtype), 16)
        return bool(torch.ops.mkldnn._linear_pointwise(torch.ones(1, 2, dtype=dtype), w, None, "none", [], "").eq(2).all())
    except (AttributeError, RuntimeError):
        return False


def fp16_weights_supported(device: torch.device | str) -> bool:
    """Whether ``precision="fp16"`` runs here: a CPU and a torch built with FBGEMM (x86)."""
    if torch.device(device).type != "cpu":
        return False
    try:
        w = torch.ops.quantized.linear_prepack_fp16(torch.ones(2, 2), None)
        return bool(torch.ops.quantized.linear_dynamic_fp16(torch.ones(1, 2), w).eq(2).all())
    except (AttributeError, RuntimeError):
        return False


def sampling_precision(precision: str, device: torch.device) -> str:
    """``bd3 sample --precision``: fp32, fp16, bf16, or ``auto``, the fastest of them here:
    fp16 weights on a CPU with FBGEMM, else bf16 where the hardware computes it natively,
    else fp32."""
    if precision == "auto" and fp16_weights_supported(device):
        return "fp16"
    if precision != "fp16":
        return resolve_precision(precision, device)
    if not fp16_weights_supported(device):
        raise Bd3Error(f"--precision fp16 needs a CPU and a torch built with FBGEMM (x86); {device} has none. Use fp32 or bf16.")
    return precision


def inference_forward(model, engine: bool | None = None, precision: str = "fp32", *, threads: int | None = None,
                      time_conditioned: bool = False):
    """What the samplers run ``model`` (a DiT) through: its :class:`Engine` (``engine=True``;
    a CPU only; ``threads`` as :class:`Engine`'s) or the DiT itself (``engine=False``, at
    fp32 or under bf16 autocast); None picks the engine on a CPU, the DiT elsewhere. A
    time-conditioned model (SEDD) runs as itself (the engine folds the constant
    conditioning)."""
    cpu = model.device.type == "cpu"
    if engine is None:
        engine = cpu and not time_conditioned
    if engine and time_conditioned:
        raise ValueError("a time-conditioned (SEDD) model samples through the DiT itself, not the engine")
    if engine and not cpu:
        raise ValueError(f"the sampling engine runs on CPUs only (it is tested there); {model.device} samples through the DiT")
    if engine:
        return Engine(model, precision, threads=threads)
    if precision not in MODEL_PRECISIONS:
        raise ValueError(f"precision {precision!r} needs the CPU engine; the model itself runs in {' or '.join(MODEL_PRECISIONS)}")
    return model


class Linear:
    """``x @ weight.T + bias`` for a fixed weight (out, in), optionally followed by the
    tanh GELU or added to a residual, in one call; in the weight's dtype (a float32
    ``residual`` is added in float32). ``kind``:

    - ``"onednn"``: the weight packed once for oneDNN (the layout its kernels read, chosen for
      about 16 rows), GELU and residual fused;
    - ``"fp16"``: the weight packed once as float16 for FBGEMM, which converts it on the fly
      and computes and returns float32 (half the weight bytes to read);
    - ``"addmm"``: the weight stored (in, out), ``torch.addmm``.

    ``onednn`` and ``addmm`` agree to the dtype's rounding. The product itself is
    :func:`bd3.sampling.backbone.linear`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kind: str) -> None:
        self.kind = kind
        self.packed = self.weight = None
        self.bias = None if kind == "fp16" else bias  # FBGEMM packs it with the weight
        if kind == "onednn":
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 16)
        elif kind == "fp16":
            self.packed = torch.ops.quantized.linear_prepack_fp16(weight.contiguous(), bias)
        else:
            self.weight = weight.t().contiguous()
        self._weights = weights(kind, [self])  # built once: the output layer runs every call

    def __call__(self, x: torch.Tensor, *, gelu: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
        return backbone.linear(x, self._weights, 0, gelu, residual)


def weights(kind: str, linears: list[Linear]) -> backbone.Weights:
    """``linears`` as :func:`bd3.sampling.backbone.linear` takes them."""
    fp16 = kind == "fp16"
    return backbone.Weights(kind, [lin.packed for lin in linears] if fp16 else [], [] if fp16 else [lin.weight for lin in linears],
                            [lin.bias for lin in linears])


def _halves(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The output layer for one row as two half-vocabulary products (``baddbmm``: one per
    thread): (2, D, V/2) and (2, 1, V/2), the vocabulary padded to even. For a single row
    this streams the float32 weights faster than oneDNN's one product (benchmarks/README.md)."""
    V, D = weight.shape
    half = (V + 1) // 2
    w = weight.new_zeros(2 * half, D)
    w[:V] = weight
    b = bias.new_zeros(2 * half)
    b[:V] = bias
    return w.view(2, half, D).transpose(1, 2).contiguous(), b.view(2, 1, half)


def _fold_norm(weight: torch.Tensor, bias: torch.Tensor | None, linear_w: torch.Tensor, linear_b: torch.Tensor | None):
    """``linear(norm(x) * weight + bias)`` == ``norm(x) @ W'^T + b'``: (W' (out, in), b')."""
    w = linear_w.double()
    b = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if linear_b is None else linear_b.double()
    if bias is not None:
        b = b + w @ bias.double()
    w = w * weight.double()[None, :]
    return w.to(linear_w.dtype), b.to(linear_w.dtype)


class Engine:
    """``Engine(model)``: the model's weights, folded for inference (a snapshot: build a new
    engine after changing the weights).

    ``precision``: ``"fp32"``, everything in the model's dtype; ``"bf16"``, the linear layers
    (weights and products, the output layer's included) in bfloat16, as under bf16 autocast;
    ``"fp16"`` (CPU with FBGEMM: :func:`fp16_weights_supported`), the linear layers' weights
    stored as float16, products and outputs float32 (logits within ~2.5e-4 of fp32, relative to
    their scale). The residual stream, LayerNorm, attention and the KV cache stay in the
    model's dtype (float32 attention is also the faster one on a CPU).

    ``threads``: CPU threads for every call, or None to let :attr:`tuner` (a
    :class:`~bd3.sampling.threads.ThreadTuner`) choose them by timing the calls."""

    def __init__(self, model, precision: str = "fp32", *, threads: int | None = None) -> None:
        if precision not in SAMPLE_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(SAMPLE_PRECISIONS)}, not {precision!r}")
        if model.device.type != "cpu":
            raise ValueError(f"the sampling engine runs on CPUs only, not {model.device}")
        if precision == "fp16" and not fp16_weights_supported(model.device):
            raise ValueError("precision fp16 needs a CPU and a torch built with FBGEMM (x86)")
        cfg = model.cfg
        self.model = model
        self.causal = cfg.causal
        self.D, self.H = cfg.hidden_dim, cfg.n_heads
        self.hd = cfg.hidden_dim // cfg.n_heads
        self.n_layers = cfg.n_layers
        self.length = cfg.length
        self.vocab_size = model.vocab_size
        emb = model.vocab_embed.embedding
        self.device, self.dtype = emb.device, emb.dtype  # the residual stream's
        self.compute = torch.bfloat16 if precision == "bf16" else self.dtype  # everything else's
        if precision == "fp16":
            self.kind = "fp16"
        else:
            self.kind = "onednn" if _onednn(self.device, self.compute) else "addmm"
        with torch.no_grad():
            self.embedding = emb.detach()
            if self.causal:
                c = None
            else:  # the constant conditioning vector
                c = model.conditioning()
            linears = [lin for block in model.blocks for lin in self._fold(block, c)]
            out = model.output_layer
            w, shift = out.norm_final.weight.detach(), None
            if c is not None:
                shift, scale = out.adaLN_modulation(c)[0].chunk(2, dim=-1)
                w = w * (1 + scale)
            head_w, head_b = _fold_norm(w, shift, out.linear.weight, out.linear.bias)
            self.head = self._linear(head_w, head_b)
            self._halves = _halves(head_w, head_b) if self.kind == "onednn" and self.compute == torch.float32 else None
            self.rotary = model.rotary_emb
        self._weights = weights(self.kind, linears)
        self._layers = backbone.scripted() or backbone.layers
        self.tuner = ThreadTuner(threads, self.device)
        self._cos = self._sin = None
        self._grow(max(self.length, 64))

    def _fold(self, block, c) -> tuple[Linear, Linear, Linear, Linear]:
        """A layer's qkv, out, fc1 and fc2 products: adaLN shift/scale and the LayerNorm
        weights go into the next linear layer, the gates into the residual branches' output
        layers."""
        w1, w2 = block.norm1.weight.detach(), block.norm2.weight.detach()
        out_w, fc2_w, fc2_b = block.attn_out.weight.detach(), block.mlp[2].weight.detach(), block.mlp[2].bias.detach()
        shift1 = shift2 = None
        if c is not None:
            shift1, scale1, gate1, shift2, scale2, gate2 = block.adaLN_modulation(c)[0].chunk(6, dim=-1)
            w1, w2 = w1 * (1 + scale1), w2 * (1 + scale2)
            out_w = out_w * gate1[:, None]
            fc2_w, fc2_b = fc2_w * gate2[:, None], fc2_b * gate2
        qkv = self._linear(*_fold_norm(w1, shift1, block.attn_qkv.weight, None))
        fc1 = self._linear(*_fold_norm(w2, shift2, block.mlp[0].weight, block.mlp[0].bias))
        return qkv, self._linear(out_w, None), fc1, self._linear(fc2_w, fc2_b)

    def _linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
        bias = None if bias is None else bias.to(self.compute, copy=True)
        return Linear(weight.to(self.compute), bias, self.kind)

    # -- rotary ---------------------------------------------------------------------

    def _grow(self, n: int) -> None:
        """The model's rotary tables for positions 0..n-1, ``sin`` signed for ``rotate``."""
        cos, sin = self.rotary.cos_sin(torch.arange(n, device=self.device), self.dtype)
        self._cos, self._sin = cos, signed_sin(sin)

    def _rotary(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start + n > self._cos.shape[0]:
            self._grow(max(2 * self._cos.shape[0], start + n))
        return self._cos[start : start + n], self._sin[start : start + n]

    # -- the backbone ---------------------------------------------------------------

    def new_kv_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        return KVCache(self.n_layers, batch, self.H, self.hd, capacity or self.length, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        *,
        positions: int = 0,
        attn_mask: Mask | torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        select: torch.Tensor | None = None,
        sigma: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``DiT.forward``'s logits: (B, S, V), or (N, V) at the True entries of ``select``
        (B, S) in row-major order, whose last layer then computes only those queries.
        ``positions``: the first of S consecutive rotary positions (an int, where the DiT
        also takes a tensor). Without a mask or cache the AR model attends causally, as the DiT."""
        if sigma is not None:
            raise ValueError("the engine folds the constant conditioning: a time-conditioned model runs as itself")
        with self.tuner.call():
            if select is None:
                return self._logits(self._hidden(tokens, positions, cache=kv_cache, mask=attn_mask, causal=self.causal))
            rows, pos = select.nonzero(as_tuple=True)
            query, slot = pack_queries(rows, pos, tokens.shape[0])
            h = self._hidden(tokens, positions, cache=kv_cache, mask=attn_mask, query=query, causal=self.causal)
            return self._logits(h[rows, slot])

    __call__ = forward

    @torch.inference_mode()
    def _hidden(
        self,
        tokens: torch.Tensor,
        start: int = 0,
        *,
        cache: KVCache | None = None,
        mask: Mask | torch.Tensor | None = None,
        query: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """The last residual stream of ``tokens`` (B, S) at rotary positions start..start+S-1:
        (B, S, D), or (B, Q, D) at the positions ``query`` (B, Q) of each row.

        With ``cache`` the tokens attend to the cached tokens and (per ``mask``, a
        :class:`Mask` or a (S, kv) boolean or additive float table, default all) to each
        other; their K/V are written after the cached ones. ``causal`` (without a cache or mask): causal attention.
        """
        B, S = tokens.shape
        x = F.embedding(tokens, self.embedding).view(B * S, self.D)
        cos, sin = self._rotary(start, S)
        if causal and cache is None and mask is None and query is not None:
            mask = torch.ones(S, S, dtype=torch.bool, device=tokens.device).tril_()  # queries subset: explicit
        k = v = None
        length = 0
        if cache is not None:
            if cache.length + S > cache.capacity:
                raise ValueError(f"KV cache overflow: {cache.length + S} > {cache.capacity}; call make_room first")
            k, v, length = cache.k, cache.v, cache.length
        if isinstance(mask, Mask):
            mask = _additive(mask, S, length + S, self.dtype, str(self.device))
        elif mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill_(~mask, -torch.inf)
        return self._layers(
            x, B, S, self._weights, self.H, self.dtype, self.compute,
            cos[None, :, None, None, :], sin[None, :, None, None, :], k, v, length,
            mask, query, causal and cache is None and mask is None,
        )

    @torch.inference_mode()
    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """The output layer on any (..., D) selection of hidden states."""
        shape = h.shape[:-1]
        x = self._norm(h.reshape(-1, self.D))
        if x.shape[0] == 1 and self._halves is not None:
            w, b = self._halves
            return torch.baddbmm(b, x.expand(2, 1, self.D), w).view(-1)[: self.vocab_size].view(*shape, self.vocab_size)
        return self.head(x).view(*shape, self.vocab_size).to(self.dtype)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm (no affine: folded into the next layer) in float32, cast for the product."""
        return F.layer_norm(x, (self.D,)).to(self.compute)


@lru_cache(maxsize=64)
def _additive(mask: Mask, rows: int, cols: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """``mask``'s table as an additive (0 / -inf) one, made once per shape."""
    return torch.zeros(rows, cols, dtype=dtype, device=device).masked_fill_(~mask.dense(rows, cols, device), -torch.inf)


def pack_queries(rows: torch.Tensor, pos: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) pairs, rows ascending -> a (batch, Q) query matrix (padded with
    position 0) and each pair's slot in it."""
    if rows.numel() == batch and rows.equal(torch.arange(batch, device=rows.device)):  # one per row
        return pos[:, None], torch.zeros_like(rows)
    counts = torch.bincount(rows, minlength=batch)
    Q = int(counts.max()) if rows.numel() else 1
    slot = torch.arange(rows.numel(), device=rows.device) - (counts.cumsum(0) - counts)[rows]
    query = torch.zeros(batch, Q, dtype=torch.long, device=rows.device)
    query[rows, slot] = pos
    return query, slot
