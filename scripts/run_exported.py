"""Runs an exported model with jax and numpy alone (no amap_jax, no flax): the artifact
`EXPORT/forward.jax` written by a run, on images already normalised as EXPORT/model.json says.

  python scripts/run_exported.py --export EXPORT --inputs images.npy --out logits.npy

`images.npy`: float32 [N, H, W, C]. Or, from Python: `forward = load(EXPORT); forward(images)`.
On CPU it compiles with the compiler options the export was measured fastest with
(model.json's `cpu_compiler_options`), where this jaxlib knows them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np


def compiler_options(directory: str) -> dict:
    """model.json's CPU compiler options, if this process runs on CPU and its jaxlib accepts
    them (experimental options come and go between releases); else none."""
    path = os.path.join(directory, "model.json")
    options = {}
    if os.path.exists(path):
        with open(path) as f:
            options = json.load(f).get("cpu_compiler_options") or {}
    if not options or jax.default_backend() != "cpu":
        return {}
    try:
        jax.jit(lambda x: -x).lower(np.ones(1, np.float32)).compile(compiler_options=options)
    except jax.errors.JaxRuntimeError:
        return {}
    return options


def load(directory: str):
    """The exported forward pass: float32 [N, H, W, C] images -> [N, classes] logits."""
    with open(os.path.join(directory, "forward.jax"), "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    return jax.jit(exported.call, compiler_options=compiler_options(directory) or None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logits = load(args.export)(np.load(args.inputs).astype(np.float32))
    np.save(args.out, np.asarray(logits))
    print(f"{len(logits)} images -> {args.out}; amap_jax imported: {'amap_jax' in sys.modules}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
