""" The SwiGLU experts of an mLiT MoE layer (arXiv 2407.17783, eq. 13, Table 9), and the ways of mixing them

E_i(x) = (silu(x·W_i + b_W) ⊙ (x·V_i + b_V))·W2_i + b_W2 with two of W, V, W2 shared by all experts of the layer
(mLiT shares V and W2). Since only one matrix differs between experts, the mix Σ_i G_i E_i(x) of eq. 1 needs the
shared ones once per token:

    private W:   ((Σ_i G_i silu(x·W_i + b_i)) ⊙ (x·V + b_V))·W2 + b_W2
    private V:   (silu(x·W + b_W) ⊙ Σ_i G_i (x·V_i + b_i))·W2 + b_W2
    private W2:  Σ_i G_i (h·W2_i + b_i),  h = silu(x·W + b_W) ⊙ (x·V + b_V)

Three ways of mixing, all equal to float tolerance: `forward_loop` runs E_i literally on each expert's tokens (the
reference); `mix` with `sparse=False` runs the private matrix for every expert in one matmul (no data-dependent
shapes: torch.compile, export, small t), with `sparse=True` for each token's k chosen experts only (`ops`: tokens
grouped by expert pair for top-2 among few experts, else sorted by expert). With a private W2 `mix` always runs
the first form.
"""
import math
from typing import List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gate import Routing
from .ops import PairedExpertMix, SortedExpertMix

__all__ = ['EXPERT_SHARING', 'MAX_EXPERTS_FOR_PAIRS', 'ExpertLinear', 'SwiGLUExperts']

# Which two of the three SwiGLU matrices (W, V, W2 of eq. 13) all experts of a layer share (paper Table 9).
EXPERT_SHARING = (('v', 'w2'), ('v', 'w'), ('w', 'w2'))

# The sparse mix groups tokens by expert pair (top-2) up to this many experts: benchmarks/moe_paths.py.
MAX_EXPERTS_FOR_PAIRS = 5


class ExpertLinear(nn.Module):
    """t independent linear layers held stacked, `weight` [t, out, in] and `bias` [t, out] (nn.Linear's layout
    and default init), so one matmul can run all of them."""

    def __init__(self, num_experts: int, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features))
        bound = 1. / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, i: Optional[int] = None) -> torch.Tensor:
        """Expert `i` on x [N, in] -> [N, out], or every expert -> [N, t, out] when i is None."""
        if i is None:
            out = F.linear(x, self.weight.reshape(-1, self.in_features), self.bias.reshape(-1))
            return out.reshape(x.shape[0], -1, self.out_features)
        return F.linear(x, self.weight[i], self.bias[i])



class SwiGLUExperts(nn.Module):
    """t SwiGLU experts (eq. 13) with two of W, V, W2 shared (module docstring).

    `w`, `v` and `w2` are each an `nn.Linear` when shared by all experts of the layer, or an `ExpertLinear` (one per
    expert, stacked) for the one named by `private`.
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, expert_shared: Sequence[str] = ('v', 'w2')):
        super().__init__()
        expert_shared = tuple(expert_shared)
        if sorted(expert_shared) not in [sorted(s) for s in EXPERT_SHARING]:
            raise ValueError(
                f'expert_shared must name two of w, v, w2 as one of {EXPERT_SHARING}, got {expert_shared}')
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.num_experts = num_experts
        self.private = ({'w', 'v', 'w2'} - set(expert_shared)).pop()  # the matrix each expert has its own copy of

        def make(name: str, in_f: int, out_f: int) -> Union[ExpertLinear, nn.Linear]:
            return ExpertLinear(num_experts, in_f, out_f) if name == self.private else nn.Linear(in_f, out_f)
        self.w = make('w', dim, hidden_dim)
        self.v = make('v', dim, hidden_dim)
        self.w2 = make('w2', hidden_dim, dim)

    def forward_expert(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """E_i(x) computed literally, as eq. 13 writes it."""
        xw = self.w(x, i) if self.private == 'w' else self.w(x)
        xv = self.v(x, i) if self.private == 'v' else self.v(x)
        h = F.silu(xw) * xv
        return self.w2(h, i) if self.private == 'w2' else self.w2(h)

    @torch.jit.unused
    def forward_loop(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Σ_i G_i E_i(x) (eq. 1): per expert, gather its tokens, run E_i literally, scatter-add. The reference."""
        y = torch.zeros_like(x)
        for i in range(self.num_experts):
            token_idx = gates[:, i].nonzero().squeeze(-1)
            out = self.forward_expert(x[token_idx], i)
            y = y.index_add(0, token_idx, (out * gates[token_idx, i, None]).to(y.dtype))  # (dtype: autocast)
        return y

    def _input_side(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(private weight, private bias, shared weight, shared bias) of the input side, when W or V is private."""
        if self.private == 'w':
            return self.w.weight, self.w.bias, self.v.weight, self.v.bias
        return self.v.weight, self.v.bias, self.w.weight, self.w.bias

    def projections(self, sparse: bool) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[int]]:
        """Weights, biases and output sizes of the input-side matmuls `mix` reads, for the caller to run on every
        token in one matmul: the private W or V of every expert (unless `sparse`) and the shared one; with a
        private W2, W and V."""
        d = self.hidden_dim
        if self.private == 'w2':
            return [self.w.weight, self.v.weight], [self.w.bias, self.v.bias], [d, d]
        private_w, private_b, shared_w, shared_b = self._input_side()
        if sparse:  # the private matrix runs per expert on its tokens (`ops`)
            return [shared_w], [shared_b], [d]
        return [private_w.reshape(-1, self.dim), shared_w], [private_b.reshape(-1), shared_b], [self.num_experts * d, d]

    def mix(self, x: torch.Tensor, parts: List[torch.Tensor], routing: Routing, sparse: bool) -> torch.Tensor:
        """Σ_i G_i E_i(x) (eq. 1) from x [N, m] and the outputs of `projections(sparse)` run on it."""
        if self.private == 'w2':
            h = F.silu(parts[0]) * parts[1]  # [N, d], the same for every expert
            return self._mix_outputs(h, routing.gates)
        if sparse:
            h = self._mix_sparse(x, parts[0], routing)
        else:
            h = self._mix_dense(parts[0].reshape(x.shape[0], self.num_experts, self.hidden_dim), parts[1],
                                routing.gates)
        return F.linear(h, self.w2.weight, self.w2.bias)

    def _mix_dense(self, z: torch.Tensor, shared: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """The hidden activations from every expert's private projection z [N, t, d] and the shared one [N, d]."""
        if torch.is_grad_enabled():
            # the broadcast product + sum is the fastest to differentiate (benchmarks/moe_layer.py)
            if self.private == 'w':
                return (gates[:, :, None] * F.silu(z)).sum(1) * shared
            return F.silu(shared) * (gates[:, :, None] * z).sum(1)
        # inference: in place, and the mix over experts as one batched [1, t] @ [t, d] product per token
        if self.private == 'w':
            return torch.bmm(gates.unsqueeze(1), F.silu(z, inplace=True)).squeeze(1).mul_(shared)
        return torch.bmm(gates.unsqueeze(1), z).squeeze(1).mul_(F.silu(shared, inplace=True))

    @torch.jit.unused
    def _mix_sparse(self, x: torch.Tensor, shared: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The hidden activations from the private projection of each token's chosen experts only."""
        weight, bias = self._input_side()[:2]
        if self.private == 'v':
            shared = F.silu(shared)
        if torch.is_autocast_enabled(x.device.type):  # autocast skips the ops' matmuls (they write out=)
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
        p = routing.gates.gather(1, routing.top_idx).to(x.dtype)
        mix: Type[torch.autograd.Function] = SortedExpertMix
        if routing.top_idx.shape[1] == 2 and self.num_experts <= MAX_EXPERTS_FOR_PAIRS:
            mix = PairedExpertMix
        return mix.apply(x, p, routing.top_idx, weight, bias, shared.to(x.dtype), self.private == 'w')

    def _mix_outputs(self, h: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Σ_i G_i (h·W2_i + b_i) = [G_i·h]_i · [W2_i]_i + G·b for a private W2."""
        mixed = (gates[:, :, None] * h[:, None, :]).reshape(h.shape[0], -1)  # [N, t·d]
        w2 = self.w2.weight.permute(1, 0, 2).reshape(self.dim, -1)  # [m, t·d]
        return F.linear(mixed, w2) + gates @ self.w2.bias
