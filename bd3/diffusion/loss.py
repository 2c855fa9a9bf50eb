"""SUBS parameterisation and the NELBO per token."""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEG_INF = -1e6  # the reference's "zero probability" log-value


def subs_log_probs(logits: torch.Tensor, xt: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Full SUBS log-probabilities (..., V) in float32.

    The mask token gets zero probability; a position whose input is not masked is a one-hot
    copy of its input (log-prob 0 there, -1e6 elsewhere).
    """
    logits = logits.float().clone()
    logits[..., mask_id] += NEG_INF
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    unmasked = xt != mask_id
    copy = torch.full_like(logp, NEG_INF).scatter_(-1, xt.unsqueeze(-1), 0.0)
    return torch.where(unmasked.unsqueeze(-1), copy, logp)


def masked_nll(logits: torch.Tensor, targets: torch.Tensor, mask_id: int) -> torch.Tensor:
    """-log p(target) under SUBS at masked positions: cross-entropy with the mask column removed.

    ``logits`` (N, V), ``targets`` (N,) -> (N,) float32. Only the masked positions are
    passed in, so the output layer never runs on the others.
    """
    logits = logits.float().index_fill(-1, torch.tensor([mask_id], device=logits.device), NEG_INF)
    return F.cross_entropy(logits, targets, reduction="none")
