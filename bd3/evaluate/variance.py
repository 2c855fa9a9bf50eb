"""NELBO variance under clipped mask-rate intervals (paper §4.2, §5.2, and the
reference code kuleshov-group/bd3lms).

Two variances, reported side by side:
- ``var_paper`` (the paper's eq. 9-10, the default): the variance across batches of the
  batch NELBO estimate (the mean weighted token loss of a batch), mask rates in [beta, omega];
- ``var_block`` (the reference code's ``valid_var_*``): per batch, the unbiased variance of
  the per-(sequence, block) estimates (mean weighted token loss of each block), averaged
  over batches.
Both are measured for the two training estimators (:mod:`bd3.diffusion.estimators`): ``t``
(the paper's: t drawn from the interval, weight p'/p; keys ``var_paper``, ``var_block``,
``nelbo``) and ``k`` (masked counts from the interval, weight n/k; the same keys with
``_k``). Every interval and schedule sees the same batches and the same random numbers.
The NELBO columns are likelihood bounds only for the full interval [1e-3, 1].
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from bd3.config import DiffusionConfig
from bd3.diffusion.clip_search import clip_grid, variances
from bd3.diffusion.objective import diffusion_loss
from bd3.evaluate.perplexity import batches
from bd3.runtime import autocast


@torch.no_grad()
def nelbo_variance(
    model,
    rows: np.ndarray,
    cfg: DiffusionConfig,
    mask_id: int,
    intervals: list[tuple[float, float]] | None = None,
    *,
    schedules: list[str] | None = None,
    batch_size: int = 16,
    max_batches: int = 16,
    seed: int = 1,
    device: torch.device = torch.device("cpu"),
    precision: str = "fp32",
) -> list[dict]:
    """One row per (schedule, interval): mean NELBO, ``var_paper`` and ``var_block`` of each
    estimator. Defaults: the paper's grid of intervals (64) and the run's schedule."""
    was_training = model.training
    model.eval()
    data = [x0.to(device) for x0 in batches(rows, batch_size, max_batches) if len(x0) == batch_size]
    if len(data) < 2:
        raise ValueError("the variance needs at least two full batches")
    out = []
    for schedule in schedules or [cfg.schedule]:
        scfg = replace(cfg, schedule=schedule)
        for clip in intervals or clip_grid():
            row = {"schedule": scfg.schedule, "beta": float(clip[0]), "omega": float(clip[1]), "batches": len(data)}
            for estimator, suffix in (("t", ""), ("k", "_k")):
                generator = torch.Generator(device=device).manual_seed(seed)
                batch_nelbo, blocks = [], []
                for x0 in data:
                    with autocast(device, precision):
                        losses = diffusion_loss(model, x0, scfg, mask_id, clip=clip, weighting="elbo", estimator=estimator,
                                                generator=generator)
                    batch_nelbo.append(losses.mean.item())
                    blocks.append(losses.per_block(scfg.block_size).flatten().cpu().numpy())
                v = variances(batch_nelbo, blocks)
                row.update({f"nelbo{suffix}": float(np.mean(batch_nelbo)), f"var_paper{suffix}": v["paper"], f"var_block{suffix}": v["block"]})
            out.append(row)
    model.train(was_training)
    return out


def variance_key(kind: str, estimator: str) -> str:
    """The result key of a variance (``paper`` or ``block``) of a training estimator."""
    return f"var_{kind}" + ("_k" if estimator == "k" else "")


def lowest_variance(results: list[dict], kind: str, estimator: str) -> dict:
    """The result (one interval's row of :func:`nelbo_variance`) whose variance ``kind`` of the
    training ``estimator`` is lowest; ties: the first. The clip search's choice."""
    key = variance_key(kind, estimator)
    return min(results, key=lambda row: row[key])
