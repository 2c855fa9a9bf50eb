"""Where documents come from: built-in corpora, local files and HuggingFace hub sets.

A *document* is one unit of text that the tokenizer wraps with an EOS token:

* built-in sets (``web``, ``devil``, ``jargon``, ``mhcc``) and local ``*.txt`` files:
  one paragraph (blank-line separated, stripped, non-empty);
* local ``*.jsonl``: one record (field ``text``, or the record's only string field);
* local ``*.parquet``: one row (column ``text``, or the only string column);
* hub sets: one record of the named field.

Splits are reproducible. The built-in training corpus ``web`` holds out whole books: its
``valid`` split is every document from the heading ``The Acts of the Apostles`` to the end
(Acts, the New Testament letters and Revelation: about 124k tokens with the shipped BPE,
about 10 % of the corpus, enough to compare models), ``train`` everything before it
(:data:`BUILTIN_VALID_FROM`). For the other built-in sets and local data, document ``i``
(counted over the whole set, files in sorted order) is in ``valid`` when ``i % 50 == 49``
and in ``train`` otherwise. ``all`` is every document. Local files are read one at a time, so a corpus split
over many files is never in memory at once. Hub sets use their own splits (see
``HUB_SETS``); ``all`` is train followed by valid. OpenWebText has a single split; as in the
reference, its last 100,000 documents are ``valid`` and the others ``train``
(:func:`last_documents_split`). Hub sets are memory-mapped Arrow files in the HF cache, read
in batches.

Hub sets need the network. Before :mod:`datasets` is imported, the hub's host name is
resolved (and, without a proxy, connected to) with a short time limit, so an offline
machine gets a :class:`~bd3.errors.Bd3Error` naming the offline alternatives within about
two seconds instead of minutes of retries.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import re
import socket
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from bd3.data.detokenizers import DETOKENIZERS
from bd3.errors import Bd3Error

CORPORA_DIR = Path(__file__).resolve().parent / "corpora"

BUILTIN_SETS: dict[str, str] = {
    "web": "World English Bible (public domain); the built-in training corpus",
    "devil": "Ambrose Bierce, The Devil's Dictionary (1911); out-of-domain held-out set",
    "jargon": "The Jargon File 4.4.7; out-of-domain held-out set",
    "mhcc": "Matthew Henry's Concise Commentary; same-domain held-out set",
}

SPLITS = ("train", "valid", "all")
VALID_EVERY = 50  # document i is in `valid` when i % VALID_EVERY == VALID_EVERY - 1
# Built-in sets whose `valid` split is whole books: every document from this heading on.
BUILTIN_VALID_FROM: dict[str, str] = {"web": "The Acts of the Apostles"}
TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES

HUB_HOST = "huggingface.co"
HUB_PROBE_SECONDS = 0.9  # each of: name resolution, TCP connect


@dataclass(frozen=True)
class HubSet:
    """A named HuggingFace dataset: repo path, config, text field and split names
    (``datasets`` split specs); ``data_files`` for a builder such as ``json`` or ``parquet``."""

    path: str
    config: str | None
    field: str
    train: str
    valid: str
    data_files: str | None = None


OWT_VALID_DOCUMENTS = 100_000  # the reference's OpenWebText split: the last 100k documents


def last_documents_split(k: int, split: str = "train") -> tuple[str, str]:
    """(train, valid) split specs that hold out the last ``k`` documents of ``split``."""
    if k < 1:
        raise Bd3Error(f"the validation split needs at least one document, got {k}")
    return f"{split}[:-{k}]", f"{split}[-{k}:]"


HUB_SETS: dict[str, HubSet] = {
    "owt": HubSet("Skylion007/openwebtext", None, "text", *last_documents_split(OWT_VALID_DOCUMENTS)),
    "lm1b": HubSet("lm1b", None, "text", "train", "test"),
    "wikitext103": HubSet("wikitext", "wikitext-103-raw-v1", "text", "train", "validation"),
    "wikitext2": HubSet("wikitext", "wikitext-2-raw-v1", "text", "train", "validation"),
    "ptb": HubSet("ptb_text_only", None, "sentence", "train", "validation"),
    "lambada": HubSet("lambada", None, "text", "train", "test"),
    "ag_news": HubSet("ag_news", None, "text", "train", "test"),
    "pubmed": HubSet("scientific_papers", "pubmed", "article", "train", "validation"),
    "arxiv": HubSet("scientific_papers", "arxiv", "article", "train", "validation"),
}

OFFLINE_ALTERNATIVES = (
    "use local files with --data path/to/*.txt|*.jsonl|*.parquet, or a built-in set: "
    + ", ".join(BUILTIN_SETS)
)


# ----------------------------------------------------------------------------- public API


def read_documents(data: str, split: str) -> list[str]:
    """All documents of ``split`` ('train', 'valid' or 'all') of the source ``data``."""
    return list(iter_documents(data, split))


def iter_documents(data: str, split: str, detokenizer: str | None = None) -> Iterator[str]:
    """Like :func:`read_documents` but lazy: local files are read one at a time, hub sets
    in batches.

    ``detokenizer`` names a set in ``DETOKENIZERS`` whose detokenizer is applied to every
    document; hub sets use their own by default (as the reference does)."""
    _check_split(split)
    if detokenizer is None and data in HUB_SETS:
        detokenizer = data
    if data in BUILTIN_VALID_FROM:
        docs = _select_from(_paragraphs(_read_text(builtin_path(data))), split, BUILTIN_VALID_FROM[data])
    elif data in BUILTIN_SETS:
        docs = _select(_paragraphs(_read_text(builtin_path(data))), split)
    elif data in HUB_SETS:
        docs = _hub_documents(data, split)
    else:
        docs = _select(_local_documents(resolve_files(data)), split)
    fn = DETOKENIZERS.get(detokenizer) if detokenizer else None
    return map(fn, docs) if fn else docs


def describe_source(data: str) -> dict[str, Any]:
    """A JSON-able description of ``data`` for meta.json and cache keys."""
    if data in BUILTIN_SETS:
        path = builtin_path(data)
        return {
            "kind": "builtin",
            "name": data,
            "file": path.name,
            "size": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "valid": _valid_rule(data),  # part of the shard cache key: a new split, new shards
        }
    if data in HUB_SETS:
        hub = HUB_SETS[data]
        return {
            "kind": "hub",
            "name": data,
            "path": hub.path,
            "config": hub.config,
            "field": hub.field,
            "splits": {"train": hub.train, "valid": hub.valid},
            **({"data_files": hub.data_files} if hub.data_files else {}),
        }
    return {"kind": "files", "spec": data, "files": [_file_info(p) for p in resolve_files(data)]}


def builtin_path(name: str) -> Path:
    """The packaged ``.txt.gz`` of a built-in set."""
    if name not in BUILTIN_SETS:
        raise Bd3Error(f"unknown built-in set {name!r}; choose one of {', '.join(BUILTIN_SETS)}")
    return CORPORA_DIR / f"{name}.txt.gz"


def resolve_files(data: str) -> list[Path]:
    """The sorted local files that ``data`` (a file, a folder or a glob) stands for."""
    spec = os.path.expanduser(data)
    if glob.has_magic(spec):
        paths = [Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()]
        if not paths:
            raise Bd3Error(f"no files match {data!r}; {_data_choices()}")
    elif Path(spec).is_dir():
        paths = [p for p in Path(spec).iterdir() if p.is_file() and _suffix(p)]
        if not paths:
            raise Bd3Error(
                f"folder {data} holds no {', '.join(SUPPORTED_SUFFIXES)} files; {_data_choices()}"
            )
    elif Path(spec).is_file():
        paths = [Path(spec)]
    else:
        raise Bd3Error(f"no such file, folder or data set: {data!r}; {_data_choices()}")
    for path in paths:
        if _suffix(path) is None:
            raise Bd3Error(
                f"{path}: unsupported file type; use {', '.join(SUPPORTED_SUFFIXES)} files"
            )
    return sorted(p.resolve() for p in paths)


# ----------------------------------------------------------------------------- splitting


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise Bd3Error(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def _select(docs: Iterable[str], split: str) -> Iterator[str]:
    if split == "all":
        return iter(docs)
    want_valid = split == "valid"
    return (d for i, d in enumerate(docs) if (i % VALID_EVERY == VALID_EVERY - 1) == want_valid)


def _select_from(docs: list[str], split: str, heading: str) -> Iterator[str]:
    """``valid``: the documents from the first one equal to ``heading`` on; ``train``: those before."""
    if split == "all":
        return iter(docs)
    try:
        start = docs.index(heading)
    except ValueError:
        raise Bd3Error(
            f"the built-in corpus has no document {heading!r}, where its validation split starts; "
            "the packaged file was modified: reinstall bd3"
        ) from None
    return iter(docs[start:] if split == "valid" else docs[:start])


def _valid_rule(name: str) -> str:
    if name in BUILTIN_VALID_FROM:
        return f"whole books: from {BUILTIN_VALID_FROM[name]!r} to the end"
    return f"every {VALID_EVERY}th document"


def _paragraphs(text: str) -> list[str]:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _data_choices() -> str:
    return (
        "pass a path or glob of *.txt, *.jsonl or *.parquet files (.txt.gz/.jsonl.gz allowed), "
        f"a built-in set ({', '.join(BUILTIN_SETS)}) or a hub set ({', '.join(HUB_SETS)})"
    )


# ----------------------------------------------------------------------------- local files


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return None


def _file_info(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime": stat.st_mtime}


def _local_documents(files: list[Path]) -> Iterator[str]:
    """The documents of ``files``, one file in memory at a time."""
    for path in files:
        file_docs = _file_documents(path)
        if not file_docs:
            raise Bd3Error(f"{path} holds no text (empty file); remove it or pass other data")
        yield from file_docs


def _file_documents(path: Path) -> list[str]:
    suffix = _suffix(path)
    if suffix in PARQUET_SUFFIXES:
        return _parquet_documents(path)
    text = _read_text(path)
    if suffix in JSONL_SUFFIXES:
        return _jsonl_documents(path, text)
    return _paragraphs(text)


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise Bd3Error(f"cannot read {path}: {exc}; check the file (a .gz must be gzip)") from exc
    return raw


def _read_text(path: Path) -> str:
    raw = _read_bytes(path)
    if b"\x00" in raw:
        raise Bd3Error(f"{path} looks binary (it has NUL bytes); pass a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Bd3Error(
            f"{path} is not UTF-8 text (bad byte at offset {exc.start}); convert it to UTF-8"
        ) from exc
    return text.removeprefix("\ufeff")


def _jsonl_documents(path: Path, text: str) -> list[str]:
    docs: list[str] = []
    field: str | None = None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        record = _json_record(path, lineno, line)
        field = field or _text_field(path, lineno, record)
        value = record.get(field)
        if value is not None and not isinstance(value, str):
            raise Bd3Error(f"{path}:{lineno}: field {field!r} is not a string")
        if value and value.strip():
            docs.append(value.strip())
    return docs


def _json_record(path: Path, lineno: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise Bd3Error(f"{path}:{lineno}: not valid JSON ({exc}); one object per line") from exc
    if not isinstance(record, dict):
        raise Bd3Error(f"{path}:{lineno}: each line must be a JSON object with a 'text' field")
    return record


def _text_field(path: Path, lineno: int, record: dict[str, Any]) -> str:
    if "text" in record:
        return "text"
    strings = [k for k, v in record.items() if isinstance(v, str)]
    if len(strings) == 1:
        return strings[0]
    raise Bd3Error(
        f"{path}:{lineno}: no usable text field (fields: {', '.join(record) or 'none'}); "
        "give each record a 'text' field"
    )


def _parquet_documents(path: Path) -> list[str]:
    import pyarrow.parquet as pq  # imported lazily: it is slow to import

    try:
        table = pq.read_table(path, columns=[_parquet_column(path)])
    except Bd3Error:
        raise
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise Bd3Error(f"cannot read {path} as parquet: {exc}") from exc
    values = table.column(0).to_pylist()
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def _parquet_column(path: Path) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # ArrowInvalid, OSError, ...
        raise Bd3Error(f"cannot read {path} as parquet: {exc}") from exc
    if "text" in schema.names:
        return "text"
    strings = [f.name for f in schema if pa.types.is_string(f.type)
               or pa.types.is_large_string(f.type)]
    if len(strings) == 1:
        return strings[0]
    raise Bd3Error(
        f"{path}: no usable text column (columns: {', '.join(schema.names) or 'none'}); "
        "add a 'text' column"
    )


# ----------------------------------------------------------------------------- hub sets


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the hub's host resolves (and accepts a connection) within ``timeout`` s each."""
    return host_reachable(HUB_HOST, timeout)


def host_reachable(host: str, timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether ``host`` resolves (and accepts a connection on port 443) within ``timeout`` s each."""
    if not _run_with_timeout(lambda: socket.getaddrinfo(host, 443), timeout):
        return False
    if _proxy_configured():
        return True  # a direct connection may be blocked while the proxy works
    return _run_with_timeout(
        lambda: socket.create_connection((host, 443), timeout).close(), timeout
    )


def _run_with_timeout(probe: Any, timeout: float) -> bool:
    """Run ``probe`` in a daemon thread; True if it returned without error in time."""
    outcome: dict[str, bool] = {}

    def target() -> None:
        try:
            probe()
            outcome["ok"] = True
        except OSError:
            outcome["ok"] = False

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome.get("ok", False)


def _proxy_configured() -> bool:
    return any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))


def _offline_mode() -> bool:
    flags = (os.environ.get(v, "") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(f.strip().upper() in {"1", "ON", "YES", "TRUE"} for f in flags)


def _hub_documents(name: str, split: str) -> Iterator[str]:
    hub = HUB_SETS[name]
    offline = _offline_mode()
    if not offline and not hub_reachable():
        raise Bd3Error(
            f"hub set {name!r} ({hub.path}) needs the HuggingFace hub, but {HUB_HOST} is unreachable "
            f"(offline?); {OFFLINE_ALTERNATIVES}. If the set is in your local HF cache, "
            "set HF_HUB_OFFLINE=1"
        )
    parts = [hub.train, hub.valid] if split == "all" else [getattr(hub, split)]
    datasets = [_load_hub_split(name, hub, part, offline) for part in parts]
    return _hub_texts(datasets, hub.field)


def _load_hub_split(name: str, hub: HubSet, part: str, offline: bool) -> Any:
    import datasets  # imported lazily: slow, and touches the network

    try:
        return datasets.load_dataset(hub.path, hub.config, split=part, data_files=hub.data_files)
    except Exception as exc:  # network, missing cache, missing set: all user-facing here
        where = "failed to load"
        if offline:
            where = "is not in the local HF cache (HF_HUB_OFFLINE is set)"
        hint = OFFLINE_ALTERNATIVES
        if "scripts are no longer supported" in str(exc):
            hint = f"the set still ships a loading script, which datasets >= 4 does not run: pip install 'datasets<4', or {OFFLINE_ALTERNATIVES}"
        raise Bd3Error(f"hub set {name!r} ({hub.path}, split {part}) {where}: {exc}; {hint}") from exc


def _hub_texts(datasets: list[Any], field: str) -> Iterator[str]:
    for ds in datasets:
        for batch in ds.iter(batch_size=1000):
            for text in batch[field]:
                if isinstance(text, str) and text.strip():
                    yield text.strip()
