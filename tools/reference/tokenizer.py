"""BERT uncased WordPiece tokenizer, built with the HuggingFace `tokenizers` library.

One pipeline serves the tiny test vocabulary and the real BiomedBERT vocabulary:
  normalizer      BertNormalizer(clean_text, handle_chinese_chars, strip_accents, lowercase)
  pre-tokenizer   BertPreTokenizer (split on whitespace and punctuation)
  model           WordPiece(vocab, unk_token="[UNK]", continuing prefix "##", max 100 chars per word)
  post-processor  TemplateProcessing "[CLS] $A [SEP]"
The saved tokenizer.json carries no padding/truncation: the consumer pads/truncates to the model's
context length with HF semantics (see `encode_padded`).
"""

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def read_vocab(path):
    """token -> id, ids in line order (the BERT vocab.txt convention)."""
    vocab = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            token = line.rstrip("\n")
            if token in vocab:
                raise ValueError(f"{path}: duplicate token {token!r}")
            vocab[token] = len(vocab)
    for special in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
        if special not in vocab:
            raise ValueError(f"{path}: missing special token {special}")
    return vocab


def build_tokenizer(vocab):
    """A `tokenizers.Tokenizer` for a BERT uncased vocabulary (dict token -> id)."""
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##",
                              max_input_chars_per_word=100))
    # strip_accents=True is what BERT uncased does implicitly (strip_accents=None + lowercase=True).
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tok.decoder = decoders.WordPiece(prefix="##")
    # As in HF's BERT tokenizer.json: special tokens present in the vocabulary are "added tokens", so a
    # literal "[CLS]" in a prompt stays one token instead of being split into "[", "cls", "]".
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in SPECIAL_TOKENS if t in vocab])
    return tok


def build_tokenizer_from_file(vocab_path):
    return build_tokenizer(read_vocab(vocab_path))


def encode_padded(tok, texts, length, pad_id=0):
    """HF `padding='max_length', truncation=True, max_length=length` semantics: at most length-2
    word pieces, then [CLS] ... [SEP], then pad ids up to `length`. Returns a list of id lists."""
    tok = Tokenizer.from_str(tok.to_str())  # private copy: enabling padding must not leak to the caller
    tok.enable_truncation(max_length=length)
    tok.enable_padding(length=length, pad_id=pad_id, pad_token="[PAD]")
    return [enc.ids for enc in tok.encode_batch(texts)]
