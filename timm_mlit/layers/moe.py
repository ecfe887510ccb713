""" Mixture-of-Experts feed-forward layer of mLiT

"How Lightweight Can a Vision Transformer Be", J. H. Tan, arXiv 2407.17783, §2.1.2.

Pieces, one job each:
  * gate math as pure functions: `softmax_k` (eq. 4), `top_k_thresholds` (Ψ, eq. 6), `prob_in_top_k` (eq. 5),
    `cv_squared`, `moe_balance_loss` (eq. 10-12)
  * `NoisyTopKGate`: noisy top-k gating (eq. 2-3) and the load / importance the loss needs
  * `SwiGLUExperts`: the SwiGLU experts of eq. 13 with some of their matrices shared across the layer
  * `MoE`: routing + dispatch/combine, dropout, and the auxiliary loss
  * `AddAuxiliaryLoss`: an autograd hook that lets the auxiliary loss reach the gradients through a training loop
    that only back-propagates its own criterion (timm's train.py)

Decision on the loss (SPEC §2): the paper's eq. 10-12 write CV for the load and a bare column sum for the
importance, which is not a scalar. The implementation the paper cites (D. Rau, sparsely-gated MoE) uses the
squared coefficient of variation of both, so `L_moe = w * (CV²(importance) + CV²(load))`, w = 1e-2.
"""
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers._fx import register_notrace_function

__all__ = [
    'softmax_k', 'top_k_thresholds', 'prob_in_top_k', 'cv_squared', 'moe_balance_loss',
    'NoisyTopKGate', 'ExpertLinear', 'SwiGLUExperts', 'MoE', 'AddAuxiliaryLoss', 'MOE_IMPLS', 'EXPERT_SHARING',
]

MOE_IMPLS = ('auto', 'loop', 'dense', 'sparse')

# Which two of the three SwiGLU matrices (W, V, W2 of eq. 13) all experts of a layer share (paper Table 9).
EXPERT_SHARING = (('v', 'w2'), ('v', 'w'), ('w', 'w2'))


def _is_fx_symbolic_tracing() -> bool:
    fx = torch.fx._symbolic_trace
    check = getattr(fx, 'is_fx_symbolic_tracing', None) or fx.is_fx_tracing  # the first is torch >= 2.6
    return check()


@register_notrace_function  # torch.fx: a leaf, its shape checks are not traced
def softmax_k(h: torch.Tensor, k: int, top: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Softmax over the k largest entries of each row, zero elsewhere (eq. 2, 4).

    `top`: (values, indices) of h.topk(k) when the caller has them already.
    """
    top_vals, top_idx = h.topk(k, dim=-1) if top is None else top
    return torch.zeros_like(h).scatter(-1, top_idx, top_vals.softmax(dim=-1))


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
    # the clamp only guards a softplus that underflowed to 0
    return torch.special.ndtr((clean_logits - psi) / noise_std.clamp_min(1e-6))


@register_notrace_function
def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation, var / mean², of a 1-D tensor; 0 for a single element."""
    x = x.float()
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + eps)


@register_notrace_function
def moe_balance_loss(importance: torch.Tensor, load: torch.Tensor, weight: float = 1e-2) -> torch.Tensor:
    """L_moe = w · (CV²(importance) + CV²(load)) (eq. 10-12, see the module docstring for the CV² decision)."""
    return weight * (cv_squared(importance) + cv_squared(load))


class NoisyTopKGate(nn.Module):
    """Noisy top-k gating (eq. 2-3) with W_g and W_noise fused into one [m, 2t] projection (no bias, eq. 3).

    Noise is drawn in training mode only: in eval mode H(x) = x·W_g, so inference is deterministic and a
    token's routing does not depend on the rest of its batch.
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

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route tokens.

        Args:
            x: tokens, [N, m].

        Returns:
            gates: G(x), [N, t], k non-zero entries per row summing to 1.
            top_idx: the chosen experts, [N, k].
            importance: column sums of G (eq. 11), [t].
            load: column sums of P (eq. 5, 10) in training with noise, else the count of tokens per expert, [t].
        """
        t, k = self.num_experts, self.top_k
        if self.training and self.noisy:
            logits = F.linear(x, self.weight)  # [N, 2t], one matmul for both projections
            clean, raw_noise = logits[:, :t], logits[:, t:]
            noise_std = F.softplus(raw_noise)
            noisy = clean + torch.randn_like(clean) * noise_std  # eq. 3
            top_vals, top_idx = noisy.topk(k + 1, dim=-1)  # one top-(k+1) serves the gate (first k) and Ψ (eq. 6)
            load = prob_in_top_k(clean, noisy, noise_std, k, top_vals).sum(0)  # eq. 5, 10
            top_vals, top_idx = top_vals[:, :k], top_idx[:, :k]
        else:
            noisy = F.linear(x, self.weight[:t])  # [N, t]
            top_vals, top_idx = noisy.topk(k, dim=-1)
            load = None
        gates = softmax_k(noisy, k, (top_vals, top_idx))  # eq. 2
        if load is None:
            load = (gates > 0).sum(0).to(gates.dtype)
        return gates, top_idx, gates.sum(0), load


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
    """t SwiGLU experts E_i(x) = (silu(x·W_i + b) ⊙ (x·V_i + b_V))·W2_i + b2 (eq. 13), two of W, V, W2 shared.

    `w`, `v` and `w2` are each an `nn.Linear` when shared by all experts of the layer, or an `ExpertLinear`
    (one per expert, stacked) for the one named by `private`. The paper's mLiT shares V and W2 (Table 9).
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, shared: Sequence[str] = ('v', 'w2')):
        super().__init__()
        shared = tuple(shared)
        if sorted(shared) not in [sorted(s) for s in EXPERT_SHARING]:
            raise ValueError(f'expert_shared must name two of w, v, w2 as one of {EXPERT_SHARING}, got {shared}')
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.num_experts = num_experts
        self.private = ({'w', 'v', 'w2'} - set(shared)).pop()  # the matrix each expert has its own copy of

        def make(name: str, in_f: int, out_f: int) -> nn.Module:
            return ExpertLinear(num_experts, in_f, out_f) if name == self.private else nn.Linear(in_f, out_f)
        self.w = make('w', dim, hidden_dim)
        self.v = make('v', dim, hidden_dim)
        self.w2 = make('w2', hidden_dim, dim)

    def forward_expert(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """E_i(x) computed literally, as eq. 13 writes it. The reference the fast paths are checked against."""
        w = self.w(x, i) if self.private == 'w' else self.w(x)
        v = self.v(x, i) if self.private == 'v' else self.v(x)
        h = F.silu(w) * v
        return self.w2(h, i) if self.private == 'w2' else self.w2(h)


class AddAuxiliaryLoss(torch.autograd.Function):
    """Identity on `x` whose backward also seeds d(loss)/d(loss) = 1, so `loss` is optimised alongside whatever
    loss `x` feeds, without the training loop knowing of it (DeepSeek-MoE's AddAuxiliaryLoss).

    The seed is a plain 1: it is not multiplied by anything the loop applies to its own loss. Under fp16 loss
    scaling (GradScaler, scale S) the auxiliary gradient is therefore S times too small relative to the main
    one, and the scaler's unscale divides it by S once more; under gradient accumulation over n micro-batches
    (train.py divides its loss by n) the auxiliary loss counts n times relative to the main loss. Use bf16 or
    fp32 autocast without a loss scaler (our recipes do), or compensate through `moe_loss_weight`.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor):
        ctx.loss_dtype = loss.dtype
        ctx.loss_requires_grad = loss.requires_grad
        return x

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_loss = None
        if ctx.loss_requires_grad:
            grad_loss = torch.ones((), dtype=ctx.loss_dtype, device=grad_output.device)
        return grad_output, grad_loss


class MoE(nn.Module):
    """The MoE feed-forward layer of mLiT: noisy top-k gate, SwiGLU experts with shared matrices, dropout.

    Tokens [B, N, m] are flattened to [B·N, m] and routed independently. y = Σ_i G(x)_i · E_i(x) (eq. 1).

    Implementations (`impl`), all equal to float tolerance:
      * 'loop': per expert, gather its tokens, run E_i literally (eq. 13), scatter-add. The reference.
      * 'dense': the shared-matrix identity (SPEC §2) - only the private matrix differs per expert, so it is run
        for all experts in one matmul and the per-expert results mixed with G; the shared ones run once per
        token. No data-dependent shapes: good for small t, torch.compile and export.
      * 'sparse': the same identity, but the private matrix only for the k chosen experts of each token
        (tokens sorted by expert, one matmul each).
      * 'auto' (default): 'sparse' on a CPU when t >= 4k, else 'dense' (see `_auto_impl`).

    After each training forward `self.aux_loss` holds the unweighted balance loss (eq. 12) for the caller to
    read; if `aux_loss_weight > 0` it also reaches the gradients through `AddAuxiliaryLoss`.
    """

    def __init__(
            self,
            dim: int,
            hidden_dim: int,
            num_experts: int,
            top_k: int = 2,
            shared: Sequence[str] = ('v', 'w2'),
            drop: float = 0.1,
            impl: str = 'auto',
            aux_loss_coef: float = 1e-2,
            aux_loss_weight: float = 1.0,
            noisy_gating: bool = True,
    ):
        super().__init__()
        if impl not in MOE_IMPLS:
            raise ValueError(f'unknown moe_impl {impl!r}; choose one of {MOE_IMPLS}')
        self.impl = impl
        self.aux_loss_coef = aux_loss_coef
        self.aux_loss_weight = aux_loss_weight
        self.gate = NoisyTopKGate(dim, num_experts, top_k, noisy=noisy_gating)
        self.experts = SwiGLUExperts(dim, hidden_dim, num_experts, shared=shared)
        self.drop = nn.Dropout(drop)
        self.aux_loss: Optional[torch.Tensor] = None
        self.last_load: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [B·N, m]
        gates, top_idx, importance, load = self.gate(x)
        impl = self.impl
        if impl == 'auto':
            impl = 'dense'
            if not torch.jit.is_scripting():
                impl = self._auto_impl(x)
        if impl == 'loop':
            y = self._forward_loop(x, gates)
        elif impl == 'sparse':
            y = self._forward_sparse(x, gates, top_idx)
        else:
            y = self._forward_dense(x, gates)
        y = self.drop(y).reshape(shape)

        if self.training and not torch.jit.is_scripting():
            aux_loss = moe_balance_loss(importance, load, self.aux_loss_coef)
            self.aux_loss = aux_loss
            self.last_load = load.detach()
            if self.aux_loss_weight > 0 and torch.is_grad_enabled():
                y = AddAuxiliaryLoss.apply(y, aux_loss * self.aux_loss_weight)
        return y

    @torch.jit.unused
    def _auto_impl(self, x: torch.Tensor) -> str:
        """What 'auto' runs, from measurements (benchmarks/moe_layer.py, README "Performance"): on a CPU the sorted
        dispatch wins once the dense path would compute 4x more expert products than the k needed (t >= 4k); at
        mLiT's t = 3..5, k = 2 the dense path wins. On CUDA the dense path needs no host synchronisation (the
        sparse one reads the tokens-per-expert counts back), and compiled / exported graphs need fixed shapes."""
        if self.gate.num_experts < 4 * self.gate.top_k:
            return 'dense'
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() \
                or _is_fx_symbolic_tracing():
            return 'dense'  # (checked before touching x: under torch.fx it is a Proxy)
        return 'sparse' if x.device.type == 'cpu' else 'dense'

    @torch.jit.unused
    def _forward_loop(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        y = torch.zeros_like(x)
        for i in range(self.experts.num_experts):
            token_idx = gates[:, i].nonzero().squeeze(-1)
            out = self.experts.forward_expert(x[token_idx], i)  # eq. 13
            y = y.index_add(0, token_idx, out * gates[token_idx, i, None])  # eq. 1
        return y

    def _input_projections(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Both input-side projections of eq. 13 in one matmul: (x·W, x·V) with the per-expert one for every
        expert, [N, t, d], and the shared one [N, d]; or both shared, [N, d] each, when W2 is per expert."""
        e = self.experts
        n, d = x.shape[0], e.hidden_dim
        if e.private == 'v':  # the per-expert one first
            weight = torch.cat([e.v.weight.reshape(-1, e.dim), e.w.weight])
            bias = torch.cat([e.v.bias.reshape(-1), e.w.bias])
        else:
            weight = torch.cat([e.w.weight.reshape(-1, e.dim), e.v.weight])
            bias = torch.cat([e.w.bias.reshape(-1), e.v.bias])
        z = F.linear(x, weight, bias)  # [N, (t+1)·d] or [N, 2d]
        if e.private == 'w2':
            return z[:, :d], z[:, d:]
        return z[:, :-d].reshape(n, -1, d), z[:, -d:]

    def _forward_dense(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        e = self.experts
        if e.private == 'w2':
            w, v = self._input_projections(x)
            h = F.silu(w) * v  # [N, d], shared by all experts
            # Σ_i G_i (h·W2_i + b2_i) = [G_i·h]_i · [W2_i]_i + G·b2
            mixed = (gates[:, :, None] * h[:, None, :]).reshape(x.shape[0], -1)  # [N, t·d]
            w2 = e.w2.weight.permute(1, 0, 2).reshape(e.dim, -1)  # [m, t·d]
            return F.linear(mixed, w2) + gates @ e.w2.bias
        z, shared = self._input_projections(x)  # [N, t, d], [N, d]
        if torch.is_grad_enabled():
            # the broadcast product + sum is the fastest to differentiate (benchmarks/moe_layer.py)
            if e.private == 'w':
                h = (gates[:, :, None] * F.silu(z)).sum(1) * shared  # (Σ_i G_i silu(x·W_i+b_i)) ⊙ (x·V+b_V)
            else:
                h = F.silu(shared) * (gates[:, :, None] * z).sum(1)  # silu(x·W+b) ⊙ Σ_i G_i (x·V_i+b_i)
        else:
            # inference: in place, and the mix over experts as one batched [1, t] @ [t, d] product per token
            if e.private == 'w':
                h = torch.bmm(gates.unsqueeze(1), F.silu(z, inplace=True)).squeeze(1).mul_(shared)
            else:
                h = torch.bmm(gates.unsqueeze(1), z).squeeze(1).mul_(F.silu(shared, inplace=True))
        return e.w2(h)

    @torch.jit.unused
    def _forward_sparse(self, x: torch.Tensor, gates: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
        e = self.experts
        n, k = top_idx.shape
        flat_expert = top_idx.reshape(-1)  # [N·k]
        order = flat_expert.argsort()
        token_of = order // k  # token index of each sorted (token, expert) pair
        gate_of = gates.gather(1, top_idx).reshape(-1)[order, None]  # [N·k, 1]
        counts = torch.bincount(flat_expert, minlength=e.num_experts).tolist()
        if e.private == 'w2':
            h = F.silu(e.w(x)) * e.v(x)
            hs = (h[token_of] * gate_of).split(counts)
            outs = [F.linear(hi, e.w2.weight[i]) for i, hi in enumerate(hs)]
            y = torch.zeros_like(x).index_add(0, token_of, torch.cat(outs))
            return y + gates @ e.w2.bias
        private = e.w if e.private == 'w' else e.v
        xs = x[token_of].split(counts)
        z = torch.cat([private(xi, i) for i, xi in enumerate(xs)])  # [N·k, d]
        if e.private == 'w':
            z = F.silu(z)
        mixed = x.new_zeros(n, e.hidden_dim).index_add(0, token_of, z * gate_of)  # Σ_i G_i f(x·W_i + b_i)
        h = mixed * e.v(x) if e.private == 'w' else F.silu(e.w(x)) * mixed
        return e.w2(h)
