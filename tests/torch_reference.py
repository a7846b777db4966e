"""PyTorch/timm reference models for parity tests (test support, not a test file).

torch and timm are test-only dependencies (requirements-torch.txt; timm is installed with
--no-deps). Tests should skip when they are missing, e.g. via ``pytest.importorskip("torch")``.
"""

import numpy as np

from bench import torch_env


def load():
    """`(torch, timm)` with 2 threads (the test machines have 2 cores)."""
    return torch_env.load(threads=2)


def timm_model(name, seed=0, **kw):
    """A timm model with seeded random weights, in eval mode (``pretrained=False``).

    timm initialises biases, LayerNorm scales/shifts and some tokens to constants (0, 1, or
    normal with std 1e-6); a port that swapped or dropped such a parameter would still match. So
    every near-constant parameter gets N(0, 0.1) noise added, making parity tests exercise all of
    them.
    """
    torch, timm = load()
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kw)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() == 1 or p.std() < 1e-3:
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def state_dict_numpy(model):
    """``model.state_dict()`` (parameters and buffers) as float32/int numpy arrays by key."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def timm_logits(model, images_nhwc):
    """fp32 eval-mode logits of ``model`` for NHWC images (our layout; torch wants NCHW)."""
    torch, _ = load()
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc, dtype=np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        return model(x.contiguous()).float().numpy()
