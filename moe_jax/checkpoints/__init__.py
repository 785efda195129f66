"""Pretrained weights -> parameters of our modules, torch-free.

- `hf.import_hf(path)`: a Hugging Face ViT / DINOv2 checkpoint (`model.safetensors`, or sharded
  with `model.safetensors.index.json`, plus `config.json`) -> (our ViT config, parameters, report).
- `init_from`: the trainer's `config.init_from`: start a run from such a checkpoint or from
  another run's orbax checkpoint through explicit rules (keep, re-init, resize posemb, upcycle).

Parameters travel as flat dicts `{"blocks/0/attn/query/kernel": array}` (`tree.flatten`).
"""
