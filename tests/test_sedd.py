"""SEDD: the score-entropy loss by hand, its bound and optimum, the analytic sampler on mock
score functions, and the CLI end to end."""

import json
import math

import pytest
import torch

from bd3.cli.main import main
from bd3.config import DiffusionConfig, RunConfig
from bd3.diffusion.objective import diffusion_loss, draw_noise, sedd_nelbo
from bd3.diffusion.sedd import log_total_score, sedd_token_loss, total_noise, unmask_prob
from bd3.sampling.sedd import sample_sedd
from tests.sedd_reference import log_score, score_entropy, tweedie_probs

MASK = 3  # a vocabulary of three tokens and the mask


def test_score_entropy_by_hand():
    """V = 3 + mask, scores s = (1/2, 1, 2). sigma = log 2: a = 1/(e^sigma - 1) = 1,
    K(1) = -1, x0 = 2: 3.5 - log 2 - 1. sigma = log 3: a = 1/2, K = (log(1/2) - 1)/2, x0 = 0:
    3.5 - (1/2) log(1/2) + K = 3.5 - 1/2 = 3 exactly."""
    log_s = torch.log(torch.tensor([[0.5, 1.0, 2.0, 7.0], [0.5, 1.0, 2.0, 7.0]], dtype=torch.float64))  # mask column ignored
    got = score_entropy(log_s, torch.tensor([2, 0]), torch.log(torch.tensor([2.0, 3.0], dtype=torch.float64)), MASK)
    torch.testing.assert_close(got, torch.tensor([3.5 - math.log(2) - 1, 3.0], dtype=torch.float64), rtol=0, atol=1e-12)


def test_token_loss_by_hand():
    """Linear schedule at t = 2/3: sigma = log 3, dsigma = 1/(1 - t) = 3, a = 1/2, w = 1/t = 3/2.
    logits log(1.5, 3, 6) are ratios r = e^logit / 3 = (1/2, 1, 2), R = 3.5; x0 = 0:
    w (R - log r_x0 - 1) = 1.5 (2.5 + log 2), equal to dsigma * score_entropy at s = a r."""
    logits = torch.log(torch.tensor([[1.5, 3.0, 6.0, 0.0]]))
    x0 = torch.tensor([0])
    got = sedd_token_loss(logits, x0, torch.tensor([1.5]), MASK)
    torch.testing.assert_close(got, torch.tensor([1.5 * (2.5 + math.log(2))]), rtol=1e-6, atol=0)
    sigma = torch.tensor([math.log(3.0)], dtype=torch.float64)
    textbook = 3.0 * score_entropy(log_score(logits, sigma, MASK), x0, sigma, MASK)
    torch.testing.assert_close(got.double(), textbook, rtol=1e-6, atol=0)


def test_token_loss_is_the_textbook_loss_and_non_negative():
    """Random logits over V = 50 at mask rates from 1e-3 to 0.9999: w (CE + phi(u)) equals
    dsigma * score_entropy(log_score(logits, sigma)), is >= 0 and >= the MDLM term w CE."""
    g = torch.Generator().manual_seed(0)
    V, mask = 50, 49
    logits = torch.randn(64, V, generator=g) * 3
    x0 = torch.randint(0, mask, (64,), generator=g)
    t = torch.cat([torch.tensor([1e-3, 0.5, 0.9999]), torch.rand(61, generator=g, dtype=torch.float64)]).double()
    sigma, dsigma = -torch.log1p(-t), 1 / (1 - t)
    w = 1 / t  # linear schedule: dsigma / (e^sigma - 1)
    got = sedd_token_loss(logits, x0, w, mask)
    textbook = dsigma * score_entropy(log_score(logits, sigma, mask), x0, sigma, mask)
    torch.testing.assert_close(got.double(), textbook, rtol=1e-5, atol=1e-5)
    ce = torch.nn.functional.cross_entropy(logits.index_fill(-1, torch.tensor([mask]), -torch.inf), x0, reduction="none")
    assert (got >= 0).all() and (got.double() >= w * ce.double() - 1e-4).all()


def test_zero_at_the_true_ratios_and_stationary_at_the_true_scores():
    """A point mass x0: the true scores are a at x0 and 0 elsewhere, and the loss is 0.
    A distribution q over x0: the expected score entropy is stationary at s = a q."""
    sigma = torch.tensor(0.7, dtype=torch.float64)
    a = 1 / math.expm1(0.7)
    point = torch.full((1, 4), -torch.inf, dtype=torch.float64)
    point[0, 1] = math.log(a)
    assert score_entropy(point, torch.tensor([1]), sigma, MASK).item() == pytest.approx(0.0, abs=1e-12)
    logits = torch.full((1, 4), -torch.inf)
    logits[0, 1] = math.log(3.0)  # r = 1 at x0: R = 1
    assert sedd_token_loss(logits, torch.tensor([1]), torch.tensor([2.0]), MASK).item() == pytest.approx(0.0, abs=1e-7)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    log_s = torch.cat([torch.log(a * q), torch.zeros(1, dtype=torch.float64)]).requires_grad_()
    expected = sum(q[y] * score_entropy(log_s[None], torch.tensor([y]), sigma, MASK)[0] for y in range(3))
    (grad,) = torch.autograd.grad(expected, log_s)
    torch.testing.assert_close(grad[:3], torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)
    assert expected.item() > 0


def test_sedd_objective_runs_time_conditioned(tiny_model):
    """The loss of a batch: zero at unmasked positions, position 0 excluded from the count,
    and the model's output depends on sigma (time conditioning is on)."""
    g = torch.Generator().manual_seed(3)
    mask = 39
    x0 = torch.randint(0, mask, (3, 16), generator=g)
    cfg = RunConfig(model=tiny_model.cfg, diffusion=DiffusionConfig(algo="sedd")).diffusion
    assert cfg.block_size == 16
    noise = draw_noise(x0, cfg, mask, clip=(1e-3, 1.0), resample=False, generator=g)
    xt = noise.xt
    with torch.no_grad():
        losses = sedd_nelbo(tiny_model, x0, noise, cfg, mask)
        a = tiny_model(xt, sigma=torch.full((3,), 0.1))
        b = tiny_model(xt, sigma=torch.full((3,), 3.0))
    assert losses.count == 3 * 15 and (losses.token_loss[xt != mask] == 0).all()
    assert (losses.token_loss[xt == mask] > 0).all() and torch.isfinite(losses.token_loss).all()
    assert not torch.allclose(a, b)  # sigma changes the output
    tiny_model.train()
    diffusion_loss(tiny_model, x0, cfg, mask).mean.backward()
    assert tiny_model.sigma_map.mlp[0].weight.grad.abs().sum() > 0  # sigma reaches the loss


def test_sampler_step_is_tweedie_tau_leaping():
    """unmask_prob and the token draw equal the normalised staggered score times the
    transposed transition at a masked position (sigma = -log(1 - p))."""
    g = torch.Generator().manual_seed(1)
    V, mask = 6, 5
    logits = torch.randn(4, V, generator=g)
    p_t, p_s = 0.8, 0.6
    sigma_t, sigma_s = -math.log1p(-p_t), -math.log1p(-p_s)
    score = log_score(logits, torch.tensor(sigma_t, dtype=torch.float64), mask).exp()
    score[:, mask] = 1.0  # the ratio of x_t to itself
    probs = tweedie_probs(score, torch.full((4,), mask), torch.tensor(sigma_t - sigma_s, dtype=torch.float64), mask)
    pi = unmask_prob(log_total_score(logits, mask), p_t, p_s)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, dtype=torch.float64))  # already normalised
    torch.testing.assert_close(1 - probs[:, mask], pi, rtol=1e-6, atol=1e-9)
    r = logits.double().exp()[:, :mask]
    torch.testing.assert_close(probs[:, :mask] / pi[:, None], r / r.sum(-1, keepdim=True), rtol=1e-6, atol=1e-9)
    clean = tweedie_probs(score, torch.tensor([0, 1, 2, 3]), torch.tensor(0.3, dtype=torch.float64), mask)
    assert (clean.argmax(-1) == torch.tensor([0, 1, 2, 3])).all() and (clean > 0).sum() == 4  # copied


class Mock:
    """Scores with ratios r = R q over tokens 1..3 of V = 5 (mask 4): logits log((V-1) R q)."""

    def __init__(self, total: float, q=(0.7, 0.2, 0.1)):
        self.calls = []
        self.logits = torch.full((5,), -torch.inf)
        self.logits[1:4] = torch.log(4 * total * torch.tensor(q))

    def __call__(self, x, start, rows, pos, sigma=None):
        self.calls.append((x.clone(), sigma.clone()))
        return self.logits.expand(rows.numel(), -1).clone()

    def commit(self, tokens, start):
        pass

    def select(self, rows):
        pass


KW = {"length": 33, "mask_id": 4, "bos_id": 0}


def test_sampler_unmasks_at_the_model_rate_and_finishes_every_position():
    """With R = 1 a position's unmasking step is uniform on the T steps; R = 2 doubles the
    rate; R ~ 0 leaves everything to the last step. Tokens follow q; every position ends
    unmasked; BOS is kept."""
    T, B, W = 4, 50, 32
    # R = 2: probabilities 0.5, 2/3, then 1 at the third step, which leaves nothing for the fourth
    for total, expected_first, calls in ((1.0, 0.25, T), (2.0, 0.5, 3), (1e-9, 0.0, T)):
        mock = Mock(total)
        out = sample_sedd(mock, batch=B, max_tokens=33, seed=0, steps=T, top_p=1.0, **KW)
        assert len(mock.calls) == calls and all(s.nfe == calls for s in out)
        x1 = mock.calls[1][0][:, 1:]  # before the second step
        unmasked = (x1 != 4).sum().item()
        n = B * W
        sd = math.sqrt(n * expected_first * (1 - expected_first))
        assert abs(unmasked - n * expected_first) <= 4 * sd + 1e-9
        tokens = torch.tensor([s.tokens for s in out])
        assert (tokens[:, 0] == 0).all() and ((tokens[:, 1:] >= 1) & (tokens[:, 1:] <= 3)).all()
        assert mock.calls[0][1][0].item() == pytest.approx(total_noise(torch.tensor(1.0)).item())  # t = 1, capped
    freq = torch.bincount(tokens[:, 1:].flatten(), minlength=4)[1:].double() / n
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64), rtol=0, atol=4 * math.sqrt(0.25 / n))
    greedy = sample_sedd(Mock(1.0), batch=2, max_tokens=33, seed=0, steps=T, top_p=0.5, **KW)
    assert all(set(s.tokens[1:]) == {1} for s in greedy)  # the nucleus keeps the 0.7 token only


def test_sampler_is_reproducible_per_sample_and_slides_beyond_the_length():
    """The same seed gives the same samples whatever the batch; 60 tokens from a length of
    33 take three windows (the first 33, then strides of 16), with the prompt kept."""
    out = sample_sedd(Mock(1.0), batch=3, max_tokens=60, seed=7, steps=5, prompt=[0, 2, 2], **KW)
    alone = sample_sedd(Mock(1.0), samples=[2], max_tokens=60, seed=7, steps=5, prompt=[0, 2, 2], **KW)
    again = sample_sedd(Mock(1.0), batch=3, max_tokens=60, seed=7, steps=5, prompt=[0, 2, 2], **KW)
    assert [s.tokens for s in out] == [s.tokens for s in again] and alone[0].tokens == out[2].tokens
    assert all(len(s.tokens) == 60 and s.tokens[:3] == [0, 2, 2] and 4 not in s.tokens for s in out)
    assert all(3 <= s.nfe <= 3 * 5 for s in out) and out[0].new_tokens == 57
    other = sample_sedd(Mock(1.0), batch=3, max_tokens=60, seed=8, steps=5, prompt=[0, 2, 2], **KW)
    assert [s.tokens for s in other] != [s.tokens for s in out]


def test_sampler_stops_at_eos():
    out = sample_sedd(Mock(1.0, q=(0.5, 0.3, 0.2)), batch=4, max_tokens=33, seed=0, steps=4, eos_id=3, stop="eos", **KW)
    for s in out:
        assert s.stop == "eos" and s.tokens[-1] == 3 and 3 not in s.tokens[1:-1]


SMALL = ["--length", "32", "--batch-size", "4", "--log-every", "1", "--device", "cpu"]


def test_cli_pretrain_eval_sample(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def bd3(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = bd3("pretrain", "--algo", "sedd", "--steps", 1, "--eval-batches", 1, "--save-every", 0, "--out", "s", *SMALL)
    assert code == 0, err
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["diffusion"]["algo"] == "sedd" and cfg["diffusion"]["block_size"] == 32
    assert "validation perplexity <=" in err

    code, out, err = bd3("eval", "s", "--json", "--max-batches", 1, "--batch-size", 4, "--device", "cpu")
    assert code == 0, err
    result = json.loads(out)
    assert result["bound"] and result["algo"] == "sedd" and result["ppl"] > 1

    args = ("sample", "s", "--max-tokens", 40, "--denoise-steps", 3, "--num-samples", 2, "--format", "jsonl", "--device", "cpu")
    code, out, err = bd3(*args)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 2 and all(len(r["tokens"]) == 40 and r["nfe"] <= 2 * 3 for r in rows)
    assert "analytic sampler" in err
    assert [json.loads(line)["tokens"] for line in bd3(*args)[1].splitlines()] == [r["tokens"] for r in rows]  # same seed
    code, out, err = bd3(*args, "--precision", "bf16")  # the DiT under bf16 autocast
    assert code == 0 and [len(json.loads(line)["tokens"]) for line in out.splitlines()] == [40, 40], err
    code, _, err = bd3(*args, "--precision", "fp16")  # an engine feature
    assert code == 2 and "SEDD" in err

    code, _, err = bd3("sample", "s", "--block-size", 4, "--device", "cpu")
    assert code == 2 and "sedd" in err
    code, _, err = bd3("finetune", "s", "--block-size", 4, "--device", "cpu")
    assert code == 1 and "SEDD" in err
    code, _, err = bd3("eval", "s", "--gen-ppl", "--sampler", "ddpm", "--judge", "s", "--device", "cpu")
    assert code == 2 and "sedd" in err  # the same option checks as bd3 sample
    code, _, err = bd3("export", "s", "exported")
    assert code == 1 and "SEDD" in err and not (tmp_path / "exported").exists()
