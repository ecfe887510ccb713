from .attention import GroupedQueryAttention
from .experts import EXPERT_SHARING, ExpertLinear, SwiGLUExperts
from .gate import NoisyTopKGate, Routing, cv_squared, moe_balance_loss, prob_in_top_k, softmax_k, top_k_thresholds
from .image_router import ImageRouter, image_routers, per_token
from .mlp_experts import MlpExperts
from .moe import MOE_IMPLS, MOE_ROUTINGS, MoE
from .stats import (
    AddAuxiliaryLoss,
    MoEStats,
    RecordsBalanceLoss,
    clear_moe_stats,
    expert_shares,
    moe_stats,
    named_moe_layers,
)
