"""The training loop: AdamW with warm-up, gradient clipping, EMA, atomic checkpoints."""

from bd3.train.loop import train

__all__ = ["train"]
