#!/usr/bin/env bash
# Set up, then run the linter and the whole test suite (multi-process, loopback Hub and benchmark smoke runs
# included). Extra arguments go to pytest, e.g. -k masks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${BIMASK_VENV:-.venv}/bin/activate"
export HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"  # see scripts/main_job.sh
ruff check bimask_hf tests benchmarks
python -m pytest -q "$@"
