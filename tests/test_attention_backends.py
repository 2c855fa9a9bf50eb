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
from bd3.diffusion.objective import denoiser_input
from bd3.errors import Bd3Error
from bd3.model import backends
from bd3.model.backends import flex_block_mask, resolve_attn, tensor_bias
from bd3.model.mask import Mask
from bd3.runtime import configure_model
from tests.conftest import randomize

flex_attention = pytest.importorskip("torch.nn.attention.flex_attention").flex_attention
HAS_XFORMERS = backends.xformers_available()
CUDA = torch.cuda.is_available()
GRID = [(L, bs) for L in (8, 24, 64) for bs in sorted({1, 2, 4, 8, L}) if L % bs == 0]


def fold_table(cached: int, pending: int, width: int, block_size: int) -> torch.Tensor:
    """The sampler's cached pass written out: queries [pending clean ; noisy block], keys
    [cached ; pending ; noisy]; the clean tokens see the cache, each other block-causally
    and never the noisy block; the noisy block sees everything."""
    mask = torch.ones(pending + width, cached + pending + width, dtype=torch.bool)
    mask[:pending, cached : cached + pending] = block_causal_mask(pending, block_size)
    mask[:pending, cached + pending :] = False
    return mask


def sampler_masks(L: int, bs: int) -> list[tuple[Mask, torch.Tensor]]:
    """Block-causal over [context ; block] (no cache), the cached pass with pending clean
    blocks (a prompt, or the last block) against cached keys, and the AR model's causal
    pass after a cache: each description with its table written out."""
    out = [(Mask.block_causal(bs), block_causal_mask(n, bs)) for n in (L, L + bs)]
    for cached, pending in ((0, bs), (bs, bs), (L - 2 * bs, 2 * bs), (3, bs)):
        if cached >= 0:
            out.append((Mask.cached_pass(cached, pending, bs), fold_table(cached, pending, bs, bs)))
    out += [(Mask.causal(c), torch.ones(bs, c + bs, dtype=torch.bool).tril(c)) for c in (0, 3)]
    return out


@pytest.mark.parametrize("L,bs", GRID)
def test_mask_descriptions_are_the_dense_masks(L, bs):
    """Each description's table is the mask it names, written out (the training mask:
    bd3.diffusion.masks), and a query prefix is its first rows."""
    cases = [(Mask.block_diff(L, bs), block_diff_mask(L, bs)), *sampler_masks(L, bs)]
    for mask, table in cases:
        assert torch.equal(mask.dense(*table.shape), table), mask
        rows = table.shape[0] // 2
        assert torch.equal(mask.dense(rows, table.shape[1]), table[:rows]), mask
    with pytest.raises(ValueError, match="mask kind"):
        Mask("dense")


def block_mask_dense(block_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """What FlexAttention computes under ``block_mask``, as dense (Q, KV) bool masks: from
    the forward's per-query-tile key tiles and from the backward's per-key-tile query tiles.
    A pair counts when its tile is full, or partial and the mask function allows it."""
    from torch.nn.attention.flex_attention import create_mask

    b = block_mask
    Q, KV = b.seq_lengths
    tq, tk = b.BLOCK_SIZE
    shape = (-(-Q // tq), -(-KV // tk))
    allowed = create_mask(b.mask_mod, None, None, Q, KV, device=b.kv_indices.device)[0, 0]
    out = []
    for num, idx, full_num, full_idx, transposed in (
        (b.kv_num_blocks, b.kv_indices, b.full_kv_num_blocks, b.full_kv_indices, False),
        (b.q_num_blocks, b.q_indices, b.full_q_num_blocks, b.full_q_indices, True),
    ):
        partial = _pairs(_tiles(num, idx, shape, transposed), tq, tk, Q, KV)
        full = _pairs(_tiles(full_num, full_idx, shape, transposed), tq, tk, Q, KV)
        out.append(full.to(allowed.device) | (partial.to(allowed.device) & allowed))
    return out[0], out[1]


def _tiles(num, idx, shape: tuple[int, int], transposed: bool) -> torch.Tensor:
    """(query tiles, key tiles) bool from the (batch 0, head 0) lists of tile indices."""
    dense = torch.zeros(shape[::-1] if transposed else shape, dtype=torch.bool)
    if num is not None:
        for r, (n, row) in enumerate(zip(num[0, 0].tolist(), idx[0, 0].cpu())):
            dense[r, row[:n].long()] = True
    return dense.t() if transposed else dense


def _pairs(tiles: torch.Tensor, tq: int, tk: int, Q: int, KV: int) -> torch.Tensor:
    return tiles.repeat_interleave(tq, 0).repeat_interleave(tk, 1)[:Q, :KV]


@pytest.mark.parametrize("L,bs", GRID)
@pytest.mark.parametrize("tile", [8, backends.FLEX_TILE])
def test_flex_block_masks_materialise_to_the_dense_masks(L, bs, tile):
    """What FlexAttention computes (full tiles, and partial tiles through the mask function;
    forward and backward tile lists) is the dense mask, for every query prefix used; an
    explicit table is looked up."""
    train = block_diff_mask(L, bs)
    cases = [(Mask.block_diff(L, bs), train, 2 * L), (Mask.block_diff(L, bs), train, L), (train, train, L)]
    cases += [(m, t, t.shape[0]) for m, t in sampler_masks(L, bs)]
    for mask, table, rows in cases:
        fwd, bwd = block_mask_dense(flex_block_mask(mask, rows, table.shape[1], "cpu", tile))
        assert torch.equal(fwd, table[:rows]) and torch.equal(bwd, table[:rows])


def test_flex_attention_on_the_cpu_equals_sdpa():
    """FlexAttention itself (eager, forward: it has no CPU backward in this torch) under the
    block masks gives SDPA's output under the dense masks."""
    g = torch.Generator().manual_seed(0)
    for L, bs in ((8, 2), (24, 4)):  # eager flex costs ~0.5 s per new shape
        train = (Mask.block_diff(L, bs), block_diff_mask(L, bs))
        cases = [(*train, 2 * L), (*train, L), (Mask.cached_pass(5, bs, bs), fold_table(5, bs, bs, bs), 2 * bs),
                 (Mask.block_causal(bs), block_causal_mask(L, bs), L)]
        for mask, table, rows in cases[: 4 if L == 8 else 1]:
            q = torch.randn(2, 2, rows, 16, generator=g)
            k, v = (torch.randn(2, 2, table.shape[1], 16, generator=g) for _ in range(2))
            out = flex_attention(q, k, v, block_mask=flex_block_mask(mask, rows, table.shape[1], "cpu", 16))
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=table[:rows])
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _eager_flex(monkeypatch):
    monkeypatch.setattr(backends, "_flex_compiled", flex_attention)  # no 30 s CPU compile in a test


@torch.no_grad()
def test_model_with_flex_equals_sdpa_for_training_and_sampling(tiny_model, monkeypatch):
    """The DiT with attn='flex' (eager kernel) gives the SDPA model's logits: the 2L
    training pass (x_t queries at the last layer), the block-causal window (as a description
    and as a table), and a cached pass that folds a clean block in."""
    _eager_flex(monkeypatch)
    model, L, bs = tiny_model, tiny_model.cfg.length, 4
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, 39, (2, L), generator=g)
    xt = torch.where(torch.rand(2, L, generator=g) < 0.5, 39, x0)
    cfg = DiffusionConfig(algo="bd3lm", block_size=bs)

    def run(attn):
        model.attn = attn
        tokens, kw = denoiser_input(xt, x0, cfg)
        train = model(tokens, select=torch.ones(2, L, dtype=torch.bool), **kw)
        window = model(x0[:, : 3 * bs], attn_mask=Mask.block_causal(bs))
        table = model(x0[:, : 3 * bs], attn_mask=block_causal_mask(3 * bs, bs))  # an explicit table
        cache = model.new_kv_cache(2, L)
        model(x0[:, :bs], kv_cache=cache)
        cache.commit(bs)
        tokens = torch.cat([x0[:, bs : 2 * bs], xt[:, 2 * bs : 3 * bs]], dim=1)
        cached = model(tokens, positions=bs, attn_mask=Mask.cached_pass(bs, bs, bs), kv_cache=cache)
        return train, window, table, cached

    for got, want in zip(run("flex"), run("sdpa")):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    model.attn = "sdpa"


def test_tensor_bias_is_the_mask_aligned():
    table = fold_table(5, 4, 4, 4)
    for mask in (Mask.cached_pass(5, 4, 4), table):
        for rows in (8, 4):
            bias = tensor_bias(mask, rows, table.shape[1], torch.float16)
            assert bias.dtype == torch.float16 and bias.stride(0) % 8 == 0 and bias.shape == (rows, table.shape[1])
            assert torch.equal(bias == 0, table[:rows]) and bool(torch.isinf(bias[~table[:rows]]).all())


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
    train = (Mask.block_diff(L, bs), block_diff_mask(L, bs))
    cases = [(*train, 2 * L), (*train, L)] + [(m, t, t.shape[0]) for m, t in sampler_masks(L, bs)]
    for mask, table, rows in cases:
        bias, folded = backends.xformers_bias(mask, rows, table.shape[1], 3, torch.float32)
        if bs == L and mask.kind == "block_diff":
            assert folded and not isinstance(bias, torch.Tensor)  # block-diagonal classes where they fit
        got = _materialise_xformers(bias, folded, rows, table.shape[1], 3)
        assert torch.equal(got, table[:rows].expand(3, rows, table.shape[1]))
    causal, _ = backends.xformers_bias(None, L, L, 3, torch.float32, causal=True)
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
    from bd3.train.loop import Trainer

    compiled = []  # torch's public Module.compile, recorded instead of compiling
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    data = DataConfig(vocab_size=40, mask_id=39, bos_id=0, eos_id=1, pad_id=2)
    cfg = RunConfig(model=tiny_cfg, diffusion=DiffusionConfig(block_size=4), data=data, train=TrainConfig(device="cpu", batch_size=2))
    shards = types.SimpleNamespace(rows=lambda split: np.zeros((8, 16), dtype=np.int64))
    trainer = Trainer(cfg, shards, torch.device("cpu"), "fp32", "flex", True)
    assert trainer.model.attn == "flex" and compiled == list(trainer.model.blocks)
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
            out = backends.attend_with(attn, q, k, v, Mask.block_diff(L, bs), False)
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask[:rows])
            torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
