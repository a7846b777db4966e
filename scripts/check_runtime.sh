#!/usr/bin/env bash
# A runtime-only install (`pip install .` from this checkout, nothing else) runs a tiny job end
# to end with the export artifact, then `python -m amap_jax.predict` on one PNG and the jax-only
# loader: a runtime import that is not declared fails here, not at the end of a user's run.
# Usage: bash scripts/check_runtime.sh [venv directory, default a fresh temporary one]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$(mktemp -d)
venv=${1:-$work/venv}
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
# From the files git sees (tracked and not ignored): a stale build/ of an earlier `pip install .`
# would bring back modules that were since renamed.
mkdir "$work/src"
git ls-files -z -co --exclude-standard | tar --null -T - --ignore-failed-read -cf - 2>/dev/null \
  | tar -xf - -C "$work/src"
"$venv/bin/pip" install -q "$work/src"
cd "$work"  # away from the checkout: the installed package is the one imported
commands="amap_jax.predict amap_jax.io.savedmodel"  # define absl flags: one per process
"$venv/bin/python" - "$commands" <<'PY'
import importlib, pkgutil, sys
import amap_jax
names = [m.name for m in pkgutil.walk_packages(amap_jax.__path__, "amap_jax.")]
for name in names:
    if name not in sys.argv[1].split():
        importlib.import_module(name)
print(f"check_runtime: the {len(names)} modules of {amap_jax.__file__} import")
PY
for name in $commands; do "$venv/bin/python" -c "import $name"; done
XLA_FLAGS=--xla_force_host_platform_device_count=2 "$venv/bin/python" "$root/train.py" \
  --config "$root/tests/data/tiny_config.py" --workdir "$work/run" --config.export_artifact=true
"$venv/bin/python" -c "
import numpy as np
from PIL import Image
Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).save('one.png')
np.save('one.npy', np.zeros((1, 8, 8, 1), np.float32))"
"$venv/bin/python" -m amap_jax.predict --export "$work/run/export" one.png
"$venv/bin/python" "$root/scripts/run_exported.py" --export "$work/run/export" --inputs one.npy \
  --out logits.npy
rm -rf "$work"
echo "check_runtime: a runtime-only install ran the job, its artifact and predict"
