""" nn.Dropout with a cheaper mask on a CPU (`ops.cpu_dropout`); the same module everywhere else """
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from ._tracing import is_tracing
from .ops import MaskDropout
from .ops.cpu_dropout import rounds_to_one

__all__ = ['Dropout', 'torch_dropout']


@register_notrace_module  # a leaf for timm's fx tracing, as nn.Dropout is: its training flag is read at run time
class Dropout(nn.Dropout):
    """nn.Dropout (same arguments, no state) that draws its CPU training mask from 16-bit random lanes
    (`ops.MaskDropout`: the rate rounded to a multiple of 2⁻¹⁶) instead of one Bernoulli sample per element; on
    other devices, and while a graph is compiled, exported or traced, it is nn.Dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.:
            return x
        if torch.jit.is_scripting() or self.inplace or self._rate_rounds_to_one():
            return F.dropout(x, self.p, True, self.inplace)
        return self._train(x)

    @torch.jit.unused
    def _rate_rounds_to_one(self) -> bool:
        return rounds_to_one(self.p)

    @torch.jit.unused
    def _train(self, x: torch.Tensor) -> torch.Tensor:
        if is_tracing() or x.device.type != 'cpu':  # (tracing first: under torch.fx x is a Proxy)
            return F.dropout(x, self.p, True)
        return MaskDropout.apply(x, self.p)


def torch_dropout(model: nn.Module) -> nn.Module:
    """`model` with each `Dropout` made a plain nn.Dropout of the same rate, in place: PyTorch's own masks, so that a
    seeded run draws what it drew before the cheaper mask existed (and a float32 path to measure against).
    Returns `model`."""
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, Dropout):
                setattr(module, name, nn.Dropout(child.p, child.inplace))
    return model
