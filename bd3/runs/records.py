"""Evaluation records: what `bd3 eval` and `bd3 variance` measured, kept in the run.

Each evaluation of a run is saved as ``RUN/eval/<kind>-<UTC time>.json`` (written to a
temporary file and renamed into place): the command's JSON result plus ``kind`` and
``created``. ``kind`` is ``ppl`` (the perplexity of a split), ``zero-shot``, ``gen-ppl`` or
``variance``. :func:`eval_records` reads them back, oldest first, for `bd3 report`.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from bd3.errors import Bd3Error
from bd3.runs.rundir import _atomic_write_text

EVAL_DIR = "eval"
KINDS = ("ppl", "zero-shot", "gen-ppl", "variance")


def save_eval_record(run_dir: Path, kind: str, result: dict) -> Path:
    """Write ``result`` as a new record of ``kind`` under ``run_dir/eval``; return its path."""
    if kind not in KINDS:
        raise ValueError(f"unknown evaluation kind {kind!r}; one of {', '.join(KINDS)}")
    folder = Path(run_dir) / EVAL_DIR
    folder.mkdir(exist_ok=True)
    now = datetime.now(timezone.utc)
    stamp = now.strftime("%Y%m%d-%H%M%S")
    path = folder / f"{kind}-{stamp}.json"
    n = 2
    while path.exists():  # two evaluations within a second
        path = folder / f"{kind}-{stamp}-{n}.json"
        n += 1
    record = {"kind": kind, "created": now.isoformat(timespec="microseconds"), **result}
    _atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path


def eval_records(run_dir: Path, kind: str | None = None) -> list[dict]:
    """The run's evaluation records (of ``kind``, or all), oldest first."""
    folder = Path(run_dir) / EVAL_DIR
    records = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise Bd3Error(f"{path} is not a readable evaluation record ({e}); delete it or evaluate again.") from None
        if isinstance(record, dict) and (kind is None or record.get("kind") == kind):
            records.append(record)
    return sorted(records, key=lambda r: str(r.get("created", "")))
