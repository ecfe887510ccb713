""" Per-image routing: one routing decision per image, held by every token of it

"Mobile V-MoEs: Scaling Down Vision Transformers via Sparse Mixture-of-Experts", Daxberger et al., arXiv 2309.04354,
§2.2 ("per-image routing"). A second gate beside mLiT's per-token `NoisyTopKGate`: where that one routes each token,
`ImageRouter` reads one vector per image (the class token) and picks k of E experts for the whole image, so that an
image touches only k experts' weights. `per_token` spreads an image-level `Routing` over the image's tokens, which
lets every token-level mix of `experts.py` run per-image routing unchanged (mLiT's `moe_routing='image'`).

Combine weights (a decision; the notes do not say), `combine`:
  * 'softmax' (default, V-MoE's way: Riquelme et al. 2021, vmoe/moe.py): the chosen experts are weighted by their
    softmax probabilities over all E experts, not renormalised over the k chosen ones. Plain renormalisation would
    weigh a top-1 router's expert by 1 and give the router no gradient from the classification loss, so an
    end-to-end router (no super-class loss) could not learn at k = 1. The price: the weights of an image sum to
    less than 1 (about k/E at initialisation), so an MoE layer's branch starts at a fraction of its dense twin's.
  * 'normalized': each chosen probability divided by the sum of the chosen ones, that sum held constant for the
    gradient (p_i / sg(Σ_topk p)). The weights sum to 1 in value, so experts that are copies of one dense MLP (sparse
    upcycling) compute exactly what it computes, and a fresh MoE's branches start at full scale; the router's
    gradient is the softmax one scaled by 1 / Σ_topk p, so it still learns at k = 1.
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gate import Routing, moe_balance_loss
from .stats import AddAuxiliaryLoss, RecordsBalanceLoss

__all__ = ['ROUTER_COMBINES', 'ImageRouter', 'image_routers', 'per_token']

ROUTER_COMBINES = ('softmax', 'normalized')


def per_token(routing: Routing, tokens_per_image: int) -> Routing:
    """An image-level `Routing` (rows = images) as a token-level one (rows = the images' tokens, image-major, as
    x.reshape(B·N, m) orders them): each token gets its image's gates and experts. The importance and load stay
    those of the images, so the balance loss balances images, not tokens."""
    return Routing(
        routing.gates.repeat_interleave(tokens_per_image, dim=0),
        routing.top_idx.repeat_interleave(tokens_per_image, dim=0),
        routing.importance,
        routing.load,
    )


class ImageRouter(RecordsBalanceLoss, nn.Module):
    """Mobile V-MoE's router g(x) = softmax(x·W_r) over E experts for one vector x per image (no bias, no noise).

    `forward(x)` routes images x [B, D] to their top-k experts, weighted by their softmax probabilities as
    `combine` says (module docstring). It keeps, from its last forward, `last_logits` [B, E] (what the super-class
    loss of §2.2 reads: `timm_mlit.task`), and in training `last_loss`, the balance loss w·(CV²(importance) +
    CV²(load)) over the batch's images (the mLiT balance loss, eq. 10-12 of arXiv 2407.17783, with the load counted
    in images: without noise it carries no gradient), and `last_load`, read through `layers.moe_stats` like an mLiT
    MoE layer's. `keep_loss(y)` passes that loss to the gradients through `AddAuxiliaryLoss` when `loss_weight > 0`.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int = 1, loss_coef: float = 1e-2,
                 loss_weight: float = 1.0, combine: str = 'softmax', device=None, dtype=None):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f'top_k={top_k} must be between 1 and the number of experts ({num_experts})')
        if combine not in ROUTER_COMBINES:
            raise ValueError(f'unknown router_combine {combine!r}; choose one of {ROUTER_COMBINES}')
        self.combine = combine
        self.num_experts = num_experts
        self.top_k = top_k
        self.loss_coef = loss_coef
        self.loss_weight = loss_weight
        self.weight = nn.Parameter(torch.empty(num_experts, dim, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default init
        self.last_logits: Optional[torch.Tensor] = None
        self.last_loss: Optional[torch.Tensor] = None
        self.last_load: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> Routing:
        logits = F.linear(x, self.weight)  # [B, E]
        probs = logits.float().softmax(dim=-1)
        top_vals, top_idx = probs.topk(self.top_k, dim=-1)  # [B, k]
        weights = top_vals / top_vals.sum(-1, keepdim=True).detach() if self.combine == 'normalized' else top_vals
        gates = torch.zeros_like(probs).scatter(1, top_idx, weights).to(x.dtype)
        ones = torch.ones_like(top_vals).reshape(-1)
        load = probs.new_zeros(self.num_experts).scatter_add(0, top_idx.reshape(-1), ones)  # [E]; a batch may be empty
        routing = Routing(gates, top_idx, probs.sum(0), load)
        if not torch.jit.is_scripting():
            self._record(logits, routing)
        return routing

    @torch.jit.unused
    def _record(self, logits: torch.Tensor, routing: Routing):
        self.last_logits = logits
        if self.training:
            self.last_loss = moe_balance_loss(routing.importance, routing.load, self.loss_coef)
            self.last_load = routing.load.detach()

    def keep_loss(self, y: torch.Tensor) -> torch.Tensor:
        """`y`, carrying the balance loss of the last training forward to the gradients (weight `loss_weight`)."""
        if torch.jit.is_scripting():
            return y
        else:
            return self._attach(y)

    @torch.jit.unused
    def _attach(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.last_loss is not None and self.loss_weight > 0 and torch.is_grad_enabled():
            y = AddAuxiliaryLoss.apply(y, self.last_loss * self.loss_weight)
        return y


def image_routers(model: nn.Module) -> List[Tuple[str, ImageRouter]]:
    """The per-image routers of `model` with their module names (one for a Mobile V-MoE, none for a dense model or
    an mLiT, whose per-image routing lives in its MoE layers' gates)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ImageRouter)]
