"""Pretrained weights -> parameters of our modules, torch-free.

- `importers.import_checkpoint(path)`: the one entry point; picks the importer from the
  checkpoint and returns (our model config, flat float32 parameters, `ImportReport` of the keys
  used / ignored), or a one-line `CheckpointMismatch` on any unused, missing or mis-shaped key:
  - `hf`: Hugging Face directories (`config.json` + `model.safetensors`, or shards with
    `model.safetensors.index.json`): ViT, DINOv2 (+ registers), CLIP and SigLIP image towers
    -> our ViT; `hf_convnext`: ConvNeXt -> our ConvNeXt;
  - `big_vision`: big_vision / vit_jax `.npz` ViTs (AugReg, SigLIP image towers) -> our ViT.
- `rules`: the per-parameter rules (keys, shapes, layout conversion) every importer is made of.
- `init_from`: the trainer's `config.init_from`: start a run from such a checkpoint or from
  another run's orbax checkpoint through explicit rules (keep, re-init, resize posemb, upcycle).

Parameters travel as flat dicts `{"blocks/0/attn/query/kernel": array}` (`tree.flatten`).
"""
