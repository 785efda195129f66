"""LLaVA-format instruction data as the `vqa` task's input pipeline (`data.name='llava_json'`).

A file is a JSON list of examples as LLaVA ships them (`blip_laion_cc_sbu_558k.json`,
`llava_v1_5_mix665k.json`): `{"id": str, "image": path under data.image_dir,
"conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...},
...]}`, human and gpt turns alternating, any number of rounds. `data.files` maps split names to
files: `data.train_split` names the training file; an evaluation (`config.evals.<name>`, type
'vqa', dataset 'llava_json') names its file by `split`, optionally sliced in tfds split syntax
(`'validation'`, `'train[:1024]'`, `'train[10%:20%]'`; `split_rows`): the same syntax as every
other evaluation's split, rather than an example-count field.

Text of an example (`encode_conversation`), by `data.template`, as the reference
(Pbhgit/MoCHA `preprocess_phi` / LLaVA's `preprocess_v1`, `preprocess_plain`,
`tokenizer_image_token`):
- 'conversation' (LLaVA's `SeparatorStyle.TWO`: its Vicuna v1 and Phi templates): `<bos>` (if
  `data.tokenizer.bos` names one; Phi-2's tokenizer adds none), then per round the tokens of
  `[roles.system + roles.separator, first round only] + roles.user + question +
  roles.separator + roles.assistant + answer`, then `<eos>` (the template's sep2). Each round is
  tokenised as one string (the reference tokenises the whole prompt; its sep2 is a special token,
  which splits it the same way), and a token is in the loss when its characters overlap the
  answer's (`PretrainedTokenizer.encode_with_offsets`), so BPE merges across "ASSISTANT: The"
  tokenise as the LM saw them.
- 'plain' (LLaVA's `preprocess_plain`, stage-1 captions): `<bos>` (if any), `<image>`, the tokens
  of the first answer + "\\n"; the human turn is dropped; every caption token is in the loss.
`<image>` must appear once, in a human turn; as the reference's `preprocess_multimodal` it moves
to the start of its turn, followed by "\\n". The text is cut there and each side tokenised on its
own (`tokenizer_image_token`): `tokens` holds the text only, and `image_pos` the text token the
visual tokens go before (`moe_jax.vlm.lm.splice`: text before, the visual tokens, text after, as
the reference's `prepare_inputs_labels_for_multimodal`; the visual span is outside the loss).
The loss mask is 1 on the answers' tokens and their `<eos>` only (role prefixes, questions and
padding 0), as LLaVA masks with IGNORE_INDEX. The reference truncates the spliced sequence at
its `tokenizer_model_max_length`; `data.overflow='truncate'` does the same with the text budget
`data.text_len` (= model_max_length - the visual tokens), 'error' (the default) raises.
Examples without an image (text-only rows such as the ShareGPT part of mix665k) are refused
before the run: MoCHA's encoders need an image (LLaVA drops the visual tokens there instead).

Images go through `data.pp_train` / the evaluation's `pp` (`moe_jax.data.preprocess`; `CLIP_PP`,
data.pp_train's default, is CLIP's image processor: shorter side to data.image_size bicubic, centre crop, CLIP mean / std; prepend
`pad_square` for LLaVA's `image_aspect_ratio='pad'`), one image for every encoder as in the
MoCHA reference. Batching, shuffling and multi-host rows are `moe_jax.data.pipeline`'s: global
batch i is a function of (seed, i) only, and process p builds its rows of it.

Batches: `image float32 [B, H, W, 3]`, `tokens int32 [B, L]` (L = data.text_len, padded with
`<pad>`), `loss_mask float32 [B, L]`, `prompt_len int32 [B]` (through the first round's
assistant prefix: where generation starts), `image_pos int32 [B]` (where the visual tokens
go), `example int32 [B]` (row in the JSON); eval batches add `mask float32 [B]`.
`moe_jax.tasks.vqa` trains on them (its loss reads `loss_mask`).

Generate evaluations (`moe_jax.train.evaluators.generate_eval`, `generate_dataset`) ask each
example's first question as the reference's eval does (`model_vqa_loader`): the prompt only,
ending in the assistant's role ("... ASSISTANT:", `prompt_ids`), in a buffer of the entry's
`max_prompt_len` text tokens (`tokens [B, max_prompt_len]`, `prompt_len`, `image_pos`,
`example`, `mask`); a longer prompt is a one-line error naming that field before the run (the
reference does not truncate prompts). The reference answer is the first gpt turn, or, where
the examples carry `answers` (a list of the 10 annotators' answers, as VQAv2, VizWiz,
TextVQA ship them; all examples of the file or none), those, scored by the VQA accuracy
(`moe_jax.tasks.vqa_scoring`). Such an example may be a question alone (one human turn):
`{"id": "262148000", "image": "coco/val2014/COCO_val2014_000000262148.jpg", "conversations":
[{"from": "human", "value": "<image>\nWhere is he looking?\nAnswer the question using a single
word or phrase."}], "answers": ["down", "down", "at table", ...]}` (LLaVA-1.5's VQAv2 prompt).
"""
from __future__ import annotations

import functools
import json
import types

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
import tensorflow_datasets as tfds
from PIL import Image

from moe_jax import data, paths
from moe_jax.data import pipeline, preprocess
from moe_jax.vlm.tokenizer import PretrainedTokenizer

NAME = "llava_json"
IMAGE = "<image>"
ANSWERS = "answers"  # an example's reference answers for generate evaluations (VQA: 10)
TEMPLATES = ("conversation", "plain")
OVERFLOW = ("error", "truncate")
# CLIP's image processor: shorter side to data.image_size bicubic, centre crop, CLIP mean / std.
CLIP_PP = "decode|resize_small(method='bicubic')|central_crop|normalize"


def roles_config() -> ml_collections.ConfigDict:
  """Role prefixes of the conversation template (Vicuna v1's, as LLaVA-1.5 uses; `system` is
  the system prompt, '' for none)."""
  return ml_collections.ConfigDict(dict(system="", user="USER: ", assistant="ASSISTANT: ",
                                        separator=" "))


def tokenizer_config() -> ml_collections.ConfigDict:
  """`data.tokenizer`: the LM's tokenizer file, special tokens added to it (`added_tokens`, as
  HF's `add_special_tokens`) and the names of its special tokens (LLaMA's, as LLaVA pads LLaMA
  with `<unk>`; `bos` '' adds none, as Phi-2's tokenizer). Padding never reaches the loss
  (`loss_mask` 0) nor a real token's attention (right padding under the causal mask; the
  decoders take no padding mask), so the pad id changes no loss; it is the reference's so that
  the batches are its batches too."""
  return ml_collections.ConfigDict(dict(path="", bos="<s>", eos="</s>", pad="<unk>",
                                        added_tokens=()))


def default_config() -> ml_collections.ConfigDict:
  """The `data` node of a LLaVA-format dataset (`moe_jax.data.default_config()` for the image
  pipeline knobs, plus the files and the text knobs; paths are set per run)."""
  c = data.default_config()
  c.name = NAME
  c.files = ml_collections.ConfigDict()  # split -> JSON file, e.g. {"train": ".../x.json"}
  c.train_split = "train"
  c.image_dir = ""  # the examples' "image" paths are relative to it
  c.image_size, c.channels, c.num_classes = 336, 3, 0
  c.normalization = "clip"
  c.pp_train = CLIP_PP
  c.template = "conversation"
  c.text_len = 2048
  c.overflow = "error"
  c.tokenizer = tokenizer_config()
  c.roles = roles_config()
  return c


def build_tokenizer(c: ml_collections.ConfigDict) -> PretrainedTokenizer:
  if not c.path:
    raise ValueError("data.tokenizer.path is empty; set it to the LM's tokenizer.json or "
                     "SentencePiece .model")
  if not epath.Path(c.path).is_file():
    raise ValueError(f"data.tokenizer.path={c.path!r} does not exist")
  return PretrainedTokenizer(c.path, bos=c.bos, eos=c.eos, pad=c.pad,
                             added_tokens=tuple(c.added_tokens))


def _name(example, n: int) -> str:
  return f"example {example.get('id', n)!r}" if isinstance(example, dict) else f"example {n}"


def _check_example(example, n: int) -> None:
  """ValueError naming example `n` unless it has an image and alternating human / gpt turns
  with one `<image>`, in a human turn (a lone human turn: a question with `answers`), and, if it
  has `answers`, a non-empty list of strings."""
  name = _name(example, n)
  if not isinstance(example, dict) or not isinstance(example.get("conversations"), list):
    raise ValueError(f"{name}: needs a 'conversations' list (LLaVA format)")
  if "image" not in example:
    raise ValueError(f"{name}: has no 'image' (text-only); MoCHA needs one image per example: "
                     "remove text-only rows from the JSON")
  answers = example.get(ANSWERS)
  if answers is not None and (not isinstance(answers, list) or not answers or not all(
      isinstance(a, str) for a in answers)):
    raise ValueError(f"{name}: '{ANSWERS}' must be a non-empty list of strings (the annotators' "
                     "answers)")
  turns = example["conversations"]
  question_only = answers is not None and len(turns) == 1
  if not turns or (len(turns) % 2 and not question_only) or any(
      not isinstance(t, dict) or t.get("from") != ("human" if i % 2 == 0 else "gpt")
      or not isinstance(t.get("value"), str) for i, t in enumerate(turns)):
    raise ValueError(f"{name}: conversations must alternate human, gpt turns ({{'from', "
                     "'value'}}), starting with human and ending with gpt (or be one human turn: "
                     f"a question, with its '{ANSWERS}')")
  if sum(t["value"].count(IMAGE) for t in turns[::2]) != 1 or any(
      IMAGE in t["value"] for t in turns[1::2]):
    raise ValueError(f"{name}: {IMAGE} must appear once, in a human turn (one image per "
                     "example)")


def image_first(turn: str) -> str:
  """A human turn with its `<image>` moved to the start and a newline after it (the
  reference's `preprocess_multimodal`); a turn without one unchanged."""
  return IMAGE + "\n" + turn.replace(IMAGE, "").strip() if IMAGE in turn else turn


def _tokens_around_image(tokenizer: PretrainedTokenizer, text: str, answer_start: int
                         ) -> tuple[list[int], list[float], int | None]:
  """(ids of `text` without its `<image>`, 1.0 where a token's characters reach into
  `text[answer_start:]`, the index in the ids the image goes before or None): the two sides of
  `<image>` tokenised on their own (the reference's `tokenizer_image_token`); the answer lies
  after it."""
  before, image, after = text.partition(IMAGE)
  if not image:
    ids, offsets = tokenizer.encode_with_offsets(text)
    return ids, [float(end > answer_start) for _, end in offsets], None
  head = tokenizer.encode(before)
  ids, offsets = tokenizer.encode_with_offsets(after)
  start = answer_start - len(before) - len(IMAGE)
  return head + ids, [0.0] * len(head) + [float(end > start) for _, end in offsets], len(head)


def _round_prefix(roles: ml_collections.ConfigDict, turns: list[dict], r: int) -> str:
  """The text of round `r // 2` before its answer: `[system + separator, first round only] +
  user + question + separator + assistant` (LLaVA's `SeparatorStyle.TWO`)."""
  return (roles.system + roles.separator if r == 0 and roles.system else "") + (
      roles.user + image_first(turns[r]["value"]) + roles.separator + roles.assistant)


def encode_conversation(example: dict, tokenizer: PretrainedTokenizer,
                        config: ml_collections.ConfigDict
                        ) -> tuple[np.ndarray, np.ndarray, int, int]:
  """(tokens int32 `[L]`, loss mask float32 `[L]` over the *token* positions, prompt length,
  image position) of one example under `config` (the data node: template, roles, text_len,
  overflow); see the module docstring. Padded with `tokenizer.pad` to L = data.text_len."""
  _check_example(example, 0)
  name = f"example {example.get('id', '?')!r}"
  turns = example["conversations"]
  if len(turns) < 2:
    raise ValueError(f"{name}: a question without a gpt turn serves generate evaluations only "
                     f"(scored against its '{ANSWERS}'); training and 'vqa' evaluations need "
                     "the answer turn")
  roles = config.roles
  tokens = [] if tokenizer.bos is None else [tokenizer.bos]
  mask = [0.0] * len(tokens)
  if config.template == "plain":
    ids, answer, image_at = _tokens_around_image(tokenizer, IMAGE + turns[1]["value"] + "\n",
                                                 len(IMAGE))
    image_pos = prompt_len = len(tokens) + image_at
    tokens, mask = tokens + ids, mask + answer
  else:
    prompt_len = image_pos = 0
    for r in range(0, len(turns), 2):
      prefix = _round_prefix(roles, turns, r)
      ids, answer, image_at = _tokens_around_image(tokenizer, prefix + turns[r + 1]["value"],
                                                   len(prefix))
      if image_at is not None:
        image_pos = len(tokens) + image_at
      if r == 0:
        prompt_len = len(tokens) + (answer.index(1.0) if 1.0 in answer else len(ids))
      tokens += ids + [tokenizer.eos]
      mask += answer + [1.0]
  L = config.text_len
  if len(tokens) > L:
    if config.overflow != "truncate":
      raise ValueError(f"{name}: {len(tokens)} tokens do not fit data.text_len={L}; raise it or "
                       "set data.overflow='truncate' (LLaVA's model_max_length)")
    if image_pos > L:
      raise ValueError(f"{name}: {image_pos} text tokens before {IMAGE} do not fit "
                       f"data.text_len={L}; raise it")
    tokens, mask, prompt_len = tokens[:L], mask[:L], min(prompt_len, L)
  pad = L - len(tokens)
  return (np.asarray(tokens + [tokenizer.pad] * pad, np.int32),
          np.asarray(mask + [0.0] * pad, np.float32), prompt_len, image_pos)


def prompt_ids(example: dict, tokenizer: PretrainedTokenizer,
               config: ml_collections.ConfigDict) -> tuple[list[int], int]:
  """(text token ids, image position) of the generation prompt of the example's first question,
  as the reference's eval builds it (`model_vqa_loader`: the question's turn, then the
  assistant's role with no message, so its `get_prompt()` ends in "ASSISTANT:", i.e.
  `roles.assistant` without its trailing space; no answer). 'plain' template: only `<bos>` (if
  any) and the image (a stage-1 model captions it)."""
  _check_example(example, 0)
  tokens = [] if tokenizer.bos is None else [tokenizer.bos]
  if config.template == "plain":
    return tokens, len(tokens)
  prefix = _round_prefix(config.roles, example["conversations"], 0)
  prompt = prefix[:len(prefix) - len(config.roles.assistant)] + config.roles.assistant.rstrip()
  ids, _, image_at = _tokens_around_image(tokenizer, prompt, len(prompt))
  if image_at is None:
    raise ValueError(f"example {example.get('id', '?')!r}: its {IMAGE} is not in the first "
                     "question, the one generate evaluations ask")
  return tokens + ids, len(tokens) + image_at


def encode_prompt(example: dict, tokenizer: PretrainedTokenizer,
                  config: ml_collections.ConfigDict, length: int) -> tuple[np.ndarray, int, int]:
  """(tokens int32 `[length]`: `prompt_ids` padded with `tokenizer.pad`, prompt length, image
  position); the prompt must fit (`Conversations.check_prompts`)."""
  ids, image_pos = prompt_ids(example, tokenizer, config)
  return np.asarray(ids + [tokenizer.pad] * (length - len(ids)), np.int32), len(ids), image_pos


@functools.lru_cache(maxsize=4)
def read_examples(path: str) -> tuple[dict, ...]:
  """The examples of one JSON file, structure checked (read once per process and path)."""
  try:
    examples = json.loads(epath.Path(path).read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"data.files: {path} is not valid JSON ({e})") from None
  if not isinstance(examples, list) or not examples:
    raise ValueError(f"data.files: {path} must hold a non-empty JSON list of examples")
  for n, e in enumerate(examples):
    _check_example(e, n)
  return tuple(examples)


def split_rows(config: ml_collections.ConfigDict, split: str, field: str,
               num_examples: int | None = None) -> tuple[str, int | None, int | None]:
  """(file key in `data.files`, first row, end row) of `split` in tfds split syntax ('train',
  'train[:1024]', 'train[10%:20%]'; one file, no '+'), read by tfds's own parser against
  `num_examples` rows (None: only the syntax and the key are checked); ValueError naming
  `field`."""
  name = split.partition("[")[0]
  if name not in config.files:
    raise ValueError(f"{field}={split!r}: {name!r} is not in data.files {sorted(config.files)}; "
                     f"set data.files.{name}=/path/to.json")
  rows = types.SimpleNamespace(num_examples=num_examples or 2**62)
  try:
    (instruction,) = tfds.core.ReadInstruction.from_spec(split).to_absolute({name: rows})
  except (ValueError, AssertionError) as e:
    raise ValueError(f"{field}={split!r} is not a split of one file in tfds syntax, e.g. "
                     f"'{name}' or '{name}[:1024]' ({e})") from None
  return name, instruction.from_, instruction.to


def check_config(config: ml_collections.ConfigDict) -> None:
  """One-line ValueErrors naming the field for values the pipeline cannot use (reads no file:
  the task's start-up check, also where AOT compiles without the data)."""
  data.config.validate(config)
  for field, allowed in (("template", TEMPLATES), ("overflow", OVERFLOW)):
    if config[field] not in allowed:
      raise ValueError(f"data.{field}={config[field]!r} must be one of {allowed}")
  if config.channels != 3:
    raise ValueError(f"data.channels={config.channels}: LLaVA images are RGB; set 3")
  if config.text_len < 2:
    raise ValueError(f"data.text_len={config.text_len} must be >= 2")
  if config.train_split not in config.files:
    raise ValueError(f"data.train_split={config.train_split!r} is not in data.files "
                     f"{sorted(config.files)}; set data.files.{config.train_split}=/path/to.json")
  if not config.tokenizer.path:
    raise ValueError("data.tokenizer.path is empty; set it to the LM's tokenizer.json or "
                     "SentencePiece .model")


def check_eval_source(config: ml_collections.ConfigDict,
                      source: pipeline.EvalSource) -> preprocess.Pipeline:
  """The eval pipeline of `source` (one `config.evals` entry) after checking its pp string,
  dataset (`data.name`: the files are `data.files`) and split (`split_rows`); reads no file;
  ValueError naming the field."""
  pp = preprocess.eval_pipeline(source.pp, f"{source.field}.pp", config)
  if source.dataset != NAME:
    raise ValueError(f"{source.field}.dataset={source.dataset!r}: the LLaVA evaluation reads "
                     f"data.files; set {NAME!r} (data.name)")
  split_rows(config, source.split, f"{source.field}.{source.split_key}")
  return pp


def validate(config: ml_collections.ConfigDict, split: str) -> None:
  """`check_config`, then the files of `data.files.<split>` (the trainer builds its data before
  it reads checkpoints or compiles): the tokenizer, the file and its examples, and (image_dir on
  a local disk) every example's image file; one-line ValueErrors naming the field."""
  check_config(config)
  build_tokenizer(config.tokenizer)
  if not config.image_dir or not epath.Path(config.image_dir).is_dir():
    raise ValueError(f"data.image_dir={config.image_dir!r} is not a folder; set it to the "
                     "folder the examples' 'image' paths are relative to")
  path = config.files[split]
  if not epath.Path(path).is_file():
    raise ValueError(f"data.files.{split}={path!r} does not exist")
  examples = read_examples(path)
  if not paths.is_cloud(config.image_dir):  # a stat per image: cheap on a local disk only
    root = epath.Path(config.image_dir)
    missing = [e["image"] for e in examples if not (root / e["image"]).is_file()]
    if missing:
      raise ValueError(f"data.files.{split}: {len(missing)} images are not under "
                       f"data.image_dir={config.image_dir!r}, e.g. {missing[0]!r}")


class Conversations:
  """Rows `[start:stop]` of one file: a `moe_jax.data.readers.Reader` of the examples' encoded
  image files (label = row), and `with_text`, which adds the tokenised conversation of each row
  to a batch."""

  def __init__(self, config: ml_collections.ConfigDict, split: str, start: int | None = None,
               stop: int | None = None):
    self.config = config
    self.split = split
    self.examples = read_examples(config.files[split])[start:stop]
    self.first = start or 0  # the JSON row of self.examples[0]
    self.root = epath.Path(config.image_dir)
    self.tokenizer = build_tokenizer(config.tokenizer)

  def __len__(self) -> int:
    return len(self.examples)

  def read(self, indices: np.ndarray) -> tuple[list[bytes], np.ndarray]:
    rows = np.asarray(indices, np.int32)
    return [(self.root / self.examples[i]["image"]).read_bytes() for i in rows], rows

  def with_text(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An image batch whose `label` holds rows -> the full batch (module docstring)."""
    rows = batch.pop("label")
    tokens, mask, prompt_len, image_pos = zip(
        *[encode_conversation(self.examples[i], self.tokenizer, self.config) for i in rows])
    return {**batch, "tokens": np.stack(tokens), "loss_mask": np.stack(mask),
            "prompt_len": np.asarray(prompt_len, np.int32),
            "image_pos": np.asarray(image_pos, np.int32), "example": rows + np.int32(self.first)}

  def with_prompt(self, batch: dict[str, np.ndarray], *, length: int) -> dict[str, np.ndarray]:
    """An image batch whose `label` holds rows -> the prompt batch of a generate evaluation:
    `tokens [B, length]` (`encode_prompt`), `prompt_len`, `image_pos`, `example`."""
    rows = batch.pop("label")
    tokens, prompt_len, image_pos = zip(
        *[encode_prompt(self.examples[i], self.tokenizer, self.config, length) for i in rows])
    return {**batch, "tokens": np.stack(tokens), "prompt_len": np.asarray(prompt_len, np.int32),
            "image_pos": np.asarray(image_pos, np.int32), "example": rows + np.int32(self.first)}

  @property
  def has_annotator_answers(self) -> bool:
    """Whether the examples carry `answers` (scored by the VQA accuracy)."""
    return ANSWERS in self.examples[0]

  def check_prompts(self, length: int, field: str) -> None:
    """ValueError naming `field` when a row's generation prompt (`prompt_ids`) is longer than
    `length` text tokens (the reference does not truncate prompts at eval time)."""
    sizes = [len(prompt_ids(e, self.tokenizer, self.config)[0]) for e in self.examples]
    longest = int(np.argmax(sizes))
    if sizes[longest] > length:
      raise ValueError(f"{field}={length}: {_name(self.examples[longest], self.first + longest)} "
                       f"of data.files.{self.split} has a prompt of {sizes[longest]} text "
                       "tokens; raise it")

  def check_references(self, n: int) -> None:
    """ValueError naming the file unless all or none of the rows have `answers`, and all those
    have `n` of them (the annotators' answers the VQA accuracy needs)."""
    where = f"data.files.{self.split}"
    if any((ANSWERS in e) != self.has_annotator_answers for e in self.examples):
      raise ValueError(f"{where}: some examples have '{ANSWERS}' and some do not; give every "
                       "question its annotators' answers, or none")
    for row, e in enumerate(self.examples):
      if self.has_annotator_answers and len(e[ANSWERS]) != n:
        raise ValueError(f"{where}: {_name(e, self.first + row)} has {len(e[ANSWERS])} "
                         f"'{ANSWERS}'; the VQA accuracy scores against the {n} annotators' "
                         "answers (single-answer data: drop it and give the answer as the gpt "
                         "turn)")


def eval_reader(config: ml_collections.ConfigDict, source: pipeline.EvalSource
                ) -> tuple[preprocess.Pipeline, "Conversations"]:
  """(the eval pipeline, the rows) of `source` (one `config.evals` entry), files checked."""
  pp, field = check_eval_source(config, source), f"{source.field}.{source.split_key}"
  split = split_rows(config, source.split, field)[0]
  validate(config, split)
  return pp, Conversations(config, *split_rows(config, source.split, field,
                                               len(read_examples(config.files[split]))))


def make_dataset(config: ml_collections.ConfigDict, source: pipeline.EvalSource | None = None, *,
                 batch_size: int, seed: int = 0, process_index: int = 0, process_count: int = 1,
                 train: bool) -> grain.DatasetIterator | grain.IterDataset:
  """`data.train_split` through `data.pp_train` (train=True: an endless, resumable iterator) or
  the split and pp string of `source` (one `config.evals` entry; a re-iterable single pass with
  `mask`) of this process, as `moe_jax.data.pipeline` batches."""
  if train:
    pp, split = preprocess.train_pipeline(config), config.train_split
    validate(config, split)
    reader = Conversations(config, split)
  else:
    pp, reader = eval_reader(config, source)
  return _batches(reader, pp, config, reader.with_text, train=train, batch_size=batch_size,
                  seed=seed, process_index=process_index, process_count=process_count)


def _batches(reader: Conversations, pp: preprocess.Pipeline, config: ml_collections.ConfigDict,
             extend, **kwargs) -> grain.DatasetIterator | grain.IterDataset:
  pp.check_source(None, True, f"{NAME}:{reader.split}")
  return pipeline.extended_dataset(reader, pp, config, extend, what=f"data.files.{reader.split}",
                                   **kwargs)


train_dataset = functools.partial(make_dataset, train=True)
eval_dataset = functools.partial(make_dataset, train=False)


def generate_dataset(config: ml_collections.ConfigDict, source: pipeline.EvalSource, *,
                     max_prompt_len: int, field: str, num_answers: int, batch_size: int,
                     process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """The split of `source` (a generate entry of `config.evals`) as prompt batches
  (`Conversations.with_prompt`: `tokens [B, max_prompt_len]`); ValueError naming `field` (the
  entry's max_prompt_len) when a prompt does not fit, and naming the file when only some of its
  examples have `answers`, or, where they have them, not `num_answers` (the VQA accuracy's
  10)."""
  pp, reader = eval_reader(config, source)
  reader.check_prompts(max_prompt_len, field)
  reader.check_references(num_answers)
  extend = functools.partial(reader.with_prompt, length=max_prompt_len)
  return _batches(reader, pp, config, extend, train=False, batch_size=batch_size, seed=0,
                  process_index=process_index, process_count=process_count)


def batch_shapes(config: ml_collections.ConfigDict, batch_size: int,
                 eval_: bool) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of a global batch of `batch_size` (for compiling before data arrives)."""
  d = config.data
  fields = {"image": ((d.image_size, d.image_size, d.channels), jnp.float32),
            "tokens": ((d.text_len,), jnp.int32), "loss_mask": ((d.text_len,), jnp.float32),
            "prompt_len": ((), jnp.int32), "image_pos": ((), jnp.int32),
            "example": ((), jnp.int32)}
  if eval_:
    fields["mask"] = ((), jnp.float32)
  return {k: jax.ShapeDtypeStruct((batch_size, *shape), dtype)
          for k, (shape, dtype) in fields.items()}


def generate_batch_shapes(config: ml_collections.ConfigDict, batch_size: int,
                          max_prompt_len: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of a global batch of a generate evaluation (`generate_dataset`)."""
  d = config.data
  fields = {"image": ((d.image_size, d.image_size, d.channels), jnp.float32),
            "tokens": ((max_prompt_len,), jnp.int32), "prompt_len": ((), jnp.int32),
            "image_pos": ((), jnp.int32), "example": ((), jnp.int32), "mask": ((), jnp.float32)}
  return {k: jax.ShapeDtypeStruct((batch_size, *shape), dtype)
          for k, (shape, dtype) in fields.items()}


# LLaVA-1.5's short-answer instruction (its VQAv2 / GQA / VizWiz eval question files)
SHORT_ANSWER = "Answer the question using a single word or phrase."


def vqa_examples(questions: dict, annotations: dict, image_folder: str,
                 instruction: str = SHORT_ANSWER) -> list[dict]:
  """LLaVA-format examples (one human turn + the 10 `answers`) of the official VQA JSON files
  (`v2_OpenEnded_mscoco_<subtype>_questions.json` and `v2_mscoco_<subtype>_annotations.json`):
  the question + "\n" + `instruction`, the image `image_folder/COCO_<subtype>_<image id, 12
  digits>.jpg` (relative to data.image_dir), id = the question id."""
  answers = {a["question_id"]: [x["answer"] for x in a["answers"]]
             for a in annotations["annotations"]}
  subtype = questions["data_subtype"]
  return [{"id": str(q["question_id"]),
           "image": f"{image_folder}/COCO_{subtype}_{q['image_id']:012d}.jpg",
           "conversations": [{"from": "human",
                              "value": f"{IMAGE}\n{q['question']}\n{instruction}"}],
           ANSWERS: answers[q["question_id"]]} for q in questions["questions"]]


def write_example_dataset(directory: str, num_examples: int = 8, seed: int = 0) -> str:
  """A small LLaVA-format dataset (two-turn questions about the colour and side of a square on
  generated 32x32 PNGs) in `directory`; returns the JSON's path."""
  rng = np.random.default_rng(seed)
  colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
  root = epath.Path(directory)
  (root / "images").mkdir(parents=True, exist_ok=True)
  examples = []
  for n in range(num_examples):
    colour = list(colours)[int(rng.integers(len(colours)))]
    side = "left" if rng.random() < 0.5 else "right"
    pixels = np.full((32, 32, 3), 255, np.uint8)
    pixels[8:24, (2 if side == "left" else 18):(14 if side == "left" else 30)] = colours[colour]
    image = f"images/{n:04d}.png"
    Image.fromarray(pixels).save(str(root / image))
    examples.append({"id": f"{n:04d}", "image": image, "conversations": [
        {"from": "human", "value": f"{IMAGE}\nWhat colour is the square?"},
        {"from": "gpt", "value": f"The square is {colour}."},
        {"from": "human", "value": "Which side is it on?"},
        {"from": "gpt", "value": side}]})
  path = root / "conversations.json"
  path.write_text(json.dumps(examples, indent=1))
  return str(path)
