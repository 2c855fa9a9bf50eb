"""Tests of bd3.data: tokenizers, document sources, token shards and the cache."""

from __future__ import annotations

import gzip
import json
import math
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bd3.data import shards as shards_mod
from bd3.data import sources
from bd3.data.shards import (
    TokenShards,
    cached_shards,
    document_stream,
    tokenize,
    unigram_perplexity,
    wrap_rows,
)
from bd3.data.sources import BUILTIN_SETS, HUB_SETS, describe_source, read_documents
from bd3.data.tokenizer import Tokenizer, load_tokenizer, train_bpe
from bd3.errors import Bd3Error

SMALL_TEXTS = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "a cat and a dog met on a mat near a log",
] * 20


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return load_tokenizer("gpt2")


def paragraphs_file(path: Path, n: int) -> Path:
    path.write_text("\n\n".join(f"Paragraph number {i} says hello." for i in range(n)) + "\n")
    return path


# ----------------------------------------------------------------------------- tokenizers


def test_gpt2_ids_and_mask(gpt2: Tokenizer) -> None:
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.special_ids() == {
        "vocab_size": 50258, "mask_id": 50257, "bos_id": 50256, "eos_id": 50256, "pad_id": 50256,
    }
    assert gpt2.mask_id != gpt2.pad_id


def test_bert_ids() -> None:
    tok = load_tokenizer("bert-base-uncased")
    ids = tok.encode("Hello world! The quick brown fox.")
    assert ids == [7592, 2088, 999, 1996, 4248, 2829, 4419, 1012]
    assert tok.special_ids() == {
        "vocab_size": 30522, "mask_id": 103, "bos_id": 101, "eos_id": 102, "pad_id": 0,
    }
    assert tok.decode([101, 7592, 103, 2088, 102, 0]) == "hello [MASK] world"


def test_literal_specials_are_plain_text(gpt2: Tokenizer) -> None:
    ids = gpt2.encode("a [MASK] b <|endoftext|>")
    assert gpt2.mask_id not in ids and gpt2.eos_id not in ids
    assert gpt2.decode(ids) == "a [MASK] b <|endoftext|>"


def test_decode_drops_bos_eos_pad_and_shows_mask(gpt2: Tokenizer) -> None:
    assert gpt2.decode([50256, 15496, 50257, 995, 50256]) == "Hello[MASK] world"
    assert gpt2.decode(np.array([15496, 995], dtype=np.uint16)) == "Hello world"
    assert gpt2.encode_batch(["Hello world", "Hello"]) == [[15496, 995], [15496]]


@pytest.mark.parametrize("spec", ["gpt2", "bert-base-uncased", "bpe"])
def test_save_load_round_trip(tmp_path: Path, spec: str) -> None:
    tok = load_tokenizer(spec)
    path = tok.save(tmp_path / "sub" / "tokenizer.json")
    json.loads(path.read_text())  # a plain JSON file
    again = Tokenizer.from_file(path, name=tok.name)
    assert again.name == tok.name
    assert again.special_ids() == tok.special_ids()
    assert again.sha256 == tok.sha256
    assert again.encode("Hello there, world.") == tok.encode("Hello there, world.")
    assert Tokenizer.from_file(path).name == str(path)
    assert load_tokenizer(str(path)).special_ids() == tok.special_ids()


def test_bpe_training_is_deterministic_with_specials() -> None:
    a = train_bpe(SMALL_TEXTS, 300)
    b = train_bpe(iter(SMALL_TEXTS), 300)
    assert a.sha256 == b.sha256
    assert (a.bos_id, a.eos_id, a.mask_id, a.pad_id) == (0, 0, 1, 2)
    assert 259 < a.vocab_size <= 300
    assert a.decode(a.encode("the cat sat")) == "the cat sat"
    assert load_tokenizer("bpe", texts=SMALL_TEXTS, vocab_size=300).sha256 == a.sha256


def test_bpe_training_errors() -> None:
    with pytest.raises(Bd3Error, match="too small"):
        train_bpe(SMALL_TEXTS, 100)
    with pytest.raises(Bd3Error, match="no text"):
        train_bpe([], 300)


def test_shipped_web_bpe() -> None:
    tok = load_tokenizer("bpe")
    assert tok.name == "bpe" and tok.vocab_size == 8192
    assert (tok.mask_id, tok.bos_id, tok.pad_id) == (1, 0, 2)
    with pytest.raises(Bd3Error, match="8192"):
        load_tokenizer("bpe", vocab_size=4096)


def test_tokenizer_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(Bd3Error, match="gpt2, bert-base-uncased, bpe"):
        load_tokenizer("gpt3")
    with pytest.raises(Bd3Error, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(Bd3Error, match="bad.json"):
        load_tokenizer(str(bad))
    no_mask = json.loads(load_tokenizer("bpe").to_json())
    no_mask["added_tokens"] = [t for t in no_mask["added_tokens"] if t["content"] != "[MASK]"]
    del no_mask["model"]["vocab"]["[MASK]"]
    path = tmp_path / "nomask.json"
    path.write_text(json.dumps(no_mask))
    with pytest.raises(Bd3Error, match=r"nomask.json.*\[MASK\]"):
        Tokenizer.from_file(path)


# ----------------------------------------------------------------------------- sources


@pytest.mark.parametrize("name", sorted(BUILTIN_SETS))
def test_builtin_sets_split(name: str) -> None:
    every = read_documents(name, "all")
    train, valid = read_documents(name, "train"), read_documents(name, "valid")
    if name in sources.BUILTIN_VALID_FROM:  # whole books held out: a head and a tail
        assert train + valid == every and valid[0] == sources.BUILTIN_VALID_FROM[name]
    else:
        assert valid == every[49::50]
        assert train == [d for i, d in enumerate(every) if i % 50 != 49]
    assert len(train) + len(valid) == len(every) and len(valid) > 0
    assert read_documents(name, "valid") == valid  # reproducible
    assert all(d and d == d.strip() for d in every)
    assert describe_source(name)["kind"] == "builtin"


def test_web_valid_split_is_whole_books_of_100k_tokens() -> None:
    """The built-in corpus holds out Acts to Revelation: >= 100k tokens at the defaults
    (shipped BPE, length 128), no document of it in train, most of the corpus in train."""
    shards = cached_shards("web", "bpe", 128, progress=False)
    splits = shards.meta["splits"]
    assert splits["valid"]["tokens"] >= 100_000
    assert splits["train"]["tokens"] >= 8 * splits["valid"]["tokens"]
    every = read_documents("web", "all")
    train, valid = read_documents("web", "train"), read_documents("web", "valid")
    assert train == every[: len(train)] and valid == every[len(train):]  # disjoint by position
    for book in ("The Acts of the Apostles", "The Letter to the Hebrews", "The Revelation to John"):
        assert book in valid and book not in train
    assert "The Good News According to" in train and "The Good News According to" not in valid  # the gospels
    assert shards.meta["source"]["valid"].startswith("whole books")


def test_split_and_source_errors() -> None:
    with pytest.raises(Bd3Error, match="train, valid, all"):
        read_documents("web", "test")
    with pytest.raises(Bd3Error, match="no such file"):
        read_documents("no/such/file.txt", "train")


def test_local_txt_jsonl_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    paragraphs_file(tmp_path / "a.txt", 60)
    with gzip.open(tmp_path / "b.txt.gz", "wt") as fh:
        fh.write("first para\n  still first\n\n\n  second  \n")
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"text": "json one", "id": 1}) + "\n\n"
        + json.dumps({"text": " json two "}) + "\n"
    )
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "only string", "n": 3}) + "\n")
    pq.write_table(pa.table({"text": ["pq one", "pq two"], "n": [1, 2]}), tmp_path / "e.parquet")

    docs = read_documents(str(tmp_path / "a.txt"), "all")
    assert len(docs) == 60 and docs[0] == "Paragraph number 0 says hello."
    assert read_documents(str(tmp_path / "a.txt"), "valid") == [docs[49]]
    gz_docs = read_documents(str(tmp_path / "b.txt.gz"), "all")
    assert gz_docs == ["first para\n  still first", "second"]
    assert read_documents(str(tmp_path / "c.jsonl"), "all") == ["json one", "json two"]
    assert read_documents(str(tmp_path / "d.jsonl"), "all") == ["only string"]
    assert read_documents(str(tmp_path / "e.parquet"), "all") == ["pq one", "pq two"]
    together = read_documents(str(tmp_path / "*"), "all")  # sorted files, one index
    assert len(together) == 60 + 2 + 2 + 1 + 2
    assert read_documents(str(tmp_path), "all") == together
    info = describe_source(str(tmp_path / "*.txt"))
    assert info["kind"] == "files" and info["files"][0]["size"] > 0 and "mtime" in info["files"][0]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"", "empty"),
        ("blank.txt", b"\n\n  \n", "empty"),
        ("nul.txt", b"text\x00more", "binary"),
        ("latin.txt", "caf\u00e9".encode("latin-1"), "not UTF-8"),
        ("bad.jsonl", b"{oops\n", "not valid JSON"),
        ("nofield.jsonl", b'{"a": "x", "b": "y"}\n', "no usable text field"),
        ("notgz.txt.gz", b"plain", "cannot read"),
        ("fake.parquet", b"not parquet", "parquet"),
        ("data.bin", b"\x00\x01", "unsupported"),
    ],
)
def test_local_file_errors(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(Bd3Error, match=message) as info:
        read_documents(str(path), "train")
    assert name in str(info.value)


def test_missing_local_paths(tmp_path: Path) -> None:
    with pytest.raises(Bd3Error, match="missing.txt"):
        read_documents(str(tmp_path / "missing.txt"), "train")
    with pytest.raises(Bd3Error, match="no files match"):
        read_documents(str(tmp_path / "*.jsonl"), "train")
    with pytest.raises(Bd3Error, match="no such file"):
        describe_source(str(tmp_path / "missing.txt"))


def test_offline_hub_error_is_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setitem(sys.modules, "datasets", None)  # datasets must not be touched when the hub is unreachable
    for name in ("owt", "wikitext103"):
        start = time.perf_counter()
        with pytest.raises(Bd3Error) as info:
            read_documents(name, "valid")
        assert time.perf_counter() - start < 2.0
        message = str(info.value)
        assert "unreachable" in message and "--data" in message
        for alternative in ("*.txt", "*.jsonl", "*.parquet", "web", "devil", "jargon", "mhcc"):
            assert alternative in message
    named = {"owt", "lm1b", "wikitext103", "wikitext2", "ptb", "lambada", "ag_news", "pubmed", "arxiv"}
    assert set(HUB_SETS) >= named


def test_hanging_dns_is_cut_short(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: time.sleep(5))
    start = time.perf_counter()
    assert not sources.hub_reachable()
    assert time.perf_counter() - start < 1.5


# ----------------------------------------------------------------------------- shards


def test_wrap_rows_by_hand() -> None:
    stream = np.arange(10, 24)  # 14 tokens; length 6 -> body 4 -> 3 rows, 2 left over
    rows, rest = wrap_rows(stream, 6, bos_id=1, eos_id=2)
    assert rows.tolist() == [[1, 10, 11, 12, 13, 2], [1, 14, 15, 16, 17, 2], [1, 18, 19, 20, 21, 2]]
    assert rest.tolist() == [22, 23]


def test_tokenize_rows_reproduce_stream(tmp_path: Path, gpt2: Tokenizer) -> None:
    text = paragraphs_file(tmp_path / "small.txt", 100)
    shards = tokenize(str(text), gpt2, 16, tmp_path / "out", progress=False)
    train = shards.rows("train")
    assert train.dtype == np.uint16 and not train.flags.writeable
    assert (train[:, 0] == gpt2.bos_id).all() and (train[:, -1] == gpt2.eos_id).all()
    docs = read_documents(str(text), "train")
    stream = document_stream(gpt2, docs)
    # "Paragraph number 0 says hello." then EOS, then the next paragraph
    assert stream[:9].tolist() == [10044, 6111, 1271, 657, 1139, 23748, 13, 50256, 10044]
    body = train[:, 1:-1].reshape(-1)
    assert body.tolist() == stream[: body.size].tolist()
    assert stream.size - body.size < 14  # only the final remainder is dropped
    meta = shards.meta
    assert meta["splits"]["train"] == {
        "rows": len(train), "tokens": len(train) * 16, "documents": 98,
        "stream_tokens": stream.size, "dropped_tokens": stream.size - body.size,
    }
    assert meta["splits"]["valid"]["documents"] == 2


def test_raw_rows_reproduce_stream(tmp_path: Path, gpt2: Tokenizer) -> None:
    """--wrap raw: rows are the EOS-separated stream itself, no injected BOS/EOS."""
    stream = np.arange(10, 24)
    rows, rest = shards_mod.raw_rows(stream, 6)
    assert rows.tolist() == [[10, 11, 12, 13, 14, 15], [16, 17, 18, 19, 20, 21]] and rest.tolist() == [22, 23]
    text = paragraphs_file(tmp_path / "small.txt", 100)
    raw = tokenize(str(text), gpt2, 16, tmp_path / "raw", progress=False, wrap="raw")
    special = tokenize(str(text), gpt2, 16, tmp_path / "special", progress=False)
    assert raw.wrap == raw.meta["wrap"] == "raw" and special.wrap == "special"
    body = raw.rows("train").reshape(-1)
    stream = document_stream(gpt2, read_documents(str(text), "train"))
    assert body.tolist() == stream[: body.size].tolist() and stream.size - body.size < 16
    assert raw.rows("train")[0, 0] != gpt2.bos_id  # the first paragraph's first token
    assert len(raw.rows("train")) < len(special.rows("train"))  # 16 stream tokens a row, not 14
    with pytest.raises(Bd3Error, match="--wrap 'lm1b'"):
        tokenize(str(text), gpt2, 16, tmp_path / "bad", progress=False, wrap="lm1b")


def test_wrap_is_part_of_the_cache_key(tmp_path: Path) -> None:
    text = paragraphs_file(tmp_path / "small.txt", 100)
    special = cached_shards(str(text), "gpt2", 16, cache_dir=tmp_path / "cache", progress=False)
    raw = cached_shards(str(text), "gpt2", 16, cache_dir=tmp_path / "cache", progress=False, wrap="raw")
    assert special.path != raw.path and (special.wrap, raw.wrap) == ("special", "raw")
    again = cached_shards(str(text), "gpt2", 16, cache_dir=tmp_path / "cache", progress=False, wrap="raw")
    assert again.path == raw.path


def test_shards_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    made = tokenize("devil", "gpt2", 64, out, progress=False)
    again = TokenShards(out)
    meta = again.meta
    keys = ("format_version", "tokenizer", "tokenizer_sha256", "vocab_size", "mask_id", "bos_id",
            "eos_id", "pad_id", "length", "dtype", "splits", "source", "created_by")
    for key in keys:
        assert key in meta
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50258 and meta["length"] == 64
    assert meta["source"]["name"] == "devil" and meta["created_by"].startswith("bd3 ")
    assert again.tokenizer.sha256 == meta["tokenizer_sha256"] == load_tokenizer("gpt2").sha256
    assert again.tokenizer.name == "gpt2"
    assert np.array_equal(again.rows("valid"), made.rows("valid"))
    counts = again.unigram_counts("train")
    assert counts.shape == (50258,) and counts.sum() == again.rows("train").size
    assert counts[50257] == 0  # the mask never occurs in data
    assert not list(tmp_path.glob(".shards.tmp-*"))
    with pytest.raises(Bd3Error, match="unknown split"):
        again.rows("test")


def test_existing_out_dir_and_force(tmp_path: Path) -> None:
    text = paragraphs_file(tmp_path / "t.txt", 100)
    out = tmp_path / "out"
    first = tokenize(str(text), "gpt2", 16, out, progress=False)
    sha = first.meta["tokenizer_sha256"]
    with pytest.raises(Bd3Error, match="--force"):
        tokenize(str(text), "bpe", 16, out, vocab_size=300, progress=False)
    assert TokenShards(out).meta["tokenizer_sha256"] == sha  # nothing overwritten
    replaced = tokenize(str(text), "bpe", 16, out, vocab_size=300, force=True, progress=False)
    assert replaced.meta["tokenizer"] == "bpe" and replaced.meta["tokenizer_sha256"] != sha
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(Bd3Error, match="not a bd3 shard folder"):
        tokenize(str(text), "gpt2", 16, other, force=True, progress=False)
    assert (other / "precious.txt").exists()


def test_tokenize_bad_lengths_and_tiny_data(tmp_path: Path) -> None:
    text = paragraphs_file(tmp_path / "t.txt", 60)
    with pytest.raises(Bd3Error, match="at least 8"):
        tokenize(str(text), "gpt2", 4, tmp_path / "a", progress=False)
    with pytest.raises(Bd3Error, match="too small for that length"):
        tokenize(str(text), "gpt2", 512, tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.tmp-*"))


def test_token_shards_errors(tmp_path: Path) -> None:
    with pytest.raises(Bd3Error, match="meta.json"):
        TokenShards(tmp_path)
    (tmp_path / "meta.json").write_text("{broken")
    with pytest.raises(Bd3Error, match="meta.json"):
        TokenShards(tmp_path)


def test_cache_reuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BD3_CACHE_DIR", str(tmp_path / "cache"))
    text = paragraphs_file(tmp_path / "t.txt", 100)

    def written(folder: Path) -> dict[Path, tuple[int, int]]:
        """Each file under ``folder`` with its inode and the time it was last written."""
        return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}

    first = cached_shards(str(text), "gpt2", 16, progress=False)
    assert first.path.parent == tmp_path / "cache" and len(first.rows("train")) and len(first.rows("valid"))
    files = written(first.path)
    time.sleep(0.01)  # a file written again would get a later time
    second = cached_shards(str(text), "gpt2", 16, progress=False)
    assert second.path == first.path and written(first.path) == files  # reused, not re-tokenized
    other = cached_shards(str(text), "gpt2", 12, progress=False)
    assert other.path != first.path and len(other.rows("train")) and written(first.path) == files
    time.sleep(0.01)
    paragraphs_file(text, 101)  # the file changed: size and mtime are part of the key
    assert cached_shards(str(text), "gpt2", 16, progress=False).path != first.path


# ----------------------------------------------------------------------------- baseline


def test_unigram_perplexity_by_hand() -> None:
    counts = np.array([3, 1, 0, 0])  # 4 tokens, vocab 4: p = (c + 1) / (4 + 4)
    rows = np.array([[0, 0, 1], [0, 2, 0]])
    p = {0: 4 / 8, 1: 2 / 8, 2: 1 / 8}
    skip = [p[0], p[1], p[2], p[0]]
    assert unigram_perplexity(counts, rows) == pytest.approx(math.exp(-np.mean(np.log(skip))))
    full = [p[0], p[0], p[1], p[0], p[2], p[0]]
    expected = math.exp(-np.mean(np.log(full)))
    assert unigram_perplexity(counts, rows, skip_first=False) == pytest.approx(expected)
