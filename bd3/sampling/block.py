"""The block sampler: blocks left to right, masked diffusion inside each block.

Batched, and every rule works per row: each row (sample) has its own random numbers
(:mod:`bd3.sampling.rng`), its own unmasking order, its own stop, and leaves the batch (and
the KV cache) when it stops. Update rules inside a block:

- ``first-hitting``: each model call unmasks exactly one masked position per row, chosen
  uniformly (a random order per row and block); the output layer runs only there.
- ``ddpm``: T steps on the grid t_i = 1 - i/T, s = t_i - 1/T; a masked position unmasks at
  step i with probability 1 - s/t_i, so the last step finishes the block. Under the linear
  schedule that makes each position's unmasking step uniform on 0..T-1, which is how it is
  drawn; a model call happens only at steps where some row unmasks something (the reuse of
  cached probabilities when nothing changed, without the wasted call), and only for those
  rows' unmasking positions.
- ``threshold``: confidence decoding; each call unmasks every masked position whose most
  likely token has probability above P (at least the most confident one per row), with
  tokens drawn from their (nucleus) distributions.

Stops, per row: ``eos`` ends a row at its first generated end-of-text token (positions after
it in the block are no longer denoised); ``entropy`` ends a row whose last 256 tokens have a
unigram entropy below 4 nats (the paper's rule, checked after each block; as in the
reference, those last 256 tokens are cut from the sample); ``both``; ``none``.

The per-row loop (stops, finished rows leaving the batch and the cache) is
:mod:`bd3.sampling.rows`; this module is the update rules.

Prompts: the first tokens of a row (BOS included) are given, the same ``prompt`` for every
row or one of ``prompts`` per row (rows may also end at different ``max_tokens``). The rows
share positions (and the KV cache's slots): blocks that every row's prompt covers are
written into the cache at once; at a later block a row whose prompt still covers it only
commits it (it draws no random numbers and makes no model call of its own), a row whose
prompt ends inside it denoises the positions after the prompt, and the other rows the
whole block. So a row's tokens are those it gets alone, whatever the other rows' prompts.
"""

from __future__ import annotations

import functools

import torch

from bd3.sampling.denoiser import Denoiser
from bd3.sampling.rows import Rows, run_rows
from bd3.sampling.rules import confidence, draw, subs_weights
from bd3.sampling.types import ENTROPY_WINDOW, BlockEvent, Decoding, Sample  # noqa: F401 - the CLI imports them from here


def sample_blocks(den: Denoiser, *, block_size: int, mdlm: bool = False, **options) -> list[Sample]:
    """Samples block by block from the denoiser ``den``
    (:class:`~bd3.sampling.denoiser.ModelDenoiser` for a model); ``options`` are the
    batch's (:class:`~bd3.sampling.rows.Rows`: ``max_tokens``, ``length``, ``mask_id``,
    prompts, samples, seed, ``on_block``, ...) and :class:`Decoding`'s fields.

    ``mdlm``: the first block is the whole ``length``, then blocks of ``block_size`` (MDLM's
    semi-autoregressive stride over a window of ``length``; ``den`` has full attention).
    """
    rows = Rows(**options)
    length = rows.length
    first = [(0, length)] if mdlm else []
    spans = first + [(s, s + block_size) for s in range(length if mdlm else 0, rows.width, block_size)]
    return run_rows(rows, spans, functools.partial(_denoise, den, rows, {e: s for s, e in spans}), den.select)


def _denoise(den: Denoiser, batch: Rows, starts: dict[int, int], start: int, end: int) -> bool:
    """The block [start, end): give the denoiser the previous block (clean now; ``starts``:
    each block's start by its end), then unmask the positions each row generates, in place,
    by the decoding's rule; a row stops denoising after its first end-of-text token. False
    for a block that is prompt for every row (it goes into the cache with the next call)."""
    if start in starts:
        den.commit(batch.seq[:, starts[start] : start], starts[start])
    if end <= int(batch.given.min()):
        return False
    dec, mask_id, eos_id, rng, nfe = batch.decoding, batch.mask_id, batch.eos_id, batch.rng, batch.nfe
    blk, todo = batch.seq[:, start:end], batch.generated(start, end)
    B, W = blk.shape
    device = blk.device
    # per row: W for the order / steps, W for the tokens; none for a row with nothing to do
    # (a prompt block of its own, which it would skip alone)
    draws = rng.uniform_where(2 * W, todo.any(1)).to(device)
    order, tok_u = draws[:, :W], draws[:, W:]
    arange = torch.arange(W, device=device)

    everyone = torch.arange(B, device=device)

    def call(rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        logits = den(blk, start, rows, pos)
        if rows is everyone:
            nfe.add_(1)
        else:
            nfe.add_(torch.bincount(rows.cpu(), minlength=nfe.numel()).clamp_max_(1))  # once per row that took part
        return subs_weights(logits, mask_id, dec.temperature)

    def sample(w: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> None:
        tok = draw(w, tok_u[rows, pos], dec.top_p, lambda idx: rng.uniform_each(rows[idx].tolist()))
        blk[rows, pos] = tok
        todo[rows, pos] = False
        if eos_id is not None:
            hit = tok == eos_id
            if hit.any():
                # a row ends at its first end-of-text token: what follows it is not needed
                cut = torch.full((B,), W, dtype=torch.long, device=device)
                cut.scatter_reduce_(0, rows[hit], pos[hit], "amin")
                todo.logical_and_(arange[None, :] <= cut[:, None])

    if dec.rule == "first-hitting":
        while True:
            first, pos = torch.where(todo, order, 2.0).min(1)  # the next position of each row's random order
            active = first < 2.0
            if active.all():
                rows = everyone
            else:
                rows = active.nonzero()[:, 0]
                if rows.numel() == 0:
                    return True
                pos = pos[rows]
            sample(call(rows, pos), rows, pos)
    elif dec.rule == "ddpm":
        T = dec.steps or W
        step = (order * T).long().clamp_max_(T - 1)  # each position's unmasking step, uniform on 0..T-1
        for i in torch.unique(step[todo]).tolist():
            ev = todo & (step == i)
            if not ev.any():
                continue
            rows, pos = ev.nonzero(as_tuple=True)
            sample(call(rows, pos), rows, pos)
    else:  # threshold
        while True:
            rows, pos = todo.nonzero(as_tuple=True)
            if rows.numel() == 0:
                return True
            w = call(rows, pos)
            conf = confidence(w)
            pick = conf > dec.threshold
            picked = torch.zeros(B, dtype=torch.long, device=device).index_add_(0, rows, pick.long())
            # a row with no confident position unmasks its most confident one (the first of ties)
            best = torch.full((B,), -1.0, dtype=conf.dtype, device=device).scatter_reduce_(0, rows, conf, "amax")
            N = rows.numel()
            entry = torch.where(conf == best[rows], torch.arange(N, device=device), N)
            first = torch.full((B,), N, dtype=torch.long, device=device).scatter_reduce_(0, rows, entry, "amin")
            first = first[(picked == 0) & (first < N)]
            pick[first] = True
            sample(w[pick], rows[pick], pos[pick])
    return True
