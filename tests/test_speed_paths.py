"""The training fast paths equal the plain computations they replace."""

import pytest
import torch
import torch.nn.functional as F

from bd3.config import DiffusionConfig, ModelConfig
from bd3.diffusion.loss import masked_nll
from bd3.diffusion.masks import block_causal_mask, block_diff_mask
from bd3.diffusion.objective import diffusion_loss
from bd3.model import DiT
from bd3.model.attention import _plan, attend
from bd3.model.dit import dropout, rotate, signed_sin
from bd3.model.fused_nll import linear_masked_nll
from bd3.model.mask import Mask
from tests.conftest import randomize


def _qkv(B, S, H, d, dtype=torch.float64, seed=0):
    """q, k, v (B, H, S, d) stored (B, S, 3, H, d), as the model makes them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, 3, H, d, generator=g, dtype=dtype).requires_grad_()
    return x, x.permute(2, 0, 3, 1, 4)


@pytest.mark.parametrize("length,block_size", [(64, 4), (64, 16), (96, 8), (128, 64), (256, 4)])
@pytest.mark.parametrize("first", [False, True])
def test_tiled_attention_equals_dense_sdpa(length, block_size, first):
    mask = block_diff_mask(length, block_size)
    rows = length if first else 2 * length
    assert _plan(mask, rows).tiles is not None  # the tiled path is the one under test
    x, (q, k, v) = _qkv(2, 2 * length, 2, 8)
    out = attend(q[:, :, :rows], k, v, mask)
    ref = F.scaled_dot_product_attention(q[:, :, :rows], k, v, attn_mask=mask[:rows])
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    g = torch.randn_like(ref)
    (grad,) = torch.autograd.grad(out, x, g)
    (grad_ref,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(grad, grad_ref, atol=1e-12, rtol=0)


def test_tiled_attention_other_masks_and_bf16():
    mask = block_causal_mask(200, 8)  # the sampler's recompute mask
    _, (q, k, v) = _qkv(1, 200, 2, 8)
    torch.testing.assert_close(attend(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    mask = block_diff_mask(128, 4)
    _, (q, k, v) = _qkv(2, 256, 2, 16, dtype=torch.bfloat16)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    assert (attend(q, k, v, mask).double() - ref).abs().max() < 2e-2


def test_fused_output_layer_and_nll_equal_linear_then_masked_nll():
    g = torch.Generator().manual_seed(0)
    N, D, V, mask_id = 150, 16, 97, 96
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64)
    w[:3] *= 40  # rows whose target is far in the tail (p < 1e-30) take the exact fallback
    targets = torch.randint(0, V - 1, (N,), generator=g)
    weights = torch.rand(N, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = masked_nll(F.linear(*leaves), targets, mask_id)
    grads_ref = torch.autograd.grad((ref * weights).sum(), leaves)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    out = linear_masked_nll(*leaves, targets, mask_id, rows=32)
    grads = torch.autograd.grad((out * weights).sum(), leaves)
    assert out.dtype == torch.float32 and ref.max() > 69  # the tail is exercised
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7)  # float32 softmax
    with torch.no_grad():
        torch.testing.assert_close(linear_masked_nll(x, w, b, targets, mask_id), out.detach())


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The reference's rotary embedding, ``x * cos + rotate_half(x) * sin``."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def test_model_nll_first_and_fused_layernorm_equal_the_plain_model(tiny_model):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 39, (3, 16), generator=g)
    mask = block_diff_mask(8, 4)
    positions = torch.arange(8).repeat(2)
    with torch.no_grad():
        full = tiny_model(tokens, positions=positions, attn_mask=mask)  # every position, the plain output layer
    kw = dict(positions=positions, attn_mask=Mask.block_diff(8, 4))
    every = torch.ones(3, 16, dtype=torch.bool)
    torch.testing.assert_close(tiny_model(tokens, select=every, **kw), full.reshape(48, -1), atol=1e-5, rtol=0)
    nll = tiny_model(tokens, targets=tokens, mask_id=39, **kw)  # the fused NLL at every position
    torch.testing.assert_close(nll, masked_nll(full.reshape(48, -1), tokens.reshape(-1), 39).view(3, 16), atol=1e-5, rtol=0)
    # a (3, 8) selection: the last layer computes the first 8 positions' queries only
    for select in (torch.ones(3, 8, dtype=torch.bool), torch.rand(3, 8, generator=g) < 0.5):
        want = full[:, :8][select]
        torch.testing.assert_close(tiny_model(tokens, select=select, **kw), want, atol=1e-5, rtol=0)
        targets = tokens[:, :8][select]
        nll = tiny_model(tokens, select=select, targets=targets, mask_id=39, **kw)
        torch.testing.assert_close(nll, masked_nll(want, targets, 39), atol=1e-5, rtol=0)
    norm = tiny_model.blocks[0].norm1
    x = torch.randn(2, 5, norm.dim)
    shift, scale = torch.randn(2, 1, 1, norm.dim)
    plain = F.layer_norm(x, (norm.dim,)) * norm.weight * (1 + scale) + shift  # adaLN, term by term
    torch.testing.assert_close(norm(x, shift, scale), plain, atol=1e-5, rtol=0)
    q = torch.randn(2, 7, 2, 3, tiny_model.cfg.head_dim)
    cos, sin = tiny_model.rotary_emb.cos_sin(torch.arange(7), torch.float32)
    plain = apply_rotary(q, cos[:, None, None], sin[:, None, None])
    torch.testing.assert_close(rotate(q, cos[:, None, None], signed_sin(sin)[:, None, None]), plain, atol=1e-6, rtol=0)


def test_dropout_keeps_the_right_share_scaled_and_its_gradient_matches():
    x = torch.ones(400_000, requires_grad=True)
    y = dropout(x, 0.1)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 3e-3
    assert torch.allclose(y[kept], torch.tensor(65536 / (65536 - 6554)))
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)
    assert dropout(x, 0.0) is x


def test_training_step_in_bf16_tracks_fp32():
    cfg = ModelConfig(hidden_dim=64, n_heads=2, n_layers=2, cond_dim=16, length=64, dropout=0.0)
    model = randomize(DiT(cfg, 50), seed=3).train()
    x0 = torch.randint(0, 49, (4, 64), generator=torch.Generator().manual_seed(0))
    dcfg = DiffusionConfig(block_size=4)
    losses = {}
    for precision in ("fp32", "bf16"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            losses[precision] = diffusion_loss(model, x0, dcfg, 49, generator=torch.Generator().manual_seed(0)).mean
    assert losses["bf16"].dtype == torch.float32
    assert abs(losses["bf16"].item() - losses["fp32"].item()) < 0.02 * losses["fp32"].item()
