"""The interface every pruning method implements.

A method is one hashable object that the model asks for its site multipliers (`declare`, the
`models.Sites` protocol) and that the pipeline asks for everything else: its collections and how
each is optimised, their initialisation, its loss terms, its hooks, and how it fixes the final
multipliers for a target. Export and MACs counting are generic over sites
(`pruning.export`, `pruning.macs`): a method only says what it multiplies where. A target is a
ratio of the method's `cost` (`pruning.cost`: MACs, or a latency model), which a method charges
without naming its kind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from amap_jax.models.arch import Arch
from amap_jax.pruning import cost as cost_lib
from amap_jax.pruning import export as export_lib
from amap_jax.pruning import macs


class CalibrationBatch(NamedTuple):
    """Training examples a method may look at outside the training loop (an initialisation,
    a final choice): images as the model takes them, and their labels (for gradient-based
    scores). Which examples depends on the run's seed."""

    images: jax.Array
    labels: jax.Array


Calibration = Callable[[int], CalibrationBatch]  # n -> n examples


class SettingError(ValueError):
    """A method setting that cannot work (one line)."""


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: the one place a method is added. Its `name` becomes a value of
    `config.method`, its settings (the dataclass fields) the config section `cls.section`,
    checked on construction and recorded with every stage and summary."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"two methods are called {cls.name!r}")
    REGISTRY[cls.name] = cls
    return cls


@dataclasses.dataclass(frozen=True)
class Method:
    """Base class; subclasses are frozen dataclasses of their settings, checked on construction
    (`SettingError`, one line)."""

    name: ClassVar[str]
    section: ClassVar[str]  # the config section holding the settings (the dataclass fields)
    trainable: ClassVar[tuple[str, ...]] = ()  # collections trained beside `params`
    # Whether `method_widths_from=RUN` may give it the per-layer widths of another run's export.
    takes_widths: ClassVar[bool] = False
    target: float = dataclasses.field(default=1.0, metadata={"setting": False})  # search.target
    # What the target is a ratio of (search.budget_kind): set by the run once it is measured.
    cost: cost_lib.Cost = dataclasses.field(default=cost_lib.MACS, metadata={"setting": False})
    # Whether the method can charge a latency (token pruning is per image: no latency model).
    takes_latency: ClassVar[bool] = True

    # -- configuration ---------------------------------------------------------------------

    @classmethod
    def settings(cls) -> dict[str, Any]:
        """The config section's keys and their defaults."""
        return {
            f.name: f.default for f in dataclasses.fields(cls) if f.metadata.get("setting", True)
        }

    @classmethod
    def sections(cls) -> tuple[str, ...]:
        """Every config section this method reads."""
        return (cls.section,)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> Method:
        return cls(target=config.search.target, **dict(config[cls.section]))

    def check(self, arch: Arch) -> None:
        """Raises `SettingError` before any training when the target cannot be reached."""

    # -- model side ------------------------------------------------------------------------

    def declare(self, block: nn.Module, shapes: dict[str, tuple[int, int]]) -> dict[str, Any]:
        """Declares this method's variables in a block; returns its multipliers per site."""
        raise NotImplementedError

    def block_multipliers(self, variables: dict[str, Any]) -> dict[str, jax.Array]:
        """{site: [heads, width]} from one block's variables ({collection: {name: value}})."""
        raise NotImplementedError

    # -- search ----------------------------------------------------------------------------

    def initialize(self, arch: Arch, params, *, calibration: Calibration, seed: int) -> dict:
        """Every collection of the searchable model, starting from dense `params`."""
        raise NotImplementedError

    def optimizers(
        self, total_steps: int = 0, arch: Arch | None = None
    ) -> dict[str, optax.GradientTransformation]:
        """One optimizer per collection in `trainable` (`params` is the stage's), for a search
        of `total_steps` on `arch`."""
        return {}

    def loss(self, arch: Arch, total_steps: int = 0) -> Callable | None:
        """`(trainable, reports, batch_mean, step) -> (loss, metrics)` added to the
        classification loss in a search of `total_steps`; `reports` is what the forward pass
        reported (`models.tokens.REPORTS`), `batch_mean(x)` the mean of per-image values over
        the whole (global) batch, whatever the devices it is split over, and `step` the
        search's step (a traced integer)."""
        return None

    def hooks(self, arch: Arch, calibration: Calibration | None = None) -> tuple:
        """`train.loop.Hook`s run during the search (e.g. refreshing statistics)."""
        return ()

    def progress(self, arch: Arch, variables) -> dict[str, float]:
        """What to log after each search epoch."""
        out = {"hard_macs_ratio": self.macs_ratio(arch, variables)}
        if self.cost.kind != "macs":
            out[f"hard_{self.cost.kind}_ratio"] = self.cost_ratio(arch, variables)
        return out

    def search_ratio(self, arch: Arch, variables, calibration: Calibration | None = None):
        """The cost ratio the search's own result would export at (padding included; tokens:
        the mean over the calibration batch), to report against the final one (`budget`);
        None where the widths come from a rule applied after the search, not from it."""
        return self.cost_ratio(arch, variables)

    def report(self, arch: Arch, variables) -> dict:
        """What the summary records of the search's own result (before `finalize`)."""
        return {}

    def recalibrate(self, arch: Arch, p_arch: Arch, params, calibration: Calibration):
        """The fine-tuned export's parameters, adjusted where fine-tuning moved what decides
        the budget (AS-ViT: its thresholds, whose kept tokens drift with the scores)."""
        return params

    def finalize(self, arch: Arch, variables: dict, calibration: Calibration | None = None) -> dict:
        """Variables whose multipliers are final: what export slices (`calibration`: training
        images, for a method whose final choice depends on data)."""
        return variables

    # -- generic over methods --------------------------------------------------------------

    def multipliers(self, arch: Arch, variables) -> list[dict[str, np.ndarray]]:
        """Per block, the multiplier of every site this method uses (host arrays)."""
        out = []
        for i in range(len(arch.blocks)):
            name = f"block_{i}"
            block_vars = {c: tree[name] for c, tree in variables.items() if name in tree}
            out.append(jax.tree.map(np.asarray, self.block_multipliers(block_vars)))
        return out

    def export(self, arch: Arch, variables) -> tuple[Arch, dict]:
        """The smaller dense model: same logits as the masked one."""
        return export_lib.export(arch, variables["params"], self.multipliers(arch, variables))

    def pruned_arch(self, arch: Arch, variables) -> Arch:
        return export_lib.pruned_arch(arch, self.multipliers(arch, variables))

    def macs_ratio(self, arch: Arch, variables) -> float:
        """MACs of the model export would produce now (padding included) / dense MACs."""
        return macs.ratio(arch, self.pruned_arch(arch, variables))

    def cost_ratio(self, arch: Arch, variables) -> float:
        """The same in the budget's currency (`cost`)."""
        return self.cost.of(arch, self.pruned_arch(arch, variables))


def check(cond: bool, message: str) -> None:
    if not cond:
        raise SettingError(message)
