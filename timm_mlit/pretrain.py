""" mmLiT pre-training: masked-autoencoder training of an mLiT encoder (paper §2.2, §3.1, Table 3)

    timm-mlit-pretrain -c train_configs/pretrain/mmlit_xxs_cifar100.yaml --data-dir data/cifar100
    torchrun --nproc_per_node 2 -m timm_mlit.pretrain -c ... --device cpu
    timm-mlit-pretrain --export-only output/pretrain/RUN/last.pth.tar

Arguments come from a YAML file (-c) overridden by the command line; the names are those of timm's train.py where
the two overlap; every value, from the file or the command line, is checked before anything is written. Optimizer,
schedule and datasets come from timm's factories. Each epoch writes a checkpoint atomically (temporary file, fsync,
rename; the temporary files of a killed run are removed when the folder is used again) and keeps the last
--checkpoint-hist. --resume restores model, optimizer, loss scaler and the RNG state of every rank, and rebuilds
the learning-rate schedule from the arguments given now, stepped to the resume point (as timm's train.py does):
resuming with a larger --epochs extends the run on the longer schedule, and arguments that change the schedule
are named in a warning. Every sample's augmentation and mask are drawn from (seed, epoch, index)
(data.MAEPretrainDataset), so a run resumed with unchanged arguments repeats an uninterrupted one.

A run writes a folder of its own: where --output/--experiment names one that exists, NAME-1, NAME-2, ... (timm's
get_outdir(inc=True)); only --resume goes on in its checkpoint's folder. A run holds its folder (a lock the kernel
drops when the process ends): a second run on it stops with a one-line error. Outputs in the folder: args.yaml,
summary.csv (one row per epoch, as timm's train.py), expert_load.csv (each expert's share of the routing, ΣP of
eq. 5, per MoE layer per epoch), loss.png (every loss term of eq. 16 on log-log axes, the paper's Fig. 6) and
expert_load.png (one panel per MoE layer: each expert's share per epoch beside the even share), both redrawn after
every epoch, checkpoint-<epoch>.pth.tar, last.pth.tar, and at the end encoder.safetensors (its metadata records the
arch and the model kwargs): the head-less encoder for `timm.create_model(name, pretrained=True,
pretrained_cfg_overlay=dict(file=PATH, num_classes=0))` or timm's `train.py --pretrained-path PATH`.

Multi-process runs: the MoE gate noise and dropout draw from each rank's own RNG, and each rank's balance loss
(eq. 12) is a CV² over its own tokens; neither equals the single-process value. With the noise and dropout off and
β = 0, a run on n processes with batch b computes the same gradients as one process with batch n·b.

This file is the setup and the run (as mae's main_pretrain.py); its command line is pretrain_args.py, one epoch
engine.py, the checkpoints checkpoint.py.
"""
import logging
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple

import timm
import torch
import torch.distributed as dist
import torch.utils.data
import yaml
from timm.data import create_dataset, create_transform
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import NativeScaler, init_distributed_device, random_seed, setup_default_logging

from .checkpoint import (
    CHECKPOINT_FORMAT,
    export_encoder,
    load_pretrain_checkpoint,
    resume_training,
    rng_state,
    save_checkpoint,
)
from .cli import exit_on_error
from .data import MAEPretrainDataset, check_image_folder
from .engine import log_epoch, train_one_epoch
from .files import WriteError, atomic_write, check_writable_path, hold_folder, remove_stale_temporaries
from .mae import MaskedAutoencoderMLiT
from .mlit import MLiT
from .plots import truncate_csv
from .precision import run_amp_dtype
from .pretrain_args import check_args as _check_args
from .pretrain_args import parse_args as _parse_args

# train_one_epoch lives in engine.py, the checkpoint functions in checkpoint.py; importable from here as before
load_checkpoint = load_pretrain_checkpoint
__all__ = ['main', 'build_model', 'build_dataset', 'train_one_epoch', 'export_encoder', 'save_checkpoint',
           'load_checkpoint', 'PretrainError']

_logger = logging.getLogger(__name__)


class PretrainError(ValueError):
    """A request that cannot work (a model, dataset or resume point); `main` turns it into a one-line error."""


# ---------------------------------------------------------------- model, data

def build_model(args) -> MaskedAutoencoderMLiT:
    mlits = ', '.join(timm.list_models(module='mlit'))
    if not timm.is_model(args.model):
        raise PretrainError(f'unknown model {args.model!r}; mLiT models: {mlits}')
    if args.model not in timm.list_models(module='mlit'):
        raise PretrainError(f'{args.model} is not an mLiT model; mLiT models: {mlits}')
    if 'moe_loss_weight' in args.model_kwargs:
        raise PretrainError('--model-kwargs moe_loss_weight: the pre-training loss weighs the MoE balance losses '
                            'itself (eq. 16); set --beta instead')
    try:  # the MAE's β term is the only way the balance losses reach the gradients: no hook in the MoE layers
        encoder = timm.create_model(args.model, num_classes=0, moe_loss_weight=0., **args.model_kwargs)
    except (TypeError, ValueError) as e:
        raise PretrainError(f'cannot create {args.model} with {args.model_kwargs}: {e}')
    if not isinstance(encoder, MLiT):
        raise PretrainError(f'{args.model} is not an mLiT model; mLiT models: {mlits}')
    try:
        return MaskedAutoencoderMLiT(
            encoder, mask_ratio=args.mask_ratio, alpha=args.alpha, beta=args.beta, norm_pix_loss=args.norm_pix_loss,
            **args.mae_kwargs)
    except (TypeError, ValueError) as e:  # a bad --mask-ratio, a misspelt --mae-kwargs key
        raise PretrainError(f'cannot build the masked autoencoder: {e}')


def build_dataset(args, model: MaskedAutoencoderMLiT) -> MAEPretrainDataset:
    if args.data_dir and not os.path.isdir(args.data_dir):
        what = 'is a file, not a folder' if os.path.exists(args.data_dir) else 'does not exist'
        raise PretrainError(f'data dir {args.data_dir} {what}')
    check_image_folder(args.data_dir, args.dataset)  # timm's reader would skip an unreadable class folder
    if not args.data_dir and not args.dataset.lower().startswith(('torch/fashion_mnist', 'hfds/', 'hfids/', 'tfds/')):
        raise PretrainError('--data-dir is required for this dataset')
    try:
        ds = create_dataset(args.dataset, root=args.data_dir, split=args.train_split, is_training=True,
                            download=args.dataset_download, input_img_mode='RGB', seed=args.seed)
    except (OSError, RuntimeError, ValueError, AssertionError) as e:
        raise PretrainError(f'cannot open dataset {args.dataset or "(image folder)"} at {args.data_dir}: {e}')
    if args.train_num_samples:
        ds = torch.utils.data.Subset(ds, range(min(args.train_num_samples, len(ds))))
    img_size = model.encoder.img_size
    transform = create_transform(  # Table 3: RandomResizedCrop scale [0.6, 1], horizontal flip, normalise 0.5/0.5
        img_size, is_training=True, scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip, vflip=0.,
        # (ignore: timm's annotation leaves out None, which create_transform takes as "no colour jitter"; 0. would
        # still add a ColorJitter, which draws from the RNG)
        color_jitter=None,  # type: ignore[arg-type]
        interpolation=args.train_interpolation, mean=tuple(args.mean), std=tuple(args.std))
    return MAEPretrainDataset(ds, transform, model.num_patches, seed=args.seed)


# ---------------------------------------------------------------- setup: all checked before anything is written

@dataclass
class _Run:
    """What the epoch loop needs, built by `_setup`."""
    model: MaskedAutoencoderMLiT
    model_ddp: torch.nn.Module  # `model`, wrapped in DistributedDataParallel when distributed
    dataset: MAEPretrainDataset
    sampler: torch.utils.data.DistributedSampler
    loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    loss_scaler: Optional[NativeScaler]
    amp_autocast: Callable
    device: torch.device
    start_epoch: int
    num_epochs: int
    global_batch: int


def _load_resume(args, model: MaskedAutoencoderMLiT) -> Dict[str, Any]:
    """The --resume checkpoint, its weights loaded into `model`."""
    ckpt = load_pretrain_checkpoint(args.resume)
    if ckpt.get('arch') != args.model or ckpt.get('model_kwargs') != dict(args.model_kwargs):
        raise PretrainError(f'{args.resume} belongs to model {ckpt.get("arch")} {ckpt.get("model_kwargs")}, '
                            f'not {args.model} {dict(args.model_kwargs)}')
    try:
        model.load_state_dict(ckpt['state_dict'])
    except RuntimeError as e:
        raise PretrainError(f'{args.resume} does not fit this model: {e}') from None
    return ckpt


def _build_loader(args, dataset, device: torch.device):
    """(sampler, loader): every rank gets its part of one permutation per epoch."""
    sampler: torch.utils.data.DistributedSampler[int] = torch.utils.data.DistributedSampler(
        dataset, num_replicas=args.world_size, rank=args.rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers, drop_last=True,
        pin_memory=device.type == 'cuda', persistent_workers=False)  # workers must see set_epoch
    if len(loader) // args.grad_accum_steps == 0:
        raise PretrainError(f'{len(dataset)} samples are too few for batch {args.batch_size} x {args.world_size} '
                            f'processes x {args.grad_accum_steps} accumulation steps')
    return sampler, loader


def _amp(args, device: torch.device, ckpt: Optional[Dict[str, Any]]) -> Tuple[Callable, Optional[NativeScaler]]:
    """(autocast context factory, loss scaler): a scaler only for float16. `args.amp` / `args.amp_dtype` are set to
    the precision chosen, so that args.yaml and the checkpoints record it (and a resume keeps it)."""
    dtype, why = run_amp_dtype(device, args.amp, args.amp_dtype, ckpt.get('args') if ckpt else None)
    args.amp, args.amp_dtype = dtype is not None, None if dtype is None else str(dtype).split('.')[1]
    _logger.info(f'precision: {"float32" if dtype is None else args.amp_dtype + " autocast"} ({why})')
    if dtype is None:
        return nullcontext, None
    loss_scaler = NativeScaler(device=device.type) if dtype == torch.float16 else None
    return lambda: torch.autocast(device_type=device.type, dtype=dtype), loss_scaler


def _setup(args) -> _Run:
    """Build the model, data, optimizer and schedule (and resume), raising before anything is written."""
    device = init_distributed_device(args)
    random_seed(args.seed, args.rank)  # per-rank: MoE gate noise and dropout differ between ranks
    model = build_model(args)
    dataset = build_dataset(args, model)
    ckpt = _load_resume(args, model) if args.resume else None
    model.to(device)
    sampler, loader = _build_loader(args, dataset, device)
    updates_per_epoch = len(loader) // args.grad_accum_steps
    global_batch = args.batch_size * args.world_size * args.grad_accum_steps
    if args.lr is None:
        args.lr = args.lr_base * global_batch / args.lr_base_size  # eq. 17
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    amp_autocast, loss_scaler = _amp(args, device, ckpt)
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=True), updates_per_epoch=updates_per_epoch)
    args.num_epochs = num_epochs  # epochs + cooldown (+ warm-up as a prefix): for the time left
    start_epoch = 0
    if ckpt is not None:
        start_epoch = resume_training(ckpt, args, optimizer, lr_scheduler, loss_scaler, updates_per_epoch, num_epochs)
    model_ddp: torch.nn.Module = model
    if args.distributed:
        model_ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == 'cuda' else None)
    return _Run(model, model_ddp, dataset, sampler, loader, optimizer, lr_scheduler, loss_scaler, amp_autocast,
                device, start_epoch, num_epochs, global_batch)


def _hold_output(args) -> Tuple[str, TextIO]:
    """(the experiment folder, the lock holding it), on rank 0: never another run's (files.hold_folder)."""
    if args.resume and not (args.experiment or args.output):
        return hold_folder(os.path.dirname(os.path.abspath(args.resume)), resuming=args.resume)
    name = args.experiment or f'{datetime.now():%Y%m%d-%H%M%S}-{args.model}-mae'
    return hold_folder(os.path.join(args.output or os.path.join('output', 'pretrain'), name), resuming=args.resume)


def _plain_args(args) -> Dict[str, Any]:
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(args).items()}


def _prepare_output(args, run: _Run, output_dir: str):
    """Rank 0's experiment folder: stale temporaries removed, args.yaml written, the CSV logs cut back to the resume
    point."""
    remove_stale_temporaries(output_dir)
    atomic_write(os.path.join(output_dir, 'args.yaml'), lambda f: f.write(yaml.safe_dump(_plain_args(args)).encode()))
    for name in ('summary.csv', 'expert_load.csv'):
        truncate_csv(os.path.join(output_dir, name), run.start_epoch)
    model = run.model
    _logger.info(
        f'mmLiT pre-training {args.model}: {sum(p.numel() for p in model.encoder.parameters()) / 1e6:.2f}M encoder '
        f'+ {sum(p.numel() for p in model.decoder.parameters()) / 1e6:.2f}M decoder params, {len(run.dataset)} images, '
        f'{args.world_size} process(es), global batch {run.global_batch}, lr {args.lr:.3e}, '
        f'epochs {run.start_epoch}..{run.num_epochs - 1}, output {output_dir}')


def _gather_rng_states(args) -> list:
    """Every rank's RNG state, in rank order (on every rank)."""
    if not args.distributed:
        return [rng_state()]
    states: List[Any] = [None] * args.world_size
    dist.all_gather_object(states, rng_state())
    return states


def _run_epoch(args, run: _Run, epoch: int, output_dir: Optional[str]):
    """Train `epoch`; rank 0 logs it and writes its checkpoint in `output_dir` (None on the other ranks)."""
    run.dataset.set_epoch(epoch)
    run.sampler.set_epoch(epoch)
    metrics, shares = train_one_epoch(epoch, run.model_ddp, run.loader, run.optimizer, args, run.device,
                                      run.lr_scheduler, run.loss_scaler, run.amp_autocast)
    if run.lr_scheduler is not None:
        run.lr_scheduler.step(epoch + 1)
    rng = _gather_rng_states(args)
    if args.rank != 0:
        return
    assert output_dir is not None  # (rank 0 holds the experiment folder)
    log_epoch(output_dir, epoch, metrics, shares, run.optimizer.param_groups[0]['lr'])
    state = dict(
        format=CHECKPOINT_FORMAT, epoch=epoch, arch=args.model, model_kwargs=dict(args.model_kwargs),
        args=_plain_args(args), state_dict=run.model.state_dict(), optimizer=run.optimizer.state_dict(), rng=rng,
        metrics=metrics)
    if run.loss_scaler is not None:
        state['scaler'] = run.loss_scaler.state_dict()
    save_checkpoint(state, output_dir, epoch, args.checkpoint_hist)


def _export_only(args) -> int:
    ckpt = load_pretrain_checkpoint(args.export_only)
    path = args.export_path or os.path.join(os.path.dirname(os.path.abspath(args.export_only)), 'encoder.safetensors')
    check_writable_path(path, '--export-path')
    export_encoder(ckpt['state_dict'], path, arch=ckpt.get('arch', ''), model_kwargs=ckpt.get('model_kwargs'))
    _logger.info(f'Exported the {ckpt.get("arch")} encoder of {args.export_only} (epoch {ckpt["epoch"]}) to {path}')
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    setup_default_logging()
    args = _parse_args(argv)
    # every error of the request (PretrainError, CheckpointError, the argument checks) before anything is written
    with exit_on_error('timm-mlit-pretrain'):
        _check_args(args)
        if args.export_only:
            return _export_only(args)
        run = _setup(args)
        output_dir, lock = _hold_output(args) if args.rank == 0 else (None, nullcontext())

    with lock, exit_on_error('timm-mlit-pretrain', (WriteError,)):  # a full disk: one line, the last checkpoint kept
        if args.rank == 0:
            assert output_dir is not None  # (rank 0 holds the experiment folder)
            _prepare_output(args, run, output_dir)
        for epoch in range(run.start_epoch, run.num_epochs):
            _run_epoch(args, run, epoch, output_dir)
        if args.rank == 0:
            assert output_dir is not None
            export_path = args.export_path or os.path.join(output_dir, 'encoder.safetensors')
            path = export_encoder(run.model.state_dict(), export_path, arch=args.model, model_kwargs=args.model_kwargs)
            _logger.info(f'Done. Encoder exported to {path}; loss curve in {os.path.join(output_dir, "loss.png")}, '
                         f'expert load in {os.path.join(output_dir, "expert_load.png")}')
    if args.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == '__main__':
    sys.exit(main())
