"""Issue 16: bd3 runs in lm-evaluation-harness. Log-likelihoods against direct computations
(AR: token log-probs; BD3-LM at block size 4: a brute-force enumeration of the bound), local
tasks through `bd3 eval --tasks`, the offline hub error, and bad input."""

from __future__ import annotations

import io
import itertools
import json
import math
import socket
import sys
import time

import pytest
import torch
from rich.console import Console

pytest.importorskip("lm_eval", reason="the harness tests need lm-eval: pip install 'bd3[harness]'")

from lm_eval.api.instance import Instance  # noqa: E402

from bd3.cli.main import main  # noqa: E402
from bd3.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from bd3.diffusion.masks import block_causal_mask  # noqa: E402
from bd3.evaluate.harness import Bd3LM  # noqa: E402
from bd3.runs.load import shards_for  # noqa: E402
from bd3.train import train  # noqa: E402
from tests.conftest import randomize  # noqa: E402

LENGTH = 32
QUESTIONS = [
    {"question": "The sun rises in the", "choices": [" east", " west", " sea"], "answer": 0},
    {"question": "Water is", "choices": [" wet", " dry"], "answer": 0},
    {"question": "One, two,", "choices": [" three", " blue", " house"], "answer": 0},
]
TEXTS = ["It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness. " * 2,
         "Call me Ishmael."]
PAIRS = [("The sun rises in the", " east"), ("", "Hello there"), ("Once upon a time " * 12, "there was a king"),
         ("A", " long continuation of several words here")]


@pytest.fixture(autouse=True)
def _no_environment_report(monkeypatch):
    """lm-eval reports the environment with each result (pip and GPU queries in subprocesses,
    seconds per call); nothing here checks it."""
    monkeypatch.setattr("lm_eval.evaluator.add_env_info", lambda results: None)


def tiny_run(path, algo: str, block_size: int = 4):
    shards = shards_for("web", "bpe", LENGTH, 8192)
    cfg = RunConfig(
        model=ModelConfig(hidden_dim=32, n_heads=2, n_layers=2, cond_dim=16, length=LENGTH, causal=algo == "ar"),
        diffusion=DiffusionConfig(algo=algo, block_size=block_size),
        data=DataConfig(data=str(shards.path), tokenizer="bpe"),
        train=TrainConfig(steps=1, batch_size=2, warmup_steps=1, device="cpu", precision="fp32", log_every=1, save_every=0, eval_batches=1),
    )
    train(cfg, shards, path, console=Console(file=io.StringIO()))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    return {algo: tiny_run(root / algo, algo) for algo in ("ar", "bd3lm", "mdlm", "sedd")}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A multiple-choice task and a rolling-log-likelihood task, YAML + JSONL."""
    d = tmp_path_factory.mktemp("tasks")
    (d / "choice.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (d / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    common = "dataset_path: json\ntest_split: test\n"
    (d / "choice.yaml").write_text(
        f"task: bd3_choice\n{common}dataset_kwargs:\n  data_files:\n    test: {d / 'choice.jsonl'}\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n"
    )
    (d / "rolling.yaml").write_text(
        f"task: bd3_rolling\n{common}dataset_kwargs:\n  data_files:\n    test: {d / 'texts.jsonl'}\noutput_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    return d


def requests(pairs, kind="loglikelihood"):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(pairs)]


def encoded_rows(lm, pairs):
    """[BOS] + context + continuation, the context cut from the left to fit, and where the continuation starts."""
    rows = []
    for context, continuation in pairs:
        ctx, cont = lm._encode_pair(context, continuation) if context else ([], lm.tok_encode(continuation))
        ctx = ctx[max(len(ctx) - (LENGTH - 1 - len(cont)), 0):]
        rows.append(([lm.config.data.bos_id, *ctx, *cont], 1 + len(ctx)))
    return rows


def log_probs(logits, mask_id):
    logits = logits.double().clone()
    logits[..., mask_id] = -math.inf
    return torch.log_softmax(logits, -1)


def test_ar_loglikelihoods_are_token_log_probs(runs):
    lm = Bd3LM(run=runs["ar"], batch_size=3, device="cpu")
    randomize(lm.model, seed=1)
    got = lm.loglikelihood(requests(PAIRS), disable_tqdm=True)
    for (row, start), (value, greedy) in zip(encoded_rows(lm, PAIRS), got):
        x = torch.tensor(row)
        with torch.no_grad():
            logp = log_probs(lm.model(x[None, :-1])[0], lm.config.data.mask_id)
        targets = x[start:]
        direct = logp[start - 1 :].gather(-1, targets[:, None]).sum().item()
        assert value == pytest.approx(direct, abs=1e-5)
        assert greedy == bool((logp[start - 1 :].argmax(-1) == targets).all())
    assert got == lm.loglikelihood(requests(PAIRS), disable_tqdm=True)


def test_ar_rolling_is_the_sum_over_windows(runs):
    """Windows of L - 2 tokens, each after BOS with nothing before it (bd3 eval --zero-shot's rows)."""
    lm = Bd3LM(run=runs["ar"], device="cpu")
    randomize(lm.model, seed=3)
    got = lm.loglikelihood_rolling(requests([(t,) for t in TEXTS], "loglikelihood_rolling"), disable_tqdm=True)
    for text, value in zip(TEXTS, got):
        ids, direct = lm.tok_encode(text), 0.0
        assert len(ids) > LENGTH or text != TEXTS[0]  # the first text needs several windows
        for i in range(0, len(ids), LENGTH - 2):
            x = torch.tensor([lm.config.data.bos_id, *ids[i : i + LENGTH - 2]])
            with torch.no_grad():
                logp = log_probs(lm.model(x[None, :-1])[0], lm.config.data.mask_id)
            direct += logp.gather(-1, x[1:, None]).sum().item()
        assert value == pytest.approx(direct, abs=1e-5)


def test_generate_until_stops_at_the_first_stop_string(runs):
    lm = Bd3LM(run=runs["bd3lm"], device="cpu")
    randomize(lm.model, seed=4)
    gen = [("Once upon a time", {"until": ["e"], "max_gen_toks": 16}), ("Hello", {"until": ["\n"], "max_gen_toks": 8, "do_sample": True})]
    out = lm.generate_until(requests(gen, "generate_until"), disable_tqdm=True)
    assert "e" not in out[0] and isinstance(out[1], str) and len(lm.tok_encode(out[1])) <= 8
    assert out == lm.generate_until(requests(gen, "generate_until"), disable_tqdm=True)


@pytest.mark.parametrize("algo", ["bd3lm", "mdlm", "ar", "sedd"])
def test_generate_until_batches_and_each_request_is_its_own(runs, algo, monkeypatch):
    """Requests of different lengths and decodings, batch_size at a time: each text is the one
    the request gets alone, in the requests' order; a repeated sampled request draws anew."""
    import bd3.sampling.generate as sampling

    rows = []
    for name in ("sample_blocks", "sample_ar", "sample_sedd"):
        real = getattr(sampling, name)
        monkeypatch.setattr(sampling, name, lambda *a, _real=real, **kw: rows.append(len(kw["samples"])) or _real(*a, **kw))
    lm = Bd3LM(run=runs[algo], batch_size=2, device="cpu")
    randomize(lm.model, seed=6)
    sampled = {"do_sample": True, "temperature": 0.8, "top_p": 0.9}
    gen = [("Once upon a time", {"until": ["."], "max_gen_toks": 12}),
           ("Hi", {"until": [], "max_gen_toks": 5, **sampled}),
           ("word " * 40, {"until": ["\n"], "max_gen_toks": 9}),  # cut from the left to fit
           ("The sun rises in the east and", {"until": [], "max_gen_toks": 20}),
           ("A", {"until": [" the"], "max_gen_toks": 7}),
           ("Water is", {"until": [], "max_gen_toks": 6, **sampled})]
    together = lm.generate_until(requests(gen, "generate_until"), disable_tqdm=True)
    assert rows == [2, 2, 2]  # four greedy requests in two batches, then the two sampled ones
    assert together == [lm.generate_until(requests([g], "generate_until"), disable_tqdm=True)[0] for g in gen]
    twice = lm.generate_until(requests([gen[1], gen[1]], "generate_until"), disable_tqdm=True)
    assert twice[0] == together[1] and twice[1] != twice[0]


def brute_force_bound(model, row, start, block_size, mask_id):
    """-NELBO of row[start:] given row[:start] clean, the rest of the model length unknown
    (masked): for each block and each non-empty subset S of its continuation positions (m of
    them), one plain forward over the clean earlier blocks and the block with S masked,
    weighted by the integral over the mask rate u of u^(k-1) (1-u)^(m-k) (a Beta function).
    Also is_greedy: with S all of a block's continuation positions, the argmax gives them."""
    x = torch.full((LENGTH,), mask_id)
    x[: len(row)] = torch.tensor(row)
    total, greedy = 0.0, True
    for b in range(LENGTH // block_size):
        s, e = b * block_size, (b + 1) * block_size
        positions = [i for i in range(s, e) if start <= i < len(row)]
        m = len(positions)
        for k in range(1, m + 1):
            weight = math.gamma(k) * math.gamma(m - k + 1) / math.gamma(m + 1)
            for subset in itertools.combinations(positions, k):
                seq = x[:e].clone()
                seq[list(subset)] = mask_id
                with torch.no_grad():
                    logits = model(seq[None], attn_mask=block_causal_mask(e, block_size))[0]
                logp = log_probs(logits, mask_id)
                total += weight * sum(logp[i, x[i]].item() for i in subset)
                if k == m:
                    greedy &= all(logp[i].argmax().item() == x[i].item() for i in subset)
    return total, greedy


def test_bd3lm_exact_bound_equals_brute_force_enumeration(runs):
    lm = Bd3LM(run=runs["bd3lm"], batch_size=4, device="cpu")
    randomize(lm.model, seed=2)
    assert lm.estimator == "exact"
    x = torch.tensor([lm.config.data.bos_id, *lm.tok_encode("The sun")] + [lm.config.data.mask_id] * (LENGTH - 3))
    with torch.no_grad():  # the argmax of the block after the context, all of it masked: a greedy continuation
        logits = lm.model(x[None, :8], attn_mask=block_causal_mask(8, 4))[0].clone()
    logits[:, lm.config.data.mask_id] = -math.inf
    pairs = [*PAIRS, ("The sun", lm.tok_decode(logits[3:4].argmax(-1).tolist()))]
    got = lm.loglikelihood(requests(pairs), disable_tqdm=True)
    greedy = []
    for (row, start), (value, is_greedy) in zip(encoded_rows(lm, pairs), got):
        bound, brute_greedy = brute_force_bound(lm.model, row, start, 4, lm.config.data.mask_id)
        assert value == pytest.approx(bound, abs=1e-5) and is_greedy == brute_greedy
        greedy.append(is_greedy)
    assert greedy[-1]  # a continuation that is the model's argmax
    assert got == lm.loglikelihood(requests(pairs), disable_tqdm=True)
    k = Bd3LM(run=runs["bd3lm"], device="cpu", estimator="k", passes=64)
    randomize(k.model, seed=2)
    estimate = k.loglikelihood(requests(pairs), disable_tqdm=True)
    assert estimate == k.loglikelihood(requests(pairs), disable_tqdm=True)  # seeded
    for (exact, _), (value, _) in zip(got, estimate):
        assert value == pytest.approx(exact, rel=0.05)


def test_mdlm_uses_k_with_seeded_passes(runs):
    lm = Bd3LM(run=runs["mdlm"], device="cpu", passes=4)
    randomize(lm.model, seed=5)
    got = lm.loglikelihood(requests(PAIRS), disable_tqdm=True)
    assert lm.estimator == "k" and lm.passes == 4 and all(math.isfinite(v) and v < 0 for v, _ in got)
    assert got == lm.loglikelihood(requests(PAIRS), disable_tqdm=True)
    longer = lm.loglikelihood(requests([("The sun rises in the", " east and sets in the west")]), disable_tqdm=True)
    assert longer[0][0] < got[0][0]  # more tokens to explain: a lower bound


def eval_json(args, capsys) -> dict:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_local_tasks_through_the_cli(runs, task_dir, tmp_path, capsys):
    args = ["eval", runs["bd3lm"], "--tasks", "bd3_choice,bd3_rolling", "--include-path", task_dir, "--device", "cpu", "--json"]
    a = eval_json([*args, "--output", tmp_path / "results.json"], capsys)
    assert a["bound"] and a["estimator"] == "exact" and a["algo"] == "bd3lm"
    results = a["lm_eval"]["results"]
    assert 0 <= results["bd3_choice"]["acc,none"] <= 1
    assert results["bd3_rolling"]["word_perplexity,none"] > 1 and results["bd3_rolling"]["bits_per_byte,none"] > 0
    assert json.loads((tmp_path / "results.json").read_text()) == a
    assert eval_json(args, capsys)["lm_eval"]["results"] == results  # reproducible
    code = main([str(v) for v in args] + ["--output", str(tmp_path / "results.json")])
    assert code == 1 and "already exists" in capsys.readouterr().err
    ar = eval_json(["eval", runs["ar"], "--tasks", "bd3_choice", "--include-path", task_dir, "--device", "cpu", "--json", "--limit", 2], capsys)
    assert not ar["bound"] and ar["lm_eval"]["results"]["bd3_choice"]["acc,none"] in (0.0, 0.5, 1.0)


def test_hub_tasks_offline_fail_at_once(runs, task_dir, monkeypatch, capsys):
    def offline(*a, **k):
        raise socket.gaierror("offline")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    for env in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(env, raising=False)
    start = time.perf_counter()
    code = main(["eval", str(runs["bd3lm"]), "--tasks", "lambada_openai", "--device", "cpu"])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 1 and elapsed < 2.0, (elapsed, err)
    assert len(err.strip().splitlines()) == 1 and "hub" in err and "--include-path" in err
    code = main(["eval", str(runs["bd3lm"]), "--tasks", "bd3_choise", "--include-path", str(task_dir)])
    err = capsys.readouterr().err
    assert code == 1 and "did you mean bd3_choice" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("extra, code, words", [
    (["--num-fewshot", "-1"], 2, "--num-fewshot"),
    (["--limit", "0"], 2, "--limit"),
    (["--split", "train"], 2, "does not apply to --tasks"),
])
def test_bad_options(runs, task_dir, extra, code, words, capsys):
    got = main(["eval", str(runs["bd3lm"]), "--tasks", "bd3_choice", "--include-path", str(task_dir), *extra])
    err = capsys.readouterr().err
    assert got == code and words in err and len(err.strip().splitlines()) == 1


def test_bad_task_folder_sedd_and_missing_lm_eval(runs, task_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(runs["bd3lm"]), "--tasks", "x", "--include-path", str(tmp_path / "empty")]) == 1
    assert "no task YAML" in capsys.readouterr().err
    assert main(["eval", str(runs["sedd"]), "--tasks", "bd3_choice", "--include-path", str(task_dir)]) == 1
    err = capsys.readouterr().err
    assert "do not support loglikelihood" in err and "bd3_choice" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", str(runs["bd3lm"]), "--limit", "3"]) == 2
    assert "applies to --tasks only" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)
    monkeypatch.delitem(sys.modules, "bd3.evaluate.harness")
    assert main(["eval", str(runs["bd3lm"]), "--tasks", "bd3_choice", "--include-path", str(task_dir)]) == 1
    assert "pip install 'bd3[harness]'" in capsys.readouterr().err
