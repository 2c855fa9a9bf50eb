"""`bd3 eval` and `bd3 variance`: options -> one evaluation call -> a table or JSON."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Optional

import typer

from bd3.cli import options as o
from bd3.cli.common import load_model, open_run, print_table, run_shards
from bd3.config import FULL_CLIP, RunConfig
from bd3.errors import Bd3Error
from bd3.evaluate.perplexity import nelbo_perplexity
from bd3.evaluate.variance import DEFAULT_INTERVALS, nelbo_variance
from bd3.runtime import resolve_device, resolve_precision

Split = Annotated[str, typer.Option(help="Split to evaluate: valid or train.")]
MaxBatches = Annotated[Optional[int], typer.Option(help="Evaluate at most N batches (default: the whole split).", min=1, show_default=False)]


def _at_block_size(cfg: RunConfig, block_size: int | None) -> RunConfig:
    if block_size is None or cfg.diffusion.algo != "bd3lm":
        return cfg
    return RunConfig(model=cfg.model, diffusion=replace(cfg.diffusion, block_size=block_size), data=cfg.data, train=cfg.train)


def evaluate(
    run: o.RunArg = None,
    split: Split = "valid",
    block_size: o.BlockSize = None,
    passes: Annotated[int, typer.Option(help="Monte-Carlo passes over the split (mean and spread reported).", min=1)] = 1,
    batch_size: o.BatchSize = 16,
    max_batches: MaxBatches = None,
    seed: o.Seed = 1,
    device: o.Device = "auto",
    precision: Annotated[str, typer.Option(help="fp32 (default, exact) or bf16.")] = "fp32",
    json_: o.Json = False,
) -> None:
    """Validation perplexity: the NELBO bound for diffusion models (t ~ U[1e-3, 1], one
    stratified t per block), the exact NLL for AR runs.

    Examples:

    \b
      bd3 eval                                  # the newest run under ./runs
      bd3 eval runs/owt-bs4 --passes 4 --json
      bd3 eval runs/owt-bs4 --block-size 16     # evaluate at another block size
    """
    r = open_run(run)
    cfg = _at_block_size(r.config, block_size)
    if split not in ("valid", "train"):
        raise typer.BadParameter(f"{split!r} is not one of valid, train.", param_hint="--split")
    dev = resolve_device(device)
    model = load_model(r, dev)
    result = nelbo_perplexity(
        model, run_shards(r).rows(split), cfg.diffusion, cfg.data.mask_id, batch_size=batch_size, max_batches=max_batches,
        passes=passes, seed=seed, device=dev, precision=resolve_precision(precision, dev),
    )
    result.update(run=str(r.path), split=split, algo=cfg.diffusion.algo, block_size=cfg.diffusion.block_size)
    label = "perplexity (upper bound: NELBO)" if result["bound"] else "perplexity (exact NLL)"
    row = {**result, "ppl_label": f"{'<= ' if result['bound'] else ''}{result['ppl']:.3f}"}
    if passes > 1:
        row["ppl_label"] += f"  (passes {', '.join(f'{p:.3f}' for p in result['ppl_passes'])})"
    print_table(
        f"bd3 eval {r.path}", [row],
        [("split", "split"), ("block_size", "block size"), ("tokens", "tokens"), ("nelbo", "NELBO / token"), ("ppl_label", label)],
        json_, result,
    )


def variance(
    run: o.RunArg = None,
    block_size: o.BlockSize = None,
    clip: Annotated[
        Optional[list[str]],
        typer.Option(help="An interval BETA,OMEGA to score; repeat for several. Default: a few of the paper's.", show_default=False),
    ] = None,
    batch_size: o.BatchSize = 16,
    max_batches: Annotated[int, typer.Option(help="Validation batches per interval.", min=2)] = 32,
    seed: o.Seed = 1,
    device: o.Device = "auto",
    json_: o.Json = False,
) -> None:
    """NELBO and its variance under clipped noise intervals U[beta, omega].

    'Var (paper)' is the variance across batches of the batch NELBO (paper eq. 9-10);
    'Var (per block)' is the reference code's within-batch variance of per-block estimates.
    The minimiser of the paper's variance is marked. NELBO is a bound only for [0.001, 1].

    Examples:

    \b
      bd3 variance --block-size 4
      bd3 variance runs/owt-bs4 --clip 0.45,0.95 --clip 0.3,0.8 --json
    """
    r = open_run(run)
    cfg = _at_block_size(r.config, block_size)
    intervals = [_parse_interval(c) for c in clip] if clip else list(DEFAULT_INTERVALS)
    dev = resolve_device(device)
    model = load_model(r, dev)
    rows = run_shards(r).rows("valid")
    if len(rows) < 2 * batch_size:
        raise Bd3Error(f"The validation split has {len(rows)} rows; the variance needs at least two batches of {batch_size}. Use a smaller --batch-size.")
    results = nelbo_variance(model, rows, cfg.diffusion, cfg.data.mask_id, intervals, batch_size=batch_size, max_batches=max_batches, seed=seed, device=dev)
    best = min(results, key=lambda x: x["var_batch"])
    for x in results:
        x["interval"] = f"[{x['beta']:g}, {x['omega']:g}]" + ("  <- lowest" if x is best else "")
        x["best"] = x is best
    print_table(
        f"bd3 variance {r.path} (block size {cfg.diffusion.block_size}, {results[0]['batches']} batches of {batch_size})",
        results,
        [("interval", "interval"), ("nelbo", "NELBO / token"), ("var_batch", "Var (paper)"), ("var_block", "Var (per block)")],
        json_, {"run": str(r.path), "block_size": cfg.diffusion.block_size, "intervals": results},
    )


def _parse_interval(text: str) -> tuple[float, float]:
    try:
        beta, omega = (float(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not BETA,OMEGA (for example 0.45,0.95).", param_hint="--clip") from None
    if not (0.0 <= beta < omega <= 1.0):
        raise typer.BadParameter(f"[{beta}, {omega}] must satisfy 0 <= beta < omega <= 1.", param_hint="--clip")
    return (beta, omega) if (beta, omega) != (0.0, 1.0) else FULL_CLIP
