"""timm-mlit: the mLiT / mmLiT tiny mixture-of-experts vision transformers (arXiv 2407.17783) as timm models.

`import timm_mlit` registers `mlit_s`, `mlit_xs` and `mlit_xxs` with timm.
"""
from .mlit import MLiT, checkpoint_filter_fn, mlit_s, mlit_xs, mlit_xxs
from .mobile_vmoe import MobileVMoE, mobile_vmoe_vit_tiny_patch16_224, mobile_vmoe_vit_xxs_patch3_36

__version__ = '0.1.0'
