""" mmLiT pre-training: masked-autoencoder training of an mLiT encoder (paper §2.2, §3.1, Table 3)

    timm-mlit-pretrain -c train_configs/pretrain/mmlit_xxs_cifar100.yaml --data-dir data/cifar100
    torchrun --nproc_per_node 2 -m timm_mlit.pretrain -c ... --device cpu
    timm-mlit-pretrain --export-only output/pretrain/RUN/last.pth.tar

Arguments come from a YAML file (-c) overridden by the command line; the names are those of timm's train.py where
the two overlap. Optimizer, schedule and datasets come from timm's factories. Each epoch writes a checkpoint
atomically (temporary file, fsync, rename) and keeps the last --checkpoint-hist; --resume restores model,
optimizer, scheduler, loss scaler and the RNG state of every rank, and every sample's augmentation and mask are
drawn from (seed, epoch, index) (data.MAEPretrainDataset), so a resumed run repeats an uninterrupted one.

Outputs in the experiment folder: args.yaml, summary.csv (one row per epoch, as timm's train.py), expert_load.csv
(each expert's share of the routing, ΣP of eq. 5, per MoE layer per epoch), loss.png (log-log loss curve, the
paper's Fig. 6), checkpoint-<epoch>.pth.tar, last.pth.tar, and at the end encoder.safetensors: the head-less encoder for
`timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH, num_classes=0))` or timm's
`train.py --pretrained-path PATH`.

Multi-process runs: the MoE gate noise and dropout draw from each rank's own RNG, and each rank's balance loss
(eq. 12) is a CV² over its own tokens; neither equals the single-process value. With the noise and dropout off and
β = 0, a run on n processes with batch b computes the same gradients as one process with batch n·b.
"""
import argparse
import csv
import io
import logging
import os
import random
import re
import shutil
import sys
import time
from contextlib import nullcontext
from datetime import datetime
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import safetensors.torch
import timm
import torch
import torch.distributed as dist
import torch.utils.data
import yaml
from PIL import Image, ImageDraw
from timm.data import create_dataset, create_transform
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import (
    AverageMeter,
    NativeScaler,
    ParseKwargs,
    dispatch_clip_grad,
    init_distributed_device,
    random_seed,
    setup_default_logging,
    update_summary,
)

from .data import MAEPretrainDataset
from .layers import MoE
from .mae import MaskedAutoencoderMLiT
from .mlit import MLiT

__all__ = ['main', 'train_one_epoch', 'export_encoder', 'save_checkpoint', 'load_checkpoint', 'write_loss_plot']

_logger = logging.getLogger('timm_mlit.pretrain')
CHECKPOINT_FORMAT = 'timm-mlit-pretrain/1'

config_parser = argparse.ArgumentParser(description='Pre-training config', add_help=False)
config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                           help='YAML config file; the command line overrides its values')

parser = argparse.ArgumentParser(description='mmLiT masked-autoencoder pre-training', parents=[config_parser])
group = parser.add_argument_group('Model')
group.add_argument('--model', default='mlit_xxs', type=str, help='mLiT encoder (default: mlit_xxs)')
group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                   help='encoder kwargs, e.g. depth=3 noisy_gating=False')
group.add_argument('--mae-kwargs', nargs='*', default={}, action=ParseKwargs,
                   help='MaskedAutoencoderMLiT kwargs, e.g. decoder_moe_drop_rate=0 decoder_noisy_gating=False')
group.add_argument('--mask-ratio', default=0.75, type=float, help='fraction of patches masked')
group.add_argument('--alpha', default=0.1, type=float, help='weight of the MSE over unmasked patches (eq. 16)')
group.add_argument('--beta', default=0.5, type=float, help='weight of the MoE balance losses (eq. 16)')
group.add_argument('--norm-pix-loss', action='store_true', help='regress per-patch normalised pixels')

group = parser.add_argument_group('Data')
group.add_argument('--data-dir', default=None, type=str, help='dataset root')
group.add_argument('--dataset', default='', type=str,
                   help='timm dataset name: "" for an image folder, torch/cifar100, torch/fashion_mnist, ...')
group.add_argument('--train-split', default='train', type=str)
group.add_argument('--dataset-download', action='store_true', help='let torchvision datasets download')
group.add_argument('--train-num-samples', default=None, type=int, help='use only the first N samples')
group.add_argument('--scale', default=[0.6, 1.0], type=float, nargs=2, help='RandomResizedCrop scale (Table 3)')
group.add_argument('--ratio', default=[3. / 4., 4. / 3.], type=float, nargs=2, help='RandomResizedCrop ratio')
group.add_argument('--hflip', default=0.5, type=float, help='horizontal flip probability')
group.add_argument('--mean', default=[0.5, 0.5, 0.5], type=float, nargs='+', help='normalisation mean')
group.add_argument('--std', default=[0.5, 0.5, 0.5], type=float, nargs='+', help='normalisation std')
group.add_argument('--train-interpolation', default='bilinear', type=str)
group.add_argument('--workers', '-j', default=4, type=int, help='data loading processes per rank')

group = parser.add_argument_group('Optimization')
group.add_argument('--opt', default='adamw', type=str)
group.add_argument('--opt-eps', default=None, type=float)
group.add_argument('--opt-betas', default=None, type=float, nargs='+')
group.add_argument('--momentum', default=0.9, type=float)
group.add_argument('--weight-decay', default=0.05, type=float)
group.add_argument('--clip-grad', default=None, type=float, help='gradient clipping value (off by default)')
group.add_argument('--clip-mode', default='norm', type=str, help='norm, value or agc')
group.add_argument('--lr', default=None, type=float, help='default: lr_base · global batch / lr_base_size')
group.add_argument('--lr-base', default=3e-4, type=float, help='base learning rate (eq. 17)')
group.add_argument('--lr-base-size', default=256, type=int, help='batch size the base lr refers to')
group.add_argument('--sched', default='cosine', type=str)
group.add_argument('--sched-on-updates', default=True, action=argparse.BooleanOptionalAction,
                   help='step the schedule every optimizer update (default) rather than every epoch')
group.add_argument('--epochs', default=100, type=int)
group.add_argument('--warmup-epochs', default=5, type=int)
group.add_argument('--warmup-lr', default=1e-6, type=float)
group.add_argument('--warmup-prefix', action='store_true')
group.add_argument('--min-lr', default=0., type=float)
group.add_argument('--cooldown-epochs', default=0, type=int)
group.add_argument('-b', '--batch-size', default=256, type=int, help='batch size per process')
group.add_argument('--grad-accum-steps', default=1, type=int)

group = parser.add_argument_group('Run')
group.add_argument('--amp', default=False, action=argparse.BooleanOptionalAction, help='mixed precision (autocast)')
group.add_argument('--amp-dtype', default='float16', type=str, help='float16 (CUDA, with a loss scaler) or bfloat16')
group.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', type=str)
group.add_argument('--dist-backend', default=None, type=str, help='default: nccl on CUDA, gloo on CPU')
group.add_argument('--seed', default=42, type=int)
group.add_argument('--output', default='', type=str, help='root of the experiment folders (./output/pretrain)')
group.add_argument('--experiment', default='', type=str, help='experiment folder name')
group.add_argument('--resume', default='', type=str, help='checkpoint to continue from')
group.add_argument('--checkpoint-hist', default=10, type=int, help='number of epoch checkpoints kept')
group.add_argument('--log-interval', default=50, type=int, help='optimizer updates between log lines')
group.add_argument('--export-only', default='', type=str, metavar='CHECKPOINT',
                   help='export the encoder of this checkpoint as safetensors and exit')
group.add_argument('--export-path', default='', type=str, help='where to write the encoder (.safetensors)')
_DEFAULTS = {a.dest: a.default for a in parser._actions if a.dest != 'help'}


class PretrainError(SystemExit):
    """A clear, user-facing error: exits with a message and status 1."""

    def __init__(self, msg: str):
        super().__init__(f'timm-mlit-pretrain: error: {msg}')


def _parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args_config, remaining = config_parser.parse_known_args(argv)
    defaults = {}
    if args_config.config:
        try:
            with open(args_config.config) as f:
                cfg = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            parser.error(f'cannot read config {args_config.config}: {e}')
        if not isinstance(cfg, dict):
            parser.error(f'config {args_config.config} must be a mapping of argument names to values')
        known = {a.dest for a in parser._actions}
        cfg = {k.replace('-', '_'): v for k, v in cfg.items()}
        unknown = sorted(k for k in cfg if k not in known)
        if unknown:
            verb = 'is not an argument' if len(unknown) == 1 else 'are not arguments'
            parser.error(f'config {args_config.config}: {", ".join(unknown)} {verb}')
        defaults = cfg
    parser.set_defaults(**_DEFAULTS)  # a config read by an earlier main() call must not leak into this one
    parser.set_defaults(**defaults)
    return parser.parse_args(remaining)


# ---------------------------------------------------------------- model, data

def build_model(args) -> MaskedAutoencoderMLiT:
    mlits = ', '.join(timm.list_models(module='mlit'))
    if not timm.is_model(args.model):
        raise PretrainError(f'unknown model {args.model!r}; mLiT models: {mlits}')
    if args.model not in timm.list_models(module='mlit'):
        raise PretrainError(f'{args.model} is not an mLiT model; mLiT models: {mlits}')
    try:
        encoder = timm.create_model(args.model, num_classes=0, **args.model_kwargs)
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
        raise PretrainError(f'data dir {args.data_dir} does not exist')
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
        color_jitter=None, interpolation=args.train_interpolation, mean=tuple(args.mean), std=tuple(args.std))
    return MAEPretrainDataset(ds, transform, model.num_patches, seed=args.seed)


# ---------------------------------------------------------------- checkpoints

def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = dict(
        torch=torch.get_rng_state(), python=random.getstate(),
        numpy=(np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]))
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]):
    torch.set_rng_state(state['torch'])
    random.setstate(state['python'])
    name, keys, *rest = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _atomic_write(write_fn, path: str):
    """Write through `write_fn(file)` to a temporary file, fsync it, and rename it over `path`."""
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(state: Dict[str, Any], output_dir: str, epoch: int, keep: int) -> str:
    """Write checkpoint-<epoch>.pth.tar and last.pth.tar atomically; keep the newest `keep` epoch checkpoints."""
    path = os.path.join(output_dir, f'checkpoint-{epoch}.pth.tar')
    _atomic_write(lambda f: torch.save(state, f), path)
    last = os.path.join(output_dir, 'last.pth.tar')
    tmp = f'{last}.tmp.{os.getpid()}'
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(path, tmp)  # no second copy on disk
    except OSError:  # a filesystem without hard links
        shutil.copyfile(path, tmp)
    os.replace(tmp, last)
    found = []
    for name in os.listdir(output_dir):
        m = re.fullmatch(r'checkpoint-(\d+)\.pth\.tar', name)
        if m:
            found.append((int(m.group(1)), name))
    for _, name in sorted(found)[:-keep] if keep > 0 else []:
        os.remove(os.path.join(output_dir, name))
    return path


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read a pre-training checkpoint, or raise PretrainError saying why it cannot be used."""
    if not os.path.isfile(path):
        raise PretrainError(f'checkpoint {path} does not exist')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise PretrainError(f'checkpoint {path} is unreadable (damaged or not a torch file): {e}')
    if not isinstance(ckpt, dict) or ckpt.get('format') != CHECKPOINT_FORMAT:
        raise PretrainError(f'{path} is not a timm-mlit pre-training checkpoint')
    return ckpt


def export_encoder(state_dict: Dict[str, torch.Tensor], path: str, arch: str = '') -> str:
    """Save the encoder of an MAE state dict, head-less, as a safetensors file timm's loaders read."""
    tensors = {k[len('encoder.'):]: v.detach().cpu().contiguous() for k, v in state_dict.items()
               if k.startswith('encoder.')}
    if not tensors:
        raise PretrainError('the checkpoint holds no encoder weights')
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    metadata = {'format': 'pt', 'arch': arch, 'source': 'timm-mlit mmLiT pre-training'}
    _atomic_write(lambda f: f.write(safetensors.torch.save(tensors, metadata=metadata)), path)
    return path


# ---------------------------------------------------------------- the loss curve (Pillow: no matplotlib needed)

def write_loss_plot(path: str, epochs: Sequence[float], losses: Sequence[float], size: Tuple[int, int] = (480, 320)):
    """Loss against epoch on log-log axes with a grid and labels at every decade (the paper's Fig. 6), as a PNG."""
    pts = [(float(e), float(v)) for e, v in zip(epochs, losses) if e > 0 and v > 0 and np.isfinite(v)]
    if not pts:
        return
    W, H = size
    left, right, top, bottom = 44, 12, 10, 22
    lx = np.log10([p[0] for p in pts])
    ly = np.log10([p[1] for p in pts])
    x0, x1 = np.floor(lx.min()), max(np.ceil(lx.max()), np.floor(lx.min()) + 1)
    y0, y1 = np.floor(ly.min()), max(np.ceil(ly.max()), np.floor(ly.min()) + 1)

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (W - left - right),
                H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom))

    img = Image.new('RGB', (W, H), 'white')
    draw = ImageDraw.Draw(img)
    for d in range(int(x0), int(x1) + 1):  # vertical grid: decades dark, 2..9 light
        for m in range(1, 10) if d < x1 else (1,):
            x = px(d + np.log10(m), y0)[0]
            draw.line([(x, top), (x, H - bottom)], fill=(200, 200, 200) if m == 1 else (235, 235, 235))
        draw.text((px(d, y0)[0] - 8, H - bottom + 6), f'1e{d}', fill='black')
    for d in range(int(y0), int(y1) + 1):
        for m in range(1, 10) if d < y1 else (1,):
            y = px(x0, d + np.log10(m))[1]
            draw.line([(left, y), (W - right, y)], fill=(200, 200, 200) if m == 1 else (235, 235, 235))
        draw.text((2, px(x0, d)[1] - 5), f'1e{d}', fill='black')
    draw.line([(left, top), (left, H - bottom), (W - right, H - bottom)], fill='black')
    draw.line([px(x, y) for x, y in zip(lx, ly)] if len(pts) > 1 else [px(lx[0], ly[0])] * 2,
              fill=(31, 119, 180), width=2)
    _atomic_write(lambda f: img.save(f, format='PNG'), path)


# ---------------------------------------------------------------- training

def _reduce_mean(values: Dict[str, torch.Tensor], distributed: bool) -> Dict[str, float]:
    t = torch.stack([v.float() for v in values.values()])
    if distributed:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(values.keys(), t.tolist()))


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
    mae = model.module if hasattr(model, 'module') else model
    moe_names = [n for n, m in mae.named_modules() if isinstance(m, MoE)]
    model.train()
    accum = args.grad_accum_steps
    updates_per_epoch = len(loader) // accum
    num_updates = epoch * updates_per_epoch
    sums = {k: torch.zeros((), device=device) for k in ('loss', 'loss_masked', 'loss_unmasked', 'loss_moe')}
    loads: Optional[List[torch.Tensor]] = None
    rate = AverageMeter()
    world = args.world_size
    optimizer.zero_grad(set_to_none=True)
    t_log = time.time()
    n_micro = updates_per_epoch * accum
    for i, (imgs, noise) in enumerate(loader):
        if i >= n_micro:
            break
        need_update = (i + 1) % accum == 0
        imgs, noise = imgs.to(device, non_blocking=True), noise.to(device, non_blocking=True)
        sync = model.no_sync if args.distributed and not need_update else nullcontext
        with sync():
            with amp_autocast():
                out = model(imgs, noise)
            loss = out.loss / accum
            if loss_scaler is not None:
                loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                            parameters=model.parameters(), need_update=need_update)
            else:
                loss.backward()
                if need_update:
                    if args.clip_grad is not None:
                        dispatch_clip_grad(model.parameters(), args.clip_grad, mode=args.clip_mode)
                    optimizer.step()
        for k in sums:
            sums[k] += getattr(out, k).detach()
        step_loads = [ld.detach() for ld in mae.expert_load()]
        loads = step_loads if loads is None else [a + b for a, b in zip(loads, step_loads)]
        if not need_update:
            continue
        optimizer.zero_grad(set_to_none=True)
        num_updates += 1
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)
        update_idx = (i + 1) // accum
        if update_idx % args.log_interval == 0 or update_idx == updates_per_epoch:
            elapsed = time.time() - t_log
            n_imgs = imgs.shape[0] * accum * world * (update_idx - rate.count)
            rate.update(n_imgs / max(elapsed, 1e-9), update_idx - rate.count)
            m = _reduce_mean({k: v / (i + 1) for k, v in sums.items()}, args.distributed)
            if args.rank == 0:
                _logger.info(
                    f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch}] loss {m["loss"]:.5f} '
                    f'(masked {m["loss_masked"]:.5f} unmasked {m["loss_unmasked"]:.5f} moe {m["loss_moe"]:.5f}) '
                    f'lr {optimizer.param_groups[0]["lr"]:.3e} {n_imgs / max(elapsed, 1e-9):.1f} img/s')
            t_log = time.time()
    metrics = _reduce_mean({k: v / max(n_micro, 1) for k, v in sums.items()}, args.distributed)
    metrics['img_per_sec'] = rate.avg
    shares = {}
    if loads is not None:
        for name, ld in zip(moe_names, loads):
            if args.distributed:
                dist.all_reduce(ld)
            shares[name] = (ld / ld.sum().clamp_min(1e-12)).cpu()
    return metrics, shares


def _write_expert_load(path: str, epoch: int, shares: Dict[str, torch.Tensor]):
    new = not os.path.exists(path)
    with open(path, 'a', newline='') as f:
        w = csv.writer(f)
        if new:
            w.writerow(['epoch', 'layer', 'expert', 'share'])
        for name, s in shares.items():
            for j, v in enumerate(s.tolist()):
                w.writerow([epoch, name, j, f'{v:.6f}'])


def _truncate_csv(path: str, start_epoch: int):
    """Drop the rows of epochs that a resumed run will train again."""
    if not os.path.exists(path):
        return
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(float(r[0])) < start_epoch]
    text = io.StringIO()
    csv.writer(text, lineterminator='\n').writerows(kept)
    _atomic_write(lambda f: f.write(text.getvalue().encode()), path)


def _read_losses(path: str) -> Tuple[List[float], List[float]]:
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    return [int(r['epoch']) + 1 for r in rows], [float(r['train_loss']) for r in rows]


def _export_only(args) -> int:
    ckpt = load_checkpoint(args.export_only)
    path = args.export_path or os.path.join(os.path.dirname(os.path.abspath(args.export_only)), 'encoder.safetensors')
    export_encoder(ckpt['state_dict'], path, arch=ckpt.get('arch', ''))
    _logger.info(f'Exported the {ckpt.get("arch")} encoder of {args.export_only} (epoch {ckpt["epoch"]}) to {path}')
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    setup_default_logging()
    args = _parse_args(argv)
    if args.export_only:
        return _export_only(args)
    if args.grad_accum_steps < 1:
        raise PretrainError('--grad-accum-steps must be at least 1')

    # everything that can be wrong with the request is checked before anything is written
    device = init_distributed_device(args)
    if args.amp and args.amp_dtype not in ('float16', 'bfloat16'):
        raise PretrainError(f'--amp-dtype must be float16 or bfloat16, got {args.amp_dtype}')
    if args.amp and args.amp_dtype == 'float16' and device.type == 'cpu':
        raise PretrainError('float16 autocast needs CUDA; on CPU use --amp-dtype bfloat16')
    random_seed(args.seed, args.rank)  # per-rank: MoE gate noise and dropout differ between ranks
    model = build_model(args)
    dataset = build_dataset(args, model)
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        if ckpt.get('arch') != args.model or ckpt.get('model_kwargs') != dict(args.model_kwargs):
            raise PretrainError(f'{args.resume} belongs to model {ckpt.get("arch")} {ckpt.get("model_kwargs")}, '
                                f'not {args.model} {dict(args.model_kwargs)}')
        try:
            model.load_state_dict(ckpt['state_dict'])
        except RuntimeError as e:
            raise PretrainError(f'{args.resume} does not fit this model: {e}')
    model.to(device)

    world = args.world_size
    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=world, rank=args.rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers, drop_last=True,
        pin_memory=device.type == 'cuda', persistent_workers=False)  # workers must see set_epoch
    updates_per_epoch = len(loader) // args.grad_accum_steps
    if updates_per_epoch == 0:
        raise PretrainError(f'{len(dataset)} samples are too few for batch {args.batch_size} x {world} processes x '
                            f'{args.grad_accum_steps} accumulation steps')
    global_batch = args.batch_size * world * args.grad_accum_steps
    if args.lr is None:
        args.lr = args.lr_base * global_batch / args.lr_base_size  # eq. 17
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    amp_autocast, loss_scaler = nullcontext, None
    if args.amp:
        dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
        amp_autocast = lambda: torch.autocast(device_type=device.type, dtype=dtype)  # noqa: E731
        if dtype == torch.float16:
            loss_scaler = NativeScaler(device=device.type)
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=True), updates_per_epoch=updates_per_epoch)

    start_epoch = 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt['optimizer'])
        lr_scheduler.load_state_dict(ckpt['scheduler'])
        if loss_scaler is not None and 'scaler' in ckpt:
            loss_scaler.load_state_dict(ckpt['scaler'])
        rng = ckpt['rng']
        if len(rng) == world:
            _set_rng_state(rng[args.rank])
        else:
            _logger.warning(f'{args.resume} was written by {len(rng)} processes, not {world}: RNG states re-seeded')
            random_seed(args.seed + ckpt['epoch'] + 1, args.rank)
        start_epoch = ckpt['epoch'] + 1

    model_ddp = model
    if args.distributed:
        model_ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == 'cuda' else None)

    output_dir = None
    if args.rank == 0:
        if args.resume and not args.experiment and not args.output:
            output_dir = os.path.dirname(os.path.abspath(args.resume))
        else:
            name = args.experiment or f'{datetime.now():%Y%m%d-%H%M%S}-{args.model}-mae'
            output_dir = os.path.join(args.output or os.path.join('output', 'pretrain'), name)
        os.makedirs(output_dir, exist_ok=True)
        _atomic_write(lambda f: f.write(yaml.safe_dump(
            {k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(args).items()}).encode()),
            os.path.join(output_dir, 'args.yaml'))
        for name in ('summary.csv', 'expert_load.csv'):
            _truncate_csv(os.path.join(output_dir, name), start_epoch)
        _logger.info(
            f'mmLiT pre-training {args.model}: {sum(p.numel() for p in model.encoder.parameters()) / 1e6:.2f}M encoder '
            f'+ {sum(p.numel() for p in model.decoder.parameters()) / 1e6:.2f}M decoder params, {len(dataset)} images, '
            f'{world} process(es), global batch {global_batch}, lr {args.lr:.3e}, '
            f'epochs {start_epoch}..{num_epochs - 1}, output {output_dir}')

    for epoch in range(start_epoch, num_epochs):
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        metrics, shares = train_one_epoch(
            epoch, model_ddp, loader, optimizer, args, device, lr_scheduler, loss_scaler, amp_autocast)
        lr_scheduler.step(epoch + 1)
        rng = [_rng_state()]
        if args.distributed:
            rng = [None] * world
            dist.all_gather_object(rng, _rng_state())
        if args.rank != 0:
            continue
        min_share = min((float(s.min()) * len(s) for s in shares.values()), default=1.)
        if min_share < 0.1:
            _logger.warning(f'epoch {epoch}: an expert gets {min_share:.3f}x its even share of the routing (collapse?)')
        metrics['min_expert_share'] = min_share  # least-used expert's share relative to an even split
        summary = os.path.join(output_dir, 'summary.csv')
        update_summary(epoch, metrics, None, summary, lr=optimizer.param_groups[0]['lr'],
                       write_header=not os.path.exists(summary) or os.path.getsize(summary) == 0)  # timm < 1.0.31
        _write_expert_load(os.path.join(output_dir, 'expert_load.csv'), epoch, shares)
        state = dict(
            format=CHECKPOINT_FORMAT, epoch=epoch, arch=args.model, model_kwargs=dict(args.model_kwargs),
            state_dict=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=lr_scheduler.state_dict(),
            rng=rng, metrics=metrics)
        if loss_scaler is not None:
            state['scaler'] = loss_scaler.state_dict()
        save_checkpoint(state, output_dir, epoch, args.checkpoint_hist)

    if args.rank == 0:
        summary = os.path.join(output_dir, 'summary.csv')
        if os.path.exists(summary):
            write_loss_plot(os.path.join(output_dir, 'loss.png'), *_read_losses(summary))
        path = export_encoder(model.state_dict(), args.export_path or os.path.join(output_dir, 'encoder.safetensors'),
                              arch=args.model)
        _logger.info(f'Done. Encoder exported to {path}; loss curve in {os.path.join(output_dir, "loss.png")}')
    if args.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == '__main__':
    sys.exit(main())
