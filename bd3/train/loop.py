"""``train(cfg, shards, out)``: the one library call behind ``bd3 pretrain`` and ``bd3 finetune``.

Everything that decides the next step is part of a checkpoint (weights, EMA, AdamW moments,
the step, the data position, the torch and noise RNG states), so ``resume=True`` continues a
run with exactly the losses it would have had without the interruption (same device).

Under torchrun the same loop runs on every process (DDP, or FSDP2 with ``fsdp=True``), and a
step may be split into micro-batches (``global_batch_size``); see :mod:`bd3.train.distributed`.

Around this module: :mod:`bd3.train.state` writes and restores the training state of a
checkpoint, :mod:`bd3.train.validation` scores each checkpoint (and runs the clip search).
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from bd3.choices import check_loggers
from bd3.config import RunConfig
from bd3.data.shards import TokenShards, unigram_perplexity
from bd3.diffusion.objective import diffusion_loss, draw_noise
from bd3.errors import Bd3Error, Stopped
from bd3.model import DiT
from bd3.model.backends import resolve_attn
from bd3.paths import check_room
from bd3.runs import Run, load_strict
from bd3.runtime import autocast, configure_model, resolve_precision
from bd3.train import distributed as dist_
from bd3.train.distributed import Parallel
from bd3.train.ema import EMA
from bd3.train.loggers import Loggers, open_loggers, read_state
from bd3.train.state import Batches, restore, save
from bd3.train.validation import checkpoint


def lr_at(step: int, cfg) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then constant (the reference's schedule)."""
    if cfg.warmup_steps == 0:
        return cfg.lr
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)


def fill_data_config(cfg: RunConfig, shards: TokenShards) -> RunConfig:
    """The run's data config with the tokenizer's special ids from the shards' meta.json."""
    m = shards.meta
    if m["length"] != cfg.model.length:
        raise Bd3Error(f"The token shards in {shards.path} have length {m['length']}, the model {cfg.model.length}; re-tokenize with --length {cfg.model.length}.")
    data = replace(
        cfg.data,
        vocab_size=m["vocab_size"], mask_id=m["mask_id"], bos_id=m["bos_id"], eos_id=m["eos_id"],
        pad_id=m["pad_id"], tokenizer_sha256=m["tokenizer_sha256"], wrap=shards.wrap,
    )
    return replace(cfg, data=data)


class Trainer:
    """The model, its optimiser, EMA, data order and RNG: all a checkpoint restores."""

    def __init__(
        self, cfg: RunConfig, shards: TokenShards, device: torch.device, precision: str, attn: str = "sdpa", compile: bool = False,
        par: Parallel | None = None,
    ) -> None:
        self.cfg, self.device, self.precision = cfg, device, precision
        self.par = par or Parallel()
        tcfg = cfg.train
        torch.manual_seed(tcfg.seed)
        self.model = configure_model(DiT(cfg.model, cfg.data.vocab_size).to(device), attn, compile)
        if self.par.rank > 0:  # dropout masks differ between processes; rank 0 keeps the one-process stream
            torch.manual_seed(dist_.rank_seed(tcfg.seed, 0, self.par.rank))
        self.engine: torch.nn.Module | None = None  # set by distribute() when steps are split
        self.optimizer = self._new_optimizer()
        self.ema = EMA(self.model, tcfg.ema_decay)
        self.global_batch = dist_.resolve_global_batch(tcfg.global_batch_size, tcfg.batch_size, self.par.world_size, resume=False)
        self.micro, self.accum = dist_.micro_batches(self.global_batch, tcfg.batch_size, self.par.world_size)
        self.data = Batches(shards.rows("train"), self.global_batch, tcfg.seed)
        self.noise = torch.Generator(device=device).manual_seed(tcfg.seed)  # the same on every process
        self.step = 0
        self.skipped = 0  # non-finite steps tolerated so far
        self.last_validation: dict | None = None
        self.loggers = Loggers()  # experiment trackers (rank 0), set by train()

    def _new_optimizer(self) -> torch.optim.Optimizer:
        """AdamW, fused (one kernel over all parameters; benchmarks/README.md times it against
        foreach); foreach for FSDP's sharded parameters."""
        tcfg = self.cfg.train
        kind = {"foreach": True} if self.sharded else {"fused": True}
        return torch.optim.AdamW(self.model.parameters(), lr=tcfg.lr, betas=tcfg.betas, weight_decay=tcfg.weight_decay, **kind)

    @property
    def sharded(self) -> bool:
        return self.par.fsdp and self.engine is not None and self.par.distributed

    def distribute(self) -> None:
        """Split each step over the processes and micro-batches (nothing to do for one process
        and one batch). Under FSDP the weights, EMA and AdamW state loaded so far are sharded."""
        if not self.par.distributed and self.accum == 1:
            return
        self.local_rows = dist_.local_rows(self.global_batch, self.par.world_size, self.par.rank, self.micro)
        self.engine = dist_.wrap(self.model, self.par, self.device)
        if self.sharded:
            full_opt = self.optimizer.state_dict()
            self.optimizer = self._new_optimizer()
            self.optimizer.load_state_dict(dist_.shard_optimizer_state(full_opt, list(self.model.parameters())))
            self.ema.shadow = dist_.shard_like(self.ema.shadow, self.model.state_dict())

    def train_step(self) -> tuple[float, float]:
        """One optimiser step; returns (loss, gradient norm). A non-finite loss or gradient
        leaves the weights untouched."""
        self.step += 1
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step - 1, self.cfg.train)
        x0 = self.data.next().to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._backward(x0) if self.engine is None else self._split_backward(x0)
        if torch.isfinite(loss):
            grad_norm = dist_.clip_gradients(list(self.model.parameters()), self.cfg.train.grad_clip)
            if torch.isfinite(grad_norm):
                self.optimizer.step()
                self.ema.update(self.model)
                return loss.item(), float(grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item(), float("nan")

    def _backward(self, x0: torch.Tensor) -> torch.Tensor:
        """The batch's loss, and its gradients when it is finite (one process, one batch)."""
        with autocast(self.device, self.precision):
            loss = diffusion_loss(self.model, x0, self.cfg.diffusion, self.cfg.data.mask_id, generator=self.noise).mean
        if torch.isfinite(loss):
            loss.backward()
        return loss.detach()

    def _split_backward(self, x0: torch.Tensor) -> torch.Tensor:
        """:meth:`_backward` with the global batch split over processes and micro-batches.
        Every process draws the global batch and its noise (the same generator state
        everywhere), then computes its own rows; the loss and gradient are global means."""
        d, mask_id = self.cfg.diffusion, self.cfg.data.mask_id
        noise = None
        if d.algo != "ar":
            with autocast(self.device, self.precision):
                noise = draw_noise(x0, d, mask_id, clip=d.clip, resample=d.resample, estimator=d.estimator, generator=self.noise)
        total = torch.zeros((), device=self.device)
        for k, rows in enumerate(self.local_rows):
            with dist_.sync_gradients(self.engine, k == len(self.local_rows) - 1), autocast(self.device, self.precision):
                loss = self.engine(x0[rows], None if noise is None else noise.rows(rows), d, mask_id)
            (loss / self.accum).backward()
            total += loss.detach()
        return self.par.mean(total / self.accum)

    @contextlib.contextmanager
    def ema_weights(self, ema: dict[str, torch.Tensor] | None = None):
        """A copy of the model holding the EMA weights (what evaluation and sampling use);
        ``ema``: full EMA tensors (under FSDP, from :meth:`weights`)."""
        with torch.random.fork_rng(devices=[]):  # building it must not move the training RNG
            model = DiT(self.cfg.model, self.cfg.data.vocab_size).to(self.device)
        model.attn = self.model.attn
        model.load_state_dict(self.ema.state_dict() if ema is None else ema)
        yield model


def train(
    cfg: RunConfig,
    shards: TokenShards,
    out: Path,
    *,
    init_weights: dict[str, torch.Tensor] | None = None,
    init_source: str = "",
    force: bool = False,
    resume: bool = False,
    console: Console | None = None,
    attn: str = "auto",
    compile: bool = False,
    fsdp: bool = False,
    loggers: Sequence[str] = (),
) -> dict:
    """Train a model on ``shards`` into the run directory ``out``; return the summary dict.

    With ``resume`` the run in ``out`` continues from its newest complete checkpoint (its
    config.json is authoritative; ``cfg.train.steps`` may extend it). ``attn`` (an attention
    backend, bd3.model.backends), ``compile`` (torch.compile each block) and ``fsdp`` (shard
    with FSDP2 instead of DDP under torchrun) are runtime choices: they change no result
    beyond float rounding, and are not saved. ``loggers``: experiment trackers
    (:mod:`bd3.train.loggers`) that get every metrics.jsonl record; with ``resume`` and none
    given, those the run used.

    Under torchrun every process calls this; rank 0 alone writes the run directory, logs and
    prints, and returns the summary (the others return an empty dict).
    """
    cfg = fill_data_config(cfg, shards)
    par, device = dist_.setup(cfg.train.device, fsdp)
    try:
        out = Path(par.broadcast(str(out)))  # rank 0's (a default run name is drawn at random)
        if not par.main:
            console = Console(stderr=True, quiet=True)
        return _train(cfg, shards, out, par, device, init_weights, init_source, force, resume,
                      console or Console(stderr=True), attn, compile, loggers)
    finally:
        if par.distributed:
            dist_.shutdown()


def _train(cfg, shards, out, par, device, init_weights, init_source, force, resume, console, attn, compile, loggers=()) -> dict:
    tcfg = cfg.train
    global_batch = dist_.resolve_global_batch(tcfg.global_batch_size, tcfg.batch_size, par.world_size, resume)
    cfg = replace(cfg, train=replace(tcfg, global_batch_size=global_batch))
    if not resume and dist_.micro_batches(global_batch, tcfg.batch_size, par.world_size)[0] != tcfg.batch_size:
        raise Bd3Error(
            f"--global-batch-size {global_batch} is not a multiple of --batch-size {tcfg.batch_size} x "
            f"{par.world_size} process(es); pass a multiple, or leave it out."
        )
    precision = resolve_precision(cfg.train.precision, device)
    trainer = Trainer(cfg, shards, device, precision, resolve_attn(attn, device), compile, par)
    need = checkpoint_bytes(trainer.model)
    if resume:  # every check before the first write: a refused resume leaves the run as it was
        run = Run.open(out)
        if run.config.data.tokenizer_sha256 != cfg.data.tokenizer_sha256:
            raise Bd3Error(f"The data's tokenizer does not match run {run.path}; resume with the run's own data.")
        ckpts = run.checkpoints()
        if not ckpts:
            command = "finetune" if run.config.train.parent else "pretrain"
            raise Bd3Error(
                f"{run.path} has no complete checkpoint to resume from (it stopped before its first save); start it over "
                f"with `bd3 {command} --out {run.path} --force` and its options."
            )
        done = int(run.train_state(ckpts[-1]).get("step", 0))
        if done >= cfg.train.steps:
            raise Bd3Error(f"{run.path} already has {done} of {cfg.train.steps} steps; pass a larger --steps to continue.")
        par.on_main(lambda: check_room(run.path / "checkpoints", need, "move the run to a disk with room"))
        restore(trainer, run, ckpts[-1])
        run.config = cfg
        par.on_main(run.write_config)
        par.on_main(run.remove_partial_checkpoints)
        par.on_main(lambda: run.truncate_metrics(trainer.step))
    else:
        if init_weights is not None:
            load_strict(trainer.model, init_weights, init_source)
            trainer.ema = EMA(trainer.model, cfg.train.ema_decay)
        par.on_main(lambda: check_room(out, need, "choose another --out"))
        run = par.on_main(lambda: Run.create(out, cfg, shards.tokenizer.to_json(), force=force)) or Run(out, cfg)
    trainer.distribute()
    _announce(console, run, trainer, resumed=resume)
    trainer.loggers = par.on_main(lambda: _open_loggers(loggers, run, trainer, resume, console)) or Loggers()
    run.listeners.append(trainer.loggers.log)
    try:
        with _stop_requests() as stop:
            elapsed = _loop(trainer, run, shards, console, stop)
        if not par.main:
            return {}
        return _summarise(trainer, run, shards, console, elapsed)
    finally:
        trainer.loggers.close()


def _open_loggers(names: Sequence[str], run: Run, trainer: Trainer, resume: bool, console: Console) -> Loggers:
    """The trackers asked for (on --resume without any: those the run used), started at the trainer's step."""
    if resume and not names:
        names = read_state(run.path).get("loggers", [])
    if not names:
        return Loggers()

    def warn(line: str) -> None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    return open_loggers(check_loggers(names), run.path, trainer.cfg.to_dict(), trainer.step, warn)


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """About one checkpoint's size: the weights, their EMA and AdamW's two moments, in float32."""
    return 4 * sum(p.numel() for p in model.parameters()) * 4 + (1 << 20)


def _loop(trainer: Trainer, run: Run, shards: TokenShards, console: Console, stop: dict) -> float:
    cfg = trainer.cfg
    tcfg = cfg.train
    tokens_per_step = trainer.global_batch * cfg.model.length
    main = trainer.par.main
    start = time.perf_counter()
    window_loss, window_steps, window_start = 0.0, 0, start
    trainer.model.train()
    with _progress(console) as progress:
        task = progress.add_task("train", total=tcfg.steps, completed=trainer.step, stats="")
        while trainer.step < tcfg.steps:
            loss, grad_norm = trainer.train_step()
            step = trainer.step
            finite = np.isfinite(grad_norm)
            if finite:
                window_loss += loss
                window_steps += 1
            else:  # the weights are as before the step; a checkpoint due at this step is still written
                trainer.skipped += 1
                if main:
                    run.log({"step": step, "event": "nonfinite", "loss": loss, "skipped_steps": trainer.skipped})
                if trainer.skipped > tcfg.skip_nonfinite:
                    last = run.checkpoints()
                    kept = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
                    raise Bd3Error(
                        f"The loss or its gradient became non-finite ({loss}) at step {step}; {kept}. "
                        "Lower --lr, use --precision fp32, or pass --skip-nonfinite N to skip up to N such steps."
                    )
            if finite and (step % tcfg.log_every == 0 or step == tcfg.steps):
                now = time.perf_counter()
                record = {
                    "step": step, "loss": window_loss / max(window_steps, 1), "lr": lr_at(step - 1, tcfg),
                    "grad_norm": grad_norm, "tokens_per_s": window_steps * tokens_per_step / (now - window_start),
                    "elapsed_s": now - start, "tokens": step * tokens_per_step,
                }
                if main:
                    run.log(record)
                stats = f"loss {record['loss']:.3f}  lr {record['lr']:.2e}  {record['tokens_per_s']:.0f} tok/s"
                progress.update(task, stats=stats)
                if not console.is_terminal:
                    console.print(f"step {step}/{tcfg.steps}  {stats}  {record['elapsed_s']:.0f}s")
                window_loss, window_steps, window_start = 0.0, 0, now
            progress.update(task, completed=step)
            if trainer.par.distributed:  # a signal that reached one process stops them all, at the same step
                _agree_on_stop(stop, trainer)
            if stop["signal"]:
                path = save(trainer, run)
                name, code = stop["signal"]
                if path is None:  # not rank 0, which says where it saved
                    raise Stopped(f"{name} received: process {trainer.par.rank} stopped at step {step}.", code)
                raise Stopped(f"{name} received: saved {path} at step {step}. Continue with --resume.", code)
            if step == tcfg.steps or (tcfg.save_every and step % tcfg.save_every == 0):
                checkpoint(trainer, run, shards)
    return time.perf_counter() - start


def _agree_on_stop(stop: dict, trainer: Trainer) -> None:
    code = trainer.par.max_int(stop["signal"][1] if stop["signal"] else 0, trainer.device)
    if code and not stop["signal"]:
        stop["signal"] = ("SIGINT" if code == 130 else "SIGTERM", code)


def _summarise(trainer: Trainer, run: Run, shards: TokenShards, console: Console, elapsed: float) -> dict:
    tcfg = trainer.cfg.train
    result = trainer.last_validation
    valid = shards.rows("valid")
    unigram = unigram_perplexity(shards.unigram_counts("train"), valid[: tcfg.eval_batches * tcfg.batch_size])
    summary = {
        "event": "summary", "step": trainer.step, "elapsed_s": elapsed, "valid_nelbo": result["nelbo"],
        "valid_nelbo_se": result["nelbo_se"], "valid_ppl": result["ppl"], "valid_ppl_ci95": result["ppl_ci95"],
        "estimator": result["estimator"], "valid_tokens": result["tokens"], "unigram_ppl": unigram, "bound": result["bound"],
    }
    run.log(summary)
    bound = "<= " if result["bound"] else ""
    low, high = result["ppl_ci95"]
    console.print(
        f"Done in {elapsed / 60:.1f} min: validation perplexity {bound}{result['ppl']:.2f} (95 % interval {low:.2f}-{high:.2f}, "
        f"estimator {result['estimator']}; unigram model of the same tokens: {unigram:.2f}) over {result['tokens']} tokens. Run: {run.path}"
    )
    return summary


def _announce(console: Console, run: Run, trainer: Trainer, resumed: bool) -> None:
    cfg = trainer.cfg
    d = cfg.diffusion
    n_params = sum(p.numel() for p in trainer.model.parameters())
    verb = f"resuming at step {trainer.step}" if resumed else ("finetune" if cfg.train.parent else "pretrain")
    console.print(
        f"[bold]bd3 {verb}[/] -> {run.path}  {d.algo}, block size {d.block_size}, clip {list(d.clip)}, "
        f"{n_params / 1e6:.1f}M parameters, {len(trainer.data.rows)} train rows x {cfg.model.length} tokens, "
        f"{trainer.device} {trainer.precision}, attention {trainer.model.attn}{_split(trainer)}"
    )


def _split(trainer: Trainer) -> str:
    """How a step is split, when it is: ``, 2 processes (DDP) x 2 micro-batches of 4 = 16 rows per step``."""
    if trainer.engine is None:
        return ""
    par = trainer.par
    engine = f"{par.world_size} processes ({'FSDP2' if par.fsdp else 'DDP'}) x " if par.distributed else ""
    return f", {engine}{trainer.accum} micro-batch(es) of {trainer.micro} = {trainer.global_batch} rows per step"


@contextlib.contextmanager
def _stop_requests():
    """SIGINT (Ctrl-C) and SIGTERM ask the loop to save and stop after the current step; a
    second Ctrl-C interrupts at once."""
    stop: dict = {"signal": None}

    def on_signal(signum, frame):
        if signum == signal.SIGINT and stop["signal"]:
            raise KeyboardInterrupt
        stop["signal"] = ("SIGINT", 130) if signum == signal.SIGINT else ("SIGTERM", 143)

    try:
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave signals alone
        previous = {}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), console=console, transient=False,
        disable=not console.is_terminal or console.quiet,
    )
