"""Detokenizers of the zero-shot sets, as the reference applies them (MDLM's dataloader):
they undo the pre-tokenised spacing of PTB, WikiText, LM1B, LAMBADA and the scientific
papers sets before bd3's tokenizer sees the text.
"""

from __future__ import annotations

import re
from collections.abc import Callable


def ptb(x: str) -> str:
    x = x.replace(" 's", "'s")
    x = x.replace("s ' ", "s' ")
    x = x.replace(" n't", "n't")
    x = x.replace(" \n ", "\n")
    x = x.replace("\\/", "/")
    for _ in range(10):
        x = x.replace(" N ", " 1 ")
    x = x.replace("$ 1", "$1")
    x = x.replace("# 1", "#1")
    x = x.replace("<unk>", "?")
    return x


def wikitext(x: str) -> str:
    # contractions
    x = x.replace("s '", "s'")
    x = re.sub(r"/' [0-9]/", r"/'[0-9]/", x)
    # number separators
    x = x.replace(" @-@ ", "-")
    x = x.replace(" @,@ ", ",")
    x = x.replace(" @.@ ", ".")
    # punctuation
    for p in (":", ";", ".", "!", "?", ","):
        x = x.replace(f" {p} ", f"{p} ")
    # brackets and quotes
    x = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", x)
    x = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", x)
    x = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", x)
    x = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', x)
    x = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", x)
    # headings and the rest
    x = x.replace("= = = =", "====")
    x = x.replace("= = =", "===")
    x = x.replace("= =", "==")
    x = x.replace(" " + chr(176) + " ", chr(176))
    x = x.replace(" \n", "\n")
    x = x.replace("\n ", "\n")
    x = x.replace(" N ", " 1 ")
    x = x.replace(" 's", "'s")
    return x


def lm1b(x: str) -> str:
    x = x.replace("http : / / ", "http://")
    x = x.replace("https : / / ", "https://")
    x = re.sub(r" \'(\w+)", r"'\1", x)
    x = re.sub(r" (\w+) \. ", r" \1. ", x)
    x = re.sub(r" (\w+) \.$", r" \1.", x)
    x = x.replace(" ? ", "? ")
    x = re.sub(r" \?$", "?", x)
    x = x.replace(" ! ", "! ")
    x = re.sub(r" \!$", "!", x)
    x = x.replace(" , ", ", ")
    x = x.replace(" : ", ": ")
    x = x.replace(" ; ", "; ")
    x = x.replace(" / ", "/")
    x = re.sub(r"\" ([^\"]+) \"", r'"\1"', x)
    x = re.sub(r"\' ([^\']+) \'", r"'\1'", x)
    x = re.sub(r"\( ([^\(\)]+) \)", r"(\1)", x)
    x = re.sub(r"\[ ([^\[\]]+) \]", r"[\1]", x)
    x = x.replace("$ ", "$")
    x = x.replace("£ ", "£")
    return x


def lambada(x: str) -> str:
    x = x.replace("\u201c", '"').replace("\u201d", '"')
    return "\n" + x.strip()


def scientific_papers(x: str) -> str:
    return lm1b(wikitext(x))


def paragraphs(x: str) -> str:
    """Local text and the built-in sets, joined without EOS: a newline ends each paragraph,
    so consecutive paragraphs do not run into each other."""
    return x + "\n"


DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "ptb": ptb, "wikitext2": wikitext, "wikitext103": wikitext, "lm1b": lm1b, "lambada": lambada,
    "pubmed": scientific_papers, "arxiv": scientific_papers, "paragraphs": paragraphs,
}
