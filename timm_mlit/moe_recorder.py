""" The MoE balance loss and expert shares of a training run that an unmodified timm train.py drives

`MoERecorder.watch(model)` hooks a model's forward; `end_epoch(epoch, folder)` gives the epoch's mean balance loss
(eq. 12 of arXiv 2407.17783, what `MLiT.moe_loss()` returns) and appends each MoE layer's expert shares to
`folder/expert_load.csv`. `timm_mlit.timm_patches` hands it train.py's model and epochs.
"""
import math
import os
from typing import List, Optional

import torch
import torch.nn as nn

from .layers import expert_shares, moe_stats, named_moe_layers
from .plots import append_expert_load

__all__ = ['MoERecorder', 'EXPERT_LOAD_CSV']

EXPERT_LOAD_CSV = 'expert_load.csv'


class MoERecorder:
    """The MoE balance loss and each MoE layer's expert shares of a model, per epoch, without touching the loop.

    `watch(model)` hooks the forward of the first model given that has MoE layers. After each of its forwards in
    training mode the hook adds what the layers recorded (`moe_stats`: the sum of their balance losses and each
    layer's load), on the model's device and without reading them back, so no step waits for the accelerator.
    `end_epoch(epoch, folder)` returns the mean loss over those forwards, appends each expert's share of its layer's
    load summed over the epoch to `folder/expert_load.csv` (columns epoch, layer, expert, share: what
    timm-mlit-pretrain writes) and starts the next epoch's sums.
    """

    def __init__(self) -> None:
        self.layer_names: Optional[List[str]] = None  # None until a model with MoE layers is watched
        self._start()

    def _start(self) -> None:
        self.steps = 0
        self._loss: Optional[torch.Tensor] = None
        self._loads: Optional[List[torch.Tensor]] = None

    def watch(self, model: nn.Module) -> nn.Module:
        """Hook `model` if it is the first model with MoE layers seen; return it."""
        if self.layer_names is not None:
            return model
        layer_names = [name for name, _ in named_moe_layers(model)]
        if not layer_names:
            return model
        self.layer_names = layer_names
        recorder = self

        def hook(module, args, output):
            # a copy of the model (an EMA) carries this hook too; only the watched model counts
            if module is model and module.training:
                with torch.no_grad():
                    recorder._record(moe_stats(module))

        model.register_forward_hook(hook)
        return model

    def _record(self, stats):
        """Add one training forward's loss and loads; a forward in which a layer recorded nothing is skipped."""
        assert self.layer_names is not None
        if stats is None or any(name not in stats.load for name in self.layer_names):
            return
        loss = stats.loss.detach()
        loads = [stats.load[name].float() for name in self.layer_names]
        self._loss = loss if self._loss is None else self._loss + loss
        self._loads = loads if self._loads is None else [a + b for a, b in zip(self._loads, loads)]
        self.steps += 1

    def end_epoch(self, epoch: int, folder: Optional[str] = None) -> Optional[float]:
        """The epoch's mean balance loss (nan if no training forward ran; None if no MoE model is watched), its
        expert shares appended to `folder/expert_load.csv` when a folder is given."""
        if self.layer_names is None:
            return None
        if self._loss is None or self._loads is None:
            self._start()
            return math.nan
        loss = (self._loss / self.steps).item()
        shares = [expert_shares(load).cpu().tolist() for load in self._loads]
        if folder is not None:
            append_expert_load(os.path.join(folder, EXPERT_LOAD_CSV), epoch, dict(zip(self.layer_names, shares)))
        self._start()
        return loss
