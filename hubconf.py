"""torch.hub entrypoints for the models of timm-mlit, mLiT and Mobile V-MoE (only ours, not the rest of timm's).

    model = torch.hub.load('<owner>/timm-mlit', 'mlit_xxs', pretrained=True)
    model = torch.hub.load('path/to/timm-mlit', 'mlit_xxs', source='local', pretrained=True)

Every keyword goes to timm.create_model: num_classes, in_chans, img_size, global_pool, drop_path_rate, a pretrained
tag (pretrained_cfg='mae_in_fashion_mnist'), ...
"""
import os as _os
import sys as _sys

dependencies = ['torch', 'timm', 'safetensors', 'huggingface_hub']

# torch.hub puts this folder first on sys.path while it imports hubconf, so the timm_mlit next to this file is the
# one imported (and registered with timm); the check keeps that true when hubconf is imported some other way
_repo_dir = _os.path.dirname(_os.path.abspath(__file__))
if _repo_dir not in _sys.path:
    _sys.path.insert(0, _repo_dir)
import timm as _timm  # noqa: E402

import timm_mlit as _timm_mlit  # noqa: E402, F401


def _create(name: str, pretrained: bool, **kwargs):
    return _timm.create_model(name, pretrained=pretrained, **kwargs)


def mlit_s(pretrained: bool = False, **kwargs):
    """mLiT-S (2.358M encoder params; paper: 2.36M): 144 wide, 15 layers, 8 heads / 4 KV groups."""
    return _create('mlit_s', pretrained, **kwargs)


def mlit_xs(pretrained: bool = False, **kwargs):
    """mLiT-XS (1.202M encoder params; paper: 1.21M): 128 wide, 12 layers, 8 heads / 4 KV groups."""
    return _create('mlit_xs', pretrained, **kwargs)


def mlit_xxs(pretrained: bool = False, **kwargs):
    """mLiT-XXS (0.651M encoder params; paper: 0.66M): 108 wide, 9 layers, 6 heads / 3 KV groups."""
    return _create('mlit_xxs', pretrained, **kwargs)


def mobile_vmoe_vit_tiny_patch16_224(pretrained: bool = False, **kwargs):
    """Mobile V-MoE ViT-Tiny (arXiv 2309.04354): 12 layers, 192 wide, MoE in the last 2, 10 experts, k=2."""
    return _create('mobile_vmoe_vit_tiny_patch16_224', pretrained, **kwargs)


def mobile_vmoe_vit_xxs_patch3_36(pretrained: bool = False, **kwargs):
    """Mobile V-MoE with mLiT-XXS's input, patch, width and depth (36x36, patch 3, 108 wide, 9 layers)."""
    return _create('mobile_vmoe_vit_xxs_patch3_36', pretrained, **kwargs)
