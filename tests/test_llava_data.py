"""LLaVA-format instruction data: loss on assistant turns only, tokenizer files of real LMs, and
the `vqa` task's LLaVA input pipeline through the Trainer."""
import json
import pathlib
import runpy

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import sentencepiece
import tokenizers
from flax import nnx
from tokenizers import models, pre_tokenizers, trainers

from moe_jax.data import EvalSource, preprocess, transforms
from moe_jax.tasks import vqa
from moe_jax.train import evaluators, loop, step as step_lib
from moe_jax.vlm import decoder, encoders, llava_data, model, phi, tokenizer

from configs import mocha_tiny_digits_vqa  # noqa: I100

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


def _data_config(tmp_path, num_examples=8, **overrides) -> ml_collections.ConfigDict:
  c = llava_data.default_config()
  path = llava_data.write_example_dataset(str(tmp_path), num_examples=num_examples)
  c.files = ml_collections.ConfigDict({"train": path, "validation": path})
  c.image_dir, c.image_size, c.text_len = str(tmp_path), 16, 32
  c.tokenizer.path = _word_tokenizer(tmp_path)
  c.update(overrides)
  return c


def _source(split: str, pp: str = llava_data.CLIP_PP) -> EvalSource:
  return EvalSource(llava_data.NAME, split, pp, "evals.val", None)


def test_two_turn_loss_mask_covers_the_assistant_answers_only(tmp_path):
  c = _data_config(tmp_path, num_examples=2)
  with open(c.files.train) as f:
    example = json.load(f)[0]
  tok = llava_data.build_tokenizer(c.tokenizer)
  tokens, mask, prompt_len, image_pos = llava_data.encode_conversation(example, tok, c)
  colour, side = example["conversations"][1]["value"].split()[-1][:-1], example[
      "conversations"][3]["value"]
  # "USER: <image>\nWhat colour ...": the image between "USER :" and "What" (the text on each
  # side tokenised on its own, as the reference's tokenizer_image_token)
  words = (["<s>", "USER", ":", "What", "colour", "is", "the", "square", "?",
            "ASSISTANT", ":", "The", "square", "is", colour, ".", "</s>",
            "USER", ":", "Which", "side", "is", "it", "on", "?",
            "ASSISTANT", ":", side, "</s>"])
  want_mask = [0] * 11 + [1] * 6 + [0] * 10 + [1] * 2  # "The square is <colour> . </s>", "<side> </s>"
  ids = [tok._hf.token_to_id(w) for w in words]
  np.testing.assert_array_equal(tokens, ids + [tok.pad] * (32 - len(ids)))
  np.testing.assert_array_equal(mask, want_mask + [0] * (32 - len(ids)))
  assert prompt_len == 11  # <bos> + the first human turn + "ASSISTANT :": where generation starts
  assert image_pos == 3  # the visual tokens go before "What"
  assert tok.decode(tokens[11:]) == f"The square is {colour} ."
  # <image> anywhere in a human turn moves to its start (the reference's preprocess_multimodal);
  # in the second turn, the visual tokens go after "USER :" of the second round
  moved = dict(example, conversations=[dict(t) for t in example["conversations"]])
  moved["conversations"][0]["value"] = "What colour is the square?"
  moved["conversations"][2]["value"] = "Which side is it on?\n<image>"
  got = llava_data.encode_conversation(moved, tok, c)
  np.testing.assert_array_equal(got[0], tokens)
  np.testing.assert_array_equal(got[1], mask)
  assert got[3] == 19  # <s> + 16 tokens of round 1 + "USER :"
  # a system prompt goes before the first round only, outside the loss
  system = c.copy_and_resolve_references()
  system.roles.system, system.text_len = "USER", 33
  tokens, mask, prompt_len, image_pos = llava_data.encode_conversation(example, tok, system)
  assert tokens[1] == tok._hf.token_to_id("USER") and mask[:12].sum() == 0 and prompt_len == 12
  assert image_pos == 4
  # plain (stage 1): <bos>, the image, the first answer, all of it in the loss
  plain = c.copy_and_resolve_references()
  plain.template = "plain"
  tokens, mask, prompt_len, image_pos = llava_data.encode_conversation(example, tok, plain)
  assert tok.decode(tokens) == f"The square is {colour} ." and prompt_len == image_pos == 1
  np.testing.assert_array_equal(mask[:7], [0, 1, 1, 1, 1, 1, 0])
  # no <bos> (Phi-2's tokenizer adds none): the image first, the caption's first token in the loss
  plain.tokenizer.bos = ""
  no_bos = llava_data.build_tokenizer(plain.tokenizer)
  assert no_bos.bos is None
  tokens, mask, prompt_len, image_pos = llava_data.encode_conversation(example, no_bos, plain)
  assert prompt_len == image_pos == 0 and tokens[0] == tok._hf.token_to_id("The")
  np.testing.assert_array_equal(mask[:6], [1, 1, 1, 1, 1, 0])
  c.text_len = 20
  with pytest.raises(ValueError, match="data.text_len=20; raise it or set data.overflow"):
    llava_data.encode_conversation(example, tok, c)
  c.overflow = "truncate"  # LLaVA's model_max_length: cut, mask kept
  tokens, mask, _, _ = llava_data.encode_conversation(example, tok, c)
  np.testing.assert_array_equal(mask, want_mask[:20])
  c.text_len = 18  # the reference would cut into the visual tokens: refused
  with pytest.raises(ValueError, match="19 text tokens before <image> do not fit data.text_len"):
    llava_data.encode_conversation(moved, tok, c)
  bad = dict(example, conversations=[dict(t) for t in example["conversations"]])
  bad["conversations"][2]["value"] = "<image>\nAnd this?"
  with pytest.raises(ValueError, match="example '0000'.*<image> must appear once, in a human"):
    llava_data.encode_conversation(bad, tok, c)


def test_visual_tokens_are_spliced_at_the_image_and_the_loss_reads_the_logits_before_each_token(
    tmp_path):
  # two rows whose images sit at different text positions (3: "<s> USER :" before it, as the
  # conversation template; 0: visual first); the decoder sees text before, image, text after
  dec = phi.Phi(phi.phi_config(width=16, depth=1, mlp_dim=32, num_heads=2, num_kv_heads=2,
                               vocab_size=24, max_len=16, rotary_fraction=0.5), rngs=nnx.Rngs(0))
  visual = jax.random.normal(jax.random.key(0), (2, 3, 16))
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 24)
  image_pos = jnp.array([3, 0])
  spliced = dec.embed_sequence(visual, tokens, image_pos)
  text = np.asarray(dec.embed(tokens))
  by_hand = [np.concatenate([text[b, :p], visual[b], text[b, p:]]) for b, p in ((0, 3), (1, 0))]
  np.testing.assert_array_equal(spliced, np.stack(by_hand))
  # the hand-built sequence's logits: row i of target_logits is the element before token i
  # (token 3 of row 0 is predicted by the last visual token, sequence position 5)
  h = dec.forward(jnp.asarray(np.stack(by_hand)), jnp.broadcast_to(jnp.arange(9), (2, 9)), None)[0]
  full = np.asarray(dec.logits(h))
  before = [[0, 0, 1, 5, 6, 7], [2, 3, 4, 5, 6, 7]]  # row 0's first entry predicts nothing
  got = np.asarray(dec.target_logits(visual, tokens, image_pos))
  for b in range(2):
    np.testing.assert_allclose(got[b], full[b, before[b]], rtol=1e-5, atol=1e-5)
  # HF's convention (`dec(...)`): the logits at each text token's own place
  at = [[0, 1, 2, 6, 7, 8], [3, 4, 5, 6, 7, 8]]
  np.testing.assert_allclose(dec(visual, tokens, image_pos), full[[[0], [1]], at], rtol=1e-5,
                             atol=1e-5)
  with pytest.raises(ValueError, match="model.decoder.max_len=16 < 3 visual \\+ 14 text"):
    dec.embed_sequence(visual, jnp.zeros((2, 14), jnp.int32), image_pos)


def test_sentencepiece_model_offsets_and_errors(tmp_path):
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
  # "▁square" covers " square": the space before the answer's first word belongs to its token
  assert tok.encode_with_offsets("the square") == (ids[:2], [(0, 3), (3, 10)])
  with pytest.raises(ValueError, match="data.tokenizer.pad='<padding>' is not a token"):
    tokenizer.PretrainedTokenizer(prefix + ".model", bos="<s>", eos="</s>", pad="<padding>")
  with pytest.raises(ValueError, match="data.tokenizer.path='x.txt'"):
    tokenizer.PretrainedTokenizer("x.txt", bos="<s>", eos="</s>", pad="<pad>")
  with pytest.raises(ValueError, match="data.tokenizer.path is empty"):
    llava_data.build_tokenizer(llava_data.tokenizer_config())


def test_pad_square_is_llavas_expand2square_with_the_mean_colour():
  c = llava_data.default_config()
  c.image_size, c.pp_train = 4, "pad_square|resize(4, 'nearest')|normalize"
  image = np.full((2, 4, 3), 200, np.uint8)  # H=2, W=4: one row of padding above and below
  out = preprocess.Pipeline(c.pp_train, "data.pp_train", c).example(image, None)
  fill = np.round(255 * np.asarray(transforms.NORMALIZATIONS["clip"][0]))
  np.testing.assert_array_equal(out[[0, 3]], np.broadcast_to(fill, (2, 4, 3)))
  np.testing.assert_array_equal(out[1:3], 200)


def test_pipeline_batches_are_global_resumable_and_checked_before_the_run(tmp_path):
  c = _data_config(tmp_path, num_examples=6)
  whole = llava_data.train_dataset(c, batch_size=4, seed=3)
  first, second = next(whole), next(whole)
  assert first["image"].shape == (4, 16, 16, 3) and first["tokens"].shape == (4, 32)
  mean, std = transforms.normalization_stats("clip", 3)
  np.testing.assert_allclose(first["image"].max((0, 1, 2)), (1 - mean) / std, rtol=1e-6)  # white
  halves = [llava_data.train_dataset(c, batch_size=2, seed=3, process_index=p, process_count=2)
            for p in (0, 1)]
  for want in (first, second):  # global batch i = f(seed, i) on any number of processes
    got = [next(h) for h in halves]
    for k in want:
      np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k])
  again = llava_data.train_dataset(c, batch_size=4, seed=3)
  again.set_state(whole.get_state())
  np.testing.assert_array_equal(next(again)["example"], next(whole)["example"])
  tok = llava_data.build_tokenizer(c.tokenizer)
  examples = llava_data.read_examples(c.files.train)
  for row, mask in zip(first["example"], first["loss_mask"]):
    encoded = llava_data.encode_conversation(examples[row], tok, c)
    np.testing.assert_array_equal(mask, encoded[1])
  np.testing.assert_array_equal(first["image_pos"], 3)  # after "<s> USER :"
  np.testing.assert_array_equal(vqa.answer_mask(first), first["loss_mask"])
  evaluation = list(llava_data.eval_dataset(c, _source("validation"), batch_size=4))
  assert [b["mask"].tolist() for b in evaluation] == [[1] * 4, [1, 1, 0, 0]]
  rows = [b["example"][b["mask"] > 0].tolist() for b in llava_data.eval_dataset(
      c, _source("train[2:5]"), batch_size=4)]
  assert rows == [[2, 3, 4]]  # a tfds split slice: the JSON's rows 2-4
  for split, message in (
      ("test", r"evals.val.split='test': 'test' is not in data.files \['train', 'validation'\]; "
       "set data.files.test="),
      ("train[:x]", r"evals.val.split='train\[:x\]' is not a split of one file in tfds syntax")):
    with pytest.raises(ValueError, match=message):
      llava_data.check_eval_source(c, _source(split))
  with pytest.raises(ValueError, match=r"evals.val.pp=.* has random ops \['FlipLr'\]"):
    llava_data.check_eval_source(c, _source("validation", "decode|flip_lr|resize(16)|normalize"))
  for field, value, message in (
      ("image_dir", str(tmp_path / "none"), "data.image_dir=.* is not a folder"),
      ("files", {"train": str(tmp_path / "no.json"), "validation": c.files.train},
       r"data.files.train=.*no.json' does not exist"),
      ("train_split", "test", r"data.train_split='test' is not in data.files \['train', "
       r"'validation'\]; set data.files.test="),
      ("template", "vicuna", "data.template='vicuna' must be one of")):
    bad = c.copy_and_resolve_references()
    bad[field] = value
    with pytest.raises(ValueError, match=message):
      llava_data.validate(bad, "train")
  (tmp_path / "images" / "0003.png").unlink()
  llava_data.read_examples.cache_clear()
  with pytest.raises(ValueError, match=r"data.files.train: 1 images are not under data.image_dir"
                     r"=.*, e.g. 'images/0003.png'"):
    llava_data.validate(c, "train")
  text_only = [dict(e) for e in examples]
  del text_only[2]["image"]
  (tmp_path / "text_only.json").write_text(json.dumps(text_only))
  with pytest.raises(ValueError, match="example '0002': has no 'image' .*remove text-only rows"):
    llava_data.read_examples(str(tmp_path / "text_only.json"))


def _tiny_mocha_on_llava(tmp_path) -> ml_collections.ConfigDict:
  c = mocha_tiny_digits_vqa.get_config("stage2")
  c.data = _data_config(tmp_path, num_examples=8)
  c.evals = ml_collections.ConfigDict({"val": evaluators.task_eval(
      "vqa", dataset=c.data.get_ref("name"), split="validation[:4]", pp=llava_data.CLIP_PP,
      batch_size=8, every_steps=0)})
  c.batch_size = 8
  c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 2, 1, 0
  lm = decoder.decoder_config(width=16, depth=1, mlp_dim=32, num_heads=2, vocab_size=24,
                              max_len=48)
  c.model = model.mocha_config(lm, {
      "vit": encoders.encoder_config("vit", trainable=True, vit_variant="Ti/8", width=16,
                                     depth=1, mlp_dim=32, num_heads=2, posemb="sincos2d")},
      image_size=16, channels=3)
  c.optimizer.trainable = model.trainable_pattern(c.model, "stage2")
  return c


def test_the_trainers_vqa_task_reads_llava_batches_of_the_compiled_shapes(tmp_path):
  c = _tiny_mocha_on_llava(tmp_path)
  trainer = loop.Trainer(c, str(tmp_path / "run"))
  assert trainer.task.llava
  batch = next(trainer.task.train_batches(batch_size=8, seed=0, process_index=0,
                                          process_count=1))
  abstract = trainer.task.batch_shapes(8, eval_=False)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: (s.shape, s.dtype) for k, s in abstract.items()}
  bad = c.copy_and_resolve_references()
  bad.data.name = "llava"
  with pytest.raises(ValueError, match=r"data.name='llava': the vqa task reads "):
    vqa.VqaTask(bad).check()
  # a tokenizer larger than the LM's vocabulary is refused when the data is built
  c.model.decoder.vocab_size = 8
  with pytest.raises(ValueError, match=r"has 2[0-9] tokens but model.decoder.vocab_size=8"):
    vqa.VqaTask(c).train_batches(batch_size=8, seed=0, process_index=0, process_count=1)


@pytest.mark.slow  # end-to-end, ~1.5 min on the shared 2 cores (compiles): `-m slow`
def test_the_trainer_trains_mocha_on_llava_data(tmp_path):
  c = _tiny_mocha_on_llava(tmp_path)
  c.evals.answers = evaluators.generate_eval(
      dataset=c.data.get_ref("name"), split="validation[:4]", pp=llava_data.CLIP_PP,
      batch_size=8, every_steps=0, max_new_tokens=4, max_prompt_len=11)
  trainer = loop.Trainer(c, str(tmp_path / "run"))
  result = trainer.train()
  assert result["val/num_examples"] == 4 and trainer.ckpt.latest_step() == 2
  assert np.isfinite(result["train/answer_loss"]) and 0 < result["val/loss"] < 10
  assert "val/exact_match" not in result  # the task's own evaluation: teacher forced
  assert result["answers/num_examples"] == 4 and 0 <= result["answers/normalized_match"] <= 1
  written = loop.evaluate_checkpoint(c, str(tmp_path / "run"), only="answers")["answers"]
  with open(tmp_path / "run" / written["predictions"]) as f:
    predictions = json.load(f)
  assert [p["answer"] for p in predictions] == [
      e["conversations"][1]["value"] for e in llava_data.read_examples(c.data.files.validation)[:4]]


def _vqa_file(tmp_path, answers: list[list[str]]) -> str:
  """Question-only LLaVA examples (one human turn) with the annotators' `answers`, on the images
  of `write_example_dataset`."""
  examples = [{"id": f"q{n}", "image": f"images/{n:04d}.png", "answers": a, "conversations": [
      {"from": "human", "value": "<image>\nWhat colour is the square?"}]}
      for n, a in enumerate(answers)]
  path = tmp_path / "vqa.json"
  path.write_text(json.dumps(examples))
  return str(path)


# k of 10 annotators say "red" (normalised): accuracy 0.6, 0.9, 0.0, 0.3 for a "red" prediction
VQA_ANSWERS = [["red"] * 2 + ["blue"] * 8, ["Red."] * 3 + ["green"] * 7, ["blue"] * 10,
               ["a red"] + ["blue"] * 9]


def test_generation_prompt_is_the_references_eval_prompt_and_must_fit(tmp_path):
  c = _data_config(tmp_path, num_examples=4)
  c.files.vqa = _vqa_file(tmp_path, VQA_ANSWERS)
  tok = llava_data.build_tokenizer(c.tokenizer)
  example = llava_data.read_examples(c.files.train)[0]
  # the reference's eval prompt "USER: <image>\nWhat colour is the square? ASSISTANT:" (its
  # get_prompt() with the assistant's message None), each side of <image> tokenised on its own
  tokens, prompt_len, image_pos = llava_data.encode_prompt(example, tok, c, 12)
  want = ([tok.bos] + tok.encode("USER: ") + tok.encode("\nWhat colour is the square? ASSISTANT:"))
  np.testing.assert_array_equal(tokens, want + [tok.pad])
  assert prompt_len == 11 and image_pos == 3
  # the training encoding's generation start is the same prompt
  train_tokens, _, train_prompt_len, _ = llava_data.encode_conversation(example, tok, c)
  np.testing.assert_array_equal(train_tokens[:train_prompt_len], want)
  plain = c.copy_and_resolve_references()
  plain.template = "plain"
  assert llava_data.prompt_ids(example, tok, plain) == ([tok.bos], 1)  # <bos>, then the image
  # question-only examples serve generate evaluations, scored against their answers
  question = llava_data.read_examples(c.files.vqa)[0]
  assert llava_data.prompt_ids(question, tok, c)[0] == want
  with pytest.raises(ValueError, match="'q0': a question without a gpt turn serves generate"):
    llava_data.encode_conversation(question, tok, c)
  source = EvalSource(llava_data.NAME, "vqa", llava_data.CLIP_PP, "evals.vqa", None)
  make = lambda length, n=10: llava_data.generate_dataset(
      c, source, max_prompt_len=length, field="evals.vqa.max_prompt_len", num_answers=n,
      batch_size=4)
  batch = next(iter(make(11)))
  assert batch["tokens"].shape == (4, 11) and set(batch["prompt_len"]) == {11}
  with pytest.raises(ValueError, match=r"evals.vqa.max_prompt_len=10: example 'q0' of "
                     r"data.files.vqa has a prompt of 11 text tokens; raise it"):
    make(10)
  with pytest.raises(ValueError, match=r"data.files.vqa: example 'q0' has 10 'answers'; the VQA "
                     r"accuracy scores against the 9"):
    make(11, n=9)
  mixed = [json.loads(json.dumps(e)) for e in llava_data.read_examples(c.files.vqa)]
  mixed[1].pop("answers")
  mixed[1]["conversations"].append({"from": "gpt", "value": "red"})
  c.files.vqa = str(tmp_path / "mixed.json")
  (tmp_path / "mixed.json").write_text(json.dumps(mixed))
  with pytest.raises(ValueError, match="data.files.vqa: some examples have 'answers' and some"):
    make(11)


@pytest.mark.slow  # end-to-end through the Trainer, ~40 s on the shared 2 cores (3 compiles)
def test_generate_eval_fits_the_position_budget_exactly_and_scores_vqa_accuracy(tmp_path):
  c = _tiny_mocha_on_llava(tmp_path)
  c.data.files.vqa = _vqa_file(tmp_path, VQA_ANSWERS)
  visual, longest, new = 4, 11, 4  # 2x2 patches of 8 px; the prompts above; new tokens
  c.model.decoder.max_len = visual + longest + new  # exactly: prompt + new tokens fit
  entry = lambda split: evaluators.generate_eval(
      dataset=c.data.get_ref("name"), split=split, pp=llava_data.CLIP_PP, batch_size=8,
      every_steps=0, max_new_tokens=new, max_prompt_len=longest)
  c.evals = ml_collections.ConfigDict({"answers": entry("validation[:4]"), "vqa": entry("vqa")})
  trainer = loop.Trainer(c, str(tmp_path / "run"))
  state, _ = trainer.restore_or_init()
  built = trainer.evaluators()  # one compiled generation step for both (the same shapes)
  assert len([k for k in built["vqa"].ctx.compiled if k[0].startswith("generate")]) == 1
  scalars, extras = built["answers"].run(state.params, state.rest)
  records = extras["predictions"]
  examples = llava_data.read_examples(c.data.files.validation)
  assert scalars["answers/num_examples"] == 4 and set(scalars) == {
      "answers/exact_match", "answers/normalized_match", "answers/num_examples"}
  assert [r["answer"] for r in records] == [e["conversations"][1]["value"] for e in examples[:4]]
  assert records[0]["prompt"] == "USER : What colour is the square ? ASSISTANT :"
  # greedy: the first new token is the argmax after the prompt of the full forward
  forward = step_lib.make_eval_step(
      trainer.defs, trainer.mesh, trainer.shardings,
      lambda model, batch: model(batch, jnp.pad(batch["tokens"], ((0, 0), (0, 1)))))
  with jax.set_mesh(trainer.mesh):
    local = next(iter(built["answers"].batches))
    batch = step_lib.global_batch(local, trainer.mesh)
    generated = np.asarray(built["answers"].step(state.params, state.rest, batch))
    logits = np.asarray(forward(state.params, state.rest, batch))
  np.testing.assert_array_equal(generated[:, 0],
                                logits[np.arange(8), local["prompt_len"]].argmax(-1))
  # annotators' answers: the VQA accuracy, per record and averaged
  scalars, extras = built["vqa"].run(state.params, state.rest)
  assert set(scalars) == {"vqa/vqa_accuracy", "vqa/num_examples"}
  assert extras["predictions"][0]["answers"] == VQA_ANSWERS[0]
  assert scalars["vqa/vqa_accuracy"] == pytest.approx(
      np.mean([r["vqa_accuracy"] for r in extras["predictions"]]))
  red = np.full((8, new), tokenizer.PAD, np.int32)
  red[:, :2] = [trainer.task.tokenizer.encode("red")[0], trainer.task.tokenizer.eos]
  local = next(iter(built["vqa"].batches))
  scores = [r["vqa_accuracy"] for r in trainer.task.answer_records(local, red,
                                                                   built["vqa"].source)]
  np.testing.assert_allclose(scores, [0.6, 0.9, 0.0, 0.3], atol=1e-12)
  # one position short: a one-line error naming the three fields, when the step is traced
  c.model.decoder.max_len -= 1
  small = nnx.eval_shape(lambda: model.MoCHA(c.model, rngs=nnx.Rngs(0)))
  shapes = trainer.task.generate_batch_shapes(8, longest)
  with pytest.raises(ValueError, match=r"^evals.answers.max_prompt_len=11 \+ "
                     r"evals.answers.max_new_tokens=4 \+ 4 visual tokens exceed "
                     r"model.decoder.max_len=18; lower them to fit$"):
    trainer.task.generate_answers(small, shapes, new, "evals.answers")


class _PhiOnVisualTokens(nnx.Module):
  """MoCHA's interface (`model(batch, tokens)`: the logits predicting each text token;
  `encode`, `group_sizes`, `decoder`) over given visual tokens `batch["visual"]` and a tiny
  Phi-2-style decoder: what the loss and generation see, without encoders."""

  def __init__(self, max_len: int = 48, visual_tokens: int = 3):
    self.decoder = phi.Phi(phi.phi_config(width=16, depth=1, mlp_dim=32, num_heads=2,
                                          num_kv_heads=2, vocab_size=32, max_len=max_len,
                                          rotary_fraction=0.5), rngs=nnx.Rngs(0))
    self.group_sizes = (visual_tokens,)  # of batch["visual"] [B, visual_tokens, 16]

  def encode(self, batch):
    return batch["visual"]

  def __call__(self, batch, tokens):
    return self.decoder.target_logits(batch["visual"], tokens, batch["image_pos"])


def test_phi2_padding_as_the_reference_changes_no_loss(tmp_path):
  # the reference adds <|extra_0|> to Phi-2's tokenizer (HF add_special_tokens: the next id) and
  # pads with it; an added token already in the vocabulary keeps its id
  c = _data_config(tmp_path, num_examples=2)
  base = llava_data.build_tokenizer(c.tokenizer)
  c.tokenizer.added_tokens, c.tokenizer.pad = ("<|extra_0|>", "</s>"), "<|extra_0|>"
  tok = llava_data.build_tokenizer(c.tokenizer)
  assert tok.pad == len(base) and len(tok) == len(base) + 1 and tok.eos == base.eos
  text = "USER: What colour is the square? ASSISTANT: The square is red."
  assert tok.encode(text) == base.encode(text)
  example = llava_data.read_examples(c.files.train)[0]
  tokens, loss_mask, prompt_len, image_pos = llava_data.encode_conversation(example, tok, c)
  real = int(np.flatnonzero(tokens != tok.pad)[-1]) + 1  # 29 tokens, then padding
  assert real == 29 and not loss_mask[real:].any()
  # the same batch padded with <|extra_0|> (the reference) or with <eos> (Phi-2's <|endoftext|>
  # as pad): padding is outside the loss and after every real token under the causal mask, so
  # the loss and every real position's logits are the same to the bit
  vlm = _PhiOnVisualTokens()
  visual = np.random.default_rng(0).normal(size=(1, 3, 16)).astype(np.float32)
  batch = {"visual": np.concatenate([visual] * 2),
           "tokens": np.stack([tokens, np.where(np.arange(32) < real, tokens, tok.eos)]),
           "loss_mask": np.stack([loss_mask] * 2), "prompt_len": np.array([prompt_len] * 2),
           "image_pos": np.array([image_pos] * 2)}

  @nnx.jit
  def logits_and_losses(vlm, batch):  # each row's vqa_loss: its mean answer-token CE
    ce, mask, _, _ = vqa.answer_token_loss(vlm, batch)
    return vlm(batch, batch["tokens"]), (ce * mask).sum(1) / mask.sum(1)

  logits, losses = jax.device_get(logits_and_losses(vlm, batch))
  np.testing.assert_array_equal(logits[0, :real], logits[1, :real])
  assert not np.array_equal(logits[0, real:], logits[1, real:])  # the padding itself differs
  assert losses[0] == losses[1] and np.isfinite(losses[0])
  c.tokenizer.path = str(tmp_path / "sp.model")  # SentencePiece cannot add tokens
  with pytest.raises(ValueError, match="data.tokenizer.added_tokens=.*a SentencePiece model"):
    tokenizer.PretrainedTokenizer(c.tokenizer.path, bos="<s>", eos="</s>", pad="<unk>",
                                  added_tokens=("<|extra_0|>",))


def test_official_vqa_files_convert_to_a_llava_eval_file(tmp_path):
  questions = {"data_subtype": "val2014", "questions": [
      {"image_id": 262148, "question": "Where is he looking?", "question_id": 262148000}]}
  annotations = {"annotations": [{"question_id": 262148000, "image_id": 262148, "answers": [
      {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
      for i, a in enumerate(["down"] * 7 + ["at table", "skateboard", "table"])]}]}
  for name, content in (("q.json", questions), ("a.json", annotations)):
    (tmp_path / name).write_text(json.dumps(content))
  out = tmp_path / "eval" / "vqav2.json"
  argv = ["--questions", str(tmp_path / "q.json"), "--annotations", str(tmp_path / "a.json"),
          "--image_folder", "coco/val2014", "--out", str(out)]
  tool = runpy.run_path(str(pathlib.Path(__file__).parents[1] / "tools" / "vqa_to_llava.py"))
  tool["main"](argv)
  (example,) = llava_data.read_examples(str(out))  # a valid LLaVA-format file
  assert example == {
      "id": "262148000", "image": "coco/val2014/COCO_val2014_000000262148.jpg",
      "conversations": [{"from": "human", "value": "<image>\nWhere is he looking?\nAnswer the "
                         "question using a single word or phrase."}],
      "answers": ["down"] * 7 + ["at table", "skateboard", "table"]}
  with pytest.raises(SystemExit, match="exists; remove it"):
    tool["main"](argv)  # never overwrites


def test_generation_fills_the_position_budget_exactly(tmp_path):
  # visual + the prompt buffer (the longest prompt) + the new tokens = model.decoder.max_len
  c = ml_collections.ConfigDict({"data": _data_config(tmp_path, num_examples=2)})
  task = vqa.VqaTask(c)
  P, longest, new = 3, 11, 4
  vlm = _PhiOnVisualTokens(max_len=P + longest + new)
  prompts = [llava_data.encode_prompt(e, task.tokenizer, c.data, longest)
             for e in llava_data.read_examples(c.data.files.train)]
  short = llava_data.encode_prompt({**llava_data.read_examples(c.data.files.train)[0],
                                    "conversations": [{"from": "human", "value": "<image>\nleft?"},
                                                      {"from": "gpt", "value": "left"}]},
                                   task.tokenizer, c.data, longest)
  tokens, prompt_len, image_pos = (np.asarray(x) for x in zip(prompts[0], short))
  batch = {"visual": np.random.default_rng(0).normal(size=(2, P, 16)).astype(np.float32),
           "tokens": tokens, "prompt_len": prompt_len, "image_pos": image_pos}
  assert list(prompt_len) == [longest, 7]  # rows of different lengths

  @nnx.jit
  def generate_and_first_logits(vlm, batch):
    generated = task.generate_answers(vlm, batch, new, "evals.answers")
    last = (P + batch["prompt_len"] - 1)[:, None]  # the prompt's last position
    return generated, vlm.decoder.logits_at(batch["visual"], batch["tokens"],
                                            batch["image_pos"], last)[:, 0]

  generated, first = jax.device_get(generate_and_first_logits(vlm, batch))
  assert generated.shape == (2, new)
  np.testing.assert_array_equal(generated[:, 0], first.argmax(-1))
  small = nnx.eval_shape(lambda: _PhiOnVisualTokens(max_len=P + longest + new - 1))
  with pytest.raises(ValueError, match=r"^evals.answers.max_prompt_len=11 \+ "
                     r"evals.answers.max_new_tokens=4 \+ 3 visual tokens exceed "
                     r"model.decoder.max_len=17; lower them to fit$"):
    task.generate_answers(small, batch, new, "evals.answers")
