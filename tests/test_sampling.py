"""The samplers: KV-cache exactness, update rules pinned by mock denoisers, per-row
randomness and stopping, prompts, streaming, and `bd3 sample` end to end."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bd3.cli.main import main
from bd3.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig, TrainConfig
from bd3.data.tokenizer import load_tokenizer
from bd3.diffusion.masks import block_causal_mask
from bd3.model import DiT, KVCache
from bd3.runs import Run
from bd3.sampling.block import sample_blocks
from bd3.sampling.denoiser import ModelDenoiser
from bd3.sampling.engine import Engine, inference_forward
from bd3.sampling.rng import RowRNG
from bd3.sampling.rules import draw, kept, nucleus, subs_weights
from bd3.sampling.text import SampleWriter, TextStream, render
from bd3.sampling.types import Decoding, low_entropy, unigram_entropy
from tests.conftest import ar_samples, block_samples, randomize

V, MASK, BOS, EOS = 40, 39, 0, 38
KW = dict(length=16, mask_id=MASK, bos_id=BOS)


# -- exactness of the cached paths ------------------------------------------------------


@pytest.mark.parametrize("engine", [True, False])
def test_cached_denoiser_equals_recomputation_for_every_block(tiny_model, engine):
    """Logits through the KV cache (commits folded into the next call) equal logits
    recomputed from scratch under the block-causal mask, for every block within the length."""
    g = torch.Generator().manual_seed(0)
    B, L, bs = 3, 16, 4
    x = torch.randint(0, MASK, (B, L), generator=g)
    net = inference_forward(tiny_model, engine)
    cached = ModelDenoiser(net, block_size=bs, context=L - bs, kv_cache=True)
    uncached = ModelDenoiser(net, block_size=bs, context=L - bs, kv_cache=False)
    rows = torch.arange(B).repeat_interleave(bs)
    pos = torch.arange(bs).repeat(B)
    for b in range(L // bs):
        s = b * bs
        noisy = x[:, s : s + bs].clone()
        noisy[:, ::2] = MASK
        seq = torch.cat([x[:, :s], noisy], 1)
        with torch.no_grad():
            want = tiny_model(seq, attn_mask=block_causal_mask(s + bs, bs))[:, s:].reshape(B * bs, -1)
        torch.testing.assert_close(cached(noisy, s, rows, pos), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(uncached(noisy, s, rows, pos), want, atol=1e-5, rtol=0)
        cached.commit(x[:, s : s + bs], s)
        uncached.commit(x[:, s : s + bs], s)
    assert cached.cache.length == L - bs and cached.pending.shape[1] == bs  # the last commit waits for a next call


def test_engine_equals_the_model(tiny_model):
    engine = Engine(tiny_model)
    x = torch.randint(0, MASK, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = tiny_model(x)
    torch.testing.assert_close(engine(x), want, atol=1e-5, rtol=0)
    select = torch.zeros(2, 16, dtype=torch.bool)
    select[0, [0, 3, 9]] = select[1, [2, 15]] = True
    got = engine(x, select=select)  # the last layer only at these positions
    torch.testing.assert_close(got, want[select], atol=1e-5, rtol=0)
    torch.testing.assert_close(got, tiny_model(x, select=select), atol=1e-5, rtol=0)


def test_engine_only_where_it_is_tested(tiny_model):
    """auto: the engine on a CPU, the DiT itself elsewhere and for a time-conditioned
    (SEDD) model; asking for the engine off a CPU, or for fp16 without it, is an error."""
    assert isinstance(inference_forward(tiny_model), Engine)
    assert inference_forward(tiny_model, time_conditioned=True) is tiny_model
    assert inference_forward(tiny_model, False, "bf16") is tiny_model
    with pytest.raises(ValueError, match="needs the CPU engine"):
        inference_forward(tiny_model, False, "fp16")
    elsewhere = DiT(tiny_model.cfg, V).to("meta")  # any device but a CPU
    assert inference_forward(elsewhere) is elsewhere
    with pytest.raises(ValueError, match="CPUs only"):
        inference_forward(elsewhere, True)


def test_engine_single_row_output_layer(tiny_model):
    """One row takes the split-vocabulary product (V = 40 here, even; 41 pads): the same logits."""
    for vocab in (40, 41):
        model = randomize(DiT(tiny_model.cfg, vocab_size=vocab))
        engine = Engine(model)
        x = torch.randint(0, vocab - 1, (1, 16), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            want = model(x)[:, 5]
        select = torch.zeros(1, 16, dtype=torch.bool)
        select[0, 5] = True
        got = engine(x, select=select)
        assert got.shape == (1, vocab)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_scripted_backbone_is_the_python_one_bit_for_bit(tiny_model, monkeypatch):
    """The engine runs backbone.layers compiled by TorchScript, and as Python where
    TorchScript fails: the same logits and cache contents, bit for bit, for every linear kind
    this torch runs, with a cache, a folding mask (bool, made additive) and a subset of queries."""
    from bd3.sampling import backbone
    from bd3.sampling.engine import fp16_weights_supported

    assert backbone.scripted() is not None, "TorchScript could not compile backbone.layers"
    x = torch.randint(0, MASK, (2, 16), generator=torch.Generator().manual_seed(5))
    fold = torch.ones(8, 16, dtype=torch.bool)
    fold[:4, 8:] = False  # rows 0-3 (clean) do not see rows 4-7 (noisy)
    select = torch.zeros(2, 8, dtype=torch.bool)
    select[0, 5] = select[1, 2] = True
    # (precision, oneDNN): without oneDNN the engine's float32 linears are addmm
    cases = [("fp32", True), ("fp32", False), ("bf16", True)] + ([("fp16", True)] if fp16_weights_supported("cpu") else [])

    def run(precision: str, onednn: bool) -> tuple[str, tuple[torch.Tensor, ...]]:
        with monkeypatch.context() as m:
            if not onednn:
                m.setattr(torch.backends.mkldnn, "is_available", lambda: False)  # a torch built without oneDNN
            engine = Engine(tiny_model, precision, threads=torch.get_num_threads())
        cache = engine.new_kv_cache(2)
        first = engine(x[:, :8], kv_cache=cache)
        cache.commit(8)
        second = engine(x[:, 8:], positions=8, kv_cache=cache, attn_mask=fold, select=select)
        return engine.kind, (first, second, cache.k, cache.v)

    scripted = [run(*case) for case in cases]
    assert "addmm" in {kind for kind, _ in scripted}

    def no_torchscript(fn):
        raise RuntimeError("TorchScript is not available")

    with monkeypatch.context() as m:
        m.setattr(torch.jit, "script", no_torchscript)
        backbone.scripted.cache_clear()
        assert backbone.scripted() is None
        python = [run(*case) for case in cases]
    backbone.scripted.cache_clear()  # compiled again at its next use
    for case, (kind, a), (kind_python, b) in zip(cases, scripted, python):
        assert kind == kind_python
        for u, v in zip(a, b):
            assert torch.equal(u, v), f"{case} {kind}"


@pytest.mark.parametrize("rows", [1, 3, 16, 40])
def test_linear_kinds_equal_addmm(rows):
    """The engine's oneDNN-packed linear (where torch has it) against plain addmm, with the
    fused GELU and residual: float32 rounding apart, equal; bf16 to bf16 rounding; float16
    weights (FBGEMM) to float16 rounding of the weights."""
    from bd3.sampling.engine import Linear, _onednn, fp16_weights_supported

    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(24, 8, generator=g), torch.randn(24, generator=g)
    x, res = torch.randn(rows, 8, generator=g), torch.randn(rows, 24, generator=g)
    want = {"plain": x @ w.t() + b, "gelu": torch.nn.functional.gelu(x @ w.t() + b, approximate="tanh"), "residual": res + x @ w.t() + b}
    cpu = torch.device("cpu")
    cases = [(torch.float32, "addmm", 1e-5), (torch.bfloat16, "addmm", 0.1)]
    cases += [(dt, "onednn", tol) for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.1)) if _onednn(cpu, dt)]
    cases += [(torch.float32, "fp16", 0.02)] if fp16_weights_supported(cpu) else []
    for dtype, kind, tol in cases:
        lin = Linear(w.to(dtype), b.to(dtype), kind)
        xd = x.to(dtype)
        got = {"plain": lin(xd), "gelu": lin(xd, gelu=True), "residual": lin(xd, residual=res)}
        assert got["residual"].dtype == torch.float32  # a float32 residual stays float32
        for k in want:
            torch.testing.assert_close(got[k].float(), want[k], atol=tol, rtol=tol / 10, msg=f"{dtype} {kind} {k}")


@pytest.mark.parametrize("precision,tol", [("bf16", 0.015), ("fp16", 1e-3)])
def test_reduced_precision_engine(tiny_model, precision, tol):
    """bf16: the logits of the model under bf16 autocast, to bf16 rounding; fp16 (float16
    weights, float32 products): the float32 logits to ~2.5e-4 of their scale. Cached ==
    recomputed holds to the same tolerance."""
    from bd3.sampling.engine import fp16_weights_supported

    if precision == "fp16" and not fp16_weights_supported("cpu"):
        pytest.skip("this torch has no FBGEMM (precision fp16 is x86 only)")
    engine = Engine(tiny_model, precision)
    assert engine.new_kv_cache(1).k.dtype == torch.float32  # attention in float32
    x = torch.randint(0, MASK, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        exact = tiny_model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = tiny_model(x).float()
    got = engine(x)
    assert got.dtype == torch.float32
    scale = exact.abs().max()
    assert (got - exact).abs().max() > 1e-6 * scale  # the reduced precision is really used
    torch.testing.assert_close(got, exact, atol=tol * scale, rtol=0)
    if precision == "bf16":
        assert (auto - exact).abs().max() > 1e-3 * scale  # bf16 really changes the numbers at this size
        torch.testing.assert_close(got, auto, atol=tol * scale, rtol=0)
    one = torch.zeros(1, 16, dtype=torch.bool)
    one[0, 5] = True  # one row: the single-row output layer
    torch.testing.assert_close(engine(x[:1], select=one), exact[:1, 5], atol=tol * scale, rtol=0)
    B, L, bs = 2, 16, 4
    cached = ModelDenoiser(engine, block_size=bs, context=L - bs, kv_cache=True)
    uncached = ModelDenoiser(engine, block_size=bs, context=L - bs, kv_cache=False)
    rows, pos = torch.arange(B).repeat_interleave(bs), torch.arange(bs).repeat(B)
    for s in range(0, L, bs):
        noisy = x[:, s : s + bs].clone()
        noisy[:, 1::2] = MASK
        torch.testing.assert_close(cached(noisy, s, rows, pos), uncached(noisy, s, rows, pos), atol=tol * scale, rtol=0)
        cached.commit(x[:, s : s + bs], s)
        uncached.commit(x[:, s : s + bs], s)
    with pytest.raises(ValueError, match="precision"):
        Engine(tiny_model, "fp8")


def test_engine_ar_cache_equals_causal_pass():
    model = randomize(DiT(ModelConfig(hidden_dim=32, n_heads=2, n_layers=2, cond_dim=16, length=16, causal=True), V))
    engine = Engine(model)
    x = torch.randint(0, MASK, (2, 12))
    cache = engine.new_kv_cache(2)
    steps = [engine(x[:, :5], kv_cache=cache, attn_mask=torch.ones(5, 5, dtype=torch.bool).tril())]
    cache.commit(5)
    for i in range(5, 12):
        steps.append(engine(x[:, i : i + 1], positions=i, kv_cache=cache))
        cache.commit(1)
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(torch.cat(steps, 1), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(engine(x), want, atol=1e-5, rtol=0)  # no mask, no cache: causal, as the DiT
    select = torch.zeros(2, 12, dtype=torch.bool)
    select[0, [3, 11]] = select[1, [0, 5]] = True
    torch.testing.assert_close(engine(x, select=select), want[select], atol=1e-5, rtol=0)


def test_kv_cache_select_and_sliding_window():
    cache = KVCache(1, 3, 1, 4, capacity=6)
    k = torch.arange(3 * 5, dtype=torch.float32).reshape(1, 3, 1, 5, 1).expand(1, 3, 1, 5, 4)
    cache.update(0, k[0], k[0])
    cache.commit(5)
    assert cache.make_room(3) == 2 and cache.length == 3
    torch.testing.assert_close(cache.k[0, :, 0, :3, 0], k[0, :, 0, 2:, 0])  # the oldest two dropped
    cache.select(torch.tensor([2, 0]))
    assert cache.batch == 2 and torch.equal(cache.k[0, :, 0, :3, 0], k[0, [2, 0], 0, 2:, 0])
    with pytest.raises(ValueError, match="overflow"):
        cache.update(0, torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4))


# -- the rules ------------------------------------------------------------------------


def test_nucleus_keeps_the_crossing_token_and_ties():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.3, 0.3]], dtype=torch.float64)
    torch.testing.assert_close(nucleus(p, 0.6), torch.tensor([[0.625, 0.375, 0.0], [0.4, 0.3, 0.3]], dtype=torch.float64))
    torch.testing.assert_close(nucleus(p, 0.0), torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64))
    assert kept(p, torch.tensor([1, 2]), 0.5).tolist() == [False, True]  # ties with the crossing token stay
    assert kept(p, torch.tensor([1, 2]), 0.6).tolist() == [True, True]
    assert kept(p, torch.tensor([2, 2]), 0.6).tolist() == [False, True]
    for top_p, tokens in ((0.5, [1, 2]), (0.6, [1, 2]), (0.6, [2, 2]), (0.9, [0, 1])):  # one row alone: its own path
        rows = [kept(p[r : r + 1], torch.tensor(tokens[r : r + 1]), top_p).item() for r in range(2)]
        assert rows == kept(p, torch.tensor(tokens), top_p).tolist()


@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.5, 0.05])
def test_draw_samples_the_nucleus_distribution(top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, 3.0]])
    w = subs_weights(logits, mask_id=6)  # the largest logit is the mask token: never drawn
    n = 20000
    tokens = draw(w.expand(n, -1), torch.rand(n, generator=g, dtype=torch.float64), top_p,
                  lambda idx: torch.rand(len(idx), generator=g, dtype=torch.float64))
    freq = torch.bincount(tokens, minlength=7).double() / n
    want = nucleus(w, top_p)[0]
    assert freq[6] == 0 and (freq[want == 0] == 0).all()
    torch.testing.assert_close(freq, want, atol=0.015, rtol=0)


def test_temperature_and_greedy():
    logits = torch.tensor([[1.0, 2.0, 0.0]])
    w = subs_weights(logits, mask_id=2, temperature=0.5)
    torch.testing.assert_close(w.double() / w.sum(), torch.softmax(torch.tensor([[2.0, 4.0, -torch.inf]], dtype=torch.float64), -1))
    u = torch.rand(100, dtype=torch.float64)
    assert (draw(w.expand(100, -1), u, 0.0, lambda idx: torch.rand(len(idx), dtype=torch.float64)) == 1).all()


def test_row_rng_is_per_sample():
    a = RowRNG.for_samples(3, [0, 1, 2]).uniform(4)
    b = RowRNG.for_samples(3, [2]).uniform(4)
    assert torch.equal(a[2], b[0]) and not torch.equal(a[0], a[1])
    assert not torch.equal(RowRNG.for_samples(4, [2]).uniform(4), b)


# -- update rules, pinned with mock denoisers -------------------------------------------


class Mock:
    """A denoiser that records every call and follows which rows are still in the batch.
    Its logits put almost all mass on ``token(sample, absolute position)``."""

    def __init__(self, batch, token=lambda i, p: 1 + (p % 30), confident=lambda i, p: True, vocab=V):
        self.ids, self.vocab = list(range(batch)), vocab
        self.token, self.confident = token, confident
        self.calls, self.commits = [], []

    def __call__(self, block, start, rows, pos):
        self.calls.append((block.clone(), start, rows.clone(), pos.clone(), list(self.ids)))
        logits = torch.zeros(len(rows), self.vocab)
        for n, (r, p) in enumerate(zip(rows.tolist(), pos.tolist())):
            logits[n, self.token(self.ids[r], start + p)] = 30.0 if self.confident(self.ids[r], start + p) else 1.0
        return logits

    def commit(self, tokens, start):
        self.commits.append((start, tokens.shape[1]))

    def select(self, rows):
        self.ids = [self.ids[r] for r in rows.tolist()]


def test_first_hitting_unmasks_exactly_one_position_per_row_per_call():
    mock = Mock(3)
    out = sample_blocks(mock, batch=3, max_tokens=14, block_size=4, seed=0, **KW)
    assert [s.tokens for s in out] == [[BOS] + [1 + p for p in range(1, 14)]] * 3
    assert all(s.nfe == 13 and s.stop == "length" for s in out)
    for (block, start, rows, pos, _), nxt in zip(mock.calls, mock.calls[1:] + [None]):
        assert rows.tolist() == sorted(set(rows.tolist()))  # one position per row
        assert (block[rows, pos] == MASK).all()
        if nxt is not None and nxt[1] == start:
            changed = (nxt[0] != block).nonzero().tolist()
            assert changed == [[r, p] for r, p in zip(rows.tolist(), pos.tolist())]
    assert len(mock.calls) == 4 * 4 - 1 - 2  # BOS given, the last block has 2 positions (14 tokens)
    assert mock.commits == [(0, 4), (4, 4), (8, 4)]  # the last block is never committed


def test_first_hitting_order_is_uniform_per_row():
    first = torch.zeros(4)
    for seed in range(400):
        mock = Mock(1)
        sample_blocks(mock, batch=1, max_tokens=8, block_size=4, seed=seed, **KW)
        first[mock.calls[3][3][0]] += 1  # the first position chosen in the second block
    assert (first / 400 - 0.25).abs().max() < 0.07


@pytest.mark.parametrize("steps", [1, 2, 4, 100])
def test_ddpm_unmasks_on_the_grid_and_wastes_no_call(steps):
    """Position j unmasks at step floor(u_j * T) (uniform: the grid t_i = 1 - i/T with
    P(unmask) = 1 - s/t); a call happens exactly at the steps where something unmasks,
    and the last step finishes the block."""
    W = 8
    mock = Mock(1)
    out = sample_blocks(mock, batch=1, max_tokens=16, block_size=W, seed=5, rule="ddpm", steps=steps, top_p=1.0, **KW)
    assert out[0].tokens == [BOS] + [1 + p for p in range(1, 16)]
    u = RowRNG.for_samples(5, [0])
    expected = []
    for b in range(2):
        step = (u.uniform(2 * W)[0, :W] * steps).long().clamp(max=steps - 1)
        todo = torch.arange(W) >= (1 if b == 0 else 0)
        for i in sorted(set(step[todo].tolist())):
            expected.append([b * W + p for p in range(W) if todo[p] and step[p] == i])
    got = [[start + p for p in pos.tolist()] for _, start, _, pos, _ in mock.calls]
    assert got == expected
    assert out[0].nfe == len(expected) <= 2 * steps
    if steps == 1:
        assert len(mock.calls) == 2  # one call per block unmasks everything


def expected_calls(rule: str, block: int, steps: int | None = None) -> float:
    """Expected model calls to denoise one block of ``block`` masked positions at batch 1:
    ``block`` for first-hitting, the expected number of distinct steps for ddpm."""
    if rule == "ddpm":
        T = steps or block
        return T * (1 - (1 - 1 / T) ** block)
    return float(block)


def test_ddpm_expected_calls():
    counts = []
    for seed in range(200):
        mock = Mock(1)
        sample_blocks(mock, batch=1, max_tokens=17, block_size=16, seed=seed, rule="ddpm", **KW)
        counts.append(len(mock.calls) - 1)  # the second block has one position
    assert abs(sum(counts) / len(counts) - expected_calls("ddpm", 15, 16)) < 0.5


def test_threshold_unmasks_every_confident_position_and_at_least_one():
    mock = Mock(2, confident=lambda i, p: p % 2 == 0)  # confident at even positions only
    out = sample_blocks(mock, batch=2, max_tokens=16, block_size=8, seed=0, rule="threshold", threshold=0.9, top_p=0.0, **KW)
    assert out[0].tokens == [BOS] + [1 + p for p in range(1, 16)]
    first_calls = [c for c in mock.calls if c[1] == 8]
    pos = first_calls[0][3]
    assert sorted(set(pos.tolist())) == list(range(8))  # the logits of every masked position
    # call 1 unmasks the 4 confident positions of each row, then one per call
    assert len(first_calls) == 1 + 4
    assert [p[r == 0].tolist() for _, _, r, p, _ in first_calls[1:]] == [[1, 3, 5, 7], [3, 5, 7], [5, 7], [7]]  # ties: the first
    assert out[0].nfe == (1 + 4) + (1 + 4)


def test_rows_stop_at_their_own_eos_and_leave_the_batch():
    ends = {0: 5, 1: 9, 2: None, 3: 2}
    mock = Mock(4, token=lambda i, p: EOS if p == ends[i] else 1 + p % 30)
    out = sample_blocks(mock, batch=4, max_tokens=16, block_size=4, seed=0, eos_id=EOS, stop="eos", **KW)
    for s in out:
        e = ends[s.index]
        if e is None:
            assert s.stop == "length" and len(s.tokens) == 16
        else:
            assert s.stop == "eos" and len(s.tokens) == e + 1 and s.tokens[-1] == EOS and EOS not in s.tokens[1:-1]
            assert s.nfe < 15
    batches = [len(ids) for *_, ids in mock.calls]
    assert batches[0] == 4 and batches[-1] == 1  # stopped rows cost nothing more
    # once sample 3 drew its EOS (position 2), it no longer asks for the positions after it
    asked = [(k, p) for k, (_, start, rows, pos, ids) in enumerate(mock.calls) if start == 0
             for r, p in zip(rows.tolist(), pos.tolist()) if ids[r] == 3]
    k_eos = next(k for k, p in asked if p == 2)
    assert all(p < 2 for k, p in asked if k > k_eos)


def test_entropy_stop():
    assert unigram_entropy(torch.tensor([1, 1, 2, 2])) == pytest.approx(0.6931, abs=1e-4)
    assert low_entropy(torch.zeros(300, dtype=torch.long), 300) and not low_entropy(torch.arange(300), 300)
    assert not low_entropy(torch.zeros(300, dtype=torch.long), 256)  # needs more than 256 tokens
    mock = Mock(2, token=lambda i, p: 5 if i == 0 else 1 + p % 290, vocab=300)
    out = sample_blocks(mock, batch=2, max_tokens=400, block_size=16, seed=0, stop="entropy", mask_id=299, length=32)
    # stopped at the first block end past 256 tokens (272), and the low-entropy 256 cut off
    assert out[0].stop == "entropy" and len(out[0].tokens) == 16 and out[0].tokens[1:] == [5] * 15
    assert out[1].stop == "length" and len(out[1].tokens) == 400


# -- the real model: determinism, batch independence, prompts, lengths ----------------


@pytest.mark.parametrize("rule", ["first-hitting", "ddpm", "threshold"])
def test_same_seed_same_text_and_rows_independent_of_their_batch(tiny_model, rule):
    kw = dict(max_tokens=24, block_size=4, rule=rule, eos_id=7, stop="eos", threshold=0.3, **KW)
    together = block_samples(tiny_model, samples=[0, 1, 2, 3], seed=9, **kw)
    assert [s.tokens for s in together] == [s.tokens for s in block_samples(tiny_model, samples=[0, 1, 2, 3], seed=9, **kw)]
    for s in together:
        alone = block_samples(tiny_model, samples=[s.index], seed=9, **kw)[0]
        assert (alone.tokens, alone.stop, alone.nfe) == (s.tokens, s.stop, s.nfe)
    assert len({tuple(s.tokens) for s in together}) == 4
    assert [s.tokens for s in block_samples(tiny_model, samples=[0, 1, 2, 3], seed=10, **kw)] != [s.tokens for s in together]


def test_cache_and_recompute_give_the_same_text(tiny_model):
    kw = dict(batch=2, max_tokens=16, block_size=4, seed=5, prompt=[BOS, 3, 4, 5, 6, 7], **KW)
    a = block_samples(tiny_model, kv_cache=True, **kw)
    b = block_samples(tiny_model, kv_cache=False, **kw)
    c = block_samples(tiny_model, kv_cache=True, engine=False, **kw)
    assert [s.tokens for s in a] == [s.tokens for s in b] == [s.tokens for s in c]


def test_prompt_is_continued(tiny_model):
    prompt = [BOS, 3, 4, 5, 6, 7, 8, 9, 10, 11]  # two whole blocks of 4, then 2 tokens into the third
    out = block_samples(tiny_model, batch=2, max_tokens=16, block_size=4, seed=0, prompt=prompt, **KW)
    for s in out:
        assert s.tokens[:10] == prompt and len(s.tokens) == 16 and MASK not in s.tokens
        assert s.prompt_tokens == 10 and s.new_tokens == 6 and s.nfe == 6
    with pytest.raises(ValueError, match="shorter than the model's context"):
        block_samples(tiny_model, batch=1, max_tokens=40, block_size=4, prompt=list(range(16)), **KW)


def test_slides_past_the_model_length_and_streams(tiny_model):
    events = []
    out = block_samples(tiny_model, batch=2, max_tokens=42, block_size=4, seed=0, on_block=events.append, **KW)
    assert all(len(s.tokens) == 42 and MASK not in s.tokens for s in out)
    assert [len(e.new_tokens[0]) for e in events] == [3] + [4] * 9 + [2]
    assert [BOS] + [t for e in events for t in e.new_tokens[1]] == out[1].tokens
    assert [s.index for s in events[-1].finished] == [0, 1]


def test_mdlm_whole_context_then_stride(tiny_model):
    den = ModelDenoiser(tiny_model, block_size=8, context=8, kv_cache=False, attention="full")
    x = torch.randint(0, MASK, (2, 16))
    rows, pos = torch.tensor([0, 1]), torch.tensor([3, 12])
    with torch.no_grad():
        want = tiny_model(x)[rows, pos]
    torch.testing.assert_close(den(x, 0, rows, pos), want, atol=1e-5, rtol=0)  # full attention, no mask
    out = block_samples(tiny_model, batch=2, max_tokens=30, block_size=8, mdlm=True, seed=0, **KW)
    assert all(len(s.tokens) == 30 and MASK not in s.tokens and s.nfe == 29 for s in out)


def test_ar_sampler(tiny_cfg):
    model = randomize(DiT(ModelConfig(**{**tiny_cfg.__dict__, "causal": True}), V))
    kw = dict(max_tokens=40, prompt=[BOS, 3, 4], eos_id=7, stop="eos", seed=2, **KW)
    fast = ar_samples(model, samples=[0, 1, 2], **kw)
    slow = ar_samples(model, samples=[0, 1, 2], engine=False, **kw)
    assert [s.tokens for s in fast] == [s.tokens for s in slow]
    for s in fast:
        assert s.tokens[:3] == [BOS, 3, 4] and s.nfe == len(s.tokens) - 3
        assert (s.stop == "eos" and s.tokens[-1] == 7 and 7 not in s.tokens[3:-1]) or (s.stop == "length" and len(s.tokens) == 40)
    assert [s.tokens for s in ar_samples(model, samples=[1], **kw)] == [fast[1].tokens]


def test_decoding_validates():
    with pytest.raises(ValueError, match="update rule"):
        Decoding(rule="greedy")
    with pytest.raises(ValueError, match="stop"):
        Decoding(stop="never")


# -- text ---------------------------------------------------------------------------------


class Tok:
    bos_id = eos_id = 0

    def decode(self, ids):
        return "".join(chr(96 + i) if i < 27 else " " for i in ids)


def test_text_stream_matches_render():
    ids = [0, 1, 2, 30, 3, 0, 4, 5, 30, 0, 6]
    out = io.StringIO()
    stream = TextStream(Tok(), out, ids[:2])
    for i in range(2, len(ids), 3):
        stream.feed(ids[i : i + 3])
    stream.finish()
    assert out.getvalue() == render(ids, Tok()) + "\n" == "ab c\n\nde\n\nf\n"


def test_text_stream_holds_back_what_the_entropy_stop_may_cut():
    out = io.StringIO()
    stream = TextStream(Tok(), out, [0], holdback=3)
    stream.feed([1, 2, 3, 4])
    assert out.getvalue() == "a"
    stream.feed([5, 6])
    assert out.getvalue() == "abc"
    stream.finish(5)  # the sample kept BOS + 4 tokens: "e" and "f" are never shown
    assert out.getvalue() == "abcd\n"


def test_text_stream_of_a_long_sample_decodes_a_bounded_tail(monkeypatch):
    """Long samples stream at a constant cost per block (only the live tail is decoded) and
    print exactly the text of the whole sample, with multi-byte characters cut by the tail."""
    import random

    from bd3.data.tokenizer import load_tokenizer

    tok = load_tokenizer("bpe")
    longest = [0]
    real = tok.decode

    def decode(ids):
        longest[0] = max(longest[0], len(ids))
        return real(ids)

    monkeypatch.setattr(tok, "decode", decode)
    rng = random.Random(0)
    for settle in (3, TextStream.SETTLE):
        monkeypatch.setattr(TextStream, "SETTLE", settle)
        ids = [tok.bos_id] + [tok.eos_id if rng.random() < 1e-3 else rng.randrange(tok.vocab_size) for _ in range(6000)]
        out = io.StringIO()
        stream = TextStream(tok, out, ids[:1])
        longest[0] = 0
        for k in range(1, len(ids), 16):
            stream.feed(ids[k : k + 16])
        stream.finish()
        assert longest[0] <= 2 * settle + 16 + 1
        assert out.getvalue() == render(ids, tok) + "\n"


def test_writer_streams_samples_in_order():
    from bd3.sampling.types import BlockEvent, Sample

    out = io.StringIO()
    w = SampleWriter(Tok(), out, "text", 2, [0])
    w.on_block(BlockEvent([0, 1], [[1, 2], [3, 4]]))
    assert out.getvalue() == "ab"  # sample 1 waits
    w.on_block(BlockEvent([0, 1], [[], [5]], [Sample(1, [0, 3, 4, 5], 1)]))
    w.on_block(BlockEvent([0], [[6]], [Sample(0, [0, 1, 2, 6], 1)]))
    assert out.getvalue().split("=" * 80) == ["abf\n\n", "\n\ncde\n"]


# -- bd3 sample ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny random-weight runs (bd3lm, ar, mdlm) with the shipped BPE tokenizer."""
    root = tmp_path_factory.mktemp("sample-runs")
    tok = load_tokenizer("bpe")
    data = DataConfig(data="web", tokenizer="bpe", tokenizer_sha256=tok.sha256, **tok.special_ids())
    out = {}
    for algo in ("bd3lm", "ar", "mdlm"):
        cfg = RunConfig(
            model=ModelConfig(hidden_dim=32, n_heads=2, n_layers=2, cond_dim=16, length=32, causal=algo == "ar"),
            diffusion=DiffusionConfig(algo=algo, block_size=8),
            data=data,
            train=TrainConfig(steps=1),
        )
        run = Run.create(root / "runs" / algo, cfg, tok.to_json())
        sd = randomize(DiT(cfg.model, data.vocab_size), seed=3).state_dict()
        run.save_checkpoint(1, sd, sd, {}, {})
        out[algo] = run.path
    return out


def bd3(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_jsonl_prompt_and_summary(runs, capsys):
    code, out, err = bd3(capsys, "sample", runs["bd3lm"], "--prompt", "In the beginning", "--max-tokens", 40,
                         "--num-samples", 3, "--batch-size", 2, "--format", "jsonl", "--device", "cpu")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    tok = load_tokenizer("bpe")
    prompt = [tok.bos_id] + tok.encode("In the beginning")
    assert [r["sample"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert r["tokens"][: len(prompt)] == prompt and len(r["tokens"]) == 40 and r["stop"] == "length"
        assert r["prompt_tokens"] == len(prompt) and r["nfe"] == r["new_tokens"] == 40 - len(prompt)
        assert r["text"].startswith("In the beginning") and r["seconds"] > 0
    assert "3 sample(s)" in err and "tokens/s" in err and "model calls per token" in err
    code, again, _ = bd3(capsys, "sample", runs["bd3lm"], "--prompt", "In the beginning", "--max-tokens", 40,
                         "--num-samples", 3, "--batch-size", 1, "--format", "jsonl", "--device", "cpu")
    def strip(text):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in text.splitlines()]
    assert strip(again) == strip(out)  # a sample does not depend on its batch


def test_cli_text_streams_every_sample(runs, capsys):
    code, out, err = bd3(capsys, "sample", runs["bd3lm"], "--max-tokens", 50, "--num-samples", 3, "--device", "cpu",
                         "--sampler", "ddpm", "--denoise-steps", 4, "--stop", "both")
    assert code == 0, err
    assert out.count("=" * 80) == 2 and out.endswith("\n") and "ddpm" in err
    code, same, _ = bd3(capsys, "sample", runs["bd3lm"], "--max-tokens", 50, "--num-samples", 3, "--batch-size", 1,
                        "--device", "cpu", "--denoise-steps", 4, "--stop", "both")
    assert same == out


@pytest.mark.parametrize("algo", ["ar", "mdlm"])
def test_cli_ar_and_mdlm_runs(runs, capsys, algo):
    code, out, err = bd3(capsys, "sample", runs[algo], "--max-tokens", 70, "--num-samples", 2, "--format", "jsonl",
                         "--prompt", "The", "--device", "cpu")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert all(len(r["tokens"]) == 70 and r["nfe"] == r["new_tokens"] for r in rows)
    assert ("token by token" if algo == "ar" else "block 32") in err


@pytest.mark.parametrize("algo", ["bd3lm", "ar", "mdlm"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cli_reduced_precision_sampling(runs, capsys, monkeypatch, algo, precision):
    """--precision bf16 / fp16 reach the engine for every kind of run and sample whole
    outputs (their numerics: test_reduced_precision_engine)."""
    import bd3.sampling.engine as engine
    from bd3.sampling.engine import fp16_weights_supported

    if precision == "fp16" and not fp16_weights_supported("cpu"):
        pytest.skip("this torch has no FBGEMM (precision fp16 is x86 only)")
    built = []
    monkeypatch.setattr(engine, "Engine", lambda model, precision, **kw: built.append(precision) or Engine(model, precision, **kw))
    code, out, err = bd3(capsys, "sample", runs[algo], "--max-tokens", 40, "--num-samples", 2, "--format", "jsonl",
                         "--device", "cpu", "--precision", precision)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert built == [precision] and [len(r["tokens"]) for r in rows] == [40, 40]
    assert f", {precision}; stops" in err  # the summary names it


def test_sampling_precision_auto(monkeypatch):
    from bd3.errors import Bd3Error
    from bd3.runtime import resolve_precision
    from bd3.sampling import engine

    cpu = torch.device("cpu")
    monkeypatch.setattr(engine, "fp16_weights_supported", lambda device: True)
    assert engine.sampling_precision("auto", cpu) == "fp16" and engine.sampling_precision("fp32", cpu) == "fp32"
    monkeypatch.setattr(engine, "fp16_weights_supported", lambda device: False)
    assert engine.sampling_precision("auto", cpu) == resolve_precision("auto", cpu)  # bf16 where native, else fp32
    assert engine.sampling_precision("bf16", cpu) == "bf16"
    with pytest.raises(Bd3Error, match="FBGEMM"):
        engine.sampling_precision("fp16", cpu)


def test_cli_default_precision_is_auto(runs, capsys, monkeypatch):
    import bd3.sampling.engine as engine
    from bd3.sampling.engine import sampling_precision

    built = []
    monkeypatch.setattr(engine, "Engine", lambda model, precision, **kw: built.append(precision) or Engine(model, precision, **kw))
    code, _, err = bd3(capsys, "sample", runs["bd3lm"], "--max-tokens", 20, "--device", "cpu")
    assert code == 0 and built == [sampling_precision("auto", torch.device("cpu"))], err


def test_cli_fp16_where_it_cannot_run(runs, capsys, monkeypatch):
    monkeypatch.setattr("bd3.sampling.engine.fp16_weights_supported", lambda device: False)
    code, out, err = bd3(capsys, "sample", runs["bd3lm"], "--device", "cpu", "--precision", "fp16")
    assert code == 1 and out == "" and "FBGEMM" in err and "fp32 or bf16" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args,code,needle",
    [
        (["--denoise-steps", "4", "--threshold", "0.5"], 2, "--threshold"),
        (["--sampler", "first-hitting", "--denoise-steps", "4"], 2, "--denoise-steps"),
        (["--sampler", "greedy"], 2, "--sampler"),
        (["--stop", "never"], 2, "--stop"),
        (["--format", "xml"], 2, "--format"),
        (["--prompt", "a", "--prompt-file", "p.txt"], 2, "--prompt-file"),
        (["--prompt-file", "missing.txt"], 1, "missing.txt"),
        (["--prompt", "word " * 40], 1, "shorter than the model's context"),
        (["--prompt", "one two three", "--max-tokens", "3"], 2, "--max-tokens"),
        (["--block-size", "5"], 2, "divide"),
        (["--precision", "fp8"], 2, "--precision"),
    ],
)
def test_cli_bad_options_are_one_line(runs, capsys, args, code, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    got, _, err = bd3(capsys, "sample", runs["bd3lm"], "--device", "cpu", *args)
    assert got == code and needle in err and err.startswith("Error:") and "Traceback" not in err


def test_cli_options_that_do_not_apply(runs, capsys):
    code, _, err = bd3(capsys, "sample", runs["ar"], "--denoise-steps", "4")
    assert code == 2 and "ar run" in err
    code, _, err = bd3(capsys, "sample", runs["mdlm"], "--block-size", "4")
    assert code == 2 and "mdlm run" in err


def test_cli_closed_pipe_exits_quietly(runs):
    """`bd3 sample ... | head -c 10`: the reader leaves, bd3 ends with code 0 and says nothing."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = f"{sys.executable} -m bd3 sample {runs['bd3lm']} --max-tokens 3000 --device cpu 2>err.txt | head -c 10; echo \"rc=${{PIPESTATUS[0]}}\""
    res = subprocess.run(["bash", "-c", cmd], check=False, capture_output=True, text=True, env=env, cwd=runs["bd3lm"].parent, timeout=120)
    out, rc = res.stdout.rsplit("rc=", 1)
    err = (runs["bd3lm"].parent / "err.txt").read_text()
    assert rc.strip() == "0" and len(out.encode()) <= 10 and err == "", err


def test_thread_tuner_keeps_the_faster_setting_and_backs_off_when_busy():
    from bd3.sampling.threads import ThreadTuner

    class FakeLoad:
        cores, busy = 2, 0.0

        def others(self):
            return self.busy

    before = torch.get_num_threads()
    fixed = ThreadTuner(1)
    with fixed.call():
        assert torch.get_num_threads() == 1
    torch.set_num_threads(before)
    t = ThreadTuner(None, "cpu")
    from collections import deque

    t.max, t.fixed, t.active, t.load, t.times = 2, None, 1, FakeLoad(), {1: deque(maxlen=8), 2: deque(maxlen=8)}
    t.load.busy, t.next_check = 1.0, 0.0
    assert t._threads() == 1 and t.active == 1  # the first look finds the other core busy: one thread
    t.load.busy, t.checked, t.next_check = 0.0, False, 0.0
    assert t._threads() == 2 and t.active == 2 and t.switches == 1  # free at the first look: both threads at once
    t.active, t.switches = 1, 0  # from one thread, the measuring:
    t.next_probe = t.next_check = 0.0
    for _ in range(3):
        t._record(1, 0.010)
    assert t._threads() == 2 and t.probing == []  # a probe with two threads
    t._record(2, 0.020)  # its first call wakes the thread pool: not compared
    for _ in range(3):
        t._record(2, 0.005)
    assert t.active == 2 and t.probing is None and t.switches == 1
    t.next_probe = 0.0
    assert t._threads() == 1  # probing one thread again later
    t._record(1, 0.050)  # the first call, 10x slower: the probe stops at once and the next waits
    assert t.active == 2 and t.probing is None and t.next_probe > 0
    t.load.busy, t.next_check = 1.0, 0.0  # another process took the other core
    assert t._threads() == 1 and t.active == 1
    for _ in range(3):
        t._record(1, 0.010)
    t._record(1, 0.100)  # a call slowed down by the busy machine...
    assert t.next_probe == 0.0 and t._threads() == 1 and t.probing is None  # ...does not send it to more threads
    t.load.busy, t.next_check = 0.0, 0.0  # the other core is free again: a probe with two threads
    assert t._threads() == 2 and t.probing == []
    t._record(2, 0.300)  # its untimed first call is 30x slower (the core got busy again): lost at once
    assert t.active == 1 and t.probing is None and t.next_probe > 0 and t.wait == 30.0
    torch.set_num_threads(before)
