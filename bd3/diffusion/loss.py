"""The SUBS parameterisation's NELBO per token: the mask token gets zero probability and
unmasked positions copy their input, so only masked positions carry a loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEG_INF = -1e6  # the reference's "zero probability" log-value


def masked_nll(logits: torch.Tensor, targets: torch.Tensor, mask_id: int) -> torch.Tensor:
    """-log p(target) under SUBS at masked positions: cross-entropy with the mask column removed.

    ``logits`` (N, V), ``targets`` (N,) -> (N,) float32. Only the masked positions are
    passed in, so the output layer never runs on the others.
    """
    logits = logits.float().index_fill(-1, torch.tensor([mask_id], device=logits.device), NEG_INF)
    return F.cross_entropy(logits, targets, reduction="none")
