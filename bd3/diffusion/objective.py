"""The training and evaluation objectives, composed from the pure pieces.

``model`` is the DiT's forward: ``model(tokens, positions=, attn_mask=, select=, sigma=,
targets=, mask_id=)`` (logits or fused NLLs at the selected positions); nothing here
imports it.

- ``bd3lm``: t per (sequence, block); one pass over the 2L input ``[x_t ; x_0]`` under the
  block-diffusion mask; the output layer runs only on the masked x_t positions.
- ``mdlm``: the same with one block of length L and no x_0 stream (full attention).
- ``ar``: causal next-token cross-entropy (the mask logit excluded, as the reference).
- Noise (:class:`Noise`: x_t, each token's NELBO weight and its block's mask rate) comes from
  one of the estimators of :mod:`bd3.diffusion.estimators`: ``t`` (t per block), ``k`` (a
  masked count per block) or ``exact`` (every mask pattern, :func:`exact_nelbo`).
- ``sedd``: MDLM's noise and one stream, the model time-conditioned on sigma
  (``model(x_t, sigma=, select=)``), the score-entropy loss
  (:mod:`bd3.diffusion.sedd`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bd3.config import FULL_CLIP, DiffusionConfig
from bd3.diffusion.estimators import draw_counts, exact_patterns, maskable_positions
from bd3.model.mask import Mask
from bd3.diffusion.noise import T_MIN, corrupt, resample_corrupt, sample_t
from bd3.diffusion.schedules import get_schedule
from bd3.diffusion.sedd import sedd_token_loss, total_noise
from bd3.diffusion.weighting import token_weight


@dataclass
class Losses:
    """Weighted negative log-likelihoods. ``total / count`` is the per-token NELBO."""

    token_loss: torch.Tensor  # (B, L) weighted NLL per token; 0 where unmasked
    count: int  # tokens counted in the average (position 0 excluded with ignore_bos)

    @property
    def total(self) -> torch.Tensor:
        return self.token_loss.sum()

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    def per_block(self, block_size: int) -> torch.Tensor:
        """(B, n_blocks) mean weighted token loss per block (the reference's clip-search unit)."""
        B, L = self.token_loss.shape
        return self.token_loss.view(B, L // block_size, block_size).mean(-1)


@dataclass
class Noise:
    """A batch's noise: which tokens are masked and what each masked token's NLL weighs."""

    xt: torch.Tensor  # (B, L) x0 with the masked positions set to the mask id
    weight: torch.Tensor  # (B, L) float64 NELBO weight of a token if it is masked
    rate: torch.Tensor  # (B, L) float64 mask rate of the token's block (weightings; SEDD's sigma)

    @classmethod
    def masking(cls, x0: torch.Tensor, masked: torch.Tensor, mask_id: int, weight: torch.Tensor, rate: torch.Tensor) -> Noise:
        return cls(torch.where(masked, torch.full_like(x0, mask_id), x0), weight, rate)

    def rows(self, index) -> Noise:
        return Noise(self.xt[index], self.weight[index], self.rate[index])


def diffusion_loss(
    model,
    x0: torch.Tensor,
    cfg: DiffusionConfig,
    mask_id: int,
    *,
    clip: tuple[float, float] | None = None,
    resample: bool | None = None,
    weighting: str | None = None,
    estimator: str | None = None,
    generator: torch.Generator | None = None,
) -> Losses:
    """The (weighted) NELBO of a batch of clean sequences ``x0`` (B, L) under ``cfg``.

    ``clip``, ``resample``, ``weighting`` and ``estimator`` (``t`` or ``k``) default to the
    training settings in ``cfg``; evaluation passes ``clip=FULL_CLIP, resample=False,
    weighting="elbo"``.
    """
    if cfg.algo == "ar":
        return ar_loss(model, x0, mask_id)
    noise = draw_noise(x0, cfg, mask_id, clip=cfg.clip if clip is None else clip,
                       resample=cfg.resample if resample is None else resample,
                       estimator=cfg.estimator if estimator is None else estimator, generator=generator)
    return loss_given_noise(model, x0, noise, cfg, mask_id, weighting=cfg.weighting if weighting is None else weighting)


def loss_given_noise(model, x0: torch.Tensor, noise: Noise | None, cfg: DiffusionConfig, mask_id: int, *, weighting: str = "elbo") -> Losses:
    """The algorithm's loss of ``x0`` given its noise (None for ``ar``)."""
    if cfg.algo == "ar":
        return ar_loss(model, x0, mask_id)
    loss = sedd_nelbo if cfg.algo == "sedd" else nelbo
    return loss(model, x0, noise, cfg, mask_id, weighting=weighting)


def block_size_of(cfg: DiffusionConfig, length: int) -> int:
    """The diffusion block: the whole length for MDLM and SEDD."""
    return length if cfg.algo in ("mdlm", "sedd") else cfg.block_size


def draw_noise(
    x0: torch.Tensor,
    cfg: DiffusionConfig,
    mask_id: int,
    *,
    clip: tuple[float, float],
    resample: bool,
    estimator: str = "t",
    maskable: torch.Tensor | None = None,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> Noise:
    """The noise of estimator ``t`` (t per block, each token masked with probability p(t),
    weight p'(t)/p(t)) or ``k`` (a uniform count k per block, weight m/k; see
    :mod:`bd3.diffusion.estimators`), masking only ``maskable`` positions (default: all but
    a given BOS).

    ``clip`` bounds the mask rate (never below ``T_MIN`` for ``t``); t is drawn from the range
    that the schedule maps onto it. ``resample`` applies to ``t`` (a count is exact).
    ``shuffle``: the stratified draws go to the blocks in a random order (evaluation over
    fixed rows; see :func:`~bd3.diffusion.noise.sample_t`)."""
    B, L = x0.shape
    block_size = block_size_of(cfg, L)
    if estimator == "k":
        if maskable is None:
            maskable = maskable_positions((B, L), cfg.ignore_bos, x0.device)
        masked, weight, rate = draw_counts(maskable, block_size, clip, generator=generator, antithetic=cfg.antithetic, shuffle=shuffle)
        return Noise.masking(x0, masked, mask_id, weight, rate)
    schedule = get_schedule(cfg.schedule)
    t_range = schedule.t_range((max(clip[0], T_MIN), max(clip[1], T_MIN)))
    t = sample_t(B, L // block_size, t_range, generator=generator, antithetic=cfg.antithetic, shuffle=shuffle, device=x0.device)
    t_tok = t.repeat_interleave(block_size, dim=1).double()
    rate = schedule.mask_prob(t_tok)
    if resample:
        xt = resample_corrupt(x0, rate.float(), mask_id, block_size, clip, generator=generator, keep_first=cfg.ignore_bos)
    else:
        xt = corrupt(x0, rate.float(), mask_id, generator=generator, keep_first=cfg.ignore_bos)
    if maskable is not None:
        xt = torch.where(maskable, xt, x0)
    return Noise(xt, schedule.weight(t_tok), rate)


def denoiser_input(xt: torch.Tensor, x0: torch.Tensor, cfg: DiffusionConfig) -> tuple[torch.Tensor, dict]:
    """The denoiser's input and the forward's keywords: ``[x_t ; x_0]`` under the block
    diffusion mask (rotary positions 0..L-1 for both halves), or x_t alone for MDLM; the
    x_t positions are the first L."""
    if cfg.algo == "mdlm":
        return xt, {}
    L = x0.shape[1]
    positions = torch.arange(L, device=x0.device).repeat(2)
    return torch.cat([xt, x0], dim=1), dict(positions=positions, attn_mask=Mask.block_diff(L, cfg.block_size))


def xt_logits(model, xt: torch.Tensor, x0: torch.Tensor, cfg: DiffusionConfig) -> torch.Tensor:
    """(B, L, V) the denoiser's logits at the x_t positions (the exported modeling file's
    output, bd3.runs.hf)."""
    tokens, kw = denoiser_input(xt, x0, cfg)
    B, L = xt.shape
    every = torch.ones(B, L, dtype=torch.bool, device=xt.device)
    return model(tokens, select=every, **kw).view(B, L, -1)


def noised_positions(x0: torch.Tensor, noise: Noise, mask_id: int) -> torch.Tensor:
    """(B, L) the tokens the noise masked. A mask token already in ``x0`` stands for a token
    that is unknown throughout (the rest of a block after a scored continuation): it is
    context, never a target."""
    return (noise.xt == mask_id) & (x0 != mask_id)


def nelbo(model, x0: torch.Tensor, noise: Noise, cfg: DiffusionConfig, mask_id: int, *, weighting: str = "elbo") -> Losses:
    """Weighted NLL of the masked tokens given the noise: the NELBO with
    ``weighting="elbo"``, a reweighted objective otherwise."""
    B, L = x0.shape
    tokens, kw = denoiser_input(noise.xt, x0, cfg)
    masked = noised_positions(x0, noise, mask_id)
    nll = model(tokens, select=masked, targets=x0[masked], mask_id=mask_id, **kw)
    token_loss = torch.zeros(B, L, device=x0.device, dtype=nll.dtype)
    token_loss[masked] = token_weight(weighting, noise.weight[masked].float(), noise.rate[masked]) * nll
    return Losses(token_loss, B * (L - 1) if cfg.ignore_bos else B * L)


def sedd_nelbo(model, x0: torch.Tensor, noise: Noise, cfg: DiffusionConfig, mask_id: int, *, weighting: str = "elbo") -> Losses:
    """SEDD's diffusion-weighted score entropy of the masked tokens (a bound on the NLL
    with ``weighting="elbo"``): one stream, the model conditioned on each sequence's total
    noise sigma = -log(1 - p) (t is one per sequence: block size = length)."""
    B, L = x0.shape
    masked = noised_positions(x0, noise, mask_id)
    logits = model(noise.xt, sigma=total_noise(noise.rate[:, 0]).float(), select=masked)
    w = token_weight(weighting, noise.weight[masked], noise.rate[masked])
    token_loss = torch.zeros(B, L, device=x0.device, dtype=torch.float32)
    token_loss[masked] = sedd_token_loss(logits, x0[masked], w, mask_id)
    return Losses(token_loss, B * (L - 1) if cfg.ignore_bos else B * L)


def row_nelbo(
    model,
    x0: torch.Tensor,
    cfg: DiffusionConfig,
    mask_id: int,
    estimator: str,
    *,
    maskable: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B,) float64: each row's NELBO in nats (summed over its tokens) under ``estimator``
    (exact, k or t; see :mod:`bd3.diffusion.estimators`), counting only the ``maskable``
    positions (default: all but a given BOS); the other positions stay clean context.
    AR runs: the exact next-token NLL of the maskable positions."""
    if maskable is None:
        maskable = scored_positions(x0.shape, cfg, x0.device)
    if cfg.algo == "ar":
        return (ar_loss(model, x0, mask_id).token_loss.double() * maskable).sum(1)
    if estimator == "exact":
        return exact_nelbo(model, x0, cfg, mask_id, maskable)[0]
    noise = draw_noise(x0, cfg, mask_id, clip=FULL_CLIP, resample=False, estimator=estimator, maskable=maskable, shuffle=True,
                       generator=generator)
    return loss_given_noise(model, x0, noise, cfg, mask_id).token_loss.double().sum(1)


def scored_positions(shape: tuple[int, int], cfg: DiffusionConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, L) True at the positions a likelihood counts: all but a given BOS (AR: all but the
    first token, which has no prefix)."""
    return maskable_positions(shape, cfg.ignore_bos or cfg.algo == "ar", device)


def exact_nelbo(
    model, x0: torch.Tensor, cfg: DiffusionConfig, mask_id: int, maskable: torch.Tensor, t_mins: tuple[float, ...] = (0.0,),
) -> list[torch.Tensor]:
    """Each row's NELBO (B,) float64 by enumerating every mask pattern of a block, for mask
    rates in [t_min, 1] per ``t_min`` (0: the bound; 1e-3: the reference's interval)."""
    totals = [torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device) for _ in t_mins]
    for masked, weights in exact_patterns(maskable, block_size_of(cfg, x0.shape[1]), t_mins):
        noise = Noise.masking(x0, masked, mask_id, masked.double(), torch.zeros_like(weights[0]))  # weight 1: the plain NLL
        nll = nelbo(model, x0, noise, cfg, mask_id).token_loss.double()
        for total, weight in zip(totals, weights):
            total += (weight * nll).sum(1)
    return totals


def ar_loss(model, x0: torch.Tensor, mask_id: int) -> Losses:
    """Exact next-token NLL of positions 1..L-1 given their prefix (causal model)."""
    B, L = x0.shape
    nll = model(x0[:, :-1], targets=x0[:, 1:], mask_id=mask_id)
    token_loss = torch.cat([torch.zeros(B, 1, device=x0.device, dtype=nll.dtype), nll], dim=1)
    return Losses(token_loss, B * (L - 1))
