"""bd3 runs as an lm-evaluation-harness model (``lm-eval`` on PyPI, ``pip install 'bd3[harness]'``).

Importing this module registers :class:`Bd3LM` with lm-eval under the name ``bd3``::

    import lm_eval
    from bd3.evaluate.harness import Bd3LM
    lm_eval.simple_evaluate(model=Bd3LM(run="runs/owt-bs4"), tasks=["lambada_openai"])

Log-likelihoods come from :class:`bd3.evaluate.continuations.Scorer`: exact for AR runs,
lower bounds (minus the NELBO) for BD3-LM and MDLM runs. SEDD runs are time-conditioned,
so bd3 computes no conditional likelihood for them: they run ``generate_until`` tasks only.

Offline: a task whose data set is a local file (a YAML under ``--include-path`` with
``dataset_path: json`` and ``data_files``) runs without the network; any other task needs
the HuggingFace hub, and when the hub cannot be reached that is one error, at once, before
lm-eval indexes its thousands of built-in tasks.
"""

from __future__ import annotations

import difflib
import json
import os
from collections import Counter
from pathlib import Path

from bd3.errors import Bd3Error

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:
    raise Bd3Error("--tasks needs lm-evaluation-harness: pip install 'bd3[harness]' (or pip install lm-eval).") from None

from tqdm import tqdm

from bd3.diffusion.estimators import EXACT_MAX_BLOCK, resolve_estimator
from bd3.evaluate.continuations import Scorer
from bd3.sampling.types import Decoding
from bd3.sampling.generate import generate

DEFAULT_PASSES = 8  # passes of the k estimator per request (block sizes above EXACT_MAX_BLOCK)
DEFAULT_MAX_GEN_TOKS = 256
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")  # datasets' builders that read local files
TASK_KINDS = {"loglikelihood": "loglikelihood", "multiple_choice": "loglikelihood",
              "loglikelihood_rolling": "loglikelihood_rolling", "generate_until": "generate_until"}
HOW_TO_COPY = ("make a local copy: a task YAML whose dataset_path is json with dataset_kwargs: {data_files: {test: FILE.jsonl}}, "
               "in a folder passed with --include-path")


@register_model("bd3")
class Bd3LM(TemplateLM):
    """A bd3 run (its EMA weights) as an lm-eval model.

    ``estimator``: exact or k for BD3-LM and MDLM runs (default: exact where the block size
    allows, else k with ``passes`` passes); AR runs are exact. Greedy generation unless the
    task asks ``do_sample``. Options arrive as strings from ``model_args``."""

    def __init__(self, run: str | Path, batch_size: int | str | None = 16, device: str | None = "auto", estimator: str | None = None,
                 passes: int | str = DEFAULT_PASSES, seed: int | str = 1, **kwargs) -> None:
        super().__init__()
        unknown = set(kwargs) - {"max_batch_size"}  # lm-eval passes max_batch_size to every model
        if unknown:
            raise Bd3Error(f"Unknown bd3 model argument(s) {', '.join(sorted(unknown))}; bd3 takes run, batch_size, device, estimator, passes, seed.")
        from bd3.runs.load import load_model, open_run, run_tokenizer  # the run's strict loading and tokenizer check
        from bd3.runtime import resolve_device

        r = open_run(Path(run))
        self.run_path, self.config = r.path, r.config
        self.tok = run_tokenizer(r)
        self._device = resolve_device(device or "auto")
        self.model = load_model(r, self._device)
        d = self.config.diffusion
        # lm-eval passes batch_size=None (or "auto") when none was asked: bd3's default then
        self.algo, self.batch_size, self.seed = d.algo, int(batch_size) if str(batch_size).isdigit() else 16, int(seed)
        self.estimator = default_estimator(d.algo, d.block_size, estimator)
        self.passes = int(passes) if self.estimator == "k" else 1
        self.scorer = None if d.algo == "sedd" else Scorer(
            self.model, self.config, self.estimator, self.passes, self.batch_size, self.seed, self._device)

    @property
    def eot_token_id(self) -> int:
        return self.config.data.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self._scorer("loglikelihood").prefix_token_id

    @property
    def max_length(self) -> int:
        return self.config.model.length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)  # the row's BOS is the scorer's

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tok.decode(tokens)

    def _scorer(self, operation: str) -> Scorer:
        if self.scorer is None:
            raise Bd3Error(unsupported_by_sedd(operation))
        return self.scorer

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        scorer = self._scorer("loglikelihood")
        pairs = [(list(context), list(continuation)) for _, context, continuation in requests]
        out = scorer.loglikelihood(pairs)
        for (key, _, _), value in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", key, value)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        scorer = self._scorer("loglikelihood_rolling")
        texts = [req.args[0] for req in requests]
        out = scorer.rolling(self.tok.encode_batch(texts))
        for text, value in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), value)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """One sample per request, from the run's sampler with the context as prompt, cut
        at the first stop string (lm-eval's ``until``; EOS also ends it).

        Batched: requests with the same decoding (greedy, or sampled at a temperature and
        top-p) go through the sampler ``batch_size`` at a time, each row with its own prompt
        and length, longest prompts first; the results come back in the requests' order. A
        request's text does not depend on the others: every request draws from random
        stream 0 of ``seed``, except that a sampled request repeated in the list (lm-eval's
        ``repeats``) draws from streams 0, 1, 2, ... over its copies."""
        L = self.config.model.length
        prompts, max_tokens, stops, streams = [], [], [], []
        groups: dict[tuple[float, float], list[int]] = {}  # (top_p, temperature) -> requests
        copies: Counter = Counter()
        for i, req in enumerate(requests):
            context, kwargs = req.args
            until = kwargs.get("until") or []
            stops.append([until] if isinstance(until, str) else list(until))
            prompts.append([self.config.data.bos_id] + self.tok.encode(context)[-(L - 2):])  # cut from the left: BOS + prompt < L
            max_tokens.append(len(prompts[-1]) + int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)))
            sampled = kwargs.get("do_sample", False) and float(kwargs.get("temperature", 1.0)) > 0
            key = (context, json.dumps(kwargs, sort_keys=True, default=str))
            streams.append(copies[key] if sampled else 0)
            copies[key] += 1
            decoding = (float(kwargs.get("top_p", 1.0)), float(kwargs.get("temperature", 1.0))) if sampled else (0.0, 1.0)
            groups.setdefault(decoding, []).append(i)
        out = [""] * len(requests)
        with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm) as bar:
            for (top_p, temperature), members in groups.items():
                members.sort(key=lambda i: -len(prompts[i]))  # a batch's prompts of similar lengths
                samples = generate(
                    self.model, self.config, batch_size=self.batch_size, prompts=[prompts[i] for i in members],
                    max_tokens=[max_tokens[i] for i in members], streams=[streams[i] for i in members],
                    decoding=Decoding(top_p=top_p, temperature=temperature, stop="eos"), seed=self.seed,
                    on_block=lambda event: bar.update(len(event.finished)),
                )
                for i, sample in zip(members, samples):
                    text = self.tok.decode(sample.tokens[sample.prompt_tokens:])
                    out[i] = text[: min([text.index(s) for s in stops[i] if s and s in text], default=len(text))]
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out


def default_estimator(algo: str, block_size: int, requested: str | None) -> str:
    """The estimator of downstream log-likelihoods: ``requested``, else exact where the block
    size allows it (deterministic), else k."""
    if requested is None and algo in ("bd3lm", "mdlm"):
        requested = "exact" if algo == "bd3lm" and block_size <= EXACT_MAX_BLOCK else "k"
    if requested == "t" and algo != "sedd":
        raise Bd3Error("Downstream log-likelihoods use the exact or k estimator (t draws a time per block, far noisier).")
    return resolve_estimator(algo, block_size, requested)


def unsupported_by_sedd(operation: str) -> str:
    return (f"SEDD runs do not support {operation}: SEDD is time-conditioned, so bd3's conditional bounds (exact, k) do not apply; "
            "SEDD runs evaluate generate_until tasks only.")


def task_folder(include_path: Path) -> Path:
    """``include_path``, checked: a folder holding task YAML files."""
    if not include_path.is_dir():
        raise Bd3Error(f"--include-path {include_path} is not a folder; pass the folder that holds your task YAML files.")
    if not any(include_path.rglob("*.yaml")):
        raise Bd3Error(f"--include-path {include_path} holds no task YAML (*.yaml) files; write one per task (see README: Downstream tasks).")
    return include_path


def task_manager(names: list[str], include_path: Path | None, algo: str):
    """lm-eval's TaskManager for ``names``: the local folder alone when every task is local
    (no index of lm-eval's built-in tasks, no network), else with the built-in tasks once
    the hub is known to be reachable (checked before lm-eval's slow import when no folder is
    given). Every mistake is one Bd3Error."""
    if include_path is None:
        _hub_or_fail(names)
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=str(task_folder(include_path)), include_defaults=False) if include_path else None
    index = local.task_index if local else {}
    if algo == "sedd":
        for n in names:
            kind = TASK_KINDS.get((index[n].cfg or {}).get("output_type", "")) if n in index else None
            if kind and kind != "generate_until":
                raise Bd3Error(f"task {n}: " + unsupported_by_sedd(kind))
    elsewhere = [n for n in names if n not in index]
    hub = [n for n in names if n in index and not _local_data(index[n].cfg or {}, include_path)]
    if local is not None and not elsewhere and not hub:
        return local
    if include_path is not None:
        _hub_or_fail(elsewhere + hub, f"not in --include-path {include_path}{_close(elsewhere, index)}; " if elsewhere else "")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    known = set(manager.all_tasks) | set(manager.all_groups) | set(manager.all_tags)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise Bd3Error(f"Unknown task {', '.join(unknown)}{_close(unknown, known)} among lm-eval's tasks and those under --include-path.")
    return manager


def _hub_or_fail(names: list[str], where: str = "") -> None:
    """Nothing when the hub can be reached (or HF's offline mode reads its cache), else one error."""
    from bd3.data.sources import HUB_HOST, hub_reachable

    offline = any(os.environ.get(v, "").strip().upper() in {"1", "ON", "YES", "TRUE"} for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not offline and not hub_reachable():
        raise Bd3Error(f"{', '.join(names)}: {where}lm-eval's tasks read their data sets from the HuggingFace hub, and "
                       f"{HUB_HOST} cannot be reached (offline?). Run them where the hub is reachable, or {HOW_TO_COPY}.")


def _local_data(cfg: dict, include_path: Path | None) -> bool:
    """Whether a task's data set is a local file or folder (so it loads offline)."""
    path = str(cfg.get("dataset_path", ""))
    return path in LOCAL_BUILDERS or (include_path is not None and (include_path / path).exists()) or Path(path).exists()


def _close(names: list[str], known) -> str:
    matches = [m for n in names for m in difflib.get_close_matches(n, list(known), n=1)]
    return f" (did you mean {', '.join(matches)}?)" if matches else ""


def evaluate_tasks(
    run: Path,
    names: list[str],
    *,
    num_fewshot: int | None = None,
    limit: float | None = None,
    include_path: Path | None = None,
    batch_size: int = 16,
    device: str = "auto",
    estimator: str | None = None,
    passes: int = DEFAULT_PASSES,
    seed: int = 1,
    output: Path | None = None,
) -> dict:
    """lm-eval's results for ``names`` on the bd3 run at ``run``, with what the numbers are
    (also written to ``output``, a new file, as JSON)."""
    import lm_eval

    from bd3.runs import Run, resolve_run

    if output is not None and output.exists():
        raise Bd3Error(f"{output} already exists; choose another --output path or remove it.")
    r = Run.open(resolve_run(run))
    d = r.config.diffusion
    default_estimator(d.algo, d.block_size, estimator)  # a wrong --estimator fails before any task is read
    manager = task_manager(names, include_path, d.algo)
    model = Bd3LM(run=r.path, batch_size=batch_size, device=device, estimator=estimator, passes=passes, seed=seed)
    try:
        results = lm_eval.simple_evaluate(
            model=model, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=False,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )
    except Bd3Error:
        raise
    except Exception as e:  # a data set that does not load, a task YAML lm-eval rejects: one line for the user
        raise Bd3Error(f"lm-eval could not run {', '.join(names)}: {type(e).__name__}: {e}".replace("\n", " ")) from e
    result = {
        "run": str(model.run_path), "algo": d.algo, "block_size": d.block_size, "estimator": model.estimator,
        "passes": model.passes, "bound": d.algo in ("bd3lm", "mdlm"),
        "lm_eval": json.loads(json.dumps(results, default=str)),  # its configs hold functions: their names
    }
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def metric_rows(result: dict) -> list[dict]:
    """One row per (task, metric) of lm-eval's results: value and standard error."""
    rows = []
    for task, metrics in result["lm_eval"]["results"].items():
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):  # metrics are "name,filter"
                continue
            metric, _, flt = key.partition(",")
            se = metrics.get(f"{metric}_stderr,{flt}")
            rows.append({"task": task, "metric": metric, "filter": flt, "value": value,
                         "stderr": se if isinstance(se, (int, float)) else None})
    return rows
