""" What the MoE layers of a model record, and how their balance loss reaches the gradients

Every module that routes and keeps a balance loss (mLiT's `MoE` layer, Mobile V-MoE's `ImageRouter`) is a
`RecordsBalanceLoss`: after each training forward it holds `last_loss` (the unweighted balance loss, eq. 12 of
arXiv 2407.17783) and `last_load` (eq. 10). `moe_stats(model)` is the one reader of those records and
`named_moe_layers(model)` the one way to find the modules; `AddAuxiliaryLoss` passes a layer's loss to the gradients
without the training loop knowing of it. This module imports no layer, so that every layer can import it.
"""
from typing import TYPE_CHECKING, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

__all__ = [
    'AddAuxiliaryLoss', 'RecordsBalanceLoss', 'MoEStats', 'named_moe_layers', 'moe_stats', 'clear_moe_stats',
    'expert_shares',
]


class AddAuxiliaryLoss(torch.autograd.Function):
    """Identity on `x` whose backward also seeds d(loss)/d(loss) = 1, so `loss` is optimised alongside whatever
    loss `x` feeds, without the training loop knowing of it (DeepSeek-MoE's AddAuxiliaryLoss).

    The seed is a plain 1: it is not multiplied by anything the loop applies to its own loss. Under fp16 loss
    scaling (GradScaler, scale S) the auxiliary gradient is therefore S times too small relative to the main
    one, and the scaler's unscale divides it by S once more; under gradient accumulation over n micro-batches
    (train.py divides its loss by n) the auxiliary loss counts n times relative to the main loss. Use bf16 or
    fp32 autocast without a loss scaler (our recipes do), or compensate through `moe_loss_weight`.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor):
        ctx.loss_dtype = loss.dtype
        ctx.loss_requires_grad = loss.requires_grad
        return x

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_loss = None
        if ctx.loss_requires_grad:
            grad_loss = torch.ones((), dtype=ctx.loss_dtype, device=grad_output.device)
        return grad_output, grad_loss


class RecordsBalanceLoss:
    """Mixin of the modules whose balance loss and load `moe_stats` reads: their training forwards set `last_loss`
    and `last_load` (plain attributes, not annotated here: TorchScript would type them from the annotation)."""

    if TYPE_CHECKING:  # for type checkers only, so TorchScript never sees them
        last_loss: Optional[torch.Tensor]
        last_load: Optional[torch.Tensor]
        loss_weight: float


class MoEStats(NamedTuple):
    """What the MoE layers of a model recorded in their last training forward (`moe_stats`)."""
    loss: torch.Tensor  # Σ over the layers of the unweighted balance loss (eq. 12), a scalar that carries gradients
    load: Dict[str, torch.Tensor]  # layer name -> its load (eq. 10; token counts without noise), detached, [t]


def named_moe_layers(model: nn.Module) -> List[Tuple[str, RecordsBalanceLoss]]:
    """The modules of `model` that record an MoE balance loss and load (`MoE` layers, and the `ImageRouter` of a
    Mobile V-MoE, whose one routing serves all its MoE layers), with their module names, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, RecordsBalanceLoss)]


def moe_stats(model: nn.Module) -> Optional[MoEStats]:
    """The balance loss and each layer's load from the last training forward of `model`; None when it has no MoE
    layer or they recorded nothing (no training forward since `clear_moe_stats`, or an eval forward)."""
    records = [(name, m.last_loss, m.last_load) for name, m in named_moe_layers(model)
               if m.last_loss is not None and m.last_load is not None]  # (a training forward sets both)
    if not records:
        return None
    loss = torch.stack([loss.float() for _, loss, _ in records]).sum()
    return MoEStats(loss, {name: load for name, _, load in records})


def clear_moe_stats(model: nn.Module):
    """Forget what the MoE layers of `model` recorded, so that `moe_stats` reports only the next forward."""
    for _, m in named_moe_layers(model):
        m.last_loss = None
        m.last_load = None


def expert_shares(load: torch.Tensor) -> torch.Tensor:
    """Each expert's share of a layer's routing: its load over the layer's total (1/t each when balanced)."""
    load = load.float()
    return load / load.sum().clamp_min(1e-12)
