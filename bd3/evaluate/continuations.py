"""Conditional likelihoods of token continuations, the numbers downstream tasks need.

A request is a context and a continuation (token ids). Its row is
``start + context + continuation``, the context cut from the left so that the row fits the
model length L (``start`` is ``[BOS]`` when the run's rows begin with one, as in training).

- ``loglikelihood``: AR runs: the exact sum of the continuation's token log-probs (the
  row right-padded with EOS, which a causal model never sees). BD3-LM and MDLM runs: minus
  the NELBO of the continuation's tokens with the context clean, an upper bound's negative,
  so a lower bound on log p(continuation | context). The row is filled up to L with the mask
  token, which stands for unknown text: context, never a target. Only the continuation's
  positions are masked, block by block (a block that holds both context and continuation
  tokens masks only the continuation's). Estimator ``exact`` (every mask pattern) or ``k``
  (``passes`` passes, averaged, from a generator seeded per batch: reproducible).
- ``is_greedy``: AR: every continuation token is the argmax given its prefix. Diffusion:
  with every continuation token masked (the earlier blocks clean, as the block-causal
  model sees them), the argmax at each masked position (the mask token excluded) is the
  continuation's token: one denoising step of greedy decoding recovers it.
- ``rolling``: a document's bound over non-overlapping windows of L - 2 tokens, each scored
  in a row ``start + window`` (the rows of ``bd3 eval --zero-shot`` without their EOS), so
  that the sum over windows is comparable with zero-shot perplexity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bd3.config import RunConfig
from bd3.diffusion.objective import denoiser_input, row_nelbo
from bd3.errors import Bd3Error
from bd3.runtime import autocast


@dataclass
class Scorer:
    """A run's model and how it scores continuations."""

    model: object  # a DiT
    config: RunConfig
    estimator: str = "exact"  # exact | k (AR runs: exact)
    passes: int = 1  # passes of the k estimator, averaged
    batch_size: int = 16
    seed: int = 1
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"

    def __post_init__(self) -> None:
        algo = self.config.diffusion.algo
        if algo == "sedd":
            raise ValueError("SEDD is time-conditioned: the exact and k estimators do not apply to it")
        self.length = self.config.model.length
        self.mask_id, self.eos_id = self.config.data.mask_id, self.config.data.eos_id
        # BOS when training rows begin with it; else an AR run starts at a document boundary (EOS)
        self.start = [self.config.data.bos_id] if self.config.diffusion.ignore_bos else [self.eos_id] if algo == "ar" else []
        # AR rows are right-padded with a real token (a mask target would have no probability)
        self.fill = self.eos_id if algo == "ar" else self.mask_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context becomes: BOS, or EOS (a document boundary) for runs without BOS."""
        return self.start[0] if self.start else self.eos_id

    def row(self, context: list[int], continuation: list[int]) -> tuple[list[int], int]:
        """``start + context + continuation`` cut from the left to fit L, and where the continuation begins."""
        if context[: len(self.start)] == self.start:
            context = context[len(self.start):]
        room = self.length - len(self.start) - len(continuation)
        if room < 0:
            raise Bd3Error(f"A continuation of {len(continuation)} tokens does not fit the model length {self.length} with its start; "
                           "shorten the task's continuations.")
        context = context[max(len(context) - room, 0):]
        return self.start + context + continuation, len(self.start) + len(context)

    @torch.no_grad()
    def loglikelihood(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log-likelihood or its bound, is_greedy) per (context, continuation) pair."""
        out = []
        for first in range(0, len(requests), self.batch_size):
            rows = [self.row(c, x) for c, x in requests[first : first + self.batch_size]]
            x0, maskable = self._batch(rows)
            bounds = self._nelbo(x0, maskable)
            greedy = self._greedy(x0, maskable)
            out += [(-float(b), bool(g)) for b, g in zip(bounds, greedy)]
        return out

    @torch.no_grad()
    def rolling(self, documents: list[list[int]]) -> list[float]:
        """Each document's log-likelihood (or its bound) over windows of L - 2 tokens."""
        body = self.length - 2
        windows = [(d, w[i : i + body]) for d, w in enumerate(documents) for i in range(0, len(w), body)]
        totals = [0.0] * len(documents)
        for first in range(0, len(windows), self.batch_size):
            part = windows[first : first + self.batch_size]
            rows = [(self.start + w, len(self.start)) for _, w in part]
            x0, maskable = self._batch(rows)
            for (d, _), b in zip(part, self._nelbo(x0, maskable)):
                totals[d] -= float(b)
        return totals

    def _batch(self, rows: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) tokens filled up to L from ``(tokens, first scored position)`` pairs, and the
        scored (maskable) positions: from that position to the end of the tokens."""
        x0 = torch.full((len(rows), self.length), self.fill, dtype=torch.long)
        maskable = torch.zeros(x0.shape, dtype=torch.bool)
        for i, (tokens, first) in enumerate(rows):
            x0[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            maskable[i, first : len(tokens)] = True
        return x0.to(self.device), maskable.to(self.device)

    def _nelbo(self, x0: torch.Tensor, maskable: torch.Tensor) -> torch.Tensor:
        """(B,) float64 NELBO of the maskable positions, averaged over the passes."""
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        passes = self.passes if self.estimator == "k" and self.config.diffusion.algo != "ar" else 1
        total = torch.zeros(x0.shape[0], dtype=torch.float64, device=self.device)
        with autocast(self.device, self.precision):
            for _ in range(passes):
                total += row_nelbo(self.model, x0, self.config.diffusion, self.mask_id, self.estimator,
                                   maskable=maskable, generator=generator)
        return (total / passes).cpu()

    def _greedy(self, x0: torch.Tensor, maskable: torch.Tensor) -> torch.Tensor:
        """(B,) bool: whether the argmax gives every scored token (see the module's docstring)."""
        model, d = self.model, self.config.diffusion
        with autocast(self.device, self.precision):
            if d.algo == "ar":  # position p is predicted from p - 1 (position 0 is never scored)
                logits = model(x0[:, :-1], select=maskable[:, 1:])
            else:
                xt = torch.where(maskable, torch.full_like(x0, self.mask_id), x0)
                tokens, kw = denoiser_input(xt, x0, d)
                logits = model(tokens, select=maskable, **kw)
            logits = logits.float()  # only the scored positions: (N, V)
        logits[:, self.mask_id] = -torch.inf
        hits = torch.ones_like(maskable)
        hits[maskable] = logits.argmax(-1) == x0[maskable]
        return hits.all(1).cpu()
