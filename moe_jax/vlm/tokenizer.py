"""Tokenizers: a small word-level one shipped with the library (the vocabulary of the digit-VQA
task), and `PretrainedTokenizer` for a real LM's `tokenizer.json` / SentencePiece `.model`.

Text is lower-cased and split on whitespace ("?" is its own word); an unknown word maps to
`<unk>`. Ids 0-3 are the special tokens `<pad>`, `<bos>`, `<eos>`, `<unk>`.
"""
from __future__ import annotations

import numpy as np
import sentencepiece
import tokenizers

PAD, BOS, EOS, UNK = 0, 1, 2, 3
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOCAB = ("<pad>", "<bos>", "<eos>", "<unk>", "?", "what", "which", "digit", "digits", "is",
         "this", "the", "a", "even", "odd", "greater", "less", "than", "next", "to", "are", "yes",
         "no") + DIGIT_WORDS


class Tokenizer:
  """Word <-> id over `vocab` (default: VOCAB)."""

  bos, eos, pad = BOS, EOS, PAD

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


class PretrainedTokenizer:
  """A real LM's tokenizer from its file: `tokenizer.json` (HF `tokenizers`) or a SentencePiece
  `.model` (`sentencepiece`). `encode(text)` gives ids without special tokens; `bos`, `eos`,
  `pad` are the ids of the named special tokens (they must be in the vocabulary, after
  `added_tokens`); `bos` '' names none (None: texts start without one, as Phi-2's tokenizer,
  which adds no bos). `added_tokens`: special tokens added to a tokenizer.json's vocabulary
  (ids from its size on, in order; one already in it keeps its id), as HF's
  `add_special_tokens`: the MoCHA reference adds `<|extra_0|>` to Phi-2's tokenizer (the next
  id, one of the rows of Phi-2's 51,200-row embedding past its tokenizer's, which no text uses)
  and pads with it."""

  def __init__(self, path: str, *, bos: str, eos: str, pad: str,
               added_tokens: tuple[str, ...] = ()):
    if path.endswith(".json"):
      self._hf, self._sp = tokenizers.Tokenizer.from_file(path), None
      self._hf.add_special_tokens(list(added_tokens))
      lookup, self.vocab_size = self._hf.token_to_id, self._hf.get_vocab_size()
    elif path.endswith(".model"):
      if added_tokens:
        raise ValueError(f"data.tokenizer.added_tokens={tuple(added_tokens)}: a SentencePiece "
                         "model cannot add tokens; name one of its own (e.g. pad='<unk>', as "
                         "LLaVA pads LLaMA)")
      self._hf, self._sp = None, sentencepiece.SentencePieceProcessor(model_file=path)
      lookup, self.vocab_size = self._piece_id, self._sp.get_piece_size()
    else:
      raise ValueError(f"data.tokenizer.path={path!r} must be a tokenizer.json (HF tokenizers) "
                       "or a SentencePiece .model file")
    ids = {"bos": None}
    for field, token in (("bos", bos), ("eos", eos), ("pad", pad)):
      if field == "bos" and not token:
        continue
      ids[field] = lookup(token)
      if ids[field] is None:
        raise ValueError(f"data.tokenizer.{field}={token!r} is not a token of {path}; name one "
                         "of its special tokens")
    self.bos, self.eos, self.pad = ids["bos"], ids["eos"], ids["pad"]

  def _piece_id(self, piece: str) -> int | None:
    """SentencePiece id of `piece`, None when unknown (sentencepiece answers the unk id)."""
    i = self._sp.piece_to_id(piece)
    return None if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i) else i

  def __len__(self) -> int:
    return self.vocab_size

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no special tokens added)."""
    if self._sp is not None:
      return self._sp.encode(text)
    return self._hf.encode(text, add_special_tokens=False).ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """(token ids of `text`, each token's character span `(start, end)` in `text`); no special
    tokens added."""
    if self._sp is not None:
      encoding = self._sp.encode(text, out_type="offset_mapping")  # offsets in characters
      return encoding["ids"], [tuple(o) for o in encoding["offsets"]]
    encoding = self._hf.encode(text, add_special_tokens=False)
    return encoding.ids, encoding.offsets

  def decode(self, ids) -> str:
    """Text of `ids` up to the first `eos`, special tokens skipped."""
    ids = np.asarray(ids).tolist()
    ids = ids[:ids.index(self.eos)] if self.eos in ids else ids
    ids = [i for i in ids if i not in (self.bos, self.pad)]
    return self._sp.decode(ids) if self._sp is not None else self._hf.decode(ids)
