"""Import and export the released BD3-LM checkpoints' layout (HF ``BD3LM``, ``model_type: bd3lm``).

A checkpoint folder holds ``config.json`` (hidden_dim, n_heads, n_blocks, cond_dim,
model_length, block_size, vocab_size, ...) and ``model.safetensors`` with the backbone
under ``backbone.`` plus the scalar buffers ``sampling_eps_min`` / ``sampling_eps_max``
(the clip interval it was trained with). In the released checkpoints the mask token is the
last id. Every tensor is checked by name and shape; nothing is silently left at its random
initialisation.

``bd3 export`` adds what ``transformers`` needs to load the folder on its own: ``auto_map``
and the special token ids in ``config.json``, the modeling and configuration code
(``hf_files/``: ``BD3LM`` runs bd3's DiT through :func:`layout_logits`) and the run's
tokenizer, whose mask token ``bd3 import`` then uses.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer

from bd3.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig, TrainConfig
from bd3.data.tokenizer import Tokenizer, load_tokenizer
from bd3.diffusion.masks import block_causal_mask
from bd3.diffusion.objective import xt_logits
from bd3.errors import Bd3Error, cannot_write
from bd3.model import DiT
from bd3.runs.rundir import Run, load_strict, load_tensors

PREFIX = "backbone."
EPS_KEYS = ("sampling_eps_min", "sampling_eps_max")
HF_HOST = "huggingface.co"
# the modeling and configuration code an exported folder carries (package data), named as
# in the released checkpoints, so AutoModelForMaskedLM / AutoConfig find BD3LM / BD3LMConfig
HF_FILES = Path(__file__).resolve().parent / "hf_files"
CODE_FILES = ("configuration_bd3lm.py", "modeling_bd3lm.py")
AUTO_MAP = {
    "AutoConfig": "configuration_bd3lm.BD3LMConfig",
    "AutoModel": "modeling_bd3lm.BD3LM",
    "AutoModelForMaskedLM": "modeling_bd3lm.BD3LM",
}
EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # bd3 export --precision


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
        return Path(snapshot_download(src, allow_patterns=["config.json", "model.safetensors", "tokenizer.json"]))
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


def model_config(hf: dict) -> ModelConfig:
    """The backbone's config from a checkpoint's config.json."""
    return ModelConfig(
        hidden_dim=hf["hidden_dim"], n_heads=hf["n_heads"], n_layers=hf["n_blocks"], cond_dim=hf["cond_dim"],
        length=hf["model_length"], dropout=float(hf.get("dropout", 0.1)),
    )


def backbone_from_layout(hf: dict) -> DiT:
    """A DiT shaped as a checkpoint's config.json says (what the exported modeling file builds)."""
    return DiT(model_config(hf), hf["vocab_size"])


def layout_logits(model: DiT, input_ids: torch.Tensor, block_size: int, *, sample_mode: bool = False) -> torch.Tensor:
    """The released BD3LM's forward: 2L ids ``[x_t ; x_0]`` -> the logits of x_t (B, L, V)
    under the block-diffusion mask; at most L ids (or ``sample_mode``) -> the logits of
    every position (B, S, V) under the block-causal mask."""
    L, S = model.cfg.length, input_ids.shape[1]
    if S == 2 * L and not sample_mode:
        return xt_logits(model, input_ids[:, :L], input_ids[:, L:], DiffusionConfig(block_size=block_size))
    if S > L:
        raise ValueError(f"expected 2L = {2 * L} ids ([x_t ; x_0]) or at most L = {L} ids, got {S}")
    return model(input_ids, attn_mask=block_causal_mask(S, block_size, str(input_ids.device)))


def run_config(hf: dict, clip: tuple[float, float], tok: Tokenizer, source: str) -> RunConfig:
    model = model_config(hf)
    data = DataConfig(
        data="web", tokenizer=tok.name, vocab_size=tok.vocab_size, mask_id=tok.mask_id, bos_id=tok.bos_id,
        eos_id=tok.eos_id, pad_id=tok.pad_id, tokenizer_sha256=tok.sha256,
    )
    return RunConfig(
        model=model, diffusion=DiffusionConfig(algo="bd3lm", block_size=hf["block_size"], clip=clip),
        data=data, train=TrainConfig(parent=source),
    )


def import_checkpoint(src: str, out: Path, *, tokenizer: str | None = None, data: str | None = None, force: bool = False) -> Run:
    """Turn a released checkpoint (folder or hub id), or a folder written by ``bd3 export``,
    into an ordinary bd3 run directory."""
    folder = fetch(src)
    hf, tensors = read_checkpoint(folder)
    V = hf["vocab_size"]
    tok = load_tokenizer(tokenizer or _default_tokenizer(folder, V))
    mask_id = hf.get("mask_token_id", V - 1)  # the released layout: the mask token is the last id
    if tok.vocab_size != V or tok.mask_id != mask_id:
        raise Bd3Error(
            f"The tokenizer {tok.name} has vocabulary {tok.vocab_size} and mask id {tok.mask_id}; the checkpoint needs "
            f"vocabulary {V} with the mask token {'last' if mask_id == V - 1 else 'at'} ({mask_id})."
        )
    missing_eps = [k for k in EPS_KEYS if k not in tensors]
    if missing_eps:
        raise Bd3Error(f"{folder / 'model.safetensors'} lacks {', '.join(missing_eps)}.")
    clip = tuple(_clip_bound(hf, key, tensors.pop(key)) for key in EPS_KEYS)
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


def export_checkpoint(run: Run, out: Path, *, precision: str = "fp32", force: bool = False) -> Path:
    """Write a run's EMA weights as a folder that ``transformers`` loads
    (``AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True)``, ``AutoTokenizer``)
    and ``bd3 import`` reads back: the released layout's config.json (plus ``auto_map`` and
    the special token ids) and model.safetensors, the modeling and configuration code, and
    the run's tokenizer. ``precision``: fp32 or bf16 weights (the clip buffers stay fp32)."""
    cfg = run.config
    if cfg.diffusion.algo == "ar":
        raise Bd3Error(f"{run.path} is an autoregressive run; the BD3LM layout holds block diffusion models only.")
    if cfg.diffusion.algo == "sedd":
        raise Bd3Error(f"{run.path} is a SEDD run (a time-conditioned score model); the BD3LM layout holds block diffusion models only.")
    if precision not in EXPORT_DTYPES:
        raise Bd3Error(f"Unknown precision {precision!r}; choose one of {', '.join(EXPORT_DTYPES)}.")
    ckpt = run.latest_checkpoint()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise Bd3Error(f"{out} exists and is not a folder; choose another folder.")
    if out.exists() and any(out.iterdir()) and not force:
        raise Bd3Error(f"{out} exists and is not empty; choose another folder or pass --force.")
    if (out / "checkpoints").is_dir() and (out / "config.json").is_file():
        raise Bd3Error(f"{out} is a bd3 run directory; export into another folder (--force never writes into a run).")
    model = DiT(cfg.model, cfg.data.vocab_size)
    load_strict(model, run.weights("ema", ckpt), ckpt / "ema.safetensors")
    dtype = EXPORT_DTYPES[precision]
    params = dict(model.named_parameters())  # buffers (the rotary frequencies) stay fp32
    tensors = {PREFIX + k: (v.to(dtype) if k in params else v).contiguous() for k, v in model.state_dict().items()}
    beta, omega = cfg.diffusion.clip
    tensors["sampling_eps_min"] = torch.tensor(beta, dtype=torch.float32)
    tensors["sampling_eps_max"] = torch.tensor(omega, dtype=torch.float32)
    tok = HFTokenizer.from_str(run.tokenizer_path.read_text())
    d = cfg.data
    names = {key: tok.id_to_token(i) for key, i in (("bos", d.bos_id), ("eos", d.eos_id), ("pad", d.pad_id), ("mask", d.mask_id))}
    hf = {
        "model_type": "bd3lm", "architectures": ["BD3LM"], "block_size": cfg.diffusion.block_size,
        "vocab_size": cfg.data.vocab_size, "model_length": cfg.model.length, "hidden_dim": cfg.model.hidden_dim,
        "cond_dim": cfg.model.cond_dim, "n_blocks": cfg.model.n_layers, "n_heads": cfg.model.n_heads,
        "dropout": cfg.model.dropout, "cross_attn": True, "adaln": True, "causal": False, "attn_backend": "sdpa",
        "time_conditioning": False, "var_min": True, "sampling_eps_min": beta, "sampling_eps_max": omega, "return_dict": False,
        "auto_map": AUTO_MAP, "dtype": str(dtype).removeprefix("torch."),
        **{f"{key}_token_id": getattr(d, f"{key}_id") for key in names},
    }
    special = {f"{key}_token": name for key, name in names.items()}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": cfg.model.length,
        "clean_up_tokenization_spaces": False,
    }
    files = {
        "config.json": _json(hf), "tokenizer.json": run.tokenizer_path.read_bytes(),
        "tokenizer_config.json": _json(tokenizer_config), "special_tokens_map.json": _json(special),
        **{name: (HF_FILES / name).read_bytes() for name in CODE_FILES},
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cannot_write(out, e, "choose another folder") from None
    _replace(out / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    for name, data in files.items():
        _replace(out / name, lambda tmp, data=data: tmp.write_bytes(data))
    return out


def _default_tokenizer(folder: Path, vocab_size: int) -> str:
    """The folder's own tokenizer.json (written by ``bd3 export``), else GPT-2 for the released
    checkpoints' 50258-token vocabulary."""
    if (folder / "tokenizer.json").is_file():
        return str(folder / "tokenizer.json")
    return "gpt2" if vocab_size == 50258 else _no_tokenizer(vocab_size)


def _clip_bound(hf: dict, key: str, buffer: torch.Tensor) -> float:
    """A clip bound from its buffer (the trained value), as written in config.json when that
    is the same number (0.45, not float32's 0.44999998807907104)."""
    value = buffer.float()
    written = hf.get(key)
    if isinstance(written, (int, float)) and torch.tensor(float(written), dtype=value.dtype) == value:
        return float(written)
    return float(value)


def _json(value: dict) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode()


def _replace(path: Path, write) -> None:
    """``write(tmp)`` then rename ``tmp`` over ``path``: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        tmp.unlink(missing_ok=True)
        raise cannot_write(path, e, "choose another folder") from None


def _no_tokenizer(vocab_size: int) -> str:
    raise Bd3Error(
        f"The checkpoint's vocabulary has {vocab_size} tokens, not GPT-2's 50258; pass --tokenizer path/to/tokenizer.json "
        "whose last id is the mask token."
    )
