#!/usr/bin/env bash
# Installs everything on a fresh machine: the offline Fashion-MNIST files and a virtualenv.
# Usage: bash scripts/setup.sh [requirements file, default requirements-test.txt]
set -euo pipefail
cd "$(dirname "$0")/.."
req="${1:-requirements-test.txt}"

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST missing: run 'sudo apt-get install -y dataset-fashion-mnist'" >&2
  fi
fi

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -r "$req"
# The package itself, editable: `import amap_jax` and `python -m amap_jax.predict` work from any
# directory, and edits to the checkout take effect.
.venv/bin/pip install -q --no-deps -e .
if [ "$(basename "$req")" = requirements-test.txt ]; then
  # Test-only torch/timm for parity tests, Torch-Pruning for bench/vs_timm.py; timm and
  # Torch-Pruning without deps (their declared dependencies pull a CUDA torch).
  .venv/bin/pip install -q -r requirements-torch.txt
  .venv/bin/pip install -q --no-deps timm==1.0.31 torch-pruning==1.6.1
fi
