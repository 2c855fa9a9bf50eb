"""Turning sampled token ids into text: all at once, streamed block by block, or as JSONL.

:class:`SampleWriter` takes the samplers' :class:`~bd3.sampling.block.BlockEvent` s and
writes samples in order: with ``text`` the lowest-numbered sample not yet written streams
as its blocks finish (the others of its batch are held until their turn), with ``jsonl``
one object per sample when it is done.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TextIO

SEPARATOR = "\n" + "=" * 80 + "\n\n"


def sample_documents(ids: Sequence[int], tokenizer) -> list[str]:
    """The documents of a sample's token ids: split at each end-of-text token, the leading
    BOS (or EOS, where a run trained on raw rows starts) dropped, each decoded."""
    ids = list(ids)
    if ids and ids[0] in (tokenizer.bos_id, tokenizer.eos_id):
        ids = ids[1:]
    documents, current = [], []
    for i in ids:
        if i == tokenizer.eos_id:
            documents.append(current)
            current = []
        else:
            current.append(i)
    documents.append(current)
    return [tokenizer.decode(d) for d in documents]


def render(ids: Sequence[int], tokenizer) -> str:
    """Decode a sample: the leading BOS dropped, each end-of-text token shown as a blank line."""
    return "\n\n".join(d.strip() for d in sample_documents(ids, tokenizer))


class TextStream:
    """The text of one sample, written as tokens arrive (:meth:`feed`). The decoder only sees
    the segment since the last end-of-text token, and of a long segment only its live tail:
    once a segment has ``2 * SETTLE`` live tokens, its head is decoded once and its text set
    aside (where the cut falls between characters), so a block costs the same however long
    the sample is. A trailing partial character (or whitespace) is held back until what
    follows it arrives. ``holdback``: the last N tokens fed are not shown until :meth:`finish`
    (the entropy stop may cut them)."""

    SETTLE = 256

    def __init__(self, tokenizer, out: TextIO, ids: Sequence[int] = (), holdback: int = 0) -> None:
        self.tokenizer, self.out, self.holdback = tokenizer, out, holdback
        self.ready: list[str] = []  # final text, not yet written
        self.gap = ""  # a blank line per end-of-text token, shown before the text that follows
        self.segment: list[int] = []  # the live ids of the current segment
        self.settled = False  # whether the segment has text set aside (its leading whitespace is gone)
        self.carry = ""  # whitespace between the segment's text set aside and its live ids
        self.shown = ""  # the start of the live text, already passed on
        self.retry = 2 * self.SETTLE  # segment length at which to try setting its head aside
        self.pending: list[int] = []  # fed, not yet decoded (the held-back tail)
        self.taken = 0  # ids decoded so far
        self.feed(ids, write=False)

    def feed(self, ids: Sequence[int], write: bool = True) -> None:
        self.pending.extend(ids)
        self._take(len(self.pending) - self.holdback)
        if write:
            self.flush()

    def _take(self, n: int) -> None:
        tok = self.tokenizer
        for i in self.pending[: max(n, 0)]:
            if self.taken == 0 and i in (tok.bos_id, tok.eos_id):  # a leading BOS (EOS: raw rows) is dropped
                pass
            elif i == tok.eos_id:
                self._pass_on(self._live().rstrip())
                self.gap += "\n\n"
                self.segment, self.settled, self.carry, self.shown = [], False, "", ""
                self.retry = 2 * self.SETTLE
            else:
                self.segment.append(i)
                if len(self.segment) >= self.retry:
                    self._settle()
            self.taken += 1
        del self.pending[: max(n, 0)]

    def _live(self) -> str:
        """The text of the segment's live ids (after what was set aside)."""
        text = self.tokenizer.decode(self.segment)
        return self.carry + text if self.settled else text.lstrip()

    def _pass_on(self, live: str) -> None:
        """Pass on ``live`` (the live text, or its visible start) beyond what was shown."""
        if live.startswith(self.shown) and len(live) > len(self.shown):
            self.ready.append(self.gap + live[len(self.shown) :])
            self.gap, self.shown = "", live

    def _settle(self) -> None:
        """Set aside the text of all but the last SETTLE (or a few more) live ids, where the
        cut falls cleanly between two pieces of text; else try again SETTLE ids later."""
        self.retry = len(self.segment) + self.SETTLE
        live = self._live()
        if not live.startswith(self.shown):
            return
        decode = self.tokenizer.decode
        whole = decode(self.segment)
        for keep in range(self.SETTLE, self.SETTLE + 8):
            head_ids, tail_ids = self.segment[:-keep], self.segment[-keep:]
            head, tail = decode(head_ids), decode(tail_ids)
            clean = whole.startswith(head) and whole.endswith(tail) and len(head) + len(tail) <= len(whole)
            if not clean or "\ufffd" in (head[-1:], tail[:1]) or whole[len(head) : len(whole) - len(tail)].strip():
                continue
            aside = (self.carry + head if self.settled else head.lstrip()).rstrip()
            if not aside or not live.startswith(aside):
                continue
            if len(self.shown) < len(aside):
                self.ready.append(self.gap + aside[len(self.shown) :])
                self.gap, self.shown = "", ""
            else:
                self.shown = self.shown[len(aside) :]
            self.segment, self.settled, self.carry = tail_ids, True, live[len(aside) : len(live) - len(tail)]
            self.retry = 2 * self.SETTLE
            return

    def flush(self) -> None:
        # trailing whitespace waits for what follows it (a sample's end shows none)
        self._pass_on(self._live().rstrip("\ufffd").rstrip())
        self._write()

    def _write(self) -> None:
        if self.ready:
            self.out.write("".join(self.ready))
            self.out.flush()
            self.ready.clear()

    def finish(self, total: int | None = None) -> None:
        """Write the rest: the sample's first ``total`` tokens (default all fed)."""
        self._take(len(self.pending) if total is None else total - self.taken)
        self._pass_on(self._live().rstrip())
        self._write()
        self.out.write("\n")
        self.out.flush()


class SampleWriter:
    """Writes ``num_samples`` samples (numbered from 0) to ``out`` as ``text`` or ``jsonl``."""

    def __init__(self, tokenizer, out: TextIO, fmt: str, num_samples: int, prompt: Sequence[int] = (), holdback: int = 0) -> None:
        self.tokenizer, self.out, self.fmt, self.num_samples = tokenizer, out, fmt, num_samples
        self.prompt = list(prompt)
        self.holdback = holdback  # text: tokens not shown until their sample is done (entropy stop)
        self.next = 0  # the sample written (or streaming) next
        self.streams: dict[int, TextStream] = {}
        self.finished: dict[int, object] = {}

    def on_block(self, event) -> None:
        if self.fmt == "text":
            for i, new in zip(event.samples, event.new_tokens):
                stream = self._stream(i)
                stream.feed(new, write=i == self.next)
        for smp in event.finished:
            self.finished[smp.index] = smp
        self._advance()

    def _stream(self, i: int) -> TextStream:
        if i not in self.streams:
            self.streams[i] = TextStream(self.tokenizer, self.out, self.prompt, self.holdback)
        return self.streams[i]

    def _advance(self) -> None:
        while self.next in self.finished:
            smp = self.finished.pop(self.next)
            if self.fmt == "jsonl":
                obj = {
                    "sample": smp.index,
                    "text": render(smp.tokens, self.tokenizer).rstrip(),
                    "tokens": smp.tokens,
                    "prompt_tokens": smp.prompt_tokens,
                    "new_tokens": smp.new_tokens,
                    "nfe": smp.nfe,
                    "seconds": round(smp.seconds, 4),
                    "stop": smp.stop,
                }
                self.out.write(json.dumps(obj) + "\n")
                self.out.flush()
            else:
                stream = self.streams.pop(self.next, None)
                if stream is None:  # a sample that never reported a block
                    stream = TextStream(self.tokenizer, self.out, smp.tokens)
                stream.finish(len(smp.tokens))
                if self.next + 1 < self.num_samples:
                    self.out.write(SEPARATOR)
                    self.out.flush()
            self.next += 1
            if self.fmt == "text" and self.next in self.streams:
                self.streams[self.next].flush()  # what the next sample already has
