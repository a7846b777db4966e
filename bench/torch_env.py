"""torch + timm for the parity tests and the torch side of the benchmarks.

torch and timm are optional (requirements-torch.txt; timm and Torch-Pruning are installed with
--no-deps): nothing in amap_jax imports them.
"""

from __future__ import annotations

import functools
import os

from bench import torchvision_cpu


@functools.cache
def load(threads: int | None = None):
    """Imports and returns `(torch, timm)`; torchvision through bench/torchvision_cpu.py, which
    lets the index's CUDA build import beside CPU torch."""
    import torch

    # as many threads as CPUs this process may use (XLA's pool counts them so under taskset)
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    torchvision_cpu.import_torchvision()
    import timm

    return torch, timm
