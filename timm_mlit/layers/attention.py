""" Grouped-query attention (Ainslie et al., arXiv 2305.13245), as used by mLiT (arXiv 2407.17783, §2.1.1)

H query heads share G key/value heads (head h reads key/value head h // (H / G)), with biases on all four
projections (the paper's encoder layers have biases on every linear layer). The r = H / G query heads of a group are
stacked along the sequence axis, so each group is one plain attention over its own K/V head: no K/V copies and no
GQA-specific kernel, one `scaled_dot_product_attention` call per group. In bfloat16 on a CPU the attention itself is
`ops.chunked_attention` (written out, a few images at a time, backward by hand), which measures faster there.

Not timm's `AttentionRope(num_kv_heads=...)`: that option only exists in recent timm releases, and it keeps
separate q/k/v projections. Here q, k and v come from one fused projection (one matmul instead of three, which
matters at these tiny widths), and the module works with every timm version we support.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import use_fused_attn

from ._tracing import is_tracing
from .ops import chunked_attention

__all__ = ['GroupedQueryAttention']


class GroupedQueryAttention(nn.Module):
    fused_attn: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            num_kv_heads: int = 4,
            qkv_bias: bool = True,
            proj_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f'dim ({dim}) must be divisible by num_heads ({num_heads})')
        if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(f'num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})')
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()
        kv_dim = self.head_dim * num_kv_heads
        self.qkv = nn.Linear(dim, dim + 2 * kv_dim, bias=qkv_bias)  # [q | k | v]
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        G, r, hd = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        qkv = self.qkv(x).split([C, G * hd, G * hd], dim=-1)
        # Grouped queries: the r query heads of a group are stacked along the sequence axis, so each group is one
        # ordinary attention over its own K/V head - no K/V copies (repeat_interleave) and no GQA kernel needed.
        # Query head h reads K/V head h // r, as in the GQA paper.
        q = qkv[0].reshape(B, N, G, r, hd).permute(0, 2, 3, 1, 4).reshape(B, G, r * N, hd)  # [B, G, r·N, hd]
        k = qkv[1].reshape(B, N, G, hd).transpose(1, 2)  # [B, G, N, hd]
        v = qkv[2].reshape(B, N, G, hd).transpose(1, 2)  # [B, G, N, hd]

        if self.fused_attn:
            if not torch.jit.is_scripting() and self._cpu_bf16(q):
                x = chunked_attention(q.reshape(B * G, r * N, hd), k.reshape(B * G, N, hd), v.reshape(B * G, N, hd),
                                      self.scale).reshape(B, G, r * N, hd)
            else:
                x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # [B, G, r·N, N]
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.reshape(B, G, r, N, hd).permute(0, 3, 1, 2, 4).reshape(B, N, C)  # heads back in order h = g·r + i
        return self.proj_drop(self.proj(x))

    @torch.jit.unused
    def _cpu_bf16(self, q: torch.Tensor) -> bool:
        """bfloat16 on a CPU, no attention dropout, eager: `ops.chunked_attention` instead of PyTorch's CPU flash
        kernel, which takes more than twice its float32 time in bfloat16 at these shapes (benchmarks/cpu_paths.py)."""
        return not is_tracing() and q.device.type == 'cpu' and q.dtype == torch.bfloat16 \
            and not (self.training and self.attn_drop.p > 0.)
