""" mLiT's hyper-parameters: the depth-wise hidden sizes (eq. 15 of arXiv 2407.17783), the expert stages, and the
check of every constructor argument of `MLiT`, so that a wrong one fails at construction, by name, not at a forward
in training.
"""
import math
import numbers
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch

from ._checks import check_int, check_ints, check_rate

__all__ = ['check_mlit_args', 'depthwise_hidden_dims', 'experts_per_layer']


def depthwise_hidden_dims(depth: int, first: int, last: int) -> List[int]:
    """Hidden size of each layer, shrinking linearly from `first` to `last` (eq. 15), in integer arithmetic."""
    if depth == 1:
        return [first]
    return [((depth - 1 - i) * (first - last)) // (depth - 1) + last for i in range(depth)]


def experts_per_layer(depth: int, num_experts: Union[int, Sequence[int]]) -> List[int]:
    """Experts of each layer: one entry of `num_experts` per stage, the stages splitting the depth evenly."""
    depth = check_int('depth', depth)
    if isinstance(num_experts, numbers.Integral) and not isinstance(num_experts, bool):
        return [check_int('num_experts', num_experts)] * depth
    if isinstance(num_experts, str) or not isinstance(num_experts, Sequence):
        raise TypeError(f'num_experts must be an int or a sequence of ints (experts per stage), got {num_experts!r}')
    num_experts = check_ints('num_experts', num_experts)
    stages = len(num_experts)
    if depth < stages:
        raise ValueError(f'depth {depth} is smaller than the number of expert stages {tuple(num_experts)}')
    return [num_experts[i * stages // depth] for i in range(depth)]


def check_mlit_args(
        img_size, patch_size, in_chans, num_classes, global_pool, embed_dim, depth, num_heads, num_kv_heads,
        hidden_dims, num_experts, top_k, expert_shared, noisy_gating, norm_layer, dtype, rates: Dict[str, Any],
        weights: Dict[str, Any]) -> Tuple[Tuple[int, int], List[int], List[int]]:
    """Check every argument of MLiT, so that a wrong one fails at construction, by name, not at a forward in
    training. Returns the image size as (H, W), the hidden size and the expert count of each layer."""
    if global_pool not in ('', 'token', 'avg'):
        raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
    patch_size = check_int('patch_size', patch_size)
    if isinstance(img_size, numbers.Integral) and not isinstance(img_size, bool):
        img_size = (check_int('img_size', img_size),) * 2
    elif isinstance(img_size, (str, bytes)) or not isinstance(img_size, Sequence):
        raise TypeError(f'img_size must be an int or a pair of ints (H, W), got {img_size!r}')
    else:
        img_size = check_ints('img_size', img_size, length=2)
    if img_size[0] % patch_size or img_size[1] % patch_size:
        raise ValueError(f'img_size {img_size} is not a multiple of patch_size {patch_size}')
    in_chans = check_int('in_chans', in_chans)
    num_classes = check_int('num_classes', num_classes, minimum=0)
    embed_dim = check_int('embed_dim', embed_dim)
    num_heads = check_int('num_heads', num_heads)
    num_kv_heads = check_int('num_kv_heads', num_kv_heads)
    if embed_dim % num_heads:
        raise ValueError(f'embed_dim={embed_dim} must be divisible by num_heads={num_heads}')
    if num_heads % num_kv_heads:
        raise ValueError(f'num_heads={num_heads} must be divisible by num_kv_heads={num_kv_heads}')
    depth = check_int('depth', depth)
    hidden = depthwise_hidden_dims(depth, *check_ints('hidden_dims', hidden_dims, length=2))
    experts = experts_per_layer(depth, num_experts)
    top_k = check_int('top_k', top_k)
    if top_k > min(experts):
        raise ValueError(f'top_k={top_k} is larger than the smallest expert count {min(experts)} of {experts}')
    if isinstance(expert_shared, str) or not isinstance(expert_shared, Sequence):
        raise TypeError(f'expert_shared must be a pair of matrix names such as (\'v\', \'w2\'), got '
                        f'{expert_shared!r}')
    for name, rate in rates.items():
        check_rate(name, rate)
    for name, value in weights.items():
        check_rate(name, value, upper=math.inf)
    if not isinstance(noisy_gating, bool):
        raise TypeError(f'noisy_gating must be True or False, got {noisy_gating!r}')
    if norm_layer is not None and not callable(norm_layer):
        raise TypeError(f'norm_layer must be a normalization layer class such as nn.LayerNorm, got {norm_layer!r}')
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f'dtype must be a floating-point torch.dtype, got {dtype!r}')
    return img_size, hidden, experts
