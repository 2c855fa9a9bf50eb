"""The per-row loop every sampler runs; a sampler supplies only its update rule.

A batch's rows are independent samples: each has its own prompt, ``max_tokens``, random
numbers (:mod:`bd3.sampling.rng`) and stop. The sampler fills positions span by span (a
block, a SEDD window, one AR token); after each span :meth:`Rows.settle` finds the rows that
ended (their length, their first generated end-of-text token, or low entropy), reports the
new tokens to ``on_block``, and drops the finished rows from the batch, their random
generators and (through the sampler's ``select``) the denoiser's state and KV cache, so
they cost nothing more.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import fields

import torch

from bd3.sampling.rng import RowRNG
from bd3.sampling.threads import restore_threads
from bd3.sampling.types import ENTROPY_WINDOW, BlockEvent, Decoding, Sample, Stop, low_entropy

Prompt = Sequence[int] | torch.Tensor


def checked_prompt(prompt, bos_id: int, device, *, max_tokens: int, length: int) -> torch.Tensor:
    """The prompt as a tensor (default: BOS alone), checked against the output length and
    the model's context."""
    if prompt is None:
        prompt = [bos_id]
    p = torch.as_tensor(list(prompt) if not isinstance(prompt, torch.Tensor) else prompt, dtype=torch.long, device=device)
    if p.numel() >= max_tokens:
        raise ValueError(f"max_tokens ({max_tokens}) must exceed the prompt's {p.numel()} tokens")
    if p.numel() >= length:
        raise ValueError(f"the prompt ({p.numel()} tokens with BOS) must be shorter than the model's context ({length})")
    return p


def row_prompts(prompt, prompts, rows: int, bos_id: int, device, *, max_tokens, length: int) -> tuple[list[torch.Tensor], list[int]]:
    """Each row's prompt as a tensor (``prompts``, one per row; else ``prompt`` for every
    row) and its ``max_tokens`` (one for every row, or one per row), each pair checked by
    :func:`checked_prompt`."""
    if prompt is not None and prompts is not None:
        raise ValueError("give prompt (every row's) or prompts (one per row), not both")
    ends = [int(n) for n in max_tokens] if isinstance(max_tokens, Sequence) else [int(max_tokens)] * rows
    shared = prompts is None
    if shared:
        prompts = [prompt] * rows
    if len(prompts) != rows or len(ends) != rows:
        raise ValueError(f"{len(prompts)} prompts and {len(ends)} max_tokens for a batch of {rows}")
    if shared and len(set(ends)) == 1:  # one prompt: checked and converted once
        return [checked_prompt(prompt, bos_id, device, max_tokens=ends[0], length=length)] * rows, ends
    return [checked_prompt(p, bos_id, device, max_tokens=n, length=length) for p, n in zip(prompts, ends)], ends


DECODING_FIELDS = frozenset(f.name for f in fields(Decoding))


class Rows:
    """The batch while it samples: ``seq`` (B, width) holds every row's tokens (prompt, then
    masks until generated); ``given`` each row's prompt length (BOS included), ``ends`` its
    ``max_tokens``, ``index`` its sample number, ``nfe`` its model calls, ``rng`` its random
    numbers. Rows that stop leave all of them.

    The options every sampler takes: ``max_tokens`` per row (BOS and prompt included; an int
    or one per row); ``length`` (the model's context), ``mask_id``, ``bos_id``, ``eos_id``;
    ``prompt``, every row's first tokens (BOS included; default BOS alone), or ``prompts``,
    one per row (the batch is then their number); the rows: ``samples`` (their sample
    indices; default 0..n-1 for n = ``batch``), whose random numbers come from ``(seed,
    sample)`` unless ``rng`` is given; ``decoding`` (or its fields as keywords);
    ``on_block``, called with a :class:`BlockEvent` after each span (every ``report_every``
    new tokens of a row, when given); ``device``."""

    def __init__(
        self,
        *,
        max_tokens: int | Sequence[int],
        length: int,
        mask_id: int,
        bos_id: int = 0,
        eos_id: int | None = None,
        prompt: Prompt | None = None,
        prompts: Sequence[Prompt] | None = None,
        batch: int | None = None,
        samples: Sequence[int] | None = None,
        seed: int = 0,
        rng: RowRNG | None = None,
        decoding: Decoding | None = None,
        on_block: Callable[[BlockEvent], None] | None = None,
        device: torch.device | str = "cpu",
        report_every: int | None = None,
        **decoding_kw,
    ) -> None:
        unknown = set(decoding_kw) - DECODING_FIELDS
        if unknown:
            raise TypeError(f"unexpected sampler options: {', '.join(sorted(unknown))}")
        self.decoding = decoding = decoding or Decoding(**decoding_kw)
        if samples is None:  # 0..n-1 for n = batch, the rows of rng, the number of prompts, or 1
            n = next((n for n in (batch, None if rng is None else len(rng), None if prompts is None else len(prompts)) if n is not None), 1)
            samples = range(n)
        self.order = list(samples)
        self.index = list(samples)
        self.rng = rng or RowRNG.for_samples(seed, self.index)
        prompt_list, ends = row_prompts(prompt, prompts, len(self.index), bos_id, device, max_tokens=max_tokens, length=length)
        self.device, self.mask_id, self.length = device, mask_id, length
        self.given = torch.tensor([p.numel() for p in prompt_list])
        self.ends = torch.tensor(ends)
        self.width = max(ends)
        self.prompts = prompt_list
        self.seq: torch.Tensor | None = None  # made by start(), once the sampler knows its spans
        self.nfe = torch.zeros(len(self.index), dtype=torch.long)
        self.eos_id = eos_id if decoding.eos else None
        self.entropy = decoding.entropy
        self.on_block, self.every = on_block, report_every
        self.reported = 0  # on_block has every row's tokens before this position
        self.done: dict[int, Sample] = {}
        self.t0 = time.perf_counter()

    def __len__(self) -> int:
        return len(self.index)

    def start(self, width: int) -> None:
        """``seq`` (B, width): each row its prompt, then masks."""
        self.seq = torch.full((len(self.index), width), self.mask_id, dtype=torch.long, device=self.device)
        if all(p is self.prompts[0] for p in self.prompts):
            self.seq[:, : self.prompts[0].numel()] = self.prompts[0]
        else:
            for r, p in enumerate(self.prompts):
                self.seq[r, : p.numel()] = p

    def generated(self, s: int, e: int, first: int | None = None) -> torch.Tensor:
        """(B, e - first) bool: the positions first..e-1 (default from ``s``) that each row
        generates in the span [s, e), i.e. past its prompt and before its end."""
        first = s if first is None else first
        lo, hi = self.given.clamp(s, e), self.ends.clamp(max=e)
        cols = torch.arange(first, e)
        return ((cols >= lo[:, None]) & (cols < hi[:, None])).to(self.device)

    def settle(self, s: int, e: int) -> torch.Tensor | None:
        """After the span [s, e) is final: record the rows that stop, report to
        ``on_block``, and drop the finished rows. Returns the rows kept (for the sampler's
        own state) when some left, else None; ``len(self)`` is 0 when none is left."""
        lo, hi = self.given.clamp(s, e), self.ends.clamp(max=e)
        end = hi.clone()
        stop = [Stop.LENGTH if n <= e else None for n in self.ends.tolist()]
        if self.eos_id is not None:
            hit = ((self.seq[:, s:e] == self.eos_id) & self.generated(s, e)).cpu()
            for r in hit.any(1).nonzero()[:, 0].tolist():
                end[r], stop[r] = s + int(hit[r].int().argmax()) + 1, Stop.EOS
        due = lo < hi  # rows that generated something
        if self.every is not None:
            due &= (e - self.given) % self.every == 0
        if self.entropy:
            for r in due.nonzero()[:, 0].tolist():
                if stop[r] != Stop.EOS and low_entropy(self.seq[r], int(end[r])):
                    stop[r] = Stop.ENTROPY
        finished = self._finished(end, stop)
        if self.on_block is not None and (self.every is None or bool(due.any()) or finished):
            start = self.given.clamp(min=self.reported)
            a0 = int(start.min())
            new = [row[a - a0 : b - a0] for row, a, b in zip(self.seq[:, a0:e].tolist(), start.tolist(), end.tolist())]
            self.on_block(BlockEvent(list(self.index), new, finished))
            self.reported = e
        if not finished:
            return None
        keep = [r for r, why in enumerate(stop) if why is None]
        self.index = [self.index[r] for r in keep]
        if not keep:  # the batch is done
            return None
        self.rng.select(keep)
        cpu = torch.tensor(keep, dtype=torch.long)
        self.given, self.ends, self.nfe = self.given[cpu], self.ends[cpu], self.nfe[cpu]
        keep = cpu.to(self.device)
        self.seq = self.seq[keep]
        return keep

    def _finished(self, end: torch.Tensor, stop: list[Stop | None]) -> list[Sample]:
        """A :class:`Sample` for each row with a stop reason; a row stopped by low entropy
        loses the low-entropy window (its last ``ENTROPY_WINDOW`` tokens, never the prompt)."""
        out = []
        seconds = time.perf_counter() - self.t0
        for r, why in enumerate(stop):
            if why is not None:
                stop_at, given = int(end[r]), int(self.given[r])
                if why == Stop.ENTROPY:
                    stop_at = max(given, stop_at - ENTROPY_WINDOW)
                out.append(Sample(self.index[r], self.seq[r, :stop_at].tolist(), given, int(self.nfe[r]), why, seconds))
        self.done.update((smp.index, smp) for smp in out)
        return out

    def samples(self) -> list[Sample]:
        return [self.done[i] for i in self.order]


def run_rows(rows: Rows, spans: list[tuple[int, int]], step: Callable[[int, int], bool],
             select: Callable[[torch.Tensor], None]) -> list[Sample]:
    """The loop: ``step(s, e)`` fills the span [s, e) of every row of ``rows.seq`` (False:
    it was prompt for every row, nothing to settle); then the finished rows leave, and
    ``select(keep)`` narrows the sampler's own per-row state to the rows kept."""
    rows.start(spans[-1][1])
    with torch.inference_mode(), restore_threads():
        for s, e in spans:
            if not step(s, e):
                continue
            keep = rows.settle(s, e)
            if not len(rows):
                break
            if keep is not None:
                select(keep)
    return rows.samples()
