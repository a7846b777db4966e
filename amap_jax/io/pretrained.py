"""Pretrained PyTorch weights -> (model, variables): timm ViT/DeiT/Swin, official FLatten-Swin.

Checkpoints are read as tensors only: `.safetensors` with numpy, `.pth` with
`torch.load(weights_only=True)`; nothing is ever unpickled freely. Every parameter of the target
model must come from exactly one checkpoint entry, and every checkpoint entry must be used (bar
buffers the model recomputes): anything else is a `CheckpointMismatchError` listing the keys.
"""

from __future__ import annotations

import collections
import os
import re
import zipfile
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from amap_jax import models
from amap_jax.models import arch as arch_lib
from amap_jax.models.arch import LINEAR, SwinArch, ViTArch


class CheckpointMismatchError(ValueError):
    """The checkpoint does not hold the weights of the named architecture."""


# Buffers the reference models keep in their state dicts and our models recompute.
_RECOMPUTED = re.compile(r"(relative_position_index|attn_mask|relative_coords_table)$")

_VIT = {"tiny": "Ti", "small": "S", "base": "B"}
_SWIN = {"tiny": "T", "small": "S", "base": "B"}
NAMES = tuple(
    [f"{f}_{s}_patch16_224" for f in ("vit", "deit") for s in _VIT]
    + [f"deit_{s}_distilled_patch16_224" for s in _VIT]
    + [f"swin_{s}_patch4_window7_224" for s in _SWIN]
    + [f"flatten_swin_{s}_patch4_224" for s in _SWIN]
)


def named_arch(name: str, *, image_size: int | None = None, num_classes: int = 1000):
    """The architecture of a published model, by its reference name."""
    m = re.fullmatch(r"(vit|deit)_(tiny|small|base)(_distilled)?_patch16_224", name)
    if m:
        return arch_lib.vit_arch(
            _VIT[m[2]],
            image_size=image_size,
            num_classes=num_classes,
            distilled=bool(m[3]),
        ).replace(name=name)
    m = re.fullmatch(r"(flatten_)?swin_(tiny|small|base)_patch4(_window7)?_224", name)
    if m and bool(m[1]) != bool(m[3]):
        pattern = "LLSS" if m[1] else "SSSS"
        return arch_lib.swin_arch(
            _SWIN[m[2]], image_size=image_size, num_classes=num_classes, pattern=pattern
        ).replace(name=name)
    raise ValueError(f"unknown pretrained architecture {name!r}; known: {', '.join(NAMES)}")


def read_state_dict(source) -> dict[str, np.ndarray]:
    """A flat {name: array} from a .safetensors/.pth/.pt/.bin file or an in-memory state dict.

    Training checkpoints that wrap the weights (under "model", "state_dict" or "model_ema") are
    unwrapped.
    """
    if isinstance(source, str | os.PathLike):
        source = _read_file(os.fspath(source))
    if not isinstance(source, Mapping):
        raise TypeError(f"a state dict must be a mapping, got {type(source).__name__}")
    for key in ("model", "state_dict", "model_ema"):
        if key in source and isinstance(source[key], Mapping):
            source = source[key]
            break
    return {k: _numpy(v) for k, v in source.items()}


def _read_file(path: str):
    """Tensors from a checkpoint file; every way a file can be wrong is one line naming it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if not path.endswith((".safetensors", ".pth", ".pt", ".bin")):
        raise ValueError(f"{path}: expected a .safetensors, .pth, .pt or .bin file")
    if os.path.getsize(path) == 0:
        raise CheckpointMismatchError(f"{path} is empty (0 bytes)")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except SafetensorError as e:
            raise CheckpointMismatchError(f"{path} is not a valid safetensors file ({e})") from None
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs torch; or convert it to .safetensors") from e
    # Training checkpoints of the official FLatten code also hold their yacs config: read it as
    # a plain (inert) OrderedDict; anything else outside the tensor allow-list is refused.
    config_as_dict = [(collections.OrderedDict, "yacs.config.CfgNode")]
    try:
        with torch.serialization.safe_globals(config_as_dict):
            return torch.load(path, map_location="cpu", weights_only=True)
    # A file that is not a zip goes to torch's legacy unpickler, which fails on arbitrary bytes
    # in arbitrary ways (IndexError, KeyError, struct.error, ...): every failure is reported.
    except Exception as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:  # never advise weights_only=False: that would run what was just refused
            raise CheckpointMismatchError(
                f"{path} holds a pickled {found[1]}, which is never unpickled here (unpickling "
                "can run code); save the tensors alone where the file was made "
                "(torch.save(model.state_dict(), ...)) or convert them to .safetensors"
            ) from None
        if not zipfile.is_zipfile(path):
            raise CheckpointMismatchError(
                f"{path} is not a PyTorch checkpoint (not a zip archive, nor a pickle of tensors)"
            ) from None
        lines = [line for line in str(e).splitlines() if line.strip()]
        why = lines[-1][:160] if lines else type(e).__name__
        raise CheckpointMismatchError(f"{path} is a broken PyTorch checkpoint ({why})") from None


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; bf16 has no numpy dtype
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


# A rule makes one of our leaves from one checkpoint entry: (key, fn(value, target_shape)).
Rule = tuple[str, Callable[[np.ndarray, tuple], np.ndarray]]


def _same(x, shape):
    return x


def _t(x, shape):
    return x.T


def _conv(x, shape):
    return x.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]


def _linear(torch_name: str) -> dict[str, Rule]:
    return {"kernel": (f"{torch_name}.weight", _t), "bias": (f"{torch_name}.bias", _same)}


def _norm(torch_name: str) -> dict[str, Rule]:
    return {"scale": (f"{torch_name}.weight", _same), "bias": (f"{torch_name}.bias", _same)}


def _qkv_part(i: int, bias: bool) -> Callable:
    def fn(x, shape):
        part = np.split(x, 3, axis=0)[i]
        return part if bias else part.T

    return fn


def resize_grid(x: np.ndarray, side: int) -> np.ndarray:
    """[..., n*n, C] embeddings of an n x n grid -> [..., side*side, C], bicubic."""
    n = int(round(np.sqrt(x.shape[-2])))
    if n == side:
        return x
    lead, c = x.shape[:-2], x.shape[-1]
    grid = jnp.asarray(x.reshape(-1, n, n, c), jnp.float32)
    out = jax.image.resize(grid, (grid.shape[0], side, side, c), "bicubic")
    return np.asarray(out).reshape(*lead, side * side, c)


def _block(prefix: str, block: arch_lib.BlockArch) -> dict:
    attn = {  # one fused [3C, C] qkv layer in the reference -> q, k, v
        n: {
            "kernel": (f"{prefix}.attn.qkv.weight", _qkv_part(i, False)),
            "bias": (f"{prefix}.attn.qkv.bias", _qkv_part(i, True)),
        }
        for i, n in enumerate("qkv")
    }
    attn["proj"] = _linear(f"{prefix}.attn.proj")
    if block.attn == LINEAR:
        side = lambda shape: int(round(np.sqrt(shape[0])))  # noqa: E731
        attn["scale"] = (f"{prefix}.attn.scale", lambda x, s: x.reshape(-1))
        attn["positional_encoding"] = (
            f"{prefix}.attn.positional_encoding",
            lambda x, s: resize_grid(x.reshape(-1, x.shape[-1]), side(s)),
        )
        attn["dwc"] = {
            "kernel": (f"{prefix}.attn.dwc.weight", _conv),
            "bias": (f"{prefix}.attn.dwc.bias", _same),
        }
    elif block.window:
        attn["relative_position_bias_table"] = (
            f"{prefix}.attn.relative_position_bias_table",
            _resize_bias_table,
        )
    return {
        "norm1": _norm(f"{prefix}.norm1"),
        "attn": attn,
        "norm2": _norm(f"{prefix}.norm2"),
        "mlp": {"fc1": _linear(f"{prefix}.mlp.fc1"), "fc2": _linear(f"{prefix}.mlp.fc2")},
    }


def _resize_bias_table(x, shape):
    """[(2w-1)^2, H] -> another window size, bicubic over the (2w-1) x (2w-1) offsets."""
    side = int(round(np.sqrt(shape[0])))
    return resize_grid(x.T[..., None], side)[..., 0].T if x.shape != tuple(shape) else x


def _vit_rules(arch: ViTArch) -> dict:
    def pos(x, shape):
        prefix = arch.num_prefix
        grid = resize_grid(x[:, prefix:], arch.grid)
        return np.concatenate([x[:, :prefix], grid], axis=1)

    rules = {
        "embedding": {
            "kernel": ("patch_embed.proj.weight", _conv),
            "bias": ("patch_embed.proj.bias", _same),
        },
        "cls": ("cls_token", _same),
        "pos_embedding": ("pos_embed", pos),
        "norm": _norm("norm"),
        "head": _linear("head"),
    }
    if arch.distilled:
        rules["dist_token"] = ("dist_token", _same)
        rules["head_dist"] = _linear("head_dist")
    for i, b in enumerate(arch.blocks):
        rules[f"block_{i}"] = _block(f"blocks.{i}", b)
    return rules


def _swin_rules(arch: SwinArch, state: Mapping[str, np.ndarray]) -> dict:
    # timm >= 0.9 puts patch merging at the start of stage s (layers.s.downsample) and the
    # classifier under head.fc; the original Swin code (and FLatten's) at the end of stage s-1.
    timm_style = "layers.0.downsample.reduction.weight" not in state
    rules = {
        "embedding": {
            "kernel": ("patch_embed.proj.weight", _conv),
            "bias": ("patch_embed.proj.bias", _same),
        },
        "embedding_norm": _norm("patch_embed.norm"),
        "norm": _norm("norm"),
        "head": _linear("head.fc" if timm_style else "head"),
    }
    for s in range(1, len(arch.depths)):
        prefix = f"layers.{s if timm_style else s - 1}.downsample"
        rules[f"merge_{s}"] = {
            "norm": _norm(f"{prefix}.norm"),
            "reduction": {"kernel": (f"{prefix}.reduction.weight", _t)},
        }
    i = 0
    for s, depth in enumerate(arch.depths):
        for j in range(depth):
            rules[f"block_{i}"] = _block(f"layers.{s}.blocks.{j}", arch.blocks[i])
            i += 1
    return rules


def _convert(rules: dict, state: dict[str, np.ndarray], target, name: str):
    """Our params from `state` by `rules`; a head for another number of classes starts at 0."""
    used, missing, shapes = set(), [], []

    def leaf(path, shape_struct):
        keys = [getattr(k, "key", str(k)) for k in path]
        rule = rules
        for k in keys:
            rule = rule.get(k) if isinstance(rule, dict) else None
        want = tuple(shape_struct.shape)
        if rule is None:
            missing.append("/".join(keys) + " (no rule)")
            return None
        key, fn = rule
        if key not in state:
            missing.append(key)
            return None
        used.add(key)
        if keys[0] in ("head", "head_dist"):
            if state[key].shape[0] != (want[-1] if keys[-1] == "kernel" else want[0]):
                return np.zeros(want, np.float32)  # another number of classes: a fresh head
        value = np.asarray(fn(state[key], want), np.float32)
        if value.shape != want:
            shapes.append(f"{key}: {state[key].shape} gives {value.shape}, want {want}")
            return None
        return value

    params = jax.tree_util.tree_map_with_path(leaf, target)
    unexpected = sorted(k for k in state if k not in used and not _RECOMPUTED.search(k))
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            shown = ", ".join(items[:8]) + (
                f", ... ({len(items)} in all)" if len(items) > 8 else ""
            )
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointMismatchError(f"checkpoint does not fit {name}: " + "; ".join(problems))
    return params


def import_pretrained(
    source,
    arch,
    *,
    image_size: int | None = None,
    num_classes: int | None = None,
):
    """(model, variables) from a reference checkpoint (path or state dict).

    `arch` is a published name (see `NAMES`) or an architecture description of the same layout
    (e.g. a small Swin for tests). `image_size` resizes position embeddings (ViT `pos_embed`,
    FLatten `positional_encoding`) and relative position tables bicubically; a number of classes
    other than the checkpoint's gives a fresh zero-initialised head.
    """
    state = read_state_dict(source)
    if isinstance(arch, str):
        name = arch
        head = state.get("head.fc.weight", state.get("head.weight"))
        classes = num_classes or (int(head.shape[0]) if head is not None else 1000)
        arch = named_arch(name, image_size=image_size, num_classes=classes)
    else:
        name = arch.name or type(arch).__name__
        if image_size or num_classes:
            raise ValueError("with an architecture description, set its image_size/num_classes")
    model = models.build(arch)
    target = jax.eval_shape(model.init, jax.random.key(0), models.dummy_input(arch))["params"]
    rules = _swin_rules(arch, state) if isinstance(arch, SwinArch) else _vit_rules(arch)
    params = _convert(rules, state, target, name)
    return model, {"params": params}
