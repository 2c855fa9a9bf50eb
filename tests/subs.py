"""The reference's full SUBS log-probabilities, which the parity and equality tests compare
bd3's masked-only loss (bd3.diffusion.loss.masked_nll) against."""

import torch

from bd3.diffusion.loss import NEG_INF


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
