"""Training on several processes: ``torchrun --nproc-per-node N -m bd3 pretrain ...``.

torchrun sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` (and ``MASTER_ADDR``/``MASTER_PORT``);
:func:`setup` reads them and starts the process group (nccl on CUDA, gloo on CPU). Without
them, or with ``WORLD_SIZE=1``, nothing here runs and training is the single-process loop.

How a step is split (all of it deterministic from the seed and the step):

- The global batch (``global_batch_size`` rows) is drawn from the shuffled training rows as in
  one process, and the noise (t per block and the mask) is drawn for the whole global batch from
  a generator every process holds in the same state. Process ``r`` of ``W`` then computes the
  loss of rows ``[r G/W, (r+1) G/W)``, in micro-batches of ``batch_size`` rows (gradient
  accumulation, without gradient all-reduce until the last one under DDP). Losses and gradients
  are means over the global batch, so they do not depend on the number of processes or on the
  micro-batch size (up to float rounding), dropout excepted (its masks are drawn per process).
- DDP (``DistributedDataParallel``) keeps a full replica per process; ``--fsdp`` shards
  parameters, gradients and AdamW moments with FSDP2 (``fully_shard``): each block's layers form
  one unit, and the embeddings, the adaLN projections (which the model calls outside the
  blocks) and the output layer form the root unit.
- The EMA is kept on every process, sharded like the parameters under FSDP.
- Checkpoints are gathered into full tensors (``get_model_state_dict`` /
  ``get_optimizer_state_dict`` with ``full_state_dict=True, cpu_offload=True`` under FSDP) and
  written by rank 0 alone, in the single-process format; every process must be able to read the
  run directory and the data (a shared filesystem across machines).
- Torch RNG (dropout) states are per process: a checkpoint holds each rank's
  (``rng.torch`` for rank 0, ``rng.torch.rank<r>`` for the others, ``rng.cuda...`` on CUDA).
  Resuming on the same number of processes restores every rank's own state (exact resume);
  on another number, rank r takes rank r's state where the checkpoint has one and otherwise
  a state seeded from (seed, step, r).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from bd3.diffusion.objective import loss_given_noise
from bd3.errors import Bd3Error
from bd3.runtime import resolve_device

TIMEOUT = timedelta(minutes=30)  # rank 0 validates and writes checkpoints while the others wait


@dataclass
class Parallel:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    fsdp: bool = False
    device: torch.device = torch.device("cpu")  # where the process group exchanges tensors (CUDA under nccl)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over the processes."""
        if not self.distributed:
            return value
        value = value.clone()
        dist.all_reduce(value)
        return value / self.world_size

    def max_int(self, value: int, device: torch.device) -> int:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def broadcast(self, value):
        """Rank 0's ``value`` (anything JSON represents) on every process, sent as the bytes of
        its JSON text in a uint8 tensor: no pickle."""
        if not self.distributed:
            return value
        data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8) if self.main else None
        size = torch.tensor([0 if data is None else len(data)], dtype=torch.int64, device=self.device)
        dist.broadcast(size, src=0)
        buf = data.to(self.device) if data is not None else torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        dist.broadcast(buf, src=0)
        return json.loads(bytes(buf.cpu().numpy()).decode())

    def on_main(self, action):
        """``action()`` on rank 0 only; its Bd3Error is raised on every process (none waits forever)."""
        result, error = None, None
        if self.main:
            try:
                result = action()
            except Bd3Error as e:
                error = e
        message = self.broadcast(None if error is None else str(error))
        if error is not None:
            raise error
        if message is not None:
            raise Bd3Error(message)
        return result

    def gather(self, tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Every process's ``tensors`` (the same names and shapes on each), in rank order, on
        every process, on the CPU."""
        if not self.distributed:
            return [tensors]
        out = [{} for _ in range(self.world_size)]
        for name, tensor in tensors.items():
            parts = [torch.empty_like(tensor, device=self.device) for _ in range(self.world_size)]
            dist.all_gather(parts, tensor.to(self.device))
            for r, part in enumerate(parts):
                out[r][name] = part.cpu()
        return out


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise Bd3Error(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; start bd3 with torchrun.") from None


def setup(device_name: str, fsdp: bool) -> tuple[Parallel, torch.device]:
    """Join torchrun's process group if there is one; return (this process, its device)."""
    world = env_world_size()
    if world <= 1:
        if fsdp:
            raise Bd3Error("--fsdp shards the model over the processes torchrun starts; with one process drop --fsdp, "
                           "or start several: torchrun --nproc-per-node N -m bd3 pretrain --fsdp ...")
        return Parallel(), resolve_device(device_name)
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise Bd3Error("WORLD_SIZE is set but RANK is not; start several processes with torchrun --nproc-per-node N.") from None
    device = _process_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return Parallel(rank, world, local_rank, fsdp, device), device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _process_device(name: str, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK for auto/cuda where CUDA exists, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise Bd3Error("--device cuda was asked for but CUDA is not available here; use --device cpu.")
        if local_rank >= torch.cuda.device_count():
            raise Bd3Error(
                f"Process {local_rank} on this machine has no GPU ({torch.cuda.device_count()} visible); "
                "use --nproc-per-node at most the number of GPUs."
            )
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise Bd3Error(f"Under torchrun each process uses cuda:LOCAL_RANK; pass --device auto, cuda or cpu, not {name}.")


# -- the split of a step -------------------------------------------------------------------


def resolve_global_batch(global_batch_size: int, batch_size: int, world_size: int, resume: bool) -> int:
    """The run's global batch: as given; for a new run 0 means batch_size x processes; a run
    written before the option existed (0 on resume) was trained on one process."""
    if global_batch_size:
        return global_batch_size
    return batch_size if resume else batch_size * world_size


def micro_batches(global_batch: int, batch_size: int, world_size: int) -> tuple[int, int]:
    """(micro-batch rows, micro-batches per step) for each of ``world_size`` processes: the
    largest micro-batch that divides the process's share and is at most ``batch_size``."""
    if global_batch % world_size:
        raise Bd3Error(
            f"The global batch of {global_batch} sequences does not split evenly over {world_size} processes; "
            f"use a number of processes that divides {global_batch}, or another --global-batch-size."
        )
    share = global_batch // world_size
    micro = max(d for d in range(1, min(batch_size, share) + 1) if share % d == 0)
    return micro, share // micro


def local_rows(global_batch: int, world_size: int, rank: int, micro: int) -> list[slice]:
    """The slices of the global batch that process ``rank`` computes, one per micro-batch."""
    share = global_batch // world_size
    return [slice(rank * share + k, rank * share + k + micro) for k in range(0, share, micro)]


def rank_seed(seed: int, step: int, rank: int) -> int:
    """A torch seed for a process that has no saved RNG state (a new rank on resume)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


# -- wrapping the model --------------------------------------------------------------------


class Objective(nn.Module):
    """The training loss as one module call, so DDP and FSDP2 see the whole step as the
    wrapped module's forward (the objective calls the unwrapped model inside it)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x0, noise, cfg, mask_id: int) -> torch.Tensor:
        """The mean training loss of rows ``x0`` given their noise (a ``Noise``, None for AR),
        as ``diffusion_loss`` computes it after drawing the noise."""
        return loss_given_noise(self.model, x0, noise, cfg, mask_id, weighting=cfg.weighting).mean


def wrap(model: nn.Module, par: Parallel, device: torch.device) -> nn.Module:
    """The module a step calls: the objective, under DDP or FSDP2 when there are several
    processes. FSDP2 shards ``model``'s parameters in place (they become DTensors)."""
    objective = Objective(model)
    if not par.distributed:
        return objective
    if par.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # The layers' outputs are views (linear layers on 3-d inputs); the model never changes
        # them in place, which is what FSDP2 warns about on every forward.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        mesh = init_device_mesh(device.type, (par.world_size,))
        for block in model.blocks:
            # adaLN_modulation is called by the model outside the block: it stays in the root unit
            layers = [m for name, m in block.named_children() if name != "adaLN_modulation" and any(True for _ in m.parameters())]
            fully_shard(layers, mesh=mesh)
        fully_shard(objective, mesh=mesh)
        return objective
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(objective, device_ids=ids, broadcast_buffers=False, gradient_as_bucket_view=True)


def sync_gradients(engine: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """DDP: no all-reduce before the last micro-batch. FSDP2 reduce-scatters every micro-batch
    (its default), which keeps the gradients sharded."""
    if not last and isinstance(engine, nn.parallel.DistributedDataParallel):
        return engine.no_sync()
    return contextlib.nullcontext()


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """The global gradient norm (over every shard under FSDP); gradients are scaled to
    ``max_norm`` when it is positive, as ``clip_grad_norm_``."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


# -- full state for checkpoints (FSDP) ------------------------------------------------------


def full_tensors(tensors: dict[str, torch.Tensor], main: bool) -> dict[str, torch.Tensor]:
    """DTensors gathered one at a time (every process takes part); rank 0 keeps CPU copies."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in tensors.items():
        full = v.full_tensor() if isinstance(v, DTensor) else v
        if main:
            out[k] = full.detach().cpu()
    return out


def full_model_state(model: nn.Module, main: bool) -> dict[str, torch.Tensor]:
    """The unsharded weights on rank 0 (an empty dict elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if main else {}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, main: bool) -> dict:
    """The unsharded AdamW state on rank 0 as ``optimizer.state_dict()`` lays it out (parameters
    numbered in ``model.parameters()`` order), so the file matches a single-process one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not main:
        return {}
    index = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    state = {index[name]: s for name, s in osd["state"].items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]
    return {"state": state, "param_groups": groups}


def shard_optimizer_state(state: dict, params: list[nn.Parameter]) -> dict:
    """An ``optimizer.state_dict()`` of full tensors laid out on sharded parameters: moments
    as DTensor shards like their parameter, scalars (AdamW's step) as they are."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    def shard(value: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
        if not isinstance(p, DTensor) or value.dim() == 0:
            return value
        return distribute_tensor(value.to(p.device), p.device_mesh, p.placements)

    moments = {idx: {k: shard(v, params[idx]) for k, v in s.items()} for idx, s in state["state"].items()}
    return {"state": moments, "param_groups": state["param_groups"]}


def shard_like(full: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors laid out as ``like`` (DTensor shards where ``like`` has DTensors)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    out = {}
    for k, ref in like.items():
        value = full[k].to(ref.device)
        out[k] = distribute_tensor(value, ref.device_mesh, ref.placements) if isinstance(ref, DTensor) else value
    return out
