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

from collections.abc import Callable, Sequence

import torch

from bd3.sampling.denoiser import Denoiser
from bd3.sampling.rng import RowRNG
from bd3.sampling.rows import Prompt, Rows, run_rows
from bd3.sampling.rules import draw, subs_weights
from bd3.sampling.types import BlockEvent, Decoding, Sample


def sample_ar(
    den: Denoiser,
    *,
    batch: int | None = None,
    max_tokens: int | Sequence[int],
    length: int,
    mask_id: int,
    bos_id: int = 0,
    eos_id: int | None = None,
    prompt: Prompt | None = None,
    prompts: Sequence[Prompt] | None = None,
    seed: int = 0,
    samples: Sequence[int] | None = None,
    rng: RowRNG | None = None,
    decoding: Decoding | None = None,
    report_every: int = 16,
    on_block: Callable[[BlockEvent], None] | None = None,
    device: torch.device | str = "cpu",
    **decoding_kw,
) -> list[Sample]:
    """``max_tokens`` tokens per row (BOS and prompt included) from a causal denoiser
    (``ModelDenoiser(model, attention="causal", ...)``); see ``sample_blocks``."""
    dec = decoding or Decoding(**decoding_kw)
    rows = Rows(max_tokens=max_tokens, length=length, mask_id=mask_id, bos_id=bos_id, eos_id=eos_id, prompt=prompt,
                prompts=prompts, batch=batch, samples=samples, seed=seed, rng=rng, decoding=dec, on_block=on_block,
                device=device, report_every=report_every)
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
