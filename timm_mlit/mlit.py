""" mLiT: a Mixture-of-Experts based Lightweight vision Transformer

"How Lightweight Can a Vision Transformer Be", J. H. Tan, arXiv 2407.17783 (https://arxiv.org/abs/2407.17783)

A ViT for 36×36 images cut into 3×3 patches, whose encoder layers are pre-norm grouped-query attention and a
Mixture-of-Experts feed-forward layer of SwiGLU experts sharing V and W2 (timm_mlit.layers.moe). The hidden size
of the experts shrinks linearly with depth (eq. 15) and the number of experts grows by one per stage (3, 4, 5).

The all-zero dummy patch: the paper appends it as a 145th patch and classifies from it. The patch projection has
no bias, so its embedding is zero and the token is, in effect, a learnable class token carried by its positional
embedding. We place it *first* in the token sequence rather than last. With a positional embedding per token the
order is immaterial to a transformer (attention is permutation-equivariant), and the front is where timm keeps
prefix tokens (`num_prefix_tokens`), so `resample_abs_pos_embed`, `forward_intermediates` and the MAE's masking
treat it like any class token.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import (
    DropPath,
    PatchDropout,
    PatchEmbed,
    resample_abs_pos_embed,
    resample_patch_embed,
    trunc_normal_,
)
from timm.models import (
    adapt_input_conv,
    build_model_with_cfg,
    checkpoint,
    checkpoint_seq,
    generate_default_cfgs,
    register_model,
)
from timm.models._features import feature_take_indices  # private: timm (1.0.28 to 1.0.31) does not export it

from ._checks import check_input_image
from ._weights import LABEL_NAMES, weights_source  # the cfgs of published weights, see default_cfgs
from .checkpoint import encoder_state_dict, state_dict_of
from .layers import GroupedQueryAttention, MoE, moe_stats
from .mlit_args import check_mlit_args, depthwise_hidden_dims, experts_per_layer

__all__ = [
    'MLiT', 'MLiTBlock', 'checkpoint_filter_fn', 'depthwise_hidden_dims', 'encoder_state_dict', 'experts_per_layer',
]


class MLiTBlock(nn.Module):
    """x = x + GQA(LN(x)); x = x + MoE(LN(x))  (paper Fig. 1), with optional stochastic depth."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            num_kv_heads: int,
            hidden_dim: int,
            num_experts: int,
            top_k: int = 2,
            expert_shared: Sequence[str] = ('v', 'w2'),
            moe_impl: str = 'auto',
            moe_drop_rate: float = 0.1,
            moe_loss_coef: float = 1e-2,
            moe_loss_weight: float = 1.0,
            noisy_gating: bool = True,
            moe_routing: str = 'token',
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = GroupedQueryAttention(
            dim, num_heads=num_heads, num_kv_heads=num_kv_heads, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = MoE(
            dim, hidden_dim, num_experts, top_k=top_k, expert_shared=expert_shared, drop_rate=moe_drop_rate,
            impl=moe_impl, loss_coef=moe_loss_coef, loss_weight=moe_loss_weight, noisy_gating=noisy_gating,
            routing=moe_routing,
        )
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class MLiT(nn.Module):
    """mLiT (arXiv 2407.17783): patch embedding, a zero dummy patch as class token, learnable positional
    embedding, pre-norm GQA + MoE blocks with depth-wise hidden sizes and staged expert counts."""

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 36,
            patch_size: int = 3,
            in_chans: int = 3,
            num_classes: int = 100,
            global_pool: str = 'token',
            embed_dim: int = 108,
            depth: int = 9,
            num_heads: int = 6,
            num_kv_heads: int = 3,
            hidden_dims: Tuple[int, int] = (81, 27),
            num_experts: Union[int, Sequence[int]] = (3, 4, 5),
            top_k: int = 2,
            expert_shared: Sequence[str] = ('v', 'w2'),
            moe_impl: str = 'auto',
            moe_loss_weight: float = 1.0,
            moe_loss_coef: float = 1e-2,
            moe_drop_rate: float = 0.1,
            noisy_gating: bool = True,
            moe_routing: str = 'token',
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            patch_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: Optional[Type[nn.Module]] = None,
            device: Optional[Union[str, torch.device]] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        """
        Args:
            img_size: input image size; must be a multiple of `patch_size`.
            patch_size: side of the square patches.
            in_chans: input channels.
            num_classes: classes of the head; 0 for no head (the encoder alone).
            global_pool: 'token' (the dummy patch, the paper's choice), 'avg' (mean of the patch tokens) or ''.
            embed_dim: token width m.
            depth: number of encoder layers L_E.
            num_heads: query heads H of the grouped-query attention.
            num_kv_heads: key/value heads G.
            hidden_dims: SwiGLU hidden size of the first and the last layer (eq. 15 fills the rest).
            num_experts: experts per stage (stages split the depth evenly), or one count for every layer.
            top_k: experts chosen per token.
            expert_shared: which two SwiGLU matrices the experts of a layer share (paper Table 9).
            moe_impl: MoE implementation: 'auto', 'loop' (reference), 'dense' or 'sparse'.
            moe_loss_weight: weight with which the MoE balance loss reaches the gradients through the autograd
                hook, for loops that only back-propagate their own criterion; 0 turns the hook off.
            moe_loss_coef: w of the balance loss w·(CV²(importance) + CV²(load)).
            moe_drop_rate: dropout on the MoE output (0.1 in the paper).
            noisy_gating: add the trainable gate noise in training (eq. 3).
            moe_routing: 'token' (the paper: every token routed on its own) or 'image' (Mobile V-MoE's per-image
                routing, arXiv 2309.04354: each MoE layer routes an image from its dummy token, as the layer's input
                norm left it, and all its tokens follow; per layer, since the layers' expert counts differ).
            drop_rate: dropout before the head.
            pos_drop_rate: dropout after adding the positional embedding.
            patch_drop_rate: share of the patch tokens dropped at random in training (timm's PatchDropout, as in
                VisionTransformer); the dummy token is always kept, and evaluation sees every token.
            proj_drop_rate: dropout after the attention projection.
            attn_drop_rate: attention dropout.
            drop_path_rate: stochastic depth, rising linearly to this rate.
            norm_layer: normalization layer (default nn.LayerNorm with PyTorch defaults, as in the paper).
            device: where to put the parameters (timm's create_model passes it).
            dtype: parameter dtype.
        """
        super().__init__()
        img_size, hidden, experts = check_mlit_args(
            img_size, patch_size, in_chans, num_classes, global_pool, embed_dim, depth, num_heads, num_kv_heads,
            hidden_dims, num_experts, top_k, expert_shared, noisy_gating, norm_layer, dtype,
            rates=dict(moe_drop_rate=moe_drop_rate, drop_rate=drop_rate, pos_drop_rate=pos_drop_rate,
                       patch_drop_rate=patch_drop_rate,
                       proj_drop_rate=proj_drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate),
            weights=dict(moe_loss_weight=moe_loss_weight, moe_loss_coef=moe_loss_coef))
        norm_layer = norm_layer or nn.LayerNorm

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1  # the dummy patch
        self.img_size = img_size
        self.in_chans = in_chans
        self.grad_checkpointing = False

        # the dummy patch is all zeros and the projection has no bias, so its embedding is 0 (see module docstring)
        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, bias=False)
        num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.patch_drop = PatchDropout(patch_drop_rate, num_prefix_tokens=self.num_prefix_tokens) \
            if patch_drop_rate > 0 else nn.Identity()

        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # python floats: works on 'meta' too
        self.blocks = nn.Sequential(*[
            MLiTBlock(
                embed_dim, num_heads, num_kv_heads, hidden[i], experts[i], top_k=top_k, expert_shared=expert_shared,
                moe_impl=moe_impl, moe_drop_rate=moe_drop_rate, moe_loss_coef=moe_loss_coef,
                moe_loss_weight=moe_loss_weight, noisy_gating=noisy_gating, moe_routing=moe_routing,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm_layer,
            )
            for i in range(depth)])
        self.feature_info = [
            dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        trunc_normal_(self.pos_embed, std=.02)  # every nn layer keeps PyTorch's default init (paper §3)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # the per-expert biases are stacked [t, d]: 2-D, so timm's "no decay on 1-D params" rule misses them
        return {'pos_embed'} | {n for n, _ in self.named_parameters() if n.endswith('.bias')}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^pos_embed|patch_embed',
            blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('', 'token', 'avg'):
                raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        ref = self.pos_embed  # the new head lives where the model lives, in its dtype and train/eval mode
        self.head = nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype) \
            if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    @torch.jit.ignore
    def moe_loss(self) -> torch.Tensor:
        """Sum of the balance losses (eq. 12) of every MoE layer from the last training forward (unweighted)."""
        stats = moe_stats(self)
        return self.pos_embed.new_zeros((), dtype=torch.float32) if stats is None else stats.loss  # float32, as eq. 12

    def forward_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] to the tokens the blocks take, [B, 1 + L, C]: the patch embedding, the dummy patch's
        embedding first, the positional embedding added (what the MAE encodes, masked)."""
        x = check_input_image(x, self.in_chans, self.img_size, self.patch_embed.proj.weight.dtype)
        x = self.patch_embed(x)  # [B, 144, C]
        dummy = x.new_zeros(x.shape[0], 1, x.shape[2])  # embedding of the all-zero dummy patch
        x = torch.cat([dummy, x], dim=1) + self.pos_embed  # [B, 145, C]
        return self.pos_drop(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that returns intermediates.

        Args:
            x: input images.
            indices: take the last n blocks if int, all if None, the listed indices if a sequence.
            return_prefix_tokens: return (spatial, dummy token) pairs.
            norm: apply the final norm to every intermediate.
            stop_early: stop after the last block needed.
            output_fmt: 'NCHW' or 'NLC'.
            intermediates_only: return the intermediates alone.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        reshape = output_fmt == 'NCHW'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)

        B = x.shape[0]
        x = self.patch_drop(self.forward_embed(x))
        if reshape and x.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(f'patch dropout kept {x.shape[1] - 1} of {self.pos_embed.shape[1] - 1} patch tokens '
                             f'(training mode): output_fmt=\'NCHW\' needs them all; use eval() or output_fmt=\'NLC\'')
        if torch.jit.is_scripting() or not stop_early:
            blocks = self.blocks
        else:
            blocks = self.blocks[:max_index + 1]
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x)
            else:
                x = blk(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)

        prefix_tokens = [y[:, :self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if reshape:
            H, W = self.patch_embed.grid_size
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if not torch.jit.is_scripting() and return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens))

        if intermediates_only:
            return intermediates
        x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks (and optionally the norm and head) that the given intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_drop(self.forward_embed(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)  # [B, 145, C], the dummy token first

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        elif self.global_pool == 'token':
            x = x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.forward_head(x)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: MLiT) -> Dict[str, torch.Tensor]:
    """Adapt a state dict to `model`: unwrap train.py / MAE containers, resample the positional embedding to the
    model's grid, resample the patch projection to its patch size and adapt it to its channel count, and give a
    head-less encoder the model's own fresh head."""
    state_dict = state_dict_of(state_dict)

    out = {}
    for k, v in state_dict.items():
        if k == 'patch_embed.proj.weight':
            _, in_chans, H, W = model.patch_embed.proj.weight.shape
            if v.shape[-2:] != (H, W):
                v = resample_patch_embed(v, [H, W], verbose=False)
            if v.shape[1] != in_chans:
                v = adapt_input_conv(in_chans, v)
        elif k == 'pos_embed' and v.shape != model.pos_embed.shape:
            v = resample_abs_pos_embed(
                v, new_size=model.patch_embed.grid_size, num_prefix_tokens=model.num_prefix_tokens, verbose=False)
        out[k] = v
    if not any(k.startswith('head.') for k in out) and isinstance(model.head, nn.Linear):
        # a head-less encoder (the MAE export): keep the model's freshly initialised head, so strict loading of
        # `pretrained=True` works whatever the class count
        out.update({f'head.{k}': v for k, v in model.head.state_dict().items()})
    return out


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 100,
        'input_size': (3, 36, 36),
        'pool_size': None,
        'crop_pct': 1.0,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': IMAGENET_INCEPTION_MEAN,  # (0.5, 0.5, 0.5), the paper's normalisation
        'std': IMAGENET_INCEPTION_STD,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'paper_ids': 'arXiv:2407.17783',
        'paper_name': 'How Lightweight Can A Vision Transformer Be',
        'license': 'apache-2.0',
        **kwargs,
    }


# One entry per published weight, and none for weights that do not exist. An entry with weights becomes its arch's
# default tag (timm's generate_default_cfgs), ahead of '.untrained'. How to add one: timm_mlit/hub.py's docstring.
# e.g. 'mlit_xxs.mae_ft_cifar100': _cfg(**weights_source('mlit_xxs.mae_ft_cifar100'), num_classes=100,
#                                      label_names=LABEL_NAMES['cifar100']),
default_cfgs = generate_default_cfgs({
    # mmLiT-S on Fashion-MNIST, embedded in the package (docs/results.md), as for mlit_xxs below
    'mlit_s.mae_ft_fashion_mnist': _cfg(
        **weights_source('mlit_s.mae_ft_fashion_mnist'), num_classes=10, label_names=LABEL_NAMES['fashion_mnist']),
    'mlit_s.mae_in_fashion_mnist': _cfg(**weights_source('mlit_s.mae_in_fashion_mnist'), num_classes=0),
    'mlit_s.untrained': _cfg(),
    # mmLiT-XS on Fashion-MNIST, embedded in the package (docs/results.md), as for mlit_xxs below
    'mlit_xs.mae_ft_fashion_mnist': _cfg(
        **weights_source('mlit_xs.mae_ft_fashion_mnist'), num_classes=10, label_names=LABEL_NAMES['fashion_mnist']),
    'mlit_xs.mae_in_fashion_mnist': _cfg(**weights_source('mlit_xs.mae_in_fashion_mnist'), num_classes=0),
    'mlit_xs.untrained': _cfg(),
    # mmLiT-XXS on Fashion-MNIST, embedded in the package (docs/results.md): the MAE-pre-trained encoder fine-tuned,
    # mlit_xxs's default tag, and the encoder itself (head-less)
    'mlit_xxs.mae_ft_fashion_mnist': _cfg(
        **weights_source('mlit_xxs.mae_ft_fashion_mnist'), num_classes=10, label_names=LABEL_NAMES['fashion_mnist']),
    'mlit_xxs.mae_in_fashion_mnist': _cfg(**weights_source('mlit_xxs.mae_in_fashion_mnist'), num_classes=0),
    'mlit_xxs.untrained': _cfg(),
})


def _create_mlit(variant: str, pretrained: bool = False, **kwargs) -> MLiT:
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        MLiT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


@register_model
def mlit_s(pretrained: bool = False, **kwargs) -> MLiT:
    """mLiT-S: 144 wide, 15 layers, hidden 144→72, 8 heads / 4 KV groups (Table 1)."""
    model_args = dict(embed_dim=144, depth=15, num_heads=8, num_kv_heads=4, hidden_dims=(144, 72))
    return _create_mlit('mlit_s', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mlit_xs(pretrained: bool = False, **kwargs) -> MLiT:
    """mLiT-XS: 128 wide, 12 layers, hidden 96→32, 8 heads / 4 KV groups (Table 1)."""
    model_args = dict(embed_dim=128, depth=12, num_heads=8, num_kv_heads=4, hidden_dims=(96, 32))
    return _create_mlit('mlit_xs', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mlit_xxs(pretrained: bool = False, **kwargs) -> MLiT:
    """mLiT-XXS: 108 wide, 9 layers, hidden 81→27, 6 heads / 3 KV groups (Table 1)."""
    model_args = dict(embed_dim=108, depth=9, num_heads=6, num_kv_heads=3, hidden_dims=(81, 27))
    return _create_mlit('mlit_xxs', pretrained=pretrained, **dict(model_args, **kwargs))
