"""The backbone's KV cache and sampler primitives."""

import torch

from bd3.config import ModelConfig
from bd3.model import DiT
from bd3.sampling.block import commit_block, denoise_block, sample_blocks
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
            h1, c = denoise_block(tiny_model, noisy, s, cache=cache)
            h2, _ = denoise_block(tiny_model, noisy, s, context=x[:, :s])
            torch.testing.assert_close(tiny_model.logits(h1, c), tiny_model.logits(h2, c), atol=1e-5, rtol=0)
            commit_block(tiny_model, cache, x[:, s : s + bs], s)
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


def test_sampler_first_hitting_fills_blocks_one_call_per_token(tiny_model):
    g = torch.Generator().manual_seed(0)
    seen = []
    x, stats = sample_blocks(
        tiny_model, batch=3, max_tokens=16, block_size=4, length=16, mask_id=MASK, bos_id=0, generator=g,
        on_block=lambda x: seen.append(x.shape[1]),
    )
    assert x.shape == (3, 16) and (x != MASK).all() and (x[:, 0] == 0).all()
    assert seen == [4, 8, 12, 16]  # streamed block by block
    assert stats.nfe == 16 - 1  # one model call per generated token (BOS is given)


def test_sampler_cache_and_recompute_give_the_same_text(tiny_model):
    kw = dict(batch=2, max_tokens=16, block_size=4, length=16, mask_id=MASK, bos_id=0)
    a, _ = sample_blocks(tiny_model, generator=torch.Generator().manual_seed(5), kv_cache=True, **kw)
    b, _ = sample_blocks(tiny_model, generator=torch.Generator().manual_seed(5), kv_cache=False, **kw)
    assert torch.equal(a, b)


def test_sampler_slides_past_the_model_length(tiny_model):
    x, _ = sample_blocks(
        tiny_model, batch=1, max_tokens=40, block_size=4, length=16, mask_id=MASK, bos_id=0,
        generator=torch.Generator().manual_seed(0),
    )
    assert x.shape == (1, 40) and (x != MASK).all()
