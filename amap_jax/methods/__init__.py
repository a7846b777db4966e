"""Pruning methods behind one interface (`base.Method`): pick one by name.

| method      | sites                         | decides by                                        |
|-------------|-------------------------------|---------------------------------------------------|
| `amap`      | qk, v, hidden                 | indicators x similarity, head-balanced, MACs loss |
| `vtp`       | attn_in, v, mlp_in, hidden    | L1-sparse soft scores, one global threshold       |
| `magnitude` | qk, v, hidden (+ copied ones) | L1 norm of the weights touching a channel         |
| `random`    | qk, v, hidden (+ copied ones) | chance                                            |
| `asvit`     | tokens, per image             | class-attention scores vs learnt thresholds       |
| `amap+asvit`| AMAP's and the tokens         | both, under one MACs budget                       |

Each method's settings are a config section of its own (`amap`, `vtp`, `floor`), checked when the
method is built.
"""

from __future__ import annotations

from amap_jax.methods.amap import Amap
from amap_jax.methods.asvit import AsVit
from amap_jax.methods.base import Method, SettingError
from amap_jax.methods.compose import AmapAsVit
from amap_jax.methods.floors import Floor, Magnitude, Random
from amap_jax.methods.vtp import Vtp

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (Amap, Vtp, Magnitude, Random, AsVit, AmapAsVit)
}
SECTIONS: dict[str, type[Method]] = {
    "amap": Amap,
    "vtp": Vtp,
    "floor": Floor,
    "asvit": AsVit,
    "compose": AmapAsVit,
}

__all__ = [
    "METHODS",
    "SECTIONS",
    "Amap",
    "AsVit",
    "Method",
    "SettingError",
    "Vtp",
    "from_config",
    "get",
]


def get(name: str) -> type[Method]:
    if name not in METHODS:
        raise SettingError(f"method must be one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]


def from_config(config) -> Method:
    """The method `config.method` names, with the settings of its section."""
    return get(config.method).from_config(config)


def default_sections() -> dict[str, dict]:
    return {name: cls.settings() for name, cls in SECTIONS.items()}
