"""LLaVA-format instruction data: JSON conversations with an `<image>` placeholder.

A file is a JSON list of examples as LLaVA ships them (`llava_v1_5_mix665k.json`,
`blip_laion_cc_sbu_558k.json`): `{"id": str, "image": path under data.image_dir,
"conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...},
...]}`, human and gpt turns alternating, any number of rounds.

Text of an example (`encode_conversation`): `<bos>`, then per human turn the tokens of
`roles.user + value + roles.separator`, per gpt turn those of `roles.assistant + value` and
`<eos>`. The loss mask is 1 on the gpt values' tokens and their `<eos>` only (the role prefixes,
human turns and padding get 0), as LLaVA's `preprocess` masks with IGNORE_INDEX. `<image>` must
appear once, at the start of the first human turn (where LLaVA's data has it): MoCHA puts the
visual tokens before the text, i.e. at that place; the placeholder and the newline after it are
removed from the text. Anything else, or a text longer than `data.text_len`, is a ValueError that
names the example.

Batches: `image float32 [B, H, W, 3]` in [-1, 1] (resized to data.image_size), `tokens int32
[B, L]`, `loss_mask float32 [B, L]` (1 at the tokens the loss predicts: the answers and their
`<eos>`), `prompt_len int32 [B]` (through the first human turn and the assistant prefix, where
generation starts). `moe_jax.tasks.vqa` trains on them (its loss reads `loss_mask`).
"""
from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
from PIL import Image

from moe_jax.vlm.tokenizer import PretrainedTokenizer

IMAGE = "<image>"
ROLES = {"human", "gpt"}


def roles_config() -> ml_collections.ConfigDict:
  """Role prefixes of the conversation template (Vicuna v1's, as LLaVA-1.5 uses)."""
  return ml_collections.ConfigDict(dict(user="USER: ", assistant="ASSISTANT: ", separator=" "))


def tokenizer_config() -> ml_collections.ConfigDict:
  """`data.tokenizer`: the LM's tokenizer file and its special tokens (LLaMA's names)."""
  return ml_collections.ConfigDict(dict(path="", bos="<s>", eos="</s>", pad="<unk>"))


def build_tokenizer(c: ml_collections.ConfigDict) -> PretrainedTokenizer:
  if not c.path:
    raise ValueError("data.tokenizer.path is empty; set it to the LM's tokenizer.json or "
                     "SentencePiece .model")
  return PretrainedTokenizer(c.path, bos=c.bos, eos=c.eos, pad=c.pad)


def encode_conversation(example: dict, tokenizer: PretrainedTokenizer,
                        roles: ml_collections.ConfigDict,
                        text_len: int) -> tuple[np.ndarray, np.ndarray, int]:
  """(tokens int32 `[L]`, loss mask float32 `[L]` over the *token* positions, prompt length)
  of one example; see the module docstring. Padded with `tokenizer.pad` to L = text_len."""
  name = f"example {example.get('id', '?')!r}"
  turns = example["conversations"]
  if not turns or len(turns) % 2 or any(
      t["from"] != ("human" if i % 2 == 0 else "gpt") for i, t in enumerate(turns)):
    raise ValueError(f"{name}: conversations must alternate human, gpt turns, starting with "
                     "human and ending with gpt")
  first = turns[0]["value"]
  if "image" in example:
    if not first.startswith(IMAGE) or sum(t["value"].count(IMAGE) for t in turns) != 1:
      raise ValueError(f"{name}: {IMAGE} must appear once, at the start of the first human turn "
                       "(MoCHA puts the visual tokens before the text)")
    first = first[len(IMAGE):].removeprefix("\n")
  tokens, mask = [tokenizer.bos], [0.0]
  prompt_len = 0
  for i, t in enumerate(turns):
    if t["from"] == "human":
      ids = tokenizer.encode(roles.user + (first if i == 0 else t["value"]) + roles.separator)
      tokens += ids
      mask += [0.0] * len(ids)
    else:
      prefix = tokenizer.encode(roles.assistant)
      answer = tokenizer.encode(t["value"]) + [tokenizer.eos]
      tokens += prefix + answer
      mask += [0.0] * len(prefix) + [1.0] * len(answer)
    if i == 0:
      prompt_len = len(tokens) + len(tokenizer.encode(roles.assistant))
  if len(tokens) > text_len:
    raise ValueError(f"{name}: {len(tokens)} tokens do not fit data.text_len={text_len}; raise "
                     "it (or drop the example)")
  pad = text_len - len(tokens)
  return (np.asarray(tokens + [tokenizer.pad] * pad, np.int32),
          np.asarray(mask + [0.0] * pad, np.float32), prompt_len)


def load_image(path: str, size: int) -> np.ndarray:
  """`[size, size, 3]` float32 in [-1, 1] (RGB, bicubic resize of the whole image)."""
  with Image.open(path) as im:
    im = im.convert("RGB").resize((size, size), Image.BICUBIC)
    return np.asarray(im, np.float32) / 127.5 - 1.0


def load_examples(config: ml_collections.ConfigDict, split: str) -> dict[str, np.ndarray]:
  """All examples of the JSON file `config.files[split]` as arrays (batch fields above, `[N, ...]`)."""
  if split not in config.files:
    raise ValueError(f"data.files has no {split!r} split; it has {sorted(config.files)}")
  with open(config.files[split]) as f:
    examples = json.load(f)
  tokenizer = build_tokenizer(config.tokenizer)
  encoded = [encode_conversation(e, tokenizer, config.roles, config.text_len) for e in examples]
  return {
      "image": np.stack([load_image(os.path.join(config.image_dir, e["image"]), config.image_size)
                         for e in examples]),
      "tokens": np.stack([t for t, _, _ in encoded]),
      "loss_mask": np.stack([m for _, m, _ in encoded]),
      "prompt_len": np.asarray([p for _, _, p in encoded], np.int32)}


def write_example_dataset(directory: str, num_examples: int = 8, seed: int = 0) -> str:
  """A small LLaVA-format dataset (two-turn questions about the colour and side of a square on
  generated 32x32 PNGs) in `directory`; returns the JSON's path."""
  rng = np.random.default_rng(seed)
  colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
  os.makedirs(os.path.join(directory, "images"), exist_ok=True)
  examples = []
  for n in range(num_examples):
    colour = list(colours)[int(rng.integers(len(colours)))]
    side = "left" if rng.random() < 0.5 else "right"
    pixels = np.full((32, 32, 3), 255, np.uint8)
    pixels[8:24, (2 if side == "left" else 18):(14 if side == "left" else 30)] = colours[colour]
    image = f"images/{n:04d}.png"
    Image.fromarray(pixels).save(os.path.join(directory, image))
    examples.append({"id": f"{n:04d}", "image": image, "conversations": [
        {"from": "human", "value": f"{IMAGE}\nWhat colour is the square?"},
        {"from": "gpt", "value": f"The square is {colour}."},
        {"from": "human", "value": "Which side is it on?"},
        {"from": "gpt", "value": side}]})
  path = os.path.join(directory, "conversations.json")
  with open(path, "w") as f:
    json.dump(examples, f, indent=1)
  return path


def default_config() -> ml_collections.ConfigDict:
  """The `data` node of a LLaVA-format dataset (paths are set per run)."""
  return ml_collections.ConfigDict(dict(
      name="llava_json",
      files=ml_collections.ConfigDict(),  # split name -> JSON file, e.g. {"train": ".../x.json"}
      image_dir="",  # the examples' "image" paths are relative to it
      image_size=336, text_len=2048,
      tokenizer=tokenizer_config(), roles=roles_config()))
