"""The command line: the user's flow end to end, errors, help, completions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bd3.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["tokenize", "pretrain", "finetune", "eval", "sample", "variance", "import", "export", "report"]
SMALL = ["--length", "32", "--batch-size", "4", "--log-every", "1", "--device", "cpu", "--eval-batches", "2"]


def bd3(*args, capsys=None) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr() if capsys else ("", "")
    return code, out, err


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_flow_as_users_type_it(workdir, capsys):
    """tokenize -> pretrain -> eval -> sample -> finetune -> variance, with the newest run implied."""
    code, out, err = bd3("tokenize", "--data", "web", "--length", 32, "--out", "shards", capsys=capsys)
    assert code == 0, err
    meta = json.loads((workdir / "shards" / "meta.json").read_text())
    assert meta["length"] == 32 and meta["splits"]["train"]["rows"] > 0
    assert (workdir / "shards" / "train.bin").stat().st_size == meta["splits"]["train"]["rows"] * 32 * 2  # uint16

    code, out, err = bd3("pretrain", "--data", "shards", "--steps", 3, "--block-size", 8, *SMALL, capsys=capsys)
    assert code == 0, err
    runs = list((workdir / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    assert "validation perplexity <=" in err and "unigram" in err
    for f in ("config.json", "tokenizer.json", "metrics.jsonl"):
        assert (run / f).is_file()
    ckpt = run / "checkpoints" / "step-00000003"
    for f in ("model.safetensors", "ema.safetensors", "train_state.safetensors", "train_state.json", "config.json"):
        assert (ckpt / f).is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all({"step", "loss", "lr", "tokens_per_s", "elapsed_s"} <= r.keys() for r in steps)
    assert records[-1]["event"] == "summary" and records[-1]["valid_ppl"] > 0

    code, out, err = bd3("eval", "--json", "--max-batches", 2, "--device", "cpu", capsys=capsys)
    assert code == 0, err
    assert run.name in err  # the newest run is named on stderr
    result = json.loads(out)
    assert result["bound"] and result["ppl"] > 1 and result["block_size"] == 8

    code, out, err = bd3("sample", "--max-tokens", 24, "--seed", 3, "--device", "cpu", capsys=capsys)
    assert code == 0, err
    assert out.strip() and "tokens/s" in err and "model calls per token" in err
    code, again, _ = bd3("sample", "--max-tokens", 24, "--seed", 3, "--device", "cpu", capsys=capsys)
    assert again == out  # same seed, same text

    code, out, err = bd3("sample", run, "--max-tokens", 16, "--num-samples", 2, "--format", "jsonl", "--device", "cpu", capsys=capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rows) == 2 and all(len(r["tokens"]) == 16 and r["nfe"] == 15 for r in rows)

    code, out, err = bd3("finetune", "--block-size", 4, "--clip", "0.45,0.95", "--steps", 2, "--log-every", 1, "--device", "cpu",
                         "--eval-batches", 2, capsys=capsys)
    assert code == 0, err
    child = max((workdir / "runs").iterdir(), key=lambda p: (p / "config.json").stat().st_mtime)
    cfg = json.loads((child / "config.json").read_text())
    assert cfg["train"]["parent"] == str(Path("runs") / run.name)
    assert cfg["diffusion"]["block_size"] == 4 and cfg["diffusion"]["clip"] == [0.45, 0.95]

    code, out, err = bd3("variance", child, "--block-size", 4, "--batch-size", 2, "--max-batches", 2, "--json", "--device", "cpu",
                         "--clip", "0.001,1", "--clip", "0.5,1", "--clip", "0.45,0.95", capsys=capsys)
    assert code == 0, err
    table = json.loads(out)["intervals"]
    assert [(r["beta"], r["omega"]) for r in table][:3] == [(0.001, 1.0), (0.5, 1.0), (0.45, 0.95)]
    assert sum(r["best"] for r in table) == 1 and all(r["var_paper"] >= 0 for r in table)


@pytest.mark.parametrize(
    "args,code,needle",
    [
        (["pretrain", "--algo", "foo"], 2, "--algo"),
        (["pretrain", "--model", "huge"], 2, "--model"),
        (["pretrain", "--steps", "0"], 2, "--steps"),
        (["pretrain", "--nope"], 2, "--nope"),
        (["finetune", "--clip", "0.9,0.1"], 2, "--clip"),
        (["finetune", "--clip", "0.5,1.5"], 2, "--clip"),
        (["pretrain", "--length", "30", "--block-size", "8", "--steps", "1"], 2, "divide"),
        (["finetune", "no/such/run", "--block-size", "4"], 1, "no/such/run"),
        (["eval", "no/such/run"], 1, "no/such/run"),
        (["sample"], 1, "bd3 pretrain"),
        (["pretrain", "--data", "missing.txt", "--steps", "1"], 1, "missing.txt"),
        (["import", "no/such-thing-here", "out"], 1, "no/such-thing-here"),
    ],
)
def test_bad_input_is_one_clear_line(workdir, capsys, args, code, needle):
    got, out, err = bd3(*args, capsys=capsys)
    assert got == code
    assert needle in err and "Traceback" not in err
    assert err.startswith("Error:")


def test_existing_out_needs_force(workdir, capsys):
    (workdir / "taken").mkdir()
    (workdir / "taken" / "precious.txt").write_text("keep me")
    code, _, err = bd3("pretrain", "--out", "taken", "--steps", "1", *SMALL, capsys=capsys)
    assert code == 1 and "--force" in err
    assert (workdir / "taken" / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_examples(command, capsys):
    code, out, _ = bd3(command, "--help", capsys=capsys)
    assert code == 0 and "Examples:" in out and f"bd3 {command}" in out


def test_top_level_help_and_version(capsys):
    code, out, _ = bd3("--help", capsys=capsys)
    assert code == 0 and all(c in out for c in COMMANDS) and "bd3 finetune --block-size 4" in out
    code, out, _ = bd3("--version", capsys=capsys)
    assert code == 0 and out.startswith("bd3 ")


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completions_are_current(shell):
    """completions/bd3.<shell> equals what the app generates; regenerate with
    `for s in bash zsh fish; do _BD3_COMPLETE=source_$s bd3 > completions/bd3.$s; done`."""
    env = {**os.environ, "_BD3_COMPLETE": f"source_{shell}"}
    generated = subprocess.run(
        [sys.executable, "-m", "bd3"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert (ROOT / "completions" / f"bd3.{shell}").read_text() == generated
