"""`bd3 report`: runs side by side, from what their folders hold.

Training numbers come from each run's ``config.json`` and ``metrics.jsonl`` (losses, the
validations during training, the final summary); evaluation numbers from the records that
`bd3 eval` and `bd3 variance` save under ``RUN/eval/`` (:mod:`bd3.runs.records`), the newest
of each kind. The perplexity is the newest ``ppl`` record on the validation split at the
run's own block size, with its 95 % interval: ``ppl_ci95`` where the record carries it,
else one derived from the spread of its Monte-Carlo passes (Student t, ``passes - 1``
degrees of freedom), else none; without a record, the run's last validation during
training (no interval). Exact likelihoods (AR) have a zero-width interval. The generative
perplexity carries its 95 % interval over the samples (computed from the record's per-sample
perplexities where the record predates ``gen_ppl_ci95``).

:func:`collect` builds the report (a JSON-ready dict); :func:`write_report` writes
``report.md``, ``report.json``, ``report.html`` (one self-contained page, figures inlined as
base64 PNG) and the figures, which need matplotlib (``pip install 'bd3[plot]'``).
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from bd3.config import RunConfig
from bd3.errors import Bd3Error
from bd3.evaluate.intervals import mean_interval, t_quantile_975
from bd3.runs.records import eval_records

REPORT_FILES = ("report.md", "report.json", "report.html")
FIGURES = {
    "curves": "Training loss (solid) and validation NELBO (dots) against tokens seen",
    "variance": "NELBO variance across batches against the clip interval's width",
    "block_size": "Perplexity by block size, with 95 % intervals",
    "gen_ppl": "Generative perplexity against model calls per token",
}
PLOT_HINT = "Figures need matplotlib: pip install 'bd3[plot]' (or pip install matplotlib)."

# The table: (key in a run's summary, header)
COLUMNS = (
    ("name", "run"), ("algo", "algo"), ("block_size", "L'"), ("clip_label", "clip"), ("steps", "steps"),
    ("tokens_total", "tokens seen"), ("ppl_label", "valid PPL (95 % CI)"), ("zero_shot_label", "zero-shot PPL"),
    ("gen_ppl_label", "gen PPL (95 % CI)"), ("nfe_per_token", "NFE / token"), ("wall_time", "wall time"),
)


# ----------------------------------------------------------------------------- collecting


def collect(run_dirs: list[Path]) -> dict:
    """The report of ``run_dirs``: one summary per run, checked to share data and tokenizer."""
    if not run_dirs:
        raise Bd3Error("No runs given; pass one or more run directories, e.g. bd3 report runs/*.")
    runs = [_summary(Path(p)) for p in run_dirs]
    first = runs[0]
    for other in runs[1:]:
        for key, what in (("tokenizer_sha256", "tokenizers"), ("data", "data sets")):
            if other[key] != first[key]:
                raise Bd3Error(
                    f"{first['path']} and {other['path']} were trained with different {what} "
                    f"({first[key][:16]} vs {other[key][:16]}); their perplexities are not comparable: report them separately."
                )
    return {"data": first["data"], "tokenizer": first["tokenizer"], "wrap": first["wrap"], "runs": runs}


def _summary(path: Path) -> dict:
    if not (path / "config.json").is_file():
        raise Bd3Error(f"{path} is not a bd3 run (no config.json); pass folders written by `bd3 pretrain` or `bd3 finetune`.")
    cfg = RunConfig.load(path / "config.json")
    d, metrics = cfg.diffusion, _metrics(path)
    steps = _step_records(metrics)
    per_step = steps[-1]["tokens"] / steps[-1]["step"] if steps else 0
    summary = next((m for m in reversed(metrics) if m.get("event") == "summary"), {})
    last_step = summary.get("step") or (steps[-1]["step"] if steps else 0)
    out = {
        "name": path.name, "path": str(path), "algo": d.algo, "block_size": d.block_size,
        "clip": list(d.clip) if d.algo == "bd3lm" else None, "schedule": d.schedule, "length": cfg.model.length,
        "model": {"hidden_dim": cfg.model.hidden_dim, "n_layers": cfg.model.n_layers, "n_heads": cfg.model.n_heads},
        "data": cfg.data.data, "tokenizer": cfg.data.tokenizer, "tokenizer_sha256": cfg.data.tokenizer_sha256,
        "wrap": cfg.data.wrap, "parent": cfg.train.parent, "steps": last_step,
        "tokens": int(last_step * per_step), "wall_time_s": _wall_time(metrics),
        "loss_curve": [[m["tokens"], m["loss"]] for m in steps],
        "valid_curve": [[int(m["step"] * per_step), m["valid_nelbo"]] for m in metrics if m.get("event") == "validation"],
    }
    out["tokens_total"] = out["tokens"] + _parent_tokens(cfg.train.parent, path)
    out.update(_perplexity(path, d.block_size, summary))
    out.update(**_zero_shot(path), **_gen_ppl(path), **_variance(path))
    out["clip_label"] = _clip_label(out["clip"])
    out["wall_time"] = _duration(out["wall_time_s"])
    return out


def _metrics(path: Path) -> list[dict]:
    p = path / "metrics.jsonl"
    if not p.is_file():
        return []
    records = []
    for line in p.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a crash
    return [r for r in records if isinstance(r, dict)]


def _step_records(metrics: list[dict]) -> list[dict]:
    """The per-step training records (loss, tokens seen so far, ...), not the events."""
    return [m for m in metrics if "loss" in m and "tokens" in m and m.get("event") is None]


def _wall_time(metrics: list[dict]) -> float | None:
    """Training seconds over every session of a run: ``elapsed_s`` restarts at each --resume,
    so each session contributes the largest value it logged."""
    total, session, seen = 0.0, 0.0, False
    for m in metrics:
        if "elapsed_s" not in m:
            continue
        seen = True
        if m["elapsed_s"] < session:  # a resumed session starts its clock at 0
            total += session
        session = m["elapsed_s"]
    return total + session if seen else None


def _parent_tokens(parent: str | None, child: Path, depth: int = 0) -> int:
    """Tokens the run's ancestors were trained on (0 where a parent folder is gone)."""
    if not parent or depth > 16:
        return 0
    p = Path(parent)
    for c in (p, child.parent / p.name):  # as recorded, else a sibling of the child (a moved folder of runs)
        if (c / "config.json").is_file():
            steps = _step_records(_metrics(c))
            own = steps[-1]["tokens"] if steps else 0
            return own + _parent_tokens(RunConfig.load(c / "config.json").train.parent, c, depth + 1)
    return 0


def _perplexity(path: Path, block_size: int, summary: dict) -> dict:
    records = [r for r in eval_records(path, "ppl") if r.get("split", "valid") == "valid"]
    own = [r for r in records if r.get("block_size", block_size) == block_size]
    rec = (own or records or [None])[-1]
    if rec is None:
        if "valid_ppl" not in summary:
            return {"ppl": None, "nelbo": None, "ppl_ci95": None, "bound": None, "ppl_source": None, "ppl_label": ""}
        return {"ppl": summary["valid_ppl"], "nelbo": summary["valid_nelbo"], "ppl_ci95": None,
                "bound": summary.get("bound", True), "ppl_source": "training validation",
                "ppl_label": _ppl_label(summary["valid_ppl"], None, summary.get("bound", True)) + " (training)"}
    bound = rec.get("bound", True)
    ci = rec.get("ppl_ci95") or _interval(rec, bound)
    return {"ppl": rec["ppl"], "nelbo": rec["nelbo"], "ppl_ci95": ci, "bound": bound, "passes": rec.get("passes"),
            "estimator": rec.get("estimator"), "eval_tokens": rec.get("tokens"), "ppl_source": "bd3 eval",
            "ppl_label": _ppl_label(rec["ppl"], ci, bound)}


def _interval(rec: dict, bound: bool) -> list[float] | None:
    """A 95 % interval from a record without ``ppl_ci95``: the standard error if given, else the
    spread of its passes; exact likelihoods have width zero."""
    nelbo = rec["nelbo"]
    if not bound:
        return [rec["ppl"], rec["ppl"]]
    if rec.get("nelbo_se") is not None:
        half = 1.96 * rec["nelbo_se"]
    elif rec.get("passes", 1) > 1 and rec.get("nelbo_std") is not None:
        df = rec["passes"] - 1
        half = t_quantile_975(df) * rec["nelbo_std"] / math.sqrt(rec["passes"])
    else:
        return None
    return [math.exp(nelbo - half), math.exp(nelbo + half)]


def _zero_shot(path: Path) -> dict:
    sets: dict[str, dict] = {}
    for rec in eval_records(path, "zero-shot"):  # oldest first: the newest of each set wins
        for row in rec.get("zero_shot", []):
            sets[row["set"]] = {"ppl": row["ppl"], "nelbo": row["nelbo"], "ppl_ci95": row.get("ppl_ci95")}
    label = ", ".join(f"{name} {_num(v['ppl'])}" for name, v in sorted(sets.items()))
    return {"zero_shot": sets, "zero_shot_label": label}


def _gen_ppl(path: Path) -> dict:
    records = eval_records(path, "gen-ppl")
    if not records:
        return {"gen_ppl": None, "gen_ppl_ci95": None, "gen_ppl_label": "", "nfe_per_token": None}
    rec = records[-1]
    ci = rec.get("gen_ppl_ci95")
    if ci is None and rec.get("per_sample"):  # a record without the interval: from its samples
        ci = mean_interval([s["ppl"] for s in rec["per_sample"] if s.get("ppl") is not None])["ci95"]
    label = _ppl_label(rec["gen_ppl"], ci, bound=False) if rec.get("gen_ppl") is not None else ""
    return {"gen_ppl": rec.get("gen_ppl"), "gen_ppl_ci95": ci, "gen_ppl_label": label,
            "nfe_per_token": rec.get("nfe_per_token"), "gen_entropy": rec.get("entropy"),
            "gen_samples": rec.get("samples"), "judge": rec.get("judge")}


def _variance(path: Path) -> dict:
    records = eval_records(path, "variance")
    if not records:
        return {"variance": None}
    rec = records[-1]
    keep = ("beta", "omega", "nelbo", "var_paper", "var_block", "schedule")
    return {"variance": {"block_size": rec.get("block_size"), "intervals": [{k: r.get(k) for k in keep} for r in rec.get("intervals", [])]}}


def _ppl_label(ppl: float, ci: list[float] | None, bound: bool) -> str:
    text = f"{'<= ' if bound else ''}{_num(ppl)}"
    return text + (f" ({_num(ci[0])}-{_num(ci[1])})" if ci and ci[0] != ci[1] else "")


def _num(v: float) -> str:
    """4 significant digits, without an exponent up to a million (perplexities)."""
    return f"{v:.0f}" if 1e3 <= abs(v) < 1e6 else f"{v:.4g}"


def _clip_label(clip: list[float] | None) -> str:
    return "" if clip is None else f"[{clip[0]:g}, {clip[1]:g}]"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{s:02d}s"


# ----------------------------------------------------------------------------- writing


def check_out(out: Path, force: bool) -> None:
    """``out`` must be a folder (or not exist); an earlier report in it needs ``force``."""
    if out.exists() and not out.is_dir():
        raise Bd3Error(f"--out {out} exists and is not a folder; choose a folder for the report.")
    taken = [f for f in REPORT_FILES if (out / f).exists()]
    if taken and not force:
        raise Bd3Error(f"{out} already holds a report ({', '.join(taken)}); pass --force to replace it, or choose another --out.")


def write_report(report: dict, out: Path, force: bool = False) -> list[Path]:
    """report.md, report.json, report.html and the figures under ``out``; the paths written.
    Without matplotlib the figures are left out and ``report['figures']`` is empty."""
    check_out(out, force)
    out.mkdir(parents=True, exist_ok=True)
    figures = _figures(report, out)
    report = {**report, "figures": {k: p.name for k, p in figures.items()}}
    written = list(figures.values())
    for name, text in (("report.json", json.dumps(report, indent=2) + "\n"), ("report.md", _markdown(report)),
                       ("report.html", _html(report, figures))):
        path = out / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        written.append(path)
    return written


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _markdown(report: dict) -> str:
    lines = [f"# bd3 report: {len(report['runs'])} runs", "",
             f"Data `{report['data']}`, tokenizer `{report['tokenizer']}`, {report['wrap']} rows.", ""]
    lines += ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r.get(k)) for k, _ in COLUMNS) + " |" for r in report["runs"]]
    lines += ["", _NOTES, ""]
    for key, name in report["figures"].items():
        lines += [f"![{FIGURES[key]}]({name})", ""]
    if not report["figures"]:
        lines += [PLOT_HINT, ""]
    return "\n".join(lines)


_NOTES = ("Perplexities are the NELBO bound (`<=`) for diffusion runs and exact for AR, from the newest `bd3 eval` "
          "of the validation split (else the last validation during training). Tokens seen include the parent runs'.")


def _html(report: dict, figures: dict[str, Path]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for _, h in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{esc(_cell(r.get(k)))}</td>" for k, _ in COLUMNS) + "</tr>" for r in report["runs"])
    imgs = "".join(
        f'<figure><img alt="{esc(FIGURES[k])}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{esc(FIGURES[k])}</figcaption></figure>" for k, p in figures.items()
    ) or f"<p>{esc(PLOT_HINT)}</p>"
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:4px 8px;text-align:right}td:first-child{text-align:left}img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>bd3 report</title><style>{style}</style></head>"
            f"<body><h1>bd3 report: {len(report['runs'])} runs</h1><p>Data {esc(report['data'])}, tokenizer "
            f"{esc(report['tokenizer'])}, {esc(report['wrap'])} rows.</p><table><tr>{head}</tr>{body}</table>"
            f"<p>{esc(_NOTES)}</p>{imgs}</body></html>\n")


def terminal_table(report: dict):
    """The runs as a rich table, one line per run (cells never wrap)."""
    from rich.table import Table

    table = Table(title=f"bd3 report: {len(report['runs'])} runs ({report['data']}, {report['tokenizer']}, {report['wrap']} rows)")
    for _, header in COLUMNS:
        table.add_column(header, no_wrap=True)
    for r in report["runs"]:
        table.add_row(*(_cell(r.get(k)) for k, _ in COLUMNS))
    return table


def _cell(v) -> str:
    if isinstance(v, float):
        return _num(v)
    return "" if v is None else str(v)


# ----------------------------------------------------------------------------- figures


def _figures(report: dict, out: Path) -> dict[str, Path]:
    if not has_matplotlib():
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, made = report["runs"], {}
    for key, draw in (("curves", _plot_curves), ("variance", _plot_variance), ("block_size", _plot_block_size),
                      ("gen_ppl", _plot_gen_ppl)):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        if draw(ax, runs):
            ax.set_title(FIGURES[key], fontsize=10)
            fig.tight_layout()
            made[key] = out / f"{key}.png"
            fig.savefig(made[key], dpi=90)
        plt.close(fig)
    return made


def _plot_curves(ax, runs) -> bool:
    drawn = False
    for i, r in enumerate(runs):
        color = f"C{i % 10}"
        offset = r["tokens_total"] - r["tokens"]  # a fine-tune continues its parent's tokens
        if r["loss_curve"]:
            ax.plot([t + offset for t, _ in r["loss_curve"]], [v for _, v in r["loss_curve"]], color=color, lw=1, label=r["name"])
            drawn = True
        if r["valid_curve"]:
            ax.plot([t + offset for t, _ in r["valid_curve"]], [v for _, v in r["valid_curve"]], "o", color=color, ms=4)
            drawn = True
    ax.set(xlabel="tokens seen", ylabel="nats / token")
    ax.legend(fontsize=7)
    return drawn


def _plot_variance(ax, runs) -> bool:
    drawn = False
    for i, r in enumerate(runs):
        rows = (r["variance"] or {}).get("intervals") or []
        if rows:
            ax.scatter([x["omega"] - x["beta"] for x in rows], [max(x["var_paper"], 1e-12) for x in rows], s=14,
                       color=f"C{i % 10}", label=f"{r['name']} (L'={r['variance']['block_size']})")
            drawn = True
    ax.set(xlabel="clip width (omega - beta); 0.999 is the full interval", ylabel="Var (paper), nats^2", yscale="log")
    if drawn:
        ax.legend(fontsize=7)
    return drawn


def _plot_block_size(ax, runs) -> bool:
    rows = [r for r in runs if r["ppl"] is not None]
    seen: dict[int, int] = {}
    for i, r in enumerate(rows):
        ci = r["ppl_ci95"] or [r["ppl"], r["ppl"]]
        nth = seen[r["block_size"]] = seen.get(r["block_size"], -1) + 1
        x = r["block_size"] * 1.08 ** nth  # runs at the same block size side by side
        ax.errorbar([x], [r["ppl"]], yerr=[[r["ppl"] - ci[0]], [ci[1] - r["ppl"]]], fmt="o", capsize=3,
                    color=f"C{i % 10}", label=f"{r['name']} ({r['algo']})")
    ax.set(xlabel="block size L'", ylabel="validation perplexity", xscale="log", yscale="log")
    ax.set_xticks(sorted(seen), [str(b) for b in sorted(seen)])
    ax.legend(fontsize=7)
    return bool(rows)


def _plot_gen_ppl(ax, runs) -> bool:
    rows = [r for r in runs if r["gen_ppl"] is not None and r["nfe_per_token"] is not None]
    for i, r in enumerate(rows):
        ci = r["gen_ppl_ci95"] or [r["gen_ppl"], r["gen_ppl"]]
        ax.errorbar([r["nfe_per_token"]], [r["gen_ppl"]], yerr=[[r["gen_ppl"] - ci[0]], [ci[1] - r["gen_ppl"]]], fmt="o",
                    capsize=3, color=f"C{i % 10}", label=r["name"])
    ax.set(xlabel="model calls per generated token (NFE / token)", ylabel="generative perplexity (95 % interval)")
    ax.legend(fontsize=7)
    return bool(rows)
