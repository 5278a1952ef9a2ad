#!/usr/bin/env bash
# Full-size rows for docs/performance.md on one GPU (prepared for the H200; about 8 minutes): for SDXL, SD3.5-M and
# FLUX.1-dev with random weights built on the GPU, bf16, LoRA:
#   1. bench/sampler_overhead.py --full-size: genreward's sampler vs the family's own diffusers pipeline, a = 0 / η = 0
#      (like for like), then with the stochastic step (the log-prob bookkeeping training needs);
#   2. bench/train_step.py --full-size: one PRDP epoch by phase against the denoiser floor, peak GPU memory.
# Usage: bash bench/gpu_families.sh [OUT_DIR]   (each command's output goes to OUT_DIR/<family>-<bench>.txt)
set -uo pipefail
out="${1:-${OUT:-bench-gpu-out}}"
mkdir -p "$out"
py="${PYTHON:-python}"
for family in sdxl sd3 flux; do
  steps=20; [ "$family" = flux ] && steps=12
  timeout 150 "$py" bench/sampler_overhead.py --full-size --family "$family" --steps "$steps" --batch 2 --reps 2 \
      --eta 0 --noise-level 0 > "$out/$family-sampler-deterministic.txt" 2>&1
  timeout 120 "$py" bench/sampler_overhead.py --full-size --family "$family" --steps "$steps" --batch 2 --reps 2 \
      --noise-level 0.7 > "$out/$family-sampler-sde.txt" 2>&1
  timeout 150 "$py" bench/train_step.py --full-size --family "$family" --steps 10 --prompts 1 --images 2 --batch 2 \
      --epochs 2 --gradient-checkpointing > "$out/$family-train-step.txt" 2>&1
  tail -n 3 "$out/$family"-*.txt
done
