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
    """The text of one sample, written as tokens arrive (:meth:`feed`); the decoder only
    sees the segment since the last end-of-text token, and a trailing partial character
    (or whitespace) is held back until what follows it arrives. ``holdback``: the last N
    tokens fed are not shown until :meth:`finish` (the entropy stop may cut them)."""

    def __init__(self, tokenizer, out: TextIO, ids: Sequence[int] = (), holdback: int = 0) -> None:
        self.tokenizer, self.out, self.holdback = tokenizer, out, holdback
        self.prefix = ""  # text of the finished segments, with their separators
        self.segment: list[int] = []
        self.pending: list[int] = []  # fed, not yet decoded (the held-back tail)
        self.taken = 0  # ids decoded so far
        self.written = ""
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
                self.prefix += tok.decode(self.segment).strip() + "\n\n"
                self.segment = []
            else:
                self.segment.append(i)
            self.taken += 1
        del self.pending[: max(n, 0)]

    def text(self) -> str:
        return self.prefix + self.tokenizer.decode(self.segment).strip()

    def flush(self) -> None:
        # trailing whitespace waits for what follows it (a sample's end shows none)
        text = self.text().rstrip("\ufffd").rstrip()
        if text.startswith(self.written) and len(text) > len(self.written):
            self.out.write(text[len(self.written) :])
            self.out.flush()
            self.written = text

    def finish(self, total: int | None = None) -> None:
        """Write the rest: the sample's first ``total`` tokens (default all fed)."""
        self._take(len(self.pending) if total is None else total - self.taken)
        text = self.text().rstrip()
        if text.startswith(self.written):
            self.out.write(text[len(self.written) :])
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
