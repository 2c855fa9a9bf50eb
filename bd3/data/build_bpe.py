"""Regenerate the shipped byte-level BPE, ``bd3/data/tokenizers/web-bpe/tokenizer.json``.

How the shipped file was made (and is remade, byte for byte)::

    python -m bd3.data.build_bpe            # writes the shipped file
    python -m bd3.data.build_bpe --check    # exit 1 if the shipped file differs

which runs ``train_bpe(read_documents("web", "train"), 8192)``: a ``tokenizers``
byte-level BPE (no prefix space, the 256-byte initial alphabet, no minimum frequency)
with special tokens ``<|endoftext|>`` = 0, ``[MASK]`` = 1, ``[PAD]`` = 2, trained on the
32,597 ``web`` training paragraphs (every paragraph whose index % 50 != 49) in file order.
Made with tokenizers 0.23.3; training takes about a second on two cores and is
deterministic (same output in separate processes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bd3.data.sources import read_documents
from bd3.data.tokenizer import WEB_BPE_PATH, WEB_BPE_VOCAB_SIZE, train_bpe


def build_web_bpe() -> str:
    """The tokenizer.json text of the shipped web-bpe, trained from scratch."""
    return train_bpe(read_documents("web", "train"), WEB_BPE_VOCAB_SIZE).to_json()


def main(argv: list[str] | None = None) -> int:
    """Write (or with --check, verify) the shipped web-bpe tokenizer.json."""
    parser = argparse.ArgumentParser(
        prog="python -m bd3.data.build_bpe", description="Regenerate the shipped web-bpe tokenizer."
    )
    parser.add_argument("--out", type=Path, default=WEB_BPE_PATH, help="tokenizer.json to write")
    parser.add_argument("--check", action="store_true", help="compare with --out, do not write")
    args = parser.parse_args(argv)
    text = build_web_bpe()
    if args.check:
        same = args.out.is_file() and args.out.read_text(encoding="utf-8") == text
        print(f"{args.out}: {'up to date' if same else 'DIFFERS from a fresh build'}")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
