""" Mixture-of-Experts feed-forward layer of mLiT

"How Lightweight Can a Vision Transformer Be", J. H. Tan, arXiv 2407.17783, §2.1.2.

Pieces, one job each:
  * gate math as pure functions: `softmax_k` (eq. 4), `top_k_thresholds` (Ψ, eq. 6), `prob_in_top_k` (eq. 5),
    `cv_squared`, `moe_balance_loss` (eq. 10-12)
  * `NoisyTopKGate`: noisy top-k gating (eq. 2-3) and the load / importance the loss needs; in training its math
    runs in `_NoisyTopKFunction`, an autograd Function with a hand-written backward
  * `SwiGLUExperts`: the SwiGLU experts of eq. 13 with some of their matrices shared across the layer
  * `MoE`: routing + dispatch/combine, dropout, and the auxiliary loss; its sparse dispatch runs in two more
    autograd Functions, `_PairedExpertMix` (top-2, few experts) and `_SortedExpertMix` (any k)
  * `AddAuxiliaryLoss`: an autograd hook that lets the auxiliary loss reach the gradients through a training loop
    that only back-propagates its own criterion (timm's train.py)

Decision on the loss (SPEC §2): the paper's eq. 10-12 write CV for the load and a bare column sum for the
importance, which is not a scalar. The implementation the paper cites (D. Rau, sparsely-gated MoE) uses the
squared coefficient of variation of both, so `L_moe = w * (CV²(importance) + CV²(load))`, w = 1e-2.
"""
import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function

__all__ = [
    'softmax_k', 'top_k_thresholds', 'prob_in_top_k', 'cv_squared', 'moe_balance_loss', 'noisy_top_k',
    'NoisyTopKGate', 'ExpertLinear', 'SwiGLUExperts', 'MoE', 'AddAuxiliaryLoss', 'MOE_IMPLS', 'EXPERT_SHARING',
    'MoEStats', 'named_moe_layers', 'moe_stats', 'clear_moe_stats', 'expert_shares',
]

MOE_IMPLS = ('auto', 'loop', 'dense', 'sparse')

# 'sparse' with top-2 routing groups tokens by expert pair up to this many experts (`_PairedExpertMix`).
_MAX_EXPERTS_FOR_PAIRS = 5

# 'sparse' pads the hidden size to a multiple of 16 (`_gemm_pad`) only when that adds at most this many units:
# timing a layer's training step with and without, small pads paid off or were even, while 33 -> 48 and 40 -> 48
# cost more than they saved.
_MAX_HIDDEN_PAD = 5

# Floor of the noise standard deviation in eq. 5's division: only guards a softplus that underflowed to 0.
_MIN_NOISE_STD = 1e-6

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
    return torch.zeros_like(h).scatter(-1, top_idx, _softmax_of_sorted(top_vals))


def _softmax_of_sorted(v: torch.Tensor) -> torch.Tensor:
    """softmax over the last dimension of rows sorted in descending order (as topk returns them), subtracting
    the first column for stability: on a CPU `Tensor.softmax` over k = 2 columns costs 3x these three ops."""
    e = (v - v[..., :1]).exp()
    return e / e.sum(-1, keepdim=True)


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
    return torch.special.ndtr((clean_logits - psi) / noise_std.clamp_min(_MIN_NOISE_STD))


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


class _NoisyTopKFunction(torch.autograd.Function):
    """The training-mode noisy top-k gate (eq. 2-6) from its logits, with a hand-written backward.

    Autograd through the pure functions above records some 30 small nodes on [N, t] tensors, several on strided
    column slices; in a 5-expert layer of mlit_xxs they cost more than the experts' matmuls (benchmarks/moe_layer.py).
    This computes the same values in fewer passes (tests/test_moe.py checks values and gradients against the
    composition of the pure functions in float64). With σ = softplus(raw), H = clean + ε·σ, p = softmax of the k
    largest H, u = (clean - Ψ) / σ (eq. 5-6) and dG including d(importance):

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
        p = _softmax_of_sorted(vals[:, :k])  # eq. 4
        gates = torch.zeros_like(noisy).scatter_(1, top_idx, p)
        kth, k1th = vals[:, k - 1:k], vals[:, k:k + 1]
        in_top = noisy >= kth
        std_c = std.clamp_min(_MIN_NOISE_STD)
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
            std_c = std.clamp_min(_MIN_NOISE_STD)
            q = u.square().mul_(-0.5).exp_().mul_(d_load * (1 / math.sqrt(2 * math.pi))).div_(std_c)
            s_top = (q * in_top).sum(-1, keepdim=True)
            s_all = q.sum(-1, keepdim=True)
            d_noisy.scatter_add_(1, idx[:, k - 1:k + 1], torch.cat([s_top - s_all, -s_top], 1))  # dΨ = -q
            d_clean = d_noisy + q
            d_std = (q * u).neg_().masked_fill_(std < _MIN_NOISE_STD, 0.)  # the clamp passes nothing below it
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
    return _NoisyTopKFunction.apply(logits, eps, k)


class NoisyTopKGate(nn.Module):
    """Noisy top-k gating (eq. 2-3) with W_g and W_noise fused into one [m, 2t] projection (no bias, eq. 3).

    Noise is drawn in training mode only: in eval mode H(x) = x·W_g, so inference is deterministic and a
    token's routing does not depend on the rest of its batch.

    `forward(x)` computes the logits and routes them (`route`); `MoE` instead computes the logits in the same matmul
    as its experts' input projections and calls `route` itself. `forward_reference` is the same gate written as
    the paper's equations with autograd through them, which the 'loop' reference uses.
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

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route tokens x [N, m]; see `route`."""
        return self.route(F.linear(x, self.logit_weight()))

    def route(self, logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route tokens from their logits x·`logit_weight()`, [N, 2t] or [N, t].

        Returns:
            gates: G(x), [N, t], k non-zero entries per row summing to 1.
            top_idx: the chosen experts, [N, k].
            importance: column sums of G (eq. 11), [t].
            load: column sums of P (eq. 5, 10) in training with noise, else the count of tokens per expert, [t].
        """
        k = self.top_k
        if self.draws_noise and not torch.jit.is_scripting():
            return self._route_noisy(logits)
        # without noise only W_g's logits count (a scripted model in train mode routes here, without noise)
        logits = logits[:, :self.num_experts]
        top_vals, top_idx = logits.topk(k, dim=-1)
        gates = softmax_k(logits, k, (top_vals, top_idx))  # eq. 2
        return gates, top_idx, gates.sum(0), (gates > 0).sum(0).to(gates.dtype)

    @torch.jit.unused
    def _route_noisy(self, logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return noisy_top_k(logits, self.top_k)

    @torch.jit.unused
    def forward_reference(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
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
        return gates, top_idx[:, :k], gates.sum(0), load


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


def _gemm_pad(width: int, multiple: int = 16) -> int:
    """Zero rows to add to a weight so that a matmul's output width is a multiple of 16. On this project's CPU
    (MKL sgemm, 2 cores) odd output widths fall off the fast kernels: `python benchmarks/matmul_widths.py` times
    a [18560, 108] @ [108, w] product at every w from 24 to 100 beside the next multiple of 16
    (benchmarks/results/matmul_widths_cpu.md). (GPU tensor cores want multiples of 8 or 16 too, so the padding is
    not made device-dependent.)"""
    return -width % multiple


def _hidden_pad(hidden: int, max_pad: int = _MAX_HIDDEN_PAD) -> int:
    """Zero hidden units 'sparse' adds: `_gemm_pad(hidden)` when that is at most `max_pad`, else none."""
    pad = _gemm_pad(hidden)
    return pad if pad <= max_pad else 0


def _weighted_slot_sum(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_j w[:, j] · v[:, j] for v [N, k, d], w [N, k]: k fused multiply-adds, several times faster on a CPU than
    `bmm` or a `sum` over a middle dimension of size k."""
    out = v[:, 0] * w[:, :1]
    for j in range(1, v.shape[1]):
        out.addcmul_(v[:, j], w[:, j:j + 1])
    return out


def _sort_by_expert(top_idx: torch.Tensor, num_experts: int) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """Group the (token, expert) pairs of top_idx [N, k] by expert: `order` maps a sorted position to its flat pair
    index token·k + slot (any order within an expert's block), `token` is each sorted pair's token, `counts` the
    pairs per expert, read back to the host (a synchronisation on CUDA)."""
    flat = top_idx.reshape(-1)
    order = flat.argsort()
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return order, order.div(top_idx.shape[1], rounding_mode='floor'), counts


def _expert_grad_buffers(ctx, xs: torch.Tensor, weight: torch.Tensor):
    """Zeroed gradients of the experts' weight and bias, and an empty one for the gathered tokens `xs`, each only
    if the Function's input (x, weight, bias: positions 0, 3, 4) needs it."""
    need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    return (torch.zeros_like(weight) if need_w else None, weight.new_zeros(weight.shape[:2]) if need_b else None,
            torch.empty_like(xs) if need_x else None)


class _SortedExpertMix(torch.autograd.Function):
    """h = (Σ_j p_j · f(x·W_{e_j} + b_{e_j})) ⊙ u over each token's k chosen experts e_j, f = silu or identity: the
    per-expert part of eq. 13 when one input matrix is private (SPEC §2), for the chosen experts only.

    (token, expert) pairs are sorted by expert so each expert runs one matmul on a contiguous block. Written as
    one Function because autograd through index_select / index_add / split / cat pays a zero-filled scatter per
    gather and a copy per block; here every gather has its inverse permutation at hand, so forward and backward
    are gathers and matmuls writing into preallocated blocks. The per-expert token counts are read back to the
    host (a synchronisation on CUDA, where 'auto' does not pick this path).
    """

    @staticmethod
    def forward(ctx, x, p, top_idx, weight, bias, u, silu: bool):
        n, k = top_idx.shape
        t, d, _ = weight.shape
        order, token, counts = _sort_by_expert(top_idx, t)
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
        ctx.save_for_backward(xs, z, a, p, token, order, inverse, weight, u, mixed)
        ctx.counts, ctx.silu = counts, silu
        return mixed * u

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh):
        xs, z, a, p, token, order, inverse, weight, u, mixed = ctx.saved_tensors
        n, k = p.shape
        d_mixed = (dh * u).index_select(0, token)  # [N·k, d], sorted like z
        dp = (a * d_mixed).sum(-1).index_select(0, inverse).view(n, k)
        dz = d_mixed.mul_(p.reshape(-1).index_select(0, order).unsqueeze(1))
        if ctx.silu:
            dz = torch.ops.aten.silu_backward(dz, z)
        dw, db, dxs = _expert_grad_buffers(ctx, xs, weight)
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


class _PairedExpertMix(torch.autograd.Function):
    """`_SortedExpertMix` for top-2 routing, grouping tokens by their pair of experts instead of (token, expert) pairs
    by expert: each token is gathered once (not k = 2 times), one matmul per pair {i, j} computes both of its
    experts' projections side by side, and the two slots are mixed within the row, so there is no second gather to
    bring a token's two results together and the input gradient is a permutation back, not a scatter-add.
    Timed against `_SortedExpertMix` over a training step of the layer at mLiT's shapes: faster at 4 and 5
    experts, even at 3, slower from 8 (the pairs grow as t² and their blocks shrink), so `MoE` uses it for
    t <= `_MAX_EXPERTS_FOR_PAIRS` only.
    """

    @staticmethod
    def forward(ctx, x, p, top_idx, weight, bias, u, silu: bool):
        n = top_idx.shape[0]
        t, d, _ = weight.shape
        swap = top_idx[:, 0] > top_idx[:, 1]  # order each token's pair as (lower, higher) expert index
        lo = torch.where(swap, top_idx[:, 1], top_idx[:, 0])
        hi = torch.where(swap, top_idx[:, 0], top_idx[:, 1])
        pair = lo * t + hi
        order = pair.argsort()
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=order.device))
        counts = torch.bincount(pair, minlength=t * t).tolist()
        xs = x.index_select(0, order)  # [N, m], grouped by pair
        ps = torch.where(swap.unsqueeze(1), p.flip(1), p).index_select(0, order)  # gates as (lower, higher)
        z = x.new_empty(n, 2 * d)
        blocks = []
        start = 0
        for key, c in enumerate(counts):
            if c:
                i, j = key // t, key % t
                w_ij = torch.cat([weight[i], weight[j]])  # [2d, m], kept for the backward
                torch.addmm(torch.cat([bias[i], bias[j]]), xs[start:start + c], w_ij.t(), out=z[start:start + c])
                blocks.append((i, j, start, c, w_ij))
            start += c
        a = F.silu(z) if silu else z
        mixed = (a[:, :d] * ps[:, :1]).addcmul_(a[:, d:], ps[:, 1:]).index_select(0, inverse)  # Σ_j p_j f(z_j)
        ctx.save_for_backward(xs, z, a, ps, swap, order, inverse, weight, u, mixed)
        ctx.blocks, ctx.silu = blocks, silu
        return mixed * u

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh):
        xs, z, a, ps, swap, order, inverse, weight, u, mixed = ctx.saved_tensors
        d = weight.shape[1]
        d_mixed = (dh * u).index_select(0, order)  # [N, d], sorted like z
        dps = torch.stack([(a[:, :d] * d_mixed).sum(-1), (a[:, d:] * d_mixed).sum(-1)], 1).index_select(0, inverse)
        dp = torch.where(swap.unsqueeze(1), dps.flip(1), dps)
        dz = torch.cat([d_mixed * ps[:, :1], d_mixed * ps[:, 1:]], 1)
        if ctx.silu:
            dz = torch.ops.aten.silu_backward(dz, z)
        dw, db, dxs = _expert_grad_buffers(ctx, xs, weight)
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


class MoE(nn.Module):
    """The MoE feed-forward layer of mLiT: noisy top-k gate, SwiGLU experts with shared matrices, dropout.

    Tokens [B, N, m] are flattened to [B·N, m] and routed independently. y = Σ_i G(x)_i · E_i(x) (eq. 1).

    Implementations (`impl`), all equal to float tolerance:
      * 'loop': per expert, gather its tokens, run E_i literally (eq. 13), scatter-add; the gate through autograd
        (`NoisyTopKGate.forward_reference`). The reference.
      * 'dense': the shared-matrix identity (SPEC §2) - only the private matrix differs per expert, so it is run
        for all experts in one matmul and the per-expert results mixed with G; the shared ones run once per
        token. No data-dependent shapes: good for small t, torch.compile and export.
      * 'sparse': the same identity, but the private matrix only for the k chosen experts of each token, forward
        and backward written out: tokens grouped by expert pair, one matmul per pair (`_PairedExpertMix`, top-2
        with t <= 5), else (token, expert) pairs sorted by expert, one matmul per expert (`_SortedExpertMix`).
      * 'auto' (default): on a CPU 'sparse' in training, and in inference when t >= 4k; else 'dense' (see
        `_auto_impl`).

    Both fast paths compute the gate's logits in the same matmul as the experts' input projections, run the
    training gate's hand-written backward (`_NoisyTopKFunction`) and pad that matmul's width with zero rows to a
    multiple of 16 (`_gemm_pad`); 'sparse' also pads the hidden size when that adds at most 5 units.

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
        impl = self.impl
        if impl == 'auto':
            impl = 'dense'
            if not torch.jit.is_scripting():
                impl = self._auto_impl(x)
        if impl == 'loop':
            gates, top_idx, importance, load = self.gate.forward_reference(x)
            y = self._forward_loop(x, gates)
        else:
            y, importance, load = self._forward_fused(x, impl == 'sparse')
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
        """What 'auto' runs, from measurements (benchmarks/moe_layer.py and models.py, README "Performance"). On a
        CPU: 'sparse' whenever gradients are computed (the faster one in training at every mLiT layer shape), and
        in inference once a layer has 4x more experts than it picks (t >= 4k); below that the dense path's in-place
        inference has the lower latency at small batches and was within 7% at batch 256. 'dense' on CUDA
        (the sparse path reads the tokens-per-expert counts back to the host) and whenever a graph is being
        compiled, exported or traced (fixed shapes)."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() \
                or _is_fx_symbolic_tracing():
            return 'dense'  # (checked before touching x: under torch.fx it is a Proxy)
        if x.device.type != 'cpu':
            return 'dense'
        if torch.is_grad_enabled() or self.gate.num_experts >= 4 * self.gate.top_k:
            return 'sparse'
        return 'dense'

    @torch.jit.unused
    def _forward_loop(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        y = torch.zeros_like(x)
        for i in range(self.experts.num_experts):
            token_idx = gates[:, i].nonzero().squeeze(-1)
            out = self.experts.forward_expert(x[token_idx], i)  # eq. 13
            y = y.index_add(0, token_idx, (out * gates[token_idx, i, None]).to(y.dtype))  # eq. 1 (dtype: autocast)
        return y

    def _forward_fused(self, x: torch.Tensor, sparse: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """'dense' and 'sparse' with a private W or V: (y, importance, load)."""
        e = self.experts
        if e.private == 'w2':
            return self._forward_fused_private_w2(x, sparse)
        n, d, t = x.shape[0], e.hidden_dim, e.num_experts
        if e.private == 'w':
            pw, pb, sw, sb = e.w.weight, e.w.bias, e.v.weight, e.v.bias
        else:
            pw, pb, sw, sb = e.v.weight, e.v.bias, e.w.weight, e.w.bias
        # 'sparse': zero hidden units up to a multiple of 16 (`_MAX_HIDDEN_PAD`). They stay zero through silu, the
        # mix and W2, whose padded input columns are zero too.
        pad = _hidden_pad(d) if sparse else 0
        if pad:
            pw, pb = F.pad(pw, (0, 0, 0, pad)), F.pad(pb, (0, pad))
            sw, sb = F.pad(sw, (0, 0, 0, pad)), F.pad(sb, (0, pad))
        d += pad
        if sparse:  # the shared matrix only; the private one runs per expert on its tokens
            parts, gates, top_idx, importance, load = self._project_and_route(x, [sw], [sb], [d])
        else:  # the private matrix for every expert, then the shared one
            parts, gates, top_idx, importance, load = self._project_and_route(
                x, [pw.reshape(-1, e.dim), sw], [pb.reshape(-1), sb], [t * d, d])
        w2 = F.pad(e.w2.weight, (0, pad)) if pad else e.w2.weight
        if sparse:
            shared = parts[0] if e.private == 'w' else F.silu(parts[0])
            h = self._mix_sparse(x, gates, top_idx, pw, pb, shared)
            return F.linear(h, w2, e.w2.bias), importance, load
        z, shared = parts[0].reshape(n, t, d), parts[1]
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
        return F.linear(h, w2, e.w2.bias), importance, load

    def _forward_fused_private_w2(self, x: torch.Tensor, sparse: bool) \
            -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """'dense' and 'sparse' with a private W2 (both input matrices shared)."""
        e = self.experts
        n, d = x.shape[0], e.hidden_dim
        parts, gates, top_idx, importance, load = self._project_and_route(
            x, [e.w.weight, e.v.weight], [e.w.bias, e.v.bias], [d, d])
        h = F.silu(parts[0]) * parts[1]  # [N, d], shared by all experts
        if sparse:
            return self._mix_w2_sparse(h, gates, top_idx), importance, load
        # Σ_i G_i (h·W2_i + b2_i) = [G_i·h]_i · [W2_i]_i + G·b2
        mixed = (gates[:, :, None] * h[:, None, :]).reshape(n, -1)  # [N, t·d]
        w2 = e.w2.weight.permute(1, 0, 2).reshape(e.dim, -1)  # [m, t·d]
        return F.linear(mixed, w2) + gates @ e.w2.bias, importance, load

    def _project_and_route(self, x: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor],
                           sizes: List[int]):
        """The experts' input-side projections (`weights`, `biases`, output `sizes`) and the gate's logits in one
        matmul - the gate's own [m, 2t] one is too narrow to run fast - then routing. The matmul's width is
        padded with zero rows to a multiple of 16 (`_gemm_pad`: a few columns, always cheaper than an odd width).

        Returns: the projections split as `sizes`, then the gate's (gates, top_idx, importance, load).
        """
        gate_w = self.gate.logit_weight()
        gate_rows = self.gate.num_logits  # (an attribute, not gate_w's shape: torch.fx traces this)
        weights = weights + [gate_w]
        biases = biases + [gate_w.new_zeros(gate_rows)]
        sizes = sizes + [gate_rows]
        num_parts = len(sizes)
        cols = _gemm_pad(sum(sizes))
        if cols:
            weights.append(gate_w.new_zeros(cols, gate_w.shape[1]))
            biases.append(gate_w.new_zeros(cols))
            sizes.append(cols)
        parts = F.linear(x, torch.cat(weights), torch.cat(biases)).split(sizes, dim=1)
        gates, top_idx, importance, load = self.gate.route(parts[num_parts - 1])
        return parts[:num_parts - 1], gates, top_idx, importance, load

    @torch.jit.unused
    def _mix_sparse(self, x: torch.Tensor, gates: torch.Tensor, top_idx: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """(Σ_j G_j f(x·W_j + b_j)) ⊙ shared over each token's chosen experts j, f = silu when W is eq. 13's W."""
        if torch.is_autocast_enabled(x.device.type):  # autocast skips the Function's matmuls (they write out=)
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
        p = gates.gather(1, top_idx).to(x.dtype)
        mix = _SortedExpertMix
        if top_idx.shape[1] == 2 and self.experts.num_experts <= _MAX_EXPERTS_FOR_PAIRS:
            mix = _PairedExpertMix
        return mix.apply(x, p, top_idx, weight, bias, shared.to(x.dtype), self.experts.private == 'w')

    @torch.jit.unused
    def _mix_w2_sparse(self, h: torch.Tensor, gates: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
        """Σ_j G_j (h·W2_j + b2_j) over each token's chosen experts j, tokens sorted by expert."""
        w2 = self.experts.w2
        order, token, counts = _sort_by_expert(top_idx, self.experts.num_experts)
        gate_of = gates.gather(1, top_idx).reshape(-1)[order, None]  # [N·k, 1]
        hs = (h[token] * gate_of).split(counts)
        outs = [F.linear(hi, w2.weight[i]) for i, hi in enumerate(hs)]
        y = h.new_zeros(h.shape[0], w2.weight.shape[1]).index_add(0, token, torch.cat(outs))
        return y + gates @ w2.bias


class MoEStats(NamedTuple):
    """What the MoE layers of a model recorded in their last training forward (`moe_stats`)."""
    loss: torch.Tensor  # Σ over the layers of the unweighted balance loss (eq. 12), a scalar that carries gradients
    load: Dict[str, torch.Tensor]  # layer name -> its load (eq. 10; token counts without noise), detached, [t]


def named_moe_layers(model: nn.Module) -> List[Tuple[str, 'MoE']]:
    """The MoE layers of `model` with their module names, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def moe_stats(model: nn.Module) -> Optional[MoEStats]:
    """The balance loss and each layer's load from the last training forward of `model`; None when it has no MoE
    layer or they recorded nothing (no training forward since `clear_moe_stats`, or an eval forward)."""
    layers = [(name, m) for name, m in named_moe_layers(model) if m.aux_loss is not None]
    if not layers:
        return None
    loss = torch.stack([m.aux_loss.float() for _, m in layers]).sum()
    return MoEStats(loss, {name: m.last_load for name, m in layers})


def clear_moe_stats(model: nn.Module):
    """Forget what the MoE layers of `model` recorded, so that `moe_stats` reports only the next forward."""
    for _, m in named_moe_layers(model):
        m.aux_loss = None
        m.last_load = None


def expert_shares(load: torch.Tensor) -> torch.Tensor:
    """Each expert's share of a layer's routing: its load over the layer's total (1/t each when balanced)."""
    load = load.float()
    return load / load.sum().clamp_min(1e-12)
