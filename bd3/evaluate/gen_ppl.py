"""Generative perplexity: samples scored by a judge language model (the reference's protocol).

A sample is the list of its documents: its tokens split at end-of-text, the leading BOS
dropped, each decoded with the sampler's tokenizer. The judge retokenises it with its own
tokenizer as ``[BOS] doc_1 [EOS] doc_2 ...`` (the reference decodes its samples with their
end-of-text tokens and retokenises that text) and scores every target except its EOS ids.
A sequence longer than the judge's context W is scored in windows of W tokens that move by
W / 2; each window scores only the targets the windows before it did not reach (the
reference's 1024 / 512 for GPT-2).

Reported, as :func:`generative_perplexity` returns them: the arithmetic mean of the
per-sample perplexities (the paper's number) with its standard error and 95 % interval over
the samples (another set of samples from the same model would land in it), the token-pooled
perplexity, the mean per-sample unigram entropy (nats) of the scored tokens, model calls per
generated token, and the median and largest number of scored tokens per sample.

A judge is anything with the :class:`Judge` methods: :class:`RunJudge` wraps a bd3 run
trained with ``--algo ar``, :class:`HFJudge` a HuggingFace causal LM (``gpt2-large`` in
the paper), loaded by :func:`load_hf_judge` with the optional ``transformers``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from bd3.data.sources import HUB_HOST, hub_reachable
from bd3.errors import Bd3Error
from bd3.evaluate.intervals import mean_interval
from bd3.runtime import autocast
from bd3.sampling.types import unigram_entropy
from bd3.sampling.text import render, sample_documents

MAX_WINDOW = 1024  # the reference's eval_context_size for a HuggingFace judge


class Judge(Protocol):
    """A causal language model that scores text with its own tokenizer."""

    name: str
    context: int  # tokens per window (the stride is half of it)
    bos_id: int | None  # put before every sample; None: its first token is context only
    eos_id: int | None  # between documents; never a scored target

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens added."""
        ...

    def nll(self, window: torch.Tensor) -> torch.Tensor:
        """(S,) token ids -> (S - 1,) float64 ``-log p(window[i] | window[:i])``, i = 1..S-1."""
        ...


@dataclass
class GenSample:
    """One sample to score: its documents, and the sampler's cost where it is known."""

    documents: list[str]
    nfe: int | None = None  # model calls the sampler spent on it
    new_tokens: int | None = None  # tokens it generated (BOS and prompt excluded)


# -- the pure parts ------------------------------------------------------------------------


def judge_ids(judge: Judge, documents: Sequence[str]) -> list[int]:
    """``[BOS] doc_1 [EOS] doc_2 ...`` in the judge's tokens (documents joined by a blank
    line when the judge has no EOS)."""
    ids = [] if judge.bos_id is None else [judge.bos_id]
    if judge.eos_id is None:
        return ids + judge.tokenize("\n\n".join(documents))
    for k, doc in enumerate(documents):
        if k:
            ids.append(judge.eos_id)
        ids += judge.tokenize(doc)
    return ids


def window_spans(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, end, first)`` per window over ``n`` tokens: the window is ``[start, end)``
    and it scores targets ``first..end-1`` (the first window from 1, later ones from where
    the previous window ended)."""
    if context < 2 or not 1 <= stride < context:
        raise ValueError(f"need context >= 2 and 1 <= stride < context, got {context}, {stride}")
    spans: list[tuple[int, int, int]] = []
    start = 0
    while n >= 2:
        end = min(start + context, n)
        spans.append((start, end, 1 if start == 0 else start + context - stride))
        if end == n:
            break
        start += stride
    return spans


def sequence_nll(judge: Judge, ids: Sequence[int]) -> np.ndarray:
    """(len(ids) - 1,) float64: entry k is ``-log p(ids[k + 1] | its window's prefix)``."""
    x = torch.tensor(list(ids), dtype=torch.long)
    out = np.zeros(max(len(ids) - 1, 0))
    for start, end, first in window_spans(len(ids), judge.context, judge.context // 2):
        nll = judge.nll(x[start:end])
        out[first - 1 : end - 1] = nll[first - start - 1 :].double().cpu().numpy()
    return out


def score_sample(judge: Judge, sample: GenSample) -> dict:
    """Per-sample numbers: scored tokens, their mean NLL and perplexity, their unigram entropy."""
    ids = judge_ids(judge, sample.documents)
    nll = sequence_nll(judge, ids)
    targets = np.asarray(ids[1:], dtype=np.int64)
    valid = targets != (-1 if judge.eos_id is None else judge.eos_id)
    tokens = int(valid.sum())
    mean = float(nll[valid].sum() / tokens) if tokens else None
    return {
        "tokens": tokens,
        "nll_sum": float(nll[valid].sum()),
        "nll": mean,
        "ppl": math.exp(mean) if mean is not None else None,
        "entropy": unigram_entropy(torch.from_numpy(targets[valid])) if tokens else 0.0,
        "nfe": sample.nfe,
        "new_tokens": sample.new_tokens,
    }


def summarize(scores: list[dict]) -> dict:
    """The table's numbers from the per-sample scores (samples without a scored token count
    in the lengths and entropy, not in the perplexities)."""
    scored = [s for s in scores if s["tokens"]]
    if not scored:
        raise Bd3Error("No sample has a token to score (all are empty or end-of-text only).")
    tokens = sum(s["tokens"] for s in scored)
    lengths = [s["tokens"] for s in scores]
    known = all(s["nfe"] is not None and s["new_tokens"] for s in scores)
    ppl = mean_interval([s["ppl"] for s in scored])
    return {
        "samples": len(scores),
        "tokens": tokens,
        "gen_ppl": ppl["mean"],
        "gen_ppl_se": ppl["se"],
        "gen_ppl_ci95": ppl["ci95"],
        "gen_ppl_pooled": math.exp(sum(s["nll_sum"] for s in scored) / tokens),
        "entropy": float(np.mean([s["entropy"] for s in scores])),
        "nfe_per_token": sum(s["nfe"] for s in scores) / sum(s["new_tokens"] for s in scores) if known else None,
        "length_median": float(statistics.median(lengths)),
        "length_max": max(lengths),
    }


def generative_perplexity(samples: Sequence[GenSample], judge: Judge) -> dict:
    """Every sample scored under ``judge``: the summary, with the per-sample scores under
    ``per_sample``, as a JSON-ready dict."""
    scores = [score_sample(judge, s) for s in samples]
    result = {"judge": judge.name, "window": judge.context, "stride": judge.context // 2, **summarize(scores)}
    result["per_sample"] = [{k: v for k, v in s.items() if k != "nll_sum"} for s in scores]
    return result


# -- samples from bd3 sample --format jsonl -------------------------------------------------


def read_samples(path: Path, tokenizer: Callable[[], object]) -> list[GenSample]:
    """The samples in a JSONL file of ``bd3 sample --format jsonl``. A record with
    ``tokens`` is split into documents with the sampler's tokenizer (``tokenizer()``, asked
    for once, when first needed), which must decode them to the record's ``text``; a record
    with only ``text`` is one document."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise Bd3Error(f"The samples file {path} does not exist; write one with `bd3 sample --format jsonl > {path}`.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise Bd3Error(f"Cannot read the samples file {path}: {e}") from None
    tok = None
    out = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise Bd3Error(f"{path} line {lineno} is not JSON ({e}); expected the output of `bd3 sample --format jsonl`.") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise Bd3Error(f"{path} line {lineno} has no \"text\" string; expected the output of `bd3 sample --format jsonl`.")
        nfe, new = rec.get("nfe"), rec.get("new_tokens")
        nfe = nfe if isinstance(nfe, int) else None
        new = new if isinstance(new, int) else None
        tokens = rec.get("tokens")
        if tokens is None:
            out.append(GenSample([rec["text"]], nfe, new))
            continue
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise Bd3Error(f"{path} line {lineno}: \"tokens\" must be a list of token ids.")
        if rec.get("prompt_tokens", 1) != 1:
            raise Bd3Error(
                f"{path} line {lineno} continues a prompt; generative perplexity scores unconditional samples "
                "(`bd3 sample` without --prompt)."
            )
        tok = tok or tokenizer()
        if render(tokens, tok).rstrip() != rec["text"]:
            raise Bd3Error(
                f"{path} line {lineno}: its tokens do not decode to its text with this run's tokenizer; pass the run that "
                "wrote the samples, or drop the \"tokens\" fields to score the text as it stands."
            )
        out.append(GenSample(sample_documents(tokens, tok), nfe, new))
    if not out:
        raise Bd3Error(f"{path} holds no samples.")
    return out


# -- judges ---------------------------------------------------------------------------------


class RunJudge:
    """A bd3 run trained with ``--algo ar``: exact NLL over windows of its model length."""

    def __init__(self, model, tokenizer, name: str, precision: str = "fp32") -> None:
        if not model.cfg.causal:
            raise Bd3Error(f"{name} is not an autoregressive run; a judge needs exact likelihoods (a run trained with --algo ar).")
        self.model, self.tokenizer, self.name, self.precision = model, tokenizer, name, precision
        self.context = model.cfg.length
        self.bos_id, self.eos_id = tokenizer.bos_id, tokenizer.eos_id

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    @torch.no_grad()
    def nll(self, window: torch.Tensor) -> torch.Tensor:
        device = self.model.vocab_embed.embedding.device
        x = window.to(device)
        with autocast(device, self.precision):
            return self.model(x[None, :-1], targets=x[None, 1:], mask_id=self.tokenizer.mask_id)[0].double()


class HFJudge:
    """A HuggingFace causal LM and its tokenizer (fp32, as the reference's gpt2-large)."""

    def __init__(self, model, tokenizer, name: str) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        cfg = model.config
        self.context = min(getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or MAX_WINDOW, MAX_WINDOW)
        self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def nll(self, window: torch.Tensor) -> torch.Tensor:
        x = window.to(self.model.device)
        logits = self.model(x[None, :-1]).logits[0].double()
        return -logits.log_softmax(-1).gather(-1, x[1:, None])[:, 0]


def transformers_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def load_hf_judge(name: str, device: torch.device) -> HFJudge:
    """``name`` (a hub id or a local folder) as a judge; a one-line error, without touching
    the network for long, when transformers is missing or the model cannot be had."""
    alternatives = "or judge with a bd3 run trained with --algo ar (--judge runs/NAME)"
    if not transformers_available():
        raise Bd3Error(f"--judge {name} is a HuggingFace model, which needs transformers: pip install 'bd3[transformers]'; {alternatives}.")
    local = Path(name).is_dir()
    parent = Path(name).parent
    if not local and (name.startswith((".", "/")) or name.count("/") > 1 or (parent != Path(".") and parent.is_dir())):
        raise Bd3Error(f"--judge {name} does not exist; pass a bd3 run trained with --algo ar, or a HuggingFace model id such as gpt2-large.")
    cached = local or _hf_cached(name)
    if not cached:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        if offline or not hub_reachable():
            why = "HF_HUB_OFFLINE is set" if offline else f"the HuggingFace hub ({HUB_HOST}) cannot be reached (offline?)"
            raise Bd3Error(
                f"--judge {name} is not in the local HuggingFace cache and {why}. Download it where the hub is reachable "
                f"(it is cached under ~/.cache/huggingface), pass its local folder, {alternatives}."
            )
    import transformers  # imported lazily: slow

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, local_files_only=cached)
        model = transformers.AutoModelForCausalLM.from_pretrained(name, local_files_only=cached)
    except Exception as e:  # hub, cache and format errors all mean the same to a user
        raise Bd3Error(f"Could not load --judge {name} with transformers: {e}".replace("\n", " ")) from None
    return HFJudge(model.float().to(device).eval(), tokenizer, name)


def _hf_cached(name: str) -> bool:
    """Whether the hub model ``name`` has its config in the local HF cache (no network)."""
    from huggingface_hub import try_to_load_from_cache  # installed with `datasets`

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # an id the cache cannot even name (HFValidationError): not cached
        return False
