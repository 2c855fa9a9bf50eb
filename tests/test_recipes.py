"""The recipes run end to end at a toy size, resume, and feed `bd3 report`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LADDER = ROOT / "recipes" / "paper-ladder.sh"
FINAL = ["ar", "mdlm", "sedd", "bd3-bs1-fullmask", "bd3-bs4-clip", "bd3-bs4-linear"]
TOY = {  # every step of the ladder, a few steps and batches each; one block size
    "STEPS": "3", "BASE_STEPS": "2", "LENGTH": "32", "BATCH": "4", "BLOCK_SIZES": "4", "DEVICE": "cpu",
    "TRAIN_OPTS": "--eval-batches 1 --log-every 1", "EVAL_OPTS": "--passes 2", "EVAL_BATCHES": "1",
    "ZS_SETS": "devil", "ZS_BATCHES": "1", "NUM_SAMPLES": "2", "GEN_TOKENS": "16", "LONG_TOKENS": "64",
    "LONG_SAMPLES": "1", "VAR_BATCHES": "2", "VAR_OPTS": "--clip 0.45,0.95 --clip 0.001,1",
}

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or not hasattr(os, "fork"), reason="needs bash and fork")


def run_ladder(out: Path, bd3: list[str]) -> subprocess.CompletedProcess:
    """The ladder with BD3 the fork server's client (tests/conftest.py), so each of its ~35
    commands starts in milliseconds instead of re-importing torch; token shards in the test
    session's cache (conftest's BD3_CACHE_DIR)."""
    env = {**os.environ, **TOY, "OUT": str(out), "BD3": " ".join(bd3), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(LADDER)], env=env, capture_output=True, text=True, timeout=600)


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text, self.images = [], []

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def handle_starttag(self, tag, attrs) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def test_paper_ladder_toy_end_to_end(tmp_path, bd3_client):
    out = tmp_path / "ladder"
    first = run_ladder(out, bd3_client)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = out / "runs"
    assert sorted(p.name for p in runs.iterdir()) == sorted([*FINAL, "base"])
    for name in FINAL:
        records = {json.loads(p.read_text())["kind"] for p in (runs / name / "eval").glob("*.json")}
        assert {"ppl", "zero-shot", "gen-ppl"} <= records, name
    assert "variance" in {json.loads(p.read_text())["kind"] for p in (runs / "bd3-bs4-linear" / "eval").glob("*.json")}
    fine_tune = json.loads((runs / "bd3-bs4-clip" / "config.json").read_text())
    assert fine_tune["diffusion"]["clip"] == [0.45, 0.95] and fine_tune["train"]["parent"].endswith("base")
    assert json.loads((runs / "bd3-bs1-fullmask" / "config.json").read_text())["diffusion"]["clip"] == [1.0, 1.0]
    long = json.loads((out / "samples" / "bd3-bs4-clip.jsonl").read_text().splitlines()[0])
    assert len(long["tokens"]) == 64  # twice the context of 32

    # a second call finds everything done: nothing trained or evaluated again
    records_before = sorted(p.name for p in runs.glob("*/eval/*.json"))
    second = run_ladder(out, bd3_client)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count("trained, skipped") == len(FINAL) + 1
    assert "validation perplexity" not in second.stderr and sorted(p.name for p in runs.glob("*/eval/*.json")) == records_before

    # the report: four kinds of file, every run named, each run's interval in the JSON
    report_dir = out / "report"
    for name in ("report.md", "report.json", "report.html"):
        assert (report_dir / name).is_file()
    report = json.loads((report_dir / "report.json").read_text())
    by_name = {r["name"]: r for r in report["runs"]}
    assert set(by_name) == {*FINAL, "base"}
    for name in FINAL:
        low, high = by_name[name]["ppl_ci95"]
        assert low <= by_name[name]["ppl"] <= high
        if name not in ("ar", "bd3-bs1-fullmask"):  # two Monte-Carlo passes: an interval of non-zero width
            assert low < high
    for name in ("ar", "bd3-bs1-fullmask"):  # exact: the AR NLL, and k at block size 1 (one mask pattern per block)
        assert by_name[name]["ppl_ci95"][0] == pytest.approx(by_name[name]["ppl_ci95"][1], rel=1e-12)
    assert by_name["bd3-bs4-clip"]["tokens_total"] == by_name["ar"]["tokens_total"]  # equal tokens per final model
    page = _Page()
    page.feed((report_dir / "report.html").read_text())
    text = " ".join(page.text)
    assert all(name in text for name in by_name)
    assert "http" not in "".join(page.images)  # nothing fetched from the network
    pytest.importorskip("matplotlib", reason="figures need matplotlib (pip install 'bd3[plot]')")
    assert set(report["figures"]) == {"curves", "variance", "block_size", "gen_ppl"}
    assert len(page.images) == 4 and all(src.startswith("data:image/png;base64,") for src in page.images)
    for name in report["figures"].values():
        assert (report_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
