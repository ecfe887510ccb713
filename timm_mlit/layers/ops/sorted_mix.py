""" The sparse dispatch of an MoE layer (mLiT, arXiv 2407.17783, eq. 1 and 13) as one autograd op: tokens sorted by
expert, one matmul per expert, forward and backward written out

h = (Σ_j p_j · f(x·W_{e_j} + b_{e_j})) ⊙ shared over each token's k chosen experts e_j, f = silu or identity: the
per-expert part of eq. 13 when one input matrix is private (`timm_mlit.layers.experts`), for the chosen experts only.
"""
from typing import List, Tuple

import torch
import torch.nn.functional as F

__all__ = ['SortedExpertMix', 'sort_by_expert', 'expert_grad_buffers']


def _weighted_slot_sum(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_j w[:, j] · v[:, j] for v [N, k, d], w [N, k]: k fused multiply-adds, cheaper than `bmm` or a `sum` over
    a middle dimension of size k."""
    out = v[:, 0] * w[:, :1]
    for j in range(1, v.shape[1]):
        out.addcmul_(v[:, j], w[:, j:j + 1])
    return out


def sort_by_expert(top_idx: torch.Tensor, num_experts: int) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """Group the (token, expert) pairs of top_idx [N, k] by expert: `order` maps a sorted position to its flat pair
    index token·k + slot (any order within an expert's block), `token` is each sorted pair's token, `counts` the
    pairs per expert, read back to the host (a synchronisation on CUDA)."""
    flat = top_idx.reshape(-1)
    order = flat.argsort()
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return order, order.div(top_idx.shape[1], rounding_mode='floor'), counts


def expert_grad_buffers(ctx, xs: torch.Tensor, weight: torch.Tensor):
    """Zeroed gradients of the experts' weight and bias, and an empty one for the gathered tokens `xs`, each only
    if the Function's input (x, weight, bias: positions 0, 3, 4) needs it."""
    need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    return (torch.zeros_like(weight) if need_w else None, weight.new_zeros(weight.shape[:2]) if need_b else None,
            torch.empty_like(xs) if need_x else None)


class SortedExpertMix(torch.autograd.Function):
    """h = (Σ_j p_j · f(x·W_{e_j} + b_{e_j})) ⊙ shared over each token's k chosen experts e_j (module docstring).

    (token, expert) pairs are sorted by expert so each expert runs one matmul on a contiguous block. Written as
    one Function because autograd through index_select / index_add / split / cat pays a zero-filled scatter per
    gather and a copy per block; here every gather has its inverse permutation at hand, so forward and backward
    are gathers and matmuls writing into preallocated blocks. The per-expert token counts are read back to the
    host (a synchronisation on CUDA, where 'auto' does not pick this path).
    """

    @staticmethod
    def forward(ctx, x, p, top_idx, weight, bias, shared, silu: bool):
        n, k = top_idx.shape
        t, d, _ = weight.shape
        order, token, counts = sort_by_expert(top_idx, t)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        xs = x.index_select(0, token)  # [N·k, m], grouped by expert
        z = x.new_empty(n * k, d)
        start = 0
        for i, c in enumerate(counts):
            if c:
                torch.addmm(bias[i], xs[start:start + c], weight[i].t(), out=z[start:start + c])
            start += c
        a = F.silu(z) if silu else z
        mixed = _weighted_slot_sum(a.index_select(0, inverse).view(n, k, d), p)  # Σ_j p_j f(z_j), [N, d]
        ctx.save_for_backward(xs, z, a, p, token, order, inverse, weight, shared, mixed)
        ctx.counts, ctx.silu = counts, silu
        return mixed * shared

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh):
        xs, z, a, p, token, order, inverse, weight, shared, mixed = ctx.saved_tensors
        n, k = p.shape
        d_mixed = (dh * shared).index_select(0, token)  # [N·k, d], sorted like z
        dp = (a * d_mixed).sum(-1).index_select(0, inverse).view(n, k)
        dz = d_mixed.mul_(p.reshape(-1).index_select(0, order).unsqueeze(1))
        if ctx.silu:
            dz = torch.ops.aten.silu_backward(dz, z)
        dw, db, dxs = expert_grad_buffers(ctx, xs, weight)
        start = 0
        for i, c in enumerate(ctx.counts):
            if c:
                dzi = dz[start:start + c]
                if dw is not None:
                    torch.mm(dzi.t(), xs[start:start + c], out=dw[i])
                if db is not None:
                    torch.sum(dzi, 0, out=db[i])
                if dxs is not None:
                    torch.mm(dzi, weight[i], out=dxs[start:start + c])
            start += c
        dx = None
        if dxs is not None:
            dx = xs.new_zeros(n, xs.shape[1]).index_add_(0, token, dxs)  # Σ over each token's k pairs
        return dx, dp, None, dw, db, dh * mixed, None
