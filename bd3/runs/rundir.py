"""Run directory layout (see README):

    runs/<name>/
      config.json               full resolved RunConfig
      tokenizer.json            the tokenizer, so the run is usable alone
      metrics.jsonl             one JSON object per logged step or evaluation
      checkpoints/step-00001000/
        model.safetensors       weights (config JSON in the metadata)
        ema.safetensors         EMA weights (what eval and sample use)
        train_state.safetensors optimiser moments and RNG states
        train_state.json        counters and data position
        config.json

A checkpoint is written into a hidden temporary folder and renamed into place, so a crash
never leaves a half-written checkpoint where a loader looks. Loading is strict: a missing,
extra or misshapen tensor is an error naming the file and the key.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bd3.config import RunConfig
from bd3.errors import Bd3Error, cannot_write
from bd3.paths import holds_working_dir

CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "train_state.safetensors", "train_state.json", "config.json")


class Run:
    def __init__(self, path: Path, config: RunConfig) -> None:
        self.path = Path(path)
        self.config = config
        self.listeners: list[Callable[[dict], None]] = []  # called with each record after metrics.jsonl has it

    # -- creating and opening -------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, config: RunConfig, tokenizer_json: str, *, force: bool = False) -> Run:
        """A new run directory holding config.json and tokenizer.json. It is built in a hidden
        sibling folder and renamed into place; with ``force`` an existing run directory (see
        :func:`check_replaceable`) is removed only once the new one is complete."""
        path = Path(path)
        replacing = path.exists() or path.is_symlink()
        if replacing:
            check_replaceable(path, force, parent=config.train.parent)
        where = Path(os.path.abspath(path)).parent
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        new, old = where / f".{path.name}.new-{tag}", where / f".{path.name}.old-{tag}"
        try:
            (new / "checkpoints").mkdir(parents=True)
            (new / "config.json").write_text(config.to_json())
            (new / "tokenizer.json").write_text(tokenizer_json)
            if replacing:
                os.rename(path, old)
            os.rename(new, path)
        except OSError as e:
            shutil.rmtree(new, ignore_errors=True)
            if old.exists() and not path.exists():
                os.rename(old, path)
            raise cannot_write(path, e, "choose another --out") from None
        shutil.rmtree(old, ignore_errors=True)
        return cls(path, config)

    @classmethod
    def open(cls, path: Path) -> Run:
        path = Path(path)
        if not path.is_dir():
            raise Bd3Error(f"Run directory {path} does not exist; pass a folder written by `bd3 pretrain` or `bd3 import`.")
        return cls(path, RunConfig.load(path / "config.json"))

    def write_config(self) -> None:
        _atomic_write_text(self.path / "config.json", self.config.to_json())

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    # -- metrics -------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for listener in self.listeners:
            listener(record)

    def metrics(self) -> list[dict]:
        p = self.path / "metrics.jsonl"
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []

    # -- checkpoints ---------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (temporary folders are ignored)."""
        return complete_checkpoints(self.path)

    def latest_checkpoint(self) -> Path:
        ckpts = self.checkpoints()
        if not ckpts:
            raise Bd3Error(f"{self.path} has no complete checkpoint under checkpoints/; was the run stopped before its first save?")
        return ckpts[-1]

    def save_checkpoint(
        self,
        step: int,
        model: dict[str, torch.Tensor],
        ema: dict[str, torch.Tensor],
        state_tensors: dict[str, torch.Tensor],
        state: dict,
    ) -> Path:
        final = self.path / "checkpoints" / f"step-{step:08d}"
        tmp = self.path / "checkpoints" / f".tmp-step-{step:08d}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        meta = {"config": self.config.to_json(), "step": str(step), "format": "bd3"}
        try:
            tmp.mkdir(parents=True)
            save_file(_contiguous(model), tmp / "model.safetensors", metadata=meta)
            save_file(_contiguous(ema), tmp / "ema.safetensors", metadata=meta)
            save_file(_contiguous(state_tensors), tmp / "train_state.safetensors", metadata={"step": str(step)})
            (tmp / "train_state.json").write_text(json.dumps(state, indent=2) + "\n")
            (tmp / "config.json").write_text(self.config.to_json())
            for f in tmp.iterdir():
                _fsync(f)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except (OSError, SafetensorError) as e:  # disk full, permissions: the previous checkpoint stays intact
            shutil.rmtree(tmp, ignore_errors=True)
            previous = self.checkpoints()
            kept = f"the newest complete checkpoint is {previous[-1]}" if previous else "no checkpoint was written"
            raise cannot_write(final, e, f"continue with --resume once it can be written ({kept})") from None
        return final

    def train_state(self, ckpt: Path) -> dict:
        path = ckpt / "train_state.json"
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise Bd3Error(f"{path} is unreadable ({e}); the checkpoint cannot be resumed.") from None

    def remove_partial_checkpoints(self) -> None:
        """Delete temporary folders left by a save that was killed half-way."""
        for tmp in (self.path / "checkpoints").glob(".tmp-step-*"):
            shutil.rmtree(tmp, ignore_errors=True)

    def truncate_metrics(self, step: int) -> None:
        """Drop records logged after ``step`` (by a run that was interrupted after its last save)."""
        kept = [r for r in self.metrics() if r.get("step", 0) <= step and r.get("event") != "summary"]
        _atomic_write_text(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))

    def best(self) -> dict | None:
        p = self.path / "best.json"
        return json.loads(p.read_text()) if p.exists() else None

    def record_best(self, ckpt: Path, step: int, valid_nelbo: float) -> None:
        """Name ``ckpt`` in best.json if its validation NELBO is the lowest so far."""
        best = self.best()
        if best is None or valid_nelbo < best["valid_nelbo"] or not (self.path / best["checkpoint"]).exists():
            record = {"checkpoint": str(ckpt.relative_to(self.path)), "step": step, "valid_nelbo": valid_nelbo}
            _atomic_write_text(self.path / "best.json", json.dumps(record, indent=2) + "\n")

    def prune(self, keep_last: int) -> None:
        """Delete all but the newest ``keep_last`` checkpoints, never the best one."""
        best = self.best()
        protected = {best["checkpoint"]} if best else set()
        for ckpt in self.checkpoints()[:-keep_last]:
            if str(ckpt.relative_to(self.path)) not in protected:
                shutil.rmtree(ckpt)

    def weights(self, which: str = "ema", checkpoint: Path | None = None) -> dict[str, torch.Tensor]:
        ckpt = checkpoint or self.latest_checkpoint()
        return load_tensors(ckpt / f"{which}.safetensors")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing, truncated or corrupted file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise Bd3Error(f"{path} does not exist; the checkpoint is incomplete.")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise Bd3Error(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupted.") from None


def load_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path | str) -> None:
    """Load ``tensors`` into ``module``; every key and shape must match, or an error names them."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    shapes = [
        f"{k} (file {tuple(tensors[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append("missing " + ", ".join(missing))
    if extra:
        problems.append("unexpected " + ", ".join(extra))
    if shapes:
        problems.append("wrong shape " + ", ".join(shapes))
    if problems:
        raise Bd3Error(f"{source} does not match the model: " + "; ".join(problems) + ".")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise Bd3Error(f"{source} holds non-finite values in {', '.join(bad)}; the checkpoint is corrupted.")
    module.load_state_dict(tensors, strict=True)


def complete_checkpoints(run: Path) -> list[Path]:
    """The complete checkpoints of the run directory ``run``, oldest first."""
    root = Path(run) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and all((p / f).exists() for f in CHECKPOINT_FILES))


def resolve_run(run: Path | None, root: Path = Path("runs")) -> Path:
    """The given run, or the newest run under ./runs with a complete checkpoint (named on
    stderr with the newer runs it skipped: still before their first save)."""
    if run is not None:
        return Path(run)
    candidates = [p for p in root.glob("*") if (p / "config.json").is_file()] if root.is_dir() else []
    if not candidates:
        raise Bd3Error(f"No run given and none found under ./{root}; pass a run directory, or create one with `bd3 pretrain`.")
    candidates.sort(key=lambda p: (p / "config.json").stat().st_mtime, reverse=True)
    skipped = list(itertools.takewhile(lambda p: not complete_checkpoints(p), candidates))
    names = ", ".join(map(str, skipped))
    if len(skipped) == len(candidates):
        raise Bd3Error(
            f"No run under ./{root} has a complete checkpoint yet ({names}: still training, or stopped before their "
            "first save); pass a run directory, or wait for a first checkpoint."
        )
    newest = candidates[len(skipped)]
    note = f" (skipped {names}: no complete checkpoint yet)" if skipped else ""
    print(f"Using the newest run: {newest}{note}", file=sys.stderr)
    return newest


RUN_ENTRIES = ("config.json", "tokenizer.json", "metrics.jsonl", "best.json", "checkpoints", "samples", "eval")  # the layout in README.md, "Run directories"


def check_replaceable(path: Path, force: bool, parent: str = "") -> None:
    """Refuse to replace ``path`` unless ``force`` is given and it is a bd3 run directory (or
    an empty folder) that is neither the current folder, nor one of its ancestors, nor the
    ``parent`` run a fine-tune reads."""
    if not force:
        raise Bd3Error(f"{path} already exists. Choose another --out, or pass --force to replace it.")
    if path.is_symlink() or not path.is_dir():
        raise Bd3Error(f"{path} exists and is not a folder; remove it or choose another --out.")
    if holds_working_dir(path):
        raise Bd3Error(f"{path} is the current folder or holds it; --force replaces only a run directory elsewhere: choose another --out.")
    if parent and Path(parent).resolve() == path.resolve():
        raise Bd3Error(f"{path} is the run being fine-tuned; choose another --out for the new run.")
    entries = [p.name for p in path.iterdir()]
    foreign = sorted(n for n in entries if n not in RUN_ENTRIES and not (n.startswith(".") and ".tmp-" in n))
    if foreign or (entries and "config.json" not in entries):
        what = f"it holds {', '.join(foreign[:3])}" if foreign else "it has no config.json"
        raise Bd3Error(
            f"{path} is not a bd3 run directory ({what}); --force replaces only run directories: "
            "choose another --out, or remove it yourself."
        )


_ADJECTIVES = "amber brisk calm dapper eager fuzzy gentle hazy ivory jolly keen lucid mellow nimble olive plucky quiet rapid sunny tidy vivid witty".split()
_NOUNS = "badger crane dingo egret falcon gecko heron ibis jackal koala lemur marten newt otter panda quail raven stoat tapir urchin vole walrus".split()


def new_run_name(config: RunConfig, root: Path = Path("runs")) -> Path:
    """``runs/<adjective>-<noun>-<algo>-bs<L'>``, unique under ``root``."""
    rng = random.Random(time.time_ns())
    d = config.diffusion
    for _ in range(1000):
        path = root / f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}-{d.algo}-bs{d.block_size}"
        if not path.exists():
            return path
    return root / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:  # a full disk: the old file stays, the partial one goes
        tmp.unlink(missing_ok=True)
        raise cannot_write(path, e, "continue with --resume once it can be written") from None
