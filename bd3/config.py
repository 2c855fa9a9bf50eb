"""Typed configuration: one dataclass per concern, a JSON round trip, strict validation.

Every run directory stores the full resolved :class:`RunConfig` as ``config.json``.
``from_dict`` rejects unknown keys and ``__post_init__`` validates values, so a typo in a
hand-edited config is an error, not a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bd3 import __version__
from bd3.errors import Bd3Error

ALGOS = ("bd3lm", "mdlm", "ar", "sedd")
VARIANCES = ("paper", "block")
TRAIN_ESTIMATORS = ("t", "k")  # bd3.diffusion.estimators has the evaluation's third, exact
DEFAULT_TRAIN_ESTIMATOR = "k"  # SEDD (time-conditioned) trains with t
PRECISIONS = ("auto", "fp32", "bf16")
WRAPS = ("special", "raw")  # token-shard row formats (see bd3.data.shards)

# The full interval used for every likelihood evaluation (the paper's U[1e-3, 1]).
FULL_CLIP = (1e-3, 1.0)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise Bd3Error(message)


def check_clip(beta: float, omega: float) -> tuple[float, float]:
    """A clip interval of mask rates: inside [0, 1], beta <= omega, omega > 0."""
    beta, omega = float(beta), float(omega)
    _check(
        0.0 <= beta <= omega <= 1.0 and omega > 0.0,  # nan fails too
        f"The clip interval [{beta}, {omega}] must lie inside [0, 1] with beta <= omega and omega > 0; for example --clip 0.45,0.95.",
    )
    return beta, omega


def parse_clip(text: str) -> tuple[float, float]:
    """``BETA,OMEGA``, the syntax of --clip in every command, as a checked interval."""
    try:
        beta, omega = (float(v) for v in text.split(","))
    except ValueError:
        raise Bd3Error(f"{text!r} is not BETA,OMEGA (for example 0.45,0.95).") from None
    return check_clip(beta, omega)


@dataclass
class ModelConfig:
    """The DiT backbone (the reference's architecture); the model sees only this."""

    hidden_dim: int = 256  # width D of the residual stream
    n_heads: int = 4  # attention heads; head dim = hidden_dim / n_heads
    n_layers: int = 4  # transformer blocks
    cond_dim: int = 64  # width of the (constant) adaLN conditioning vector
    length: int = 128  # context length L in tokens
    dropout: float = 0.0  # dropout on the two residual branches
    causal: bool = False  # causal attention, no adaLN: the autoregressive baseline

    def __post_init__(self) -> None:
        for name in ("hidden_dim", "n_heads", "n_layers", "cond_dim", "length"):
            _check(getattr(self, name) > 0, f"model.{name} must be positive, got {getattr(self, name)}.")
        _check(
            self.hidden_dim % self.n_heads == 0 and (self.hidden_dim // self.n_heads) % 2 == 0,
            f"model.hidden_dim ({self.hidden_dim}) must be a multiple of n_heads ({self.n_heads}) "
            "with an even head dimension (rotary embeddings rotate pairs of features).",
        )
        _check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}.")

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.n_heads


# Named sizes. `tiny` and `small` are the reference's; `nano` is the default on a laptop CPU.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "nano": dict(hidden_dim=256, n_heads=4, n_layers=4, cond_dim=64, dropout=0.0),
    "tiny": dict(hidden_dim=256, n_heads=8, n_layers=8, cond_dim=64, dropout=0.1),
    "small": dict(hidden_dim=768, n_heads=12, n_layers=12, cond_dim=128, dropout=0.1),
    "medium": dict(hidden_dim=1024, n_heads=16, n_layers=24, cond_dim=128, dropout=0.1),
}


@dataclass
class DiffusionConfig:
    """The training objective: algorithm, block size, noise schedule and clip interval."""

    algo: str = "bd3lm"  # bd3lm | mdlm (block size = length) | ar (causal, next token) | sedd (score entropy)
    block_size: int = 16  # tokens per block L'; must divide the length
    schedule: str = "linear"  # noise schedule spec, e.g. "cosine" or "gaussian:mu=0.5:sigma=0.2"
    weighting: str = "elbo"  # training loss reweighting: elbo, edm, iddpm, sigmoid:k=K, fm, simple
    estimator: str | None = None  # training NELBO estimator: k (k masked per block, weight n/k) or t (t per block, weight p'/p); None: k, t for SEDD
    clip: tuple[float, float] = FULL_CLIP  # mask rates drawn from [beta, omega] during training
    resample: bool = False  # force each block's realised mask rate into the clip interval
    clip_search: bool = False  # at each validation, move the clip to the lowest-variance interval
    fix_clip: bool = False  # with clip_search: only report the search, keep the interval
    variance: str = "paper"  # which variance the search minimises: paper (across batches) or block
    antithetic: bool = True  # stratified draws of t over the (sequence, block) pairs
    ignore_bos: bool = True  # position 0 (BOS; in raw rows a given first token, as in the reference's OWT runs) is never masked, not counted

    def __post_init__(self) -> None:
        # The specs' own vocabulary lives with their maths; canonical specs name every parameter.
        from bd3.diffusion.schedules import canonical, get_schedule, parse_spec
        from bd3.diffusion.weighting import WEIGHTING_DEFAULTS

        _check(self.algo in ALGOS, f"Unknown algorithm {self.algo!r}; choose one of {', '.join(ALGOS)}.")
        self.schedule = canonical(self.schedule)
        get_schedule(self.schedule)
        parse_spec(self.weighting, WEIGHTING_DEFAULTS)
        if self.estimator is None:
            self.estimator = "t" if self.algo == "sedd" else DEFAULT_TRAIN_ESTIMATOR
        _check(self.estimator in TRAIN_ESTIMATORS, f"Unknown training estimator {self.estimator!r}; choose one of {', '.join(TRAIN_ESTIMATORS)}.")
        _check(self.estimator == "t" or self.algo != "sedd",
               "SEDD is time-conditioned, so the k estimator (which regroups the bound by the number of masked tokens) does not apply to it; use --estimator t.")
        _check(self.variance in VARIANCES, f"Unknown variance {self.variance!r}; choose one of {', '.join(VARIANCES)}.")
        _check(self.block_size > 0, f"The block size must be positive, got {self.block_size}.")
        self.clip = check_clip(*self.clip)


@dataclass
class DataConfig:
    """Where tokens come from and the tokenizer's special ids (checked against the shards)."""

    data: str = "web"  # built-in set, hub set name, or path/glob
    tokenizer: str = "bpe"  # gpt2 | bert-base-uncased | bpe | path/to/tokenizer.json
    vocab_size: int = 0  # model vocabulary, including the mask token (filled from the tokenizer)
    mask_id: int = -1
    bos_id: int = -1
    eos_id: int = -1
    pad_id: int = -1
    tokenizer_sha256: str = ""  # hash of tokenizer.json, to refuse a mismatched tokenizer
    wrap: str = "special"  # row format: special ([BOS] + L-2 + [EOS], LM1B) or raw (L stream tokens, OWT)

    def __post_init__(self) -> None:
        _check(self.wrap in WRAPS, f"Unknown row format data.wrap {self.wrap!r}; choose one of {', '.join(WRAPS)}.")
        if self.vocab_size:
            _check(0 <= self.mask_id < self.vocab_size, f"data.mask_id {self.mask_id} is outside the vocabulary.")
            _check(self.pad_id != self.mask_id, "The pad id must differ from the mask id.")

    @property
    def start_id(self) -> int:
        """The token a sample starts from: BOS for special rows; for raw rows, which never hold
        BOS, EOS, the separator that precedes every document in the training stream."""
        return self.bos_id if self.wrap == "special" else self.eos_id


@dataclass
class TrainConfig:
    """The optimisation loop."""

    steps: int = 1500  # optimiser steps
    batch_size: int = 16  # sequences per forward pass on each process (the micro-batch)
    global_batch_size: int = 0  # sequences per optimiser step over all processes; 0: batch_size x processes
    lr: float = 1e-3  # peak AdamW learning rate
    warmup_steps: int = 10  # linear warm-up from 0, then constant (the reference: 2500 at batch 512)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    ema_decay: float = 0.9999  # with warm-up min(decay, (1 + n) / (10 + n))
    seed: int = 1
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast where the device supports it, else fp32
    log_every: int = 20
    save_every: int = 0  # also checkpoint (and validate) every N steps; 0: only at the end
    keep_last: int = 0  # keep only the newest N checkpoints (and the best); 0 keeps all
    skip_nonfinite: int = 0  # tolerate up to N steps with a non-finite loss or gradient
    eval_batches: int = 16  # validation batches at each checkpoint
    parent: str | None = None  # the run this one was fine-tuned from

    def __post_init__(self) -> None:
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        _check(self.steps > 0, f"The number of steps must be positive, got {self.steps}.")
        _check(self.batch_size > 0, f"The batch size must be positive, got {self.batch_size}.")
        _check(self.global_batch_size >= 0, f"The global batch size cannot be negative, got {self.global_batch_size}.")
        _check(self.lr > 0, f"The learning rate must be positive, got {self.lr}.")
        _check(self.warmup_steps >= 0, "The number of warm-up steps cannot be negative.")
        _check(self.log_every > 0, f"--log-every must be positive, got {self.log_every}.")
        _check(self.save_every >= 0, f"--save-every cannot be negative, got {self.save_every}.")
        _check(self.keep_last >= 0, f"--keep-last cannot be negative, got {self.keep_last}.")
        _check(self.skip_nonfinite >= 0, f"--skip-nonfinite cannot be negative, got {self.skip_nonfinite}.")
        _check(0.0 <= self.ema_decay < 1.0, f"The EMA decay must be in [0, 1), got {self.ema_decay}.")
        _check(self.precision in PRECISIONS, f"Unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}.")


@dataclass
class RunConfig:
    """Everything a run needs, stored as its config.json."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    version: str = __version__

    def __post_init__(self) -> None:
        length, block_size = self.model.length, self.diffusion.block_size
        if self.diffusion.algo in ("mdlm", "sedd"):  # one block: the whole length
            self.diffusion.block_size = block_size = length
        elif self.diffusion.algo == "ar":
            self.diffusion.block_size = block_size = 1
        _check(
            length % block_size == 0,
            f"The block size ({block_size}) must divide the length ({length}); "
            f"for example --block-size {_largest_divisor(length, block_size)}.",
        )
        _check(self.model.causal == (self.diffusion.algo == "ar"), "model.causal must be true exactly for --algo ar.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        _reject_unknown(cls, d, "config")
        parts = {}
        for f in dataclasses.fields(cls):
            if f.name == "version" or f.name not in d:
                continue
            sub = d[f.name]
            _check(isinstance(sub, dict), f"config.{f.name} must be an object.")
            sub_cls = {"model": ModelConfig, "diffusion": DiffusionConfig, "data": DataConfig, "train": TrainConfig}[f.name]
            _reject_unknown(sub_cls, sub, f"config.{f.name}")
            kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in sub.items()}
            if f.name == "diffusion":
                kwargs.setdefault("estimator", "t")  # runs made before the k estimator trained with t
            try:
                parts[f.name] = sub_cls(**kwargs)
            except TypeError as e:
                raise Bd3Error(f"config.{f.name} is malformed: {e}") from None
        return cls(**parts, version=d.get("version", __version__))

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise Bd3Error(f"{path} does not exist; is this a bd3 run directory?") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Bd3Error(f"{path} is not valid JSON ({e}); restore it or re-create the run.") from None
        _check(isinstance(d, dict), f"{path} must hold a JSON object.")
        try:
            return cls.from_dict(d)
        except Bd3Error as e:
            raise Bd3Error(f"{path}: {e}") from None


def _reject_unknown(cls: type, d: dict[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    _check(not unknown, f"Unknown key(s) in {where}: {', '.join(unknown)}. Known keys: {', '.join(sorted(known))}.")


def _largest_divisor(length: int, at_most: int) -> int:
    return max(d for d in range(1, max(1, min(length, at_most)) + 1) if length % d == 0)


def model_config(preset: str, length: int, **overrides: Any) -> ModelConfig:
    """A named model size at a context length."""
    _check(preset in MODEL_PRESETS, f"Unknown model size {preset!r}; choose one of {', '.join(MODEL_PRESETS)}.")
    return ModelConfig(**{**MODEL_PRESETS[preset], "length": length, **overrides})
