"""One epoch of mmLiT pre-training (eq. 16, paper §2.2) and its logs, as facebookresearch/mae's engine_pretrain.py.

`train_one_epoch` runs the optimizer over one pass of the loader (with gradient accumulation, a loss scaler or
gradient clipping where asked) and returns the epoch's mean losses and each expert's share of the routing per MoE
layer (from the loads `moe_stats` reports), both over every rank; `log_epoch` appends them to summary.csv /
expert_load.csv and redraws the plots.
"""
import logging
import os
import time
from contextlib import nullcontext
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.utils.data
from timm.utils import AverageMeter, NativeScaler, dispatch_clip_grad, update_summary

from .layers import expert_shares, moe_stats
from .plots import append_expert_load, plot_expert_load, plot_losses

__all__ = ['train_one_epoch', 'log_epoch']

_logger = logging.getLogger(__name__)
_LOSSES = ('loss', 'loss_masked', 'loss_unmasked', 'loss_moe')  # the terms of eq. 16, as MAEOutput names them


def _reduce_mean(values: Dict[str, torch.Tensor], distributed: bool) -> Dict[str, float]:
    t = torch.stack([v.float() for v in values.values()])
    if distributed:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(values.keys(), t.tolist()))


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def _backward(model, loss: torch.Tensor, optimizer, args, loss_scaler: Optional[NativeScaler], need_update: bool):
    """Accumulate the gradients of `loss`; on the last micro-batch of an update, clip and step."""
    if loss_scaler is not None:
        loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                    parameters=model.parameters(), need_update=need_update)
        return
    loss.backward()
    if need_update:
        if args.clip_grad is not None:
            dispatch_clip_grad(model.parameters(), args.clip_grad, mode=args.clip_mode)
        optimizer.step()


def _add_load(loads: Dict[str, torch.Tensor], mae: torch.nn.Module):
    """Add each MoE layer's raw load of the last forward to `loads` (layer name -> [t])."""
    stats = moe_stats(mae)
    for name, load in (stats.load if stats is not None else {}).items():
        loads[name] = loads.get(name, 0.) + load.float()  # a new tensor: the layer's own is left alone


def _shares(loads: Dict[str, torch.Tensor], distributed: bool) -> Dict[str, torch.Tensor]:
    """Each expert's share of its layer's routing over the epoch, over every rank."""
    shares = {}
    for name, load in loads.items():
        if distributed:
            dist.all_reduce(load)
        shares[name] = expert_shares(load).cpu()
    return shares


def _log_progress(epoch: int, update_idx: int, updates_per_epoch: int, num_epochs: int, m: Dict[str, float],
                  lr: float, img_per_sec: float, per_update: float):
    left_epoch = per_update * (updates_per_epoch - update_idx)
    left_run = left_epoch + per_update * updates_per_epoch * (num_epochs - epoch - 1)
    _logger.info(
        f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} ({100. * update_idx / updates_per_epoch:>3.0f}%)] '
        f'loss {m["loss"]:.5f} (masked {m["loss_masked"]:.5f} unmasked {m["loss_unmasked"]:.5f} '
        f'moe {m["loss_moe"]:.5f}) lr {lr:.3e} {img_per_sec:.1f} img/s, time left: epoch {_hms(left_epoch)}, '
        f'run {_hms(left_run)}')


def train_one_epoch(
        epoch: int,
        model: torch.nn.Module,
        loader: torch.utils.data.DataLoader,
        optimizer: torch.optim.Optimizer,
        args,
        device: torch.device,
        lr_scheduler=None,
        loss_scaler: Optional[NativeScaler] = None,
        amp_autocast=nullcontext,
) -> Tuple[Dict[str, float], Dict[str, torch.Tensor]]:
    """One epoch of eq. 16. Returns the epoch's mean metrics and each expert's share of the routing per MoE layer."""
    mae = getattr(model, 'module', model)  # (unwrapped from DistributedDataParallel)
    model.train()
    accum = args.grad_accum_steps
    updates_per_epoch = len(loader) // accum
    n_micro = updates_per_epoch * accum  # the micro-batches of a partial last update are left out
    num_updates = epoch * updates_per_epoch
    sums = {k: torch.zeros((), device=device) for k in _LOSSES}
    loads: Dict[str, torch.Tensor] = {}
    rate = AverageMeter()
    optimizer.zero_grad(set_to_none=True)
    t_log = t_start = time.time()
    for i, (imgs, noise) in enumerate(loader):
        if i >= n_micro:
            break
        need_update = (i + 1) % accum == 0
        imgs, noise = imgs.to(device, non_blocking=True), noise.to(device, non_blocking=True)
        sync = model.no_sync if args.distributed and not need_update else nullcontext
        with sync():  # type: ignore[operator]  # (no_sync: model is a DistributedDataParallel then)
            with amp_autocast():
                out = model(imgs, noise)
            _backward(model, out.loss / accum, optimizer, args, loss_scaler, need_update)
        for k in sums:
            sums[k] += getattr(out, k).detach()
        _add_load(loads, mae)
        if not need_update:
            continue
        optimizer.zero_grad(set_to_none=True)
        num_updates += 1
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)
        update_idx = (i + 1) // accum
        if update_idx % args.log_interval == 0 or update_idx == updates_per_epoch:
            now = time.time()
            n_imgs = imgs.shape[0] * accum * args.world_size * (update_idx - rate.count)
            rate.update(n_imgs / max(now - t_log, 1e-9), update_idx - rate.count)
            m = _reduce_mean({k: v / (i + 1) for k, v in sums.items()}, args.distributed)
            if args.rank == 0:
                _log_progress(epoch, update_idx, updates_per_epoch, getattr(args, 'num_epochs', epoch + 1), m,
                              optimizer.param_groups[0]['lr'], n_imgs / max(now - t_log, 1e-9),
                              (now - t_start) / update_idx)
            t_log = time.time()
    metrics = _reduce_mean({k: v / max(n_micro, 1) for k, v in sums.items()}, args.distributed)
    metrics['img_per_sec'] = rate.avg
    return metrics, _shares(loads, args.distributed)


def log_epoch(output_dir: str, epoch: int, metrics: Dict[str, float], shares: Dict[str, torch.Tensor], lr: float):
    """summary.csv and expert_load.csv rows of `epoch`, and the plots redrawn from them."""
    min_share = min((float(s.min()) * len(s) for s in shares.values()), default=1.)
    if min_share < 0.1:
        _logger.warning(f'epoch {epoch}: an expert gets {min_share:.3f}x its even share of the routing (collapse?)')
    metrics['min_expert_share'] = min_share  # least-used expert's share relative to an even split
    summary = os.path.join(output_dir, 'summary.csv')
    update_summary(epoch, metrics, None, summary, lr=lr,
                   write_header=not os.path.exists(summary) or os.path.getsize(summary) == 0)  # timm < 1.0.31
    load_csv = os.path.join(output_dir, 'expert_load.csv')
    append_expert_load(load_csv, epoch, {name: sh.tolist() for name, sh in shares.items()})
    try:  # a plot is a view of the logs: never worth losing the run over
        plot_losses(summary, os.path.join(output_dir, 'loss.png'), title='mmLiT pre-training loss (eq. 16)')
        plot_expert_load(load_csv, os.path.join(output_dir, 'expert_load.png'))
    except Exception as e:
        _logger.warning(f'could not draw the plots: {type(e).__name__}: {e}')
