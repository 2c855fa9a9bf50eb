"""Import and export the released BD3-LM checkpoints' layout (HF ``BD3LM``, ``model_type: bd3lm``).

A checkpoint folder holds ``config.json`` (hidden_dim, n_heads, n_blocks, cond_dim,
model_length, block_size, vocab_size, ...) and ``model.safetensors`` with the backbone
under ``backbone.`` plus the scalar buffers ``sampling_eps_min`` / ``sampling_eps_max``
(the clip interval it was trained with). The mask token is the last id. Every tensor is
checked by name and shape; nothing is silently left at its random initialisation.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from bd3.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig, TrainConfig
from bd3.data.tokenizer import Tokenizer, load_tokenizer
from bd3.errors import Bd3Error, cannot_write
from bd3.model import DiT
from bd3.runs.rundir import Run, load_strict, load_tensors

PREFIX = "backbone."
EPS_KEYS = ("sampling_eps_min", "sampling_eps_max")
HF_HOST = "huggingface.co"


def fetch(src: str) -> Path:
    """A local checkpoint folder as is, or a hub id downloaded into the HF cache."""
    path = Path(src)
    if path.exists():
        if not path.is_dir():
            raise Bd3Error(f"{src} is not a folder; pass a folder holding config.json and model.safetensors, or a hub id.")
        return path
    if src.count("/") != 1 or src.startswith((".", "/")):
        raise Bd3Error(f"{src} does not exist. Pass a local checkpoint folder or a hub id such as kuleshov-group/bd3lm-owt-block_size4.")
    try:
        socket.getaddrinfo(HF_HOST, 443)
    except OSError:
        raise Bd3Error(
            f"{src} is not a local folder and the HuggingFace hub ({HF_HOST}) cannot be reached from here. "
            "Download the checkpoint's config.json and model.safetensors elsewhere and pass their folder."
        ) from None
    from huggingface_hub import snapshot_download  # installed with `datasets`

    try:
        return Path(snapshot_download(src, allow_patterns=["config.json", "model.safetensors"]))
    except Exception as e:  # the hub client raises many types; all mean the same to a user
        raise Bd3Error(f"Could not download {src} from the hub: {e}") from None


def read_checkpoint(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg_path = folder / "config.json"
    try:
        hf = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise Bd3Error(f"{cfg_path} is missing; a BD3-LM checkpoint folder holds config.json and model.safetensors.") from None
    except json.JSONDecodeError as e:
        raise Bd3Error(f"{cfg_path} is not valid JSON ({e}).") from None
    if hf.get("model_type") != "bd3lm":
        raise Bd3Error(f"{cfg_path} has model_type {hf.get('model_type')!r}; only 'bd3lm' checkpoints can be imported.")
    missing = [k for k in ("vocab_size", "hidden_dim", "n_heads", "n_blocks", "cond_dim", "model_length", "block_size") if k not in hf]
    if missing:
        raise Bd3Error(f"{cfg_path} lacks {', '.join(missing)}.")
    if hf.get("time_conditioning") or hf.get("causal") or not hf.get("adaln", True):
        raise Bd3Error(f"{cfg_path}: only checkpoints with time conditioning off, adaLN on and non-causal attention are supported.")
    return hf, load_tensors(folder / "model.safetensors")


def run_config(hf: dict, clip: tuple[float, float], tok: Tokenizer, source: str) -> RunConfig:
    model = ModelConfig(
        hidden_dim=hf["hidden_dim"], n_heads=hf["n_heads"], n_layers=hf["n_blocks"], cond_dim=hf["cond_dim"],
        length=hf["model_length"], dropout=float(hf.get("dropout", 0.1)),
    )
    data = DataConfig(
        data="web", tokenizer=tok.name, vocab_size=tok.vocab_size, mask_id=tok.mask_id, bos_id=tok.bos_id,
        eos_id=tok.eos_id, pad_id=tok.pad_id, tokenizer_sha256=tok.sha256,
    )
    return RunConfig(
        model=model, diffusion=DiffusionConfig(algo="bd3lm", block_size=hf["block_size"], clip=clip),
        data=data, train=TrainConfig(parent=source),
    )


def import_checkpoint(src: str, out: Path, *, tokenizer: str | None = None, data: str | None = None, force: bool = False) -> Run:
    """Turn a released checkpoint (folder or hub id) into an ordinary bd3 run directory."""
    folder = fetch(src)
    hf, tensors = read_checkpoint(folder)
    V = hf["vocab_size"]
    tok = load_tokenizer(tokenizer or ("gpt2" if V == 50258 else _no_tokenizer(V)))
    if tok.vocab_size != V or tok.mask_id != V - 1:
        raise Bd3Error(
            f"The tokenizer {tok.name} has vocabulary {tok.vocab_size} and mask id {tok.mask_id}; the checkpoint needs "
            f"vocabulary {V} with the mask token last ({V - 1})."
        )
    missing_eps = [k for k in EPS_KEYS if k not in tensors]
    if missing_eps:
        raise Bd3Error(f"{folder / 'model.safetensors'} lacks {', '.join(missing_eps)}.")
    clip = (float(tensors.pop("sampling_eps_min")), float(tensors.pop("sampling_eps_max")))
    cfg = run_config(hf, clip, tok, src)
    if data:
        cfg.data.data = data
    stray = sorted(k for k in tensors if not k.startswith(PREFIX))
    if stray:
        raise Bd3Error(f"{folder / 'model.safetensors'} has unexpected tensors: {', '.join(stray)}.")
    weights = {k[len(PREFIX):]: v for k, v in tensors.items()}
    model = DiT(cfg.model, V)
    load_strict(model, weights, folder / "model.safetensors")
    run = Run.create(out, cfg, tok.to_json(), force=force)
    state = model.state_dict()
    run.save_checkpoint(0, state, state, {}, {"step": 0, "imported_from": src, "hf_config": hf})
    return run


def export_checkpoint(run: Run, out: Path, *, force: bool = False) -> Path:
    """Write a run's EMA weights in the released layout (config.json + model.safetensors)."""
    cfg = run.config
    if cfg.diffusion.algo == "ar":
        raise Bd3Error(f"{run.path} is an autoregressive run; the BD3LM layout holds block diffusion models only.")
    if cfg.diffusion.algo == "sedd":
        raise Bd3Error(f"{run.path} is a SEDD run (a time-conditioned score model); the BD3LM layout holds block diffusion models only.")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise Bd3Error(f"{out} exists and is not empty; choose another folder or pass --force.")
    if (out / "checkpoints").is_dir() and (out / "config.json").is_file():
        raise Bd3Error(f"{out} is a bd3 run directory; export into another folder (--force never writes into a run).")
    ckpt = run.latest_checkpoint()
    model = DiT(cfg.model, cfg.data.vocab_size)
    load_strict(model, run.weights("ema", ckpt), ckpt / "ema.safetensors")
    tensors = {PREFIX + k: v.contiguous() for k, v in model.state_dict().items()}
    beta, omega = cfg.diffusion.clip
    tensors["sampling_eps_min"] = torch.tensor(beta, dtype=torch.float32)
    tensors["sampling_eps_max"] = torch.tensor(omega, dtype=torch.float32)
    hf = {
        "model_type": "bd3lm", "architectures": ["BD3LM"], "block_size": cfg.diffusion.block_size,
        "vocab_size": cfg.data.vocab_size, "model_length": cfg.model.length, "hidden_dim": cfg.model.hidden_dim,
        "cond_dim": cfg.model.cond_dim, "n_blocks": cfg.model.n_layers, "n_heads": cfg.model.n_heads,
        "dropout": cfg.model.dropout, "cross_attn": True, "adaln": True, "causal": False, "attn_backend": "sdpa",
        "time_conditioning": False, "var_min": True, "sampling_eps_min": beta, "sampling_eps_max": omega, "return_dict": False,
    }
    tmp = out / f".model.safetensors.tmp-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, tmp)
        os.replace(tmp, out / "model.safetensors")
        (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    except (OSError, SafetensorError) as e:
        tmp.unlink(missing_ok=True)
        raise cannot_write(out, e, "choose another folder") from None
    return out


def _no_tokenizer(vocab_size: int) -> str:
    raise Bd3Error(
        f"The checkpoint's vocabulary has {vocab_size} tokens, not GPT-2's 50258; pass --tokenizer path/to/tokenizer.json "
        "whose last id is the mask token."
    )
