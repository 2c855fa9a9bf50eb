"""Pure pieces of the sampler's update rule: nucleus filtering and categorical draws."""

from __future__ import annotations

import torch


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p`` (the token
    that crosses ``top_p`` is kept), renormalised. ``top_p >= 1`` keeps everything."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each token
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
    filtered = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return filtered / filtered.sum(-1, keepdim=True)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Exponential race in the probabilities' dtype (float64 against Gumbel truncation):
    argmax p / E with E ~ Exp(1)."""
    e = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / e).argmax(-1)


def token_probs(logits: torch.Tensor, mask_id: int, temperature: float, top_p: float) -> torch.Tensor:
    """float64 probabilities of p_theta(x0 | .) with the mask token removed (SUBS)."""
    logits = logits.double()
    logits[..., mask_id] = -torch.inf
    if temperature != 1.0:
        logits = logits / temperature
    return nucleus(torch.softmax(logits, dim=-1), top_p)
