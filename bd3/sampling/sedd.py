"""SEDD's analytic sampler (Tweedie tau-leaping on the absorbing graph) over the whole length.

The reference's ``_analytic_sampler``: the whole context is denoised together, T steps on
the grid t_i = 1 - i/T, s = t_i - 1/T, each one model call on every position with the
time input sigma_t (:func:`bd3.diffusion.sedd.total_noise`). At a step a masked position
unmasks with probability ``R (1 - p_s / p_t)`` (:func:`bd3.diffusion.sedd.unmask_prob`,
R the model's total score relative to the true one) and takes a token drawn from the
model's ratios normalised; given positions (BOS, prompt) and unmasked ones are copied. The
last step (s = 0) unmasks every position left, as the reference's final denoising step.
Top-p and temperature shape only the token's distribution, not the unmasking rate.

Beyond the model length a window of ``length`` tokens slides by half of it, as MDLM's
semi-autoregressive stride: each window keeps the previous half as clean context and
denoises the new half. Rows keep their own random numbers (:mod:`bd3.sampling.rng`) and
stop rules: ``eos`` cuts a sample after its first generated end-of-text token, ``entropy``
ends it after the window in which its last 256 tokens fell below 4 nats. Rows may have
prompts of their own and their own ``max_tokens``; each then runs its own grid (T steps
over the positions it generates, its own time input) and draws only at its own steps, so
its tokens are those it gets alone.

The score model is a :class:`~bd3.sampling.denoiser.Denoiser` called with the time input
``sigma`` (B,): ``ModelDenoiser(model, attention="full", kv_cache=False)`` for a DiT.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bd3.diffusion.schedules import get_schedule
from bd3.diffusion.sedd import log_total_score, total_noise, unmask_prob
from bd3.sampling.denoiser import Denoiser
from bd3.sampling.rng import RowRNG
from bd3.sampling.rows import Rows, run_rows
from bd3.sampling.rules import draw, subs_weights
from bd3.sampling.types import Decoding, Sample


def sample_sedd(den: Denoiser, *, schedule: str = "linear", **options) -> list[Sample]:
    """Samples window by window from a time-conditioned denoiser. ``decoding.steps`` is T
    per window (default: the positions it generates); ``schedule`` spaces the mask rates of
    the grid (the run's). ``on_block`` is called after every window. ``options`` as
    :func:`bd3.sampling.block.sample_blocks`'."""
    rows = Rows(**options)
    dec, length, mask_id = rows.decoding, rows.length, rows.mask_id
    stride = max(length // 2, 1)
    spans = [(0, length)] + [(s, s + stride) for s in range(length, rows.width, stride)]
    sched = get_schedule(schedule)

    def step(s: int, e: int) -> bool:
        # the window: the previous half (clean context) and the new span; a prompt is shorter
        # than the first window, and a row ending before a window has left the batch
        w0 = max(e - length, 0)
        denoise(den, rows.seq[:, w0:e], rows.generated(s, e, first=w0), rows.rng, rows.nfe, dec, sched, mask_id=mask_id)
        return True

    return run_rows(rows, spans, step, den.select)


def denoise(den: Denoiser, x: torch.Tensor, todo: torch.Tensor, rng: RowRNG, nfe: torch.Tensor, dec: Decoding, schedule, *,
            mask_id: int) -> None:
    """Unmask the ``todo`` positions of ``x`` (B, W) in place: T analytic steps from t = 1
    to 0 (T = ``dec.steps``, default the positions a row generates: then per row, each row
    on its own grid)."""
    B, W = x.shape
    T = torch.full((B,), dec.steps, dtype=torch.float64) if dec.steps else todo.sum(1).cpu().double()
    for i in range(int(T.max())):
        t, s = (1.0 - i / T).clamp_min(0.0), (1.0 - (i + 1) / T).clamp_min(0.0)
        p_t, p_s = schedule.mask_prob(t), schedule.mask_prob(s)
        last = (i == T - 1).to(x.device)
        masked = todo & (x == mask_id)
        # every row draws 2W numbers at each of its steps, so its samples do not depend on the others
        u = rng.uniform_where(2 * W, i < T).to(x.device)
        if not masked.any():
            continue
        rows, pos = masked.nonzero(as_tuple=True)
        sigma = total_noise(p_t).float().to(x.device)
        logits = den(x, 0, rows, pos, sigma=sigma)
        nfe[torch.unique(rows).cpu()] += 1
        rate = unmask_prob(log_total_score(logits, mask_id), p_t.to(x.device)[rows], p_s.to(x.device)[rows])
        go = u[rows, pos] < torch.where(last[rows], 1.0, rate)
        if not go.any():
            continue
        rows, pos = rows[go], pos[go]
        w = subs_weights(logits[go], mask_id, dec.temperature)
        x[rows, pos] = draw(w, u[rows, W + pos], dec.top_p, _redraw(rng, rows.tolist()))


def _redraw(rng: RowRNG, rows: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Fresh uniforms for entries ``idx`` of a draw whose entry j belongs to row ``rows[j]``."""
    return lambda idx: rng.uniform_each([rows[j] for j in idx.tolist()])
