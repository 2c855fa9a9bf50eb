"""The backbone's KV cache through its forward (the samplers: test_sampling.py)."""

import torch

from bd3.config import ModelConfig
from bd3.model import DiT
from bd3.diffusion.masks import block_causal_mask
from tests.conftest import randomize

MASK = 39


def test_cached_logits_equal_uncached_for_every_block(tiny_model):
    g = torch.Generator().manual_seed(0)
    B, L, bs = 3, 16, 4
    x = torch.randint(0, MASK, (B, L), generator=g)
    cache = tiny_model.new_kv_cache(B, L)
    with torch.no_grad():
        for b in range(L // bs):
            s = b * bs
            noisy = x[:, s : s + bs].clone()
            noisy[:, ::2] = MASK
            cached = tiny_model(noisy, positions=s, kv_cache=cache)
            seq = torch.cat([x[:, :s], noisy], dim=1)
            recomputed = tiny_model(seq, attn_mask=block_causal_mask(s + bs, bs))[:, s:]
            torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=0)
            tiny_model(x[:, s : s + bs], positions=s, kv_cache=cache)  # the clean block's K/V over the noisy one's
            cache.commit(bs)
    assert cache.length == L


def test_ar_model_cache_equals_full_causal_pass():
    cfg = ModelConfig(hidden_dim=32, n_heads=2, n_layers=2, cond_dim=16, length=16, causal=True)
    model = randomize(DiT(cfg, 40))
    x = torch.randint(0, MASK, (2, 12))
    cache = model.new_kv_cache(2, 16)
    with torch.no_grad():
        steps = []
        for i in range(12):
            steps.append(model(x[:, i : i + 1], positions=torch.tensor([i]), kv_cache=cache))
            cache.commit(1)
        torch.testing.assert_close(torch.cat(steps, 1), model(x), atol=1e-5, rtol=0)
