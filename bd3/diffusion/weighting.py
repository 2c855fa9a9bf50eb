"""Loss reweightings of the masked-diffusion NELBO (Kingma & Gao 2023; the
README's "Noise schedules, clipping and loss weighting" lists them).

Each multiplies the NELBO weight p'(t)/p(t) of a masked token by w(lambda), a function of
the log-SNR lambda(t) = log(alpha_t / (1 - alpha_t)) = log((1 - p) / p), so the objective
does not depend on how t is parameterised. ``simple`` is the exception:
it cancels the NELBO weight entirely (plain cross-entropy over the masked tokens).
Training only: evaluation always reports the unweighted NELBO bound.

| name            | w(lambda)                                                  |
| --------------- | ---------------------------------------------------------- |
| ``elbo``        | 1                                                          |
| ``edm``         | N(lambda; 2.4, 2.4^2) * (exp(-lambda) + 0.5^2) / 0.5^2     |
| ``iddpm``       | sech(lambda / 2)                                           |
| ``sigmoid:k=K`` | sigmoid(K - lambda)                                        |
| ``fm``          | exp(-lambda / 2)                                           |
| ``simple``      | (none: the total weight is 1)                              |

The report's table prints the EDM weight as ``e^(-lambda+0.5^2)/0.5^2`` and shifts its
w~(t) column by one row; the formulas above are Kingma & Gao's, which the report cites.
"""

from __future__ import annotations

import math

import torch

from bd3.diffusion.schedules import parse_spec

WEIGHTING_DEFAULTS: dict[str, dict[str, float]] = {
    "elbo": {}, "edm": {}, "iddpm": {}, "sigmoid": {"k": 0.0}, "fm": {}, "simple": {},
}


def log_snr(p: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha / (1 - alpha)) with alpha = 1 - p."""
    return torch.log1p(-p) - torch.log(p)


def weight_of_lambda(spec: str, lam: torch.Tensor) -> torch.Tensor:
    """w(lambda) of a weighting spec (``simple`` has none and is handled by the caller)."""
    name, params = parse_spec(spec, WEIGHTING_DEFAULTS)
    if name == "elbo":
        return torch.ones_like(lam)
    if name == "edm":
        mu, sd = 2.4, 2.4
        normal = torch.exp(-0.5 * ((lam - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
        return normal * (torch.exp(-lam) + 0.25) / 0.25
    if name == "iddpm":
        return 1 / torch.cosh(lam / 2)
    if name == "sigmoid":
        return torch.sigmoid(params["k"] - lam)
    if name == "fm":
        return torch.exp(-lam / 2)
    raise ValueError(f"{name} has no weight in lambda")


def token_weight(spec: str, nelbo_weight: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The weight of each masked token's NLL: the NELBO weight p'/p times w(lambda(p))."""
    name, _ = parse_spec(spec, WEIGHTING_DEFAULTS)
    if name == "elbo":
        return nelbo_weight
    if name == "simple":
        return torch.ones_like(nelbo_weight)
    p64 = p.double().clamp(1e-12, 1 - 1e-12)
    return (nelbo_weight.double() * weight_of_lambda(spec, log_snr(p64))).to(nelbo_weight.dtype)
