"""`bd3 tokenize`: options -> bd3.data.shards.tokenize -> a folder of token shards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bd3.cli import options as o


def tokenize_command(
    data: o.Data = "web",
    tokenizer: o.Tokenizer = "bpe",
    vocab_size: o.VocabSize = 8192,
    length: o.Length = 128,
    out: Annotated[
        Optional[Path],
        typer.Option(help="Folder to write. Default: bd3's data cache ($BD3_CACHE_DIR or ~/.cache/bd3/data), where pretrain finds it.", show_default=False),
    ] = None,
    force: o.Force = False,
    num_proc: Annotated[int, typer.Option(help="Worker processes that encode documents (the shards are the same for any number).", min=1)] = 1,
    wrap: o.Wrap = None,
) -> None:
    """Tokenize a corpus into memmapped train/valid token shards plus meta.json.

    Each document is followed by EOS; the stream is cut into rows of [BOS] + (L - 2) tokens
    + [EOS], as the reference implementation wraps its data (--wrap special), or into raw
    rows of L tokens (--wrap raw, the paper's OpenWebText format). Documents are streamed and rows
    written as they are made, so corpora of any size fit; `owt` is OpenWebText
    (Skylion007/openwebtext) with its last 100,000 documents as the validation split.

    Examples:

    \b
      bd3 tokenize --data web --tokenizer bpe
      bd3 tokenize --data 'corpus/*.jsonl' --tokenizer gpt2 --length 1024 --out data/corpus-gpt2
      bd3 tokenize --data notes.txt --tokenizer bpe --vocab-size 4096
      bd3 tokenize --data owt --tokenizer gpt2 --length 1024 --wrap raw --num-proc 16   # then: bd3 pretrain --data owt --wrap raw ...
    """
    from bd3.cli.common import err
    from bd3.data.shards import cached_shards, tokenize

    if out is None:
        shards = cached_shards(data, tokenizer, length, vocab_size=vocab_size, num_proc=num_proc, wrap=wrap or "special")
    else:
        shards = tokenize(data, tokenizer, length, out, vocab_size=vocab_size, force=force, num_proc=num_proc, wrap=wrap or "special")
    m = shards.meta
    splits = ", ".join(f"{name}: {s['rows']} rows / {s['tokens']} tokens" for name, s in m["splits"].items())
    err.print(f"Tokenized {data!r} with {m['tokenizer']} (vocabulary {m['vocab_size']}, length {m['length']}, {shards.wrap} rows): {splits}")
    print(shards.path)
