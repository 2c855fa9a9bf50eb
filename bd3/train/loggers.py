"""Experiment trackers (TensorBoard, Weights & Biases) fed from the records of ``metrics.jsonl``.

The training loop writes every record through :meth:`bd3.runs.Run.log`; :class:`Loggers`
listens to those same dicts (``run.listeners``), so a tracker shows exactly the numbers of
``metrics.jsonl`` at the same steps (:func:`scalars` names them), plus the run's config as
hyperparameters, the clip search's table and a few sample texts at each validation.

Each tracker is an optional extra (``bd3[tensorboard]``, ``bd3[wandb]``). One that fails
(at start, disk full, network lost) is reported once and dropped; training goes on and
``metrics.jsonl`` stays complete. Only rank 0 logs under torchrun.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlparse

import torch

from bd3.data.sources import host_reachable
from bd3.errors import Bd3Error
from bd3.sampling.generate import generate
from bd3.sampling.text import render

STATE_FILE = "loggers.json"  # in the run folder: the trackers in use and the W&B run id (for --resume)
WANDB_HOST = "api.wandb.ai"
SAMPLES = 2  # texts generated at each validation, one model length each (only when a tracker is on)
SECTIONS = {None: "train", "validation": "valid"}  # tag prefix per metrics.jsonl event


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a ``metrics.jsonl`` record as tracker tags: ``train/loss``,
    ``valid/nelbo`` (the ``valid_`` prefix dropped), a two-number list (an interval) as
    ``<tag>_lo`` / ``<tag>_hi``; a clip search gives the interval in use (``clip/beta``,
    ``clip/omega``) and the minimiser's NELBO and variances (``clip_search/best_*``)."""
    event = record.get("event")
    if event == "clip_search":
        in_use = record["best"] if record["applied"] else record["clip"]
        out = {"clip/beta": float(in_use[0]), "clip/omega": float(in_use[1])}
        best = next(r for r in record["scores"] if [r["beta"], r["omega"]] == list(record["best"]))
        out.update({f"clip_search/best_{k}": float(best[k]) for k in ("nelbo", "var_paper", "var_block")})
        return out
    section = SECTIONS.get(event, event)
    out = {}
    for key, value in record.items():
        if key in ("step", "event"):
            continue
        tag = f"{section}/{key.removeprefix('valid_')}"
        if _is_number(value):
            out[tag] = float(value)
        elif isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_is_number, value)):
            out[f"{tag}_lo"], out[f"{tag}_hi"] = float(value[0]), float(value[1])
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Loggers:
    """The trackers of a run. ``log`` is a :class:`~bd3.runs.Run` listener; a tracker that
    raises is reported once through ``warn`` and dropped."""

    def __init__(self, trackers: Sequence = (), warn: Callable[[str], None] = print) -> None:
        self.trackers = list(trackers)
        self.warn = warn

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log(self, record: dict) -> None:
        step = record.get("step", 0)
        self._each("scalars", step, scalars(record))
        if record.get("event") == "clip_search":
            columns = ["beta", "omega", "nelbo", "var_paper", "var_block"]
            self._each("table", step, "clip_search/scores", columns, [[r[c] for c in columns] for r in record["scores"]])

    def samples(self, step: int, texts: list[str]) -> None:
        self._each("texts", step, "samples", texts)

    def close(self) -> None:
        self._each("close")
        self.trackers = []

    def _each(self, method: str, *args) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:  # trackers raise many types (OSError, network, protobuf); all mean the same here
                self.trackers.remove(tracker)
                self.warn(f"Warning: the {tracker.name} logger failed ({type(e).__name__}: {e}); training continues without it "
                          "(metrics.jsonl has every number).")


def open_loggers(names: Sequence[str], run_dir: Path, config: dict, start_step: int, warn: Callable[[str], None] = print) -> Loggers:
    """Start the named trackers for the run in ``run_dir`` (``config``: the run's config as a
    dict, logged as hyperparameters), continuing from ``start_step`` (0 for a new run);
    records them in ``loggers.json``. A tracker that cannot start is reported through
    ``warn`` and left out."""
    state = read_state(run_dir)
    state["loggers"] = list(names)
    loggers = Loggers(warn=warn)
    for name in names:
        try:
            loggers.trackers.append(TRACKERS[name](run_dir, config, start_step, state, warn))
        except Exception as e:  # as in Loggers._each
            warn(f"Warning: the {name} logger could not start ({type(e).__name__}: {e}); training continues without it.")
    try:
        (run_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    except OSError as e:
        warn(f"Warning: could not write {run_dir / STATE_FILE} ({e}); --resume will not know this run's trackers.")
    return loggers


def read_state(run_dir: Path) -> dict:
    """``loggers.json`` of a run: ``{"loggers": [...], "wandb_id": ...}`` (empty if absent)."""
    path = Path(run_dir) / STATE_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as e:
        raise Bd3Error(f"{path} is unreadable ({e}); delete it to start the trackers afresh.") from None


def sample_texts(model, config, tokenizer, n: int = SAMPLES) -> list[str]:
    """``n`` samples of one model length from ``model`` (the EMA copy) with the run's block
    size and default decoding, as text. The training RNG is left untouched."""
    model.eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        samples = generate(model, config, num_samples=n, max_tokens=config.model.length, seed=config.train.seed,
                           threads=torch.get_num_threads())
    return [render(s.tokens, tokenizer) for s in samples]


# ---------------------------------------------------------------------------------- trackers


class TensorBoard:
    """Event files in ``<run>/tb`` (``tensorboard --logdir runs``)."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, config: dict, start_step: int, state: dict, warn) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # on --resume, points a stopped run logged after its last checkpoint are dropped (as from metrics.jsonl)
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in _flatten(config).items()}
        for summary in hparams(flat, {"valid/nelbo": 0.0, "valid/ppl": 0.0}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", _code_block(json.dumps(config, indent=2)), start_step)
        self.writer.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def table(self, step: int, tag: str, columns: list[str], rows: list[list]) -> None:
        lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        lines += ["| " + " | ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row) + " |" for row in rows]
        self.writer.add_text(tag, "\n".join(lines), step)
        self.writer.flush()

    def texts(self, step: int, tag: str, texts: list[str]) -> None:
        self.writer.add_text(tag, "\n\n".join(f"**{i}**\n\n{_code_block(t)}" for i, t in enumerate(texts)), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A W&B run whose files live in ``<run>/wandb``; offline when the W&B host cannot be
    reached; its id is kept in ``loggers.json`` so ``--resume`` continues the same W&B run."""

    name = "wandb"

    def __init__(self, run_dir: Path, config: dict, start_step: int, state: dict, warn) -> None:
        import wandb

        if "WANDB_MODE" not in os.environ:
            host = urlparse(os.environ.get("WANDB_BASE_URL", f"https://{WANDB_HOST}")).hostname or WANDB_HOST
            if not host_reachable(host):
                os.environ["WANDB_MODE"] = "offline"
                warn(f"W&B: {host} cannot be reached; logging offline into {run_dir / 'wandb'} (upload later with `wandb sync`).")
        state.setdefault("wandb_id", secrets.token_hex(4))  # W&B's own ids look like this
        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "bd3"), name=run_dir.name, id=state["wandb_id"], resume="allow",
            dir=str(run_dir), config=config, settings=wandb.Settings(console="off", silent=True),
        )
        self.run.config.update(config, allow_val_change=True)  # a resumed run may have extended --steps
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")  # bd3's step on the x axis, also when --resume repeats steps

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log({"step": step, **values})

    def table(self, step: int, tag: str, columns: list[str], rows: list[list]) -> None:
        self.run.log({"step": step, tag: self.wandb.Table(columns=columns, data=rows)})

    def texts(self, step: int, tag: str, texts: list[str]) -> None:
        self.run.log({"step": step, tag: self.wandb.Table(columns=["sample", "text"], data=list(enumerate(texts)))})

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"tensorboard": TensorBoard, "wandb": WandB}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _code_block(text: str) -> str:
    """Markdown that shows ``text`` as is (TensorBoard renders text summaries as markdown)."""
    return "\n".join("    " + line for line in text.splitlines())
