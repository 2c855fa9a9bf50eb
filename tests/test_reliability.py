"""Runs survive interruptions and crashes; every user mistake gets one clear line."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bd3.cli.main import main
from bd3.runs import Run
from tests.conftest import tree

TRAIN = ["--data", "web", "--length", "32", "--batch-size", "4", "--log-every", "1", "--device", "cpu", "--precision", "fp32", "--eval-batches", "2"]
# `tiny` has dropout, so resuming must restore the RNG too
RESUMABLE = [*TRAIN, "--model", "tiny", "--block-size", "8", "--save-every", "8", "--seed", "7"]


def step_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in Run.open(run).metrics() if "loss" in r and r.get("event") is None}


def wait_for(predicate, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError
        time.sleep(0.05)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_sigterm_saves_and_resume_reproduces_the_uninterrupted_losses(workdir, bd3_client):
    steps = 16  # the signal must land well before the end, even on a loaded machine
    assert main(["pretrain", *RESUMABLE, "--steps", str(steps), "--out", "whole"]) == 0
    reference = step_losses(workdir / "whole")
    assert sorted(reference) == list(range(1, steps + 1))

    # a process of its own (the fork server's client passes the signal on to it)
    proc = subprocess.Popen([*bd3_client, "pretrain", *RESUMABLE, "--steps", str(steps), "--out", "cut"], cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (workdir / "cut" / "metrics.jsonl").exists() and len(step_losses(workdir / "cut")) >= 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM" in err and "--resume" in err and "Traceback" not in err
    stopped_at = max(int(p.name.split("-")[1]) for p in Run.open(workdir / "cut").checkpoints())
    assert stopped_at < steps

    assert main(["pretrain", "--resume", "--out", "cut"]) == 0
    assert step_losses(workdir / "cut") == reference  # exactly, step for step


def test_sigkill_while_writing_a_checkpoint_leaves_a_resumable_run(workdir, bd3_client):
    # Make the third checkpoint write slow, then kill the process in the middle of it.
    slow = (
        "import sys, time, bd3.runs.rundir as r; orig = r.save_file; n = [0]\n"
        "def slow(*a, **k):\n"
        "    orig(*a, **k); n[0] += 1\n"
        "    if n[0] == 7: time.sleep(60)\n"  # 3 files per checkpoint: the 3rd checkpoint's first file
        "r.save_file = slow\n"
        "from bd3.cli.main import main; sys.exit(main(sys.argv[1:]))"
    )
    args = ["pretrain", *TRAIN, "--steps", "6", "--save-every", "1", "--out", "killed"]
    proc = subprocess.Popen([*bd3_client, "-c", slow, *args], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpts = workdir / "killed" / "checkpoints"
    wait_for(lambda: ckpts.exists() and any(p.name.startswith(".tmp-step-00000003") for p in ckpts.iterdir()))
    proc.kill()
    proc.wait()
    run = Run.open(workdir / "killed")
    assert [p.name for p in run.checkpoints()] == ["step-00000001", "step-00000002"]
    load_file(run.latest_checkpoint() / "ema.safetensors")  # complete and loadable
    assert main(["pretrain", "--resume", "--out", "killed"]) == 0
    assert [p.name for p in Run.open(workdir / "killed").checkpoints()][-1] == "step-00000006"
    assert not any(p.name.startswith(".tmp") for p in ckpts.iterdir())


def overflowing(ckpt: Path, weights: str) -> None:
    """Set the output layer's weights in ``ckpt``'s ``weights`` file ("model" or "ema") to
    float32's largest value: finite, so the checkpoint loads, but every logit overflows."""
    path = ckpt / f"{weights}.safetensors"
    tensors = load_file(path)
    tensors["output_layer.linear.weight"].fill_(torch.finfo(torch.float32).max)
    save_file(tensors, path)


def test_nonfinite_loss_stops_naming_the_step_or_is_skipped(workdir, capsys):
    # The training weights of step 2 overflow, so step 3's loss is not finite; the EMA
    # weights, which validation scores, are left as they were.
    for out, skip in (("nan", "0"), ("skip", "1")):
        assert main(["pretrain", *TRAIN, "--steps", "2", "--save-every", "2", "--skip-nonfinite", skip, "--out", out]) == 0
        overflowing(workdir / out / "checkpoints" / "step-00000002", "model")
    capsys.readouterr()
    assert main(["pretrain", "--resume", "--steps", "4", "--out", "nan"]) == 1
    err = capsys.readouterr().err
    assert "step 3" in err and "step-00000002" in err and "--skip-nonfinite" in err
    assert [p.name for p in Run.open(workdir / "nan").checkpoints()] == ["step-00000002"]

    # --skip-nonfinite 1: step 3, the last, is skipped; its checkpoint holds the weights of step 2
    assert main(["pretrain", "--resume", "--steps", "3", "--out", "skip"]) == 0
    run = Run.open(workdir / "skip")
    events = [r for r in run.metrics() if r.get("event") == "nonfinite"]
    assert [e["step"] for e in events] == [3]
    assert [p.name for p in run.checkpoints()] == ["step-00000002", "step-00000003"]
    before, after = (load_file(ckpt / "model.safetensors") for ckpt in run.checkpoints())
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_nonfinite_validation_stops_naming_the_step_and_the_last_good_checkpoint(workdir, capsys):
    assert main(["pretrain", *TRAIN, "--steps", "2", "--save-every", "2", "--out", "div"]) == 0
    overflowing(workdir / "div" / "checkpoints" / "step-00000002", "ema")  # training goes on; the validation of step 4 overflows
    capsys.readouterr()
    assert main(["pretrain", "--resume", "--steps", "4", "--out", "div"]) == 1
    err = capsys.readouterr().err
    assert "step 4" in err and "last good checkpoint" in err and "step-00000002" in err and "--lr" in err
    assert err.strip().splitlines()[-1].startswith("Error: The validation NELBO at step 4") and "Traceback" not in err
    best = json.loads((workdir / "div" / "best.json").read_text())
    assert best["checkpoint"].endswith("step-00000002")  # the diverged checkpoint is never the best


def test_resume_accepts_the_run_time_options_it_applies(workdir, capsys):
    assert main(["pretrain", *TRAIN, "--steps", "2", "--block-size", "8", "--out", "r"]) == 0
    assert main(["pretrain", *TRAIN, "--block-size", "8", "--steps", "3", "--log-every", "3", "--threads", "1", "--resume", "--out", "r"]) == 0
    cfg = json.loads((workdir / "r" / "config.json").read_text())
    assert cfg["train"]["steps"] == 3 and cfg["train"]["log_every"] == 3


def test_keep_last_prunes_but_keeps_the_best(workdir):
    assert main(["pretrain", *TRAIN, "--steps", "6", "--save-every", "1", "--keep-last", "2", "--out", "k"]) == 0
    run = Run.open(workdir / "k")
    best = json.loads((run.path / "best.json").read_text())
    names = {p.name for p in run.checkpoints()}
    assert {"step-00000005", "step-00000006"} <= names and len(names) <= 3
    assert (run.path / best["checkpoint"]).is_dir()
    scores = [r["valid_nelbo"] for r in run.metrics() if r.get("event") == "validation"]
    assert best["valid_nelbo"] == min(scores)


# ----------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    old = os.getcwd()
    os.chdir(root)
    os.environ.setdefault("BD3_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "bd3-cache"))
    try:
        assert main(["pretrain", *TRAIN, "--steps", "1", "--block-size", "8", "--out", "good"]) == 0
    finally:
        os.chdir(old)
    return root / "good"


@pytest.fixture(scope="module")
def trained_tree(trained) -> dict[str, str]:
    """The trained run's files as the fixture made them: every test that may not change
    them compares against this."""
    return tree(trained)


def damaged(trained: Path, tmp_path: Path, damage: str) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    ckpt = run / "checkpoints" / "step-00000001"
    ema = ckpt / "ema.safetensors"
    if damage == "truncated":
        ema.write_bytes(ema.read_bytes()[:200])
    elif damage == "garbage":
        ema.write_bytes(b"\x00not a safetensors file" * 10)
    elif damage == "missing_tensor":
        t = load_file(ema)
        del t["blocks.0.attn_out.weight"]
        save_file(t, ema)
    elif damage == "nan_tensor":
        t = load_file(ema)
        t["blocks.1.mlp.0.weight"][0, 0] = float("nan")
        save_file(t, ema)
    elif damage == "missing_file":
        ema.unlink()
        (ckpt / "model.safetensors").unlink()
    elif damage == "no_checkpoints":
        shutil.rmtree(run / "checkpoints")
        (run / "checkpoints").mkdir()
    elif damage == "unknown_key":
        cfg = json.loads((run / "config.json").read_text())
        cfg["train"]["lerning_rate"] = 1
        (run / "config.json").write_text(json.dumps(cfg))
    elif damage == "bad_json":
        (run / "config.json").write_text("{not json")
    elif damage == "no_config":
        (run / "config.json").unlink()
    elif damage == "tokenizer":
        tok = json.loads((run / "tokenizer.json").read_text())
        tok["model"]["vocab"]["zzzz-extra"] = len(tok["model"]["vocab"]) + 100
        (run / "tokenizer.json").write_text(json.dumps(tok))
    return run


RUN_DAMAGE = [
    ("truncated", "ema.safetensors"),
    ("garbage", "ema.safetensors"),
    ("missing_tensor", "blocks.0.attn_out.weight"),
    ("nan_tensor", "blocks.1.mlp.0.weight"),
    ("missing_file", "complete checkpoint"),
    ("no_checkpoints", "no complete checkpoint"),
    ("unknown_key", "lerning_rate"),
    ("bad_json", "not valid JSON"),
    ("no_config", "config.json"),
    ("tokenizer", "tokenizer.json"),
]


@pytest.mark.parametrize("damage,needle", RUN_DAMAGE)
@pytest.mark.parametrize("command", ["eval", "sample"])
def test_damaged_runs_are_refused_with_the_file_named(trained, tmp_path, capsys, damage, needle, command):
    run = damaged(trained, tmp_path, damage)
    assert main([command, str(run), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and err.startswith("Error:")


def write_inputs(d: Path) -> None:
    (d / "empty.txt").write_text("")
    (d / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (d / "notjson.json").write_text("{")
    (d / "file.txt").write_text("hello\n")
    (d / "taken").mkdir()
    (d / "taken" / "keep.txt").write_text("mine")
    (d / "export").mkdir()
    (d / "export" / "x").write_text("x")


BAD_ARGS = [
    # (arguments, exit code, text the message must contain); {run} is a trained run
    (["pretrain", "--algo", "sedd2"], 2, "--algo"),
    (["pretrain", "--model", "huge"], 2, "--model"),
    (["pretrain", "--steps", "0"], 2, "--steps"),
    (["pretrain", "--steps", "-3"], 2, "--steps"),
    (["pretrain", "--batch-size", "0"], 2, "--batch-size"),
    (["pretrain", "--lr", "0"], 2, "learning rate"),
    (["pretrain", "--length", "30", "--block-size", "8"], 2, "divide"),
    (["pretrain", "--block-size", "0"], 2, "--block-size"),
    (["pretrain", "--clip", "0.9,0.1"], 2, "--clip"),
    (["pretrain", "--clip", "-0.1,0.5"], 2, "--clip"),
    (["pretrain", "--clip", "0.5,1.5"], 2, "--clip"),
    (["pretrain", "--precision", "fp16"], 2, "precision"),
    (["pretrain", "--length", "4"], 2, "--length"),
    (["pretrain", "--no-such-option"], 2, "--no-such-option"),
    (["pretrain", "--data", "missing.txt", "--steps", "1"], 1, "missing.txt"),
    (["pretrain", "--data", "empty.txt", "--steps", "1"], 1, "empty.txt"),
    (["pretrain", "--data", "binary.txt", "--steps", "1"], 1, "binary.txt"),
    (["pretrain", "--data", "nosuchset", "--steps", "1"], 1, "nosuchset"),
    (["pretrain", "--tokenizer", "nosuchtok", "--steps", "1"], 1, "nosuchtok"),
    (["pretrain", "--tokenizer", "notjson.json", "--steps", "1"], 1, "notjson.json"),
    (["pretrain", "--out", "taken", "--steps", "1", "--length", "32"], 1, "--force"),
    (["pretrain", "--out", "file.txt", "--steps", "1", "--length", "32", "--force"], 1, "file.txt"),
    (["pretrain", "--resume", "--out", "nowhere"], 1, "nowhere"),
    (["pretrain", "--resume", "--out", "{run}"], 1, "--steps"),
    (["pretrain", "--resume", "--out", "{run}", "--lr", "5", "--block-size", "16"], 2, "--lr, --block-size conflict"),
    (["pretrain", "--resume", "--out", "{run}", "--schedule", "cosine", "--steps", "9"], 2, "--schedule conflicts"),
    (["pretrain", "--resume", "--out", "{run}", "--block-size", "8", "--data", "web", "--precision", "fp32"], 1, "--steps"),
    (["finetune", "--resume", "--out", "{run}", "--clip", "0.3,0.8"], 2, "--clip conflicts"),
    (["pretrain", "--lr", "inf"], 2, "--lr"),
    (["pretrain", "--lr", "nan"], 2, "--lr"),
    (["finetune", "{run}", "--lr", "inf"], 2, "--lr"),
    (["finetune", "{run}", "--lr", "-inf"], 2, "--lr"),
    (["pretrain", "--threads", "0"], 2, "--threads"),
    (["pretrain", "--fix-clip"], 2, "--clip-search"),
    (["finetune", "{run}", "--variance", "block"], 2, "--clip-search"),
    (["eval", "{run}", "--zero-shot", "devil", "--split", "train"], 2, "--split"),
    (["finetune", "{run}", "--threads", "-1"], 2, "--threads"),
    (["pretrain", "--device", "tpu", "--steps", "1", "--length", "32"], 2, "tpu"),
    (["finetune", "{run}", "--block-size", "5"], 2, "divide"),
    (["finetune", "{run}", "--clip", "0.6,0.2"], 2, "--clip"),
    (["finetune", "nowhere", "--block-size", "4"], 1, "nowhere"),
    (["eval", "nowhere"], 1, "nowhere"),
    (["eval", "{run}", "--split", "test"], 2, "--split"),
    (["eval", "{run}", "--passes", "0"], 2, "--passes"),
    (["eval", "{run}", "--threads", "0"], 2, "--threads"),
    (["eval", "{run}", "--zero-shot", "missing.txt"], 2, "missing.txt"),
    (["eval", "{run}", "--data", "missing.txt"], 2, "missing.txt"),
    (["eval", "{run}", "--zero-shot", "binary.txt"], 1, "binary.txt"),
    (["eval", "{run}", "--zero-shot", "empty.txt"], 1, "empty.txt"),
    (["eval", "{run}", "--zero-shot", "ptb,devil", "--data", "file.txt"], 2, "--data"),
    (["variance", "{run}", "--threads", "-1"], 2, "--threads"),
    (["sample", "{run}", "--top-p", "1.5"], 2, "--top-p"),
    (["sample", "{run}", "--top-p", "0"], 2, "--top-p"),
    (["sample", "{run}", "--temperature", "inf"], 2, "--temperature"),
    (["sample", "{run}", "--threshold", "nan"], 2, "--threshold"),
    (["sample", "{run}", "--threads", "0"], 2, "--threads"),
    (["sample", "{run}", "--format", "xml"], 2, "--format"),
    (["sample", "{run}", "--block-size", "5"], 2, "--block-size"),
    (["variance", "{run}", "--clip", "0.5"], 2, "--clip"),
    (["variance", "{run}", "--clip", "0.8,0.2"], 2, "--clip"),
    (["tokenize", "--data", "missing.txt"], 1, "missing.txt"),
    (["import", "nowhere/at-all", "out"], 1, "nowhere/at-all"),
    (["import", "file.txt", "out"], 1, "file.txt"),
    (["export", "{run}", "export"], 1, "--force"),
]


@pytest.mark.parametrize("args,code,needle", BAD_ARGS, ids=[" ".join(a[0]) for a in BAD_ARGS])
def test_bad_input_table(trained, trained_tree, workdir, capsys, args, code, needle):
    write_inputs(workdir)
    before = tree(workdir)
    got = main([a.replace("{run}", str(trained)) for a in args])
    err = capsys.readouterr().err
    assert got == code, err
    assert needle in err and "Traceback" not in err
    assert err.startswith("Error:") and len(err.strip().splitlines()) == 1
    assert tree(workdir) == before  # a refused command changes nothing on disk,
    if "{run}" in args:
        assert tree(trained) == trained_tree  # nor in the run it names (no other command can find it)


def test_debug_shows_the_traceback(workdir):
    from bd3.errors import Bd3Error

    with pytest.raises(Bd3Error):
        main(["--debug", "eval", "nowhere"])
    os.environ.pop("BD3_DEBUG", None)


def test_no_code_path_unpickles():
    root = Path(__file__).resolve().parents[1] / "bd3"
    text = "\n".join(p.read_text() for p in root.rglob("*.py"))
    assert "torch.load(" not in text and "import pickle" not in text and "weights_only" not in text


def test_disk_full_while_saving_keeps_the_previous_checkpoint(workdir, capsys, monkeypatch):
    import bd3.runs.rundir as rundir

    real, calls = rundir.save_file, [0]

    def full_disk(*a, **k):
        calls[0] += 1
        if calls[0] > 3:  # the second checkpoint
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(rundir, "save_file", full_disk)
    assert main(["pretrain", *TRAIN, "--steps", "2", "--save-every", "1", "--out", "full"]) == 1
    err = capsys.readouterr().err
    assert "No space left" in err and "step-00000001" in err and "Traceback" not in err
    run = Run.open(workdir / "full")
    assert [p.name for p in run.checkpoints()] == ["step-00000001"]
    assert not [p for p in (run.path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
