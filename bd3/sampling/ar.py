"""Token-by-token sampling for the causal (AR) model, with a KV cache.

The prompt goes through the model in one causal pass that also gives the first new token;
then one call per token. Beyond the model length the cache slides (each token sees the last
``length - 1`` ones). Rows stop (and leave the batch and the cache) per row, as in
:mod:`bd3.sampling.block` (the entropy rule is checked every ``report_every`` tokens).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from bd3.sampling.block import (
    BlockEvent,
    Decoding,
    Sample,
    checked_prompt,
    finished_samples,
    low_entropy,
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
    max_tokens: int,
    length: int,
    mask_id: int,
    bos_id: int = 0,
    eos_id: int | None = None,
    prompt: Sequence[int] | torch.Tensor | None = None,
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
    samples = list(samples) if samples is not None else list(range(batch or (len(rng) if rng else 1)))
    B = len(samples)
    rng = rng or RowRNG.for_samples(seed, samples)
    backend = backend_for(model, engine)
    device = backend.device
    p = checked_prompt(prompt, bos_id, device, max_tokens=max_tokens, length=length)
    tuner = threads if isinstance(threads, ThreadTuner) else ThreadTuner(threads, device)
    with torch.inference_mode(), restore_threads():
        return _run(backend, p, B, samples, rng, decoding, max_tokens=max_tokens, length=length, mask_id=mask_id,
                    eos_id=eos_id, report_every=report_every, on_block=on_block, tuner=tuner)


def _run(backend, prompt, B, samples, rng, dec: Decoding, *, max_tokens, length, mask_id, eos_id, report_every, on_block, tuner):
    t0 = time.perf_counter()
    device = backend.device
    P, N = prompt.numel(), max_tokens
    seq = torch.full((B, N), mask_id, dtype=torch.long, device=device)
    seq[:, :P] = prompt
    index = list(samples)
    cache = backend.new_cache(B, length)
    mask = torch.ones(P, P, dtype=torch.bool, device=device).tril_() if P > 1 else None
    last = torch.full((B, 1), P - 1, dtype=torch.long, device=device)
    with tuner.call():
        h = backend.hidden(seq[:, :P], 0, cache=cache, mask=mask, query=last)
    cache.commit(P)
    done: dict[int, Sample] = {}
    reported = P  # tokens reported to on_block so far
    u = None
    use_eos = dec.eos and eos_id is not None
    for n in range(P, N):
        j = (n - P) % report_every
        if j == 0:
            u = rng.uniform(report_every).to(device)
        with tuner.call():
            logits = backend.logits(h[:, 0])
        w = subs_weights(logits, mask_id, dec.temperature)
        tok = draw(w, u[:, j], dec.top_p, lambda idx: rng.uniform_each(idx.tolist()))
        seq[:, n] = tok
        stop = ["length" if n + 1 >= N else ""] * len(index)
        if use_eos:
            for r in (tok == eos_id).nonzero()[:, 0].tolist():
                stop[r] = "eos"
        report = j == report_every - 1 or any(stop)
        if dec.entropy and report:
            for r in range(len(index)):
                if not stop[r] and low_entropy(seq[r], n + 1):
                    stop[r] = "entropy"
        finished = finished_samples(index, seq, [n + 1] * len(index), stop, P, [n + 1 - P] * len(index), time.perf_counter() - t0)
        done.update((smp.index, smp) for smp in finished)
        if on_block is not None and (report or finished):
            on_block(BlockEvent(list(index), seq[:, reported : n + 1].tolist(), finished))
            reported = n + 1
        if len(finished) == len(index):
            break
        if finished:
            index, keep = surviving_rows(stop, index, rng, device)
            seq, tok, u = seq[keep], tok[keep], u[keep]
            cache.select(keep)
        cache.make_room(1)
        with tuner.call():
            h = backend.hidden(tok[:, None], n, cache=cache)
        cache.commit(1)
    return [done[i] for i in samples]
