"""Exact equalities of the training objective."""

import torch

from bd3.config import DiffusionConfig
from bd3.diffusion.masks import block_causal_mask
from bd3.diffusion.objective import diffusion_loss, draw_noise, nelbo
from bd3.diffusion.schedules import get_schedule
from tests.subs import subs_log_probs

MASK = 39  # tiny_model has vocabulary 40


def per_block_loop(model, x0, xt, t_tok, block_size, mask_id):
    """One forward per block over the clean prefix plus the noisy block, SUBS, weight 1/t
    (the linear schedule: t is the mask rate)."""
    B, L = x0.shape
    out = torch.zeros(B, L)
    for b in range(L // block_size):
        s, e = b * block_size, (b + 1) * block_size
        seq = torch.cat([x0[:, :s], xt[:, s:e]], dim=1)
        logits = model(seq, attn_mask=block_causal_mask(e, block_size))[:, -block_size:]
        logp = subs_log_probs(logits, xt[:, s:e], mask_id).gather(-1, x0[:, s:e, None])[..., 0]
        out[:, s:e] = -logp / t_tok[:, s:e]
    out[xt == x0] = 0.0  # carry-over positions contribute nothing (log p = 0)
    return out


def test_vectorised_2l_loss_equals_per_block_loop(tiny_model):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, MASK, (3, 16), generator=g)
    for block_size in (1, 4, 8):
        cfg = DiffusionConfig(block_size=block_size)
        noise = draw_noise(x0, cfg, MASK, clip=(1e-3, 1.0), resample=False, generator=g)
        xt = noise.xt
        with torch.no_grad():
            vec = nelbo(tiny_model, x0, noise, cfg, MASK)
            loop = per_block_loop(tiny_model, x0, xt, noise.rate.float(), block_size, MASK)
        assert (xt == MASK).any()
        torch.testing.assert_close(vec.token_loss, loop, atol=1e-5, rtol=0)
        assert vec.count == 3 * 15


def test_block_size_one_fully_masked_is_the_ar_nll(tiny_model):
    """L' = 1 with every token masked: NELBO = -sum log p(x_i | x_<i), the AR likelihood."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, MASK, (2, 16), generator=g)
    cfg = DiffusionConfig(block_size=1)
    with torch.no_grad():
        losses = diffusion_loss(tiny_model, x0, cfg, MASK, clip=(1.0, 1.0), generator=g)
        ar = 0.0
        for i in range(1, 16):  # token i from its clean prefix and a mask in its own place
            seq = torch.cat([x0[:, :i], torch.full((2, 1), MASK)], dim=1)
            logits = tiny_model(seq, attn_mask=block_causal_mask(i + 1, 1))[:, -1]
            logits[:, MASK] = -torch.inf
            ar += torch.nn.functional.cross_entropy(logits, x0[:, i], reduction="sum")
    torch.testing.assert_close(losses.mean, ar / (2 * 15), atol=1e-5, rtol=0)


def test_mdlm_equals_bd3lm_at_block_size_length(tiny_model):
    """With L' = L the x_0 stream is invisible to x_t: MDLM's one-stream pass is the same."""
    g = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, MASK, (2, 16), generator=g)
    bd3 = DiffusionConfig(block_size=16)
    noise = draw_noise(x0, bd3, MASK, clip=(1e-3, 1.0), resample=False, generator=g)
    with torch.no_grad():
        a = nelbo(tiny_model, x0, noise, bd3, MASK)
        b = nelbo(tiny_model, x0, noise, DiffusionConfig(algo="mdlm", block_size=16), MASK)
    torch.testing.assert_close(a.token_loss, b.token_loss, atol=1e-5, rtol=0)


def test_linear_schedule_weight_is_minus_dp_over_p():
    s = get_schedule("loglinear")
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    eps = 1e-6
    dp = (s.mask_prob(t + eps) - s.mask_prob(t - eps)) / (2 * eps)
    torch.testing.assert_close(s.weight(t), dp / s.mask_prob(t))


def test_loss_backpropagates_into_every_parameter(tiny_model):
    x0 = torch.randint(0, MASK, (2, 16))
    tiny_model.train()
    diffusion_loss(tiny_model, x0, DiffusionConfig(block_size=4), MASK).mean.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_model.parameters())
