#!/usr/bin/env bash
# Regenerate the class-conditional FashionMNIST LDM that the ld3m benchmarks use (not committed: size).
#
#   bash scripts/train_ldm.sh [OUT_DIR] [train-ldm options...]   # default OUT_DIR runs/ldm-fmnist (git-ignored)
#
# Runs the full schedule of train-ldm's defaults: KL autoencoder f4 with 4 latent channels at 32 px,
# 300 steps; UNet2DModel 32/64/64 with class embeddings, 1500 steps of 128 latents, EMA 0.995. This is
# the model benchmarks/results/fmnist_ld3m.md and ld3m_gradients.md were generated with. Rerunning
# the same command after an interruption resumes from OUT_DIR.work/checkpoint.pt (bit-exactly).
# Sample grids: OUT_DIR.work/samples/. Extra arguments after OUT_DIR are passed to
# `splatdd train-ldm` (see `splatdd train-ldm --help`) after the script's own, so they override it;
# e.g. `--stop-unet-at 500` writes the model early (the checkpoint stays resumable and a later run
# without it continues to the end of the schedule).
set -euo pipefail
OUT="${1:-runs/ldm-fmnist}"
shift || true
exec splatdd train-ldm "$OUT" --dataset fashion_mnist --threads 1 "$@"
