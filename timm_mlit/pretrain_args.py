""" The command line of timm-mlit-pretrain: its options (a YAML config file's values as their defaults, as timm's
train.py reads `-c`) and the check of every value before anything is built or written. `pretrain.py` runs what they
describe.
"""
import argparse
import math
import os
from typing import Optional, Sequence, Tuple

import timm.optim
import torch
import yaml
from timm.scheduler import create_scheduler_v2
from timm.utils import ParseKwargs

from . import __version__
from ._checks import check_device
from .cli import HelpFormatter
from .files import check_writable_path
from .recipes import resolve_recipe

__all__ = ['build_parser', 'parse_args', 'check_args']


def _add_model_args(parser: argparse.ArgumentParser):
    """The encoder and the masked autoencoder around it (eq. 16)."""
    group = parser.add_argument_group('Model')
    group.add_argument('--model', default='mlit_xxs', type=str, help='mLiT encoder: mlit_s, mlit_xs or mlit_xxs')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='encoder kwargs, e.g. depth=3 noisy_gating=False')
    group.add_argument('--mae-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='MaskedAutoencoderMLiT kwargs, e.g. decoder_moe_drop_rate=0 decoder_noisy_gating=False')
    group.add_argument('--mask-ratio', default=0.75, type=float, help='fraction of patches masked')
    group.add_argument('--alpha', default=0.1, type=float, help='weight of the MSE over unmasked patches (eq. 16)')
    group.add_argument('--beta', default=0.5, type=float, help='weight of the MoE balance losses (eq. 16)')
    group.add_argument('--norm-pix-loss', action='store_true', help='regress per-patch normalised pixels')


def _add_data_args(parser: argparse.ArgumentParser):
    """Dataset and augmentation (Table 3)."""
    group = parser.add_argument_group('Data')
    group.add_argument('--data-dir', default=None, type=str, help='dataset root')
    group.add_argument('--dataset', default='', type=str,
                       help='timm dataset name: "" for an image folder, torch/cifar100, torch/fashion_mnist, ...')
    group.add_argument('--train-split', default='train', type=str, help='dataset split to train on')
    group.add_argument('--dataset-download', action='store_true', help='let torchvision datasets download')
    group.add_argument('--train-num-samples', default=None, type=int, help='use only the first N samples')
    group.add_argument('--scale', default=[0.6, 1.0], type=float, nargs=2, help='RandomResizedCrop scale (Table 3)')
    group.add_argument('--ratio', default=[3. / 4., 4. / 3.], type=float, nargs=2,
                       help='RandomResizedCrop aspect ratio range')
    group.add_argument('--hflip', default=0.5, type=float, help='horizontal flip probability')
    group.add_argument('--mean', default=[0.5, 0.5, 0.5], type=float, nargs='+', help='normalisation mean')
    group.add_argument('--std', default=[0.5, 0.5, 0.5], type=float, nargs='+', help='normalisation std')
    group.add_argument('--train-interpolation', default='bilinear', type=str,
                       help='resize interpolation of the crop: bilinear, bicubic, nearest')
    group.add_argument('--workers', '-j', default=4, type=int, help='data loading processes per rank')


def _add_optimization_args(parser: argparse.ArgumentParser):
    """Optimizer and schedule, named as in timm's train.py."""
    group = parser.add_argument_group('Optimization')
    group.add_argument('--opt', default='adamw', type=str, help="optimizer, any of timm's (timm.optim)")
    group.add_argument('--opt-eps', default=None, type=float, help="optimizer epsilon (default: the optimizer's)")
    group.add_argument('--opt-betas', default=None, type=float, nargs='+',
                       help="optimizer betas (default: the optimizer's)")
    group.add_argument('--momentum', default=0.9, type=float, help='momentum of SGD-like optimizers')
    group.add_argument('--weight-decay', default=0.05, type=float, help='weight decay')
    group.add_argument('--clip-grad', default=None, type=float, help='gradient clipping value (off by default)')
    group.add_argument('--clip-mode', default='norm', type=str, help='gradient clipping mode: norm, value or agc')
    group.add_argument('--lr', default=None, type=float, help='learning rate (default: lr_base x global batch / '
                                                                'lr_base_size)')
    group.add_argument('--lr-base', default=3e-4, type=float, help='base learning rate (eq. 17)')
    group.add_argument('--lr-base-size', default=256, type=int, help='batch size the base lr refers to')
    group.add_argument('--sched', default='cosine', type=str,
                       help="learning rate schedule, any of timm's (cosine, tanh, step, poly, ...) or none")
    group.add_argument('--sched-on-updates', default=True, action=argparse.BooleanOptionalAction,
                       help='step the schedule every optimizer update rather than every epoch')
    group.add_argument('--epochs', default=100, type=int, help='epochs to train (the total, also when resuming)')
    group.add_argument('--warmup-epochs', default=5, type=int, help='linear warm-up epochs')
    group.add_argument('--warmup-lr', default=1e-6, type=float, help='learning rate the warm-up starts from')
    group.add_argument('--warmup-prefix', action='store_true',
                       help='warm-up epochs come before the schedule instead of being its first epochs')
    group.add_argument('--min-lr', default=0., type=float, help='lowest learning rate of the schedule')
    group.add_argument('--cooldown-epochs', default=0, type=int, help='epochs at min-lr after the schedule')
    group.add_argument('-b', '--batch-size', default=256, type=int, help='batch size per process')
    group.add_argument('--grad-accum-steps', default=1, type=int, help='micro-batches per optimizer update')


def _add_run_args(parser: argparse.ArgumentParser):
    """Device, outputs, resuming and export."""
    group = parser.add_argument_group('Run')
    group.add_argument('--amp', default=None, action=argparse.BooleanOptionalAction,
                       help='mixed precision (autocast) in --amp-dtype (default: float16 on CUDA, bfloat16 on CPU); '
                            '--no-amp for float32; neither: a resumed run keeps its checkpoint\'s precision, a new one '
                            'takes bfloat16 where the device has bfloat16 units (AVX512_BF16/AMX CPU, CUDA), else '
                            'float32 (timm_mlit.precision.run_amp_dtype)')
    group.add_argument('--amp-dtype', default=None, type=str,
                       help='float16 (CUDA, with a loss scaler) or bfloat16; implies --amp')
    group.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', type=str,
                       help='cpu, cuda or cuda:N')
    group.add_argument('--dist-backend', default=None, type=str, help='default: nccl on CUDA, gloo on CPU')
    group.add_argument('--seed', default=42, type=int, help='random seed (data, masks, initialisation)')
    group.add_argument('--output', default='', type=str,
                       help='root of the experiment folders (default: ./output/pretrain)')
    group.add_argument('--experiment', default='', type=str,
                       help='experiment folder name (default: date-time-model-mae)')
    group.add_argument('--resume', default='', type=str,
                       help='pre-training checkpoint to continue from; the schedule follows the arguments given now')
    group.add_argument('--checkpoint-hist', default=10, type=int, help='number of epoch checkpoints kept')
    group.add_argument('--log-interval', default=50, type=int, help='optimizer updates between log lines')
    group.add_argument('--export-only', default='', type=str, metavar='CHECKPOINT',
                       help='export the encoder of this checkpoint as safetensors and exit')
    group.add_argument('--export-path', default='', type=str,
                       help='where to write the encoder (.safetensors; default: encoder.safetensors in the '
                            'experiment folder)')


def build_parser() -> Tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """(config parser, parser): -c is read first, its YAML values become the second parser's defaults."""
    config_parser = argparse.ArgumentParser(description='Pre-training config', add_help=False)
    config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                               help='YAML config file (a path, or the name of a packaged recipe); the command line '
                                    'overrides its values')
    parser = argparse.ArgumentParser(
        prog='timm-mlit-pretrain', description='mmLiT masked-autoencoder pre-training', parents=[config_parser],
        formatter_class=HelpFormatter)
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    for add in (_add_model_args, _add_data_args, _add_optimization_args, _add_run_args):
        add(parser)
    return config_parser, parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    config_parser, parser = build_parser()
    args_config, remaining = config_parser.parse_known_args(argv)
    if args_config.config:
        try:
            args_config.config = resolve_recipe(args_config.config)
        except FileNotFoundError as e:
            parser.error(f'-c: {e}')
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
        parser.set_defaults(**cfg, config=args_config.config)  # args.yaml records the file read
    return parser.parse_args(remaining)


def check_args(args: argparse.Namespace):
    """Raise ValueError naming the first argument whose value cannot work; the config file's values included."""
    def number(name, minimum=None, integer=False, allow_none=False, above=False):
        v = getattr(args, name)
        flag = '--' + name.replace('_', '-')
        if v is None and allow_none:
            return
        if integer and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f'{flag} must be an integer, got {v!r}')
        if not integer and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ValueError(f'{flag} must be a finite number, got {v!r}')
        if minimum is not None and (v <= minimum if above else v < minimum):
            raise ValueError(f'{flag} must be {"above" if above else "at least"} {minimum}, got {v!r}')

    for name in ('batch_size', 'epochs', 'grad_accum_steps', 'log_interval', 'lr_base_size'):
        number(name, 1, integer=True)
    for name in ('workers', 'warmup_epochs', 'cooldown_epochs', 'checkpoint_hist'):
        number(name, 0, integer=True)
    number('train_num_samples', 1, integer=True, allow_none=True)
    number('seed', integer=True)
    number('lr', 0, above=True, allow_none=True)
    for name in ('lr_base', 'weight_decay', 'warmup_lr', 'min_lr', 'alpha', 'beta', 'hflip', 'momentum'):
        number(name, 0)
    number('clip_grad', 0, above=True, allow_none=True)
    try:  # the installed timm is the judge of which schedules exist
        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.)
        known = create_scheduler_v2(probe, sched=args.sched, num_epochs=2, updates_per_epoch=1)[0] is not None
    except (ValueError, KeyError, AssertionError):
        known = False
    if not known and args.sched != 'none':
        raise ValueError(f'--sched {args.sched!r} is not a timm schedule (cosine, tanh, step, multistep, poly, '
                         f'plateau, ... or none)')
    opt = args.opt.lower().split('_')[-1]
    if opt not in timm.optim.list_optimizers():
        raise ValueError(f'--opt {args.opt!r} is not a timm optimizer (timm.optim.list_optimizers())')
    if args.amp is not False and args.amp_dtype is not None and args.amp_dtype not in ('float16', 'bfloat16'):
        raise ValueError(f'--amp-dtype must be float16 or bfloat16, got {args.amp_dtype}')
    device = check_device(args.device)
    if args.amp is not False and args.amp_dtype == 'float16' and device.type == 'cpu':
        raise ValueError('float16 autocast needs CUDA; on CPU use --amp-dtype bfloat16')
    for flag, path in (('--resume', args.resume), ('--export-only', args.export_only)):
        if path and os.path.isdir(path):
            raise ValueError(f'{flag} {path} is a folder; give a checkpoint file such as {path}/last.pth.tar')
        if path and not os.path.isfile(path):
            raise ValueError(f'{flag} {path}: no such file')
    if args.export_path:
        check_writable_path(args.export_path, '--export-path')
    if args.output:
        check_writable_path(args.output, '--output', folder=True)
