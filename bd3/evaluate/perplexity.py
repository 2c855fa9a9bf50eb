"""Test perplexity: the NELBO bound (exact NLL for AR) averaged per token over a split,
with its standard error and 95 % interval (:mod:`bd3.evaluate.intervals`).

Estimators (:mod:`bd3.diffusion.estimators`): ``exact`` (every mask pattern of a block:
deterministic, block sizes up to 8), ``k`` (the masked count stratified per block; the
default for BD3-LM and MDLM) and ``t`` (the reference's protocol: t ~ U[1e-3, 1], no
clipping, no resampling, one stratified t per (sequence, block)). Position 0 is excluded
when it is a given BOS. ``passes`` Monte-Carlo passes over the rows are averaged; with
``passes="auto"`` passes are added until the 95 % interval of the NELBO is at most
``ci_width`` nats wide, or ``max_passes`` are done.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from bd3.config import DiffusionConfig
from bd3.diffusion.noise import T_MIN
from bd3.diffusion.objective import exact_nelbo, row_nelbo, scored_positions
from bd3.evaluate.intervals import nelbo_interval
from bd3.runtime import autocast

AUTO_MIN_PASSES = 2


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
    estimator: str = "t",
    batch_size: int = 16,
    max_batches: int | None = None,
    passes: int | str = 1,
    ci_width: float | None = None,
    max_passes: int | None = None,
    seed: int = 1,
    device: torch.device = torch.device("cpu"),
    precision: str = "fp32",
    on_pass: Callable[[int, dict], None] | None = None,
) -> dict:
    """Per-token NELBO over ``rows`` and its perplexity, with their uncertainty, as a
    JSON-ready dict. ``estimator`` is resolved by the caller
    (:func:`bd3.diffusion.estimators.resolve_estimator`); ``on_pass(done, stats)`` is
    called after each pass."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    deterministic = estimator == "exact"
    auto = passes == "auto"
    if auto and (ci_width is None or max_passes is None):
        raise ValueError("passes='auto' needs ci_width and max_passes")
    limit = 1 if deterministic else (max_passes if auto else int(passes))
    enumerate_masks = deterministic and cfg.algo != "ar"
    sums, counts, reference = [], None, 0.0
    while len(sums) < limit:
        row_sums, row_counts = [], []
        for x0 in batches(rows, batch_size, max_batches):
            x0 = x0.to(device)
            scored = scored_positions(x0.shape, cfg, device)
            with autocast(device, precision):
                if enumerate_masks:  # the bound and the reference's interval [1e-3, 1] from the same passes
                    bound, ref = exact_nelbo(model, x0, cfg, mask_id, scored, (0.0, T_MIN))
                    reference += ref.sum().item()
                else:
                    bound = row_nelbo(model, x0, cfg, mask_id, estimator, generator=generator)
            row_sums.append(bound.cpu())
            row_counts.append(scored.sum(1).cpu())
        sums.append(torch.cat(row_sums).numpy())
        counts = torch.cat(row_counts).numpy()
        stats = nelbo_interval(np.stack(sums), counts, deterministic)
        if on_pass is not None:
            on_pass(len(sums), stats)
        width = stats["nelbo_ci95"][1] - stats["nelbo_ci95"][0]
        if auto and len(sums) >= AUTO_MIN_PASSES and width <= ci_width:
            break
    model.train(was_training)
    pass_nelbos = [float(s.sum() / counts.sum()) for s in sums]
    extra = {"nelbo_reference_interval": float(reference / counts.sum())} if enumerate_masks else {}
    return {
        **stats,
        **extra,
        "ppl": math.exp(stats["nelbo"]),
        "ppl_passes": [math.exp(v) for v in pass_nelbos],
        "estimator": estimator,
        "passes": len(sums),
        "rows": int(len(counts)),
        "tokens": int(counts.sum()),
        "bound": cfg.algo != "ar",
    }
