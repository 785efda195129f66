"""A small word-level tokenizer shipped with the library (the vocabulary of the digit-VQA task).

Text is lower-cased and split on whitespace ("?" is its own word); an unknown word maps to
`<unk>`. Ids 0-3 are the special tokens `<pad>`, `<bos>`, `<eos>`, `<unk>`.
"""
from __future__ import annotations

import numpy as np

PAD, BOS, EOS, UNK = 0, 1, 2, 3
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOCAB = ("<pad>", "<bos>", "<eos>", "<unk>", "?", "what", "which", "digit", "digits", "is",
         "this", "the", "a", "even", "odd", "greater", "less", "than", "next", "to", "are", "yes",
         "no") + DIGIT_WORDS


class Tokenizer:
  """Word <-> id over `vocab` (default: VOCAB)."""

  def __init__(self, vocab: tuple[str, ...] = VOCAB):
    if len(set(vocab)) != len(vocab) or vocab[:4] != VOCAB[:4]:
      raise ValueError(f"tokenizer vocab must have unique words and start with {VOCAB[:4]}")
    self.vocab = vocab
    self.ids = {w: i for i, w in enumerate(vocab)}

  def __len__(self) -> int:
    return len(self.vocab)

  def encode(self, text: str) -> list[int]:
    """Word ids of `text` (no special tokens)."""
    return [self.ids.get(w, UNK) for w in text.lower().replace("?", " ? ").split()]

  def decode(self, ids) -> str:
    """Text of `ids`, stopping at the first `<eos>` and skipping `<pad>` / `<bos>`."""
    words = []
    for i in np.asarray(ids).tolist():
      if i == EOS:
        break
      if i not in (PAD, BOS):
        words.append(self.vocab[i])
    return " ".join(words)
