"""`bd3 eval` and `bd3 variance`: options -> one evaluation call -> a table or JSON.

torch, numpy and the data libraries are imported in the command bodies, after parsing.
"""

from __future__ import annotations

import glob
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


def evaluate(
    run: o.RunArg = None,
    split: Split = "valid",
    block_size: o.BlockSize = None,
    schedule: Annotated[Optional[str], typer.Option(help="Noise schedule of the NELBO estimate (any gives the same bound in expectation). Default: linear.", show_default=False)] = None,
    passes: Annotated[int, typer.Option(help="Monte-Carlo passes over the split (mean and spread reported).", min=1)] = 1,
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
    steps: o.Steps = None,
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
    precision: Annotated[str, typer.Option(help="fp32 (default, exact) or bf16; with --gen-ppl, for the judge and the sampler.")] = "fp32",
    attn: o.Attn = "auto",
    compile_: o.Compile = False,
    json_: o.Json = False,
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
    """
    if gen_ppl or samples is not None:
        if zero_shot:
            raise typer.BadParameter("--gen-ppl and --zero-shot are different evaluations; run them one at a time.", param_hint="--zero-shot")
        for name, value, default in (("--split", split, "valid"), ("--schedule", schedule, None), ("--passes", passes, 1),
                                     ("--data", data, None), ("--max-batches", max_batches, None), ("--compile", compile_, False)):
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
    from bd3.cli.common import load_model, open_run, print_table, run_shards, run_tokenizer
    from bd3.evaluate.perplexity import nelbo_perplexity
    from bd3.evaluate.zero_shot import unseen_share, zero_shot_rows
    from bd3.model.backends import resolve_attn
    from bd3.runtime import configure_model, resolve_device, resolve_precision, use_threads

    r = open_run(run)
    cfg = _evaluated_as(r.config, block_size, schedule or "linear")
    use_threads(threads)
    if names:
        run_tokenizer(r)
        sets = [(name, zero_shot_rows(name, r.tokenizer_path, cfg.model.length, data)) for name in names]  # bad files fail first
        train_counts = run_shards(r).unigram_counts("train")
    dev = resolve_device(device)
    model = configure_model(load_model(r, dev), resolve_attn(attn, dev), compile_)
    if names:
        results = []
        for name, rows in sets:
            res = nelbo_perplexity(
                model, rows, cfg.diffusion, cfg.data.mask_id, batch_size=batch_size, max_batches=max_batches,
                passes=passes, seed=seed, device=dev, precision=resolve_precision(precision, dev),
            )
            evaluated = rows[: max_batches * batch_size] if max_batches else rows
            results.append({**res, "set": name, "unseen_share": unseen_share(train_counts, evaluated),
                            "ppl_label": f"{'<= ' if res['bound'] else ''}{res['ppl']:.3f}"})
        print_table(
            f"bd3 eval {r.path}: zero-shot", results,
            [("set", "set"), ("tokens", "tokens"), ("unseen_share", "unseen in training"), ("nelbo", "NELBO / token"),
             ("ppl_label", "perplexity")],
            json_, {"run": str(r.path), "algo": cfg.diffusion.algo, "block_size": cfg.diffusion.block_size, "zero_shot": results},
        )
        return
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
    clip: Annotated[
        Optional[list[str]],
        typer.Option(help="An interval BETA,OMEGA to score; repeat for several. Default: the paper's grid (widths 0.5-0.9 in steps of 0.05, slid in steps of 0.05, and [0.001, 1]).", show_default=False),
    ] = None,
    schedule: Annotated[
        Optional[str], typer.Option(help="Schedules to compare, comma-separated (e.g. linear,cosine,gaussian:mu=0.6). Default: the run's.", show_default=False)
    ] = None,
    kind: Annotated[str, typer.Option("--variance", help="Which variance picks the minimiser: paper (across batches) or block (per-block, the reference code's).")] = "paper",
    plot: Annotated[Optional[Path], typer.Option(help="Also draw the variance over (beta, omega) into this PNG (needs matplotlib).", show_default=False)] = None,
    batch_size: o.BatchSize = 16,
    max_batches: Annotated[int, typer.Option(help="Validation batches per interval.", min=2)] = 16,
    seed: o.Seed = 1,
    device: o.Device = "auto",
    precision: o.Precision = "auto",
    attn: o.Attn = "auto",
    compile_: o.Compile = False,
    threads: o.Threads = None,
    json_: o.Json = False,
) -> None:
    """NELBO and its variance when mask rates are clipped to [beta, omega]: the paper's
    data-driven search for the training interval.

    'Var (paper)' is the variance across batches of the batch NELBO (paper eq. 9-10), the
    default criterion; 'Var (per block)' is the reference code's within-batch variance of
    per-block estimates. The minimiser is marked. NELBO is a bound only for [0.001, 1].

    Examples:

    \b
      bd3 variance --block-size 4
      bd3 variance runs/owt-bs4 --clip 0.45,0.95 --clip 0.3,0.8 --json
      bd3 variance --schedule linear,cosine,gaussian:mu=0.6 --plot variance.png
    """
    if kind not in VARIANCES:
        raise typer.BadParameter(f"{kind!r} is not one of {', '.join(VARIANCES)}.", param_hint="--variance")
    schedules = [_check_schedule(s) for s in schedule.split(",")] if schedule else None
    intervals = [_parse_interval(c) for c in clip] if clip else None
    if plot is not None:
        _pyplot()  # fail before the work if matplotlib is missing
    from bd3.cli.common import err, load_model, open_run, print_table, run_shards
    from bd3.evaluate.variance import nelbo_variance
    from bd3.model.backends import resolve_attn
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
    best = min(results, key=lambda x: x[f"var_{kind}"])
    for x in results:
        x["interval"] = f"[{x['beta']:g}, {x['omega']:g}]" + ("  <- lowest" if x is best else "")
        x["best"] = x is best
    columns = [("interval", "interval"), ("nelbo", "NELBO / token"), ("var_paper", "Var (paper)"), ("var_block", "Var (per block)")]
    if schedules:
        columns.insert(0, ("schedule", "schedule"))
    print_table(
        f"bd3 variance {r.path} (block size {cfg.diffusion.block_size}, {results[0]['batches']} batches of {batch_size})",
        results, columns, json_,
        {"run": str(r.path), "block_size": cfg.diffusion.block_size, "variance": kind, "best": best, "intervals": results},
    )
    if plot is not None:
        _plot(results, kind, plot)
        err.print(f"Wrote {plot}")


GEN_PPL_ROWS = (
    ("samples", "samples"), ("tokens", "tokens scored"), ("gen_ppl", "gen PPL (mean of per-sample)"),
    ("gen_ppl_pooled", "gen PPL (token-pooled)"), ("entropy", "unigram entropy (nats, mean)"),
    ("nfe_per_token", "model calls / token"), ("length_median", "median length (judge tokens)"), ("length_max", "max length"),
)


def _generative_perplexity(run, judge, samples, sampling: dict, *, block_size, num_samples, batch_size,
                           max_tokens, kv_cache, seed, threads, device, precision, attn, json_) -> None:
    """Samples read from a JSONL file or generated from the run, scored under the judge."""
    from bd3.cli.common import load_model, open_run, print_table, run_tokenizer
    from bd3.evaluate.gen_ppl import GenSample, generative_perplexity, read_samples
    from bd3.model.backends import resolve_attn
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


def _judge(spec: str, device, precision: str):
    """A bd3 run trained with --algo ar, else a HuggingFace causal LM."""
    from bd3.cli.common import load_model, open_run, run_tokenizer
    from bd3.evaluate.gen_ppl import RunJudge, load_hf_judge

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

    plt = _pyplot()
    schedules = list(dict.fromkeys(r["schedule"] for r in results))
    fig, axes = plt.subplots(1, len(schedules), figsize=(4.5 * len(schedules), 4), squeeze=False)
    for ax, name in zip(axes[0], schedules):
        rows = [r for r in results if r["schedule"] == name]
        values = np.log10([max(r[f"var_{kind}"], 1e-12) for r in rows])
        points = ax.scatter([r["beta"] for r in rows], [r["omega"] for r in rows], c=values, marker="s", s=120, cmap="viridis")
        best = min(rows, key=lambda r: r[f"var_{kind}"])
        ax.scatter([best["beta"]], [best["omega"]], marker="o", s=200, facecolors="none", edgecolors="red")
        ax.set(xlabel="beta (lowest mask rate)", ylabel="omega (highest mask rate)", title=name, xlim=(-0.03, 0.55), ylim=(0.45, 1.03))
        fig.colorbar(points, ax=ax, label=f"log10 Var ({kind})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _parse_interval(text: str) -> tuple[float, float]:
    try:
        beta, omega = (float(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not BETA,OMEGA (for example 0.45,0.95).", param_hint="--clip") from None
    if not (0.0 <= beta < omega <= 1.0):
        raise typer.BadParameter(f"[{beta}, {omega}] must satisfy 0 <= beta < omega <= 1.", param_hint="--clip")
    return (beta, omega) if (beta, omega) != (0.0, 1.0) else FULL_CLIP
