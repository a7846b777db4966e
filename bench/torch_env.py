"""torch + timm for the parity tests and the torch side of the benchmarks.

torch and timm are optional (requirements-torch.txt; timm and Torch-Pruning are installed with
--no-deps): nothing in amap_jax imports them.
"""

from __future__ import annotations

import functools
import os
import sys


@functools.cache
def load(threads: int | None = None):
    """Imports and returns `(torch, timm)`, working around a broken torchvision once.

    timm imports torchvision, and the only torchvision wheel on the index is a CUDA build whose
    compiled ops do not load beside CPU torch, so its import fails with
    `operator torchvision::nms does not exist`. Defining the two ops it registers fake kernels
    for lets it import; timm never calls them for classification models.
    """
    import torch

    # as many threads as CPUs this process may use (XLA's pool counts them so under taskset)
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    try:
        import torchvision  # noqa: F401
    except RuntimeError:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        schema = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
        torch.library.define("torchvision::nms", schema)
        torch.library.define("torchvision::qnms", schema)
        import torchvision  # noqa: F401
    import timm

    return torch, timm
