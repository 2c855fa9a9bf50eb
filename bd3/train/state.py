"""The training state and its checkpoint: what a checkpoint holds beyond the weights, how a
:class:`~bd3.train.loop.Trainer` writes it, and how it is restored, strictly.

A checkpoint folder (written by :meth:`bd3.runs.Run.save_checkpoint`) holds the weights and
their EMA in safetensors, and the rest of the state as

- ``train_state.safetensors``: AdamW's moments (``optimizer.<param index>.<name>``), every
  process's torch RNG state (``rng.torch``, ``rng.torch.rank<r>`` for rank r > 0,
  ``rng.cuda...`` on CUDA) and the noise generator's (``rng.noise``, shared by all processes);
- the counters as JSON: the step, skipped non-finite steps, EMA updates, the data position
  and AdamW's parameter groups.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from bd3 import __version__
from bd3.errors import Bd3Error
from bd3.runs import Run, load_strict, load_tensors
from bd3.train import distributed as dist_

if TYPE_CHECKING:
    from bd3.train.loop import Trainer


class Batches:
    """Shuffled rows, epoch by epoch; (epoch, position) is the data position for resuming."""

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int, epoch: int = 0, position: int = 0) -> None:
        if len(rows) < batch_size:
            raise Bd3Error(
                f"The training split has {len(rows)} rows of tokens, fewer than the (global) batch size {batch_size}; "
                "use a smaller --batch-size / --global-batch-size or --length, or more data."
            )
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.epoch, self.position = epoch, position
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.rows))

    def next(self) -> torch.Tensor:
        if self.position + self.batch_size > len(self.rows):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation()
        idx = np.sort(self._order[self.position : self.position + self.batch_size])
        self.position += self.batch_size
        return torch.from_numpy(np.asarray(self.rows[idx], dtype=np.int64))


def training_state(trainer: Trainer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, counters) of the training state; under FSDP every process takes part and
    rank 0 alone gets them."""
    if trainer.sharded:
        opt = dist_.full_optimizer_state(trainer.model, trainer.optimizer, trainer.par.main)
    else:
        opt = trainer.optimizer.state_dict()
    rng = _rng_states(trainer)
    if not trainer.par.main:
        return {}, {}
    tensors = {
        f"optimizer.{idx}.{name}": torch.as_tensor(value)
        for idx, state in opt["state"].items() for name, value in state.items()
    }
    tensors.update(rng)
    state = {
        "step": trainer.step,
        "skipped_steps": trainer.skipped,
        "ema_updates": trainer.ema.updates,
        "data": {"epoch": trainer.data.epoch, "position": trainer.data.position, "seed": trainer.data.seed},
        "optimizer_param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]],
        "bd3_version": __version__,
    }
    return tensors, state


def _rng_states(trainer: Trainer) -> dict[str, torch.Tensor]:
    """rng.torch (rng.cuda on CUDA) of every process (rank r > 0 as rng.torch.rank<r>) and
    the noise generator's state, which all processes share."""
    own = {"rng.torch": torch.get_rng_state()}
    if trainer.device.type == "cuda":
        own["rng.cuda"] = torch.cuda.get_rng_state(trainer.device)
    states = {}
    for r, theirs in enumerate(trainer.par.gather(own)):
        states.update({k if r == 0 else f"{k}.rank{r}": v for k, v in theirs.items()})
    states["rng.noise"] = trainer.noise.get_state()
    return states


def weights(trainer: Trainer) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model, EMA) tensors, gathered onto rank 0 under FSDP (every process takes part)."""
    if not trainer.sharded:
        return trainer.model.state_dict(), trainer.ema.state_dict()
    return dist_.full_model_state(trainer.model, trainer.par.main), dist_.full_tensors(trainer.ema.shadow, trainer.par.main)


def save(trainer: Trainer, run: Run, gathered: tuple[dict, dict] | None = None) -> Path | None:
    """Write a checkpoint (rank 0; the others take part in gathering and get None);
    ``gathered``: what :func:`weights` returned, if the caller has it already."""
    model, ema = gathered or weights(trainer)
    tensors, state = training_state(trainer)
    if not trainer.par.main:
        return None
    return run.save_checkpoint(trainer.step, model, ema, tensors, state)


def restore(trainer: Trainer, run: Run, ckpt: Path) -> None:
    """Load a checkpoint written by :func:`save` into ``trainer``, strictly."""
    load_strict(trainer.model, load_tensors(ckpt / "model.safetensors"), ckpt / "model.safetensors")
    ema = load_tensors(ckpt / "ema.safetensors")
    missing = sorted(set(trainer.ema.shadow) - set(ema))
    if missing:
        raise Bd3Error(f"{ckpt / 'ema.safetensors'} lacks {', '.join(missing)}; the checkpoint is incomplete.")
    trainer.ema.shadow = {k: ema[k].float().to(trainer.device) for k in trainer.ema.shadow}
    state = run.train_state(ckpt)
    tensors = load_tensors(ckpt / "train_state.safetensors")
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = value
    groups = trainer.optimizer.state_dict()["param_groups"]
    try:
        saved = state["optimizer_param_groups"]
        for group, s in zip(groups, saved, strict=True):
            group.update({k: tuple(v) if isinstance(v, list) else v for k, v in s.items()})
        trainer.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        trainer.noise.set_state(tensors["rng.noise"])
        trainer.step, trainer.skipped = int(state["step"]), int(state.get("skipped_steps", 0))
        _restore_rng(trainer, tensors)
        trainer.ema.updates = int(state["ema_updates"])
        d = state["data"]
        trainer.data = Batches(trainer.data.rows, trainer.data.batch_size, d["seed"], d["epoch"], d["position"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise Bd3Error(f"The training state in {ckpt} is incomplete or corrupted ({e}); it cannot be resumed.") from None


def _restore_rng(trainer: Trainer, tensors: dict[str, torch.Tensor]) -> None:
    """This process's own torch RNG states; a rank the checkpoint lacks (more processes
    than wrote it) is seeded from (seed, step, rank)."""
    rank = trainer.par.rank
    suffix = "" if rank == 0 else f".rank{rank}"
    if f"rng.torch{suffix}" in tensors or rank == 0:
        torch.set_rng_state(tensors[f"rng.torch{suffix}"])
    else:
        torch.manual_seed(dist_.rank_seed(trainer.cfg.train.seed, trainer.step, rank))
    if trainer.device.type == "cuda" and f"rng.cuda{suffix}" in tensors:
        torch.cuda.set_rng_state(tensors[f"rng.cuda{suffix}"], trainer.device)
