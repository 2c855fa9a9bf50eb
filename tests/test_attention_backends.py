"""Attention backends: every backend's mask, materialised, is the dense block-diffusion mask
(training, sampling with and without a KV cache); FlexAttention runs on the CPU (eager,
forward only) and equals SDPA; xformers' biases materialise where xformers is installed;
GPU outputs are compared with SDPA where CUDA is present; --attn and --compile reach the
model."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from bd3.config import DiffusionConfig
from bd3.diffusion.masks import block_causal_mask, block_diff_mask
from bd3.diffusion.objective import denoiser_hidden
from bd3.errors import Bd3Error
from bd3.model import backends
from bd3.model.backends import (
    block_mask_dense,
    dense_of,
    describe,
    flex_block_mask,
    resolve_attn,
    tensor_bias,
)
from bd3.runtime import configure_model
from bd3.sampling.denoiser import ModelDenoiser
from tests.conftest import randomize

flex_attention = pytest.importorskip("torch.nn.attention.flex_attention").flex_attention
HAS_XFORMERS = backends.xformers_available()
CUDA = torch.cuda.is_available()
GRID = [(L, bs) for L in (8, 24, 64) for bs in sorted({1, 2, 4, 8, L}) if L % bs == 0]


def fold_mask(cached: int, pending: int, width: int, block_size: int) -> torch.Tensor:
    """The sampler's own cached-pass mask (ModelDenoiser._fold_mask), as it builds it."""
    return ModelDenoiser._fold_mask(types.SimpleNamespace(block_size=block_size, _masks={}), cached, pending, width, "cpu")


def sampler_masks(L: int, bs: int) -> list[tuple[str, torch.Tensor]]:
    """Block-causal over [context ; block] (no cache), and the cached pass with pending clean
    blocks (a prompt, or the last block) against cached keys."""
    out = [("block_causal", block_causal_mask(L, bs)), ("block_causal", block_causal_mask(L + bs, bs))]
    for cached, pending in ((0, bs), (bs, bs), (L - 2 * bs, 2 * bs), (3, bs)):
        if cached >= 0 and pending + bs <= L + bs:
            out.append(("cached", fold_mask(cached, pending, bs, bs)))
    return out


@pytest.mark.parametrize("L,bs", GRID)
def test_mask_functions_are_the_dense_masks(L, bs):
    """Each dense mask is recognised as the mask function it came from, which reproduces it."""
    for kind, mask in [("block_diff", block_diff_mask(L, bs)), *sampler_masks(L, bs)]:
        d = describe(mask)
        assert d.kind == kind or (kind == "cached" and d.kind == "block_causal")  # no cache yet: it is block-causal
        assert torch.equal(dense_of(d.mod, *mask.shape), mask)
    other = torch.rand(L, L + 3, generator=torch.Generator().manual_seed(L)) > 0.5
    d = describe(other)
    assert d.kind == "dense" and torch.equal(dense_of(d.mod, *other.shape), other)


@pytest.mark.parametrize("L,bs", GRID)
@pytest.mark.parametrize("tile", [8, backends.FLEX_TILE])
def test_flex_block_masks_materialise_to_the_dense_masks(L, bs, tile):
    """What FlexAttention computes (full tiles, and partial tiles through the mask function;
    forward and backward tile lists) is the dense mask, for every query prefix used."""
    train = block_diff_mask(L, bs)
    cases = [(train, 2 * L), (train, L)] + [(m, m.shape[0]) for _, m in sampler_masks(L, bs)]
    for mask, rows in cases:
        fwd, bwd = block_mask_dense(flex_block_mask(mask, rows, tile))
        assert torch.equal(fwd, mask[:rows]) and torch.equal(bwd, mask[:rows])


def test_flex_attention_on_the_cpu_equals_sdpa():
    """FlexAttention itself (eager, forward: it has no CPU backward in this torch) under the
    block masks gives SDPA's output under the dense masks."""
    g = torch.Generator().manual_seed(0)
    for L, bs in ((8, 2), (24, 4)):  # eager flex costs ~0.5 s per new shape
        train = block_diff_mask(L, bs)
        for mask, rows in [(train, 2 * L), (train, L), (fold_mask(5, bs, bs, bs), 2 * bs), (block_causal_mask(L, bs), L)][: 4 if L == 8 else 1]:
            q = torch.randn(2, 2, rows, 16, generator=g)
            k, v = (torch.randn(2, 2, mask.shape[1], 16, generator=g) for _ in range(2))
            out = flex_attention(q, k, v, block_mask=flex_block_mask(mask, rows, 16))
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:rows])
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _eager_flex(monkeypatch):
    monkeypatch.setattr(backends, "_flex_compiled", flex_attention)  # no 30 s CPU compile in a test


@torch.no_grad()
def test_model_with_flex_equals_sdpa_for_training_and_sampling(tiny_model, monkeypatch):
    """The DiT with attn='flex' (eager kernel) gives the SDPA model's hidden states: the 2L
    training pass (x_t queries at the last layer), the block-causal window, and a cached pass
    that folds a clean block in."""
    _eager_flex(monkeypatch)
    model, L, bs = tiny_model, tiny_model.cfg.length, 4
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, 39, (2, L), generator=g)
    xt = torch.where(torch.rand(2, L, generator=g) < 0.5, 39, x0)
    cfg = DiffusionConfig(algo="bd3lm", block_size=bs)

    def run(attn):
        model.attn = attn
        h = denoiser_hidden(model, xt, x0, cfg)[0]
        window = model.hidden_states(x0[:, : 3 * bs], attn_mask=block_causal_mask(3 * bs, bs))[0]
        cache = model.new_kv_cache(2, L)
        model.hidden_states(x0[:, :bs], kv_cache=cache)
        cache.commit(bs)
        mask = fold_mask(bs, bs, bs, bs)
        tokens = torch.cat([x0[:, bs : 2 * bs], xt[:, 2 * bs : 3 * bs]], dim=1)
        cached = model.hidden_states(tokens, positions=torch.arange(bs, 3 * bs), attn_mask=mask, kv_cache=cache)[0]
        return h, window, cached

    for got, want in zip(run("flex"), run("sdpa")):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    model.attn = "sdpa"


def test_tensor_bias_is_the_mask_aligned():
    mask = fold_mask(5, 4, 4, 4)
    for rows in (8, 4):
        bias = tensor_bias(mask, rows, torch.float16)
        assert bias.dtype == torch.float16 and bias.stride(0) % 8 == 0 and bias.shape == (rows, mask.shape[1])
        assert torch.equal(bias == 0, mask[:rows]) and bool(torch.isinf(bias[~mask[:rows]]).all())


def _materialise_xformers(bias, folded: bool, rows: int, cols: int, batch: int) -> torch.Tensor:
    """(batch, rows, cols) bool from an xformers bias (folded: batch 1 with the rows of every
    sample concatenated; nothing may cross samples)."""
    if isinstance(bias, torch.Tensor):
        return (bias > float("-inf")).expand(batch, rows, cols)
    full = bias.materialize((batch * rows, batch * cols)) > float("-inf")
    if not folded:
        return full[:rows, :cols].expand(batch, rows, cols)
    per = torch.stack([full[b * rows : (b + 1) * rows, b * cols : (b + 1) * cols] for b in range(batch)])
    assert int(full.sum()) == int(per.sum())  # no sample sees another's keys
    return per


@pytest.mark.skipif(not HAS_XFORMERS, reason="xformers is not installed (pip install 'bd3[xformers]' after torch)")
@pytest.mark.parametrize("L,bs", GRID)
def test_xformers_biases_materialise_to_the_dense_masks(L, bs):
    """xformers' bias objects are pure Python: materialised on the CPU they are the masks."""
    train = block_diff_mask(L, bs)
    cases = [(train, 2 * L), (train, L)] + [(m, m.shape[0]) for _, m in sampler_masks(L, bs)]
    for mask, rows in cases:
        bias, folded = backends.xformers_bias(mask, rows, 3, torch.float32)
        if bs == L and mask is train:
            assert folded and not isinstance(bias, torch.Tensor)  # block-diagonal classes where they fit
        got = _materialise_xformers(bias, folded, rows, mask.shape[1], 3)
        assert torch.equal(got, mask[:rows].expand(3, rows, mask.shape[1]))
    causal, _ = backends.xformers_bias(None, L, 3, torch.float32, causal=True)
    assert torch.equal(causal.materialize((L, L)) == 0, torch.ones(L, L, dtype=torch.bool).tril())


def test_resolve_attn_names_what_cannot_run():
    cpu = torch.device("cpu")
    assert resolve_attn("auto", cpu) == "sdpa" and resolve_attn("sdpa", cpu) == "sdpa"
    with pytest.raises(Bd3Error, match="--attn flex runs on CUDA only"):
        resolve_attn("flex", cpu)
    with pytest.raises(Bd3Error, match="xformers"):
        resolve_attn("xformers", cpu)
    with pytest.raises(Bd3Error, match="Unknown attention backend"):
        resolve_attn("flash", cpu)


@pytest.mark.parametrize(
    "args,code,needle",
    [
        (["pretrain", "--attn", "flex", "--device", "cpu"], 1, "--attn flex"),
        (["pretrain", "--attn", "xformers", "--device", "cpu"], 1, "xformers"),
        (["sample", "--attn", "flash"], 2, "--attn"),
    ],
)
def test_cli_backend_errors_are_one_line(tmp_path, monkeypatch, capsys, args, code, needle):
    from bd3.cli.main import main

    monkeypatch.chdir(tmp_path)
    assert main(args) == code
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and err.startswith("Error:")
    assert not (tmp_path / "runs").exists()  # it failed before any work


def test_compile_reaches_torch_compile_for_every_block(tiny_cfg, monkeypatch):
    """--compile compiles each block in place (names, and so checkpoints, unchanged). A real
    compile takes ~40 s on 2 CPU cores, too slow for the suite: the call is intercepted."""
    from bd3.model import DiT

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    model = DiT(tiny_cfg, 40)
    names = list(model.state_dict())
    configure_model(model, "sdpa", compile=True)
    assert compiled == list(model.blocks) and list(model.state_dict()) == names and model.attn == "sdpa"


def test_attn_and_compile_reach_the_trainer_and_its_ema_copy(tiny_cfg, monkeypatch):
    import numpy as np

    from bd3.config import DataConfig, RunConfig, TrainConfig
    from bd3.train import loop

    got = {}

    def configure(model, attn="sdpa", compile=False):
        got.update(attn=attn, compile=compile)
        model.attn = attn
        return model

    monkeypatch.setattr(loop, "configure_model", configure)
    data = DataConfig(vocab_size=40, mask_id=39, bos_id=0, eos_id=1, pad_id=2)
    cfg = RunConfig(model=tiny_cfg, diffusion=DiffusionConfig(block_size=4), data=data, train=TrainConfig(device="cpu", batch_size=2))
    shards = types.SimpleNamespace(rows=lambda split: np.zeros((8, 16), dtype=np.int64))
    trainer = loop.Trainer(cfg, shards, torch.device("cpu"), "fp32", "flex", True)
    assert got == {"attn": "flex", "compile": True}
    with trainer.ema_weights() as ema_model:
        assert ema_model.attn == "flex"


# -- on a GPU --------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA: FlexAttention kernels and xformers run on GPUs only")


def _gpu_losses(tiny_cfg, attn: str, block_size: int):
    from bd3.diffusion.objective import diffusion_loss
    from bd3.model import DiT

    torch.manual_seed(0)
    model = configure_model(randomize(DiT(tiny_cfg, 40)).cuda().train(), attn)
    x0 = torch.randint(0, 39, (4, tiny_cfg.length), generator=torch.Generator().manual_seed(3)).cuda()
    g = torch.Generator(device="cuda").manual_seed(4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = diffusion_loss(model, x0, DiffusionConfig(block_size=block_size), 39, generator=g).mean
    loss.backward()
    return loss.detach().float(), torch.cat([p.grad.flatten().float() for p in model.parameters()])


@needs_cuda
@pytest.mark.parametrize("attn", ["flex", "xformers"])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_gpu_backends_equal_sdpa_in_bf16(tiny_cfg, attn, block_size):
    if attn == "xformers" and not HAS_XFORMERS:
        pytest.skip("xformers is not installed")
    loss, grads = _gpu_losses(tiny_cfg, attn, block_size)
    ref_loss, ref_grads = _gpu_losses(tiny_cfg, "sdpa", block_size)
    torch.testing.assert_close(loss, ref_loss, atol=2e-2, rtol=2e-2)
    assert float((grads - ref_grads).norm() / ref_grads.norm()) < 5e-2


@needs_cuda
@pytest.mark.parametrize("attn", ["flex", "xformers"])
def test_gpu_attention_outputs_equal_sdpa(attn):
    if attn == "xformers" and not HAS_XFORMERS:
        pytest.skip("xformers is not installed")
    g = torch.Generator(device="cuda").manual_seed(0)
    for L, bs in ((64, 4), (128, 16), (256, 256)):
        mask = block_diff_mask(L, bs, "cuda")
        for rows in (2 * L, L):
            q = torch.randn(2, 4, rows, 32, device="cuda", dtype=torch.bfloat16, generator=g)
            k, v = (torch.randn(2, 4, 2 * L, 32, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
            out = backends.attend_with(attn, q, k, v, mask, False)
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask[:rows])
            torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
