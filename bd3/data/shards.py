"""Token shards: a data set tokenised once into fixed-length rows, memory-mapped for training.

Wrapping follows the BD3-LM reference (``wrap=True``), with its per-batch remainder bug
fixed: each document is tokenised without specials and followed by EOS; the concatenated
stream of a split is cut into rows of ``length`` tokens. Two row formats (``wrap``):

* ``special`` (the LM1B protocol, the default): ``[BOS] + (length - 2) stream tokens + [EOS]``;
* ``raw`` (the paper's OpenWebText protocol, its appendix C.1): ``length`` stream tokens, no
  injected BOS/EOS, so no position of a row is tied to end-of-text and a model can generate
  past its context. Documents are still separated by EOS in the stream.

Only the stream's final remainder (shorter than a row's body) is dropped.

A shard folder holds ``train.bin`` and ``valid.bin`` (flat C-order arrays of shape
``(rows, length)``, ``uint16`` when the vocabulary fits, else ``uint32``), the
``tokenizer.json`` used and ``meta.json``. It is written into a temporary sibling folder
and renamed into place, so a folder with a ``meta.json`` is always complete.

Tokenizing streams: documents are read lazily, encoded in chunks of ``ENCODE_CHUNK`` (by
``num_proc`` worker processes when asked, results taken in order) and the rows of each chunk
are appended to the split's file at once, so memory stays bounded by a few chunks whatever the
corpus size, and the files are byte-identical for every ``num_proc``.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np

from bd3.config import WRAPS
from bd3.data.sources import describe_source, iter_documents
from bd3.data.tokenizer import WEB_BPE_VOCAB_SIZE, Tokenizer, load_tokenizer
from bd3.errors import Bd3Error, cannot_write
from bd3.paths import holds_working_dir

FORMAT_VERSION = 1
MIN_LENGTH = 8
SHARD_SPLITS = ("train", "valid")
ENCODE_CHUNK = 4096  # documents per encode_batch call
COUNT_CHUNK = 1 << 22  # tokens per bincount call
META_KEYS = ("format_version", "tokenizer", "tokenizer_sha256", "vocab_size", "mask_id",
             "bos_id", "eos_id", "pad_id", "length", "dtype", "splits")


# ----------------------------------------------------------------------------- wrapping


def row_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (vocab_size <= 65536), else ``uint32``."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def wrap_rows(
    stream: np.ndarray, length: int, bos_id: int, eos_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``stream`` into ``[BOS] + (length-2) tokens + [EOS]`` rows; return (rows, remainder)."""
    body = length - 2
    n = len(stream) // body
    rows = np.empty((n, length), dtype=stream.dtype)
    rows[:, 0] = bos_id
    rows[:, -1] = eos_id
    rows[:, 1:-1] = stream[: n * body].reshape(n, body)
    return rows, stream[n * body:]


def raw_rows(stream: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``stream`` into rows of ``length`` tokens as they come; return (rows, remainder)."""
    n = len(stream) // length
    return stream[: n * length].reshape(n, length).copy(), stream[n * length:]


def body_length(length: int, wrap: str) -> int:
    """Stream tokens per row: ``length - 2`` for ``special`` rows, ``length`` for ``raw``."""
    return length - 2 if wrap == "special" else length


def check_wrap(wrap: str) -> str:
    if wrap not in WRAPS:
        raise Bd3Error(f"unknown row format --wrap {wrap!r}; choose one of {', '.join(WRAPS)}")
    return wrap


def document_stream(tokenizer: Tokenizer, docs: list[str], eos_between: bool = True) -> np.ndarray:
    """Token ids of ``docs``, each followed by EOS (unless ``eos_between`` is False, the
    reference's zero-shot protocol), as one int64 array."""
    flat: list[int] = []
    eos = tokenizer.eos_id
    for ids in tokenizer.encode_batch(docs):
        flat.extend(ids)
        if eos_between:
            flat.append(eos)
    return np.array(flat, dtype=np.int64)


class _RowWriter:
    """Appends wrapped rows to a binary file, carrying the remainder between chunks."""

    def __init__(self, fh: BinaryIO, tokenizer: Tokenizer, length: int, dtype: np.dtype, wrap: str = "special") -> None:
        self.fh, self.length, self.dtype, self.wrap = fh, length, dtype, wrap
        self.bos, self.eos, self.mask = tokenizer.bos_id, tokenizer.eos_id, tokenizer.mask_id
        self.carry = np.empty(0, dtype=dtype)
        self.rows = 0
        self.stream_tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        if tokens.size and (tokens == self.mask).any():
            raise Bd3Error(
                f"the text encodes to the mask token (id {self.mask}); use a tokenizer whose "
                "[MASK] is a special token (gpt2, bert-base-uncased, bpe)"
            )
        self.stream_tokens += tokens.size
        buf = np.concatenate([self.carry, tokens.astype(self.dtype)])
        if self.wrap == "raw":
            rows, self.carry = raw_rows(buf, self.length)
        else:
            rows, self.carry = wrap_rows(buf, self.length, self.bos, self.eos)
        rows.tofile(self.fh)
        self.rows += len(rows)


# ----------------------------------------------------------------------------- tokenize


def tokenize(
    data: str,
    tokenizer: str | Tokenizer,
    length: int,
    out_dir: str | Path,
    *,
    vocab_size: int = WEB_BPE_VOCAB_SIZE,
    force: bool = False,
    progress: bool = True,
    eos_between: bool = True,
    detokenizer: str | None = None,
    splits: tuple[str, ...] = SHARD_SPLITS,
    num_proc: int = 1,
    wrap: str = "special",
) -> "TokenShards":
    """Tokenise the ``splits`` (default train and valid) of ``data`` into a shard folder ``out_dir``.

    ``tokenizer='bpe'`` means the shipped web-bpe for ``data='web'`` (at the default
    8192 tokens) and otherwise a BPE of ``vocab_size`` trained on ``data``'s train split.
    An existing non-empty ``out_dir`` is an error unless ``force`` (and even then only a
    bd3 shard folder is replaced). ``num_proc`` worker processes encode (same bytes as one).
    ``wrap``: the row format, ``special`` or ``raw`` (see the module docstring).
    """
    _check_length(length)
    check_wrap(wrap)
    if num_proc < 1:
        raise Bd3Error(f"--num-proc must be at least 1, got {num_proc}")
    out_dir = Path(out_dir).expanduser()
    _check_out_dir(out_dir, force)
    source = describe_source(data)  # fails early on a bad --data
    tok = resolve_tokenizer(data, tokenizer, vocab_size)
    tmp = _make_tmp(out_dir)
    try:
        splits = {
            s: _write_split(data, s, tok, length, tmp / f"{s}.bin", progress, eos_between, detokenizer, num_proc, wrap)
            for s in splits
        }
        tok.save(tmp / "tokenizer.json")
        meta = _meta(tok, length, splits, source)
        meta.update(eos_between_documents=eos_between, detokenizer=detokenizer, wrap=wrap)
        _write_json(tmp / "meta.json", meta)
        _publish(tmp, out_dir, force)
    except OSError as e:  # a full disk, a folder that cannot be written
        raise cannot_write(out_dir, e, WRITE_ADVICE) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TokenShards(out_dir)


def resolve_tokenizer(
    data: str, tokenizer: str | Tokenizer, vocab_size: int = WEB_BPE_VOCAB_SIZE
) -> Tokenizer:
    """The tokenizer that :func:`tokenize` uses for ``data`` (see there for ``bpe``)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if tokenizer == "bpe" and not _uses_shipped_bpe(data, vocab_size):
        return load_tokenizer("bpe", texts=iter_documents(data, "train"), vocab_size=vocab_size)
    return load_tokenizer(tokenizer, vocab_size=vocab_size)


def _uses_shipped_bpe(data: str, vocab_size: int) -> bool:
    return data == "web" and vocab_size == WEB_BPE_VOCAB_SIZE


def _check_length(length: int) -> None:
    if not isinstance(length, (int, np.integer)) or length < MIN_LENGTH:
        raise Bd3Error(
            f"sequence length {length!r} is too short; use at least {MIN_LENGTH} (e.g. 128, 1024)"
        )


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    if not force:
        raise Bd3Error(
            f"{out_dir} already exists; pass --force to replace it, or choose another folder"
        )
    if not (out_dir.is_dir() and (out_dir / "meta.json").is_file()):
        raise Bd3Error(
            f"{out_dir} exists and is not a bd3 shard folder (no meta.json); refusing to replace "
            "it even with --force: choose another folder or delete it yourself"
        )
    if holds_working_dir(out_dir):
        raise Bd3Error(f"{out_dir} is the current folder or holds it; --force replaces only a shard folder elsewhere: choose another --out")
    foreign = sorted(p.name for p in out_dir.iterdir() if not (p.suffix == ".bin" or p.name in SHARD_FILES))
    if foreign:
        raise Bd3Error(
            f"{out_dir} holds files a shard folder does not ({', '.join(foreign[:3])}); refusing to replace it "
            "even with --force: choose another folder or delete it yourself"
        )


WRITE_ADVICE = "choose another --out (or BD3_CACHE_DIR for the data cache)"
SHARD_FILES = ("meta.json", "tokenizer.json")


def _make_tmp(out_dir: Path) -> Path:
    """A hidden temporary folder beside ``out_dir``, where the shards are written."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as e:
        raise cannot_write(out_dir, e, WRITE_ADVICE) from None


def _write_split(
    data: str, split: str, tok: Tokenizer, length: int, path: Path, progress: bool,
    eos_between: bool = True, detokenizer: str | None = None, num_proc: int = 1, wrap: str = "special",
) -> dict[str, int]:
    dtype = row_dtype(tok.vocab_size)
    documents = 0
    chunks = _chunks(iter_documents(data, split, detokenizer), ENCODE_CHUNK)
    with open(path, "wb") as fh, _progress_bar(f"tokenize {split}", progress) as bar:
        writer = _RowWriter(fh, tok, length, dtype, wrap)
        for n_docs, tokens in _encoded(chunks, tok, eos_between, num_proc):
            writer.add(tokens)
            documents += n_docs
            bar.update(n_docs)
    if writer.rows == 0:
        raise Bd3Error(
            f"data {data!r}, split {split!r}: {writer.stream_tokens} tokens from {documents} "
            f"documents make no row of length {length} (needs {body_length(length, wrap)}); the data is too "
            "small for that length: use a smaller --length or more data"
        )
    return {
        "rows": writer.rows,
        "tokens": writer.rows * length,
        "documents": documents,
        "stream_tokens": writer.stream_tokens,
        "dropped_tokens": int(writer.carry.size),
    }


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _encoded(
    chunks: Iterator[list[str]], tok: Tokenizer, eos_between: bool, num_proc: int
) -> Iterator[tuple[int, np.ndarray]]:
    """(documents, token stream) per chunk, in order; with ``num_proc`` > 1 encoded by that
    many worker processes, at most two chunks per worker in flight."""
    if num_proc == 1:
        for chunk in chunks:
            yield len(chunk), document_stream(tok, chunk, eos_between)
        return
    first = next(chunks, None)  # a source that fails (offline hub, bad file) fails before any worker starts
    if first is None:
        return
    chunks = itertools.chain([first], chunks)
    # spawn: fork would copy the parent's Rust thread pool (tokenizers disables it, loudly)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(num_proc, initializer=_worker_init, initargs=(tok.to_json(), tok.name, eos_between)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append((len(chunk), pool.apply_async(_worker_encode, (chunk,))))
            if len(pending) >= 2 * num_proc:
                n, result = pending.popleft()
                yield n, result.get()
        while pending:
            n, result = pending.popleft()
            yield n, result.get()


_WORKER: dict[str, Any] = {}


def _worker_init(tokenizer_json: str, name: str, eos_between: bool) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _WORKER.update(tok=Tokenizer(HFTokenizer.from_str(tokenizer_json), name), eos_between=eos_between)


def _worker_encode(chunk: list[str]) -> np.ndarray:
    tok = _WORKER["tok"]
    return document_stream(tok, chunk, _WORKER["eos_between"]).astype(row_dtype(tok.vocab_size))


def _progress_bar(desc: str, progress: bool) -> Any:
    from tqdm import tqdm

    enabled = progress and sys.stderr.isatty()
    return tqdm(desc=desc, unit="doc", disable=not enabled, leave=False)


def _meta(
    tok: Tokenizer, length: int, splits: dict[str, Any], source: dict[str, Any]
) -> dict[str, Any]:
    from bd3 import __version__

    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": tok.name,
        "tokenizer_sha256": tok.sha256,
        **tok.special_ids(),
        "length": int(length),
        "dtype": row_dtype(tok.vocab_size).name,
        "splits": splits,
        "source": source,
        "created_by": f"bd3 {__version__}",
    }


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


class _OutDirTaken(Bd3Error):
    """The output folder appeared while we were tokenising (another process won)."""


def _publish(tmp: Path, out_dir: Path, force: bool) -> None:
    """Rename ``tmp`` to ``out_dir``; with ``force``, replace an existing shard folder."""
    old = None
    if force and out_dir.exists() and any(out_dir.iterdir()):
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        out_dir.rename(old)
    try:
        os.rename(tmp, out_dir)
    except OSError as exc:
        if old is not None:
            old.rename(out_dir)
        message = f"{out_dir} appeared while tokenizing; pass --force to replace it"
        raise _OutDirTaken(message) from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- cache


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$BD3_CACHE_DIR``, else ``~/.cache/bd3/data``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("BD3_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bd3" / "data"


def cached_shards(
    data: str,
    tokenizer: str | Tokenizer,
    length: int,
    *,
    vocab_size: int = WEB_BPE_VOCAB_SIZE,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    eos_between: bool = True,
    detokenizer: str | None = None,
    splits: tuple[str, ...] = SHARD_SPLITS,
    num_proc: int = 1,
    wrap: str = "special",
) -> "TokenShards":
    """Shards for (data, tokenizer, length) from the cache, tokenising only on a miss
    (``num_proc`` does not change the bytes, so it is not part of the key)."""
    _check_length(length)
    check_wrap(wrap)
    wrapping = {"eos_between": eos_between, "detokenizer": detokenizer, "splits": list(splits), "wrap": wrap}
    key, tok = _cache_key(data, tokenizer, length, vocab_size, wrapping)
    out = cache_root(cache_dir) / f"{_slug(data)}-{length}-{key[:16]}"
    if _is_complete(out):
        return TokenShards(out)
    try:
        return tokenize(data, tok or tokenizer, length, out, vocab_size=vocab_size, force=out.exists(),
                        progress=progress, eos_between=eos_between, detokenizer=detokenizer, splits=splits,
                        num_proc=num_proc, wrap=wrap)
    except _OutDirTaken:
        if _is_complete(out):  # a concurrent process built the same shards
            return TokenShards(out)
        raise


def _cache_key(
    data: str, tokenizer: str | Tokenizer, length: int, vocab_size: int, wrapping: dict | None = None
) -> tuple[str, Tokenizer | None]:
    """(sha256 of everything the shards depend on, the tokenizer if it had to be loaded).
    A tokenizer counts by its content (sha256), however it was named: a run's own
    tokenizer.json finds the shards its pretraining made."""
    tok = None
    if tokenizer == "bpe" and not _uses_shipped_bpe(data, vocab_size):
        tok_key: dict[str, Any] = {"spec": "bpe", "trained_on": "train split", "vocab_size": vocab_size}
    else:
        tok = resolve_tokenizer(data, tokenizer, vocab_size)
        tok_key = {"sha256": tok.sha256}
    blob = {
        "format_version": FORMAT_VERSION,
        "source": describe_source(data),
        "tokenizer": tok_key,
        "length": int(length),
    }
    if wrapping and wrapping != {"eos_between": True, "detokenizer": None, "splits": list(SHARD_SPLITS), "wrap": "special"}:
        blob["wrapping"] = wrapping  # the default leaves earlier cache keys unchanged
    digest = hashlib.sha256(json.dumps(blob, sort_keys=True).encode("utf-8")).hexdigest()
    return digest, tok


def _slug(text: str) -> str:
    base = Path(text).name or text
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._")[-40:] or "data"


def _is_complete(path: Path) -> bool:
    try:
        TokenShards(path)
    except Bd3Error:
        return False
    return True


# ----------------------------------------------------------------------------- reading


class TokenShards:
    """A shard folder written by :func:`tokenize`: meta, tokenizer and memory-mapped rows."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.meta: dict[str, Any] = _read_meta(self.path / "meta.json")
        self._tokenizer: Tokenizer | None = None

    def __repr__(self) -> str:
        return f"TokenShards({str(self.path)!r})"

    @property
    def length(self) -> int:
        return int(self.meta["length"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    @property
    def wrap(self) -> str:
        """The row format (``special`` for folders written before raw rows existed)."""
        return self.meta.get("wrap", "special")

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer saved with the shards (checked against meta.json's hash)."""
        if self._tokenizer is None:
            tok = Tokenizer.from_file(self.path / "tokenizer.json", name=self.meta["tokenizer"])
            if tok.sha256 != self.meta["tokenizer_sha256"]:
                raise Bd3Error(
                    f"{self.path / 'tokenizer.json'} does not match meta.json's tokenizer_sha256; "
                    "the shard folder was modified: tokenize again with --force"
                )
            self._tokenizer = tok
        return self._tokenizer

    def rows(self, split: str) -> np.memmap:
        """The rows of ``split`` ('train' or 'valid'), shape (rows, length), read-only."""
        if split not in self.meta["splits"]:
            choices = ", ".join(self.meta["splits"])
            raise Bd3Error(f"unknown split {split!r} in {self.path}; choose one of {choices}")
        n = int(self.meta["splits"][split]["rows"])
        path = self.path / f"{split}.bin"
        expected = n * self.length * self.dtype.itemsize
        actual = path.stat().st_size if path.is_file() else -1
        if actual != expected:
            raise Bd3Error(
                f"{path} is {'missing' if actual < 0 else f'{actual} bytes, expected {expected}'}; "
                "the shard folder is damaged: tokenize again with --force"
            )
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(n, self.length))

    def unigram_counts(self, split: str) -> np.ndarray:
        """How often each id occurs in ``split`` (BOS/EOS included), shape (vocab_size,)."""
        return _bincount(self.rows(split), self.vocab_size)


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise Bd3Error(
            f"{path} not found: {path.parent} is not a bd3 shard folder; "
            "create one with `bd3 tokenize`"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        message = f"{path} is unreadable or not JSON ({exc}); tokenize again with --force"
        raise Bd3Error(message) from exc
    missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise Bd3Error(f"{path} lacks {', '.join(missing)}; tokenize again with --force")
    if meta["format_version"] != FORMAT_VERSION:
        raise Bd3Error(
            f"{path} has shard format {meta['format_version']!r}, this bd3 reads {FORMAT_VERSION}; "
            "tokenize again with this version"
        )
    if meta["dtype"] not in ("uint16", "uint32"):
        raise Bd3Error(f"{path}: unknown dtype {meta['dtype']!r}; tokenize again with --force")
    return meta


def _bincount(rows: np.ndarray, vocab_size: int) -> np.ndarray:
    flat = rows.reshape(-1)
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, flat.size, COUNT_CHUNK):
        chunk = np.bincount(flat[start:start + COUNT_CHUNK], minlength=vocab_size)
        if chunk.size > vocab_size:
            raise ValueError(f"token id {chunk.size - 1} is outside the vocabulary of {vocab_size}")
        counts += chunk
    return counts


# ----------------------------------------------------------------------------- baseline


def unigram_perplexity(
    train_counts: np.ndarray, valid_rows: np.ndarray, skip_first: bool = True
) -> float:
    """Perplexity of ``valid_rows`` under an add-one-smoothed unigram model of ``train_counts``.

    Returns exp of the mean NLL over the valid tokens, excluding position 0 of each row
    (the BOS every row starts with) when ``skip_first``.
    """
    counts = np.asarray(train_counts, dtype=np.float64)
    rows = np.asarray(valid_rows)
    rows = rows.reshape(1, -1) if rows.ndim == 1 else rows
    tokens = rows[:, 1:] if skip_first else rows
    if tokens.size == 0:
        raise Bd3Error("no valid tokens to score; pass rows with at least two tokens")
    log_p = np.log(counts + 1.0) - np.log(counts.sum() + counts.size)
    valid_counts = _bincount(np.ascontiguousarray(tokens), counts.size)
    return float(np.exp(-(valid_counts * log_p).sum() / tokens.size))
