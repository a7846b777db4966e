"""A run: train (dense) -> search -> fine-tune -> export -> evaluate, in one work directory.

`sequence` runs the stages in order under the work directory's lock; `context` holds what they
share; `stages` is one function per stage; `tuning` what is measured on the backend (export
padding, kernels, token groups, the latency model); `summary` what is reported. Every stage
checkpoints in its own sub-directory and resumes where it stopped; a stage that finished is not
run again.
"""

from amap_jax.pipeline.context import Context, build_arch, make_context
from amap_jax.pipeline.sequence import run
from amap_jax.pipeline.stages import dense_params, finetune, finetune_curve, search, train_dense
from amap_jax.pipeline.summary import (
    SPEED_ROUNDS,
    budget,
    budget_message,
    format_summary,
    speedup_of,
)
from amap_jax.pipeline.tuning import budget_cost
from amap_jax.train import evaluate as evaluate_lib  # noqa: F401  (tests patch its timing)

__all__ = [
    "SPEED_ROUNDS",
    "Context",
    "budget",
    "budget_cost",
    "budget_message",
    "build_arch",
    "dense_params",
    "finetune",
    "finetune_curve",
    "format_summary",
    "make_context",
    "run",
    "search",
    "speedup_of",
    "train_dense",
]
