""" Mobile V-MoE's experts: E ordinary ViT MLPs with their own weights, mixed per image

"Mobile V-MoEs", Daxberger et al., arXiv 2309.04354, §2.1: each expert e_i: R^D -> R^D is the MLP of a ViT layer
(fc1, GELU, fc2); everything else in the layer is shared. y = Σ_i g(x)_i e_i(x) over the k experts an image's router
chose (`ImageRouter`), for every token of that image.

Two ways of mixing, equal to float tolerance:
  * `forward` (images grouped by expert): each expert runs once, on all the tokens of the images that chose it, so
    an image's tokens touch only its k experts' weights, and an unchosen expert gets no gradient from it.
  * `forward_dense`: every expert on every token, mixed with the (mostly zero) gates: fixed shapes, no host sync,
    for torch.fx, TorchScript, ONNX export, torch.compile and meta tensors, where data-dependent shapes do not
    trace. The same outputs at E times the MLP compute: a compiled or exported model does not skip unchosen experts.
"""
from typing import Optional, Type

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from ._tracing import is_tracing
from .experts import ExpertLinear
from .gate import Routing

__all__ = ['MlpExperts']


class MlpExperts(nn.Module):
    """E MLPs fc2(drop(act(fc1(x)))) held stacked (`fc1.weight` [E, hidden, D], `fc2.weight` [E, D, hidden]).

    Takes timm's `Mlp` arguments, so that it can stand in a timm `Block` as its `mlp_layer`; the weights start as
    timm's ViT starts its MLPs (truncated normal, std 0.02; zero biases), independently per expert.
    """

    def __init__(
            self,
            in_features: int,
            hidden_features: Optional[int] = None,
            out_features: Optional[int] = None,
            num_experts: int = 10,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Optional[Type[nn.Module]] = None,
            bias: bool = True,
            drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if norm_layer is not None or not bias:
            raise ValueError('MlpExperts has no norm between its layers and always has biases '
                             '(scale_mlp_norm=False, proj_bias=True)')
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.num_experts = num_experts
        self.fc1 = ExpertLinear(num_experts, in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = ExpertLinear(num_experts, hidden_features, out_features)
        self.drop2 = nn.Dropout(drop)
        for layer in (self.fc1, self.fc2):
            trunc_normal_(layer.weight, std=.02)
            nn.init.zeros_(layer.bias)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def forward_expert(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """e_i(x) for tokens x [..., D]."""
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x, i))), i))

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Σ_i g_i e_i(x) for x [B, N, D] and an image-level `routing` (gates [B, E], top_idx [B, k])."""
        if torch.jit.is_scripting():
            return self.forward_dense(x, routing)
        else:
            return self._forward_grouped(x, routing)

    @torch.jit.unused
    def _forward_grouped(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        if is_tracing() or x.device.type == 'meta':  # (meta tensors: shapes only, no counts to group by)
            return self.forward_dense(x, routing)
        B, k = routing.top_idx.shape
        experts = routing.top_idx.reshape(-1)  # [B·k], image-major
        images = torch.arange(B, device=x.device).repeat_interleave(k)
        weights = routing.gates.gather(1, routing.top_idx).reshape(-1).to(x.dtype)
        order = experts.argsort(stable=True)
        counts = torch.bincount(experts, minlength=self.num_experts).tolist()  # (one host sync per layer)
        y = torch.zeros_like(x)
        for i, (idx, w) in enumerate(zip(images[order].split(counts), weights[order].split(counts))):
            if idx.numel():
                out = self.forward_expert(x[idx], i)  # [n_i, N, D]: every token of the images that chose e_i
                y = y.index_add(0, idx, out * w[:, None, None])
        return y

    def forward_dense(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Every expert on every token, mixed with the gates (zero for the experts an image did not choose)."""
        h = self.drop1(self.act(self.fc1(x.reshape(-1, x.shape[-1]))))  # [B·N, E, hidden]
        out = torch.einsum('teh,edh->ted', h, self.fc2.weight) + self.fc2.bias  # [B·N, E, D]
        out = self.drop2(out).reshape(x.shape[0], x.shape[1], self.num_experts, -1)
        return torch.einsum('bned,be->bnd', out, routing.gates.to(out.dtype))
