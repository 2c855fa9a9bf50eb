"""Token-by-token sampling for the causal (AR) model, with a KV cache.

The prompt goes through the model in one causal pass that also gives the first new token;
then one call per token. With one prompt per row (``prompts``), the pass covers the shortest
prompt, and a longer prompt's remaining tokens are fed one per call, as its row's "new"
tokens would be, while the other rows generate; a row draws its random numbers only from its
first new token on, so it gets the tokens it gets alone. Beyond the model length the cache
slides (each token sees the last ``length - 1`` ones). Rows stop (and leave the batch and the
cache) per row, as in :mod:`bd3.sampling.block` (the entropy rule is checked every
``report_every`` new tokens of a row).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

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
from bd3.sampling.denoiser import backend_for
from bd3.sampling.rng import RowRNG
from bd3.sampling.rules import draw, subs_weights
from bd3.sampling.threads import ThreadTuner, restore_threads


def sample_ar(
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
    engine: bool = True,
    report_every: int = 16,
    on_block: Callable[[BlockEvent], None] | None = None,
    threads: int | ThreadTuner | None = None,
    **decoding_kw,
) -> list[Sample]:
    """``max_tokens`` tokens per row (BOS and prompt included); see ``sample_blocks``."""
    decoding = decoding or Decoding(**decoding_kw)
    samples = sample_indices(samples, batch, rng, prompts)
    rng = rng or RowRNG.for_samples(seed, samples)
    backend = backend_for(model, engine)
    device = backend.device
    prompts, ends = row_prompts(prompt, prompts, len(samples), bos_id, device, max_tokens=max_tokens, length=length)
    tuner = threads if isinstance(threads, ThreadTuner) else ThreadTuner(threads, device)
    with torch.inference_mode(), restore_threads():
        return _run(backend, prompts, ends, samples, rng, decoding, length=length, mask_id=mask_id,
                    eos_id=eos_id, report_every=report_every, on_block=on_block, tuner=tuner)


def _run(backend, prompts, ends, samples, rng, dec: Decoding, *, length, mask_id, eos_id, report_every, on_block, tuner):
    t0 = time.perf_counter()
    device = backend.device
    R = report_every
    seq = prompt_rows(prompts, max(ends), mask_id, device)
    given = [p.numel() for p in prompts]  # each row's prompt length (BOS included)
    index = list(samples)
    first, last = min(given), max(given)
    cache = backend.new_cache(len(index), length)
    mask = torch.ones(first, first, dtype=torch.bool, device=device).tril_() if first > 1 else None
    query = torch.full((len(index), 1), first - 1, dtype=torch.long, device=device)
    with tuner.call():
        h = backend.hidden(seq[:, :first], 0, cache=cache, mask=mask, query=query)
    cache.commit(first)
    # each row's uniforms by position, R at a time from its first new token (rows with the
    # same prompt length draw together)
    u = torch.zeros(len(index), seq.shape[1] + R, dtype=torch.float64, device=device)
    by_length = _rows_by_length(given)
    done: dict[int, Sample] = {}
    reported = first  # positions reported to on_block so far
    use_eos = dec.eos and eos_id is not None
    for n in range(first, seq.shape[1]):
        for p, rows in by_length:
            if n >= p and (n - p) % R == 0:
                u[rows, n : n + R] = rng.uniform(R, rows).to(device)
        if n < last:  # rows still in their prompt take its next token; the others (if any) draw
            gen = torch.tensor([r for r, p in enumerate(given) if p <= n], dtype=torch.long, device=device)
            tok = seq[:, n].clone()
            if gen.numel():
                with tuner.call():
                    logits = backend.logits(h[gen, 0])
                w = subs_weights(logits, mask_id, dec.temperature)
                tok[gen] = draw(w, u[gen, n], dec.top_p, lambda idx, gen=gen: rng.uniform_each(gen[idx].tolist()))
        else:
            with tuner.call():
                logits = backend.logits(h[:, 0])
            w = subs_weights(logits, mask_id, dec.temperature)
            tok = draw(w, u[:, n], dec.top_p, lambda idx: rng.uniform_each(idx.tolist()))
        seq[:, n] = tok
        stop = ["length" if n + 1 >= e else "" for e in ends]
        if use_eos:
            for r in (tok == eos_id).nonzero()[:, 0].tolist():
                if given[r] <= n:
                    stop[r] = "eos"
        due = [r for p, rows in by_length if n >= p and (n - p) % R == R - 1 for r in rows]  # rows at a report
        if dec.entropy:
            for r in due:
                if not stop[r] and low_entropy(seq[r], n + 1):
                    stop[r] = "entropy"
        finished = finished_samples(index, seq, [n + 1] * len(index), stop, given, [n + 1 - p for p in given],
                                    time.perf_counter() - t0)
        done.update((smp.index, smp) for smp in finished)
        if on_block is not None and (due or finished):
            new = [row[max(p - reported, 0) :] for row, p in zip(seq[:, reported : n + 1].tolist(), given)]
            on_block(BlockEvent(list(index), new, finished))
            reported = n + 1
        if len(finished) == len(index):
            break
        if finished:
            index, keep = surviving_rows(stop, index, rng, device)
            rows = keep.tolist()
            seq, tok, u = seq[keep], tok[keep], u[keep]
            given, ends = [given[r] for r in rows], [ends[r] for r in rows]
            last, by_length = max(given), _rows_by_length(given)
            cache.select(keep)
        cache.make_room(1)
        with tuner.call():
            h = backend.hidden(tok[:, None], n, cache=cache)
        cache.commit(1)
    return [done[i] for i in samples]


def _rows_by_length(given: list[int]) -> list[tuple[int, list[int]]]:
    """The rows of each prompt length."""
    groups: dict[int, list[int]] = {}
    for r, p in enumerate(given):
        groups.setdefault(p, []).append(r)
    return list(groups.items())
