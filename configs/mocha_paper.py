r"""MoCHA at paper size (Pang et al. 2025): four ViT-L-class encoders and Phi-2, all pretrained,
trained on LLaVA's data in the reference's two stages (Pbhgit/MoCHA scripts/moec_phi/).

    # stage 1: connectors (+ HGA) on LLaVA-Pretrain captions (LLaVA's `plain` template)
    python train.py --config configs/mocha_paper.py:stage1 --workdir gs://.../mocha_s1
    # stage 2: connectors + Phi-2 on LLaVA-665K conversations, from stage 1's run
    python train.py --config configs/mocha_paper.py:stage2 --workdir gs://.../mocha_s2 \
        --config.init_from.path=gs://.../mocha_s1

Data (`moe_jax.vlm.llava_data`, the `vqa` task's LLaVA input pipeline), at the reference
scripts' paths relative to the working folder (override with `--config.data.files.train=...`,
`--config.data.image_dir=...`, `--config.data.tokenizer.path=...`):
  stage 1  ./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json, images under
           ./playground/data/images; template 'plain' (caption + "\n" in the loss); CLIP's
           image processor (shorter side 336 bicubic, centre crop)
  stage 2  ./playground/data/llava_v1_5_mix665k.json, images under ./playground/data; the
           reference's Phi conversation template (system prompt, "USER: " / "ASSISTANT: ",
           answers end in <|endoftext|>, loss on the assistant turns only); images padded to a
           square with CLIP's mean colour first (`image_aspect_ratio='pad'`). Text-only rows of
           mix665k are refused (one-line error): remove them from the JSON first.
  both     Phi-2's tokenizer.json from the decoder checkpoint folder (<|endoftext|> as eos, no
           <bos>: Phi-2's tokenizer adds none, so the reference's prompts start with the system
           prompt / the image; padded as the reference pads Phi-2: <|extra_0|> added to the
           tokenizer (the next id), as its `add_special_tokens({'unk_token': '<|extra_0|>'})` and
           `pad_token = unk_token`; the pad id changes no loss, see
           `llava_data.tokenizer_config`); the visual tokens spliced in at <image> (after the
           system prompt and "USER: " in stage 2, first in stage 1), as the reference does.
           Sequences as the reference's: model_max_length 2560 = 1692 visual + data.text_len 868
           text tokens, longer conversations truncated (`data.overflow='truncate'`), and Phi-2's
           rotary embedding run past its 2048 max_position_embeddings
           (`model.decoder.max_len=2560`, `extrapolate_positions=True`: the reference's Phi
           recomputes its cos / sin cache for longer inputs). Evaluation: `evals.train_1024`, a
           teacher-forced loss readout on split 'train[:1024]' (the first 1,024 training
           examples) at the end; stage 2 also `evals.vqav2_val`, VQAv2 val as the reference's
           `model_vqa_loader` asks it (greedy, up to 128 new tokens, the prompt alone in a
           buffer of 740 text tokens: 1692 + 740 + 128 = the 2560 positions) scored by the
           10-annotator VQA accuracy of its m4c evaluator (`vqav2_val/vqa_accuracy`), from
           `data.files.vqav2_val` (`VQAV2_VAL`, written by `tools/vqa_to_llava.py` from the
           official files; its images under data.image_dir). Run it alone on a checkpoint:
               python eval.py --config configs/mocha_paper.py:stage2 --workdir gs://.../mocha_s2 \
                   --only vqav2_val
Differences from the reference data path: JPEGs decode through PIL's draft mode when shrunk >= 2x
(`moe_jax.data.preprocess`), not at full size; text-only rows are refused.

Stage 2 starts from stage 1's latest checkpoint (`init_from.kind='run'`: every parameter, so
the trained connectors and the untouched encoders and Phi-2; no checkpoint is read again) with
a fresh optimizer at step 0; it needs its own workdir (the stage-1 workdir holds another
optimizer tree: a one-line error).

Encoders, frozen, each the library ViT / ConvNeXt holding its pretrained checkpoint
(`model.encoders.<name>.checkpoint`, read by `moe_jax.checkpoints.importers`), features as the
reference takes them (`moe_jax.vlm.encoders`), at 336 px with CLIP normalisation for all (as the
reference: one image from CLIP's image processor). `model.encoder_order` is the reference's HGA
order (its `torch.cat` of SigLIP, ConvNeXt, CLIP, DINOv2 before `build_innovative_graph_v3`):

  siglip_vit_l16_384   google/siglip-large-patch16-384 (HF dir)         440 tokens x 1024
  convnext_xxl         timm/convnext_xxlarge.clip_laion2b_soup_ft_in1k   100 tokens x 3072 -> 1024
                       (timm hub dir; an open_clip dir imports too, but holds other weights
                       and no classifier: set that backbone's num_classes=0)
  clip_vit_l14_336     openai/clip-vit-large-patch14-336 (HF dir)       576 tokens x 1024
  dinov2_vit_l14       facebook/dinov2-large (HF dir)                    576 tokens x 1024

Set the four paths with `--config.model.encoders.<name>.checkpoint=/path` (default: ./models/
<repo name>, as the reference's ./models/ folder). A checkpoint that does not fit the backbone is
a one-line error when the run starts. SigLIP-384's and DINOv2-518's position embeddings are
resized to the 336 px grids (21x21, 24x24) by torch's bicubic rule, as the reference does.
One MoE connector each (router on the encoder tokens, 4 experts Linear(1024 -> 2560)-GELU-
Linear(2560 -> 2560), top-2, balance 0.1, z-loss 0.01) into the LM width 2560, the reference
HGA (`model.hga.kind='reference'`: k=10 split 7 intra / 3 inter, parameter-free), a
Phi-2 decoder (`moe_jax.vlm.phi`, microsoft/phi-2's config.json `PHI_2`: 32 parallel blocks,
width 2560, 32 heads, rotary on 40% of each head's dims, vocab 51200, gelu_new, LayerNorm eps
1e-5, rope theta 1e4; ~2.8B parameters) holding Phi-2's weights from `model.decoder.checkpoint`
(the HF directory, default ./models/microsoft-phi-2, set with
`--config.model.decoder.checkpoint=/path`; read by `moe_jax.checkpoints.hf_decoders` when stage
1 starts; a checkpoint that does not fit `model.decoder` is a one-line error).
Stage 1: connectors (+ HGA) at lr 1e-3, batch 256, one epoch of the 558K captions; stage 2:
connectors + LM at lr 2e-5, batch 128; cosine, 3% warmup (the reference: batch 32 on 8 GPUs).

Scan over layers wherever it is exact (`moe_jax.models.stacked`; the same function as the
unrolled blocks, tests/test_scan.py): Phi-2's 32 blocks (`model.decoder.scan_layers`), each
ViT's blocks up to its feature layer and each ConvNeXt stage's blocks
(`model.encoders.<name>.backbone.scan_layers`), so XLA compiles one block per kind instead of
unrolling 32 + 22 + 23 + 24 + 40 (Phi-2, SigLIP, CLIP, DINOv2, ConvNeXt-XXL). Parameters then
sit at `.../blocks/stacked/...` `[depth, ...]`; the checkpoints above are stacked on import
(`moe_jax.checkpoints.layout`), and a stage-1 run with or without scan hands over to stage 2
either way. Set them False for the per-block layout.

AOT (compile only, from a CPU host with libtpu; bench/RESULTS.md "AOT: MoCHA paper config"):
    python -m moe_jax.commands.aot --config configs/mocha_paper.py:stage2 --topology v5p:4x4x4 \
        --config.mesh.data=1 --config.mesh.fsdp=16 --config.mesh.expert=4
(per-depth compiles and the full one: `python -m bench.mocha_aot --full`).
Expected result: not measured (needs accelerators and the data).
"""
from __future__ import annotations

import ml_collections

from configs import check_variant
from moe_jax.checkpoints import hf, hf_decoders, init_from
from moe_jax.models import convnext
from moe_jax.parallel import mesh
from moe_jax.train import evaluators, optim
from moe_jax.vlm import encoders, llava_data, model

VARIANTS = ("stage2", "stage1")
# The published checkpoints' config.json (image tower) values -> our backbone configs.
CLIP_L14_336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                    num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
                    hidden_act="quick_gelu", layer_norm_eps=1e-5)
SIGLIP_L16_384 = dict(model_type="siglip_vision_model", hidden_size=1024, intermediate_size=4096,
                      num_hidden_layers=24, num_attention_heads=16, image_size=384,
                      patch_size=16)
DINOV2_L14 = dict(model_type="dinov2", hidden_size=1024, num_hidden_layers=24,
                  num_attention_heads=16, mlp_ratio=4, image_size=518, patch_size=14,
                  num_channels=3, hidden_act="gelu", layer_norm_eps=1e-6, layerscale_value=1.0)
# microsoft/phi-2's config.json -> our decoder config.
PHI_2 = dict(model_type="phi", hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=32, partial_rotary_factor=0.4,
             vocab_size=51200, max_position_embeddings=2048, hidden_act="gelu_new",
             layer_norm_eps=1e-5, rope_theta=10000.0, qk_layernorm=False,
             tie_word_embeddings=False)
# The reference's conversation template for Phi-2 (its llava/conversation.py `conv_phi_v0`).
PHI_ROLES = dict(system="A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's "
                 "questions.", user="USER: ", assistant="ASSISTANT: ", separator=" ")
VISUAL_TOKENS = 440 + 100 + 576 + 576  # SigLIP, ConvNeXt, CLIP, DINOv2 at 336 px
MODEL_MAX_LENGTH = 2560  # the reference scripts' --model_max_length (visual + text tokens)
PHI_PAD = "<|extra_0|>"  # the reference's pad token for Phi-2, added to its tokenizer
EVAL_MAX_NEW_TOKENS = 128  # the reference's model_vqa_loader --max_new_tokens default
# VQAv2 val in LLaVA format with the 10 annotators' answers (`moe_jax.vlm.llava_data` docstring)
VQAV2_VAL = "./playground/data/eval/vqav2/llava_vqav2_val_answers.json"
# The reference scripts' data per stage: (JSON, image folder, template, image preprocessing).
CLIP_PROCESSOR = "resize_small(method='bicubic')|central_crop|normalize"
STAGE_DATA = {
    "stage1": ("./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json",
               "./playground/data/images", "plain", "decode|" + CLIP_PROCESSOR),
    "stage2": ("./playground/data/llava_v1_5_mix665k.json", "./playground/data", "conversation",
               "decode|pad_square|" + CLIP_PROCESSOR),
}
# timm convnext_xxlarge: norm_eps 1e-5 everywhere, LayerScale, the ft_in1k classifier head.
CONVNEXT_XXL = dict(layer_norm_eps=1e-5, head_norm_eps=1e-5, layer_scale=1e-6, num_classes=1000,
                    head_zero_init=False)


def get_config(variant: str = "stage2") -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  c = ml_collections.ConfigDict()
  c.task = "vqa"
  c.seed = 0
  c.batch_size = 256 if variant == "stage1" else 128
  c.total_steps = 558_128 // c.batch_size if variant == "stage1" else 5000  # ~ one epoch
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.evals = ml_collections.ConfigDict()

  c.data = llava_data.default_config()
  c.data.files.train, c.data.image_dir, c.data.template, c.data.pp_train = STAGE_DATA[variant]
  # the teacher-forced readout on the first 1024 training examples, at the end only
  c.evals.train_1024 = evaluators.task_eval(
      "vqa", dataset=c.data.get_ref("name"), split="train[:1024]", pp=c.data.pp_train,
      batch_size=256, every_steps=0)
  if variant == "stage2":  # VQAv2 val as the reference asks and scores it
    c.data.files.vqav2_val = VQAV2_VAL
    c.evals.vqav2_val = evaluators.generate_eval(
        dataset=c.data.get_ref("name"), split="vqav2_val", pp=c.data.pp_train, batch_size=256,
        every_steps=0, max_new_tokens=EVAL_MAX_NEW_TOKENS,
        max_prompt_len=MODEL_MAX_LENGTH - VISUAL_TOKENS - EVAL_MAX_NEW_TOKENS)
  c.data.image_size, c.data.normalization = 336, "clip"  # CLIP's processor, for every encoder
  c.data.text_len = MODEL_MAX_LENGTH - VISUAL_TOKENS
  c.data.overflow = "truncate"
  c.data.tokenizer.path = "./models/microsoft-phi-2/tokenizer.json"
  c.data.tokenizer.bos = ""  # Phi-2's tokenizer adds no <bos>
  c.data.tokenizer.eos = "<|endoftext|>"
  # the reference's Phi-2 padding: add_special_tokens({'unk_token': '<|extra_0|>'}), pad = unk
  c.data.tokenizer.added_tokens = (PHI_PAD,)
  c.data.tokenizer.pad = PHI_PAD
  c.data.roles.update(PHI_ROLES)
  c.data.prefetch_threads = 8  # JPEG decoding of 128-256 images per step

  frozen = dict(trainable=False, dtype="bfloat16")
  pretrained = lambda kind, hub, backbone, **kw: encoders.encoder_config(
      kind, checkpoint=f"./models/{hub}", backbone=backbone, scan_layers=True, **frozen, **kw)
  phi_2 = hf_decoders.decoder_config_from_hf(PHI_2)
  phi_2.checkpoint = "./models/microsoft-phi-2"
  phi_2.max_len, phi_2.extrapolate_positions = MODEL_MAX_LENGTH, True
  phi_2.scan_layers = True
  c.model = model.mocha_config(phi_2, {  # the reference's order
      "siglip_vit_l16_384": pretrained("siglip", "google-siglip-large-patch16-384",
                                       hf.vit_config_from_hf(SIGLIP_L16_384)),
      "convnext_xxl": pretrained("convnext", "timm-convnext_xxlarge.clip_laion2b_soup_ft_in1k",
                                 convnext.convnext_config("XXL", **CONVNEXT_XXL),
                                 pool_channels=1024),
      "clip_vit_l14_336": pretrained("clip", "openai-clip-vit-large-patch14-336",
                                     hf.vit_config_from_hf(CLIP_L14_336)),
      "dinov2_vit_l14": pretrained("dinov2", "facebook-dinov2-large",
                                   hf.vit_config_from_hf(DINOV2_L14)),
  }, image_size=c.data.get_ref("image_size"), channels=c.data.get_ref("channels"))
  c.model.decoder.dtype = c.model.connector.dtype = "bfloat16"
  # The reference trains with --gradient_checkpointing True (HF: each decoder layer keeps only
  # its input for the backward pass): remat 'full' on every Phi-2 block.
  c.model.decoder.remat_policy = "full"

  c.optimizer = optim.default_config()
  c.optimizer.warmup_steps = int(0.03 * c.total_steps)
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = "cosine"  # both stages' --lr_scheduler_type
  c.optimizer.learning_rate = 1e-3 if variant == "stage1" else 2e-5
  c.optimizer.trainable = model.trainable_pattern(c.model, variant)
  c.mesh = mesh.default_config()
  c.init_from = init_from.default_config()
  if variant == "stage2":  # from stage 1's workdir, given on the command line
    c.init_from.kind = "run"
  return c
