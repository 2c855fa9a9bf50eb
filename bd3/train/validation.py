"""Validation during training: at every checkpoint the EMA weights are scored on validation
data (the evaluation's default estimator), the clip search runs when asked, best.json and
the newest checkpoints are kept."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from bd3.data.shards import TokenShards
from bd3.diffusion.clip_search import clip_grid
from bd3.diffusion.estimators import resolve_estimator
from bd3.errors import Bd3Error
from bd3.evaluate.perplexity import nelbo_perplexity
from bd3.evaluate.variance import lowest_variance, nelbo_variance
from bd3.runs import Run
from bd3.train import state
from bd3.train.loggers import sample_texts

if TYPE_CHECKING:
    from bd3.train.loop import Trainer


def checkpoint(trainer: Trainer, run: Run, shards: TokenShards) -> None:
    """Save; score the EMA weights on validation data (and run the clip search if asked);
    keep best.json and the newest N checkpoints. Under torchrun rank 0 validates while the
    others wait, then tells them the clip interval to train with."""
    weights = state.weights(trainer)  # gathered once under FSDP: for the checkpoint and the validation
    path = state.save(trainer, run, weights)
    cfg, tcfg, par = trainer.cfg, trainer.cfg.train, trainer.par
    ema = weights[1] if trainer.sharded else None

    def validate() -> None:
        valid = shards.rows("valid")
        with trainer.ema_weights(ema) as model:
            result = nelbo_perplexity(
                model, valid, cfg.diffusion, cfg.data.mask_id, estimator=validation_estimator(cfg.diffusion),
                batch_size=tcfg.batch_size, max_batches=tcfg.eval_batches, seed=tcfg.seed, device=trainer.device,
            )
            if not np.isfinite(result["nelbo"]):
                good = [c for c in run.checkpoints() if c != path]
                kept = f"the last good checkpoint is {good[-1]}" if good else "no earlier checkpoint was written"
                raise Bd3Error(
                    f"The validation NELBO at step {trainer.step} is not finite ({result['nelbo']}): the weights in {path} diverged; "
                    f"{kept}. Lower --lr, or use --precision fp32."
                )
            if cfg.diffusion.clip_search:
                _clip_search(trainer, run, model, valid)
            if trainer.loggers:
                trainer.loggers.samples(trainer.step, sample_texts(model, trainer.cfg, shards.tokenizer))
        run.log({"step": trainer.step, "event": "validation", "valid_nelbo": result["nelbo"], "valid_nelbo_se": result["nelbo_se"],
                 "valid_ppl": result["ppl"], "valid_ppl_ci95": result["ppl_ci95"], "estimator": result["estimator"]})
        run.record_best(path, trainer.step, result["nelbo"])
        if tcfg.keep_last:
            run.prune(tcfg.keep_last)
        trainer.last_validation = result

    par.on_main(validate)  # an error on rank 0 reaches every process
    clip = par.broadcast(list(trainer.cfg.diffusion.clip) if par.main else None)
    if not par.main:
        trainer.cfg = replace(cfg, diffusion=replace(cfg.diffusion, clip=tuple(clip)))


def validation_estimator(d) -> str:
    """Validation scores with the evaluation's default estimator (k for BD3-LM and MDLM: the
    lowest variance), whatever the training estimator."""
    return resolve_estimator(d.algo, d.block_size, None)


def _clip_search(trainer: Trainer, run: Run, model, valid: np.ndarray) -> None:
    """Score the paper's grid by NELBO variance; train with the minimiser unless fix_clip.
    The interval in use is always the one in the run's config.json."""
    cfg, tcfg = trainer.cfg, trainer.cfg.train
    d = cfg.diffusion
    if len(valid) < 2 * tcfg.batch_size:
        raise Bd3Error(f"--clip-search needs at least two validation batches of {tcfg.batch_size}; the split has {len(valid)} rows.")
    scores = nelbo_variance(
        model, valid, d, cfg.data.mask_id, clip_grid(), batch_size=tcfg.batch_size, max_batches=tcfg.eval_batches,
        seed=tcfg.seed, device=trainer.device, precision=trainer.precision,
    )
    best = lowest_variance(scores, d.variance, d.estimator)
    chosen = (best["beta"], best["omega"])
    run.log({
        "step": trainer.step, "event": "clip_search", "variance": d.variance, "estimator": d.estimator, "clip": list(d.clip),
        "best": list(chosen), "applied": not d.fix_clip,
        "scores": [{k: v for k, v in r.items() if k not in ("schedule", "batches")} for r in scores],
    })
    if not d.fix_clip and chosen != tuple(d.clip):
        trainer.cfg = run.config = replace(cfg, diffusion=replace(d, clip=chosen))
        run.write_config()
