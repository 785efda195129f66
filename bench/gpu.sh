#!/usr/bin/env bash
# GPU benchmarks in bf16 (not yet run: no GPU was lent so far). Needs a CUDA build of jax, e.g.
#   pip install -r requirements.txt "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')"
#   pip install --no-deps -e .
# Prints ViMoE-B/16 vs dense ViT-B/16 train-step time and MFU against the GPU's measured bf16
# matmul peak, then the MoE layer and grouped-matmul tables. JSON goes to bench/out/gpu_*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 'error: no GPU backend in jax; install a CUDA build of jax (see bench/gpu.sh)')"
nvidia-smi --query-gpu=name,memory.total --format=csv || true
python -m bench.train_step --config configs/vimoe_imagenet.py --size B/16 --batch 256 \
  --dtype bfloat16 --matmul 8192 --malloc default --out bench/out/gpu_train_step_b16.json
python -m bench.moe_layer --dtype bfloat16 --malloc default --out bench/out/gpu_moe_layer.json
python -m bench.gmm --dtype bfloat16 --ragged-dot --malloc default \
  --configs 8192,8,128 8192,16,128 16384,32,128 --out bench/out/gpu_gmm.json
