"""Pure pieces of the samplers: SUBS probabilities, nucleus filtering and categorical draws.

A draw takes one U[0, 1) number per token, in float64: the inverse CDF of the SUBS
distribution (float64 cumulative sums, so no probability is truncated away, which is what
the reference's float64 Gumbel noise is for), then, under top-p, a rejection step that
redraws the (rare) tokens outside the nucleus. No vocabulary-sized noise and no sort per
token, and the result is exactly a draw from the nucleus distribution. The weights
themselves are exp(logit - max) of the float32 logits, in float32.

Top-p keeps every token whose probability is at least that of the token crossing ``p``:
the smallest set of most likely tokens whose mass reaches ``p``, plus any token tied with
its least likely member (the reference drops the crossing token; a sort would break ties
arbitrarily). ``top_p = 0`` keeps the most likely token(s): greedy decoding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

REJECTION_ROUNDS = 4  # then the exact (sorting) nucleus for the rows still rejected


def subs_weights(logits: torch.Tensor, mask_id: int, temperature: float = 1.0) -> torch.Tensor:
    """Unnormalised probabilities (N, V) of p_theta(x0 | .) with the mask token removed
    (SUBS), at ``temperature``: exp(logit - max), so the largest is 1."""
    w = logits.float().clone() if logits.dtype != torch.float32 or logits.requires_grad else logits.clone()
    if temperature != 1.0:
        w.div_(temperature)
    w[..., mask_id] = -torch.inf
    return w.sub_(w.amax(-1, keepdim=True)).exp_()


def kept(w: torch.Tensor, tokens: torch.Tensor, top_p: float, total: torch.Tensor | None = None) -> torch.Tensor:
    """Whether each ``tokens[i]`` lies in the nucleus of ``w[i]`` (N, V): the mass strictly
    more likely than it is below ``top_p`` (or zero). ``total``: each row's float64 sum of
    ``w``, when already known."""
    if top_p >= 1.0:
        return torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
    if total is None:
        total = w.sum(-1, dtype=torch.float64)
    wj = w.gather(-1, tokens[:, None])
    if w.shape[0] == 1:  # one pass instead of a comparison and a where (5x faster)
        above = F.threshold(w, float(wj), 0.0).sum(-1, dtype=torch.float64)
    else:
        above = torch.where(w > wj, w, 0.0).sum(-1, dtype=torch.float64)
    return (above < top_p * total) | (above == 0)


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The nucleus distribution of (normalised or not) ``probs`` (..., V), renormalised, in
    float64: the explicit, sorting version of what :func:`draw` samples from."""
    probs = probs.double()
    if top_p >= 1.0:
        return probs / probs.sum(-1, keepdim=True)
    asc = probs.sort(dim=-1).values
    cum = asc.cumsum(-1)
    total = cum[..., -1:]
    at_most = cum.gather(-1, torch.searchsorted(asc, probs, right=True) - 1)  # mass of tokens <= each
    above = total - at_most
    keep = (above < top_p * total) | (probs >= asc[..., -1:])
    filtered = probs * keep
    return filtered / filtered.sum(-1, keepdim=True)


def _inverse_cdf(w: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (N,) with P(i) proportional to w[:, i], from uniforms u (N,), in float64;
    and each row's total weight (N,)."""
    cdf = w.cumsum(-1, dtype=torch.float64)
    total = cdf[:, -1]
    # right=True: the first index whose cdf exceeds the target; zero-weight tokens never win
    tokens = torch.searchsorted(cdf, (u.to(torch.float64) * total)[:, None], right=True)[:, 0]
    return tokens.clamp_max_(w.shape[-1] - 1), total


def draw(
    w: torch.Tensor,
    u: torch.Tensor,
    top_p: float,
    redraw: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """One token per row of ``w`` (N, V) (unnormalised probabilities) from the nucleus
    distribution, using the uniform ``u[i]`` (N,) and, for rows whose token falls outside
    the nucleus, ``redraw(idx)`` -> fresh uniforms for rows ``idx`` (a LongTensor)."""
    tokens, total = _inverse_cdf(w, u)
    if top_p >= 1.0 or w.shape[0] == 0:
        return tokens
    idx = torch.arange(w.shape[0], device=w.device)
    ok = kept(w, tokens, top_p, total)
    for _ in range(REJECTION_ROUNDS):
        idx = idx[~ok]
        if idx.numel() == 0:
            return tokens
        tokens[idx], total = _inverse_cdf(w[idx], redraw(idx).to(w.device))
        ok = kept(w[idx], tokens[idx], top_p, total)
    idx = idx[~ok]
    if idx.numel():  # rare (a small p over a flat distribution): the exact nucleus
        tokens[idx] = _inverse_cdf(nucleus(w[idx], top_p), redraw(idx).to(w.device))[0]
    return tokens


def confidence(w: torch.Tensor) -> torch.Tensor:
    """The largest probability of each row of ``w`` (N, V) from :func:`subs_weights`."""
    return 1.0 / w.sum(-1, dtype=torch.float64)
