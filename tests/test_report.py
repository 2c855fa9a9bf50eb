"""`bd3 report` and the evaluation records it reads, on hand-made run folders."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bd3.cli.main import main
from bd3.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig
from bd3.evaluate import report as report_mod
from bd3.runs.records import eval_records, save_eval_record


def make_run(path: Path, algo: str = "bd3lm", block_size: int = 4, sha: str = "a" * 64, parent: str | None = None,
             data: str = "web") -> Path:
    cfg = RunConfig(model=ModelConfig(causal=algo == "ar"), diffusion=DiffusionConfig(algo=algo, block_size=block_size),
                    data=DataConfig(data=data, tokenizer_sha256=sha))
    cfg = replace(cfg, train=replace(cfg.train, parent=parent, steps=4))
    path.mkdir(parents=True)
    (path / "config.json").write_text(cfg.to_json())
    lines = [{"step": s, "loss": 7.0 - s, "lr": 1e-3, "tokens": s * 2048, "elapsed_s": s} for s in range(1, 5)]
    lines += [{"step": 4, "event": "validation", "valid_nelbo": 3.5, "valid_ppl": math.exp(3.5)},
              {"event": "summary", "step": 4, "elapsed_s": 75.0, "valid_nelbo": 3.5, "valid_ppl": math.exp(3.5), "bound": algo != "ar"}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def bd3(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_records_round_trip(tmp_path):
    run = make_run(tmp_path / "r")
    first = save_eval_record(run, "ppl", {"nelbo": 3.0, "ppl": math.exp(3.0)})
    second = save_eval_record(run, "ppl", {"nelbo": 2.0, "ppl": math.exp(2.0)})  # the same second: another name
    assert first != second and first.parent == run / "eval" and not list(run.glob("eval/.*"))
    assert [r["nelbo"] for r in eval_records(run, "ppl")] == [3.0, 2.0] and eval_records(run, "variance") == []
    with pytest.raises(ValueError):
        save_eval_record(run, "bleu", {})


def test_wall_time_adds_every_session_of_a_resumed_run(tmp_path):
    run = make_run(tmp_path / "resumed")  # a first session of 75 s
    resumed = [{"step": s, "loss": 2.0, "lr": 1e-3, "tokens": s * 2048, "elapsed_s": 10.0 * (s - 4)} for s in (5, 6)]
    resumed.append({"event": "summary", "step": 6, "elapsed_s": 25.0, "valid_nelbo": 3.0, "valid_ppl": math.exp(3.0)})
    with (run / "metrics.jsonl").open("a") as f:
        f.write("".join(json.dumps(x) + "\n" for x in resumed))
    row = report_mod.collect([run])["runs"][0]
    assert row["wall_time_s"] == 100.0 and row["wall_time"] == "1m40s" and row["steps"] == 6


def test_intervals_from_records_and_fallbacks(tmp_path):
    with_ci = make_run(tmp_path / "with-ci")
    save_eval_record(with_ci, "ppl", {"nelbo": 3.0, "ppl": math.exp(3.0), "nelbo_se": 0.01, "ppl_ci95": [19.0, 21.5],
                                      "estimator": "k", "passes": 8, "tokens": 1000, "bound": True, "split": "valid", "block_size": 4})
    save_eval_record(with_ci, "ppl", {"nelbo": 9.0, "ppl": math.exp(9.0), "split": "train", "block_size": 4})  # not validation
    passes = make_run(tmp_path / "passes")
    save_eval_record(passes, "ppl", {"nelbo": 3.0, "ppl": math.exp(3.0), "nelbo_std": 0.1, "passes": 4, "tokens": 10,
                                     "bound": True, "split": "valid", "block_size": 4})
    exact = make_run(tmp_path / "ar", algo="ar")
    save_eval_record(exact, "ppl", {"nelbo": 2.5, "ppl": math.exp(2.5), "passes": 1, "bound": False, "split": "valid", "block_size": 1})
    untested = make_run(tmp_path / "untested", parent=str(tmp_path / "passes"))
    rows = {r["name"]: r for r in report_mod.collect([with_ci, passes, exact, untested])["runs"]}
    assert rows["with-ci"]["ppl_ci95"] == [19.0, 21.5] and rows["with-ci"]["estimator"] == "k"
    half = 3.1824 * 0.1 / 2  # Student t, 3 degrees of freedom, over sqrt(4) passes
    assert rows["passes"]["ppl_ci95"] == pytest.approx([math.exp(3.0 - half), math.exp(3.0 + half)])
    assert rows["ar"]["ppl_ci95"] == [math.exp(2.5)] * 2 and rows["ar"]["ppl_label"] == f"{math.exp(2.5):.4g}"
    assert rows["untested"]["ppl_ci95"] is None and rows["untested"]["ppl_source"] == "training validation"
    assert rows["untested"]["tokens_total"] == 2 * 4 * 2048  # its own tokens and its parent's
    assert rows["with-ci"]["wall_time"] == "1m15s" and rows["with-ci"]["clip_label"] == "[0.001, 1]"


def test_report_files_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report_mod, "has_matplotlib", lambda: False)
    run = make_run(tmp_path / "runs" / "bs4")
    save_eval_record(run, "zero-shot", {"zero_shot": [{"set": "devil", "ppl": 90.0, "nelbo": math.log(90.0)}]})
    per_sample = [{"ppl": p} for p in (100.0, 110.0, 130.0, 140.0)]  # no gen_ppl_ci95: the report derives it
    save_eval_record(run, "gen-ppl", {"gen_ppl": 120.0, "nfe_per_token": 0.5, "entropy": 5.1, "samples": 4, "per_sample": per_sample})
    code, out, err = bd3(capsys, "report", run, "--out", tmp_path / "rep")
    assert code == 0, err
    assert "bs4" in out and "devil 90" in out and "pip install 'bd3[plot]'" in err
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["figures"] == {} and report["runs"][0]["gen_ppl"] == 120.0
    half = 3.1824 * np.std([100, 110, 130, 140], ddof=1) / 2  # Student t, 3 degrees of freedom, over sqrt(4) samples
    assert report["runs"][0]["gen_ppl_ci95"] == pytest.approx([120 - half, 120 + half], rel=1e-4)
    assert report["runs"][0]["gen_ppl_label"] == "120 (90.95-149.1)"
    assert "pip install" in (tmp_path / "rep" / "report.html").read_text() and not list((tmp_path / "rep").glob("*.png"))
    assert "| bs4 | bd3lm | 4 |" in (tmp_path / "rep" / "report.md").read_text()
    code, _, err = bd3(capsys, "report", run, "--out", tmp_path / "rep")  # an earlier report is kept
    assert code == 1 and "--force" in err
    assert bd3(capsys, "report", run, "--out", tmp_path / "rep", "--force")[0] == 0


@pytest.mark.parametrize("case,code,needle", [
    ("none", 2, "at least one run"),
    ("not-a-run", 1, "is not a bd3 run"),
    ("tokenizers", 1, "different tokenizers"),
    ("data", 1, "different data sets"),
    ("out-is-file", 1, "is not a folder"),
])
def test_bad_input_is_one_line(tmp_path, capsys, case, code, needle):
    run = make_run(tmp_path / "a")
    args = {
        "none": ["report"],
        "not-a-run": ["report", run, tmp_path],
        "tokenizers": ["report", run, make_run(tmp_path / "b", sha="b" * 64)],
        "data": ["report", run, make_run(tmp_path / "c", data="owt")],
        "out-is-file": ["report", run, "--out", tmp_path / "a" / "config.json"],
    }[case]
    got, out, err = bd3(capsys, *args)
    assert got == code and needle in err and len(err.strip().splitlines()) == 1 and out == ""
