"""What every sampler shares: how tokens are chosen (:class:`Decoding`), what a sample is
(:class:`Sample`), what is streamed (:class:`BlockEvent`), why a row stopped (:class:`Stop`)
and the entropy stop rule."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from bd3.choices import RULES, STOPS

ENTROPY_WINDOW = 256  # tokens (the reference's)
ENTROPY_MIN = 4.0  # nats


class Stop(enum.StrEnum):
    """Why a sample ended; its value is the string in JSON output and the CLI's summary."""

    LENGTH = "length"  # it reached max_tokens
    EOS = "eos"  # at its first generated end-of-text token
    ENTROPY = "entropy"  # its last ENTROPY_WINDOW tokens fell below ENTROPY_MIN nats


@dataclass
class Sample:
    """One finished sample: all its tokens (BOS and prompt included)."""

    index: int  # the sample's number in the run (its random numbers come from it)
    tokens: list[int]
    prompt_tokens: int  # BOS + prompt
    nfe: int = 0  # model calls that computed something for this sample
    stop: Stop = Stop.LENGTH
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
    steps: int | None = None  # ddpm steps per block, SEDD steps per window (default: the positions generated)
    threshold: float = 0.9  # confidence decoding's P
    top_p: float = 0.9
    temperature: float = 1.0
    stop: str = "none"  # the stop rule: none | eos | entropy | both

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
