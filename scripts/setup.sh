#!/usr/bin/env bash
# Set up bimask-hf on a fresh machine: a virtual environment in .venv (or $BIMASK_VENV) with torch,
# the package and its dev tools, plus Debian's Fashion-MNIST files when apt is available.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${BIMASK_VENV:-.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip

# torch first, pinned: on x86_64 pip takes 2.14.1 + torchvision 0.29.1 from this machine's wheel cache;
# PyPI's torchvision does not import beside the CPU-only torch 2.13.0 (see docs/install.md).
if ! python -c "import torch, torchvision" >/dev/null 2>&1; then
  if [ "$(uname -m)" = "aarch64" ]; then
    python -m pip install -q "torch==2.9.1" "torchvision==0.24.1"
  else
    python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  fi
fi
python -m pip install -q -e ".[dev]"

# Real data that needs no network: Debian's Fashion-MNIST (the code falls back to the Hub copy).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
    || echo "note: could not apt-get install dataset-fashion-mnist; Fashion-MNIST will come from the Hub" >&2
fi
echo "bimask-hf is set up in $VENV (python: $(command -v python))"
