"""Score-entropy discrete diffusion (SEDD; Lou et al., ICML 2024) with the absorbing graph.

The paper's SEDD baseline, as the BD3-LMs reference implements it. Notation, per position:

- mask rate p (the schedule's p(t)), total noise ``sigma = -log(1 - p)`` (so a token is
  still clean with probability e^-sigma), its rate ``dsigma = p'(t) / (1 - p)``;
- ``a = 1 / (e^sigma - 1) = (1 - p) / p``, the true total score of a masked position;
- V the vocabulary size, the mask token included.

The model is time-conditioned (its adaLN input is sigma) and outputs log-scores, the
estimated ratios ``s_y = p_t(x_t with y here) / p_t(x_t)``. For the absorbing graph the
true scores of a masked position are ``s_y = a * p(x0 = y | x_t)`` (y != mask), and the
reference's parameterisation is

    log s_y = logit_y - log(e^sigma - 1) - log(V - 1),   i.e.   s_y = a * r_y,
    r_y = exp(logit_y) / (V - 1)                          (the model's ratios),

so a zero output layer starts at r uniform with total R = sum_y r_y = 1.

Loss (diffusion-weighted denoising score entropy, an upper bound on the NLL), per masked
position with clean token x0 (unmasked positions contribute 0):

    dsigma * [ sum_{y != mask} s_y - a log s_x0 + K(a) ],   K(a) = a (log a - 1).

With s = a r and dsigma * a = p'/p = w(t) (the masked-diffusion NELBO weight) it is

    w(t) * [ R - log r_x0 - 1 ] = w(t) * [ CE + phi(u) ],   u = log R,  phi(u) = e^u - 1 - u,

where CE = -log softmax_{y != mask}(logits)[x0] is the MDLM cross-entropy: SEDD's loss is
the MDLM NELBO plus phi(u) >= 0, which vanishes when the scores' total is the true one
(R = 1). This form needs no sigma (nothing diverges at p -> 0 or p -> 1) and is what
training computes (:func:`sedd_token_loss`); the tests check it against the textbook form
(``tests/sedd_reference.py``).

Sampling (Tweedie tau-leaping, the reference's ``_analytic_sampler``), from noise level t
to s < t: the reference's Tweedie probabilities are ``staggered_score(s, dsigma) *
transp_transition(x, dsigma)`` (``tests/sedd_reference.py``), dsigma = sigma_t - sigma_s.
At a masked position they keep the mask with probability ``1 - S (e^dsigma - 1)`` and move
to token y with ``s_y (e^dsigma - 1)``; clean positions are copied. With s = a r that is an unmasking probability
``R (1 - p_s / p_t)`` (:func:`unmask_prob`: the MDLM update with the model's own total
R) and a token drawn from r normalised.
"""

from __future__ import annotations

import math

import torch

# The reference's loglinear sigma_max = -log(1e-3): mask rates above 0.999 are fed to the
# model as 0.999 (p = 1 would be sigma = inf).
SIGMA_MAX = -math.log(1e-3)


def total_noise(p: torch.Tensor) -> torch.Tensor:
    """sigma = -log(1 - p), capped at ``SIGMA_MAX``: the model's time input, float64."""
    return torch.clamp(-torch.log1p(-p.double()), max=SIGMA_MAX)


def log_total_score(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """u = log R = logsumexp_{y != mask}(logits) - log(V - 1) (N,), float64: the log of the
    model's total score at a masked position relative to the true one. The logsumexp runs
    in float32 over the vocabulary (stable)."""
    z = logits.float().index_fill(-1, torch.tensor([mask_id], device=logits.device), -torch.inf)
    return torch.logsumexp(z, dim=-1).double() - math.log(logits.shape[-1] - 1)


def sedd_token_loss(logits: torch.Tensor, x0: torch.Tensor, weight: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The SEDD loss of masked positions, ``dsigma * score_entropy(log_score(logits, sigma))``
    (the textbook form, ``tests/sedd_reference.py``),
    computed as ``weight * (CE + phi(u))`` (module docstring), float32 (N,).

    ``logits`` (N, V) raw model output, ``x0`` (N,) clean tokens (never the mask), ``weight``
    (N,) = dsigma / (e^sigma - 1) = p'(t) / p(t). Per-position terms in float64, with
    ``expm1`` for phi near u = 0."""
    u = log_total_score(logits, mask_id)
    ce = u + math.log(logits.shape[-1] - 1) - logits.float().gather(-1, x0[:, None])[:, 0].double()
    return (weight.double() * (ce + torch.expm1(u) - u)).float()


def unmask_prob(log_total: torch.Tensor, p_t: float, p_s: float) -> torch.Tensor:
    """Probability that a masked position unmasks from mask rate p_t to p_s < p_t, float64:
    ``min(1, R (1 - p_s / p_t))`` with ``log_total`` = log R (N,). Equals the token mass
    ``S (e^dsigma - 1)`` of the Tweedie probabilities (sigma = -log(1 - p), S = a R); clipped
    at 1 where an over-confident model would make the mask's probability negative."""
    return (log_total.double().exp() * (1.0 - p_s / p_t)).clamp(0.0, 1.0)
