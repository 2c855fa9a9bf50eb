"""``train(cfg, shards, out)``: the one library call behind ``bd3 pretrain`` and ``bd3 finetune``."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from bd3 import __version__
from bd3.config import RunConfig
from bd3.data.shards import TokenShards, unigram_perplexity
from bd3.diffusion.objective import diffusion_loss
from bd3.errors import Bd3Error
from bd3.evaluate.perplexity import nelbo_perplexity
from bd3.model import DiT
from bd3.runs import Run, load_strict
from bd3.runtime import autocast, resolve_device, resolve_precision
from bd3.train.ema import EMA


class Batches:
    """Shuffled rows, epoch by epoch; (epoch, position) is the data position for resuming."""

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int) -> None:
        if len(rows) < batch_size:
            raise Bd3Error(
                f"The training split has {len(rows)} rows of tokens, fewer than the batch size {batch_size}; "
                "use a smaller --batch-size or --length, or more data."
            )
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.epoch, self.position = 0, 0
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
        pad_id=m["pad_id"], tokenizer_sha256=m["tokenizer_sha256"],
    )
    return replace(cfg, data=data)


def train(
    cfg: RunConfig,
    shards: TokenShards,
    out: Path,
    *,
    init_weights: dict[str, torch.Tensor] | None = None,
    init_source: str = "",
    force: bool = False,
    console: Console | None = None,
) -> dict:
    """Train a model on ``shards`` into the run directory ``out``; return the summary dict."""
    console = console or Console(stderr=True)
    cfg = fill_data_config(cfg, shards)
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    tcfg, dcfg = cfg.train, cfg.diffusion
    torch.manual_seed(tcfg.seed)

    model = DiT(cfg.model, cfg.data.vocab_size).to(device)
    if init_weights is not None:
        load_strict(model, init_weights, init_source)
    run = Run.create(out, cfg, shards.tokenizer.to_json(), force=force)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=tcfg.betas, weight_decay=tcfg.weight_decay, foreach=True)
    ema = EMA(model, tcfg.ema_decay)
    data = Batches(shards.rows("train"), tcfg.batch_size, tcfg.seed)
    noise = torch.Generator(device=device).manual_seed(tcfg.seed)
    tokens_per_step = tcfg.batch_size * cfg.model.length

    n_params = sum(p.numel() for p in model.parameters())
    console.print(
        f"[bold]bd3 {'finetune' if tcfg.parent else 'pretrain'}[/] -> {run.path}  "
        f"{dcfg.algo}, block size {dcfg.block_size}, clip {list(dcfg.clip)}, {n_params / 1e6:.1f}M parameters, "
        f"{len(data.rows)} train rows x {cfg.model.length} tokens, {device} {precision}"
    )
    start = time.perf_counter()
    window_loss, window_steps, window_start = 0.0, 0, start
    model.train()
    with _progress(console) as progress:
        task = progress.add_task("train", total=tcfg.steps, stats="")
        for step in range(1, tcfg.steps + 1):
            lr = lr_at(step - 1, tcfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x0 = data.next().to(device)
            with autocast(device, precision):
                losses = diffusion_loss(model, x0, dcfg, cfg.data.mask_id, generator=noise)
            loss = losses.mean
            if not torch.isfinite(loss):
                raise Bd3Error(f"The loss became {loss.item()} at step {step}; lower --lr or use --precision fp32.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip) if tcfg.grad_clip > 0 else torch.tensor(0.0)
            optimizer.step()
            ema.update(model)
            window_loss += loss.item()
            window_steps += 1

            if step % tcfg.log_every == 0 or step == tcfg.steps:
                now = time.perf_counter()
                record = {
                    "step": step,
                    "loss": window_loss / window_steps,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": window_steps * tokens_per_step / (now - window_start),
                    "elapsed_s": now - start,
                    "tokens": step * tokens_per_step,
                }
                run.log(record)
                stats = f"loss {record['loss']:.3f}  lr {lr:.2e}  {record['tokens_per_s']:.0f} tok/s"
                progress.update(task, stats=stats)
                if not console.is_terminal:
                    console.print(f"step {step}/{tcfg.steps}  {stats}  {record['elapsed_s']:.0f}s")
                window_loss, window_steps, window_start = 0.0, 0, now
            progress.update(task, completed=step)
            if tcfg.save_every and step % tcfg.save_every == 0 and step != tcfg.steps:
                _save(run, step, model, optimizer, ema, data, noise)

    _save(run, tcfg.steps, model, optimizer, ema, data, noise)
    elapsed = time.perf_counter() - start

    load_strict(model, {k: v.to(next(model.parameters()).dtype) for k, v in ema.state_dict().items()}, "EMA weights")
    valid = shards.rows("valid")
    result = nelbo_perplexity(
        model, valid, dcfg, cfg.data.mask_id, batch_size=tcfg.batch_size, max_batches=tcfg.eval_batches,
        seed=tcfg.seed, device=device,
    )
    unigram = unigram_perplexity(shards.unigram_counts("train"), valid[: tcfg.eval_batches * tcfg.batch_size])
    summary = {
        "event": "summary", "step": tcfg.steps, "elapsed_s": elapsed, "valid_nelbo": result["nelbo"],
        "valid_ppl": result["ppl"], "valid_tokens": result["tokens"], "unigram_ppl": unigram, "bound": result["bound"],
    }
    run.log(summary)
    bound = "<= " if result["bound"] else ""
    console.print(
        f"Done in {elapsed / 60:.1f} min: validation perplexity {bound}{result['ppl']:.2f} "
        f"(unigram model of the same tokens: {unigram:.2f}) over {result['tokens']} tokens. Run: {run.path}"
    )
    return summary


def _save(run: Run, step: int, model, optimizer, ema: EMA, data: Batches, noise: torch.Generator) -> Path:
    """Model, EMA, optimiser moments and RNG states in safetensors; counters in JSON."""
    opt = optimizer.state_dict()
    tensors = {}
    for idx, state in opt["state"].items():
        for name, value in state.items():
            tensors[f"optimizer.{idx}.{name}"] = torch.as_tensor(value)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.noise"] = noise.get_state()
    state = {
        "step": step,
        "ema_updates": ema.updates,
        "data": {"epoch": data.epoch, "position": data.position, "seed": data.seed},
        "optimizer_param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]],
        "bd3_version": __version__,
    }
    return run.save_checkpoint(step, model.state_dict(), ema.state_dict(), tensors, state)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), console=console, transient=False,
        disable=not console.is_terminal,
    )
