"""Writes the small uncased WordPiece vocabularies and their tokenizer.json files: weights/tiny/
(the parity-test model) and weights/small/ (the default training model: the tiny words plus those
the built-in synthetic dataset's prompts add).

Deterministic: the vocabularies are the literal lists below. Run from anywhere:
    python tools/make_tiny_tokenizer.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference.tokenizer import SPECIAL_TOKENS, build_tokenizer, read_vocab  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(ROOT, "weights")

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


# Appended for the synthetic training prompts ("one small irregular-shaped lesion at the center of
# the image"); appending keeps every tiny id unchanged.
SMALL_EXTRA_WORDS = ["irregular", "lesions", "lobulated", "hypoechoic", "mass"]


def write_vocab(path, words):
    tokens = SPECIAL_TOKENS + words
    assert len(set(tokens)) == len(tokens), f"duplicate token in {path}"
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for t in tokens:
            f.write(t + "\n")
    return len(tokens)


def main():
    for name, words in [("tiny", WORDS), ("small", WORDS + SMALL_EXTRA_WORDS)]:
        out_dir = os.path.join(WEIGHTS, name)
        os.makedirs(out_dir, exist_ok=True)
        vocab_path = os.path.join(out_dir, "vocab.txt")
        n = write_vocab(vocab_path, words)
        tok = build_tokenizer(read_vocab(vocab_path))
        tok.save(os.path.join(out_dir, "tokenizer.json"), pretty=True)
        print(f"wrote {vocab_path} ({n} tokens) and tokenizer.json")


if __name__ == "__main__":
    main()
