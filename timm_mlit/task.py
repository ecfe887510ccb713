""" Mobile V-MoE's super-class-guided router loss, as a timm training task

"Mobile V-MoEs", Daxberger et al., arXiv 2309.04354, §2.2: L = L_C + λ·L_g, where L_g is the cross-entropy between
the router's logits g(x) and the image's super-class, λ = 0.3. The labels that L_g needs never reach the model, so
the loss lives in the training loop: `SuperClassRouterTask` is timm's `ClassificationTask` (timm's train.py, 1.0.28 on,
builds one and calls `task(input, target)` for the loss) plus λ·L_g. `timm-mlit-run train.py --superclasses
FILE [--router-loss-weight 0.3]` puts it in train.py's hands, train.py's file unmodified (`timm_mlit.run`).

Under mixup / cutmix the class targets are soft [B, C] and the super-class targets are the class targets times the
class -> super-class matrix [C, E] (`superclass_targets`); hard targets [B] map to super-class indices.

The task also counts how often the router's top expert is the image's super-class (`RouterAccuracy`), which the
launcher writes to train.py's summary.csv as train_router_acc, and eval_router_acc for the validation images.
"""
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.task import ClassificationTask

from .layers import ImageRouter, image_routers, named_moe_layers
from .superclasses import RouterTaskError, SuperClasses

__all__ = ['SuperClassRouterTask', 'RouterAccuracy', 'RouterTaskError', 'superclass_targets', 'the_router']


def superclass_targets(target: torch.Tensor, class_to_super: torch.Tensor) -> torch.Tensor:
    """Super-class targets of class targets: indices [B] for indices [B], probabilities [B, E] for soft [B, C]."""
    if target.ndim == 1:
        return class_to_super.argmax(1)[target]
    if target.ndim == 2 and target.shape[1] == class_to_super.shape[0]:
        return target.float() @ class_to_super
    raise ValueError(f'class targets must be [B] indices or [B, {class_to_super.shape[0]}] probabilities, got shape '
                     f'{tuple(target.shape)}')


def the_router(model: nn.Module) -> ImageRouter:
    """The one per-image router of `model` (a Mobile V-MoE), whose logits the super-class loss reads."""
    routers = image_routers(model)
    if not routers and named_moe_layers(model):
        raise RouterTaskError(
            f'the super-class router loss needs one per-image router whose experts are the super-classes; '
            f'{type(model).__name__} routes in each of its MoE layers, whose expert counts differ (mLiT: 3, 4, 5), '
            f'so one super-class division cannot be every router\'s target (docs/mobile_vmoe.md): use a Mobile V-MoE')
    if len(routers) != 1:
        raise RouterTaskError(
            f'the super-class router loss needs a model with exactly one per-image router (a Mobile V-MoE such as '
            f'mobile_vmoe_vit_xxs_patch3_36 with moe_layers >= 1), found {len(routers)} in '
            f'{type(model).__name__}')
    return routers[0][1]


class RouterAccuracy:
    """Counts of images whose router's top expert is their super-class, kept on the device (no sync per step)."""

    def __init__(self):
        self.correct: Optional[torch.Tensor] = None
        self.total = 0

    def update(self, logits: torch.Tensor, super_target: torch.Tensor):
        if super_target.ndim == 2:
            super_target = super_target.argmax(1)  # under mixup: the larger share
        correct = (logits.argmax(1) == super_target).sum()
        self.correct = correct if self.correct is None else self.correct + correct
        self.total += super_target.shape[0]

    def compute_and_reset(self) -> Optional[float]:
        """The accuracy in % since the last call (None if nothing was counted)."""
        counts = torch.tensor([0. if self.correct is None else float(self.correct.item()), float(self.total)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # every rank's images
            counts = counts.to(self.correct.device if self.correct is not None else 'cpu')
            torch.distributed.all_reduce(counts)
        if not counts[1]:
            return None
        acc = 100. * float(counts[0]) / float(counts[1])
        self.correct, self.total = None, 0
        return acc


class SuperClassRouterTask(ClassificationTask):
    """timm's ClassificationTask with λ·CE(router logits, super-class) added to its loss (module docstring).

    Args:
        model: a model with one `ImageRouter` of E experts and `num_classes` = C.
        superclasses: the division of the C classes into E super-classes.
        router_loss_weight: λ (0.3 in the paper).
        **kwargs: ClassificationTask's (criterion, device, dtype, verbose, ...).

    The returned dict adds 'router_loss' (L_g, detached) to 'loss' (L_C + λ·L_g) and 'output'.
    """
    class_to_super: torch.Tensor  # a buffer

    def __init__(self, model: nn.Module, superclasses: SuperClasses, router_loss_weight: float = 0.3, **kwargs):
        router = the_router(model)
        num_classes = getattr(model, 'num_classes', None)
        if num_classes is not None and num_classes != superclasses.num_classes:
            raise RouterTaskError(
                f'the super-class file covers {superclasses.num_classes} classes, but the model has '
                f'num_classes={num_classes}')
        if router.num_experts != superclasses.num_superclasses:
            raise RouterTaskError(
                f'the super-class file has {superclasses.num_superclasses} super-classes, but the model\'s router has '
                f'{router.num_experts} experts: create the model with num_experts={superclasses.num_superclasses}')
        if not router_loss_weight >= 0:
            raise RouterTaskError(f'router_loss_weight must be >= 0, got {router_loss_weight}')
        super().__init__(model, **kwargs)
        self.router = [router]  # (in a list: not a submodule of the task, it is the model's)
        self.superclasses = superclasses
        self.router_loss_weight = router_loss_weight
        self.register_buffer('class_to_super', superclasses.matrix().to(self.device), persistent=False)
        self.train_accuracy = RouterAccuracy()

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        result = super().forward(input, target)
        logits = self.router[0].last_logits  # [B, E], from the forward just run
        assert logits is not None
        logits = logits.float()
        super_target = superclass_targets(target, self.class_to_super)
        router_loss = F.cross_entropy(logits, super_target)
        result['loss'] = result['loss'] + self.router_loss_weight * router_loss
        result['router_loss'] = router_loss.detach()
        with torch.no_grad():
            self.train_accuracy.update(logits, super_target)
        return result
