"""PyTorch reference forwards of the official networks, written from the upstream facts, used only
to prove the converters and ports exact. Module attribute names reproduce the official state_dict
keys."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomize_norms_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Move every BatchNorm/InstanceNorm affine parameter and running statistic off its default,
    so that a converter which drops, swaps or defaults one of them cannot pass a parity test."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            c = m.num_features
            m.weight.copy_(1 + 0.3 * torch.randn(c, generator=generator))
            m.bias.copy_(0.2 * torch.randn(c, generator=generator))
            if m.track_running_stats:
                m.running_mean.copy_(0.2 * torch.randn(c, generator=generator))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=generator))
                m.num_batches_tracked.fill_(1000)
    return module


def nchw_to_nhwc(t: torch.Tensor):
    """A torch NCHW tensor as a numpy NHWC array."""
    return t.detach().permute(0, 2, 3, 1).numpy()


def assert_matches(got, want: torch.Tensor, what: str) -> float:
    """Asserts max|Flax NHWC output - torch NCHW output| <= 1e-4 * max(1, max|torch|).

    Returns the max abs error. 1-D inputs are compared as they are.
    """
    import numpy as np

    want_np = nchw_to_nhwc(want) if want.ndim == 4 else want.detach().numpy()
    got_np = np.asarray(got, dtype=np.float32)
    assert got_np.shape == want_np.shape, f"{what}: shape {got_np.shape} vs torch {want_np.shape}"
    err = float(np.max(np.abs(got_np - want_np)))
    bound = 1e-4 * max(1.0, float(np.max(np.abs(want_np))))
    print(f"{what}: max abs error {err:.3g} (bound {bound:.3g})")
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"
    return err
