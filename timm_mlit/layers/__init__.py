from .attention import GroupedQueryAttention
from .moe import (
    EXPERT_SHARING,
    MOE_IMPLS,
    AddAuxiliaryLoss,
    ExpertLinear,
    MoE,
    NoisyTopKGate,
    SwiGLUExperts,
    cv_squared,
    moe_balance_loss,
    prob_in_top_k,
    softmax_k,
    top_k_thresholds,
)
