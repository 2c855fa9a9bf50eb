"""The data-driven clip search (paper §5.2; the reference code kuleshov-group/bd3lms does the same): score a grid of mask-rate
intervals [beta, omega] by the variance of the NELBO estimate and pick the minimiser.

Two variances (see bd3.evaluate.variance): ``paper`` = across batches of the batch NELBO
(eq. 9-10), ``block`` = the reference code's mean within-batch variance of per-block
estimates. The minimiser is picked by bd3.evaluate.variance.lowest_variance.
"""

from __future__ import annotations

import numpy as np

from bd3.config import FULL_CLIP


def clip_grid(widths=(0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9), step: float = 0.05) -> list[tuple[float, float]]:
    """[1e-3, 1] plus every interval of each width slid from 0 in steps of ``step`` while it
    fits in [0, 1] (a lower bound of 0 becomes 1e-3). Exact decimals, no float drift."""
    grid = [FULL_CLIP]
    for w in widths:
        n = int(round((1 - w) / step))
        for i in range(n + 1):
            lo, hi = round(i * step, 10), round(i * step + w, 10)
            interval = (max(lo, FULL_CLIP[0]), hi)
            if interval not in grid:
                grid.append(interval)
    return grid


def variances(batch_nelbos: list[float], block_estimates: list[np.ndarray]) -> dict[str, float]:
    """Both variances from per-batch NELBOs and per-batch arrays of per-block estimates."""
    return {
        "paper": float(np.var(batch_nelbos, ddof=1)),
        "block": float(np.mean([np.var(b, ddof=1) for b in block_estimates])),
    }
