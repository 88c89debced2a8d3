#!/usr/bin/env bash
# MFU of the 1B preset in bf16 on one NVIDIA GPU (H100/H200), with fused
# attention from jax.nn.dot_product_attention (cuDNN) and with the blocked
# einsum attention, in one run. Nothing else in lmstack needs a GPU.
#
#   bash tools/gpu_bench.sh [OUT_DIR]       # writes OUT_DIR/gpu_bench.txt
#
# Needs jax with CUDA (pip install "jax[cuda12]") and the project installed
# (pip install -e .). The peak in the MFU column is the GPU's measured bf16
# matmul rate (tools/bench.py measures it in the same run); the datasheet
# dense bf16 peak is 989 TFLOP/s (H100 SXM) and the same for H200.
set -euo pipefail
out="${1:-.}"
mkdir -p "${out}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import jax; print(jax.__version__, jax.devices())"
  for impl in cudnn flash materialize; do
    for remat in none full; do
      echo "== 1b attention_impl=${impl} remat=${remat}"
      python tools/bench.py --presets=1b --batch_size=8 --seq_len=2048 --steps=10 --mode=pretrain \
        --model="attention_impl=${impl}" --remat="${remat}" --scan_layers=true || echo "(failed)"
    done
  done
} 2>&1 | tee "${out}/gpu_bench.txt"
