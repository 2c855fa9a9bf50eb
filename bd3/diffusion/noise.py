"""Drawing noise levels t per (sequence, block) and corrupting tokens with the mask."""

from __future__ import annotations

import torch

# The lowest mask rate ever drawn: the NELBO weight diverges at 0 (MDLM convention).
T_MIN = 1e-3


def sample_t(
    batch: int,
    n_blocks: int,
    clip: tuple[float, float],
    *,
    generator: torch.Generator | None = None,
    antithetic: bool = True,
    shuffle: bool = False,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """t ~ U[lo, hi] per (sequence, block), shape (batch, n_blocks), float32.

    With ``antithetic`` the B * n_blocks draws are stratified: draw k lies in the k-th of
    B * n_blocks equal strata of [0, 1) before rescaling (the paper's low-discrepancy
    sampler, Suppl. C.4). That fixed order is harmless in training, whose rows are shuffled,
    but over fixed rows it would give row 0 the lowest stratum in every pass; ``shuffle``
    gives the strata to the blocks in a random order instead, so each block's t is uniform
    on [lo, hi] while the batch's draws stay stratified (evaluation).
    """
    beta, omega = clip
    u = torch.rand(batch, n_blocks, generator=generator, device=device)
    if antithetic:
        n = batch * n_blocks
        order = torch.randperm(n, generator=generator, device=device) if shuffle else torch.arange(n, device=device)
        offsets = order.to(u.dtype).view(batch, n_blocks)
        u = (u / n + offsets / n) % 1.0
    return u * (omega - beta) + beta


def corrupt(
    x0: torch.Tensor,
    mask_prob: torch.Tensor,
    mask_id: int,
    *,
    generator: torch.Generator | None = None,
    keep_first: bool = True,
) -> torch.Tensor:
    """Mask each token independently with its probability ``mask_prob`` (same shape as x0).

    With ``keep_first`` position 0 (a given BOS) is never masked.
    """
    move = torch.rand(x0.shape, generator=generator, device=x0.device) < mask_prob
    if keep_first:
        move[:, 0] = False
    return torch.where(move, torch.full_like(x0, mask_id), x0)


def resample_corrupt(
    x0: torch.Tensor,
    mask_prob: torch.Tensor,
    mask_id: int,
    block_size: int,
    clip: tuple[float, float],
    *,
    generator: torch.Generator | None = None,
    keep_first: bool = True,
    max_rounds: int = 100,
) -> torch.Tensor:
    """Corrupt, then redraw the mask of every block whose realised mask rate lies outside
    ``clip`` until all do (the reference's ``training.resample``), at most ``max_rounds``
    rounds; blocks still outside after that keep their last draw.
    """
    xt = corrupt(x0, mask_prob, mask_id, generator=generator, keep_first=keep_first)
    beta, omega = clip
    B, L = x0.shape
    for _ in range(max_rounds):
        rate = (xt == mask_id).view(B, L // block_size, block_size).float().mean(-1)
        bad = (rate < beta) | (rate > omega)
        if not bad.any():
            break
        redo = corrupt(x0, mask_prob, mask_id, generator=generator, keep_first=keep_first)
        bad_tok = bad.repeat_interleave(block_size, dim=1)
        xt = torch.where(bad_tok, redo, xt)
    return xt
