"""Writes the tiny uncased WordPiece vocabulary and its tokenizer.json (weights/tiny/).

Deterministic: the vocabulary is the literal list below. Run from anywhere:
    python tools/make_tiny_tokenizer.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference.tokenizer import SPECIAL_TOKENS, build_tokenizer, read_vocab  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "weights", "tiny")

# Words of synthetic prompts ("a small red circle in the top left of the image", "no lesion in the image").
WORDS = [
    # numbers
    "one", "two", "three", "1", "2", "3",
    # sizes
    "small", "medium", "large",
    # colours
    "red", "green", "blue", "yellow", "white", "black", "brown", "pink", "dark", "bright",
    # shapes and findings
    "circle", "square", "triangle", "ellipse", "blob", "lesion", "tumor", "polyp", "round", "oval", "shaped",
    # positions
    "top", "bottom", "left", "right", "center", "middle", "upper", "lower", "located", "region",
    # glue words
    "and", "at", "in", "of", "the", "a", "is", "with", "image", "no", "visible",
    # punctuation
    ".", ",", "-",
    # word-piece suffixes
    "##s", "##ish", "##ed", "##ly",
]


def write_vocab(path):
    tokens = SPECIAL_TOKENS + WORDS
    assert len(set(tokens)) == len(tokens), "duplicate token in the tiny vocabulary"
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for t in tokens:
            f.write(t + "\n")
    return len(tokens)


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    vocab_path = os.path.join(OUT_DIR, "vocab.txt")
    n = write_vocab(vocab_path)
    tok = build_tokenizer(read_vocab(vocab_path))
    tok.save(os.path.join(OUT_DIR, "tokenizer.json"), pretty=True)
    print(f"wrote {vocab_path} ({n} tokens) and tokenizer.json")


if __name__ == "__main__":
    main()
