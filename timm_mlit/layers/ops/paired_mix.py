""" The sparse dispatch of an MoE layer for top-2 routing among few experts (mLiT, arXiv 2407.17783, eq. 1 and 13):
tokens grouped by their pair of experts, one matmul per pair, forward and backward written out
"""
import torch
import torch.nn.functional as F

from .sorted_mix import expert_grad_buffers, pad_blocks

__all__ = ['PairedExpertMix']


class PairedExpertMix(torch.autograd.Function):
    """`SortedExpertMix` for top-2 routing, grouping tokens by their pair of experts instead of (token, expert) pairs
    by expert: each token is gathered once (not k = 2 times), one matmul per pair {i, j} computes both of its
    experts' projections side by side (each pair's block padded on a CPU, as `sorted_mix.pad_blocks` does), and the
    two slots are mixed within the row, so there is no second gather to bring a token's two results together and the
    input gradient is a permutation back, not a scatter-add. The pairs grow as t² and their blocks shrink, so the
    experts use it for few experts only (`experts.MAX_EXPERTS_FOR_PAIRS`, measured at the model level by
    benchmarks/moe_paths.py).
    """

    @staticmethod
    def forward(ctx, x, p, top_idx, weight, bias, shared, silu: bool):
        t, d, _ = weight.shape
        swap = top_idx[:, 0] > top_idx[:, 1]  # order each token's pair as (lower, higher) expert index
        lo = torch.where(swap, top_idx[:, 1], top_idx[:, 0])
        hi = torch.where(swap, top_idx[:, 0], top_idx[:, 1])
        pair = lo * t + hi
        order = pair.argsort()
        counts = torch.bincount(pair, minlength=t * t).tolist()
        src, inverse, pads, layout = pad_blocks(order, counts)  # grouped by pair, each block padded on a CPU
        xs = x.index_select(0, src).index_fill_(0, pads, 0)  # [P, m]
        ps = torch.where(swap.unsqueeze(1), p.flip(1), p)  # gates as (lower, higher)
        ps = p.new_zeros(src.numel(), 2).index_copy_(0, inverse, ps)  # 0 on pad rows
        z = x.new_empty(src.numel(), 2 * d)
        blocks = []
        for key, (start, size) in enumerate(layout):
            if size:
                i, j = key // t, key % t
                w_ij = torch.cat([weight[i], weight[j]])  # [2d, m], kept for the backward
                torch.addmm(torch.cat([bias[i], bias[j]]), xs[start:start + size], w_ij.t(),
                            out=z[start:start + size])
                blocks.append((i, j, start, size, w_ij))
        a = F.silu(z) if silu else z
        mixed = (a[:, :d] * ps[:, :1]).addcmul_(a[:, d:], ps[:, 1:]).index_select(0, inverse)  # Σ_j p_j f(z_j)
        ctx.save_for_backward(xs, z, a, ps, swap, src, inverse, pads, weight, shared, mixed)
        ctx.blocks, ctx.silu = blocks, silu
        return mixed * shared

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh):
        xs, z, a, ps, swap, src, inverse, pads, weight, shared, mixed = ctx.saved_tensors
        d = weight.shape[1]
        d_mixed = (dh * shared).index_select(0, src).index_fill_(0, pads, 0)  # [P, d], sorted like z
        dps = torch.stack([(a[:, :d] * d_mixed).sum(-1), (a[:, d:] * d_mixed).sum(-1)], 1).index_select(0, inverse)
        dp = torch.where(swap.unsqueeze(1), dps.flip(1), dps)
        dz = torch.cat([d_mixed * ps[:, :1], d_mixed * ps[:, 1:]], 1)  # zero on pad rows: they add nothing
        if ctx.silu:
            dz = torch.ops.aten.silu_backward(dz, z)
        dw, db, dxs = expert_grad_buffers(ctx, xs, weight)
        for i, j, start, c, w_ij in ctx.blocks:
            dzb = dz[start:start + c]
            if dw is not None:
                g = dzb.t() @ xs[start:start + c]  # [2d, m]: both experts' weight gradients
                dw[i] += g[:d]
                dw[j] += g[d:]
            if db is not None:
                g = dzb.sum(0)
                db[i] += g[:d]
                db[j] += g[d:]
            if dxs is not None:
                torch.mm(dzb, w_ij, out=dxs[start:start + c])
        dx = dxs.index_select(0, inverse) if dxs is not None else None
        return dx, dp, None, dw, db, dh * mixed, None
