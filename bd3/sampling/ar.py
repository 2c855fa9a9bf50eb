"""Token-by-token sampling for the causal (AR) model, with a KV cache.

The prompt goes through the model in one causal pass that also gives the first new token;
then one call per token. With one prompt per row (``prompts``), the pass covers the shortest
prompt, and a longer prompt's remaining tokens are fed one per call, as its row's "new"
tokens would be, while the other rows generate; a row draws its random numbers only from its
first new token on, so it gets the tokens it gets alone. Beyond the model length the cache
slides (each token sees the last ``length - 1`` ones). Rows stop (and leave the batch and the
cache) per row, in the loop every sampler shares (:mod:`bd3.sampling.rows`; the entropy
rule is checked every ``report_every`` new tokens of a row).
"""

from __future__ import annotations

import torch

from bd3.sampling.denoiser import Denoiser
from bd3.sampling.rows import Rows, run_rows
from bd3.sampling.rules import draw, subs_weights
from bd3.sampling.types import Sample


def sample_ar(den: Denoiser, *, report_every: int = 16, **options) -> list[Sample]:
    """Samples token by token from a causal denoiser (``ModelDenoiser(model,
    attention="causal", ...)``); ``options`` as :func:`bd3.sampling.block.sample_blocks`'.
    ``on_block`` is called every ``report_every`` new tokens of a row, and when rows end."""
    rows = Rows(report_every=report_every, **options)
    dec, mask_id, device = rows.decoding, rows.mask_id, rows.device
    R = report_every
    first = int(rows.given.min())
    # each row's uniforms by position, R at a time from its first new token
    u = torch.zeros(len(rows), rows.width + R, dtype=torch.float64, device=device)

    def step(n: int, _: int) -> bool:
        # the prompt in one pass (its shortest length), then the last token, which gives the next one
        tokens, start = (rows.seq[:, :first], 0) if n == first else (rows.seq[:, n - 1 : n], n - 1)
        for p, group in _rows_by_length(rows.given.tolist()):
            if n >= p and (n - p) % R == 0:
                u[group, n : n + R] = rows.rng.uniform(R, group).to(device)
        gen = (rows.given <= n).nonzero()[:, 0]  # rows past their prompt draw; the others take its next token
        logits = den(tokens, start, gen.to(device), torch.full_like(gen, tokens.shape[1] - 1).to(device))
        if gen.numel():
            rows.nfe[gen] += 1
            gen = gen.to(device)
            w = subs_weights(logits, mask_id, dec.temperature)
            rows.seq[gen, n] = draw(w, u[gen, n], dec.top_p, lambda idx: rows.rng.uniform_each(gen[idx].tolist()))
        return True

    def select(keep: torch.Tensor) -> None:
        nonlocal u
        u = u[keep]
        den.select(keep)

    return run_rows(rows, [(n, n + 1) for n in range(first, rows.width)], step, select)


def _rows_by_length(given: list[int]) -> list[tuple[int, list[int]]]:
    """The rows of each prompt length."""
    groups: dict[int, list[int]] = {}
    for r, p in enumerate(given):
        groups.setdefault(p, []).append(r)
    return list(groups.items())
