"""Noise schedules, loss weightings and the clip search (issue: schedules and clip search)."""

import json
import math

import numpy as np
import pytest
import torch

from bd3.cli.main import main
from bd3.config import DiffusionConfig
from bd3.diffusion.clip_search import clip_grid, variances
from bd3.evaluate.variance import lowest_variance
from bd3.diffusion.noise import corrupt, resample_corrupt, sample_t
from bd3.diffusion.objective import draw_noise
from bd3.diffusion.schedules import canonical, get_schedule
from bd3.diffusion.weighting import log_snr, token_weight, weight_of_lambda
from bd3.errors import Bd3Error

SCHEDULES = ["linear", "cosine", "square", "sqrt", "log", "gaussian", "gaussian:mu=0.7:sigma=0.1", "bimodal",
             "bimodal:mu1=0.1:sigma1=0.05:mu2=0.6:sigma2=0.2:w=0.3"]
KS_CRITICAL_1PCT = 1.63  # sqrt(n) * D above this rejects at the 1 % level


def ks_statistic(samples: np.ndarray, cdf) -> float:
    """sqrt(n) * sup |F_n - F| (one-sample Kolmogorov-Smirnov)."""
    x = np.sort(samples)
    n = len(x)
    f = cdf(x)
    d = max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n))
    return math.sqrt(n) * d


@pytest.mark.parametrize("spec", SCHEDULES)
def test_schedule_is_monotone_with_endpoints_and_weight_is_the_derivative_ratio(spec):
    s = get_schedule(spec)
    t = torch.linspace(0.0, 1.0, 2001, dtype=torch.float64)
    p = s.mask_prob(t)
    assert (p[1:] >= p[:-1]).all() and (p[1:-1] > 0).all()
    assert float(p[0]) <= 1e-3 + 1e-12 and abs(float(p[-1]) - 1.0) < 1e-9  # cosine keeps p(0) = eps
    inner = t[50:-50]
    h = 1e-6
    fd = (s.mask_prob(inner + h) - s.mask_prob(inner - h)) / (2 * h)
    torch.testing.assert_close(s.weight(inner), fd / s.mask_prob(inner), rtol=1e-5, atol=0)
    torch.testing.assert_close(s.t_of(s.mask_prob(inner)), inner, rtol=0, atol=1e-9)


def test_reference_aliases_and_canonical_specs():
    assert canonical("loglinear") == "linear" and canonical("square_root") == "sqrt"
    assert canonical("gaussian:mu=0.6") == "gaussian:mu=0.6:sigma=0.2"
    for bad in ("quadratic", "gaussian:nu=1", "gaussian:mu=abc", "gaussian:sigma=0", "bimodal:w=1.5"):
        with pytest.raises(Bd3Error):
            get_schedule(bad)


@pytest.mark.parametrize("spec", SCHEDULES)
@pytest.mark.parametrize("clip", [(1e-3, 1.0), (0.45, 0.95), (0.3, 0.8)])
def test_draws_of_t_and_of_mask_rates_match_their_distributions(spec, clip):
    cfg = DiffusionConfig(block_size=4, schedule=spec, antithetic=False)
    s = get_schedule(spec)
    g = torch.Generator().manual_seed(0)
    x0 = torch.zeros(64, 256, dtype=torch.long)
    p = draw_noise(x0, cfg, 99, clip=clip, resample=False, generator=g).rate[:, ::4].flatten()  # one rate per block
    t = s.t_of(p)
    lo, hi = s.t_range(clip)
    assert p.min() >= clip[0] - 1e-9 and p.max() <= clip[1] + 1e-9  # clipped draws stay in range
    assert ks_statistic(t.numpy(), lambda x: (x - lo) / (hi - lo)) < KS_CRITICAL_1PCT
    # mask rates: their CDF is t_of (t is uniform), renormalised to the clipped range
    cdf = lambda x: ((s.t_of(torch.from_numpy(x)) - lo) / (hi - lo)).numpy()  # noqa: E731
    assert ks_statistic(p.numpy(), cdf) < KS_CRITICAL_1PCT


def test_realised_mask_counts_are_binomial_given_the_rate():
    """Randomised probability integral transform of each block's masked count under
    Binomial(block size, p): uniform exactly when masking is Bernoulli(p) per token."""
    g = torch.Generator().manual_seed(1)
    B, bs = 256, 16
    t = sample_t(B, 8, (0.0, 1.0), generator=g, antithetic=False)
    p_blocks = get_schedule("cosine").mask_prob(t.double()).float()
    xt = corrupt(torch.zeros(B, 8 * bs, dtype=torch.long), p_blocks.repeat_interleave(bs, 1), 99, generator=g, keep_first=False)
    k = (xt == 99).view(B, 8, bs).sum(-1).flatten().double()
    p = p_blocks.flatten().double().clamp(1e-9, 1 - 1e-9)
    dist = torch.distributions.Binomial(bs, probs=p)
    ks = torch.arange(bs + 1, dtype=torch.float64)
    pmf = dist.log_prob(ks[:, None]).exp()  # (bs+1, N)
    below = (pmf * (ks[:, None] < k[None])).sum(0)
    u = below + torch.rand(k.shape, generator=g, dtype=torch.float64) * pmf.gather(0, k.long()[None])[0]
    assert ks_statistic(u.numpy(), lambda x: x) < KS_CRITICAL_1PCT


def test_resample_keeps_realised_rates_in_the_clip():
    g = torch.Generator().manual_seed(2)
    x0 = torch.zeros(32, 64, dtype=torch.long)
    xt = resample_corrupt(x0, torch.full((32, 64), 0.7), 99, 16, (0.45, 0.95), generator=g)
    rate = (xt == 99).view(32, 4, 16).float().mean(-1)
    assert rate.min() >= 0.45 and rate.max() <= 0.95


@pytest.mark.parametrize("lam", [-4.0, -1.0, 0.0, 1.5, 3.0])
def test_weightings_match_the_report_table(lam):
    L = torch.tensor([lam], dtype=torch.float64)
    normal = math.exp(-0.5 * ((lam - 2.4) / 2.4) ** 2) / (2.4 * math.sqrt(2 * math.pi))
    assert float(weight_of_lambda("edm", L)) == pytest.approx(normal * (math.exp(-lam) + 0.25) / 0.25)
    assert float(weight_of_lambda("iddpm", L)) == pytest.approx(1 / math.cosh(lam / 2))
    assert float(weight_of_lambda("sigmoid", L)) == pytest.approx(1 / (1 + math.exp(lam)))
    assert float(weight_of_lambda("sigmoid:k=2", L)) == pytest.approx(1 / (1 + math.exp(lam - 2)))
    assert float(weight_of_lambda("fm", L)) == pytest.approx(math.exp(-lam / 2))
    # the report's time-domain forms, alpha = sigmoid(lambda)
    alpha = 1 / (1 + math.exp(-lam))
    assert float(weight_of_lambda("sigmoid:k=1", L)) == pytest.approx((1 - alpha) / (1 - (1 - math.exp(-1)) * alpha))
    assert float(weight_of_lambda("fm", L)) == pytest.approx(math.sqrt((1 - alpha) / alpha))
    assert float(weight_of_lambda("iddpm", L)) == pytest.approx(2 * math.sqrt(alpha * (1 - alpha)))


def test_token_weights_compose_with_the_nelbo_weight():
    t = torch.tensor([0.2, 0.5, 0.9])
    s = get_schedule("linear")
    w, p = s.weight(t), s.mask_prob(t)
    torch.testing.assert_close(token_weight("elbo", w, p), w)
    torch.testing.assert_close(token_weight("simple", w, p), torch.ones(3))
    expected = w.double() * torch.sigmoid(-log_snr(p.double()))
    torch.testing.assert_close(token_weight("sigmoid", w, p), expected.float())
    assert float(log_snr(torch.tensor(0.5))) == 0.0


def test_clip_grid_is_the_papers():
    grid = clip_grid()
    assert grid[0] == (1e-3, 1.0) and len(grid) == 1 + sum(int(round((1 - w) / 0.05)) + 1 for w in np.arange(0.5, 0.91, 0.05))
    for interval in [(0.45, 0.95), (0.5, 1.0), (0.3, 0.8), (1e-3, 0.5), (0.1, 1.0)]:
        assert interval in grid
    assert all(0 < lo < hi <= 1 and 0.5 - 1e-9 <= hi - lo or lo == 1e-3 for lo, hi in grid)


def test_search_returns_the_known_minimiser_of_a_synthetic_loss_table():
    rng = np.random.default_rng(0)
    grid = clip_grid()
    target = (0.3, 0.8)
    rows = []
    for interval in grid:
        spread = 0.1 if interval == target else 1.0 + abs(interval[0] - 0.3)  # known minimiser
        batch = list(5 + spread * rng.standard_normal(64))
        blocks = [5 + spread * rng.standard_normal(32) for _ in range(8)]
        rows.append({"beta": interval[0], "omega": interval[1], **{f"var_{k}": v for k, v in variances(batch, blocks).items()}})
    for kind in ("paper", "block"):
        best = lowest_variance(rows, kind, "t")
        assert (best["beta"], best["omega"]) == target


SMALL = ["--length", "32", "--batch-size", "4", "--log-every", "1", "--device", "cpu", "--eval-batches", "2"]


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    import os

    root = tmp_path_factory.mktemp("parent")
    os.environ.setdefault("BD3_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "bd3-cache"))
    assert main(["pretrain", *SMALL, "--steps", "2", "--block-size", "16", "--out", str(root / "run")]) == 0
    return root / "run"


def test_finetune_with_clip_and_schedule_records_them(parent, tmp_path):
    out = tmp_path / "ft"
    assert main(["finetune", str(parent), "--block-size", "4", "--clip", "0.45,0.95", "--schedule", "gaussian:mu=0.6",
                 "--weighting", "sigmoid:k=1", "--steps", "2", *SMALL[4:], "--out", str(out)]) == 0
    d = json.loads((out / "config.json").read_text())["diffusion"]
    assert d["clip"] == [0.45, 0.95] and d["block_size"] == 4
    assert d["schedule"] == "gaussian:mu=0.6:sigma=0.2" and d["weighting"] == "sigmoid:k=1"


@pytest.mark.parametrize("fix,estimator", [(False, "k"), (True, "t")])
def test_finetune_clip_search_logs_and_applies_the_minimiser(parent, tmp_path, fix, estimator):
    """The search minimises the variance of the run's own training estimator. Applied, the
    next step trains with the minimiser (two searches); fixed, the interval stays (one)."""
    out = tmp_path / "cs"
    steps = 1 if fix else 2
    args = ["finetune", str(parent), "--block-size", "4", "--clip-search", "--steps", str(steps), "--save-every", "1", "--estimator", estimator,
            "--batch-size", "1", *SMALL[4:], "--out", str(out)] + (["--fix-clip"] if fix else [])
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    searches = [r for r in records if r.get("event") == "clip_search"]
    assert [r["step"] for r in searches] == list(range(1, steps + 1))
    first = searches[0]
    assert len(first["scores"]) == len(clip_grid()) and first["estimator"] == estimator
    best = min(first["scores"], key=lambda r: r["var_paper" if estimator == "t" else "var_paper_k"])
    assert first["best"] == [best["beta"], best["omega"]] and first["applied"] is not fix
    clip = json.loads((out / "config.json").read_text())["diffusion"]["clip"]
    if fix:
        assert clip == first["clip"] == [0.001, 1.0]
    else:
        assert clip == searches[-1]["best"] and searches[1]["clip"] == first["best"]


def test_variance_command_compares_schedules(parent, capsys):
    code = main(["variance", str(parent), "--block-size", "4", "--schedule", "linear,cosine", "--clip", "0.45,0.95",
                 "--clip", "0.001,1", "--batch-size", "2", "--max-batches", "3", "--json", "--device", "cpu"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["variance"] == "paper"
    assert [(r["schedule"], r["beta"]) for r in out["intervals"]] == [("linear", 0.45), ("linear", 0.001), ("cosine", 0.45), ("cosine", 0.001)]
    assert out["best"]["var_paper"] == min(r["var_paper"] for r in out["intervals"])
    assert out["best_k"]["var_paper_k"] == min(r["var_paper_k"] for r in out["intervals"])
    assert all(r["var_block_k"] >= 0 and r["nelbo_k"] > 0 for r in out["intervals"])


def test_variance_plot(parent, tmp_path, capsys):
    png = tmp_path / "var.png"
    args = ["variance", str(parent), "--block-size", "4", "--clip", "0.45,0.95", "--clip", "0.3,0.8", "--batch-size", "2",
            "--max-batches", "2", "--plot", str(png), "--device", "cpu"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert main(args) == 1 and "pip install" in capsys.readouterr().err
    else:
        assert main(args) == 0 and png.stat().st_size > 1000


def test_eval_schedule_changes_the_estimate_not_the_bound(parent, capsys):
    """The t estimator depends on the schedule; k and exact do not take one."""
    main(["eval", str(parent), "--json", "--device", "cpu", "--max-batches", "4", "--passes", "2", "--estimator", "t"])
    linear = json.loads(capsys.readouterr().out)
    main(["eval", str(parent), "--json", "--device", "cpu", "--max-batches", "4", "--passes", "2", "--estimator", "t", "--schedule", "cosine"])
    cosine = json.loads(capsys.readouterr().out)
    assert main(["eval", str(parent), "--device", "cpu", "--schedule", "cosine"]) == 2
    assert linear["bound"] and cosine["bound"] and linear["nelbo"] != cosine["nelbo"]
    assert abs(linear["nelbo"] - cosine["nelbo"]) < 0.5 * linear["nelbo"]
