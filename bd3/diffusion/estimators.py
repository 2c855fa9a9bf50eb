"""Which tokens to mask, and with what weight: the NELBO estimators.

bd3's BD3-LM and MDLM denoisers are not time-conditioned, so the model sees only which
tokens are masked. For a block with m maskable tokens (its context clean), the
continuous-time bound regroups by the number k of masked tokens:

    NELBO(block) = sum_{k=1..m} E_{|M| = k} [ (1/k) sum_{i in M} -log p(x_i | x_{not M}, context) ]

because C(m, k) * int_0^1 u^(k-1) (1 - u)^(m-k) du = 1/k for the mask rate u = p(t): the
same for every schedule. Three estimators of it:

- ``exact``: every non-empty subset M of the maskable positions, token weight
  1 / (k * C(m, k)); one batched pass per pattern of the block (2^n - 1 for block size n)
  covers every block of every row. Deterministic.
- ``k``: k drawn per block (stratified over the batch), M uniform among the subsets of size
  k, token weight m / k: unbiased, weights at most m.
- ``t``: the reference's, t ~ U over the mask rates [1e-3, 1], each token masked with
  probability p(t), token weight p'(t) / p(t) (1000 at the smallest rate): see
  :func:`bd3.diffusion.objective.draw_noise`.

Restricted to mask rates u >= t_min (the reference's U[1e-3, 1]), the weight of subsets of
size k becomes (1/k) P(Binomial(m, t_min) < k): :func:`exact_weight` gives both, so the
slice u < 1e-3 that the reference leaves out is measured exactly.

A clip interval [beta, omega] of mask rates maps to the masked counts
k in [ceil(beta m), floor(omega m)] (at least 1, at most m).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from bd3.choices import ESTIMATORS
from bd3.diffusion.noise import sample_t
from bd3.errors import Bd3Error

EXACT_MAX_BLOCK = 8  # 2^8 - 1 = 255 passes


def maskable_positions(shape: tuple[int, int], ignore_bos: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, L) True where a token may be masked: everywhere but a given BOS at position 0."""
    maskable = torch.ones(shape, dtype=torch.bool, device=device)
    if ignore_bos:
        maskable[:, 0] = False
    return maskable


def binomial_below(m: int, k: int, p: float) -> float:
    """P(Binomial(m, p) < k)."""
    return sum(math.comb(m, j) * p**j * (1 - p) ** (m - j) for j in range(min(k, m + 1)))


def exact_weight(k: int, m: int, t_min: float = 0.0) -> float:
    """The NELBO weight of each token of one masked subset of size k among m maskable
    tokens: 1 / (k C(m, k)) for mask rates in [0, 1], times P(Bin(m, t_min) < k) for
    rates in [t_min, 1]."""
    if not 1 <= k <= m:
        return 0.0
    return binomial_below(m, k, t_min) / (k * math.comb(m, k))


@lru_cache(maxsize=8)
def subsets(n: int) -> torch.Tensor:
    """(2^n - 1, n) bool: every non-empty subset of n positions, in binary order."""
    codes = torch.arange(1, 2**n)
    return (codes[:, None] >> torch.arange(n)) & 1 == 1


def exact_patterns(maskable: torch.Tensor, block_size: int, t_mins: tuple[float, ...] = (0.0,)):
    """Yield ``(masked, weights)`` for each subset pattern of a block: ``masked`` (B, L) bool
    applies the pattern to every block whose maskable positions contain it (other blocks
    stay clean), ``weights`` is one (B, L) float64 tensor of token weights per ``t_min``.
    Summing weight * NLL over the patterns gives the exact NELBO of every block."""
    B, L = maskable.shape
    nb, n = L // block_size, block_size
    blocks = maskable.view(B, nb, n)
    m = blocks.sum(-1)  # maskable tokens per block
    for pattern in subsets(n).to(maskable.device):
        fits = ~(pattern & ~blocks).any(-1)  # (B, nb): pattern inside the maskable positions
        if not fits.any():
            continue
        masked = (pattern & fits[..., None]).view(B, L)
        k = int(pattern.sum())
        weights = []
        for t_min in t_mins:
            table = torch.tensor([exact_weight(k, j, t_min) for j in range(n + 1)], dtype=torch.float64, device=maskable.device)
            weights.append(table[m].repeat_interleave(n, dim=1) * masked)
        yield masked, weights


def count_range(m: torch.Tensor, clip: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked counts [lo, hi] per block that a mask-rate interval allows (1 <= lo <= hi <= m
    where m >= 1)."""
    beta, omega = clip
    mf = m.double()
    lo = torch.ceil(beta * mf - 1e-9).clamp(min=1)
    hi = torch.floor(omega * mf + 1e-9)
    lo = torch.minimum(lo, mf.clamp(min=1))
    hi = torch.maximum(hi, lo).minimum(mf.clamp(min=1))
    return lo.long(), hi.long()


def draw_counts(
    maskable: torch.Tensor,
    block_size: int,
    clip: tuple[float, float] = (0.0, 1.0),
    *,
    generator: torch.Generator | None = None,
    antithetic: bool = True,
    shuffle: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` estimator's noise: ``(masked, weight, rate)``, each (B, L).

    Per block, k uniform on the counts ``clip`` allows (stratified over the B * n_blocks
    blocks with ``antithetic``, the strata given in a random order with ``shuffle``; see
    :func:`~bd3.diffusion.noise.sample_t`), then a uniform subset of k maskable positions. ``weight`` is
    m / k on every token of the block (float64), ``rate`` the block's mask rate k / m
    (float64; 0 where a block has nothing to mask)."""
    B, L = maskable.shape
    nb, n = L // block_size, block_size
    blocks = maskable.view(B, nb, n)
    m = blocks.sum(-1)
    lo, hi = count_range(m, clip)
    u = sample_t(B, nb, (0.0, 1.0), generator=generator, antithetic=antithetic, shuffle=shuffle, device=maskable.device).double()
    k = torch.minimum(lo + torch.floor(u * (hi - lo + 1)).long(), hi) * (m > 0)
    scores = torch.rand(B, nb, n, generator=generator, device=maskable.device).masked_fill(~blocks, 2.0)
    rank = scores.argsort(-1).argsort(-1)
    masked = (rank < k[..., None]) & blocks
    safe_k = k.clamp(min=1).double()
    weight = (m.double() / safe_k) * (k > 0)
    rate = k.double() / m.clamp(min=1).double()
    return masked.view(B, L), weight.repeat_interleave(n, dim=1), rate.repeat_interleave(n, dim=1)


def resolve_estimator(algo: str, block_size: int, requested: str | None) -> str:
    """The evaluation estimator of a run: ``requested``, checked, or the default (``k`` for
    BD3-LM and MDLM, ``t`` for SEDD, ``exact`` for AR, whose likelihood is exact, and for
    BD3-LM at block size 1, whose one mask pattern per block makes it one pass, like k)."""
    if requested is not None and requested not in ESTIMATORS:
        raise Bd3Error(f"Unknown estimator {requested!r}; choose one of {', '.join(ESTIMATORS)}.")
    if algo == "ar":
        if requested not in (None, "exact"):
            raise Bd3Error("An AR run's likelihood is exact (the next-token NLL); --estimator does not apply to it.")
        return "exact"
    if algo == "sedd":
        if requested not in (None, "t"):
            raise Bd3Error("SEDD is time-conditioned, so the exact and k estimators (which regroup the bound by the number "
                           "of masked tokens) do not apply to it; use --estimator t.")
        return "t"
    if requested == "exact" and block_size > EXACT_MAX_BLOCK:
        raise Bd3Error(f"--estimator exact enumerates 2^{block_size} - 1 mask patterns at block size {block_size}; it is practical "
                       f"up to block size {EXACT_MAX_BLOCK}. Use --estimator k (unbiased, low variance) instead.")
    return requested or ("exact" if block_size == 1 else "k")
