"""LLaVA-format instruction data: loss on assistant turns only, tokenizer files of real LMs."""
import json

import ml_collections
import numpy as np
import pytest
import sentencepiece
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from moe_jax.tasks import vqa
from moe_jax.vlm import llava_data, tokenizer

WORDS = ("USER ASSISTANT : What colour is the square ? The square is red . green blue Which side "
         "it on left right")


def _word_tokenizer(tmp_path) -> str:
  """A word-level tokenizer.json trained here: ids 0-2 special, then one id per word."""
  tok = tokenizers.Tokenizer(models.WordLevel(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator([WORDS], trainers.WordLevelTrainer(
      special_tokens=["<unk>", "<s>", "</s>"]))
  path = str(tmp_path / "tokenizer.json")
  tok.save(path)
  return path


def test_two_turn_loss_mask_covers_the_assistant_answers_only(tmp_path):
  path = llava_data.write_example_dataset(str(tmp_path), num_examples=2)
  with open(path) as f:
    example = json.load(f)[0]
  tok = tokenizer.PretrainedTokenizer(_word_tokenizer(tmp_path), bos="<s>", eos="</s>",
                                      pad="<unk>")
  tokens, mask, prompt_len = llava_data.encode_conversation(
      example, tok, llava_data.roles_config(), text_len=32)
  colour, side = example["conversations"][1]["value"].split()[-1][:-1], example[
      "conversations"][3]["value"]
  words = (["<s>", "USER", ":", "What", "colour", "is", "the", "square", "?",
            "ASSISTANT", ":", "The", "square", "is", colour, ".", "</s>",
            "USER", ":", "Which", "side", "is", "it", "on", "?",
            "ASSISTANT", ":", side, "</s>"])
  want_mask = [0] * 11 + [1] * 6 + [0] * 10 + [1] * 2  # "The square is <colour> . </s>", "<side> </s>"
  ids = [tok._hf.token_to_id(w) for w in words]
  np.testing.assert_array_equal(tokens, ids + [tok.pad] * (32 - len(ids)))
  np.testing.assert_array_equal(mask, want_mask + [0] * (32 - len(ids)))
  assert prompt_len == 11  # <bos> + the first human turn + "ASSISTANT :": where generation starts
  assert tok.decode(tokens[11:]) == f"The square is {colour} ."
  with pytest.raises(ValueError, match="data.text_len=20"):
    llava_data.encode_conversation(example, tok, llava_data.roles_config(), text_len=20)
  bad = dict(example, conversations=[dict(c) for c in example["conversations"]])
  bad["conversations"][2]["value"] = "<image>\nAnd this?"
  with pytest.raises(ValueError, match="example '0000'.*<image> must appear once"):
    llava_data.encode_conversation(bad, tok, llava_data.roles_config(), text_len=64)


def test_load_examples_reads_images_and_the_vqa_loss_uses_the_mask(tmp_path):
  path = llava_data.write_example_dataset(str(tmp_path), num_examples=3)
  c = llava_data.default_config()
  c.files = ml_collections.ConfigDict({"train": path})
  c.image_dir, c.image_size, c.text_len = str(tmp_path), 16, 40
  c.tokenizer.path, c.tokenizer.pad = _word_tokenizer(tmp_path), "<unk>"
  batch = llava_data.load_examples(c, "train")
  assert batch["image"].shape == (3, 16, 16, 3) and batch["tokens"].shape == (3, 40)
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  tok = tokenizer.PretrainedTokenizer(c.tokenizer.path, bos="<s>", eos="</s>", pad="<unk>")
  _, token_mask, _ = llava_data.encode_conversation(
      json.load(open(path))[0], tok, c.roles, c.text_len)
  np.testing.assert_array_equal(batch["loss_mask"][0], token_mask)
  np.testing.assert_array_equal(vqa.answer_mask(batch), batch["loss_mask"])
  with pytest.raises(ValueError, match="data.files has no 'validation' split"):
    llava_data.load_examples(c, "validation")


def test_sentencepiece_model_and_errors(tmp_path):
  prefix = str(tmp_path / "sp")
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter([WORDS, "the square is blue", "which side is it on"] * 20),
      model_prefix=prefix, vocab_size=25, model_type="word", bos_id=1, eos_id=2, unk_id=0,
      pad_id=3, minloglevel=2)
  tok = tokenizer.PretrainedTokenizer(prefix + ".model", bos="<s>", eos="</s>", pad="<pad>")
  assert (tok.bos, tok.eos, tok.pad) == (1, 2, 3)
  ids = tok.encode("the square is blue")
  assert len(ids) == 4 and 0 not in ids
  assert tok.decode([tok.bos, *ids, tok.eos, ids[0]]) == "the square is blue"
  with pytest.raises(ValueError, match="data.tokenizer.pad='<padding>' is not a token"):
    tokenizer.PretrainedTokenizer(prefix + ".model", bos="<s>", eos="</s>", pad="<padding>")
  with pytest.raises(ValueError, match="data.tokenizer.path='x.txt'"):
    tokenizer.PretrainedTokenizer("x.txt", bos="<s>", eos="</s>", pad="<pad>")
  with pytest.raises(ValueError, match="data.tokenizer.path is empty"):
    llava_data.build_tokenizer(llava_data.tokenizer_config())
