"""Issue 6's evaluation suite: exact AR NLL, MDLM == BD3-LM at L' = L, reproducible passes,
generative perplexity against a direct computation, unigram entropy, the judge's offline
path, and train -> eval end to end for every algorithm."""

from __future__ import annotations

import io
import json
import math
import socket
import time
from collections import Counter
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rich.console import Console

from bd3.cli.main import main
from bd3.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig, TrainConfig
from bd3.data.tokenizer import load_tokenizer
from bd3.diffusion.objective import diffusion_loss
from bd3.errors import Bd3Error
from bd3.evaluate import gen_ppl as gp
from bd3.evaluate.intervals import mean_interval, t_quantile_975
from bd3.evaluate.perplexity import nelbo_perplexity
from bd3.model import DiT
from bd3.runs.load import shards_for
from bd3.sampling.text import render
from bd3.train import train
from tests.conftest import randomize

MASK = 39  # the tiny models' vocabulary is 40


def test_ar_nll_equals_log_softmax_at_shifted_targets(tiny_cfg):
    """AR: -log softmax(logits)[x_i], the logits of each prefix computed on its own."""
    model = randomize(DiT(replace(tiny_cfg, causal=True), 40))
    x0 = torch.randint(0, MASK, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        losses = diffusion_loss(model, x0, DiffusionConfig(algo="ar"), MASK)
        hand = torch.zeros(2, 16, dtype=torch.float64)
        for i in range(1, 16):
            logits = model(x0[:, :i])[:, -1].double()  # the prefix alone: no mask can leak the future
            logits[:, MASK] = -torch.inf  # the mask is never a prediction
            hand[:, i] = -logits.log_softmax(-1).gather(-1, x0[:, i : i + 1])[:, 0]
        result = nelbo_perplexity(model, x0.numpy(), DiffusionConfig(algo="ar"), MASK, batch_size=2)
    assert losses.count == 2 * 15
    torch.testing.assert_close(losses.token_loss.double(), hand, atol=1e-5, rtol=0)
    assert not result["bound"] and result["ppl"] == pytest.approx(math.exp(hand.sum() / 30), rel=1e-5)


def test_mdlm_equals_bd3lm_evaluated_at_block_size_length(tiny_model):
    """Same seed -> the same t and masks -> the same NELBO, pass by pass."""
    rows = np.random.default_rng(0).integers(0, MASK, (6, 16))
    kw = {"batch_size": 3, "passes": 2, "seed": 4}
    mdlm = nelbo_perplexity(tiny_model, rows, DiffusionConfig(algo="mdlm", block_size=16), MASK, **kw)
    bd3 = nelbo_perplexity(tiny_model, rows, DiffusionConfig(block_size=16), MASK, **kw)
    assert mdlm["bound"] and mdlm["ppl_passes"][0] != mdlm["ppl_passes"][1]
    assert mdlm["ppl_passes"] == pytest.approx(bd3["ppl_passes"], rel=1e-6, abs=0)


# -- generative perplexity ----------------------------------------------------------------


class CharJudge:
    """Characters as tokens, BOS 0, EOS 1, every NLL 0: for the bookkeeping alone."""

    name, context, bos_id, eos_id = "chars", 8, 0, 1

    def tokenize(self, text):
        return [ord(c) for c in text]

    def nll(self, window):
        return torch.zeros(len(window) - 1, dtype=torch.float64)


def test_unigram_entropy_per_sample_on_known_strings():
    cases = [(["aaaa"], 0.0), (["abab"], math.log(2)), (["abcd"], math.log(4)),
             (["aab"], -(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3)),
             (["ab", "ab"], math.log(2))]  # the EOS between the documents is not a scored token
    for documents, entropy in cases:
        assert gp.score_sample(CharJudge(), gp.GenSample(documents))["entropy"] == pytest.approx(entropy, abs=1e-12)
    # averaged per sample, not pooled: "aaaa" and "bbbb" each have entropy 0 (pooled they would have log 2)
    res = gp.generative_perplexity([gp.GenSample(["aaaa"]), gp.GenSample(["bbbb"]), gp.GenSample(["abcdef", "g"])], CharJudge())
    assert res["entropy"] == pytest.approx(math.log(7) / 3)
    assert (res["length_median"], res["length_max"], res["tokens"], res["gen_ppl"]) == (4, 7, 15, 1.0)
    assert res["nfe_per_token"] is None  # no sampler records


def direct_gen_ppl(model, tok, documents, context):
    """The protocol by hand: [BOS] doc [EOS] doc ..., windows of `context` moving by half of it,
    each target scored by the first window that predicts it, EOS targets left out."""
    ids = [tok.bos_id] + tok.encode(documents[0])
    for doc in documents[1:]:
        ids += [tok.eos_id] + tok.encode(doc)
    nll = {}
    start = 0
    while True:
        window = ids[start : start + context]
        with torch.no_grad():
            logits = model(torch.tensor([window[:-1]]))[0].double()
        logits[:, tok.mask_id] = -torch.inf
        logp = logits.log_softmax(-1)
        for j in range(1, len(window)):
            nll.setdefault(start + j, -float(logp[j - 1, window[j]]))
        if start + context >= len(ids):
            break
        start += context // 2
    kept = [p for p in range(1, len(ids)) if ids[p] != tok.eos_id]
    assert sorted(nll) == list(range(1, len(ids)))
    return [nll[p] for p in kept], [ids[p] for p in kept]


class FakeCausalLM:
    """A bd3 model dressed as a transformers causal LM (config, device, .logits), mask excluded."""

    def __init__(self, model, mask_id):
        self.model, self.mask_id = model, mask_id
        self.config, self.device = SimpleNamespace(n_positions=model.cfg.length), torch.device("cpu")

    def __call__(self, x):
        logits = self.model(x)
        logits[..., self.mask_id] = -torch.inf
        return SimpleNamespace(logits=logits)


DOCS = [
    ["The quick brown fox jumps over the lazy dog, and then it sleeps for a while in the warm sun.", " Later it wakes."],
    ["Short one."],
    ["", "", "Empty documents first."],
]


def test_the_interval_of_a_mean_covers_it_at_its_level():
    rng = np.random.default_rng(0)
    draws = rng.lognormal(0.0, 0.5, size=(400, 16))  # skewed, like per-sample perplexities; mean exp(0.125)
    covered = [lo <= math.exp(0.125) <= hi for lo, hi in (mean_interval(d)["ci95"] for d in draws)]
    assert 0.90 <= np.mean(covered) <= 0.99
    assert mean_interval([3.0]) == {"mean": 3.0, "se": None, "ci95": None}


def test_gen_ppl_on_a_tiny_judge_equals_a_direct_computation(tiny_cfg):
    tok = load_tokenizer("bpe")
    model = randomize(DiT(replace(tiny_cfg, causal=True), tok.vocab_size))  # context 16: windows of 16, stride 8
    samples = [gp.GenSample(d, nfe=10 + k, new_tokens=20) for k, d in enumerate(DOCS)]
    res = gp.generative_perplexity(samples, gp.RunJudge(model, tok, "tiny"))
    per = [direct_gen_ppl(model, tok, d, 16) for d in DOCS]
    assert len(per[0][0]) > 24  # four windows
    ppls = [math.exp(np.mean(n)) for n, _ in per]
    for got, (_, ids), ppl in zip(res["per_sample"], per, ppls, strict=True):
        assert got["tokens"] == len(ids) and got["ppl"] == pytest.approx(ppl, rel=1e-5)
        counts = np.array(list(Counter(ids).values()), dtype=float)
        assert got["entropy"] == pytest.approx(-(counts / counts.sum() * np.log(counts / counts.sum())).sum(), rel=1e-9)
    assert res["gen_ppl"] == pytest.approx(np.mean(ppls), rel=1e-5)
    half = t_quantile_975(len(ppls) - 1) * np.std(ppls, ddof=1) / math.sqrt(len(ppls))
    assert res["gen_ppl_ci95"] == pytest.approx([np.mean(ppls) - half, np.mean(ppls) + half], rel=1e-5)
    pooled = math.exp(sum(sum(n) for n, _ in per) / sum(len(n) for n, _ in per))
    assert res["gen_ppl_pooled"] == pytest.approx(pooled, rel=1e-5) and res["gen_ppl_pooled"] != pytest.approx(res["gen_ppl"])
    assert res["nfe_per_token"] == pytest.approx(33 / 60)
    assert (res["window"], res["stride"], res["length_max"]) == (16, 8, len(per[0][1]))

    # the HuggingFace judge, through an object shaped like transformers' model and tokenizer
    def hf_tokenizer(text, add_special_tokens):
        assert not add_special_tokens
        return {"input_ids": tok.encode(text)}

    hf_tokenizer.bos_token_id = hf_tokenizer.eos_token_id = tok.eos_id
    hf = gp.generative_perplexity(samples, gp.HFJudge(FakeCausalLM(model, tok.mask_id), hf_tokenizer, "fake"))
    assert hf["window"] == 16 and hf["gen_ppl"] == pytest.approx(np.mean(ppls), rel=1e-5)


def test_read_samples_splits_documents_with_the_samplers_tokenizer(tmp_path):
    tok = load_tokenizer("bpe")
    ids = [tok.bos_id] + tok.encode("First part.") + [tok.eos_id] + tok.encode(" Second part.")
    rec = {"text": render(ids, tok), "tokens": ids, "prompt_tokens": 1, "nfe": 7, "new_tokens": len(ids) - 1}
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(rec) + "\n\n" + json.dumps({"text": "Only text."}) + "\n")
    first, second = gp.read_samples(path, lambda: tok)
    assert first.documents == ["First part.", " Second part."] and (first.nfe, first.new_tokens) == (7, len(ids) - 1)
    assert second.documents == ["Only text."] and second.nfe is None
    for change, needle in (({"text": "edited"}, "do not decode"), ({"prompt_tokens": 3}, "prompt"), ({"tokens": "x"}, "list")):
        path.write_text(json.dumps({**rec, **change}) + "\n")
        with pytest.raises(Bd3Error, match=needle):
            gp.read_samples(path, lambda: tok)


def test_hf_judge_errors_are_fast_one_liners(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.jsonl").write_text(json.dumps({"text": "Some text to score."}) + "\n")
    args = ["eval", "--samples", "s.jsonl", "--judge", "gpt2-large", "--device", "cpu"]

    monkeypatch.setattr(gp, "transformers_available", lambda: False)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "pip install 'bd3[transformers]'" in err and "--algo ar" in err and "Traceback" not in err

    def offline(*a, **k):
        raise socket.gaierror("offline")

    monkeypatch.setattr(gp, "transformers_available", lambda: True)
    monkeypatch.setattr(gp, "_hf_cached", lambda name: False)
    monkeypatch.setattr(socket, "getaddrinfo", offline)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    assert main(args) == 1
    assert time.monotonic() - start < 10.0  # no retries (the hub client's would take 20 s and more)
    err = capsys.readouterr().err
    assert "gpt2-large" in err and "cache" in err and "--algo ar" in err and len(err.strip().splitlines()) == 1

    assert main(["eval", "--samples", "s.jsonl", "--judge", str(tmp_path / "no-such-run"), "--device", "cpu"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--samples", "s.jsonl", "--passes", "3", "--device", "cpu"]) == 2  # a split's option: refused
    assert "--passes" in capsys.readouterr().err


# -- end to end: train each algorithm for a few steps, evaluate it ------------------------


def tiny_run(path, algo: str):
    length = 32
    shards = shards_for("web", "bpe", length, 8192)
    cfg = RunConfig(
        model=ModelConfig(hidden_dim=32, n_heads=2, n_layers=2, cond_dim=16, length=length, causal=algo == "ar"),
        diffusion=DiffusionConfig(algo=algo, block_size=8),
        data=DataConfig(data=str(shards.path), tokenizer="bpe"),  # the shard folder itself: eval reads it, tokenizes nothing
        train=TrainConfig(steps=2, batch_size=4, warmup_steps=1, device="cpu", precision="fp32", log_every=1, save_every=0, eval_batches=1),
    )
    train(cfg, shards, path, console=Console(file=io.StringIO()))
    return path


@pytest.fixture(scope="module")
def ar_judge(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("judge") / "ar", "ar")


def run_json(args, capsys) -> dict:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("algo", ["ar", "mdlm", "bd3lm"])
def test_train_then_eval_each_algorithm(algo, ar_judge, tmp_path, capsys):
    run = ar_judge if algo == "ar" else tiny_run(tmp_path / algo, algo)
    common = ["--json", "--device", "cpu", "--batch-size", 2, "--max-batches", 1]
    a = run_json(["eval", run, *common, "--passes", 2, "--seed", 3], capsys)
    b = run_json(["eval", run, *common, "--passes", 2, "--seed", 3], capsys)
    c = run_json(["eval", run, *common, "--passes", 2, "--seed", 4], capsys)
    assert a == b and a["algo"] == algo and a["bound"] == (algo != "ar") and 1 < a["ppl"] < 1e5
    for key in ("nelbo", "ppl", "nelbo_se", "ppl_ci95", "estimator", "passes", "tokens"):
        assert key in a
    if algo == "ar":  # exact: nothing random, one pass is the value
        assert a["ppl_passes"] == c["ppl_passes"] and a["passes"] == 1 and a["nelbo_se"] == 0 and a["estimator"] == "exact"
    else:
        assert a["ppl_passes"][0] != a["ppl_passes"][1] and c["ppl_passes"] != a["ppl_passes"] and a["estimator"] == "k"
        low, high = a["ppl_ci95"]
        assert low < a["ppl"] < high and a["nelbo_se"] > 0

    gen = ["eval", run, "--judge", ar_judge, "--num-samples", 2, "--max-tokens", 40, "--seed", 5, "--json", "--device", "cpu"]
    g = run_json([*gen, "--gen-ppl"], capsys)
    assert g["samples"] == 2 and g["window"] == 32 and g["gen_ppl"] > 1 and g["nfe_per_token"] > 0
    assert g["length_max"] >= g["length_median"] > 0 and len(g["per_sample"]) == 2
    if algo == "bd3lm":  # the same samples written by `bd3 sample` and read back score the same
        assert main(["sample", str(run), "--num-samples", "2", "--max-tokens", "40", "--seed", "5", "--format", "jsonl", "--device", "cpu"]) == 0
        (tmp_path / "s.jsonl").write_text(capsys.readouterr().out)
        f = run_json([*gen, "--samples", tmp_path / "s.jsonl"], capsys)
        assert f["per_sample"] == g["per_sample"] and f["gen_ppl"] == g["gen_ppl"]
