"""The values bd3's options accept, in a module that imports nothing heavy.

The command line checks option values against these before torch, numpy or the data
libraries are imported (help, completion and usage errors stay fast); the library modules
that act on the values import them from here.
"""

from __future__ import annotations

from bd3.config import PRECISIONS

ATTN_BACKENDS = ("auto", "sdpa", "flex", "xformers")  # bd3.model.backends

# --precision: one vocabulary, one meaning per value, in every command:
#   fp32  float32 throughout
#   bf16  matrix products in bfloat16 (autocast; `bd3 export`: the weights stored as bfloat16)
#   fp16  the linear layers' weights stored as float16, products float32 (`bd3 sample` on x86 CPUs)
#   auto  the fastest of the command's values that this device computes natively
# Each command takes the values that apply to it (COMMAND_PRECISIONS) and documents its auto.
MODEL_PRECISIONS = tuple(p for p in PRECISIONS if p != "auto")  # what `auto` resolves to in training: fp32, bf16 (autocast)
SAMPLE_PRECISIONS = (*MODEL_PRECISIONS, "fp16")  # the sampling engine's: fp16 weights are its own
COMMAND_PRECISIONS = {
    "pretrain": PRECISIONS, "finetune": PRECISIONS, "eval": PRECISIONS, "variance": PRECISIONS,
    "sample": ("auto", *SAMPLE_PRECISIONS), "export": MODEL_PRECISIONS,
}
RULES = ("first-hitting", "ddpm", "threshold")  # update rules inside a block (bd3.sampling.block)
STOPS = ("none", "eos", "entropy", "both")  # per-row stop rules
LOGGERS = ("tensorboard", "wandb")  # experiment trackers (bd3.train.loggers); each the name of its extra and module
ESTIMATORS = ("exact", "k", "t")  # NELBO estimators of an evaluation (bd3.diffusion.estimators); training takes t and k
HELD_OUT = ("devil", "jargon", "mhcc")  # built-in sets never trained on by default
ZERO_SHOT_SETS = ("ptb", "wikitext2", "wikitext103", "lm1b", "lambada", "ag_news", "pubmed", "arxiv", *HELD_OUT)


def check_loggers(names) -> list[str]:
    """``names`` without repeats; an unknown name is a ValueError, a tracker whose package is
    not installed a Bd3Error naming the extra to install."""
    import importlib.util

    from bd3.errors import Bd3Error

    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not one of {', '.join(LOGGERS)}.")
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise Bd3Error(f"--logger {name} needs the {name} package: pip install 'bd3[{name}]'.")
    return list(dict.fromkeys(names))
