""" Dropout whose mask costs less than nn.Dropout's on a CPU

PyTorch's CPU dropout draws one Bernoulli sample per element (`bernoulli_`), a visible share of an mLiT training
step in `torch.profiler` for the MoE layers' output dropout (18,560 × 108 floats a layer at batch 128). Here the mask
comes from
64-bit random words cut into four 16-bit lanes, an element kept when its lane is at least p·2¹⁶ above the lowest:
the dropout rate is p rounded to a multiple of 2⁻¹⁶ (0.1 → 0.1000061), and the kept elements are scaled by the
reciprocal of that exact keep rate, so the expectation is unchanged. The mask is kept as bytes for the backward.
Forward and backward against nn.Dropout's: benchmarks/cpu_paths.py.
"""
import torch
from torch.autograd.function import once_differentiable

__all__ = ['MaskDropout', 'keep_mask']

_LANES = 2 ** 16


def keep_mask(shape, p: float, device=None) -> torch.Tensor:
    """A bool mask of `shape`, each element True with probability 1 - round(p·2¹⁶)/2¹⁶, from the default
    generator of `device` (so `torch.manual_seed` makes it repeatable)."""
    n = 1
    for s in shape:
        n *= s
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, 2 ** 63 - 1)
    return words.view(torch.int16)[:n].view(shape) >= round(p * _LANES) - _LANES // 2


def keep_scale(p: float) -> float:
    """1 / (the exact keep rate of `keep_mask`)."""
    return _LANES / (_LANES - round(p * _LANES))


def rounds_to_one(p: float) -> bool:
    """Whether p rounds to a dropout rate of 1 on the 2⁻¹⁶ grid (nothing kept: `keep_scale` has no value)."""
    return round(p * _LANES) >= _LANES


class MaskDropout(torch.autograd.Function):
    """y = x ⊙ mask / keep-rate, mask from `keep_mask`; the gradient goes through the same mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float):
        keep = keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = keep_scale(p)
        return (x * ctx.scale).mul_(keep)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        keep, = ctx.saved_tensors
        return (grad * ctx.scale).mul_(keep), None
