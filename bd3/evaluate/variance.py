"""NELBO variance under clipped noise intervals (paper §4.2, §5.2; reference §3.3-3.4).

Two variances, reported side by side:
- ``var_batch`` (the paper's eq. 9-10, the default): the variance across batches of the
  batch NELBO estimate (the mean weighted token loss of a batch), with t ~ U[beta, omega];
- ``var_block`` (the reference code's ``valid_var_*``): per batch, the unbiased variance of
  the per-(sequence, block) estimates (mean weighted token loss of each block), averaged
  over batches.
The NELBO column is a likelihood bound only for the full interval [1e-3, 1].
"""

from __future__ import annotations

import numpy as np
import torch

from bd3.config import FULL_CLIP, DiffusionConfig
from bd3.diffusion.objective import diffusion_loss
from bd3.evaluate.perplexity import batches
from bd3.runtime import autocast

DEFAULT_INTERVALS = (FULL_CLIP, (0.5, 1.0), (0.45, 0.95), (0.3, 0.8), (0.0, 0.5))


@torch.no_grad()
def nelbo_variance(
    model,
    rows: np.ndarray,
    cfg: DiffusionConfig,
    mask_id: int,
    intervals=DEFAULT_INTERVALS,
    *,
    batch_size: int = 16,
    max_batches: int = 32,
    seed: int = 1,
    device: torch.device = torch.device("cpu"),
    precision: str = "fp32",
) -> list[dict]:
    """One row per interval: mean NELBO, ``var_batch`` and ``var_block`` (see module doc)."""
    model.eval()
    out = []
    for clip in intervals:
        generator = torch.Generator(device=device).manual_seed(seed)
        batch_nelbo, block_var = [], []
        for x0 in batches(rows, batch_size, max_batches):
            if len(x0) < batch_size:
                break  # equal-sized batches only, so the batch estimates are comparable
            with autocast(device, precision):
                losses = diffusion_loss(model, x0.to(device), cfg, mask_id, clip=clip, generator=generator)
            batch_nelbo.append(losses.mean.item())
            block_var.append(losses.per_block(cfg.block_size).flatten().var().item())
        if len(batch_nelbo) < 2:
            raise ValueError("need at least two full batches")
        out.append({
            "beta": float(clip[0]), "omega": float(clip[1]), "nelbo": float(np.mean(batch_nelbo)),
            "var_batch": float(np.var(batch_nelbo, ddof=1)), "var_block": float(np.mean(block_var)),
            "batches": len(batch_nelbo),
        })
    return out
