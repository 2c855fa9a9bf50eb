"""Tokenizers for BD3-LMs: GPT-2, bert-base-uncased, a small trained BPE, or a tokenizer.json.

Every :class:`Tokenizer` wraps a HuggingFace ``tokenizers`` tokenizer and knows the ids a
diffusion LM needs. The rules follow the BD3-LM reference implementation, with its bugs
fixed:

* ``gpt2``: the shipped byte-level BPE; ``<|endoftext|>`` (50256) is BOS, EOS and pad;
  ``[MASK]`` is appended as a special token at 50257, so ``vocab_size`` = 50258 and the
  pad id is never the mask id.
* ``bert-base-uncased``: the shipped lower-casing WordPiece; ``[MASK]`` = 103 is reused,
  BOS = ``[CLS]`` 101, EOS = ``[SEP]`` 102, pad = ``[PAD]`` 0; ``vocab_size`` = 30522.
* ``bpe``: a byte-level BPE with specials ``<|endoftext|>`` (BOS = EOS, id 0), ``[MASK]``
  (1) and ``[PAD]`` (2). Trained on the given texts, or, with none, the shipped ``web-bpe``
  (8192 tokens, trained on the ``web`` train split; see :mod:`bd3.data.build_bpe`).
* a path to a ``tokenizer.json`` (or a folder holding one): special ids are looked up by
  token: ``[MASK]`` (required); ``<|endoftext|>`` else ``[CLS]``/``[SEP]``; ``[PAD]`` else EOS.

Decisions:

* ``vocab_size`` counts every id including the mask (largest id + 1).
* Text is always encoded *without* special tokens, and text that spells a special token
  (e.g. a literal ``"[MASK]"``) is encoded as ordinary text, so the mask id can never
  appear in data.
* ``decode`` drops BOS, EOS and pad ids; every other id is shown, the mask as ``[MASK]``.
* The saved file is a plain HF ``tokenizer.json`` (``tokenizers`` rejects unknown keys, so
  nothing else is stored in it). The bd3 name is kept out of the file: pass it to
  :meth:`Tokenizer.from_file` (shard folders keep it in ``meta.json``); without it the
  name is the file's path.
* ``sha256`` hashes the canonical form of that JSON (keys sorted, no whitespace), so it is
  the same after a save/load round trip and independent of the name.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from bd3.errors import Bd3Error

TOKENIZERS_DIR = Path(__file__).resolve().parent / "tokenizers"
WEB_BPE_PATH = TOKENIZERS_DIR / "web-bpe" / "tokenizer.json"
WEB_BPE_VOCAB_SIZE = 8192
BUILTIN_TOKENIZERS = ("gpt2", "bert-base-uncased", "bpe")

ENDOFTEXT = "<|endoftext|>"
MASK = "[MASK]"
PAD = "[PAD]"
CLS = "[CLS]"
SEP = "[SEP]"
BPE_SPECIALS = (ENDOFTEXT, MASK, PAD)
MIN_BPE_VOCAB = 256 + len(BPE_SPECIALS) + 1  # the byte alphabet, the specials, one merge


class Tokenizer:
    """A HF ``tokenizers`` tokenizer plus the special ids of a masked diffusion LM."""

    name: str
    vocab_size: int
    mask_id: int
    bos_id: int
    eos_id: int
    pad_id: int

    def __init__(self, hf: HFTokenizer, name: str, *, origin: str | None = None) -> None:
        """Wrap ``hf``; ``origin`` (default ``name``) is named in error messages."""
        hf.encode_special_tokens = True  # a literal "[MASK]" in text is just text
        self._tk = hf
        self.name = name
        self._sha256: str | None = None
        ids = _find_special_ids(hf, origin or name)
        self.vocab_size = ids["vocab_size"]
        self.mask_id = ids["mask_id"]
        self.bos_id = ids["bos_id"]
        self.eos_id = ids["eos_id"]
        self.pad_id = ids["pad_id"]
        self._dropped = {self.bos_id, self.eos_id, self.pad_id}

    def __repr__(self) -> str:
        return (
            f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, "
            f"mask_id={self.mask_id})"
        )

    # -- encoding ---------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens are added."""
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (parallel in Rust); no special tokens are added."""
        encode = getattr(self._tk, "encode_batch_fast", self._tk.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: BOS/EOS/pad dropped, the mask shown as ``[MASK]``."""
        values = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if isinstance(values, int):  # a 0-d array or tensor
            values = [values]
        kept = [int(i) for i in values if int(i) not in self._dropped]
        return self._tk.decode(kept, skip_special_tokens=False)

    # -- identity and persistence -----------------------------------------------------

    def special_ids(self) -> dict[str, int]:
        """``{"vocab_size", "mask_id", "bos_id", "eos_id", "pad_id"}``."""
        return {
            "vocab_size": self.vocab_size,
            "mask_id": self.mask_id,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }

    def to_json(self) -> str:
        """A valid HF ``tokenizers`` ``tokenizer.json`` string."""
        return self._tk.to_str()

    @property
    def sha256(self) -> str:
        """SHA-256 of the canonical JSON; stable across save/load and names."""
        if self._sha256 is None:
            data = json.loads(self.to_json())
            canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            self._sha256 = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        return self._sha256

    def save(self, path: str | Path) -> Path:
        """Write the ``tokenizer.json`` to ``path`` (parent folders are created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def from_file(cls, path: str | Path, name: str | None = None) -> "Tokenizer":
        """Load a ``tokenizer.json`` (or a folder holding one); ``name`` defaults to the path."""
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / "tokenizer.json"
        hf = _load_hf_file(path)
        return cls(hf, name if name is not None else str(path), origin=str(path))


# --------------------------------------------------------------------------------- loading


def load_tokenizer(
    spec: str, *, texts: Iterable[str] | None = None, vocab_size: int = WEB_BPE_VOCAB_SIZE
) -> Tokenizer:
    """The tokenizer named by ``spec``: gpt2, bert-base-uncased, bpe or a tokenizer.json path.

    For ``bpe``, ``texts`` trains a new one of ``vocab_size`` tokens (specials included);
    without texts it is the shipped ``web-bpe`` (which has 8192 tokens).
    """
    if spec == "gpt2":
        return Tokenizer(HFTokenizer.from_str(_gpt2_json()), "gpt2")
    if spec == "bert-base-uncased":
        return Tokenizer(HFTokenizer.from_str(_bert_json()), "bert-base-uncased")
    if spec == "bpe":
        return _bpe(texts, vocab_size)
    if _looks_like_path(spec):
        return Tokenizer.from_file(spec)
    raise Bd3Error(
        f"unknown tokenizer {spec!r}; choose one of {', '.join(BUILTIN_TOKENIZERS)} "
        "or give the path of a tokenizer.json"
    )


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of ``vocab_size`` tokens (specials included) on ``texts``.

    Deterministic: the same texts in the same order give the same tokenizer. On little
    text the vocabulary can come out smaller than asked (no more merges to learn).
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB:
        raise Bd3Error(
            f"BPE vocab size {vocab_size!r} is too small; use at least {MIN_BPE_VOCAB} "
            "(256 bytes + 3 special tokens + 1), e.g. 8192"
        )
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in BPE_SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    counter = _Counter(texts)
    hf.train_from_iterator(counter, trainer)
    if counter.count == 0:
        raise Bd3Error("cannot train a BPE tokenizer on no text; pass data with some text in it")
    return Tokenizer(hf, "bpe")


def _bpe(texts: Iterable[str] | None, vocab_size: int) -> Tokenizer:
    if texts is not None:
        return train_bpe(texts, vocab_size)
    if vocab_size != WEB_BPE_VOCAB_SIZE:
        raise Bd3Error(
            f"the shipped bpe tokenizer has {WEB_BPE_VOCAB_SIZE} tokens, not {vocab_size}; "
            "pass training texts (e.g. tokenize with --data) to train one of that size"
        )
    return Tokenizer.from_file(WEB_BPE_PATH, name="bpe")


class _Counter:
    """An iterable over texts that counts what it yielded (to detect no text at all)."""

    def __init__(self, texts: Iterable[str]) -> None:
        self._texts = texts
        self.count = 0

    def __iter__(self) -> Iterator[str]:
        for text in self._texts:
            if text:
                self.count += 1
                yield text


def _looks_like_path(spec: str) -> bool:
    return spec.endswith(".json") or "/" in spec or "\\" in spec or Path(spec).expanduser().exists()


@functools.lru_cache(maxsize=None)
def _gpt2_json() -> str:
    """The gpt2 tokenizer.json, built once per process from the shipped vocab/merges."""
    from tokenizers.implementations import ByteLevelBPETokenizer

    folder = TOKENIZERS_DIR / "gpt2"
    hf = ByteLevelBPETokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))._tokenizer
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (ENDOFTEXT, MASK)])
    return hf.to_str()


@functools.lru_cache(maxsize=None)
def _bert_json() -> str:
    """The bert-base-uncased tokenizer.json, built once per process from the shipped vocab."""
    from tokenizers.implementations import BertWordPieceTokenizer

    vocab = TOKENIZERS_DIR / "bert-base-uncased" / "vocab.txt"
    return BertWordPieceTokenizer(str(vocab), lowercase=True)._tokenizer.to_str()


def _load_hf_file(path: Path) -> HFTokenizer:
    hint = "pass gpt2, bert-base-uncased, bpe or the path of a HF tokenizer.json"
    if not path.is_file():
        raise Bd3Error(f"tokenizer file {path} does not exist; {hint}")
    try:
        text = path.read_text(encoding="utf-8")
        json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise Bd3Error(f"cannot read tokenizer file {path} as JSON ({exc}); {hint}") from exc
    try:
        return HFTokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a bare Exception for bad files
        raise Bd3Error(f"{path} is not a HF tokenizers tokenizer.json ({exc}); {hint}") from exc


def _find_special_ids(hf: HFTokenizer, origin: str) -> dict[str, int]:
    vocab = hf.get_vocab(with_added_tokens=True)
    if MASK not in vocab:
        raise Bd3Error(
            f"tokenizer {origin} has no {MASK} token, which a diffusion LM needs; add it as a "
            f"special token (tokenizer.add_special_tokens(['{MASK}']) in HF tokenizers) and "
            "save it again, or use gpt2, bert-base-uncased or bpe"
        )
    bos, eos = _bos_eos(vocab, origin)
    mask, pad = vocab[MASK], vocab.get(PAD, eos)
    if mask in (bos, eos, pad):
        raise Bd3Error(
            f"tokenizer {origin} gives {MASK} the same id ({mask}) as BOS/EOS/pad; "
            "give the mask token its own id"
        )
    return {
        "vocab_size": max(vocab.values()) + 1,
        "mask_id": mask,
        "bos_id": bos,
        "eos_id": eos,
        "pad_id": pad,
    }


def _bos_eos(vocab: dict[str, Any], origin: str) -> tuple[int, int]:
    if ENDOFTEXT in vocab:
        return vocab[ENDOFTEXT], vocab[ENDOFTEXT]
    if CLS in vocab and SEP in vocab:
        return vocab[CLS], vocab[SEP]
    raise Bd3Error(
        f"tokenizer {origin} has neither {ENDOFTEXT} nor {CLS}/{SEP} to mark documents; "
        f"add {ENDOFTEXT} as a special token and save it again"
    )
