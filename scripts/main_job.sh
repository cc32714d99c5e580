#!/usr/bin/env bash
# The main job: set up, then train a small ResNet with Bi-Mask 2:4 on Fashion-MNIST (real data, no network)
# and write a Hub-ready model folder. Extra arguments override the recipe, e.g. --num_train_epochs 1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${BIMASK_VENV:-.venv}/bin/activate"
export HF_HUB_DISABLE_TELEMETRY=1
# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning makes steps up to 2.5x slower.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
bimask-train recipes/fashion_mnist_quickstart.yaml --use_cpu "$(python -c 'import torch; print(not torch.cuda.is_available())')" "$@"
