"""Turning sampled token ids into text, all at once or streamed block by block."""

from __future__ import annotations

from typing import TextIO


def render(ids: list[int], tokenizer) -> str:
    """Decode a sample: the leading BOS dropped, each end-of-text token shown as a blank line."""
    if ids and ids[0] == tokenizer.bos_id:
        ids = ids[1:]
    segments, current = [], []
    for i in ids:
        if i == tokenizer.eos_id:
            segments.append(current)
            current = []
        else:
            current.append(i)
    segments.append(current)
    return "\n\n".join(tokenizer.decode(s).strip() for s in segments)


class TextStream:
    """Writes the new text of row 0 after each block; holds back a trailing partial character."""

    def __init__(self, tokenizer, out: TextIO) -> None:
        self.tokenizer, self.out, self.written = tokenizer, out, ""

    def update(self, x) -> bool:
        text = render(x[0].tolist(), self.tokenizer).rstrip("\ufffd")
        if text.startswith(self.written):
            self.out.write(text[len(self.written):])
            self.out.flush()
            self.written = text
        return False

    def finish(self) -> None:
        self.out.write("\n")
        self.out.flush()
