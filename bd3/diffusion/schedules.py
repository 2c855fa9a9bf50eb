"""Noise schedules for masked diffusion.

A schedule gives the mask probability ``p(t) = 1 - alpha_t`` and the positive NELBO weight
``w(t) = p'(t) / p(t)`` (the paper's ``-alpha'_t / (1 - alpha_t)``) that multiplies the
negative log-likelihood of each masked token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bd3.errors import Bd3Error


@dataclass(frozen=True)
class LinearSchedule:
    """p(t) = t, w(t) = 1/t. The reference calls it ``loglinear``."""

    name: str = "linear"

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 / t


SCHEDULES = {"linear": LinearSchedule()}


def get_schedule(name: str) -> LinearSchedule:
    name = {"loglinear": "linear"}.get(name, name)
    try:
        return SCHEDULES[name]
    except KeyError:
        raise Bd3Error(f"Unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}.") from None
