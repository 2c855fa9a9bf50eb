"""`bd3 tokenize` at scale: worker processes write the same bytes as one, OpenWebText's
split (the last documents are validation), a fast offline error for the hub set."""

import json
import socket
import time
from pathlib import Path

import pytest

import bd3.data.shards as shards
from bd3.cli.main import main
from bd3.data import sources
from bd3.data.shards import TokenShards, tokenize
from bd3.data.sources import HubSet, iter_documents, last_documents_split
from bd3.errors import Bd3Error

TOKENIZER = str(Path(shards.__file__).parent / "tokenizers" / "web-bpe" / "tokenizer.json")


@pytest.fixture
def corpus(tmp_path) -> Path:
    """3,000 short documents, each different."""
    path = tmp_path / "docs.jsonl"
    words = "grace light water stone river field bread wine song lamp".split()
    with open(path, "w") as f:
        for i in range(3000):
            text = " ".join(words[(i * k) % len(words)] for k in range(1, 2 + i % 9)) + f" {i}."
            f.write(json.dumps({"text": text}) + "\n")
    return path


def test_worker_processes_write_the_same_shards(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "ENCODE_CHUNK", 200)  # 15 chunks over the two workers
    one = tokenize(str(corpus), TOKENIZER, 32, tmp_path / "one", progress=False)
    assert main(["tokenize", "--data", str(corpus), "--tokenizer", TOKENIZER, "--length", "32",
                 "--out", str(tmp_path / "two"), "--num-proc", "2"]) == 0
    two = TokenShards(tmp_path / "two")
    for name in ("train.bin", "valid.bin", "meta.json", "tokenizer.json"):
        assert (one.path / name).read_bytes() == (two.path / name).read_bytes(), name
    assert one.meta["splits"]["train"]["rows"] > 100


def test_owt_holds_out_its_last_documents(corpus, tmp_path, monkeypatch):
    # a local stand-in for Skylion007/openwebtext, through the same hub-set code path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    real = sources.HUB_SETS["owt"]
    assert (real.path, real.train, real.valid) == ("Skylion007/openwebtext", "train[:-100000]", "train[-100000:]")
    monkeypatch.setitem(sources.HUB_SETS, "owt", HubSet("json", None, "text", *last_documents_split(7), data_files=str(corpus)))
    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    assert list(iter_documents("owt", "valid")) == docs[-7:]
    assert list(iter_documents("owt", "train")) == docs[:-7]
    out = tokenize("owt", TOKENIZER, 16, tmp_path / "owt", progress=False)
    assert out.meta["splits"]["valid"]["documents"] == 7
    assert out.meta["splits"]["train"]["documents"] == len(docs) - 7


def test_owt_offline_is_a_fast_clear_error(tmp_path, monkeypatch, capsys):
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    start = time.perf_counter()
    code = main(["tokenize", "--data", "owt", "--tokenizer", TOKENIZER, "--out", str(tmp_path / "owt"), "--num-proc", "2"])
    assert code == 1 and time.perf_counter() - start < 10.0  # no retries (the hub client's would take 20 s and more)
    err = capsys.readouterr().err
    assert "Skylion007/openwebtext" in err and "unreachable" in err and "--data path/to/" in err


def test_a_script_based_hub_set_names_the_way_out(monkeypatch):
    import datasets

    def scripted(*args, **kwargs):
        raise RuntimeError("Dataset scripts are no longer supported, but found openwebtext.py")

    monkeypatch.setattr(datasets, "load_dataset", scripted)
    with pytest.raises(Bd3Error, match=r"loading script.*pip install 'datasets<4'.*--data"):
        sources._load_hub_split("owt", sources.HUB_SETS["owt"], "train", offline=False)
