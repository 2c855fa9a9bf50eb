"""Random numbers per sample, so that a sample does not depend on the rest of its batch.

Sample ``i`` of a run with seed ``s`` draws from its own generator, seeded from ``(s, i)``:
the same seed gives the same text whatever the batch size, and a row that stops early (and
leaves the batch) changes nothing for the others. All draws are float64 on the CPU, so the
text does not depend on the device's random number generator either.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of a run seeded with ``seed``, well mixed."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class RowRNG:
    """One ``torch.Generator`` per batch row; rows can be dropped with :meth:`select`."""

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        self.generators = list(generators)

    @classmethod
    def for_samples(cls, seed: int, indices: Sequence[int]) -> RowRNG:
        return cls([torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices])

    def __len__(self) -> int:
        return len(self.generators)

    def select(self, rows: Sequence[int] | torch.Tensor) -> None:
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else rows
        self.generators = [self.generators[r] for r in rows]

    def uniform(self, n: int, rows: Sequence[int] | None = None) -> torch.Tensor:
        """``n`` U[0, 1) float64 draws for each of ``rows`` (default all): (len(rows), n)."""
        rows = range(len(self.generators)) if rows is None else rows
        if len(rows) == 0:
            return torch.empty(0, n, dtype=torch.float64)
        return torch.stack([torch.rand(n, generator=self.generators[r], dtype=torch.float64) for r in rows])

    def uniform_where(self, n: int, busy: torch.Tensor) -> torch.Tensor:
        """``n`` draws for each row where the boolean ``busy`` (len(self),) is true, zeros for
        the others, which draw nothing (so their later draws are as if they had sat out):
        (len(self), n)."""
        busy = busy.cpu()
        if busy.all():
            return self.uniform(n)
        out = torch.zeros(len(busy), n, dtype=torch.float64)
        out[busy] = self.uniform(n, busy.nonzero()[:, 0].tolist())
        return out

    def uniform_each(self, rows: Sequence[int]) -> torch.Tensor:
        """One draw per entry of ``rows`` (a row may repeat; its draws come in order): (len(rows),)."""
        out = torch.empty(len(rows), dtype=torch.float64)
        for i, r in enumerate(rows):
            out[i] = torch.rand(1, generator=self.generators[r], dtype=torch.float64)[0]
        return out
