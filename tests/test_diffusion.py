"""The pure diffusion maths: masks, t draws, corruption, SUBS."""

import pytest
import torch

from bd3.diffusion.loss import masked_nll
from bd3.diffusion.masks import block_causal_mask, block_diff_mask
from bd3.diffusion.noise import corrupt, resample_corrupt, sample_t
from tests.subs import subs_log_probs


def test_block_diff_mask_equals_hand_written_case():
    # L = 4, L' = 2: rows/cols 0-3 are x_t, 4-7 are x_0.
    expected = torch.tensor([
        # x_t block 0, x_t block 1, x_0 block 0, x_0 block 1
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],  # x_t block 1 sees itself and clean block 0
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],  # clean block 0: block-causal
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(block_diff_mask(4, 2), expected)


@pytest.mark.parametrize("length,block_size", [(8, 1), (8, 4), (12, 3), (8, 8)])
def test_block_diff_mask_parts(length, block_size):
    m = block_diff_mask(length, block_size)
    L = length
    assert torch.equal(m[L:, L:], block_causal_mask(L, block_size))  # clean stream
    assert not m[L:, :L].any()  # the clean stream never sees x_t
    b = torch.arange(L) // block_size
    assert torch.equal(m[:L, :L], b[:, None] == b[None, :])  # x_t: own block only
    assert torch.equal(m[:L, L:], b[:, None] > b[None, :])  # x_t -> strictly earlier clean blocks


def test_sample_t_is_stratified_and_in_range():
    g = torch.Generator().manual_seed(0)
    t = sample_t(8, 4, (0.45, 0.95), generator=g)
    assert t.shape == (8, 4) and t.min() >= 0.45 and t.max() <= 0.95
    # one draw per stratum of width 1/32
    u = ((t - 0.45) / 0.5).flatten()
    strata = torch.floor(u * 32).long()
    assert torch.equal(strata, torch.arange(32))
    assert sample_t(4, 2, (0.0, 0.5), generator=g).max() <= 0.5


def test_corrupt_keeps_bos_and_masks_all_at_t_one():
    x0 = torch.randint(0, 10, (3, 12))
    xt = corrupt(x0, torch.ones(3, 12), 99)
    assert torch.equal(xt[:, 0], x0[:, 0]) and (xt[:, 1:] == 99).all()
    assert torch.equal(corrupt(x0, torch.zeros(3, 12), 99), x0)


def test_resample_forces_rates_into_interval():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 10, (16, 32))
    xt = resample_corrupt(x0, torch.full((16, 32), 0.7), 99, 8, (0.5, 0.9), generator=g, keep_first=False)
    rate = (xt == 99).view(16, 4, 8).float().mean(-1)
    assert rate.min() >= 0.5 and rate.max() <= 0.9


def test_subs_and_masked_nll_agree():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    x0 = torch.randint(0, 6, (2, 5), generator=g)
    xt = x0.clone()
    xt[:, 1::2] = 6  # mask id 6
    lp = subs_log_probs(logits, xt, 6)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(2, 5))
    unmasked = xt != 6
    assert (lp[unmasked].gather(-1, xt[unmasked][:, None]) == 0).all()  # carry-over
    masked = ~unmasked
    assert (lp[masked][:, 6] < -1e5).all()  # zero masking probability
    nll = masked_nll(logits[masked], x0[masked], 6)
    assert torch.allclose(nll, -lp[masked].gather(-1, x0[masked][:, None])[:, 0], atol=1e-6)
