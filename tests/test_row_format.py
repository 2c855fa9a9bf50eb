"""Row formats (`--wrap special|raw`): recorded in the run's config, used by sampling."""

import json

import pytest

from bd3.cli.main import main
from bd3.config import DataConfig, RunConfig
from bd3.data.tokenizer import load_tokenizer
from bd3.sampling.text import render, sample_documents

SMALL = ["--length", "32", "--batch-size", "4", "--log-every", "1", "--device", "cpu", "--model", "nano", "--eval-batches", "1"]


def bd3(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_old_configs_load_as_special_rows() -> None:
    d = RunConfig().to_dict()
    del d["data"]["wrap"]  # a config.json written before the row format was recorded
    cfg = RunConfig.from_dict(d)
    assert cfg.data.wrap == "special" and cfg.diffusion.ignore_bos
    data = DataConfig(bos_id=1, eos_id=2, wrap="raw")
    assert data.start_id == 2 and DataConfig(bos_id=1, eos_id=2).start_id == 1


def test_samples_of_raw_runs_drop_the_leading_separator() -> None:
    tok = load_tokenizer("bpe")
    ids = [tok.eos_id, *tok.encode("In the beginning"), tok.eos_id, *tok.encode("God")]
    assert sample_documents(ids, tok) == ["In the beginning", "God"]
    assert render(ids, tok) == "In the beginning\n\nGod"


def test_raw_run_records_its_format_and_samples_from_eos(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = bd3(capsys, "pretrain", "--wrap", "raw", "--steps", 2, "--block-size", 8, "--out", "runs/raw", *SMALL)
    assert code == 0, err
    cfg = json.loads((tmp_path / "runs/raw/config.json").read_text())
    assert cfg["data"]["wrap"] == "raw" and cfg["diffusion"]["ignore_bos"]  # first token given, as the reference's OWT runs
    code, out, err = bd3(capsys, "sample", "runs/raw", "--max-tokens", 48, "--format", "jsonl", "--device", "cpu")
    assert code == 0, err
    sample = json.loads(out)
    eos = load_tokenizer("bpe").eos_id
    assert sample["tokens"][0] == eos and len(sample["tokens"]) == 48  # past the context of 32
    assert not sample["text"].startswith("\n")
    code, out, err = bd3(capsys, "eval", "runs/raw", "--max-batches", 1, "--batch-size", 4, "--json", "--device", "cpu")
    assert code == 0, err
    assert json.loads(out)["tokens"] == 4 * 31  # every position but the given first


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shards tokenized with `--wrap special` (the default)."""
    out = tmp_path_factory.mktemp("wrap") / "shards"
    assert main(["tokenize", "--data", "devil", "--tokenizer", "gpt2", "--length", "32", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("args,code,needle", [
    (["tokenize", "--wrap", "lm1b"], 2, "--wrap"),
    (["pretrain", "--data", "{shards}", "--wrap", "raw", "--steps", "1"], 1, "--wrap raw"),
])
def test_wrap_errors(shards, tmp_path, monkeypatch, capsys, args, code, needle) -> None:
    monkeypatch.chdir(tmp_path)
    got, _, err = bd3(capsys, *[a.replace("{shards}", str(shards)) for a in args])
    assert got == code and needle in err and len(err.strip().splitlines()) == 1
