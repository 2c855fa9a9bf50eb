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

Prompts: the first tokens of a row (BOS included) are given, the same ``prompt`` for every
row or one of ``prompts`` per row (rows may also end at different ``max_tokens``). The rows
share positions (and the KV cache's slots): blocks that every row's prompt covers are
written into the cache at once; at a later block a row whose prompt still covers it only
commits it (it draws no random numbers and makes no model call of its own), a row whose
prompt ends inside it denoises the positions after the prompt, and the other rows the
whole block. So a row's tokens are those it gets alone, whatever the other rows' prompts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from bd3.choices import RULES, STOPS
from bd3.diffusion.masks import block_causal_mask
from bd3.sampling.denoiser import FunctionDenoiser, ModelDenoiser
from bd3.sampling.rng import RowRNG
from bd3.sampling.rules import confidence, draw, subs_weights
from bd3.sampling.threads import ThreadTuner, restore_threads

ENTROPY_WINDOW = 256  # tokens (the reference's)
ENTROPY_MIN = 4.0  # nats


@dataclass
class Sample:
    """One finished sample: all its tokens (BOS and prompt included)."""

    index: int  # the sample's number in the run (its random numbers come from it)
    tokens: list[int]
    prompt_tokens: int  # BOS + prompt
    nfe: int = 0  # model calls that computed something for this sample
    stop: str = "length"  # length | eos | entropy
    seconds: float = 0.0  # from the start of its batch to its end

    @property
    def new_tokens(self) -> int:
        return len(self.tokens) - self.prompt_tokens


@dataclass
class BlockEvent:
    """What ``on_block`` receives after each block (or every few AR tokens)."""

    samples: list[int]  # sample index of each row that took part
    new_tokens: list[list[int]]  # the tokens each of them added (up to its end)
    finished: list[Sample] = field(default_factory=list)


@dataclass
class Decoding:
    """How tokens are chosen; shared by every sampler."""

    rule: str = "first-hitting"
    steps: int | None = None  # ddpm steps per block (default: the block's size)
    threshold: float = 0.9  # confidence decoding's P
    top_p: float = 0.9
    temperature: float = 1.0
    stop: str = "none"

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown update rule {self.rule!r}; choose one of {', '.join(RULES)}")
        if self.stop not in STOPS:
            raise ValueError(f"unknown stop rule {self.stop!r}; choose one of {', '.join(STOPS)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be positive, got {self.steps}")

    @property
    def eos(self) -> bool:
        return self.stop in ("eos", "both")

    @property
    def entropy(self) -> bool:
        return self.stop in ("entropy", "both")


def unigram_entropy(tokens: torch.Tensor) -> float:
    """Entropy (nats) of the token histogram of a 1-D tensor."""
    counts = torch.unique(tokens, return_counts=True)[1].double()
    p = counts / counts.sum()
    return float(-(p * p.log()).sum())


def low_entropy(tokens: torch.Tensor, end: int) -> bool:
    """The paper's rule on one row's tokens ``tokens[:end]``: more than 256 of them and the
    last 256 have an entropy below 4 nats."""
    return end > ENTROPY_WINDOW and unigram_entropy(tokens[end - ENTROPY_WINDOW : end]) < ENTROPY_MIN


def finished_samples(index, seq, ends, stop, prompt_tokens: Sequence[int], nfe, seconds: float) -> list[Sample]:
    """A :class:`Sample` for each row with a stop reason (``prompt_tokens``: each row's
    prompt length); a row stopped by low entropy loses the low-entropy window (its last
    ``ENTROPY_WINDOW`` tokens, never the prompt)."""
    out = []
    for r, why in enumerate(stop):
        if why:
            end, given = int(ends[r]), int(prompt_tokens[r])
            if why == "entropy":
                end = max(given, end - ENTROPY_WINDOW)
            out.append(Sample(index[r], seq[r, :end].tolist(), given, int(nfe[r]), why, seconds))
    return out


def surviving_rows(stop, index, rng: RowRNG, device) -> tuple[list[int], torch.Tensor]:
    """The sample indices of the rows without a stop reason and their row numbers (the
    rows' random generators are narrowed to them)."""
    keep = [r for r, why in enumerate(stop) if not why]
    rng.select(keep)
    return [index[r] for r in keep], torch.tensor(keep, dtype=torch.long, device=device)


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


def sample_indices(samples, batch: int | None, rng: RowRNG | None, prompts) -> list[int]:
    """Each row's sample index: ``samples``, else 0..n-1 for n = ``batch``, the rows of
    ``rng`` or the number of ``prompts`` (default 1)."""
    if samples is not None:
        return list(samples)
    for n in (batch, None if rng is None else len(rng), None if prompts is None else len(prompts)):
        if n is not None:
            return list(range(n))
    return [0]


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


def prompt_rows(prompts: list[torch.Tensor], width: int, mask_id: int, device) -> torch.Tensor:
    """(len(prompts), width) token ids: each row its prompt, then masks."""
    seq = torch.full((len(prompts), width), mask_id, dtype=torch.long, device=device)
    if all(p is prompts[0] for p in prompts):
        seq[:, : prompts[0].numel()] = prompts[0]
    else:
        for r, p in enumerate(prompts):
            seq[r, : p.numel()] = p
    return seq


def sample_blocks(
    model,
    *,
    batch: int | None = None,
    max_tokens: int | Sequence[int],
    block_size: int,
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
    kv_cache: bool = True,
    engine: bool = True,
    mdlm: bool = False,
    on_block: Callable[[BlockEvent], None] | None = None,
    device: torch.device | str | None = None,
    threads: int | ThreadTuner | None = None,
    **decoding_kw,
) -> list[Sample]:
    """Generate ``batch`` samples of ``max_tokens`` tokens each (BOS and prompt included,
    fewer for rows that stop), block by block.

    ``prompt``: every row's first tokens (BOS included; default BOS alone); or ``prompts``,
    one per row (the batch is then their number), and ``max_tokens`` one per row.

    ``model``: a DiT (run through the inference :class:`~bd3.sampling.engine.Engine`, or
    ``DiT.hidden_states`` with ``engine=False``), or any denoiser callable (see
    :mod:`bd3.sampling.denoiser`). ``mdlm``: block size = ``length`` with full attention,
    and beyond it a window of ``length`` sliding by ``block_size`` (MDLM's semi-autoregressive
    stride; ``block_size`` is then the stride). Randomness: sample ``samples[i]`` (default i)
    draws from a generator seeded by ``(seed, samples[i])`` unless ``rng`` is given.
    ``on_block`` gets a :class:`BlockEvent` after every block. Extra keywords are
    :class:`Decoding` fields. ``threads``: CPU threads, or None to let a
    :class:`~bd3.sampling.threads.ThreadTuner` choose by timing the calls.
    """
    decoding = decoding or Decoding(**decoding_kw)
    samples = sample_indices(samples, batch, rng, prompts)
    B = len(samples)
    rng = rng or RowRNG.for_samples(seed, samples)
    if isinstance(model, torch.nn.Module) or hasattr(model, "hidden"):
        device = device or (model.vocab_embed.embedding.device if hasattr(model, "vocab_embed") else model.device)
        if mdlm:
            den = ModelDenoiser(model, B, block_size=block_size, context=length - block_size, kv_cache=False,
                                attention="full", engine=engine)
        else:
            den = ModelDenoiser(model, B, block_size=block_size, context=length - block_size, kv_cache=kv_cache, engine=engine)
    else:
        den = model if hasattr(model, "commit") else FunctionDenoiser(model)
        device = device or "cpu"
    prompts, ends = row_prompts(prompt, prompts, B, bos_id, device, max_tokens=max_tokens, length=length)
    N = max(ends)
    if mdlm:
        spans = [(0, length)] + [(s, s + block_size) for s in range(length, N, block_size)]
    else:
        spans = [(s, s + block_size) for s in range(0, N, block_size)]
    if isinstance(den, ModelDenoiser):
        den.tuner = threads if isinstance(threads, ThreadTuner) else ThreadTuner(threads, device)
    with torch.inference_mode(), restore_threads():
        return _run(den, spans, prompts, ends, samples, rng, decoding, mask_id=mask_id, eos_id=eos_id,
                    on_block=on_block, device=device)


def _run(den, spans, prompts, ends, samples, rng, dec: Decoding, *, mask_id, eos_id, on_block, device) -> list[Sample]:
    t0 = time.perf_counter()
    seq = prompt_rows(prompts, spans[-1][1], mask_id, device)
    given = torch.tensor([p.numel() for p in prompts])  # each row's prompt length (BOS included)
    ends = torch.tensor(ends)  # and its max_tokens
    index = list(samples)
    nfe = torch.zeros(len(index), dtype=torch.long)
    done: dict[int, Sample] = {}
    use_eos = dec.eos and eos_id is not None
    for bi, (s, e) in enumerate(spans):
        if e <= int(given.min()):  # a prompt block for every row: into the cache (folded into the next call)
            den.commit(seq[:, s:e], s)
            continue
        W = e - s
        lo, hi = (given - s).clamp(0, W), (ends - s).clamp_max(W)  # each row's positions to generate, in the block
        cols = torch.arange(W)
        made = ((cols >= lo[:, None]) & (cols < hi[:, None])).to(device)
        blk = seq[:, s:e].clone()
        _denoise(den, blk, s, made.clone(), rng, nfe, dec, mask_id=mask_id, eos_id=eos_id if use_eos else None)
        seq[:, s:e] = blk
        # where each row ends (a row still in its prompt generated nothing and does not end)
        end = s + hi
        stop = ["length" if n <= e else "" for n in ends.tolist()]
        if use_eos:
            hit = ((blk == eos_id) & made).cpu()
            rows = hit.any(1).nonzero()[:, 0].tolist()
            for r in rows:
                end[r] = s + int(hit[r].int().argmax()) + 1
                stop[r] = "eos"
        if dec.entropy:
            for r in (lo < hi).nonzero()[:, 0].tolist():
                if stop[r] != "eos" and low_entropy(seq[r], int(end[r])):
                    stop[r] = "entropy"
        finished = finished_samples(index, seq, end, stop, given, nfe, time.perf_counter() - t0)
        done.update((smp.index, smp) for smp in finished)
        if on_block is not None:
            new = blk.tolist()
            new = [row[int(lo[r]) : int(end[r]) - s] for r, row in enumerate(new)]
            on_block(BlockEvent(list(index), new, finished))
        if len(finished) == len(index):
            break
        if finished:
            index, keep = surviving_rows(stop, index, rng, device)
            seq, blk, nfe, given, ends = seq[keep], blk[keep], nfe[keep.cpu()], given[keep.cpu()], ends[keep.cpu()]
            den.select(keep)
        if bi + 1 < len(spans):
            den.commit(blk, s)
    return [done[i] for i in samples]


def _denoise(den, blk, start, todo, rng: RowRNG, nfe, dec: Decoding, *, mask_id, eos_id) -> None:
    """Unmask the ``todo`` positions of ``blk`` (B, W) in place by ``dec.rule``."""
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
                    return
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
                return
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


# -- the primitives the reference-parity tests use ------------------------------------


def denoise_block(model, block: torch.Tensor, start: int, *, cache=None, context: torch.Tensor | None = None):
    """Hidden states (B, L', D) of a noisy block starting at token ``start``, through
    ``DiT.hidden_states``.

    With a KV cache the block attends to the cached clean tokens and to itself; without one
    the clean ``context`` and the block are recomputed under the block-causal mask.
    """
    block_size = block.shape[1]
    if cache is not None:
        positions = torch.arange(start, start + block_size, device=block.device)
        return model.hidden_states(block, positions=positions, kv_cache=cache)
    seq = torch.cat([context, block], dim=1)
    h, c = model.hidden_states(seq, attn_mask=block_causal_mask(seq.shape[1], block_size, str(block.device)))
    return h[:, -block_size:], c


def commit_block(model, cache, block: torch.Tensor, start: int) -> None:
    """One pass over a finished, clean block writes its K/V into the cache."""
    cache.make_room(block.shape[1])
    denoise_block(model, block, start, cache=cache)
    cache.commit(block.shape[1])


def expected_calls(rule: str, block: int, steps: int | None = None) -> float:
    """Expected model calls to denoise one block of ``block`` masked positions at batch 1:
    ``block`` for first-hitting, the expected number of distinct steps for ddpm."""
    if rule == "ddpm":
        T = steps or block
        return T * (1 - (1 - 1 / T) ** block)
    return float(block) if rule == "first-hitting" else math.nan
