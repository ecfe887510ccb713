"""Counting a model's size and work: parameters (in all, and those one image touches), FLOPs or MACs per image, and
activations; the figures of a model card and of the benchmarks' compute tables.

FLOPs are what PyTorch's `FlopCounterMode` counts: matmuls, convolutions and the attention products, a multiply-add
counting two (a MAC is two FLOPs); element-wise work is not counted. Attention runs on the math backend of
scaled_dot_product_attention while counting, so that its two products count as matmuls whatever kernel the model would
pick. Activations are counted as fvcore (timm's benchmark) counts them: the elements that convolutions and matmuls
output.

Every count runs on a copy of the model (`copy.deepcopy`), so a live model (one in training, one being published)
keeps its mode, its MoE layers' implementation, its gradients and the balance losses its MoE layers record. The
images are the caller's: on the sparse MoE path the count depends on how the images are routed (a CPU pads each
expert's block of tokens), so the same images give the same count.
"""
import copy
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .layers import ImageRouter, MlpExperts, MoE

__all__ = ['count_params', 'touched_params', 'count_flops', 'count_activations', 'model_stats']


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def touched_params(model: nn.Module) -> int:
    """Parameters one image uses. Where a model routes whole images (Mobile V-MoE: an `ImageRouter` picks k of the E
    `MlpExperts` of each MoE layer), the (E - k) experts an image does not choose are left out in each MoE layer; a
    model whose router picks per token (mLiT), or that has no experts, counts all its parameters."""
    top_k = {m.top_k for m in model.modules() if isinstance(m, ImageRouter)}
    if len(top_k) > 1:
        raise ValueError(f'{type(model).__name__} has image routers picking {sorted(top_k)} experts: touched '
                         'parameters need one k per model')
    if not top_k:
        return count_params(model)
    k, = top_k
    experts = [m for m in model.modules() if isinstance(m, MlpExperts)]
    return count_params(model) - sum(count_params(m) // m.num_experts * (m.num_experts - k) for m in experts)


def _counting_copy(model: nn.Module, train: bool, moe_impl: Optional[str]) -> nn.Module:
    """A copy of `model` in the mode counted, its MoE layers on `moe_impl` where given."""
    counted = copy.deepcopy(model).train(train)
    if moe_impl is not None:
        for m in counted.modules():
            if isinstance(m, MoE):
                m.impl = moe_impl
    return counted


def _on_device_of(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    param = next(model.parameters(), None)
    return images if param is None else images.to(param.device)


def count_flops(model: nn.Module, images: torch.Tensor, train: bool = False, moe_impl: Optional[str] = None) -> float:
    """FLOPs per image of one forward of `images` [B, C, H, W] in eval mode without autograd or, with `train`, of a
    training step's forward and backward in train mode (mLiT's noisy gating and the dropouts on).

    Args:
        moe_impl: the MoE layers' implementation while counting ('sparse': only the experts each token is routed
            to; 'dense': every expert's private matrix); None: the model's own.
    """
    counted = _counting_copy(model, train, moe_impl)
    images = _on_device_of(counted, images)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        if train:
            counted(images).float().sum().backward()
        else:
            with torch.no_grad():
                counted(images)
    return counter.get_total_flops() / images.shape[0]


class _MatmulOutputCount(TorchDispatchMode):
    """The elements output by convolutions and matrix multiplies. Linear layers reach aten as mm / addmm,
    attention's q·kᵀ and scores·v as bmm; norms, activation functions, softmax and other element-wise ops are not
    counted."""

    _OPS = (torch.ops.aten.convolution, torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm,
            torch.ops.aten.baddbmm)

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in self._OPS:
            self.count += out.numel()
        return out


def count_activations(model: nn.Module, images: torch.Tensor, moe_impl: Optional[str] = None) -> float:
    """Activations per image of one eval forward of `images` [B, C, H, W] (see the module docstring)."""
    counted = _counting_copy(model, False, moe_impl)
    images = _on_device_of(counted, images)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        with _MatmulOutputCount() as counter:
            counted(images)
    return counter.count / images.shape[0]


def model_stats(model: nn.Module, input_size: Sequence[int]) -> Dict[str, int]:
    """Parameters, MACs and activations of one eval forward of one image of `input_size` (C, H, W), the figures of a
    timm model card. The MoE layers run on their 'sparse' path: the compute of the experts each token is routed to,
    not the dense path's all-expert matmul (with a private W2, Table 9's third row, the layers have no sparse path
    and every expert's W2 counts)."""
    images = torch.rand(1, *input_size, generator=torch.Generator().manual_seed(0))
    return dict(params=count_params(model), macs=int(count_flops(model, images, moe_impl='sparse')) // 2,
                activations=int(count_activations(model, images, moe_impl='sparse')))
