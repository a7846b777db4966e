#!/usr/bin/env bash
# The newest releases on the newest Python available: builds .venv-newest with every runtime and
# test requirement unpinned (torch/timm stay pinned: a CPU reference for parity tests only),
# prints what it got, and runs the test suite. Not part of CI (it downloads whatever is newest).
# Usage: bash scripts/check_newest.sh [python executable] [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-}"
if [ -z "$py" ]; then  # the newest python3.X on PATH or under pyenv
  best=0
  for p in /usr/bin/python3.* /usr/local/bin/python3.* "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.*/bin/python3; do
    [[ -x "$p" && "$p" =~ python3(\.[0-9]+)?$ ]] || continue
    minor=$("$p" -c 'import sys; print(sys.version_info[1])' 2>/dev/null) || continue
    if (( minor > best )); then best=$minor; py=$p; fi
  done
fi
shift || true
echo "check_newest: $("$py" --version) ($py)"

unpinned=$(mktemp -d)
trap 'rm -rf "$unpinned"' EXIT
for f in requirements.txt requirements-imagenet.txt requirements-test.txt; do
  sed -E 's/^([A-Za-z0-9_.-]+)[=<>~!]=[^ #]*/\1/' "$f" > "$unpinned/$f"
done

"$py" -m venv --clear .venv-newest
.venv-newest/bin/pip install -q --upgrade pip
.venv-newest/bin/pip install -q -r "$unpinned/requirements-test.txt"
.venv-newest/bin/pip install -q -r requirements-torch.txt
.venv-newest/bin/pip install -q --no-deps timm==1.0.31 torch-pruning==1.6.1
# Where no CPU wheel of the pinned torch exists for this Python (3.13 here), pip takes the CUDA
# build, which brings triton; importing triton after TensorFlow segfaults (their LLVMs clash), and
# torch on CPU never needs it.
.venv-newest/bin/pip uninstall -y -q triton 2>/dev/null || true
.venv-newest/bin/pip list 2>/dev/null | grep -iE '^(jax|jaxlib|flax|optax|orbax-checkpoint|chex|numpy|tensorflow-datasets|ml-collections|tensorboardX) '
.venv-newest/bin/python -m pytest -q -n 2 tests "$@"
