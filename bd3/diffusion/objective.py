"""The training and evaluation objectives, composed from the pure pieces.

``model`` is any backbone with ``hidden_states(tokens, positions=, attn_mask=, first=)`` and
``nll(h, c, targets, mask_id)`` (the DiT: the output layer and ``masked_nll`` fused); nothing
here imports it.

- ``bd3lm``: t per (sequence, block); one pass over the 2L input ``[x_t ; x_0]`` under the
  block-diffusion mask; the output layer runs only on the masked x_t positions.
- ``mdlm``: the same with one block of length L and no x_0 stream (full attention).
- ``ar``: causal next-token cross-entropy (the mask logit excluded, as the reference).
- ``sedd``: MDLM's noise and one stream, the model time-conditioned on sigma
  (``hidden_states(x_t, sigma=)`` and ``logits(h, c)``), the score-entropy loss
  (:mod:`bd3.diffusion.sedd`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bd3.config import DiffusionConfig
from bd3.diffusion.masks import block_diff_mask
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


def diffusion_loss(
    model,
    x0: torch.Tensor,
    cfg: DiffusionConfig,
    mask_id: int,
    *,
    clip: tuple[float, float] | None = None,
    resample: bool | None = None,
    weighting: str | None = None,
    generator: torch.Generator | None = None,
) -> Losses:
    """The (weighted) NELBO of a batch of clean sequences ``x0`` (B, L) under ``cfg``.

    ``clip``, ``resample`` and ``weighting`` default to the training settings in ``cfg``;
    evaluation passes ``clip=FULL_CLIP, resample=False, weighting="elbo"``.
    """
    if cfg.algo == "ar":
        return ar_loss(model, x0, mask_id)
    t_tok, xt = draw_noise(x0, cfg, mask_id, clip=cfg.clip if clip is None else clip,
                           resample=cfg.resample if resample is None else resample, generator=generator)
    return loss_given_noise(model, x0, xt, t_tok, cfg, mask_id, weighting=cfg.weighting if weighting is None else weighting)


def loss_given_noise(
    model, x0: torch.Tensor, xt: torch.Tensor | None, t_tok: torch.Tensor | None, cfg: DiffusionConfig, mask_id: int,
    *, weighting: str = "elbo",
) -> Losses:
    """The algorithm's loss of ``x0`` given its noise (``xt``, ``t_tok``; None for ``ar``)."""
    if cfg.algo == "ar":
        return ar_loss(model, x0, mask_id)
    loss = sedd_nelbo if cfg.algo == "sedd" else nelbo
    return loss(model, x0, xt, t_tok, cfg, mask_id, weighting=weighting)


def draw_noise(
    x0: torch.Tensor,
    cfg: DiffusionConfig,
    mask_id: int,
    *,
    clip: tuple[float, float],
    resample: bool,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """t per token (constant within each block) and the corrupted sequence x_t.

    ``clip`` bounds the mask rate (never below ``T_MIN``); t is drawn from the range that the
    schedule maps onto it."""
    B, L = x0.shape
    block_size = L if cfg.algo in ("mdlm", "sedd") else cfg.block_size
    schedule = get_schedule(cfg.schedule)
    t_range = schedule.t_range((max(clip[0], T_MIN), max(clip[1], T_MIN)))
    t = sample_t(B, L // block_size, t_range, generator=generator, antithetic=cfg.antithetic, device=x0.device)
    t_tok = t.repeat_interleave(block_size, dim=1)
    p_tok = schedule.mask_prob(t_tok.double()).float()
    if resample:
        xt = resample_corrupt(x0, p_tok, mask_id, block_size, clip, generator=generator, keep_first=cfg.ignore_bos)
    else:
        xt = corrupt(x0, p_tok, mask_id, generator=generator, keep_first=cfg.ignore_bos)
    return t_tok, xt


def denoiser_hidden(model, xt: torch.Tensor, x0: torch.Tensor, cfg: DiffusionConfig):
    """Hidden states of the x_t positions: one pass over ``[x_t ; x_0]`` under the block
    diffusion mask (rotary positions 0..L-1 for both halves), or x_t alone for MDLM."""
    if cfg.algo == "mdlm":
        return model.hidden_states(xt)
    L = x0.shape[1]
    positions = torch.arange(L, device=x0.device).repeat(2)
    mask = block_diff_mask(L, cfg.block_size, str(x0.device))
    return model.hidden_states(torch.cat([xt, x0], dim=1), positions=positions, attn_mask=mask, first=L)


def nelbo(
    model, x0: torch.Tensor, xt: torch.Tensor, t_tok: torch.Tensor, cfg: DiffusionConfig, mask_id: int,
    *, weighting: str = "elbo",
) -> Losses:
    """Weighted NLL of the masked tokens given x_t and the noise levels ``t_tok`` (B, L):
    the NELBO with ``weighting="elbo"``, a reweighted objective otherwise."""
    B, L = x0.shape
    h, c = denoiser_hidden(model, xt, x0, cfg)
    masked = xt == mask_id
    nll = model.nll(h[masked], c, x0[masked], mask_id)
    token_loss = torch.zeros(B, L, device=x0.device, dtype=nll.dtype)
    schedule, t = get_schedule(cfg.schedule), t_tok[masked]
    token_loss[masked] = token_weight(weighting, schedule.weight(t), schedule.mask_prob(t.double())) * nll
    return Losses(token_loss, B * (L - 1) if cfg.ignore_bos else B * L)


def sedd_nelbo(
    model, x0: torch.Tensor, xt: torch.Tensor, t_tok: torch.Tensor, cfg: DiffusionConfig, mask_id: int,
    *, weighting: str = "elbo",
) -> Losses:
    """SEDD's diffusion-weighted score entropy of the masked tokens (a bound on the NLL
    with ``weighting="elbo"``): one stream, the model conditioned on each sequence's total
    noise sigma = -log(1 - p) (t is one per sequence: block size = length)."""
    B, L = x0.shape
    schedule = get_schedule(cfg.schedule)
    h, c = model.hidden_states(xt, sigma=total_noise(schedule.mask_prob(t_tok[:, 0].double())).float())
    masked = xt == mask_id
    rows = masked.nonzero()[:, 0]
    logits = model.logits(h[masked], c[rows])
    t = t_tok[masked].double()
    w = token_weight(weighting, schedule.weight(t), schedule.mask_prob(t))
    token_loss = torch.zeros(B, L, device=x0.device, dtype=torch.float32)
    token_loss[masked] = sedd_token_loss(logits, x0[masked], w, mask_id)
    return Losses(token_loss, B * (L - 1) if cfg.ignore_bos else B * L)


def ar_loss(model, x0: torch.Tensor, mask_id: int) -> Losses:
    """Exact next-token NLL of positions 1..L-1 given their prefix (causal model)."""
    B, L = x0.shape
    h, c = model.hidden_states(x0[:, :-1])
    nll = model.nll(h.reshape(-1, h.shape[-1]), c, x0[:, 1:].reshape(-1), mask_id)
    token_loss = torch.cat([torch.zeros(B, 1, device=x0.device, dtype=nll.dtype), nll.view(B, L - 1)], dim=1)
    return Losses(token_loss, B * (L - 1))
