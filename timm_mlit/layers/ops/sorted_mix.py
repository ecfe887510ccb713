""" The sparse dispatch of an MoE layer (mLiT, arXiv 2407.17783, eq. 1 and 13) as one autograd op: tokens sorted by
expert, one matmul per expert, forward and backward written out

h = (Σ_j p_j · f(x·W_{e_j} + b_{e_j})) ⊙ shared over each token's k chosen experts e_j, f = silu or identity: the
per-expert part of eq. 13 when one input matrix is private (`timm_mlit.layers.experts`), for the chosen experts only.
"""
import itertools
from typing import List, NamedTuple, Tuple

import torch
import torch.nn.functional as F

__all__ = ['ROW_GRANULE', 'PaddedBlocks', 'SortedExpertMix', 'sort_by_expert', 'padded_size', 'pad_blocks',
           'expert_grad_buffers']

# On a CPU each expert's (or expert pair's) block of rows is padded: to a multiple of ROW_GRANULE rows, or a block
# smaller than that to a power of two. The blocks' sizes change with the routing at every step, and oneDNN, which runs
# PyTorch's bfloat16 matmuls on a CPU, builds a kernel for every new shape: on a CPU with AMX that cost ~9 ms per
# matmul of one block against ~0.35 ms for the product itself (torch.profiler), which made bfloat16 training slower
# than float32 there. Padded, the shapes recur and oneDNN's primitive cache serves them (benchmarks/cpu_paths.py).
# Pad rows are zeros in the gathered tokens and in the gradients that reach the blocks, with a zero gate, so they add
# nothing to any output or gradient; they cost their share of the matmuls. GPUs have no per-shape cost: no padding.
ROW_GRANULE = 128


def _weighted_slot_sum(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_j w[:, j] · v[:, j] for v [N, k, d], w [N, k]: k fused multiply-adds, cheaper than `bmm` or a `sum` over
    a middle dimension of size k."""
    out = v[:, 0] * w[:, :1]
    for j in range(1, v.shape[1]):
        out.addcmul_(v[:, j], w[:, j:j + 1])
    return out


def sort_by_expert(top_idx: torch.Tensor, num_experts: int) -> Tuple[torch.Tensor, List[int]]:
    """Group the (token, expert) pairs of top_idx [N, k] by expert: `order` maps a sorted position to its flat pair
    index token·k + slot (any order within an expert's block), `counts` the pairs per expert, read back to the host
    (a synchronisation on CUDA)."""
    flat = top_idx.reshape(-1)
    return flat.argsort(), torch.bincount(flat, minlength=num_experts).tolist()


class PaddedBlocks(NamedTuple):
    """The rows of `order` [S] (a permutation, grouped in blocks) laid out with each block padded (`pad_blocks`)."""
    src: torch.Tensor  # [P]: the row of `order`'s space each padded position reads (row 0 for a pad)
    inverse: torch.Tensor  # [S]: where each row of `order`'s space sits in the padded layout
    pads: torch.Tensor  # the pad positions
    blocks: List[Tuple[int, int]]  # (start, padded size) of each block


def padded_size(count: int, granule: int) -> int:
    """`count` rounded up to a multiple of `granule`, or below `granule` to a power of two (few shapes, and no more
    than twice the rows of a small block)."""
    if count >= granule:
        return -(-count // granule) * granule
    return 1 << (count - 1).bit_length() if count else 0


def pad_blocks(order: torch.Tensor, counts: List[int], granule: int = 0) -> PaddedBlocks:
    """Lay out the rows `order` [S], grouped in blocks of `counts` rows, with each block padded to
    `padded_size(count, granule)` rows (ROW_GRANULE when `granule` is 0; on a CPU only: ROW_GRANULE's comment)."""
    if order.device.type != 'cpu':
        granule = 1
    granule = granule or ROW_GRANULE
    sizes = [padded_size(c, granule) for c in counts]
    starts = list(itertools.accumulate(sizes, initial=0))
    shift = [start - done for start, done in zip(starts, itertools.accumulate(counts, initial=0))]
    pos = torch.arange(order.numel(), device=order.device) + torch.repeat_interleave(
        torch.tensor(shift[:-1], device=order.device), torch.tensor(counts, device=order.device),
        output_size=order.numel())
    src = order.new_zeros(starts[-1]).index_copy_(0, pos, order)
    inverse = torch.empty_like(order).scatter_(0, order, pos)
    pads = torch.tensor([i for start, c, size in zip(starts, counts, sizes) for i in range(start + c, start + size)],
                        dtype=torch.long, device=order.device)
    return PaddedBlocks(src, inverse, pads, list(zip(starts, sizes)))


def expert_grad_buffers(ctx, xs: torch.Tensor, weight: torch.Tensor):
    """Zeroed gradients of the experts' weight and bias, and an empty one for the gathered tokens `xs`, each only
    if the Function's input (x, weight, bias: positions 0, 3, 4) needs it."""
    need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    return (torch.zeros_like(weight) if need_w else None, weight.new_zeros(weight.shape[:2]) if need_b else None,
            torch.empty_like(xs) if need_x else None)


class SortedExpertMix(torch.autograd.Function):
    """h = (Σ_j p_j · f(x·W_{e_j} + b_{e_j})) ⊙ shared over each token's k chosen experts e_j (module docstring).

    (token, expert) pairs are sorted by expert so each expert runs one matmul on a contiguous block (padded on a
    CPU: `pad_blocks`). Written as one Function because autograd through index_select / index_add / split / cat pays
    a zero-filled scatter per gather and a copy per block; here every gather has its inverse permutation at hand, so
    forward and backward are gathers and matmuls writing into preallocated blocks. The per-expert token counts are
    read back to the host (a synchronisation on CUDA, where 'auto' does not pick this path).
    """

    @staticmethod
    def forward(ctx, x, p, top_idx, weight, bias, shared, silu: bool):
        n, k = top_idx.shape
        t, d, _ = weight.shape
        order, counts = sort_by_expert(top_idx, t)
        src, inverse, pads, blocks = pad_blocks(order, counts)  # grouped by expert, each block padded
        token = src.div(k, rounding_mode='floor')
        gate = p.new_zeros(src.numel()).index_copy_(0, inverse, p.reshape(-1))  # 0 on pad rows
        xs = x.index_select(0, token).index_fill_(0, pads, 0)  # [P, m]
        z = x.new_empty(src.numel(), d)
        for i, (start, size) in enumerate(blocks):
            if size:
                torch.addmm(bias[i], xs[start:start + size], weight[i].t(), out=z[start:start + size])
        a = F.silu(z) if silu else z
        mixed = _weighted_slot_sum(a.index_select(0, inverse).view(n, k, d), p)  # Σ_j p_j f(z_j), [N, d]
        ctx.save_for_backward(xs, z, a, gate, token, inverse, pads, weight, shared, mixed)
        ctx.blocks, ctx.silu, ctx.k = blocks, silu, k
        return mixed * shared

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh):
        xs, z, a, gate, token, inverse, pads, weight, shared, mixed = ctx.saved_tensors
        n, k = dh.shape[0], ctx.k
        d_mixed = (dh * shared).index_select(0, token).index_fill_(0, pads, 0)  # [P, d], sorted like z
        dp = (a * d_mixed).sum(-1).index_select(0, inverse).view(n, k)
        dz = d_mixed.mul_(gate.unsqueeze(1))  # zero on pad rows, so they add nothing to dw, db, dx
        if ctx.silu:
            dz = torch.ops.aten.silu_backward(dz, z)
        dw, db, dxs = expert_grad_buffers(ctx, xs, weight)
        for i, (start, size) in enumerate(ctx.blocks):
            if size:
                dzi = dz[start:start + size]
                if dw is not None:
                    torch.mm(dzi.t(), xs[start:start + size], out=dw[i])
                if db is not None:
                    torch.sum(dzi, 0, out=db[i])
                if dxs is not None:
                    torch.mm(dzi, weight[i], out=dxs[start:start + size])
        dx = None
        if dxs is not None:
            dx = xs.new_zeros(n, xs.shape[1]).index_add_(0, token, dxs)  # Σ over each token's k pairs
        return dx, dp, None, dw, db, dh * mixed, None
