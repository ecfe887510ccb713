""" Attention written out (softmax(q·kᵀ·scale)·v), run a few images at a time so that each block of scores stays in
the CPU's cache, with the backward written out: the fast attention for mLiT's shapes in bfloat16 on a CPU

mLiT's heads are 18 wide over 145 tokens. At these shapes PyTorch's CPU flash-attention kernel is slow in bfloat16
(forward and backward together take more than twice its float32 time), while the three plain products and the
softmax run on the CPU's bfloat16 units; done over the whole batch at once, though, the [B·G, r·N, N] score tensor
(32 MB a layer for 128 images) streams through memory several times. `ChunkedAttention` computes it in blocks of
`chunk` (image, head group) pairs, about 1 MiB of scores each (4 MiB measures alike; 256 KiB and the whole batch at
once are slower), and keeps the probabilities for the backward (2 bytes a score in bfloat16). Measured by
benchmarks/cpu_paths.py.
"""
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

__all__ = ['ChunkedAttention', 'attention_chunk', 'chunked_attention']

CHUNK_BYTES = 2 ** 20  # scores per block (about a core's L2 cache): benchmarks/cpu_paths.py


def attention_chunk(q: torch.Tensor, k: torch.Tensor) -> int:
    """How many of the leading (batch) entries of q [b, M, d] and k [b, N, d] make a block of about CHUNK_BYTES of
    scores."""
    per_entry = q.shape[1] * k.shape[1] * q.element_size()
    return max(1, CHUNK_BYTES // max(per_entry, 1))


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, probs: Optional[torch.Tensor]) -> torch.Tensor:
    """softmax(q·kᵀ)·v block by block (q already scaled), writing the probabilities into `probs` if given."""
    out = torch.empty_like(q)
    chunk = attention_chunk(q, k)
    for i in range(0, q.shape[0], chunk):
        block = slice(i, i + chunk)
        scores = torch.bmm(q[block], k[block].transpose(1, 2))
        p = scores.softmax(-1) if probs is None else torch.ops.aten._softmax.out(scores, -1, False, out=probs[block])
        torch.bmm(p, v[block], out=out[block])
    return out


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q·kᵀ·scale)·v for q [b, M, d], k and v [b, N, d] of one dtype: `ChunkedAttention` when a gradient
    is wanted, else the same blocks with nothing kept."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return ChunkedAttention.apply(q, k, v, scale)
    with torch.autocast(q.device.type, enabled=False):
        return _forward(q * scale, k, v, None)


class ChunkedAttention(torch.autograd.Function):
    """softmax(q·kᵀ·scale)·v for q [b, M, d], k and v [b, N, d] (all of one dtype), block by block over b.

    The products run in the inputs' dtype (float32 accumulation inside the GEMM); the softmax reads its bfloat16
    scores and computes in float32. Autocast is turned off inside: the inputs already carry the precision.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
        with torch.autocast(q.device.type, enabled=False):
            q = q * scale
            probs = q.new_empty(q.shape[0], q.shape[1], k.shape[1])
            out = _forward(q, k, v, probs)
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable  # (its products write into buffers: no graph of the backward)
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, probs = ctx.saved_tensors  # q scaled
        with torch.autocast(q.device.type, enabled=False):
            grad_out = grad_out.to(q.dtype).contiguous()
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            chunk = attention_chunk(q, k)
            for i in range(0, q.shape[0], chunk):
                block = slice(i, i + chunk)
                p, g = probs[block], grad_out[block]
                torch.bmm(p.transpose(1, 2), g, out=dv[block])  # dv = pᵀ·dO
                # d(scores) = p ⊙ (dP - Σ_j dP_j p_j), dP = dO·vᵀ
                ds = torch._softmax_backward_data(torch.bmm(g, v[block].transpose(1, 2)), p, -1, p.dtype)
                torch.bmm(ds, k[block], out=dq[block])
                torch.bmm(ds.transpose(1, 2), q[block], out=dk[block])
            dq.mul_(ctx.scale)
        return dq, dk, dv, None
