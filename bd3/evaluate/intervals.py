"""Standard errors and 95 % intervals of NELBO estimates.

An evaluation scores N sequences in P passes; ``row_sums[p, r]`` is sequence r's estimate
in pass p (nats, summed over its ``counts[r]`` tokens) and the NELBO per token is
``row_sums.sum() / (P * counts.sum())``. Its uncertainty is Monte-Carlo noise: how far
another evaluation of the same sequences with other random masks could land.

- P >= 2: each sequence's spread across passes estimates its Monte-Carlo variance, so
  Var(NELBO) = sum_r s_r^2 / (P * T^2) with T = counts.sum() (N (P - 1) degrees of freedom).
- P = 1: the spread across sequences (of each residual ``row_sum - nelbo * count``), which
  also holds the sequences' own differences: an upper bound on the Monte-Carlo error
  (N - 1 degrees of freedom).
- A deterministic estimate (the exact enumeration, an AR run's NLL) has standard error 0.

Rows are treated as independent; the stratified draws within a batch are negatively
correlated, which only makes the interval conservative.
"""

from __future__ import annotations

import math

import numpy as np

Z_975 = 1.959963984540054
# Student t 97.5 % quantiles for 1..30 degrees of freedom; above, a Cornish-Fisher expansion.
_T_975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604, 2.1448,
          2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484,
          2.0452, 2.0423)


def t_quantile_975(dof: int) -> float:
    """The 97.5 % quantile of Student's t with ``dof`` degrees of freedom (inf: the normal's)."""
    if dof <= len(_T_975):
        return _T_975[max(dof, 1) - 1]
    z, v = Z_975, float(dof)
    return z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)


def nelbo_interval(row_sums: np.ndarray, counts: np.ndarray, deterministic: bool = False) -> dict:
    """``nelbo`` (per token), ``nelbo_se``, ``nelbo_ci95`` and ``ppl_ci95`` ([low, high])
    of the estimate in ``row_sums`` (P, N) over sequences of ``counts`` (N,) tokens."""
    row_sums = np.asarray(row_sums, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    passes, n = row_sums.shape
    total = counts.sum()
    nelbo = float(row_sums.sum() / (passes * total))
    if deterministic or n * passes < 2:
        se, dof = 0.0, math.inf
    elif passes >= 2:
        se = math.sqrt(row_sums.var(axis=0, ddof=1).sum() / passes) / float(total)
        dof = n * (passes - 1)
    else:
        residual = row_sums[0] - nelbo * counts
        se = math.sqrt(n / (n - 1) * (residual**2).sum()) / total
        dof = n - 1
    half = (Z_975 if dof == math.inf else t_quantile_975(int(dof))) * float(se)
    low, high = nelbo - half, nelbo + half
    return {"nelbo": nelbo, "nelbo_se": se, "nelbo_ci95": [low, high], "ppl_ci95": [math.exp(low), math.exp(high)]}


def mean_interval(values) -> dict:
    """The mean of independent draws ``values`` with its standard error and 95 % interval
    (Student t, n - 1 degrees of freedom); fewer than two draws give no interval."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if x.size < 2:
        return {"mean": mean, "se": None, "ci95": None}
    se = float(x.std(ddof=1) / math.sqrt(x.size))
    half = t_quantile_975(x.size - 1) * se
    return {"mean": mean, "se": se, "ci95": [mean - half, mean + half]}
