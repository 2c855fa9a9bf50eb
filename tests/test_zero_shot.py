"""Zero-shot evaluation: detokenizers, wrapping without EOS, the offline path."""

import json
import socket
import time

import numpy as np
import pytest

from bd3.cli.main import main
from bd3.data import detokenizers as d
from bd3.data.tokenizer import load_tokenizer
from bd3.evaluate.zero_shot import unseen_share, zero_shot_rows


@pytest.mark.parametrize(
    "fn,raw,clean",
    [
        (d.ptb, "the company 's shares rose N % to $ N <unk> and it did n't", "the company's shares rose 1 % to $1 ? and it didn't"),
        (d.ptb, "buy\\/sell", "buy/sell"),
        (d.wikitext, " = = Early life = = \n He was born in 1 @,@ 000 @-@ year old town , in ( the ) north . ",
         " == Early life ==\nHe was born in 1,000-year old town, in (the) north. "),
        (d.wikitext, "3 @.@ 5 kg", "3.5 kg"),
        (d.lm1b, 'He said " hello " , and left : http : / / x.com .', 'He said "hello", and left: http://x.com .'),
        (d.lm1b, "Is it ( really ) $ 5 ?", "Is it (really) $5?"),
        (d.lambada, "  \u201cHi,\u201d she said.  ", '\n"Hi," she said.'),
        (d.scientific_papers, "the value is 3 @.@ 5 ( see above ) .", "the value is 3.5 (see above) ."),
    ],
)
def test_detokenizers(fn, raw, clean):
    assert fn(raw) == clean


def test_zero_shot_rows_have_no_eos_between_documents(tmp_path):
    tok = load_tokenizer("bpe")
    path = tok.save(tmp_path / "tokenizer.json")
    rows = zero_shot_rows("devil", path, 64)
    assert (rows[:, 0] == tok.bos_id).all() and (rows[:, -1] == tok.eos_id).all()
    assert not (rows[:, 1:-1] == tok.eos_id).any()  # documents run on, as the reference's zero-shot sets


def test_zero_shot_local_copy_is_detokenized(tmp_path):
    tok = load_tokenizer("bpe")
    path = tok.save(tmp_path / "tokenizer.json")
    (tmp_path / "ptb.txt").write_text(("the cat 's hat did n't fit <unk> . " * 40 + "\n\n") * 3)
    rows = zero_shot_rows("ptb", path, 32, data=str(tmp_path / "ptb.txt"))
    text = tok.decode(rows[:, 1:-1].flatten().tolist())
    assert "cat's" in text and "didn't" in text and "<unk>" not in text


def test_local_text_keeps_a_newline_between_paragraphs(tmp_path):
    tok = load_tokenizer("bpe")
    path = tok.save(tmp_path / "tokenizer.json")
    (tmp_path / "notes.txt").write_text("Hacker Culture\n\nThis is the story.\n\n" + "more words here " * 20)
    rows = zero_shot_rows(str(tmp_path / "notes.txt"), path, 32)
    text = tok.decode(rows[:, 1:-1].flatten().tolist())
    assert text.startswith("Hacker Culture\nThis is the story.\nmore words")
    devil = tok.decode(zero_shot_rows("devil", path, 64)[:, 1:-1].flatten().tolist())
    assert "\n" in devil  # the built-in held-out sets are paragraphs too


def test_unseen_share_counts_evaluated_tokens_missing_from_training():
    counts = np.array([5, 0, 3, 0])
    rows = np.array([[1, 0, 1, 3], [3, 2, 2, 2]])  # position 0 (BOS) is not evaluated
    assert unseen_share(counts, rows) == pytest.approx(2 / 6)
    assert unseen_share(counts, rows[:, :1]) == 0.0


def test_hub_set_offline_fails_fast_naming_alternatives(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--length", "32", "--batch-size", "4", "--steps", "1", "--device", "cpu", "--eval-batches", "1", "--out", "r"]) == 0

    def offline(*a, **k):
        raise socket.gaierror("offline")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    capsys.readouterr()
    start = time.monotonic()
    assert main(["eval", "r", "--zero-shot", "ptb", "--device", "cpu"]) == 1
    assert time.monotonic() - start < 2.0
    err = capsys.readouterr().err
    assert "ptb" in err and "--data" in err and "devil" in err and "Traceback" not in err

    assert main(["eval", "r", "--zero-shot", "devil,jargon", "--max-batches", "1", "--batch-size", "2", "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["set"] for r in out["zero_shot"]] == ["devil", "jargon"] and all(r["bound"] for r in out["zero_shot"])
    assert all(0.0 <= r["unseen_share"] < 0.5 for r in out["zero_shot"])

    (tmp_path / "boxes.txt").write_text("\n\n".join(["┌─┬─┐ │ ╞═╪═╡ └─┴─┘ ░▒▓█ " * 8] * 4))  # characters the Bible never uses
    assert main(["eval", "r", "--zero-shot", "boxes.txt", "--max-batches", "1", "--batch-size", "2", "--json", "--device", "cpu"]) == 0
    local = json.loads(capsys.readouterr().out)["zero_shot"][0]
    assert local["set"] == "boxes.txt" and local["unseen_share"] > 0.3
    assert main(["eval", "r", "--data", "boxes.txt", "--max-batches", "1", "--batch-size", "2", "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["zero_shot"][0] == local
    assert main(["eval", "r", "--zero-shot", "nope"]) == 2
