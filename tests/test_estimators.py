"""The NELBO estimators (exact, k, t) and their intervals, against brute force and each other."""

import itertools
import math

import numpy as np
import pytest
import torch

from bd3.config import DiffusionConfig
from bd3.diffusion.estimators import (
    EXACT_MAX_BLOCK,
    count_range,
    draw_counts,
    exact_weight,
    maskable_positions,
    resolve_estimator,
    subsets,
)
from bd3.diffusion.masks import block_causal_mask
from bd3.diffusion.objective import diffusion_loss, exact_nelbo, row_nelbo
from bd3.errors import Bd3Error
from bd3.evaluate.intervals import nelbo_interval, t_quantile_975
from bd3.evaluate.perplexity import nelbo_perplexity
from tests.subs import subs_log_probs

MASK = 39  # tiny_model has vocabulary 40


def brute_force_nelbo(model, x0, block_size, mask_id, t_min=0.0, scored=None):
    """Each row's NELBO: for every block and every non-empty subset S of its scored
    positions (default: all but position 0; the same in every row), one plain forward over
    the clean prefix and the block with S masked; sum_{i in S} NLL_i weighted by
    P(mask = S | u) / u integrated over the mask rate u in [t_min, 1] (the linear schedule's
    NELBO), by numerical quadrature."""
    B, L = x0.shape
    if scored is None:
        scored = torch.arange(L) > 0
    out = torch.zeros(B, dtype=torch.float64)
    u = torch.linspace(t_min, 1.0, 200001, dtype=torch.float64)
    for b in range(L // block_size):
        s, e = b * block_size, (b + 1) * block_size
        positions = [i for i in range(s, e) if scored[i]]
        m = len(positions)
        for k in range(1, m + 1):
            weight = float(torch.trapezoid(u ** (k - 1) * (1 - u) ** (m - k), u))
            for subset in itertools.combinations(positions, k):
                block = x0[:, s:e].clone()
                block[:, [i - s for i in subset]] = mask_id
                seq = torch.cat([x0[:, :s], block], dim=1)
                logits = model(seq, attn_mask=block_causal_mask(e, block_size))[:, -block_size:]
                targets = x0[:, s:e, None].clamp(max=mask_id - 1)  # a mask token in x0 is never a target
                logp = subs_log_probs(logits, block, mask_id).gather(-1, targets)[..., 0].double()
                out -= weight * logp[:, [i - s for i in subset]].sum(1)
    return out


@pytest.fixture
def rows():
    return torch.randint(0, MASK, (3, 16), generator=torch.Generator().manual_seed(0))


def test_exact_equals_brute_force_enumeration(tiny_model, rows):
    cfg = DiffusionConfig(block_size=4)
    with torch.no_grad():
        exact, reference_interval = exact_nelbo(tiny_model, rows, cfg, MASK, maskable_positions(rows.shape, True), t_mins=(0.0, 1e-3))
        brute = brute_force_nelbo(tiny_model, rows, 4, MASK)
        brute_reference = brute_force_nelbo(tiny_model, rows, 4, MASK, t_min=1e-3)
    torch.testing.assert_close(exact / 15, brute / 15, atol=1e-5, rtol=0)  # per token
    torch.testing.assert_close(reference_interval / 15, brute_reference / 15, atol=1e-5, rtol=0)
    assert (exact > reference_interval).all()  # the slice u < 1e-3 adds a little


def test_exact_is_deterministic_and_counts_patterns(tiny_model, rows):
    cfg = DiffusionConfig(block_size=4)
    with torch.no_grad():
        a = row_nelbo(tiny_model, rows, cfg, MASK, "exact")
        b = row_nelbo(tiny_model, rows, cfg, MASK, "exact")
    assert torch.equal(a, b)
    assert subsets(4).shape == (15, 4) and subsets(8).shape == (255, 8)
    assert len({tuple(p.tolist()) for p in subsets(4)}) == 15


def test_exact_at_block_size_one_is_the_causal_nll(tiny_model, rows):
    """L' = 1: one pattern (the token masked, its prefix clean) = -log p(x_i | x_<i) under the
    block-causal mask, the AR likelihood of the same weights."""
    with torch.no_grad():
        exact = row_nelbo(tiny_model, rows, DiffusionConfig(block_size=1), MASK, "exact")
        causal = torch.zeros(3, dtype=torch.float64)
        for i in range(1, 16):
            seq = torch.cat([rows[:, :i], torch.full((3, 1), MASK)], dim=1)
            logits = tiny_model(seq, attn_mask=block_causal_mask(i + 1, 1))[:, -1]
            logits[:, MASK] = -torch.inf
            causal += torch.nn.functional.cross_entropy(logits, rows[:, i], reduction="none").double()
    torch.testing.assert_close(exact / 15, causal / 15, atol=1e-5, rtol=0)


def test_exact_weights_sum_to_the_bound():
    """sum over subsets of size k of 1/(k C(m,k)) = 1/k; t_min multiplies by P(Bin(m, t_min) < k)."""
    for m in range(1, 9):
        for k in range(1, m + 1):
            assert math.comb(m, k) * exact_weight(k, m) == pytest.approx(1 / k)
    assert exact_weight(1, 4, 1e-3) * 4 == pytest.approx((1 - 1e-3) ** 4)
    assert exact_weight(0, 4) == exact_weight(5, 4) == 0.0


def test_k_and_t_are_unbiased_estimates_of_exact(tiny_model):
    """Over many passes the mean of k agrees with exact within 3 standard errors; the mean of t
    agrees with exact restricted to mask rates >= 1e-3 (the reference's interval), whose
    difference from the bound (the slice below 1e-3) is measured here too."""
    x = torch.randint(0, MASK, (8, 16), generator=torch.Generator().manual_seed(1)).numpy()
    cfg = DiffusionConfig(block_size=4)
    with torch.no_grad():
        exact, reference_interval = (v.sum().item() / (8 * 15) for v in
                                     exact_nelbo(tiny_model, torch.from_numpy(x), cfg, MASK, maskable_positions((8, 16), True), (0.0, 1e-3)))
    k = nelbo_perplexity(tiny_model, x, cfg, MASK, estimator="k", batch_size=8, passes=200, seed=0)
    t = nelbo_perplexity(tiny_model, x, cfg, MASK, estimator="t", batch_size=8, passes=200, seed=0)
    assert abs(k["nelbo"] - exact) < 3 * k["nelbo_se"]
    assert abs(t["nelbo"] - reference_interval) < 3 * t["nelbo_se"]
    assert 0 < exact - reference_interval < 4 * 1e-3 * exact  # the slice: at most (block size) x 1e-3 of the bound
    assert t["nelbo_se"] > 3 * k["nelbo_se"]  # the point of k


def test_interval_covers_exact_in_at_least_85_percent_of_seeds(tiny_model):
    x = torch.randint(0, MASK, (8, 16), generator=torch.Generator().manual_seed(2)).numpy()
    cfg = DiffusionConfig(block_size=4)
    with torch.no_grad():
        exact = row_nelbo(tiny_model, torch.from_numpy(x), cfg, MASK, "exact").sum().item() / (8 * 15)
    covered = {1: 0, 2: 0}
    for passes in covered:
        for seed in range(40):
            r = nelbo_perplexity(tiny_model, x, cfg, MASK, estimator="k", batch_size=8, passes=passes, seed=seed)
            low, high = r["nelbo_ci95"]
            covered[passes] += low <= exact <= high
    assert covered[1] >= 34 and covered[2] >= 34, covered


def test_exact_and_ar_have_no_standard_error(tiny_model, rows):
    r = nelbo_perplexity(tiny_model, rows.numpy(), DiffusionConfig(block_size=4), MASK, estimator="exact", batch_size=2)
    assert r["nelbo_se"] == 0 and r["ppl_ci95"][0] == r["ppl_ci95"][1] == pytest.approx(r["ppl"]) and r["passes"] == 1
    assert r["tokens"] == 3 * 15 and r["estimator"] == "exact"


def test_passes_auto_stops_at_the_width_or_the_cap(tiny_model):
    x = torch.randint(0, MASK, (8, 16), generator=torch.Generator().manual_seed(3)).numpy()
    cfg = DiffusionConfig(block_size=4)
    seen = []
    wide = nelbo_perplexity(tiny_model, x, cfg, MASK, estimator="k", batch_size=8, passes="auto", ci_width=10.0, max_passes=50,
                            on_pass=lambda done, stats: seen.append(done))
    assert wide["passes"] == 2 and seen == [1, 2]
    narrow = nelbo_perplexity(tiny_model, x, cfg, MASK, estimator="k", batch_size=8, passes="auto", ci_width=1e-9, max_passes=5)
    assert narrow["passes"] == 5
    mid = nelbo_perplexity(tiny_model, x, cfg, MASK, estimator="k", batch_size=8, passes="auto", ci_width=0.2, max_passes=100)
    assert mid["nelbo_ci95"][1] - mid["nelbo_ci95"][0] <= 0.2 and 2 < mid["passes"] < 100


def test_draw_counts_masks_k_uniform_maskable_positions():
    B, L, n = 4000, 16, 4
    maskable = maskable_positions((B, L), True)
    masked, weight, rate = draw_counts(maskable, n, generator=torch.Generator().manual_seed(0))
    assert not masked[:, 0].any()
    counts = masked.view(B, L // n, n).sum(-1)
    m = maskable.view(B, L // n, n).sum(-1)
    assert (counts >= 1).all() and (counts <= m).all()
    torch.testing.assert_close(weight[:, ::n], m.double() / counts.double())
    torch.testing.assert_close(rate[:, ::n], counts.double() / m.double())
    # stratified k: each count equally often in the full blocks (exactly, up to one per stratum)
    full = counts[:, 1:].flatten()
    freq = torch.bincount(full, minlength=5)[1:].double() / full.numel()
    assert (freq - 0.25).abs().max() < 0.01
    # the subset is uniform given k: every position equally often among blocks with k = 2
    two = (counts[:, 1:] == 2)
    pos = masked.view(B, L // n, n)[:, 1:][two].double().mean(0)
    assert (pos - 0.5).abs().max() < 0.03


def test_clip_maps_mask_rates_to_counts():
    m = torch.tensor([4, 16, 3, 1])
    lo, hi = count_range(m, (0.45, 0.95))
    assert lo.tolist() == [2, 8, 2, 1] and hi.tolist() == [3, 15, 2, 1]
    lo, hi = count_range(m, (1.0, 1.0))  # a fully masked block
    assert lo.tolist() == hi.tolist() == m.tolist()
    lo, hi = count_range(m, (1e-3, 1.0))
    assert lo.tolist() == [1, 1, 1, 1] and hi.tolist() == m.tolist()


def test_k_training_loss_is_an_unbiased_nelbo_and_trains(tiny_model):
    """With weighting elbo the k training loss averages to the exact NELBO per token; its
    gradient reaches every parameter."""
    x = torch.randint(0, MASK, (8, 16), generator=torch.Generator().manual_seed(4))
    cfg = DiffusionConfig(block_size=4, estimator="k")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        exact = row_nelbo(tiny_model, x, cfg, MASK, "exact").sum().item() / (8 * 15)
        draws = np.array([diffusion_loss(tiny_model, x, cfg, MASK, generator=g).mean.item() for _ in range(300)])
    assert abs(draws.mean() - exact) < 3 * draws.std(ddof=1) / math.sqrt(len(draws))
    tiny_model.train()
    diffusion_loss(tiny_model, x, cfg, MASK, generator=g).mean.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_model.parameters())


def test_resolve_estimator_defaults_and_refusals():
    assert resolve_estimator("bd3lm", 16, None) == "k" and resolve_estimator("mdlm", 128, None) == "k"
    assert resolve_estimator("ar", 1, None) == "exact" and resolve_estimator("sedd", 128, None) == "t"
    assert resolve_estimator("bd3lm", 1, None) == "exact"  # one mask pattern per block: no Monte Carlo, standard error 0
    assert resolve_estimator("bd3lm", EXACT_MAX_BLOCK, "exact") == "exact"
    with pytest.raises(Bd3Error, match="estimator k"):
        resolve_estimator("bd3lm", 16, "exact")
    with pytest.raises(Bd3Error, match="SEDD"):
        resolve_estimator("sedd", 128, "k")
    with pytest.raises(Bd3Error, match="exact"):
        resolve_estimator("ar", 1, "t")
    with pytest.raises(Bd3Error):
        DiffusionConfig(algo="sedd", estimator="k")


def test_intervals():
    assert t_quantile_975(1) == pytest.approx(12.706, abs=1e-3) and t_quantile_975(30) == pytest.approx(2.0423, abs=1e-3)
    assert t_quantile_975(31) == pytest.approx(2.0395, abs=1e-3) and t_quantile_975(10**6) == pytest.approx(1.95996, abs=1e-4)
    rng = np.random.default_rng(0)
    sums = rng.normal(10.0, 1.0, size=(3, 50))
    counts = np.full(50, 5)
    r = nelbo_interval(sums, counts)
    assert r["nelbo"] == pytest.approx(sums.sum() / (3 * 250))
    assert r["nelbo_se"] == pytest.approx(math.sqrt(sums.var(axis=0, ddof=1).sum() / 3) / 250)
    one = nelbo_interval(sums[:1], counts)  # one pass: the spread across rows
    assert one["nelbo_se"] == pytest.approx(sums[0].std(ddof=1) / math.sqrt(50) / 5)
    assert nelbo_interval(sums, counts, deterministic=True)["nelbo_se"] == 0


def test_mask_tokens_in_x0_are_unknown_context_not_targets(tiny_model):
    """A row that ends before the model length is filled with mask tokens: every estimator
    scores only the real tokens, and exact equals brute force with the filler masked."""
    x = torch.randint(0, MASK, (2, 16), generator=torch.Generator().manual_seed(5))
    x[:, 10:] = MASK
    scored = maskable_positions(x.shape, True) & (x != MASK)
    cfg = DiffusionConfig(block_size=4)
    with torch.no_grad():
        exact = row_nelbo(tiny_model, x, cfg, MASK, "exact", maskable=scored)
        for est in ("k", "t"):
            assert torch.isfinite(row_nelbo(tiny_model, x, cfg, MASK, est, maskable=scored, generator=torch.Generator().manual_seed(0))).all()
        brute = brute_force_nelbo(tiny_model, x, 4, MASK, scored=scored[0])
    torch.testing.assert_close(exact / 9, brute / 9, atol=1e-5, rtol=0)


def test_evaluation_gives_every_block_every_level_and_keeps_the_batch_stratified():
    """Over fixed rows the paper's fixed stratum order would give row 0 the lowest levels in
    every pass (its estimate then never averages over k); evaluation shuffles the strata:
    each block's count is uniform on 1..m over passes, and each pass still draws the batch's
    levels stratified."""
    from bd3.diffusion.noise import sample_t

    g = torch.Generator().manual_seed(0)
    maskable = maskable_positions((8, 8), True)  # block 4: a row's first block has 3 maskable tokens, the second 4
    passes = 800
    counts = torch.zeros(8, 2, 5)
    for _ in range(passes):
        masked, _, _ = draw_counts(maskable, 4, generator=g, shuffle=True)
        k = masked.view(8, 2, 4).sum(-1)
        counts.scatter_add_(2, k[..., None], torch.ones(8, 2, 1))
    for block, m in ((0, 3), (1, 4)):
        observed = counts[:, block, 1 : m + 1]
        expected = passes / m
        chi2 = ((observed - expected) ** 2 / expected).sum(-1)  # per row, m - 1 degrees of freedom
        assert (chi2 < 20).all(), chi2  # P(chi2 with 3 dof > 20) < 2e-4
    fixed, _, _ = draw_counts(maskable, 4, generator=g)
    assert fixed.view(8, 2, 4)[0].sum(-1).tolist() == [1, 1]  # the training sampler: row 0 at the lowest level
    u = sample_t(8, 4, (0.0, 1.0), generator=g, shuffle=True)
    assert torch.equal(torch.sort((u.flatten() * 32).floor()).values, torch.arange(32.0))
