"""Runs an exported model with jax and numpy alone (no amap_jax, no flax): the artifact
`EXPORT/forward.jax` written by a run, on images already normalised as EXPORT/model.json says.

  python scripts/run_exported.py --export EXPORT --inputs images.npy --out logits.npy

`images.npy`: float32 [N, H, W, C]. Or, from Python: `forward = load(EXPORT); forward(images)`.
Both check forward.jax and model.json against model.json's manifest (SHA-256) first. On CPU it
compiles with the compiler options the export was measured fastest with (model.json's
`cpu_compiler_options`), where this jaxlib knows them. Bad input ends in one line, exit 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import jax
import numpy as np


class ExportError(ValueError):
    """An export or input this script cannot run (one line)."""


def read_meta(directory: str, allow_unverified: bool = False) -> dict:
    """model.json, its fields checked against its manifest (as amap_jax.io.pruned does); one
    without a manifest is refused unless `allow_unverified`."""
    path = os.path.join(directory, "model.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise ExportError(f"{directory} holds no finished export (no model.json)") from None
    except ValueError as e:
        raise ExportError(f"{path} is not valid JSON ({e})") from None
    manifest = meta.get("manifest") if isinstance(meta, dict) else None
    if manifest is None and not allow_unverified:
        raise ExportError(
            f"{path} has no manifest: its files cannot be checked; export again, or pass "
            "--allow_unverified if you trust them"
        )
    if manifest is not None:
        fields = {k: v for k, v in meta.items() if k != "manifest"}
        text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        if hashlib.sha256(text.encode()).hexdigest() != manifest.get("model.json"):
            raise ExportError(
                f"{path} was changed after export (its fields do not match its manifest); "
                "restore it or export again"
            )
    return meta


def compiler_options(meta: dict) -> dict:
    """model.json's CPU compiler options, if this process runs on CPU and its jaxlib accepts
    them (experimental options come and go between releases); else none."""
    options = meta.get("cpu_compiler_options") or {}
    if not options or jax.default_backend() != "cpu":
        return {}
    try:
        jax.jit(lambda x: -x).lower(np.ones(1, np.float32)).compile(compiler_options=options)
    except jax.errors.JaxRuntimeError:
        return {}
    return options


def load(directory: str, allow_unverified: bool = False):
    """The exported forward pass: float32 [N, H, W, C] images -> [N, classes] logits."""
    meta = read_meta(directory, allow_unverified)
    path = os.path.join(directory, "forward.jax")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ExportError(f"{path} is missing (exported with export_artifact=false?)") from None
    expected = (meta.get("manifest") or {}).get("forward.jax")
    if expected is None and not allow_unverified:
        raise ExportError(
            f"{path} is not in model.json's manifest: it cannot be checked; export again, or "
            "pass --allow_unverified if you trust it"
        )
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise ExportError(
            f"{path} does not match its checksum in model.json (corrupt or changed after "
            "export); restore it or export again"
        )
    try:
        exported = jax.export.deserialize(bytearray(data))
    except Exception as e:  # a truncated or foreign file fails deep in flatbuffers
        raise ExportError(f"{path} is not a jax.export artifact ({type(e).__name__})") from None
    return jax.jit(exported.call, compiler_options=compiler_options(meta) or None)


def read_inputs(path: str, meta: dict) -> np.ndarray:
    """The images of a .npy file, checked against the export's input shape."""
    try:
        x = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ExportError(f"{path}: no such file") from None
    except (ValueError, OSError, EOFError):
        raise ExportError(f"{path} is not a .npy file of numbers") from None
    spec = meta.get("input", {})
    want = (spec.get("image_size"), spec.get("image_size"), spec.get("channels"))
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        raise ExportError(f"{path} holds an array of shape {x.shape}; the model takes [N, *{want}]")
    if len(x) == 0:
        raise ExportError(f"{path} holds no images (N=0)")
    if not np.issubdtype(x.dtype, np.number):
        raise ExportError(f"{path} holds {x.dtype}, not numbers")
    return x.astype(np.float32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--allow_unverified",
        action="store_true",
        help="run an export whose files have no manifest to be checked against",
    )
    args = parser.parse_args(argv)
    try:
        meta = read_meta(args.export, args.allow_unverified)
        images = read_inputs(args.inputs, meta)
        out_dir = os.path.dirname(os.path.abspath(args.out))
        if not os.access(out_dir, os.W_OK):
            raise ExportError(f"cannot write {args.out}: {out_dir} is not a writable folder")
        logits = np.asarray(load(args.export, args.allow_unverified)(images))
        try:
            np.save(args.out, logits)
        except OSError as e:
            raise ExportError(f"cannot write {args.out}: {e.strerror}") from None
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(logits)} images -> {args.out}; amap_jax imported: {'amap_jax' in sys.modules}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
