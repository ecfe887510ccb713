""" The training-mode noisy top-k gate of mLiT (arXiv 2407.17783, eq. 2-6) as one autograd op

`noisy_top_k` draws the gate noise and routes; `NoisyTopKFunction` computes the same values as the composition of
eq. 2-6 (`timm_mlit.layers.gate`) in fewer passes, with a hand-written backward (tested against autograd through
the equations in float64, and by gradcheck).
"""
import math
from typing import Tuple

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function

__all__ = ['NoisyTopKFunction', 'noisy_top_k', 'softmax_of_sorted', 'MIN_NOISE_STD']

# Floor of the noise standard deviation in eq. 5's division: only guards a softplus that underflowed to 0.
MIN_NOISE_STD = 1e-6


def softmax_of_sorted(v: torch.Tensor) -> torch.Tensor:
    """softmax over the last dimension of rows sorted in descending order (as topk returns them), subtracting the
    first column for stability: three elementwise ops, cheaper than `Tensor.softmax` over k = 2 columns."""
    e = (v - v[..., :1]).exp()
    return e / e.sum(-1, keepdim=True)


class NoisyTopKFunction(torch.autograd.Function):
    """The training-mode noisy top-k gate (eq. 2-6) from its logits, with a hand-written backward.

    Autograd through eq. 2-6 records some 30 small nodes on [N, t] tensors, which in a small layer cost more than
    the experts' matmuls; this computes the same values in a few passes. With σ = softplus(raw), H = clean + ε·σ,
    p = softmax of the k largest H, u = (clean - Ψ) / σ (eq. 5-6) and dG including d(importance):

        dH[chosen j] = p_j (dG_j - Σ_l p_l dG_l)              (the softmax of eq. 4)
        q            = φ(u) · d(load) / σ                       (load = Σ_N Φ(u), eq. 5, 10)
        dΨ           = -q, added to the noisy logit Ψ was read from: the (k+1)-th largest H for entries in the top k,
                       the k-th largest for the others
        d clean      = dH + q;   dσ = dH · ε - q · u;   d raw = dσ · sigmoid(raw)
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, eps: torch.Tensor, k: int):
        t = eps.shape[1]
        clean, raw = logits[:, :t], logits[:, t:].contiguous()
        std = F.softplus(raw)
        noisy = torch.addcmul(clean, eps, std)  # eq. 3
        vals, idx = noisy.topk(k + 1, dim=-1)  # one top-(k+1) serves the gate (first k) and Ψ (eq. 6)
        top_idx = idx[:, :k].contiguous()
        p = softmax_of_sorted(vals[:, :k])  # eq. 4
        gates = torch.zeros_like(noisy).scatter_(1, top_idx, p)
        kth, k1th = vals[:, k - 1:k], vals[:, k:k + 1]
        in_top = noisy >= kth
        std_c = std.clamp_min(MIN_NOISE_STD)
        u = (clean - torch.where(in_top, k1th, kth)).div_(std_c)
        load = torch.special.ndtr(u).sum(0)
        ctx.save_for_backward(raw, std, eps, idx, p, in_top, u)
        ctx.k = k
        ctx.mark_non_differentiable(top_idx)
        ctx.set_materialize_grads(False)
        return gates, top_idx, gates.sum(0), load

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_gates, _d_idx, d_importance, d_load):
        raw, std, eps, idx, p, in_top, u = ctx.saved_tensors
        k = ctx.k
        n, t = eps.shape
        top_idx = idx[:, :k]
        dg = d_gates
        if d_importance is not None:
            dg = d_importance.expand(n, t) if dg is None else dg + d_importance
        d_noisy = torch.zeros_like(eps)
        if dg is not None:
            dp = dg.gather(1, top_idx)
            d_noisy.scatter_(1, top_idx, p * (dp - (p * dp).sum(-1, keepdim=True)))
        if d_load is not None:
            std_c = std.clamp_min(MIN_NOISE_STD)
            q = u.square().mul_(-0.5).exp_().mul_(d_load * (1 / math.sqrt(2 * math.pi))).div_(std_c)
            s_top = (q * in_top).sum(-1, keepdim=True)
            s_all = q.sum(-1, keepdim=True)
            d_noisy.scatter_add_(1, idx[:, k - 1:k + 1], torch.cat([s_top - s_all, -s_top], 1))  # dΨ = -q
            d_clean = d_noisy + q
            d_std = (q * u).neg_().masked_fill_(std < MIN_NOISE_STD, 0.)  # the clamp passes nothing below it
            d_std.addcmul_(d_noisy, eps)
        else:
            d_clean, d_std = d_noisy, d_noisy * eps
        # (a new tensor, not out= into column slices: torch.compile cannot trace out= into strided tensors)
        return torch.cat([d_clean, d_std.mul_(torch.sigmoid(raw))], 1), None, None  # softplus' derivative


@register_notrace_function  # torch.fx: a leaf (an autograd Function and a random draw); fx skips _-names
def noisy_top_k(logits: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training-mode gate from logits [N, 2t] = x·[W_g; W_noise]: draws the noise ε and returns
    (G [N, t], chosen experts [N, k], importance [t], load [t]) as `NoisyTopKGate.route`."""
    eps = torch.randn(logits.shape[0], logits.shape[1] // 2, dtype=logits.dtype, device=logits.device)
    return NoisyTopKFunction.apply(logits, eps, k)
