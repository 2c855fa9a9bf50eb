"""The reference's SEDD forms that bd3's own are tested against (bd3.diffusion.sedd's
docstring has the notation): the textbook score entropy and parameterisation, and the
Tweedie tau-leaping probabilities of the reference's ``_analytic_sampler``."""

import math

import torch


def log_score(logits: torch.Tensor, sigma: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The reference's SEDD parameterisation at masked positions, float64:
    ``log s_y = logit_y - log(e^sigma - 1) - log(V - 1)``, the mask column -inf.

    ``logits`` (N, V), ``sigma`` (N,) or a scalar."""
    logits = logits.double()
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=logits.device)
    out = logits - torch.log(torch.expm1(sigma))[..., None] - math.log(logits.shape[-1] - 1)
    out[..., mask_id] = -torch.inf
    return out


def score_entropy(log_s: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The denoising score entropy of masked positions (textbook form), float64:
    ``sum_{y != mask} s_y - a log s_x0 + a (log a - 1)``, a = 1 / (e^sigma - 1).

    ``log_s`` (N, V) log-scores (the mask column ignored), ``x0`` (N,) clean tokens,
    ``sigma`` (N,) total noise. Non-negative; zero iff s is a at x0 and 0 elsewhere.
    Multiplied by dsigma it is the SEDD loss."""
    log_s = log_s.double()
    a = 1.0 / torch.expm1(torch.as_tensor(sigma, dtype=torch.float64, device=log_s.device))
    a = a.expand(x0.shape)
    total = log_s.index_fill(-1, torch.tensor([mask_id], device=log_s.device), -torch.inf).exp().sum(-1)
    return total - a * log_s.gather(-1, x0[:, None])[:, 0] + a * (torch.log(a) - 1)


def staggered_score(score: torch.Tensor, dsigma: torch.Tensor, mask_id: int) -> torch.Tensor:
    """``exp(dsigma Q) s`` for the absorbing graph's transposed rate Q (reference
    ``_staggered_score``): ``e^dsigma * s``, plus ``(1 - e^dsigma) * sum(s)`` at the mask
    column. ``score`` (N, V) with the mask column included (1 at a masked position)."""
    dsigma = torch.as_tensor(dsigma, dtype=score.dtype, device=score.device)
    e = torch.exp(dsigma)[..., None]
    out = score * e
    out[..., mask_id] += (1 - e[..., 0]) * score.sum(-1)
    return out


def transp_transition(x: torch.Tensor, dsigma: torch.Tensor, mask_id: int, vocab_size: int) -> torch.Tensor:
    """Row x of ``exp(-dsigma Q)`` transposed (reference ``_transp_transition``), (N, V):
    ``e^-dsigma`` at x, plus ``1 - e^-dsigma`` on every column where x is the mask."""
    dsigma = torch.as_tensor(dsigma, dtype=torch.float64, device=x.device).expand(x.shape)
    keep = torch.exp(-dsigma)
    edge = torch.nn.functional.one_hot(x, vocab_size).double() * keep[:, None]
    return edge + torch.where(x == mask_id, 1 - keep, 0.0)[:, None]


def tweedie_probs(score: torch.Tensor, x: torch.Tensor, dsigma: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Unnormalised probabilities (N, V) of x_s given x_t = x over a noise step dsigma
    (Tweedie tau-leaping): ``staggered_score * transp_transition``."""
    return staggered_score(score.double(), dsigma, mask_id) * transp_transition(x, dsigma, mask_id, score.shape[-1])
