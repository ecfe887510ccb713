""" Mixture-of-Experts feed-forward layer of mLiT

"How Lightweight Can a Vision Transformer Be", J. H. Tan, arXiv 2407.17783, §2.1.2.

The layer in pieces, one job each: the gate (`gate.py`: eq. 2-12 and `NoisyTopKGate`), the experts (`experts.py`:
the SwiGLU experts of eq. 13 and the ways of mixing them), the autograd ops with hand-written backwards (`ops/`),
and here the layer that picks an implementation, routes, mixes and keeps the balance loss; `stats.py` reads what the
layers of a model recorded.
"""
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._tracing import is_tracing
from .dropout import Dropout
from .experts import SwiGLUExperts
from .gate import NoisyTopKGate, Routing, moe_balance_loss
from .image_router import per_token
from .stats import AddAuxiliaryLoss, RecordsBalanceLoss

__all__ = ['MOE_IMPLS', 'MOE_ROUTINGS', 'MoE']

MOE_IMPLS = ('auto', 'loop', 'dense', 'sparse')
MOE_ROUTINGS = ('token', 'image')


def _gemm_pad(width: int, multiple: int = 16) -> int:
    """Zero rows to add to a weight so that a matmul's output width is a multiple of 16: odd widths fall off the
    fast CPU GEMM kernels (`python benchmarks/matmul_widths.py`), and GPU tensor cores want multiples of 8 or 16."""
    return -width % multiple


def _fused_linear(x: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor],
                  sizes: List[int]) -> List[torch.Tensor]:
    """x·Wᵀ + b for several (W, b) as one matmul, its width padded to a multiple of 16; the outputs split as `sizes`
    (python ints, not the weights' shapes, so that torch.fx can trace the split)."""
    pad = _gemm_pad(sum(sizes))
    if pad:
        weights = weights + [weights[0].new_zeros(pad, weights[0].shape[1])]
        biases = biases + [biases[0].new_zeros(pad)]
    parts = F.linear(x, torch.cat(weights), torch.cat(biases)).split(sizes + [pad] if pad else sizes, dim=1)
    return [parts[i] for i in range(len(sizes))]  # (indexed, not sliced: under torch.fx `parts` is a Proxy)


class MoE(RecordsBalanceLoss, nn.Module):
    """The MoE feed-forward layer of mLiT: noisy top-k gate, SwiGLU experts with shared matrices, dropout.

    Tokens [B, N, m] are flattened to [B·N, m] and routed independently. y = Σ_i G(x)_i · E_i(x) (eq. 1).
    With `routing='image'` (Mobile V-MoE's per-image routing, arXiv 2309.04354 §2.2, crossed with mLiT) the gate
    routes each image from its first token (mLiT's dummy patch, as the layer's input norm left it) and every token
    of the image follows that choice (`layers.per_token`); the balance loss then balances images.

    Implementations (`impl`), all equal to float tolerance:
      * 'loop': the gate through autograd (`NoisyTopKGate.forward_reference`) and `SwiGLUExperts.forward_loop`,
        each expert literally on its tokens. The reference.
      * 'dense': the gate's logits and the experts' input projections in one matmul, the private matrix run for
        every expert and mixed with G (`SwiGLUExperts.mix`); fixed shapes: torch.compile, export, GPUs, and CPU
        inference with few experts.
      * 'sparse': the same, with the private W or V run only for each token's chosen experts (`ops`).
      * 'auto' (default): `_auto_impl`.

    The arguments are the model's `moe_*` options without the prefix. After each training forward `last_loss`
    holds the unweighted balance loss (eq. 12) and `last_load` the load (eq. 10), read through `moe_stats`; if
    `loss_weight > 0` the loss also reaches the gradients through `AddAuxiliaryLoss`.
    """

    def __init__(
            self,
            dim: int,
            hidden_dim: int,
            num_experts: int,
            top_k: int = 2,
            expert_shared: Sequence[str] = ('v', 'w2'),
            drop_rate: float = 0.1,
            impl: str = 'auto',
            loss_coef: float = 1e-2,
            loss_weight: float = 1.0,
            noisy_gating: bool = True,
            routing: str = 'token',
    ):
        super().__init__()
        if impl not in MOE_IMPLS:
            raise ValueError(f'unknown moe_impl {impl!r}; choose one of {MOE_IMPLS}')
        if routing not in MOE_ROUTINGS:
            raise ValueError(f'unknown moe_routing {routing!r}; choose one of {MOE_ROUTINGS}')
        self.impl = impl
        self.routing = routing
        self.loss_coef = loss_coef
        self.loss_weight = loss_weight
        self.gate = NoisyTopKGate(dim, num_experts, top_k, noisy=noisy_gating)
        self.experts = SwiGLUExperts(dim, hidden_dim, num_experts, expert_shared=expert_shared)
        self.drop = Dropout(drop_rate)  # nn.Dropout with a cheaper CPU mask
        self.last_loss: Optional[torch.Tensor] = None
        self.last_load: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [B·N, m]
        impl = self.impl
        if impl == 'auto':
            impl = 'dense'
            if not torch.jit.is_scripting():
                impl = self._auto_impl(x)
        per_image = self.routing == 'image'
        if impl == 'loop':
            if per_image:
                routing = per_token(self.gate.forward_reference(x.reshape(shape)[:, 0]), shape[1])
            else:
                routing = self.gate.forward_reference(x)
            y = self.experts.forward_loop(x, routing.gates)
        else:
            sparse = impl == 'sparse'
            weights, biases, sizes = self.experts.projections(sparse)
            if per_image:
                parts = _fused_linear(x, weights, biases, sizes)
                routing = per_token(self.gate(x.reshape(shape)[:, 0]), shape[1])
            else:
                # the gate's own [m, 2t] matmul is too narrow to run fast: its logits ride along with the experts'
                gate_w = self.gate.logit_weight()
                parts = _fused_linear(x, weights + [gate_w], biases + [gate_w.new_zeros(self.gate.num_logits)],
                                      sizes + [self.gate.num_logits])
                routing = self.gate(x, parts[-1])
                parts = parts[:-1]
            y = self.experts.mix(x, parts, routing, sparse)
        y = self.drop(y).reshape(shape)
        if self.training and not torch.jit.is_scripting():
            y = self._keep_loss(y, routing)
        return y

    @torch.jit.unused
    def _keep_loss(self, y: torch.Tensor, routing: Routing) -> torch.Tensor:
        loss = moe_balance_loss(routing.importance, routing.load, self.loss_coef)
        self.last_loss = loss
        self.last_load = routing.load.detach()
        if self.loss_weight > 0 and torch.is_grad_enabled():
            y = AddAuxiliaryLoss.apply(y, loss * self.loss_weight)
        return y

    @torch.jit.unused
    def _auto_impl(self, x: torch.Tensor) -> str:
        """'sparse' on a CPU whenever gradients are computed, and in inference once a layer has 4x more experts than
        it picks; 'dense' otherwise, on other devices (the sparse path reads the tokens-per-expert counts back to the
        host) and whenever a graph is being compiled, exported or traced (fixed shapes). The choice is measured by
        benchmarks/moe_layer.py and benchmarks/models.py."""
        if is_tracing():
            return 'dense'  # (checked before touching x: under torch.fx it is a Proxy)
        if x.device.type != 'cpu':
            return 'dense'
        if torch.is_grad_enabled() or self.gate.num_experts >= 4 * self.gate.top_k:
            return 'sparse'
        return 'dense'
