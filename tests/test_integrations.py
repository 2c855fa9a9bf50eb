"""The tools researchers already use: TensorBoard / W&B loggers and transformers-native exports."""

import filecmp
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bd3.cli.main import main
from bd3.diffusion.masks import block_causal_mask
from bd3.diffusion.objective import xt_logits
from bd3.model import DiT
from bd3.runs import Run
from bd3.train.loggers import Loggers, scalars
from tests.conftest import randomize

TRAIN = ["--data", "web", "--length", "32", "--batch-size", "4", "--block-size", "8", "--log-every", "1", "--device", "cpu",
         "--precision", "fp32", "--eval-batches", "2"]


def tensorboard_scalars(run: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    out = {}
    for tag in events.Tags()["scalars"]:
        points = events.Scalars(tag)
        steps = [p.step for p in points]
        assert len(steps) == len(set(steps)), f"{tag} has repeated steps {steps}"
        out[tag] = {p.step: p.value for p in points}
    return out, events


def f32(x: float) -> float:
    return float(np.float32(x))  # TensorBoard keeps scalars as float32


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run with a checkpoint every 2 steps, trained with --logger tensorboard."""
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'bd3[tensorboard]')")
    root = tmp_path_factory.mktemp("loggers")
    old = os.getcwd()
    os.chdir(root)
    try:
        code = main(["pretrain", *TRAIN, "--steps", "4", "--save-every", "2", "--out", "tb-run", "--logger", "tensorboard"])
    finally:
        os.chdir(old)
    assert code == 0
    return root / "tb-run"


def test_tensorboard_scalars_equal_metrics_jsonl_and_resume_continues(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    # as if stopped after logging steps 3-4 but before their checkpoint: --resume (from step 2, with the run's own
    # loggers) drops them from metrics.jsonl and TensorBoard alike
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    assert main(["pretrain", "--resume", "--out", str(run), "--steps", "6"]) == 0
    records = Run.open(run).metrics()
    tb, events = tensorboard_scalars(run)

    train = [r for r in records if r.get("event") is None]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    before = {r["step"]: r["loss"] for r in Run.open(trained).metrics() if r.get("event") is None}
    assert [r["loss"] for r in train[:4]] == [before[s] for s in (1, 2, 3, 4)]  # logging and sampling change no loss
    for r in train:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "tokens"):
            assert tb[f"train/{key}"][r["step"]] == f32(r[key]), (key, r["step"])
    validations = [r for r in records if r.get("event") == "validation"]
    assert [r["step"] for r in validations] == [2, 4, 6]
    for r in validations:
        assert tb["valid/nelbo"][r["step"]] == f32(r["valid_nelbo"])
        assert tb["valid/ppl"][r["step"]] == f32(r["valid_ppl"])
    summary = records[-1]
    assert tb["summary/unigram_ppl"][6] == f32(summary["unigram_ppl"])

    texts = {tag: [e.step for e in events.Tensors(tag)] for tag in events.Tags()["tensors"]}
    assert set(texts["samples/text_summary"]) == {2, 4, 6}  # sample texts at each validation
    sample = events.Tensors("samples/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert sample.count("**") == 4 and len(sample) > 40  # two samples, each under its number
    hparams = [t for t in events.summary_metadata if t.startswith("_hparams_")]
    assert "_hparams_/session_start_info" in hparams


def test_wandb_offline_writes_its_run_and_resume_continues_it(trained, workdir, monkeypatch, capsys):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'bd3[wandb]')")
    import bd3.train.loggers as loggers

    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_BASE_URL"):
        monkeypatch.setenv(var, "x")  # records the old state, restored after the test
        monkeypatch.delenv(var)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(workdir / var.lower()))
    monkeypatch.setattr(loggers, "host_reachable", lambda host, *a: False)  # as without a network
    assert main(["pretrain", *TRAIN, "--steps", "2", "--save-every", "1", "--out", "w", "--logger", "wandb"]) == 0
    err = capsys.readouterr().err
    assert "W&B: api.wandb.ai cannot be reached; logging offline" in err and os.environ["WANDB_MODE"] == "offline"
    run_id = json.loads((workdir / "w" / "loggers.json").read_text())["wandb_id"]
    first = list((workdir / "w" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(first) == 1
    records = next(first[0].glob("run-*.wandb"))
    deadline = time.monotonic() + 30  # W&B's own service process writes the file; on a loaded machine it can lag finish()
    while b"train/loss" not in (data := records.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    loss = next(r["loss"] for r in Run.open(workdir / "w").metrics() if r["step"] == 2 and "loss" in r)
    assert b"train/loss" in data and json.dumps(loss).encode() in data  # the metrics.jsonl value, as W&B stores it

    assert main(["pretrain", "--resume", "--out", "w", "--steps", "3"]) == 0  # the run's own loggers
    assert "Warning" not in capsys.readouterr().err
    assert json.loads((workdir / "w" / "loggers.json").read_text())["wandb_id"] == run_id
    assert len(list((workdir / "w" / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # the same W&B run, continued


def test_a_failing_logger_warns_once_and_training_goes_on(trained, workdir, monkeypatch, capsys):
    import bd3.train.loggers as loggers

    calls = []

    def disk_full(self, step, values):
        calls.append(step)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loggers.TensorBoard, "scalars", disk_full)
    assert main(["pretrain", *TRAIN, "--steps", "3", "--out", "full", "--logger", "tensorboard"]) == 0
    err = capsys.readouterr().err
    assert err.count("Warning: the tensorboard logger failed") == 1 and "No space left" in err
    assert calls == [1]  # dropped after its first failure
    assert [r["step"] for r in Run.open(workdir / "full").metrics() if "loss" in r and "event" not in r] == [1, 2, 3]


def test_loggers_drop_a_tracker_that_raises():
    class Tracker:
        name = "flaky"

        def __init__(self, fail):
            self.fail, self.seen = fail, []

        def scalars(self, step, values):
            if self.fail:
                raise RuntimeError("network lost")
            self.seen.append((step, values))

    good, bad, warnings = Tracker(False), Tracker(True), []
    loggers = Loggers([bad, good], warn=warnings.append)
    loggers.log({"step": 1, "loss": 2.0})
    loggers.log({"step": 2, "loss": 1.0})
    assert len(warnings) == 1 and "network lost" in warnings[0]
    assert good.seen == [(1, {"train/loss": 2.0}), (2, {"train/loss": 1.0})]


def test_a_clip_search_logs_the_interval_in_use_and_its_table():
    scores = [{"beta": b, "omega": o, "nelbo": 3.0 + b, "var_paper": v, "var_block": 2 * v}
              for b, o, v in [(0.001, 1.0, 9.0), (0.3, 0.8, 4.0), (0.45, 0.95, 5.0)]]
    record = {"step": 4, "event": "clip_search", "variance": "paper", "clip": [0.001, 1.0], "best": [0.3, 0.8], "applied": True,
              "scores": scores}

    class Tracker:
        name = "memory"

        def __init__(self):
            self.calls = []

        def scalars(self, step, values):
            self.calls.append(("scalars", step, values))

        def table(self, step, tag, columns, rows):
            self.calls.append(("table", step, tag, columns, rows))

    tracker = Tracker()
    Loggers([tracker]).log(record)
    values = {"clip/beta": 0.3, "clip/omega": 0.8, "clip_search/best_nelbo": 3.3, "clip_search/best_var_paper": 4.0,
              "clip_search/best_var_block": 8.0}
    columns = ["beta", "omega", "nelbo", "var_paper", "var_block"]
    assert tracker.calls == [("scalars", 4, values), ("table", 4, "clip_search/scores", columns, [[s[c] for c in columns] for s in scores])]
    fixed = {**record, "applied": False}  # --fix-clip: the search only reports
    assert (scalars(fixed)["clip/beta"], scalars(fixed)["clip/omega"]) == (0.001, 1.0)


def test_scalars_name_every_number_of_a_record():
    record = {"step": 8, "event": "validation", "valid_nelbo": 3.5, "valid_ppl": 33.1, "valid_nelbo_se": 0.1,
              "valid_ppl_ci95": [30.0, 36.5], "estimator": "k", "bound": True}
    assert scalars(record) == {"valid/nelbo": 3.5, "valid/ppl": 33.1, "valid/nelbo_se": 0.1, "valid/ppl_ci95_lo": 30.0,
                               "valid/ppl_ci95_hi": 36.5}
    assert scalars({"step": 3, "loss": 1.5, "lr": 1e-3, "elapsed_s": 2}) == {"train/loss": 1.5, "train/lr": 1e-3, "train/elapsed_s": 2.0}


# ------------------------------------------------------------------------------- export


@pytest.fixture
def random_run(trained, tmp_path) -> Run:
    """The trained run with random EMA weights (zero-initialised layers too), so a mistake shows in the logits."""
    run = Run.open(shutil.copytree(trained, tmp_path / "run"))
    ckpt = run.latest_checkpoint()
    model = randomize(DiT(run.config.model, run.config.data.vocab_size), seed=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt / "ema.safetensors")
    return run


def test_exported_run_loads_in_transformers_offline_with_bd3s_logits(random_run, tmp_path, monkeypatch):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install 'bd3[transformers]')")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    out = tmp_path / "exported"
    assert main(["export", str(random_run.path), str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForMaskedLM"] == "modeling_bd3lm.BD3LM" and config["architectures"] == ["BD3LM"]
    model = AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "BD3LM" and type(model.config).__name__ == "BD3LMConfig"

    cfg = random_run.config
    ours = DiT(cfg.model, cfg.data.vocab_size)
    ours.load_state_dict(random_run.weights("ema"))
    ours.eval()
    L, bs = cfg.model.length, cfg.diffusion.block_size
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, cfg.data.vocab_size - 1, (3, L), generator=g)
    xt = torch.where(torch.rand(3, L, generator=g) < 0.5, cfg.data.mask_id, x0)
    with torch.no_grad():
        torch.testing.assert_close(model(torch.cat([xt, x0], dim=1)), xt_logits(ours, xt, x0, cfg.diffusion), atol=1e-5, rtol=0)
        causal = ours(x0[:, :20], attn_mask=block_causal_mask(20, bs))
        torch.testing.assert_close(model(x0[:, :20], sample_mode=True), causal, atol=1e-5, rtol=0)
        assert model(x0[:, :20], sample_mode=True, return_dict=True).logits.shape == causal.shape
    assert float(model.sampling_eps_min) == pytest.approx(cfg.diffusion.clip[0]) and model.training is False

    from bd3.runs.load import run_tokenizer

    tok = run_tokenizer(random_run)
    text = "In the beginning God created the heavens and the earth."
    assert tokenizer(text, add_special_tokens=False).input_ids == tok.encode(text)
    assert (tokenizer.mask_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (tok.mask_id, tok.eos_id, tok.pad_id)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_export_import_export_is_bit_exact(random_run, tmp_path, precision):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["export", str(random_run.path), str(first), "--precision", precision]) == 0
    assert main(["import", str(first), str(tmp_path / "imported")]) == 0
    assert main(["export", str(tmp_path / "imported"), str(second), "--precision", precision]) == 0
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir()) and "modeling_bd3lm.py" in names and "tokenizer.json" in names
    assert all(filecmp.cmp(first / n, second / n, shallow=False) for n in names)
    weights = load_file(first / "model.safetensors")
    assert weights["backbone.blocks.0.attn_qkv.weight"].dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    assert weights["backbone.rotary_emb.inv_freq"].dtype == torch.float32
    imported = Run.open(tmp_path / "imported")
    assert imported.config.diffusion.clip == random_run.config.diffusion.clip
    assert imported.config.data.mask_id == random_run.config.data.mask_id  # the run's own tokenizer, not the last id
    if precision == "fp32":
        ours, theirs = random_run.weights("ema"), imported.weights("ema")
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


# ---------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_and_overwrites_nothing(trained, workdir, capsys, monkeypatch):
    def one_line(args, code, needle):
        got = main([str(a) for a in args])
        err = capsys.readouterr().err
        assert got == code, err
        assert needle in err and err.startswith("Error:") and len(err.strip().splitlines()) == 1, err

    one_line(["pretrain", "--logger", "foo", "--steps", "1"], 2, "'foo' is not one of tensorboard, wandb")
    (workdir / "taken").mkdir()
    (workdir / "taken" / "keep.txt").write_text("mine")
    one_line(["export", trained, "taken"], 1, "--force")
    one_line(["export", trained, "fresh", "--precision", "fp16"], 2, "--precision")
    empty = Run.open(shutil.copytree(trained, workdir / "empty"))
    shutil.rmtree(empty.path / "checkpoints")
    one_line(["export", empty.path, "out"], 1, "no complete checkpoint")
    assert (workdir / "taken" / "keep.txt").read_text() == "mine" and not (workdir / "out").exists()
    assert not (workdir / "fresh").exists() and not (workdir / "runs").exists()

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    one_line(["pretrain", "--logger", "wandb", "--steps", "1"], 1, "pip install 'bd3[wandb]'")
    one_line(["finetune", trained, "--logger", "wandb"], 1, "pip install 'bd3[wandb]'")
    assert not (workdir / "runs").exists()  # stopped before any work
