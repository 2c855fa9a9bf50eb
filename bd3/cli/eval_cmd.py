"""`bd3 eval` and `bd3 variance`: options -> one evaluation call -> a table or JSON.

torch, numpy and the data libraries are imported in the command bodies, after parsing.
"""

from __future__ import annotations

import glob
import math
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from bd3.choices import ZERO_SHOT_SETS
from bd3.cli import options as o
from bd3.config import FULL_CLIP, VARIANCES, RunConfig
from bd3.errors import Bd3Error

Split = Annotated[str, typer.Option(help="Split to evaluate: valid or train.")]
MaxBatches = Annotated[Optional[int], typer.Option(help="Evaluate at most N batches (default: the whole split).", min=1, show_default=False)]
EvalPrecision = o.precision(
    "eval", "fp32 (the default: exact); bf16: matrix products under bf16 autocast; auto: bf16 on CUDA and on CPUs with "
    "native bf16, else fp32. With --gen-ppl, for the judge and the sampler.",
)
VariancePrecision = o.precision(
    "variance", "fp32; bf16: matrix products under bf16 autocast; auto: bf16 on CUDA and on CPUs with native bf16, else fp32.",
)


def _evaluated_as(cfg: RunConfig, block_size: int | None, schedule: str | None = None) -> RunConfig:
    """The run's config at another block size and/or schedule (invalid combinations: exit 2)."""
    changes = {}
    if block_size is not None and cfg.diffusion.algo == "bd3lm":
        changes["block_size"] = block_size
    if schedule is not None:
        changes["schedule"] = _check_schedule(schedule)
    try:
        return RunConfig(model=cfg.model, diffusion=replace(cfg.diffusion, **changes), data=cfg.data, train=cfg.train)
    except Bd3Error as e:
        raise typer.BadParameter(str(e)) from None


AUTO_MAX_PASSES = 32  # --passes auto without --max-passes, on a set of at most AUTO_CAP_TOKENS per pass
AUTO_CAP_TOKENS = 2_000_000


def _check_passes(value: str | None) -> str | None:
    if value is None or value == "auto" or (value.isdigit() and int(value) >= 1):
        return value
    raise typer.BadParameter(f"{value!r} is neither a positive number of passes nor auto.")


def _check_ci_width(value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"the interval width must be a positive number of nats, got {value}.")
    return value


def _check_limit(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value:g} documents: give a positive number (or a fraction below 1).")
    return value


def evaluate(
    run: o.RunArg = None,
    split: Split = "valid",
    block_size: o.BlockSize = None,
    schedule: Annotated[Optional[str], typer.Option(help="With --estimator t: the noise schedule t is drawn under (any gives the same bound in expectation). Default: linear.", show_default=False)] = None,
    estimator: Annotated[
        Optional[str],
        typer.Option(help="NELBO estimator: exact (every mask pattern of a block; block size <= 8), k (the number of masked tokens "
                     "stratified per block; the default) or t (the reference's t ~ U[1e-3, 1]). AR runs are exact, SEDD runs use t.",
                     show_default=False),
    ] = None,
    passes: Annotated[
        Optional[str],
        typer.Option(help="Monte-Carlo passes over the split (default 1), or auto: add passes until the 95 % interval is --ci-width wide. "
                     "With --tasks: passes of the k estimator per request (default 8).", callback=_check_passes, show_default=False),
    ] = None,
    ci_width: Annotated[float, typer.Option(help="With --passes auto: the widest 95 % interval of the NELBO accepted, in nats per token.", callback=_check_ci_width)] = 0.02,
    max_passes: Annotated[Optional[int], typer.Option(help=f"With --passes auto: stop after N passes (default {AUTO_MAX_PASSES}; needed above {AUTO_CAP_TOKENS:,} tokens per pass).", min=1, show_default=False)] = None,
    zero_shot: Annotated[
        Optional[list[str]],
        typer.Option(help=f"Evaluate on other corpora instead, with the reference's zero-shot protocol: {', '.join(ZERO_SHOT_SETS)}, "
                     "or a local text/jsonl/parquet file, folder or glob (comma-separated or repeated). Local text keeps a newline "
                     "between paragraphs; the paper's sets keep their detokenizers.", show_default=False),
    ] = None,
    data: Annotated[Optional[str], typer.Option(help="With one --zero-shot set: a local copy of it (text, jsonl or parquet). "
                                                "Alone: a local file to evaluate, as --zero-shot FILE.", show_default=False)] = None,
    gen_ppl: Annotated[bool, typer.Option("--gen-ppl", help="Generative perplexity instead: samples of the run (generated with the sampling options below, or read from --samples) scored by --judge.")] = False,
    judge: Annotated[str, typer.Option(help="With --gen-ppl: the model that scores the samples: a bd3 run trained with --algo ar, or a HuggingFace causal LM (needs pip install 'bd3[transformers]').")] = "gpt2-large",
    samples: Annotated[Optional[Path], typer.Option(help="Score these samples (the JSONL of `bd3 sample --format jsonl`) instead of generating them; implies --gen-ppl.", show_default=False)] = None,
    num_samples: o.NumSamples = 16,
    max_tokens: Annotated[Optional[int], typer.Option(help="With --gen-ppl: tokens per generated sample, BOS included. Default: the model length.", min=2, show_default=False)] = None,
    sampler: o.Sampler = None,
    denoise_steps: o.DenoiseSteps = None,
    steps: o.OldSteps = None,
    threshold: o.Threshold = None,
    top_p: o.TopP = None,
    temperature: o.Temperature = 1.0,
    stop: o.Stop = "none",
    kv_cache: o.KvCache = True,
    threads: o.Threads = None,
    batch_size: o.BatchSize = 16,
    max_batches: MaxBatches = None,
    seed: o.Seed = 1,
    device: o.Device = "auto",
    precision: EvalPrecision = "fp32",
    attn: o.Attn = "auto",
    compile_: o.Compile = False,
    json_: o.Json = False,
    tasks: Annotated[
        Optional[str],
        typer.Option(help="Downstream tasks of lm-evaluation-harness instead, comma-separated (needs pip install 'bd3[harness]'). "
                     "Diffusion log-likelihoods are bounds (exact estimator at block sizes <= 8, else k with --passes, default 8).",
                     show_default=False),
    ] = None,
    num_fewshot: Annotated[Optional[int], typer.Option(help="With --tasks: few-shot examples per prompt (default: each task's).", min=0, show_default=False)] = None,
    limit: Annotated[Optional[float], typer.Option(help="With --tasks: at most N documents per task (below 1: a fraction of them).", callback=_check_limit, show_default=False)] = None,
    include_path: Annotated[Optional[Path], typer.Option(help="With --tasks: a folder of task YAML files (local data sets run offline).", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option(help="With --tasks: also write lm-eval's results as JSON to this new file.", show_default=False)] = None,
) -> None:
    """Validation perplexity: the NELBO bound for diffusion models (t ~ U[1e-3, 1], one
    stratified t per block), the exact NLL for AR runs.

    --zero-shot: perplexity on other text, with the share of its tokens that the run's
    training data never contained ('unseen'): a model cannot have learnt those, and a high
    share dominates the number.

    --gen-ppl: the generative perplexity of the run's samples under a judge model, with
    the reference's protocol (the judge's tokenizer, windows of 1024 tokens moving by 512,
    end-of-text targets excluded): the mean of per-sample perplexities (the paper's number),
    the token-pooled perplexity, unigram entropy, model calls per token, lengths.

    --tasks: tasks of lm-evaluation-harness (multiple choice, perplexity, generation); for
    BD3-LM and MDLM runs their log-likelihoods are lower bounds (minus the NELBO of the
    continuation given the context), exact for AR runs.

    Examples:

    \b
      bd3 eval                                  # the newest run under ./runs
      bd3 eval runs/owt-bs4 --passes 4 --json
      bd3 eval runs/owt-bs4 --block-size 16     # evaluate at another block size
      bd3 eval runs/owt-bs4 --zero-shot ptb,wikitext2,devil
      bd3 eval runs/owt-bs4 --zero-shot lambada --data lambada_test.jsonl
      bd3 eval runs/owt-bs4 --zero-shot notes.txt          # a local file: paragraphs joined by newlines
      bd3 eval runs/owt-bs4 --gen-ppl --judge gpt2-large --num-samples 300
      bd3 eval --samples samples.jsonl --judge runs/owt-ar    # samples of `bd3 sample --format jsonl`
      bd3 eval runs/owt-bs4 --tasks lambada_openai,piqa --output results.json   # lm-eval tasks (hub)
      bd3 eval runs/owt-bs4 --tasks my_task --include-path tasks/ --limit 100   # a local task folder
    """
    steps = o.denoise_steps(denoise_steps, steps)
    if tasks is not None:
        for name, value, default in (("--split", split, "valid"), ("--schedule", schedule, None), ("--ci-width", ci_width, 0.02),
                                     ("--max-passes", max_passes, None), ("--zero-shot", zero_shot, None), ("--data", data, None),
                                     ("--gen-ppl", gen_ppl, False), ("--samples", samples, None), ("--max-batches", max_batches, None),
                                     ("--block-size", block_size, None), ("--compile", compile_, False), ("--precision", precision, "fp32"),
                                     ("--attn", attn, "auto"), ("--judge", judge, "gpt2-large"), ("--num-samples", num_samples, 16),
                                     ("--max-tokens", max_tokens, None), ("--sampler", sampler, None), ("--denoise-steps", steps, None),
                                     ("--threshold", threshold, None), ("--top-p", top_p, None), ("--temperature", temperature, 1.0),
                                     ("--stop", stop, "none"), ("--kv-cache", kv_cache, True), ("--threads", threads, None)):
            if value != default:  # generation tasks take their own settings (greedy unless a task samples)
                raise typer.BadParameter("does not apply to --tasks.", param_hint=name)
        if passes == "auto":
            raise typer.BadParameter("--tasks takes a number of passes per request, not auto.", param_hint="--passes")
        return _harness(run, tasks, num_fewshot=num_fewshot, limit=limit, include_path=include_path, output=output,
                        estimator=estimator, passes=int(passes) if passes else None, batch_size=batch_size, seed=seed, device=device, json_=json_)
    for name, value in (("--num-fewshot", num_fewshot), ("--limit", limit), ("--include-path", include_path), ("--output", output)):
        if value is not None:
            raise typer.BadParameter("applies to --tasks only.", param_hint=name)
    if gen_ppl or samples is not None:
        if zero_shot:
            raise typer.BadParameter("--gen-ppl and --zero-shot are different evaluations; run them one at a time.", param_hint="--zero-shot")
        for name, value, default in (("--split", split, "valid"), ("--schedule", schedule, None), ("--passes", passes, None),
                                     ("--estimator", estimator, None), ("--max-passes", max_passes, None), ("--data", data, None),
                                     ("--max-batches", max_batches, None), ("--compile", compile_, False)):
            if value != default:
                raise typer.BadParameter("applies to the perplexity of a split, not to --gen-ppl.", param_hint=name)
        o.check_stop(stop)
        o.sampling_rule(sampler, steps, threshold)  # usage errors before anything is opened
        sampling = {"sampler": sampler, "steps": steps, "threshold": threshold, "top_p": top_p, "temperature": temperature, "stop": stop}
        from bd3.runtime import use_threads

        use_threads(threads, warn_if_loaded=False)  # the sampler adapts to a loaded machine itself
        _generative_perplexity(
            run, judge, samples, sampling, block_size=block_size, num_samples=num_samples, batch_size=batch_size,
            max_tokens=max_tokens, kv_cache=kv_cache, seed=seed, threads=threads, device=device, precision=precision, attn=attn,
            json_=json_,
        )
        return
    if split not in ("valid", "train"):
        raise typer.BadParameter(f"{split!r} is not one of valid, train.", param_hint="--split")
    names, data = _zero_shot_names(zero_shot, data)
    if names and split != "valid":
        raise typer.BadParameter("applies to the run's own data; --zero-shot evaluates other text whole.", param_hint="--split")
    from bd3.cli.common import print_table
    from bd3.diffusion.estimators import resolve_estimator
    from bd3.evaluate.perplexity import nelbo_perplexity
    from bd3.evaluate.zero_shot import unseen_share, zero_shot_rows
    from bd3.model.backends import resolve_attn
    from bd3.runs.load import load_model, open_run, run_shards, run_tokenizer
    from bd3.runs.records import save_eval_record
    from bd3.runtime import configure_model, resolve_device, resolve_precision, use_threads

    r = open_run(run)
    cfg = _evaluated_as(r.config, block_size, schedule or "linear")
    d = cfg.diffusion
    requested = estimator
    try:
        estimator = resolve_estimator(d.algo, d.block_size, estimator)
    except Bd3Error as e:
        raise typer.BadParameter(str(e), param_hint="--estimator") from None
    passes = passes or "1"
    if schedule is not None and estimator != "t":
        raise typer.BadParameter(f"the {estimator} estimator does not depend on the noise schedule; --schedule applies to --estimator t.",
                                 param_hint="--schedule")
    if estimator == "exact":  # deterministic: one pass is the value (AR runs, block size 1, or asked for)
        if requested == "exact" and passes != "1" and d.algo != "ar":
            raise typer.BadParameter("--estimator exact is deterministic: one pass gives the exact value.", param_hint="--passes")
        passes = "1"
    use_threads(threads)
    if names:
        run_tokenizer(r)
        sets = [(name, zero_shot_rows(name, r.tokenizer_path, cfg.model.length, data)) for name in names]  # bad files fail first
        train_counts = run_shards(r).unigram_counts("train")
    dev = resolve_device(device)
    model = configure_model(load_model(r, dev), resolve_attn(attn, dev), compile_)

    def score(rows) -> dict:
        limit = max_passes
        if passes == "auto" and limit is None:
            tokens = min(len(rows), max_batches * batch_size if max_batches else len(rows)) * rows.shape[1]
            if tokens > AUTO_CAP_TOKENS:
                raise Bd3Error(f"--passes auto on {tokens:,} tokens per pass needs a cap: add --max-passes N (each pass scores every token).")
            limit = AUTO_MAX_PASSES
        with _pass_progress(passes == "auto", limit, ci_width) as on_pass:
            return nelbo_perplexity(
                model, rows, d, cfg.data.mask_id, estimator=estimator, batch_size=batch_size, max_batches=max_batches,
                passes=passes if passes == "auto" else int(passes), ci_width=ci_width, max_passes=limit, seed=seed, device=dev,
                precision=resolve_precision(precision, dev), on_pass=on_pass,
            )

    columns = [("tokens", "tokens"), ("nelbo_label", "NELBO / token ± s.e."), ("ppl_label", "perplexity (95 % interval)")]
    if names:
        results = []
        for name, rows in sets:
            evaluated = rows[: max_batches * batch_size] if max_batches else rows
            results.append({**score(rows), "set": name, "unseen_share": unseen_share(train_counts, evaluated)})
        print_table(
            f"bd3 eval {r.path}: zero-shot, {_how(results[0])}", [_labelled(x) for x in results],
            [("set", "set"), ("unseen_share", "unseen in training"), *columns],
            json_, {"run": str(r.path), "algo": d.algo, "block_size": d.block_size, "zero_shot": results},
        )
        save_eval_record(r.path, "zero-shot", {"run": str(r.path), "block_size": cfg.diffusion.block_size, "zero_shot": results})
        return
    result = score(run_shards(r).rows(split))
    result.update(run=str(r.path), split=split, algo=d.algo, block_size=d.block_size)
    print_table(
        f"bd3 eval {r.path}: {_how(result)}", [_labelled(result)], [("split", "split"), ("block_size", "block size"), *columns],
        json_, result,
    )
    save_eval_record(r.path, "ppl", result)


def _harness(run, tasks: str, *, passes: int | None, json_: bool, **options) -> None:
    """--tasks: lm-evaluation-harness tasks on the run, a table of their metrics."""
    names = [n.strip() for n in tasks.split(",") if n.strip()]
    if not names:
        raise typer.BadParameter("name at least one task.", param_hint="--tasks")
    import logging

    from bd3.cli.common import print_table
    from bd3.evaluate.harness import DEFAULT_PASSES, evaluate_tasks, metric_rows  # lm-eval only when asked

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task chatter; errors still show
    result = evaluate_tasks(run, names, passes=passes or DEFAULT_PASSES, **options)
    k_passes = f", {result['passes']} passes" if result["estimator"] == "k" else ""
    how = {"ar": "exact log-likelihoods", "sedd": "generation"}.get(
        result["algo"], f"log-likelihoods are lower bounds (NELBO, estimator {result['estimator']}{k_passes})")
    print_table(
        f"bd3 eval {result['run']}: lm-eval tasks, {how}", metric_rows(result),
        [("task", "task"), ("metric", "metric"), ("filter", "filter"), ("value", "value"), ("stderr", "stderr")], json_, result,
    )


def _how(result: dict) -> str:
    """How the numbers were estimated, for a table's title."""
    if not result["bound"]:
        return "exact NLL (AR)"
    if result["estimator"] == "exact":
        return "NELBO bound, exact (every mask pattern)"
    return f"NELBO bound, estimator {result['estimator']}, {result['passes']} pass{'es' if result['passes'] > 1 else ''}"


def _labelled(result: dict) -> dict:
    """A result with its table labels: ``7.1234 ± 0.0050`` and ``<= 1240.5 (1228.3-1252.9)``."""
    low, high = result["ppl_ci95"]
    interval = f" ({low:.2f}-{high:.2f})" if result["nelbo_se"] > 0 else " (exact)"
    return {
        **result, "nelbo_label": f"{result['nelbo']:.4f} ± {result['nelbo_se']:.4f}",
        "ppl_label": f"{'<= ' if result['bound'] else ''}{result['ppl']:.2f}{interval}",
    }


@contextmanager
def _pass_progress(auto: bool, max_passes: int, ci_width: float):
    """With --passes auto: a progress bar over passes that shows the interval's width."""
    if not auto:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from bd3.cli.common import err

    with Progress(TextColumn("passes"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[width]}"), console=err, transient=True) as bar:
        task = bar.add_task("passes", total=max_passes, width="")

        def on_pass(done: int, stats: dict) -> None:
            low, high = stats["nelbo_ci95"]
            bar.update(task, completed=done, width=f"95 % interval {high - low:.4f} nats (target {ci_width:g})")

        yield on_pass


def _zero_shot_names(zero_shot: list[str] | None, data: str | None) -> tuple[list[str], str | None]:
    """The sets and local files to evaluate, and the local copy of the one set (--data alone
    is one local file to evaluate); usage errors exit 2."""
    names = [n.strip() for v in zero_shot or [] for n in v.split(",") if n.strip()]
    if data is not None and not names:
        names, data = [data], None
    elif data is not None and (len(names) != 1 or names[0] not in ZERO_SHOT_SETS):
        raise typer.BadParameter("--data is a local copy of one --zero-shot set; name exactly one set, or give the file alone.", param_hint="--data")
    for name in names:
        if name not in ZERO_SHOT_SETS and not (Path(name).expanduser().exists() or glob.has_magic(name)):
            raise typer.BadParameter(
                f"no such file or folder: {name!r}; give a local text, jsonl or parquet file, or a zero-shot set ({', '.join(ZERO_SHOT_SETS)}).",
                param_hint="--data" if zero_shot is None else "--zero-shot",
            )
    return names, data


def variance(
    run: o.RunArg = None,
    block_size: o.BlockSize = None,
    clip: o.Clips = None,
    schedule: Annotated[
        Optional[str], typer.Option(help="Schedules to compare, comma-separated (e.g. linear,cosine,gaussian:mu=0.6). Default: the run's.", show_default=False)
    ] = None,
    kind: Annotated[str, typer.Option("--variance", help="Which variance picks the minimiser: paper (across batches) or block (per-block, the reference code's).")] = "paper",
    plot: Annotated[Optional[Path], typer.Option(help="Also draw the variance over (beta, omega) into this PNG (needs matplotlib).", show_default=False)] = None,
    batch_size: o.BatchSize = 16,
    max_batches: Annotated[int, typer.Option(help="Validation batches per interval.", min=2)] = 16,
    seed: o.Seed = 1,
    device: o.Device = "auto",
    precision: VariancePrecision = "auto",
    attn: o.Attn = "auto",
    compile_: o.Compile = False,
    threads: o.Threads = None,
    json_: o.Json = False,
) -> None:
    """NELBO and its variance when mask rates are clipped to [beta, omega]: the paper's
    data-driven search for the training interval.

    'Var (paper)' is the variance across batches of the batch NELBO (paper eq. 9-10), the
    default criterion; 'Var (per block)' is the reference code's within-batch variance of
    per-block estimates. Each is shown for the paper's training estimator t (t drawn from
    the interval, weight p'/p), whose minimiser is marked, and for the k estimator (masked
    counts from the interval, weight n/k). NELBO is a bound only for [0.001, 1].

    Examples:

    \b
      bd3 variance --block-size 4
      bd3 variance runs/owt-bs4 --clip 0.45,0.95 --clip 0.3,0.8 --json
      bd3 variance --schedule linear,cosine,gaussian:mu=0.6 --plot variance.png
    """
    if kind not in VARIANCES:
        raise typer.BadParameter(f"{kind!r} is not one of {', '.join(VARIANCES)}.", param_hint="--variance")
    schedules = [_check_schedule(s) for s in schedule.split(",")] if schedule else None
    intervals = [FULL_CLIP if c == (0.0, 1.0) else c for c in clip] if clip else None  # [0, 1]: the bound's interval
    if plot is not None:
        _pyplot()  # fail before the work if matplotlib is missing
    from bd3.cli.common import err, print_table
    from bd3.evaluate.variance import lowest_variance, nelbo_variance
    from bd3.model.backends import resolve_attn
    from bd3.runs.load import load_model, open_run, run_shards
    from bd3.runs.records import save_eval_record
    from bd3.runtime import configure_model, resolve_device, resolve_precision, use_threads

    r = open_run(run)
    cfg = _evaluated_as(r.config, block_size)
    use_threads(threads)
    dev = resolve_device(device)
    model = configure_model(load_model(r, dev), resolve_attn(attn, dev), compile_)
    rows = run_shards(r).rows("valid")
    if len(rows) < 2 * batch_size:
        raise Bd3Error(f"The validation split has {len(rows)} rows; the variance needs at least two batches of {batch_size}. Use a smaller --batch-size.")
    results = nelbo_variance(
        model, rows, cfg.diffusion, cfg.data.mask_id, intervals, schedules=schedules, batch_size=batch_size,
        max_batches=max_batches, seed=seed, device=dev, precision=resolve_precision(precision, dev),
    )
    best, best_k = lowest_variance(results, kind, "t"), lowest_variance(results, kind, "k")
    for x in results:
        x["interval"] = f"[{x['beta']:g}, {x['omega']:g}]" + ("  <- lowest" if x is best else "")
        x["best"] = x is best
    columns = [("interval", "interval"), ("nelbo", "NELBO / token"), ("var_paper", "Var t (paper)"), ("var_block", "Var t (per block)"),
               ("var_paper_k", "Var k (paper)"), ("var_block_k", "Var k (per block)")]
    if schedules:
        columns.insert(0, ("schedule", "schedule"))
    print_table(
        f"bd3 variance {r.path} (block size {cfg.diffusion.block_size}, {results[0]['batches']} batches of {batch_size})",
        results, columns, json_,
        {"run": str(r.path), "block_size": cfg.diffusion.block_size, "variance": kind, "best": best, "best_k": best_k, "intervals": results},
    )
    save_eval_record(r.path, "variance", {"block_size": cfg.diffusion.block_size, "variance": kind, "best": best, "intervals": results})
    if plot is not None:
        _plot(results, kind, plot)
        err.print(f"Wrote {plot}")


GEN_PPL_ROWS = (
    ("samples", "samples"), ("tokens", "tokens scored"), ("gen_ppl", "gen PPL (mean of per-sample)"),
    ("gen_ppl_ci95", "gen PPL 95 % interval (over samples)"), ("gen_ppl_pooled", "gen PPL (token-pooled)"),
    ("entropy", "unigram entropy (nats, mean)"),
    ("nfe_per_token", "model calls / token"), ("length_median", "median length (judge tokens)"), ("length_max", "max length"),
)


def _generative_perplexity(run, judge, samples, sampling: dict, *, block_size, num_samples, batch_size,
                           max_tokens, kv_cache, seed, threads, device, precision, attn, json_) -> None:
    """Samples read from a JSONL file or generated from the run, scored under the judge."""
    from bd3.cli.common import print_table
    from bd3.evaluate.gen_ppl import GenSample, generative_perplexity, read_samples
    from bd3.model.backends import resolve_attn
    from bd3.runs.load import load_model, open_run, run_tokenizer
    from bd3.runs.records import save_eval_record
    from bd3.runtime import configure_model, resolve_device, resolve_precision
    from bd3.sampling.generate import generate
    from bd3.sampling.text import sample_documents

    dev = resolve_device(device)
    if samples is not None:
        items = read_samples(samples, lambda: run_tokenizer(open_run(run)))
        source = str(samples)
    else:
        r = open_run(run)
        bs = o.sampling_block_size(r, block_size, sampling["sampler"], sampling["steps"], sampling["threshold"])
        decoding = o.decoding(r, **sampling)
        source = str(r.path)
    precision = resolve_precision(precision, dev)
    scorer = _judge(judge, dev, precision)  # before generating: it fails fast where sampling takes long
    if samples is None:
        model = configure_model(load_model(r, dev), resolve_attn(attn, dev))
        out = generate(model, r.config, num_samples=num_samples, batch_size=min(batch_size, num_samples),
                       max_tokens=max_tokens or r.config.model.length, block_size=bs, decoding=decoding, kv_cache=kv_cache,
                       seed=seed, precision=precision, threads=threads)
        tok = run_tokenizer(r)
        items = [GenSample(sample_documents(s.tokens, tok), s.nfe, s.new_tokens) for s in out]
    result = {"samples_from": source, **generative_perplexity(items, scorer)}
    print_table(
        f"bd3 eval {source}: generative perplexity under {scorer.name} (window {scorer.context}, stride {scorer.context // 2})",
        [{"what": label, "value": result[key]} for key, label in GEN_PPL_ROWS], [("what", ""), ("value", "")], json_, result,
    )
    if samples is None:  # generated from the run: the record belongs to it
        save_eval_record(r.path, "gen-ppl", {**result, "judge": scorer.name, "block_size": bs, "max_tokens": max_tokens or r.config.model.length})


def _judge(spec: str, device, precision: str):
    """A bd3 run trained with --algo ar, else a HuggingFace causal LM."""
    from bd3.evaluate.gen_ppl import RunJudge, load_hf_judge
    from bd3.runs.load import load_model, open_run, run_tokenizer

    path = Path(spec)
    if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        jr = open_run(path)
        if jr.config.diffusion.algo != "ar":
            raise Bd3Error(
                f"--judge {spec} was trained with --algo {jr.config.diffusion.algo}; a judge needs exact likelihoods: a run trained with --algo ar, "
                "or a HuggingFace causal LM such as gpt2-large."
            )
        return RunJudge(load_model(jr, device), run_tokenizer(jr), str(path), precision)
    return load_hf_judge(spec, device)


def _check_schedule(spec: str) -> str:
    from bd3.diffusion.schedules import canonical  # the spec's vocabulary lives with its maths (imports torch)

    try:
        return canonical(spec)
    except Bd3Error as e:
        raise typer.BadParameter(str(e), param_hint="--schedule") from None


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise Bd3Error("--plot needs matplotlib: pip install 'bd3[plot]' (or pip install matplotlib).") from None
    return plt


def _plot(results: list[dict], kind: str, path: Path) -> None:
    """One panel per schedule: each interval a square at (beta, omega), coloured by log variance."""
    import numpy as np

    from bd3.evaluate.variance import lowest_variance

    plt = _pyplot()
    schedules = list(dict.fromkeys(r["schedule"] for r in results))
    fig, axes = plt.subplots(1, len(schedules), figsize=(4.5 * len(schedules), 4), squeeze=False)
    for ax, name in zip(axes[0], schedules):
        rows = [r for r in results if r["schedule"] == name]
        values = np.log10([max(r[f"var_{kind}"], 1e-12) for r in rows])
        points = ax.scatter([r["beta"] for r in rows], [r["omega"] for r in rows], c=values, marker="s", s=120, cmap="viridis")
        best = lowest_variance(rows, kind, "t")
        ax.scatter([best["beta"]], [best["omega"]], marker="o", s=200, facecolors="none", edgecolors="red")
        ax.set(xlabel="beta (lowest mask rate)", ylabel="omega (highest mask rate)", title=name, xlim=(-0.03, 0.55), ylim=(0.45, 1.03))
        fig.colorbar(points, ax=ax, label=f"log10 Var ({kind})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
