"""`bd3 pretrain` and `bd3 finetune`: options -> RunConfig -> bd3.train.train.

torch and the data libraries are imported in the command bodies, after parsing.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from bd3.cli import options as o
from bd3.config import ALGOS, MODEL_PRESETS, DataConfig, DiffusionConfig, RunConfig, TrainConfig, model_config
from bd3.errors import Bd3Error

Steps = Annotated[
    Optional[int],
    typer.Option(help="Optimiser steps (pretrain default 1500, finetune 300); with --resume, the new total.", min=1, show_default=False),
]
Lr = Annotated[float, typer.Option(help="Peak AdamW learning rate.", min=0.0, callback=o.finite)]
Warmup = Annotated[int, typer.Option(help="Linear warm-up steps.", min=0)]
FINETUNE_STEPS = 300
Out = Annotated[Optional[Path], typer.Option(help="Run directory to create. Default: runs/<readable-unique-name>.", show_default=False)]
LogEvery = Annotated[int, typer.Option(help="Log every N steps (progress line and metrics.jsonl).", min=1)]
SaveEvery = Annotated[int, typer.Option(help="Also save a checkpoint every N steps (0: only at the end).", min=0)]
Resample = Annotated[bool, typer.Option("--resample", help="Force each block's realised mask rate into the clip interval.")]
Resume = Annotated[
    bool,
    typer.Option(
        "--resume", help="Continue the run named by --out (default: the newest under ./runs) from its newest checkpoint, "
        "with exactly the losses of an uninterrupted run; its config.json is used: --steps and run-time options (--device, "
        "--threads, --log-every, --save-every, --keep-last) may change, other options must agree with it."
    ),
]
Schedule = Annotated[
    str,
    typer.Option(help="Noise schedule: linear (alias loglinear), cosine, square, sqrt, log, gaussian[:mu=M:sigma=S], bimodal[:mu1=..:sigma1=..:mu2=..:sigma2=..:w=W]."),
]
Weighting = Annotated[str, typer.Option(help="Loss reweighting in the log-SNR: elbo (none), edm, iddpm, sigmoid[:k=K], fm, simple. Evaluation always reports the unweighted NELBO.")]
ClipSearch = Annotated[bool, typer.Option("--clip-search", help="At every validation, score the paper's grid of clip intervals by NELBO variance and train with the minimiser from then on.")]
FixClip = Annotated[bool, typer.Option("--fix-clip", help="With --clip-search: only report the search, keep the interval.")]
Variance = Annotated[str, typer.Option("--variance", help="Which variance the clip search minimises: paper (across batches) or block (the reference code's).")]
EvalBatches = Annotated[int, typer.Option(help="Validation batches at each checkpoint (and per interval of the clip search).", min=1)]
KeepLast = Annotated[int, typer.Option(help="Keep only the newest N checkpoints (the best one is always kept); 0 keeps all.", min=0)]
BatchSize = Annotated[int, typer.Option(help="Sequences per forward pass on each process (the micro-batch).", min=1)]
GlobalBatchSize = Annotated[
    Optional[int],
    typer.Option(
        help="Sequences per optimiser step over all processes; micro-batches are accumulated up to it. "
        "Default: --batch-size x the number of processes.", min=1, show_default=False,
    ),
]
Fsdp = Annotated[
    bool,
    typer.Option("--fsdp", help="Under torchrun: shard weights, gradients and optimizer state with FSDP2 instead of DDP (same checkpoints, same losses)."),
]


def _check_loggers(values: list[str] | None) -> list[str]:
    from bd3.choices import check_loggers

    try:
        return check_loggers(values or [])
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


Logger = Annotated[
    Optional[list[str]],
    typer.Option(
        "--logger", help="Also log to an experiment tracker: tensorboard (event files in RUN/tb) or wandb (offline when "
        "the W&B host cannot be reached); repeatable. Each is an extra: pip install 'bd3[tensorboard]'. "
        "With --resume: default, the run's own.", callback=_check_loggers, show_default=False, metavar="<tensorboard|wandb>",
    ),
]
PretrainPrecision = o.precision("pretrain", o.TRAIN_PRECISION_HELP)
FinetunePrecision = o.precision("finetune", o.TRAIN_PRECISION_HELP)
SkipNonfinite = Annotated[int, typer.Option(help="Skip up to N steps whose loss or gradient is not finite (default: stop at the first).", min=0)]


def pretrain(
    data: o.Data = "web",
    tokenizer: o.Tokenizer = "bpe",
    vocab_size: o.VocabSize = 8192,
    algo: Annotated[str, typer.Option(help=f"Algorithm: {', '.join(ALGOS)}.")] = "bd3lm",
    model: Annotated[str, typer.Option(help=f"Model size: {', '.join(MODEL_PRESETS)} (tiny = the reference's 256 wide, 8 layers, 8 heads).")] = "nano",
    length: o.Length = 128,
    wrap: o.Wrap = None,
    block_size: Annotated[int, typer.Option(help="Block size L' (must divide the length).", min=1)] = 16,
    clip: o.Clip = None,
    resample: Resample = False,
    schedule: Schedule = "linear",
    weighting: Weighting = "elbo",
    estimator: o.TrainEstimator = None,
    clip_search: ClipSearch = False,
    fix_clip: FixClip = False,
    variance: Variance = "paper",
    steps: Steps = None,
    batch_size: BatchSize = 16,
    global_batch_size: GlobalBatchSize = None,
    lr: Lr = 1e-3,
    warmup_steps: Warmup = 10,
    out: Out = None,
    force: o.Force = False,
    seed: o.Seed = 1,
    device: o.Device = "auto",
    precision: PretrainPrecision = "auto",
    attn: o.Attn = "auto",
    compile_: o.Compile = False,
    fsdp: Fsdp = False,
    threads: o.Threads = None,
    log_every: LogEvery = 20,
    save_every: SaveEvery = 200,
    eval_batches: EvalBatches = 16,
    keep_last: KeepLast = 0,
    skip_nonfinite: SkipNonfinite = 0,
    logger: Logger = None,
    resume: Resume = False,
    ctx: typer.Context = None,
) -> None:
    """Train a BD3-LM from scratch (with no options: a small model on the built-in corpus).

    Examples:

    \b
      bd3 pretrain                                    # nano model, built-in `web` corpus, ~10 min on 2 CPU cores
      bd3 pretrain --block-size 128 --data web        # MDLM-like pre-training at L' = L
      bd3 pretrain --algo sedd                        # the SEDD baseline (score entropy, absorbing graph)
      bd3 pretrain --data owt --tokenizer gpt2 --model small --length 1024 --wrap raw --out runs/owt
      bd3 pretrain --data 'books/*.txt' --tokenizer bpe --vocab-size 16384 --steps 5000
      bd3 pretrain --resume --out runs/owt --steps 20000  # continue after a crash or Ctrl-C
      bd3 pretrain --logger tensorboard --logger wandb  # also to TensorBoard (runs/NAME/tb) and W&B
      torchrun --nproc-per-node 8 -m bd3 pretrain --data owt --tokenizer gpt2 --model small --length 1024 \\
          --batch-size 64 --global-batch-size 512 --out runs/owt    # DDP on 8 GPUs (add --fsdp to shard)
    """
    if algo not in ALGOS:
        raise typer.BadParameter(f"{algo!r} is not one of {', '.join(ALGOS)}.", param_hint="--algo")
    if model not in MODEL_PRESETS:
        raise typer.BadParameter(f"{model!r} is not one of {', '.join(MODEL_PRESETS)}.", param_hint="--model")
    _check_clip_search(ctx, clip_search)
    if resume:
        return _resume(ctx)
    from bd3.cli.common import err
    from bd3.model.backends import resolve_attn
    from bd3.runs import new_run_name
    from bd3.runs.load import shards_for
    from bd3.runtime import resolve_device, use_threads
    from bd3.train import train

    resolve_attn(attn, resolve_device(device))  # a backend that cannot run here fails before any tokenizing
    use_threads(threads)
    if Path(data).exists():  # a local file or folder: recorded absolute, so the run works from anywhere
        data = str(Path(data).resolve())
    with _option_errors():
        cfg = RunConfig(
            model=model_config(model, length, causal=algo == "ar"),
            diffusion=DiffusionConfig(
                algo=algo, block_size=block_size, **({"clip": clip} if clip else {}), resample=resample, schedule=schedule,
                weighting=weighting, estimator=estimator, clip_search=clip_search, fix_clip=fix_clip, variance=variance,
            ),
            data=DataConfig(data=data, tokenizer=tokenizer, wrap=wrap or "special"),
            train=TrainConfig(
                steps=steps or TrainConfig.steps, batch_size=batch_size, global_batch_size=global_batch_size or 0, lr=lr,
                warmup_steps=warmup_steps, seed=seed, device=device, precision=precision, log_every=log_every, save_every=save_every, keep_last=keep_last,
                skip_nonfinite=skip_nonfinite, eval_batches=eval_batches,
            ),
        )
    shards = shards_for(data, tokenizer, length, vocab_size, wrap)
    train(cfg, shards, out or new_run_name(cfg), force=force, console=err, attn=attn, compile=compile_, fsdp=fsdp, loggers=logger)


def finetune(
    run: o.RunArg = None,
    block_size: o.BlockSize = None,
    clip: o.Clip = None,
    resample: Resample = False,
    schedule: Annotated[Optional[str], typer.Option(help="Noise schedule (see pretrain). Default: the parent's.", show_default=False)] = None,
    weighting: Annotated[Optional[str], typer.Option(help="Loss reweighting (see pretrain). Default: the parent's.", show_default=False)] = None,
    estimator: o.TrainEstimator = None,
    clip_search: ClipSearch = False,
    fix_clip: FixClip = False,
    variance: Variance = "paper",
    steps: Steps = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Sequences per forward pass on each process. Default: the parent's.", min=1, show_default=False)] = None,
    global_batch_size: GlobalBatchSize = None,
    lr: Lr = 3e-4,
    warmup_steps: Warmup = 50,
    out: Out = None,
    force: o.Force = False,
    seed: o.Seed = 1,
    device: o.Device = "auto",
    precision: FinetunePrecision = "auto",
    attn: o.Attn = "auto",
    compile_: o.Compile = False,
    fsdp: Fsdp = False,
    threads: o.Threads = None,
    log_every: LogEvery = 20,
    save_every: SaveEvery = 100,
    eval_batches: EvalBatches = 16,
    keep_last: KeepLast = 0,
    skip_nonfinite: SkipNonfinite = 0,
    logger: Logger = None,
    resume: Resume = False,
    ctx: typer.Context = None,
) -> None:
    """Continue training a run's (EMA) weights at a new block size and clip interval,
    into a new run that records its parent.

    Examples:

    \b
      bd3 finetune --block-size 4 --clip 0.45,0.95    # the newest run under ./runs
      bd3 finetune runs/owt-pretrain --block-size 16 --clip 0.3,0.8 --steps 2000 --out runs/owt-bs16
      bd3 finetune --block-size 4 --clip-search           # pick the clip interval from data as it trains
      bd3 finetune --block-size 16 --schedule cosine --weighting sigmoid:k=0
      bd3 finetune --resume --out runs/owt-bs16
    """
    _check_clip_search(ctx, clip_search)
    if resume:
        return _resume(ctx)
    from bd3.cli.common import err
    from bd3.model.backends import resolve_attn
    from bd3.runs import new_run_name
    from bd3.runs.load import open_run, run_shards
    from bd3.runtime import resolve_device, use_threads
    from bd3.train import train

    resolve_attn(attn, resolve_device(device))
    use_threads(threads)
    parent = open_run(run)
    pcfg = parent.config
    if pcfg.diffusion.algo == "ar":
        raise Bd3Error(f"{parent.path} is an autoregressive run; fine-tuning changes the block size of BD3-LM runs only.")
    if pcfg.diffusion.algo == "sedd":
        raise Bd3Error(f"{parent.path} is a SEDD run (a time-conditioned score model); fine-tuning changes the block size of BD3-LM and MDLM runs only.")
    with _option_errors():
        cfg = RunConfig(
            model=pcfg.model,
            diffusion=replace(
                pcfg.diffusion, algo="bd3lm", block_size=block_size or pcfg.diffusion.block_size,
                clip=clip or pcfg.diffusion.clip, resample=resample, schedule=schedule or pcfg.diffusion.schedule,
                weighting=weighting or pcfg.diffusion.weighting, estimator=estimator, clip_search=clip_search, fix_clip=fix_clip, variance=variance,
            ),
            data=pcfg.data,
            train=replace(
                pcfg.train, steps=steps or FINETUNE_STEPS, batch_size=batch_size or pcfg.train.batch_size,
                global_batch_size=global_batch_size or 0, lr=lr,
                warmup_steps=warmup_steps, seed=seed, device=device, precision=precision, log_every=log_every,
                save_every=save_every, keep_last=keep_last, skip_nonfinite=skip_nonfinite, eval_batches=eval_batches,
                parent=str(parent.path),
            ),
        )
    ckpt = parent.latest_checkpoint()
    train(
        cfg, run_shards(parent), out or new_run_name(cfg), init_weights=parent.weights("ema", ckpt),
        init_source=str(ckpt / "ema.safetensors"), force=force, console=err, attn=attn, compile=compile_, fsdp=fsdp,
        loggers=logger,
    )


# Options that may differ from the resumed run's config: the new total of steps, and choices
# that change how the run executes, not what it computes.
RESUMABLE = ("steps", "out", "resume", "device", "attn", "compile_", "fsdp", "threads", "log_every", "save_every", "keep_last", "logger")


def _resume(ctx: typer.Context) -> None:
    """Continue the run named by --out from its newest complete checkpoint, with its own
    config and data; only the options in RESUMABLE may differ from that config."""
    from bd3.cli.common import err
    from bd3.runs.load import open_run, run_shards
    from bd3.runtime import use_threads
    from bd3.train import train

    p = ctx.params
    run = open_run(p["out"])
    cfg = run.config
    conflicts = [name for name in _given(ctx) if name not in RESUMABLE and not _agrees(cfg, name, p[name])]
    if conflicts:
        names = ", ".join("RUN" if name == "run" else "--" + name.rstrip("_").replace("_", "-") for name in conflicts)
        raise typer.BadParameter(
            f"{names} {'conflicts' if len(conflicts) == 1 else 'conflict'} with the config of {run.path}, which --resume "
            f"continues unchanged; drop {'it' if len(conflicts) == 1 else 'them'} (only --steps and run-time options such as "
            "--device, --threads, --log-every, --save-every may change).",
            param_hint="--resume",
        )
    changes = {name: p[name] for name in _given(ctx) if name in ("steps", "device", "log_every", "save_every", "keep_last")}
    with _option_errors():
        cfg = replace(cfg, train=replace(cfg.train, **changes))
    use_threads(p["threads"])
    train(cfg, run_shards(run), run.path, resume=True, console=err, attn=p["attn"], compile=p["compile_"], fsdp=p["fsdp"],
          loggers=p["logger"] or ())


def _check_clip_search(ctx: typer.Context, clip_search: bool) -> None:
    """--fix-clip and --variance steer the clip search; without --clip-search they would do nothing."""
    for name in ("fix_clip", "variance"):
        if not clip_search and name in _given(ctx):
            raise typer.BadParameter("applies to --clip-search; add --clip-search or drop it.", param_hint="--" + name.replace("_", "-"))


def _given(ctx: typer.Context) -> list[str]:
    """The options given on the command line (or through the environment), not defaulted."""
    return [name for name in ctx.params if ctx.get_parameter_source(name).name in ("COMMANDLINE", "ENVIRONMENT")]


def _agrees(cfg: RunConfig, name: str, value) -> bool:
    """Whether option ``name`` given as ``value`` says what the run's config already holds."""
    from bd3.diffusion.schedules import canonical

    d, t = cfg.diffusion, cfg.train
    if name == "schedule":
        try:
            return canonical(value) == d.schedule
        except Bd3Error:
            return False
    if name == "clip":
        return tuple(value) == tuple(d.clip)
    if name == "data":
        return (str(Path(value).resolve()) if Path(value).exists() else value) == cfg.data.data
    if name == "run":
        return t.parent is not None and Path(value).resolve() == Path(t.parent).resolve()
    if name == "model":
        return value in MODEL_PRESETS and model_config(value, cfg.model.length, causal=cfg.model.causal) == cfg.model
    if name in ("algo", "block_size", "resample", "clip_search", "fix_clip", "variance", "weighting", "estimator"):
        return value == getattr(d, name)
    if name in ("batch_size", "global_batch_size", "lr", "warmup_steps", "seed", "precision", "eval_batches", "skip_nonfinite"):
        return value == getattr(t, name)
    if name == "vocab_size":  # it sizes a trained BPE only
        return cfg.data.tokenizer != "bpe" or value == cfg.data.vocab_size
    known = {"length": cfg.model.length, "tokenizer": cfg.data.tokenizer, "wrap": cfg.data.wrap}
    return name in known and value == known[name]


@contextmanager
def _option_errors():
    """Invalid combinations of option values are usage errors (exit code 2)."""
    try:
        yield
    except Bd3Error as e:
        raise typer.BadParameter(str(e)) from None
