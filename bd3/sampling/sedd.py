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

The score model is a DiT or any callable ``fn(x, sigma, rows, pos) -> logits (N, V)``:
the tokens (B, W), the time input (B,), and N (row, position) pairs whose output is wanted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from bd3.diffusion.schedules import get_schedule
from bd3.diffusion.sedd import log_total_score, total_noise, unmask_prob
from bd3.sampling.block import (
    BlockEvent,
    Decoding,
    Sample,
    finished_samples,
    low_entropy,
    prompt_rows,
    row_prompts,
    sample_indices,
    surviving_rows,
)
from bd3.sampling.rng import RowRNG
from bd3.sampling.rules import draw, subs_weights
from bd3.sampling.threads import ThreadTuner, restore_threads


class ModelScores:
    """A time-conditioned DiT as the sampler's score function; ``calls`` counts passes."""

    def __init__(self, model) -> None:
        self.model, self.calls = model, 0

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h, c = self.model.hidden_states(x, sigma=sigma)
        return self.model.logits(h[rows, pos], c[rows])


def sample_sedd(
    model,
    *,
    batch: int | None = None,
    max_tokens: int | Sequence[int],
    length: int,
    mask_id: int,
    bos_id: int = 0,
    eos_id: int | None = None,
    prompt: Sequence[int] | torch.Tensor | None = None,
    prompts: Sequence[Sequence[int] | torch.Tensor] | None = None,
    seed: int = 0,
    samples: Sequence[int] | None = None,
    rng: RowRNG | None = None,
    decoding: Decoding | None = None,
    schedule: str = "linear",
    on_block: Callable[[BlockEvent], None] | None = None,
    device: torch.device | str | None = None,
    threads: int | ThreadTuner | None = None,
    **decoding_kw,
) -> list[Sample]:
    """``batch`` samples of ``max_tokens`` tokens each (BOS and prompt included, fewer for
    rows that stop). ``decoding.steps`` is T per window (default: the positions it
    generates); ``schedule`` spaces the mask rates of the grid (the run's). ``on_block``
    gets a :class:`BlockEvent` after every window. Other arguments as
    :func:`bd3.sampling.block.sample_blocks`."""
    decoding = decoding or Decoding(**decoding_kw)
    samples = sample_indices(samples, batch, rng, prompts)
    rng = rng or RowRNG.for_samples(seed, samples)
    if isinstance(model, torch.nn.Module):
        device = device or model.vocab_embed.embedding.device
        model = ModelScores(model)
    device = device or "cpu"
    prompts, ends = row_prompts(prompt, prompts, len(samples), bos_id, device, max_tokens=max_tokens, length=length)
    stride = max(length // 2, 1)
    spans = [(0, length)] + [(s, s + stride) for s in range(length, max(ends), stride)]
    tuner = threads if isinstance(threads, ThreadTuner) else ThreadTuner(threads, device)
    with torch.inference_mode(), restore_threads():
        return _run(model, spans, prompts, ends, samples, rng, decoding, get_schedule(schedule), length=length,
                    mask_id=mask_id, eos_id=eos_id, on_block=on_block, device=device, tuner=tuner)


def _run(score, spans, prompts, ends, samples, rng, dec: Decoding, schedule, *, length, mask_id, eos_id, on_block,
         device, tuner) -> list[Sample]:
    t0 = time.perf_counter()
    seq = prompt_rows(prompts, spans[-1][1], mask_id, device)
    given = torch.tensor([p.numel() for p in prompts])  # each row's prompt length (BOS included)
    ends = torch.tensor(ends)  # and its max_tokens
    index = list(samples)
    nfe = torch.zeros(len(index), dtype=torch.long)
    done: dict[int, Sample] = {}
    for s, e in spans:
        # absolute positions each row generates in this window (a prompt is shorter than the
        # first window, and a row ending before a window has left the batch)
        lo, hi = given.clamp_min(s), ends.clamp_max(e)
        w0 = max(e - length, 0)
        window = seq[:, w0:e].clone()
        cols = torch.arange(w0, e)
        made = ((cols >= lo[:, None]) & (cols < hi[:, None])).to(device)
        denoise(score, window, made.clone(), rng, nfe, dec, schedule, mask_id=mask_id, tuner=tuner)
        seq[:, w0:e] = window
        end = hi.clone()
        stop = ["length" if n <= e else "" for n in ends.tolist()]
        if dec.eos and eos_id is not None:
            hit = ((window == eos_id) & made).cpu()
            for r in hit.any(1).nonzero()[:, 0].tolist():
                end[r], stop[r] = w0 + int(hit[r].int().argmax()) + 1, "eos"
        if dec.entropy:
            for r in range(len(index)):
                if stop[r] != "eos" and low_entropy(seq[r], int(end[r])):
                    stop[r] = "entropy"
        finished = finished_samples(index, seq, end, stop, given, nfe, time.perf_counter() - t0)
        done.update((smp.index, smp) for smp in finished)
        if on_block is not None:
            on_block(BlockEvent(list(index), [seq[r, int(lo[r]) : int(end[r])].tolist() for r in range(len(index))], finished))
        if len(finished) == len(index):
            break
        if finished:
            index, keep = surviving_rows(stop, index, rng, device)
            seq, nfe, given, ends = seq[keep], nfe[keep.cpu()], given[keep.cpu()], ends[keep.cpu()]
    return [done[i] for i in samples]


def denoise(score, x: torch.Tensor, todo: torch.Tensor, rng: RowRNG, nfe: torch.Tensor, dec: Decoding, schedule, *,
            mask_id: int, tuner: ThreadTuner | None = None) -> None:
    """Unmask the ``todo`` positions of ``x`` (B, W) in place: T analytic steps from t = 1
    to 0 (T = ``dec.steps``, default the positions a row generates: then per row, each row
    on its own grid)."""
    B, W = x.shape
    T = torch.full((B,), dec.steps, dtype=torch.float64) if dec.steps else todo.sum(1).cpu().double()
    tuner = tuner or ThreadTuner(1)
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
        with tuner.call():
            logits = score(x, sigma, rows, pos)
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
