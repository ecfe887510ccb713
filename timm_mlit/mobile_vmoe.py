""" Mobile V-MoE: a ViT whose last layers are mixtures of MLP experts, routed per image

"Mobile V-MoEs: Scaling Down Vision Transformers via Sparse Mixture-of-Experts", E. Daxberger et al.,
arXiv 2309.04354 (https://arxiv.org/abs/2309.04354). No public code of the paper exists; this is timm's
VisionTransformer with the MLP of its last `moe_layers` blocks replaced by `num_experts` MLP experts
(`layers.MlpExperts`), and one router (`layers.ImageRouter`) that picks `top_k` experts per image.

Decisions where the paper is silent (also in docs/mobile_vmoe.md):
  * What the router reads: the class token at the input of the first MoE layer, i.e. after that block's attention
    and its pre-MLP norm (`norm2`), the one vector per image that has seen the 12 - L dense layers (the paper's
    ablation: the router "gets information from the 12 - L ViT layers"). Its choice holds for every token of the
    image in all L MoE layers, so an image touches k experts per MoE layer and nothing else.
  * Combine weights: the chosen experts' softmax probabilities over all E, not renormalised (V-MoE's way; see
    `layers.image_router`), so that an end-to-end router learns from the classification loss even at k = 1. They
    sum to less than 1, so `router_combine='normalized'` (the same probabilities over their sum, the sum held
    constant for the gradient) is offered for a start that computes what the dense source computes (upcycling).
  * Balance: the router's balance loss (mLiT's w·(CV²(importance) + CV²(load)) over the batch's images, w = 1e-2)
    stays on beside the super-class loss (`timm_mlit.task`), so that super-class and end-to-end training differ by
    the super-class term alone; at 1e-2 against λ = 0.3 it does not compete with it.

Models: `mobile_vmoe_vit_tiny_patch16_224` is the paper's setting (ViT-Tiny: 12 layers, 192 wide, 224x224, patch 16;
MoE in the last L = 2 layers, E = 10, k = 2: with k = 2 it has the paper's 11.05M parameters of which an image touches
6.31M, §3); `mobile_vmoe_vit_xxs_patch3_36` has mLiT-XXS's input, patch, width and depth (36x36, 3x3 patches, 108
wide, 9 layers, 6 heads, MLP ratio 2) and k = 1, the per-image compute of its dense twin, for small datasets.
The paper's size sweep, ViT-Small down to "only 54M FLOPs" (the paper counts a multiply-add as one FLOP, as ViT-S/16's
usual 4.6 G does; a FLOP counter that counts two measures 9.2 G): `mobile_vmoe_vit_small_patch16_224`,
`..._tiny_patch16_224`, `..._tiny_patch32_224`, `..._12x128_patch32_224` and `..._6x96_patch32_224`, whose dense twin
does 51 M multiply-adds per image; only patch 32 gets that low at 224 (the smallest patch-16 ViT measured, 6 layers
of 64, does 98 M). The widths and depths between the named ends are not in the notes: a decision, measured by
benchmarks/mobile_vmoe_sizes.py.
`moe_layers=0` gives the dense twin of any of them (the same ViT without MoE: timm's VisionTransformer with the same
arguments, weights interchangeable); `num_experts` and `top_k` are model kwargs. mLiT with per-image routing is
`mlit_*(moe_routing='image')`.
"""
from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import Mlp
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices  # private: timm (1.0.28 to 1.0.31) does not export it
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn
from torch.jit import Final

from ._checks import check_int, check_rate
from .layers import ImageRouter, MlpExperts, Routing, image_routers, moe_stats

__all__ = ['MobileVMoE', 'MobileVMoEBlock', 'image_routers']


class MobileVMoEBlock(Block):
    """timm's ViT `Block`, passing the image-level routing along: the first MoE block owns the router and routes
    from its normed class token; every MoE block mixes its experts with that routing; dense blocks pass it on.

    `depth` is the block's index (timm's VisionTransformer passes it); blocks from `first_moe_block` on are MoE.
    """
    is_moe: Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int,
            depth: int = 0,
            first_moe_block: int = 0,
            num_experts: int = 10,
            top_k: int = 1,
            moe_loss_coef: float = 1e-2,
            moe_loss_weight: float = 1.0,
            router_combine: str = 'softmax',
            mlp_layer=Mlp,
            **kwargs,
    ):
        is_moe = depth >= first_moe_block
        if is_moe:
            mlp_layer = partial(MlpExperts, num_experts=num_experts)
        super().__init__(dim, num_heads, mlp_layer=mlp_layer, depth=depth, **kwargs)
        self.is_moe = is_moe
        self.router = ImageRouter(
            dim, num_experts, top_k, loss_coef=moe_loss_coef, loss_weight=moe_loss_weight, combine=router_combine,
            device=kwargs.get('device'), dtype=kwargs.get('dtype')) if depth == first_moe_block else None

    # (ignore: the routing goes along with x, in and out, which timm's Block.forward does not; only MobileVMoE's own
    # forwards call these blocks)
    def forward(  # type: ignore[override]
            self, x: torch.Tensor, routing: Optional[Routing] = None) -> Tuple[torch.Tensor, Optional[Routing]]:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        h = self.norm2(x)
        if self.router is not None:
            routing = self.router(h[:, 0])  # the class token at the input of the first MoE layer
        if self.is_moe:
            if routing is None:
                raise RuntimeError('an MoE block got no routing: the first MoE block must run first')
            y = self.mlp(h, routing)
        else:
            y = self.mlp(h)
        x = x + self.drop_path2(self.ls2(y))
        if self.router is not None:
            x = self.router.keep_loss(x)
        return x, routing


def _check_moe_args(depth: int, moe_layers: int, num_experts: int, top_k: int, moe_loss_coef: float,
                    moe_loss_weight: float):
    depth = check_int('depth', depth)
    moe_layers = check_int('moe_layers', moe_layers, minimum=0)
    if moe_layers > depth:
        raise ValueError(f'moe_layers={moe_layers} is more than the model\'s {depth} layers')
    num_experts = check_int('num_experts', num_experts)
    top_k = check_int('top_k', top_k)
    if top_k > num_experts:
        raise ValueError(f'top_k={top_k} is larger than num_experts={num_experts}: a router picks k of E experts')
    check_rate('moe_loss_coef', moe_loss_coef, upper=float('inf'))
    check_rate('moe_loss_weight', moe_loss_weight, upper=float('inf'))


class MobileVMoE(VisionTransformer):
    """A timm VisionTransformer whose last `moe_layers` blocks are per-image mixtures of MLP experts (module
    docstring). Every VisionTransformer argument is accepted; `block_fn` is this model's own."""

    def __init__(
            self,
            depth: int = 12,
            moe_layers: int = 2,
            num_experts: int = 10,
            top_k: int = 1,
            moe_loss_coef: float = 1e-2,
            moe_loss_weight: float = 1.0,
            router_combine: str = 'softmax',
            **kwargs,
    ):
        """
        Args:
            depth: number of blocks.
            moe_layers: the last this many blocks are MoE (L; 2 in the paper); 0 gives the dense ViT.
            num_experts: experts per MoE layer (E; 10 in the paper); with super-class routing, one per super-class.
            top_k: experts per image (k; 1 or 2 in the paper).
            moe_loss_coef: w of the router's balance loss w·(CV²(importance) + CV²(load)) over the batch's images.
            moe_loss_weight: weight with which that loss reaches the gradients (0: recorded only).
            router_combine: 'softmax' (V-MoE's combine weights, the default) or 'normalized' (weights that sum to
                1, so that a model upcycled from a dense ViT computes what the ViT computes at step 0; see
                `layers.image_router`).
            **kwargs: timm VisionTransformer arguments (img_size, patch_size, embed_dim, num_heads, mlp_ratio, ...).
        """
        _check_moe_args(depth, moe_layers, num_experts, top_k, moe_loss_coef, moe_loss_weight)
        if 'block_fn' in kwargs:
            raise ValueError('MobileVMoE builds its own blocks; block_fn cannot be given')
        if kwargs.get('class_token') is False and moe_layers:
            raise ValueError('the router reads the class token: class_token=False needs moe_layers=0')
        block_fn = partial(
            MobileVMoEBlock, first_moe_block=depth - moe_layers, num_experts=num_experts, top_k=top_k,
            moe_loss_coef=moe_loss_coef, moe_loss_weight=moe_loss_weight, router_combine=router_combine)
        super().__init__(depth=depth, block_fn=block_fn, **kwargs)  # type: ignore[arg-type]  # (timm calls it)
        # a ModuleList, not timm's Sequential: the blocks pass (x, routing) along, which a Sequential cannot call
        # (TorchScript compiles every submodule's forward); the names stay blocks.<i>
        # (ignore: timm's VisionTransformer types its blocks a Sequential)
        self.blocks = nn.ModuleList(self.blocks)  # type: ignore[assignment]
        self.moe_layers = moe_layers
        self.num_experts = num_experts if moe_layers else 0
        self.top_k = top_k

    @torch.jit.ignore
    def moe_loss(self) -> torch.Tensor:
        """The router's balance loss from the last training forward (unweighted; 0 before one, or when dense), for
        loops that add it themselves (with moe_loss_weight=0)."""
        stats = moe_stats(self)
        if stats is None:  # (on the model's device; a dense model may have no class token)
            return self.patch_embed.proj.weight.new_zeros((), dtype=torch.float32)
        return stats.loss

    # (ignore: no attn_mask/is_causal, which timm's VisionTransformer takes: the router reads every image whole, and
    # torch.fx would trace the extra arguments as inputs)
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        routing: Optional[Routing] = None  # set by the first MoE block, read by the others
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x, routing = checkpoint(blk, x, routing)
            else:
                x, routing = blk(x, routing)
        return self.norm(x)

    # (ignore: as forward_features)
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            attn_mask: Optional[torch.Tensor] = None,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that returns intermediates (timm's VisionTransformer.forward_intermediates, without its
        attention-mask and dict options).

        Args:
            x: input images.
            indices: take the last n blocks if int, all if None, the listed indices if a sequence.
            return_prefix_tokens: return (spatial, prefix tokens) pairs.
            norm: apply the final norm to every intermediate.
            stop_early: stop after the last block needed.
            output_fmt: 'NCHW' or 'NLC'.
            intermediates_only: return the intermediates alone.
            attn_mask: must be None (timm's get_intermediate_layers passes it): the router reads every image whole.
        """
        if attn_mask is not None:
            raise ValueError('MobileVMoE takes no attention mask')
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        routing: Optional[Routing] = None
        intermediates = []
        for i, blk in enumerate(blocks):
            x, routing = checkpoint(blk, x, routing) if self.grad_checkpointing else blk(x, routing)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)

        prefix_tokens = [y[:, :self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == 'NCHW':
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates


def _checkpoint_filter_fn(state_dict: Dict[str, Any], model: MobileVMoE) -> Dict[str, torch.Tensor]:
    """timm's ViT filter (resampling of the position embedding and patch projection, train.py wrappers), and a
    dense ViT's weights made a Mobile V-MoE's: each MoE layer's experts start as copies of the dense MLP (sparse
    upcycling, Komatsuzaki et al., arXiv 2212.05055) and the router keeps its fresh initialisation."""
    state_dict = checkpoint_filter_fn(state_dict.get('state_dict', state_dict), model)
    own = model.state_dict()
    for k, v in list(state_dict.items()):
        if k in own and v.dim() + 1 == own[k].dim() and own[k].shape[1:] == v.shape:  # a dense MLP -> E experts
            state_dict[k] = v.unsqueeze(0).expand_as(own[k]).clone()
    for k, v in own.items():
        if k.endswith('.router.weight') and k not in state_dict:
            state_dict[k] = v
    return state_dict


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': .9,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': IMAGENET_INCEPTION_MEAN,
        'std': IMAGENET_INCEPTION_STD,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'paper_ids': 'arXiv:2309.04354',
        'paper_name': 'Mobile V-MoEs: Scaling Down Vision Transformers via Sparse Mixture-of-Experts',
        'license': 'apache-2.0',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'mobile_vmoe_vit_small_patch16_224.untrained': _cfg(),
    'mobile_vmoe_vit_tiny_patch16_224.untrained': _cfg(),
    'mobile_vmoe_vit_tiny_patch32_224.untrained': _cfg(),
    'mobile_vmoe_vit_12x128_patch32_224.untrained': _cfg(),
    'mobile_vmoe_vit_6x96_patch32_224.untrained': _cfg(),
    'mobile_vmoe_vit_xxs_patch3_36.untrained': _cfg(num_classes=100, input_size=(3, 36, 36), crop_pct=1.0),
})


def _create_mobile_vmoe(variant: str, pretrained: bool = False, **kwargs) -> MobileVMoE:
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        MobileVMoE,
        variant,
        pretrained,
        pretrained_filter_fn=_checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


@register_model
def mobile_vmoe_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> MobileVMoE:
    """Mobile V-MoE ViT-Small (the largest of the paper's sweep): 12 layers, 384 wide, 6 heads, patch 16; MoE in the
    last 2, 10 experts, k=2."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, moe_layers=2, num_experts=10, top_k=2)
    return _create_mobile_vmoe('mobile_vmoe_vit_small_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mobile_vmoe_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> MobileVMoE:
    """Mobile V-MoE ViT-Tiny (arXiv 2309.04354): 12 layers, 192 wide, 3 heads, MoE in the last 2, 10 experts, k=2
    (11.05M parameters, 6.31M of them touched per image: the paper's §3 figures)."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, moe_layers=2, num_experts=10, top_k=2)
    return _create_mobile_vmoe('mobile_vmoe_vit_tiny_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mobile_vmoe_vit_tiny_patch32_224(pretrained: bool = False, **kwargs) -> MobileVMoE:
    """Mobile V-MoE ViT-Tiny at patch 32, a quarter of ViT-Tiny/16's compute: 12 layers, 192 wide, 3 heads; MoE in
    the last 2, 10 experts, k=2."""
    model_args = dict(patch_size=32, embed_dim=192, depth=12, num_heads=3, moe_layers=2, num_experts=10, top_k=2)
    return _create_mobile_vmoe('mobile_vmoe_vit_tiny_patch32_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mobile_vmoe_vit_12x128_patch32_224(pretrained: bool = False, **kwargs) -> MobileVMoE:
    """A step of the paper's sweep below ViT-Tiny: 12 layers, 128 wide, 2 heads, patch 32; MoE in the last 2,
    10 experts, k=2."""
    model_args = dict(patch_size=32, embed_dim=128, depth=12, num_heads=2, moe_layers=2, num_experts=10, top_k=2)
    return _create_mobile_vmoe('mobile_vmoe_vit_12x128_patch32_224', pretrained=pretrained,
                               **dict(model_args, **kwargs))


@register_model
def mobile_vmoe_vit_6x96_patch32_224(pretrained: bool = False, **kwargs) -> MobileVMoE:
    """The small end of the paper's sweep ("only 54M FLOPs", counted as multiply-adds): 6 layers, 96 wide, 3
    heads, patch 32, 51 M multiply-adds per image for its dense twin; MoE in the last 2, 10 experts, k=2."""
    model_args = dict(patch_size=32, embed_dim=96, depth=6, num_heads=3, moe_layers=2, num_experts=10, top_k=2)
    return _create_mobile_vmoe('mobile_vmoe_vit_6x96_patch32_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mobile_vmoe_vit_xxs_patch3_36(pretrained: bool = False, **kwargs) -> MobileVMoE:
    """Mobile V-MoE with mLiT-XXS's input, patch, width and depth: 36x36, patch 3, 108 wide, 9 layers, 6 heads,
    MLP ratio 2; MoE in the last 2 layers, 10 experts, k=1."""
    model_args = dict(img_size=36, patch_size=3, embed_dim=108, depth=9, num_heads=6, mlp_ratio=2., moe_layers=2,
                      num_experts=10, top_k=1)
    return _create_mobile_vmoe('mobile_vmoe_vit_xxs_patch3_36', pretrained=pretrained, **dict(model_args, **kwargs))
