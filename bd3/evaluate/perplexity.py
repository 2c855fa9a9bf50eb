"""Test perplexity: the NELBO bound (exact NLL for AR) averaged per token over a split.

Protocol (design.md): t ~ U[1e-3, 1], no clipping, no resampling, one stratified t per
(sequence, block), position 0 excluded when it is a given BOS; ``passes`` Monte-Carlo
passes are averaged and their spread reported.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bd3.config import FULL_CLIP, DiffusionConfig
from bd3.diffusion.objective import diffusion_loss
from bd3.runtime import autocast


def batches(rows: np.ndarray, batch_size: int, max_batches: int | None = None):
    """Consecutive batches of rows as int64 tensors (the last one may be smaller)."""
    n = len(rows) if max_batches is None else min(len(rows), max_batches * batch_size)
    for start in range(0, n, batch_size):
        yield torch.from_numpy(np.asarray(rows[start : min(start + batch_size, n)], dtype=np.int64))


@torch.no_grad()
def nelbo_perplexity(
    model,
    rows: np.ndarray,
    cfg: DiffusionConfig,
    mask_id: int,
    *,
    batch_size: int = 16,
    max_batches: int | None = None,
    passes: int = 1,
    seed: int = 1,
    device: torch.device = torch.device("cpu"),
    precision: str = "fp32",
) -> dict:
    """Per-token NELBO over ``rows`` and its perplexity, as a JSON-ready dict."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    nelbos = []
    tokens = 0
    for _ in range(passes):
        total, count = 0.0, 0
        for x0 in batches(rows, batch_size, max_batches):
            with autocast(device, precision):
                losses = diffusion_loss(model, x0.to(device), cfg, mask_id, clip=FULL_CLIP, resample=False, weighting="elbo",
                                        generator=generator)
            total += losses.total.item()
            count += losses.count
        nelbos.append(total / count)
        tokens = count
    model.train(was_training)
    mean = float(np.mean(nelbos))
    return {
        "nelbo": mean,
        "ppl": math.exp(mean),
        "ppl_passes": [math.exp(v) for v in nelbos],
        "nelbo_std": float(np.std(nelbos, ddof=1)) if passes > 1 else 0.0,
        "tokens": tokens,
        "passes": passes,
        "bound": cfg.algo != "ar",
    }
