"""Options shared by several commands, defined once.

Nothing here (nor in the command modules' top level) imports torch, numpy or the data
libraries: help, shell completion and usage errors answer before those load.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from bd3.choices import ATTN_BACKENDS, COMMAND_PRECISIONS, RULES, STOPS
from bd3.config import TRAIN_ESTIMATORS, WRAPS, parse_clip
from bd3.errors import Bd3Error

if TYPE_CHECKING:
    from bd3.sampling.block import Decoding

RunArg = Annotated[
    Optional[Path],
    typer.Argument(help="Run directory. Default: the newest run under ./runs.", show_default=False),
]


def _check_device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise typer.BadParameter(f"{value!r} is not a device; use auto, cpu, cuda or cuda:N.")
    return value


def finite(value: float | None) -> float | None:
    """The callback of every float option: inf and nan are refused at parse time."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number.")
    return value


Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", callback=_check_device)]
Seed = Annotated[int, typer.Option(help="Random seed.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output folder that bd3 wrote (never the current folder, or one holding other files).")]


def precision(command: str, help: str):
    """The --precision option of ``command``: the values of bd3.choices.COMMAND_PRECISIONS[command]
    (one vocabulary across commands, one meaning per value), with ``help`` saying what auto
    picks there."""
    allowed = COMMAND_PRECISIONS[command]

    def check(value: str) -> str:
        if value not in allowed:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)} (bd3 {command}).")
        return value

    return Annotated[str, typer.Option("--precision", help=help, callback=check, metavar="<" + "|".join(allowed) + ">")]


TRAIN_PRECISION_HELP = (
    "fp32; bf16: matrix products under bf16 autocast (weights, gradients and optimizer state stay fp32); "
    "auto: bf16 on CUDA and on CPUs with native bf16, else fp32."
)
BatchSize = Annotated[int, typer.Option(help="Sequences per batch.", min=1)]
BlockSize = Annotated[Optional[int], typer.Option(help="Block size L' (must divide the length).", min=1, show_default=False)]
Data = Annotated[
    str,
    typer.Option(
        help="Built-in set (web, devil, jargon, mhcc), hub set (owt, lm1b, wikitext103, ...), "
        "text/jsonl/parquet path or glob, or a folder written by `bd3 tokenize`."
    ),
]
Tokenizer = Annotated[str, typer.Option(help="gpt2, bert-base-uncased, bpe (trained on the data; shipped for web) or path/to/tokenizer.json.")]
VocabSize = Annotated[int, typer.Option(help="Vocabulary size when training a BPE tokenizer.", min=16)]
Length = Annotated[int, typer.Option(help="Context length L in tokens.", min=8)]


def _check_wrap(value: str | None) -> str | None:
    if value is not None and value not in WRAPS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(WRAPS)}.")
    return value


Wrap = Annotated[
    Optional[str],
    typer.Option(
        help="Row format: special = [BOS] + (L-2) tokens + [EOS] (the paper's LM1B protocol; default); raw = L tokens of the "
        "EOS-separated document stream, nothing injected (its OpenWebText protocol, for generating past the context: "
        "samples then start from EOS). A `bd3 tokenize` folder keeps its own.",
        callback=_check_wrap, show_default=False,
    ),
]


def _check_attn(value: str) -> str:
    if value not in ATTN_BACKENDS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(ATTN_BACKENDS)}.")
    return value


ATTN_HELP = (
    "Attention backend. auto: flex on CUDA (else xformers if installed, else sdpa), sdpa on CPU. "
    "sdpa: scaled_dot_product_attention with the dense boolean mask. "
    "flex (CUDA): FlexAttention, block-sparse masks made by create_block_mask from the mask function. "
    "xformers (CUDA; pip install 'bd3[xformers]' after torch): memory_efficient_attention with "
    "block-diagonal biases (BlockDiagonalMask, BlockDiagonalPaddedKeysMask) where the mask is block-diagonal "
    "(block size = length), LowerTriangularMask for causal models, a tensor bias for the block-diffusion masks."
)
Attn = Annotated[str, typer.Option(help=ATTN_HELP, callback=_check_attn)]
SampleAttn = Annotated[
    str,
    typer.Option(
        help=ATTN_HELP + " The sampler's attention (a block or two of queries, shapes growing with the KV cache) "
        "runs through SDPA under flex: a compiled FlexAttention kernel would recompile at every new shape.",
        callback=_check_attn,
    ),
]
Compile = Annotated[
    bool,
    typer.Option("--compile", help="Compile each transformer block with torch.compile (in place: checkpoints unchanged; the first steps are slower)."),
]


def _check_clip(value: str | list[str] | None):
    """--clip BETA,OMEGA (repeatable where it is a list) as checked (beta, omega) tuples."""
    try:
        if isinstance(value, list):
            return [parse_clip(v) for v in value] or None
        return None if value is None else parse_clip(value)
    except Bd3Error as e:
        raise typer.BadParameter(str(e)) from None


Clip = Annotated[
    Optional[str],
    typer.Option(
        help="Clip interval BETA,OMEGA of mask rates: draw t (or the masked share k/n) from [beta, omega] during training.",
        show_default=False, callback=_check_clip, metavar="BETA,OMEGA",
    ),
]
Clips = Annotated[
    Optional[list[str]],
    typer.Option(
        "--clip", help="An interval BETA,OMEGA to score; repeat for several. Default: the paper's grid (widths 0.5-0.9 in steps "
        "of 0.05, slid in steps of 0.05, and [0.001, 1]); 0,1 is scored as the bound's [0.001, 1].",
        show_default=False, callback=_check_clip, metavar="BETA,OMEGA",
    ),
]


def upgrade_argv(argv: list[str]) -> list[str]:
    """Old spellings that Typer cannot parse any more, rewritten to the current ones with a
    one-line note on stderr: ``--clip BETA OMEGA`` (the two-value form pretrain and finetune
    took) -> ``--clip BETA,OMEGA``. Kept for one release."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--clip" and i + 2 < len(argv) and _is_number(argv[i + 1]) and _is_number(argv[i + 2]):
            out += ["--clip", f"{argv[i + 1]},{argv[i + 2]}"]
            print(f"Note: --clip {argv[i + 1]} {argv[i + 2]} is deprecated; write --clip {argv[i + 1]},{argv[i + 2]} "
                  "(the old form goes in the next release).", file=sys.stderr)
            i += 3
            continue
        out.append(argv[i])
        i += 1
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def renamed(old: str, new: str):
    """The callback of a hidden option kept under its old name for one release: a one-line note on stderr."""

    def note(value):
        if value is not None:
            print(f"Note: {old} is deprecated; use {new} (the old name goes in the next release).", file=sys.stderr)
        return value

    return note


# -- sampling: `bd3 sample`, and `bd3 eval --gen-ppl`, which generates its samples the same way

def _check_train_estimator(value: str | None) -> str | None:
    if value is not None and value not in TRAIN_ESTIMATORS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(TRAIN_ESTIMATORS)}.")
    return value


TrainEstimator = Annotated[
    Optional[str],
    typer.Option(
        "--estimator", callback=_check_train_estimator, show_default=False,
        help="Training NELBO estimator: k (draw the number k of masked tokens per block, weight n/k: unbiased, weights at most n; "
        "the default) or t (the paper's: t per block, weight p'(t)/p(t), up to 1000; SEDD's default, the only one for SEDD). "
        "--clip bounds the mask rate k/n or p(t).",
    ),
]


Sampler = Annotated[
    Optional[str],
    typer.Option(
        help="Update rule inside a block: first-hitting (one position per row per model call), ddpm (--denoise-steps per block), "
        "threshold (--threshold). Default: first-hitting, or the rule --denoise-steps / --threshold imply.",
        show_default=False,
    ),
]
DenoiseSteps = Annotated[
    Optional[int],
    typer.Option(help="The sampler's denoising steps: ddpm steps per block (implies --sampler ddpm; default: the block size). "
                 "For a sedd run: the analytic sampler's steps per window (default: one per generated token).",
                 min=1, show_default=False),
]
OldSteps = Annotated[
    Optional[int],
    typer.Option("--steps", help="Deprecated name of --denoise-steps.", min=1, hidden=True, callback=renamed("--steps", "--denoise-steps")),
]


def denoise_steps(new: int | None, old: int | None) -> int | None:
    """--denoise-steps, or its deprecated spelling --steps."""
    if new is not None and old is not None:
        raise typer.BadParameter("--steps is the old name of --denoise-steps; give one.", param_hint="--steps")
    return old if new is None else new
Threshold = Annotated[
    Optional[float],
    typer.Option(
        help="Confidence decoding: unmask every position whose most likely token has probability above P, at least one per call "
        "(implies --sampler threshold; default 0.9).",
        min=0.0, max=1.0, show_default=False, callback=finite,
    ),
]
NumSamples = Annotated[int, typer.Option(help="Number of samples.", min=1)]


def _check_top_p(value: float | None) -> float | None:
    if value is not None and not 0.0 < value <= 1.0:  # nan fails too
        raise typer.BadParameter(f"{value} is outside (0, 1]; the nucleus keeps the most likely tokens up to this mass (1 disables it).")
    return value


TopP = Annotated[
    Optional[float],
    typer.Option(help="Nucleus sampling mass, in (0, 1] (1 disables it). Default: the paper's, 0.9 (0.99 for sedd runs).",
                 show_default=False, callback=_check_top_p),
]


def top_p_for(run, top_p: float | None) -> float:
    """--top-p, or the paper's setting for the run's algorithm."""
    if top_p is not None:
        return top_p
    return 0.99 if run.config.diffusion.algo == "sedd" else 0.9
Temperature = Annotated[float, typer.Option(help="Softmax temperature.", min=1e-4, callback=finite)]
Stop = Annotated[
    str,
    typer.Option(help="End a sample early: eos (at its end-of-text token), entropy (when its last 256 tokens have a unigram entropy below 4 nats), both, or none."),
]
KvCache = Annotated[bool, typer.Option(help="Reuse the K/V of finished blocks (exact within the model length).")]
SamplePrecision = precision(
    "sample",
    "fp32: exact (cached == recomputed logits to 1e-5). bf16: the linear layers, output layer included, in bf16 as under "
    "autocast (GPUs, CPUs with native bf16). fp16 (x86 CPUs): the linear layers' weights stored as float16, products and "
    "logits float32, within ~2.5e-4 of fp32. auto: fp16 on x86 CPUs, else bf16 where the hardware computes it natively, "
    "else fp32. SEDD runs take fp32, bf16 or auto (bf16 where native, else fp32).",
)
Threads = Annotated[
    Optional[int],
    typer.Option(
        help="CPU threads torch computes with. Default: $OMP_NUM_THREADS, else the cores this process may use (affinity and "
        "cgroup quota). On cores shared with other jobs, fewer threads are often much faster: try --threads 1. "
        "While sampling, the default switches between one thread and that number by timing the model calls.",
        min=1, show_default=False,
    ),
]


def sampling_rule(sampler: str | None, steps: int | None, threshold: float | None) -> str:
    """The update rule from --sampler, or the one --denoise-steps / --threshold imply."""
    if sampler is not None and sampler not in RULES:
        raise typer.BadParameter(f"{sampler!r} is not one of {', '.join(RULES)}.", param_hint="--sampler")
    if steps is not None and threshold is not None:
        raise typer.BadParameter("--denoise-steps (ddpm) and --threshold (confidence decoding) are different rules; give one.",
                                 param_hint="--threshold")
    implied = "ddpm" if steps is not None else "threshold" if threshold is not None else None
    if sampler is not None and implied is not None and sampler != implied:
        name = "--denoise-steps" if steps is not None else "--threshold"
        raise typer.BadParameter(f"applies to --sampler {implied}, not {sampler}.", param_hint=name)
    return sampler or implied or "first-hitting"


def decoding(run, *, sampler: str | None, steps: int | None, threshold: float | None, top_p: float | None,
             temperature: float, stop: str) -> Decoding:
    """The sampling options as a :class:`Decoding` for ``run`` (checked; top-p defaults by algorithm)."""
    from bd3.sampling.block import Decoding

    return Decoding(rule=sampling_rule(sampler, steps, threshold), steps=steps, threshold=0.9 if threshold is None else threshold,
                    top_p=top_p_for(run, top_p), temperature=temperature, stop=check_stop(stop))


def check_stop(stop: str) -> str:
    if stop not in STOPS:
        raise typer.BadParameter(f"{stop!r} is not one of {', '.join(STOPS)}.", param_hint="--stop")
    return stop


def sampling_block_size(run, block_size: int | None, sampler: str | None, steps: int | None, threshold: float | None) -> int:
    """The block size the run samples at, after checking that the block options apply to its algorithm."""
    cfg = run.config
    algo, L = cfg.diffusion.algo, cfg.model.length
    if algo == "ar":
        for name, value in (("--block-size", block_size), ("--sampler", sampler), ("--denoise-steps", steps), ("--threshold", threshold)):
            if value is not None:
                raise typer.BadParameter(f"does not apply to an ar run ({run.path}), which samples token by token.", param_hint=name)
    if algo == "sedd":
        for name, value in (("--block-size", block_size), ("--sampler", sampler), ("--threshold", threshold)):
            if value is not None:
                raise typer.BadParameter(
                    f"does not apply to a sedd run ({run.path}): it denoises its whole context with the analytic sampler (--denoise-steps T).",
                    param_hint=name,
                )
    if algo == "mdlm" and block_size is not None:
        raise typer.BadParameter(
            f"does not apply to an mdlm run ({run.path}): it denoises its whole context of {L} tokens, then slides by {L // 2}.",
            param_hint="--block-size",
        )
    bs = block_size or cfg.diffusion.block_size
    if algo == "bd3lm" and L % bs:
        raise typer.BadParameter(f"{bs} does not divide the model length {L}.", param_hint="--block-size")
    return bs
