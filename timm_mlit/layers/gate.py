""" Noisy top-k gating of mLiT (arXiv 2407.17783, §2.1.2, eq. 2-12)

The equations as pure functions (`softmax_k` eq. 2-4, `top_k_thresholds` Ψ of eq. 6, `prob_in_top_k` eq. 5,
`cv_squared` and `moe_balance_loss` eq. 10-12), the gate module (`NoisyTopKGate`) and what it returns (`Routing`).
In training the gate runs as one autograd op with a hand-written backward (`ops.noisy_top_k`).

The balance loss: eq. 10-12 write CV for the load and a bare column sum for the importance, which is not a scalar.
The implementation the paper cites (D. Rau, sparsely-gated MoE) uses the squared coefficient of variation of both,
so `L_moe = w · (CV²(importance) + CV²(load))`, w = 1e-2.
"""
import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function

from .ops.noisy_top_k import MIN_NOISE_STD, noisy_top_k, softmax_of_sorted

__all__ = [
    'Routing', 'NoisyTopKGate', 'softmax_k', 'top_k_thresholds', 'prob_in_top_k', 'cv_squared', 'moe_balance_loss',
]


class Routing(NamedTuple):
    """Where a gate sends each of N tokens among t experts, and what the balance loss needs."""
    gates: torch.Tensor  # G(x), [N, t]: k non-zero entries per row, summing to 1 (eq. 2)
    top_idx: torch.Tensor  # the chosen experts, [N, k]
    importance: torch.Tensor  # column sums of G (eq. 11), [t]
    load: torch.Tensor  # column sums of P (eq. 5, 10) in training with noise, else tokens per expert, [t]


@register_notrace_function  # torch.fx: a leaf, its shape checks are not traced
def softmax_k(h: torch.Tensor, k: int, top: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Softmax over the k largest entries of each row, zero elsewhere (eq. 2, 4).

    `top`: (values, indices) of h.topk(k) when the caller has them already.
    """
    top_vals, top_idx = h.topk(k, dim=-1) if top is None else top
    return torch.zeros_like(h).scatter(-1, top_idx, softmax_of_sorted(top_vals))


@register_notrace_function
def top_k_thresholds(h: torch.Tensor, k: int, top_vals: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Ψ of eq. 6: per element, the threshold its clean logit had to beat to be (or stay) in the top k.

    In each row, entries within the top k (h >= k-th largest) get the (k+1)-th largest value, the others
    the k-th largest value. `top_vals`: h.topk(k + 1).values when the caller has them already.
    """
    if k >= h.shape[-1]:
        raise ValueError(f'top_k_thresholds needs k < number of experts, got k={k} with {h.shape[-1]} experts')
    if top_vals is None:
        top_vals = h.topk(k + 1, dim=-1).values
    kth, k1th = top_vals[..., k - 1:k], top_vals[..., k:k + 1]
    return torch.where(h >= kth, k1th, kth)


@register_notrace_function
def prob_in_top_k(
        clean_logits: torch.Tensor,
        noisy_logits: torch.Tensor,
        noise_std: torch.Tensor,
        k: int,
        top_vals: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """P of eq. 5: probability that each expert is in a row's top k under a fresh draw of its own noise.

    Args:
        clean_logits: x·W_g, [N, t].
        noisy_logits: H(x), [N, t].
        noise_std: softplus(x·W_noise), [N, t].
        k: experts chosen per row.
        top_vals: noisy_logits.topk(k + 1).values, if already computed.
    """
    psi = top_k_thresholds(noisy_logits, k, top_vals)
    return torch.special.ndtr((clean_logits - psi) / noise_std.clamp_min(MIN_NOISE_STD))


@register_notrace_function
def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation, var / mean², of a 1-D tensor; 0 for a single element."""
    x = x.float()
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + eps)


@register_notrace_function
def moe_balance_loss(importance: torch.Tensor, load: torch.Tensor, weight: float = 1e-2) -> torch.Tensor:
    """L_moe = w · (CV²(importance) + CV²(load)) (eq. 10-12; CV² of both, see the module docstring)."""
    return weight * (cv_squared(importance) + cv_squared(load))


class NoisyTopKGate(nn.Module):
    """Noisy top-k gating (eq. 2-3) with W_g and W_noise fused into one [m, 2t] projection (no bias, eq. 3).

    Noise is drawn in training mode only: in eval mode H(x) = x·W_g, so inference is deterministic and a
    token's routing does not depend on the rest of its batch.

    `forward(x)` computes the logits and routes them (`route`); `MoE` computes the logits in the same matmul as its
    experts' input projections and passes them in (`forward(x, logits)`). `forward_reference` is the same gate
    written as the paper's equations with autograd through them, which the 'loop' reference uses.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int = 2, noisy: bool = True):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f'top_k={top_k} is not between 1 and the number of experts ({num_experts}) of this layer')
        self.num_experts = num_experts
        self.top_k = top_k
        # Noise needs a (k+1)-th expert for the load estimate (eq. 6); with k == t every expert is always chosen.
        self.noisy = noisy and top_k < num_experts
        # rows [0, t) are W_g, rows [t, 2t) are W_noise
        self.weight = nn.Parameter(torch.empty(2 * num_experts, dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default init

    @property
    def draws_noise(self) -> bool:
        return self.training and self.noisy

    @property
    def num_logits(self) -> int:
        """How many logits `route` needs per token: 2t (W_g and W_noise) when it draws noise, else t."""
        return 2 * self.num_experts if self.draws_noise else self.num_experts

    def logit_weight(self) -> torch.Tensor:
        """The rows of `weight` that `route` needs: [W_g; W_noise] when it draws noise, else W_g."""
        return self.weight[:self.num_logits]

    def forward(self, x: torch.Tensor, logits: Optional[torch.Tensor] = None) -> Routing:
        """Route tokens x [N, m], from their `logits` x·`logit_weight()` when the caller has computed them.
        (A call of the module, not of `route`, so that torch.fx finds this file's leaf functions.)"""
        return self.route(F.linear(x, self.logit_weight()) if logits is None else logits)

    def route(self, logits: torch.Tensor) -> Routing:
        """Route tokens from their logits x·`logit_weight()`, [N, 2t] or [N, t]."""
        k = self.top_k
        if self.draws_noise and not torch.jit.is_scripting():
            return self._route_noisy(logits)
        # without noise only W_g's logits count (a scripted model in train mode routes here, without noise)
        logits = logits[:, :self.num_experts]
        top_vals, top_idx = logits.topk(k, dim=-1)
        gates = softmax_k(logits, k, (top_vals, top_idx))  # eq. 2
        return Routing(gates, top_idx, gates.sum(0), (gates > 0).sum(0).to(gates.dtype))

    @torch.jit.unused
    def _route_noisy(self, logits: torch.Tensor) -> Routing:
        gates, top_idx, importance, load = noisy_top_k(logits, self.top_k)  # (unpacked: torch.fx can unpack a leaf's
        return Routing(gates, top_idx, importance, load)                      # output, not star-expand it)

    @torch.jit.unused
    def forward_reference(self, x: torch.Tensor) -> Routing:
        """`forward` written as eq. 2-6 with autograd through the pure functions (the same noise draw)."""
        t, k = self.num_experts, self.top_k
        if not self.draws_noise:
            return self.forward(x)
        logits = F.linear(x, self.weight)  # [N, 2t]
        clean, raw_noise = logits[:, :t], logits[:, t:]
        noise_std = F.softplus(raw_noise)
        noisy = clean + torch.randn_like(clean) * noise_std  # eq. 3
        top_vals, top_idx = noisy.topk(k + 1, dim=-1)
        load = prob_in_top_k(clean, noisy, noise_std, k, top_vals).sum(0)  # eq. 5, 10
        gates = softmax_k(noisy, k, (top_vals[:, :k], top_idx[:, :k]))  # eq. 2
        return Routing(gates, top_idx[:, :k], gates.sum(0), load)
