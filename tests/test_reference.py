"""Parity with the reference implementation, and import/export of its checkpoint layout.

Every shape and hyper-parameter comes from the fixture's files, so another fixture of the
same format (``BD3_REFERENCE_FIXTURE``) must pass unchanged.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import WordLevel

from bd3.cli.main import main
from bd3.config import DiffusionConfig
from bd3.diffusion.masks import block_causal_mask
from bd3.diffusion.objective import Noise, nelbo, xt_logits
from bd3.diffusion.schedules import get_schedule
from bd3.errors import Bd3Error
from bd3.runs.hf import import_checkpoint
from bd3.runs.load import load_model
from tests.subs import subs_log_probs

ATOL = 1e-4


def word_tokenizer(vocab_size: int, path: Path) -> Path:
    """A tokenizer.json whose last id is [MASK], matching the checkpoint layout's convention."""
    vocab = {f"w{i}": i for i in range(vocab_size - 3)}
    vocab.update({"<|endoftext|>": vocab_size - 3, "[PAD]": vocab_size - 2, "[MASK]": vocab_size - 1})
    hf = HFTokenizer(WordLevel(vocab, unk_token="w0"))
    hf.add_special_tokens(["<|endoftext|>", "[PAD]", "[MASK]"])
    hf.save(str(path))
    return path


@pytest.fixture
def imported(reference_fixture, tmp_path):
    hf = json.loads((reference_fixture / "config.json").read_text())
    tok = word_tokenizer(hf["vocab_size"], tmp_path / "tokenizer.json")
    run = import_checkpoint(str(reference_fixture), tmp_path / "run", tokenizer=str(tok))
    return run, hf


def test_reference_parity(reference_fixture, imported):
    run, hf = imported
    inputs = load_file(reference_fixture / "inputs.safetensors")
    expected = load_file(reference_fixture / "expected.safetensors")
    x0, xt, t = inputs["x0"], inputs["xt"], inputs["t"]
    B, L = x0.shape
    bs, V = hf["block_size"], hf["vocab_size"]
    mask_id = run.config.data.mask_id
    assert mask_id == V - 1 and run.config.diffusion.block_size == bs and run.config.model.length == L
    model = load_model(run, torch.device("cpu"))
    cfg = run.config.diffusion

    with torch.no_grad():
        logits = xt_logits(model, xt, x0, cfg)
        torch.testing.assert_close(logits, expected["train_logits"], atol=ATOL, rtol=0)
        torch.testing.assert_close(subs_log_probs(logits, xt, mask_id), expected["train_log_probs"], atol=ATOL, rtol=0)
        schedule, t = get_schedule(cfg.schedule), t.double()  # the reference's per-token times
        losses = nelbo(model, x0, Noise(xt, schedule.weight(t), schedule.mask_prob(t)), cfg, mask_id)
        torch.testing.assert_close(losses.token_loss, expected["token_loss"], atol=ATOL, rtol=0)
        torch.testing.assert_close(losses.mean.reshape(1), expected["loss"], atol=ATOL, rtol=0)

        prefix, block = inputs["sample_prefix"], inputs["sample_block"]
        start = prefix.shape[1]
        seq = torch.cat([prefix, block], dim=1)  # recomputed: the clean prefix and the block, block-causally
        nocache = model(seq, attn_mask=block_causal_mask(seq.shape[1], bs))[:, start:]
        torch.testing.assert_close(nocache, expected["sample_logits_nocache"], atol=ATOL, rtol=0)
        cache = model.new_kv_cache(B, L)
        for s in range(0, start, bs):  # one pass per clean block writes its K/V
            model(prefix[:, s : s + bs], positions=s, kv_cache=cache)
            cache.commit(bs)
        cached = model(block, positions=start, kv_cache=cache)
        torch.testing.assert_close(cached, expected["sample_logits_cache"], atol=ATOL, rtol=0)

        torch.testing.assert_close(xt_logits(model, xt, x0, DiffusionConfig(algo="mdlm", block_size=L)), expected["mdlm_logits"], atol=ATOL, rtol=0)


def test_import_records_clip_and_export_round_trips_bit_for_bit(reference_fixture, imported, tmp_path):
    run, hf = imported
    original = load_file(reference_fixture / "model.safetensors")
    clip = run.config.diffusion.clip
    assert torch.equal(torch.tensor(clip), torch.stack([original["sampling_eps_min"], original["sampling_eps_max"]]))
    assert clip == (hf["sampling_eps_min"], hf["sampling_eps_max"])  # as config.json writes them, where they agree
    ema = run.weights("ema")
    assert all(torch.equal(ema[k[len("backbone."):]], v) for k, v in original.items() if k.startswith("backbone."))
    assert main(["export", str(run.path), str(tmp_path / "out")]) == 0
    exported = load_file(tmp_path / "out" / "model.safetensors")
    assert exported.keys() == original.keys()
    for k, v in original.items():
        assert exported[k].dtype == v.dtype and torch.equal(exported[k], v), k
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in ("vocab_size", "hidden_dim", "n_heads", "n_blocks", "cond_dim", "model_length", "block_size"):
        assert out_cfg[key] == hf[key]


@pytest.mark.parametrize("damage", ["missing", "extra", "shape"])
def test_import_refuses_mismatched_tensors(reference_fixture, tmp_path, damage):
    tensors = load_file(reference_fixture / "model.safetensors")
    key = "backbone.blocks.0.attn_out.weight"
    if damage == "missing":
        del tensors[key]
    elif damage == "extra":
        tensors["backbone.blocks.0.extra.weight"] = torch.zeros(2)
    else:
        tensors[key] = torch.zeros(3, 3)
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "config.json").write_text((reference_fixture / "config.json").read_text())
    save_file(tensors, src / "model.safetensors")
    hf = json.loads((reference_fixture / "config.json").read_text())
    tok = word_tokenizer(hf["vocab_size"], tmp_path / "tokenizer.json")
    with pytest.raises(Bd3Error, match="extra.weight" if damage == "extra" else "attn_out"):
        import_checkpoint(str(src), tmp_path / "run", tokenizer=str(tok))
    assert not (tmp_path / "run").exists()


def test_import_needs_a_matching_tokenizer(reference_fixture, tmp_path):
    with pytest.raises(Bd3Error, match="--tokenizer"):
        import_checkpoint(str(reference_fixture), tmp_path / "run")
    with pytest.raises(Bd3Error, match="mask token last"):
        import_checkpoint(str(reference_fixture), tmp_path / "run", tokenizer="gpt2")


def test_import_of_a_hub_id_offline_fails_clearly(tmp_path, monkeypatch):
    import socket

    def offline(*a, **k):
        raise socket.gaierror("offline")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    with pytest.raises(Bd3Error, match="cannot be reached"):
        import_checkpoint("kuleshov-group/bd3lm-owt-block_size4", tmp_path / "run")
