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

# Quiet on success: a step's output is shown only when it fails.
quiet() {
  local log
  log="$(mktemp)"
  if ! "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "setup: failed: $*" >&2
    return 1
  fi
  rm -f "$log"
}

echo "setup: installing into .venv from $req (a fresh machine: about 3 minutes, 3.5 GB)"
quiet python3 -m venv .venv
quiet .venv/bin/pip install -q --upgrade pip
quiet .venv/bin/pip install -q -r "$req"
# The package itself, editable: `import amap_jax` and `python -m amap_jax.predict` work from any
# directory, and edits to the checkout take effect.
quiet .venv/bin/pip install -q --no-deps -e .
if [ "$(basename "$req")" = requirements-test.txt ]; then
  # Test-only torch/timm for parity tests, Torch-Pruning for bench/vs_timm.py; timm and
  # Torch-Pruning without deps (their declared dependencies pull a CUDA torch).
  quiet .venv/bin/pip install -q -r requirements-torch.txt
  quiet .venv/bin/pip install -q --no-deps timm==1.0.31 torch-pruning==1.6.1
  # The index's torchvision is a CUDA build that cannot import beside CPU torch: a start-up hook
  # (bench/torchvision_cpu.py) defines its two missing ops, so `import timm` works in .venv.
  site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  cp bench/torchvision_cpu.py "$site/_amap_torchvision_cpu.py"
  echo "import _amap_torchvision_cpu; _amap_torchvision_cpu.install()" >"$site/_amap_torchvision_cpu.pth"
fi
echo "setup: done"
