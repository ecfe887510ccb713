"""Checkpoints: reading the weights of any checkpoint we publish or fine-tune from, and the pre-training checkpoints.

Readers: `read_checkpoint(path)` takes an exported encoder (safetensors with `arch` / `model_kwargs` metadata), a
pre-training checkpoint, a timm train.py checkpoint (optionally its EMA weights), a whole masked autoencoder or a
bare state dict, and returns the mLiT weights and what the file records beside them; `state_dict_of` does the same
for a checkpoint already loaded (what `mlit.checkpoint_filter_fn` gets from timm).

Pre-training (`timm-mlit-pretrain`): `save_checkpoint` writes checkpoint-<epoch>.pth.tar atomically, makes
last.pth.tar a hard link to it and keeps the newest few; `load_pretrain_checkpoint` reads one back, or says what
else the file is and what to do with it; `resume_training` restores a run from one (the RNG states of `rng_state`
included, so that it repeats an uninterrupted run); `export_encoder` writes the head-less encoder timm's loaders
read.
"""
import argparse
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import safetensors
import safetensors.torch
import torch
from timm.models import clean_state_dict
from timm.utils import random_seed

from .files import atomic_write, temporary_name

__all__ = [
    'CHECKPOINT_FORMAT', 'CheckpointError', 'encoder_state_dict', 'state_dict_of', 'load_torch_file', 'read_checkpoint',
    'rng_state', 'set_rng_state', 'save_checkpoint', 'load_pretrain_checkpoint', 'resume_training', 'export_encoder',
]

_logger = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 'timm-mlit-pretrain/1'
_CONTAINERS = ('state_dict', 'state_dict_ema', 'model')  # the keys under which train.py / pre-training keep weights
_ANSI_RE = re.compile(r'\x1b\[[0-9;]*m')
PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the file and what is wrong with it."""


# ------------------------------------------------------------------------------------------- reading weights

def encoder_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The mLiT weights of a state dict: DDP / torch.compile prefixes removed (timm's clean_state_dict) and, for a
    whole masked autoencoder (mae.py), only its encoder, with the `encoder.` prefix removed."""
    state_dict = clean_state_dict(state_dict)
    if any(k.startswith('encoder.') for k in state_dict):
        state_dict = {k[len('encoder.'):]: v for k, v in state_dict.items() if k.startswith('encoder.')}
    return state_dict


def _is_container(checkpoint: Dict[str, Any]) -> bool:
    return any(k in checkpoint for k in _CONTAINERS)


def state_dict_of(checkpoint: Dict[str, Any], use_ema: bool = False,
                  name: str = 'the checkpoint') -> Dict[str, torch.Tensor]:
    """The mLiT weights of a loaded checkpoint: its 'state_dict_ema' (`use_ema`), 'state_dict' or 'model' container
    unwrapped (a bare state dict as it is), then `encoder_state_dict`. `name` names the checkpoint in errors."""
    if _is_container(checkpoint):
        if use_ema:
            if checkpoint.get('state_dict_ema') is None:
                raise CheckpointError(f'{name} has no EMA weights (no state_dict_ema)')
            state_dict = checkpoint['state_dict_ema']
        else:
            state_dict = checkpoint.get('state_dict', checkpoint.get('model'))
    elif use_ema:
        raise CheckpointError(f'{name} is a bare state dict, it has no EMA weights')
    else:
        state_dict = checkpoint
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f'{name} does not hold a state dict of tensors')
    return encoder_state_dict(state_dict)  # DDP / compile prefixes removed; a whole MAE: its encoder


def load_torch_file(path: PathLike) -> Any:
    """torch.load on the CPU, weights only; timm's train.py stores its args as an argparse.Namespace, so that one
    class is allowed too, nothing else unpickles."""
    # timm.models.load_state_dict does the same load but keeps only the weights; the rest is what `meta` returns
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def _read_safetensors(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Tensors and metadata; the metadata's `model_kwargs` (JSON, as `export_encoder` writes it) parsed."""
    state_dict = safetensors.torch.load_file(str(path), device='cpu')
    with safetensors.safe_open(str(path), framework='pt') as f:
        meta = dict(f.metadata() or {})
    if meta.get('model_kwargs'):
        try:
            meta['model_kwargs'] = json.loads(meta['model_kwargs'])
        except json.JSONDecodeError as e:
            raise CheckpointError(f'checkpoint {path}: its metadata model_kwargs is not JSON ({e})') from e
    else:
        meta.pop('model_kwargs', None)
    if not meta.get('arch'):
        meta.pop('arch', None)
    return state_dict, meta


def read_checkpoint(path: PathLike, use_ema: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read the weights of any checkpoint we publish or fine-tune from (see the module docstring).

    timm.models.load_state_dict is not used: it drops what the checkpoint records beside the weights (the
    container's other keys, a safetensors file's metadata) and falls back to the plain weights when `use_ema` finds
    no EMA weights, where this says so.

    Returns:
        The state dict (wrapper prefixes removed, an MAE reduced to its encoder) and what the checkpoint records
        beside it ('arch', 'model_kwargs', 'args', 'epoch', ...; a safetensors file's metadata; empty for a bare
        state dict).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint {path} does not exist')
    try:
        if path.suffix == '.safetensors':
            state_dict, meta = _read_safetensors(path)
            return encoder_state_dict(state_dict), meta
        checkpoint = load_torch_file(path)
    except CheckpointError:
        raise
    except Exception as e:  # torch and safetensors raise many types for a damaged file
        raise CheckpointError(f'cannot read checkpoint {path}: it is corrupt or not a checkpoint ({e})') from e
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'checkpoint {path} holds a {type(checkpoint).__name__}, not a state dict')
    meta = {}
    if _is_container(checkpoint):
        meta = {k: v for k, v in checkpoint.items() if k not in _CONTAINERS + ('optimizer',)}
    return state_dict_of(checkpoint, use_ema, name=f'checkpoint {path}'), meta


# ------------------------------------------------------------------------------------------- pre-training

def rng_state() -> Dict[str, Any]:
    """This process's torch, Python, NumPy (and CUDA) RNG states, in tensors and tuples torch.load reads back."""
    np_state = np.random.get_state()
    state = dict(
        torch=torch.get_rng_state(), python=random.getstate(),
        numpy=(np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]))
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]):
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state['torch'])
    random.setstate(state['python'])
    name, keys, *rest = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _link_atomically(src: str, dst: str):
    """Make `dst` the file `src` in one rename: a hard link (no second copy on disk), else a copy."""
    tmp = temporary_name(dst)
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:  # a filesystem without hard links
        with open(src, 'rb') as f_src:
            atomic_write(dst, lambda f: shutil.copyfileobj(f_src, f))
        return
    os.replace(tmp, dst)


def save_checkpoint(state: Dict[str, Any], output_dir: str, epoch: int, keep: int) -> str:
    """Write checkpoint-<epoch>.pth.tar and last.pth.tar atomically; keep the newest `keep` epoch checkpoints."""
    path = os.path.join(output_dir, f'checkpoint-{epoch}.pth.tar')
    atomic_write(path, lambda f: torch.save(state, f))
    _link_atomically(path, os.path.join(output_dir, 'last.pth.tar'))
    found = []
    for name in os.listdir(output_dir):
        m = re.fullmatch(r'checkpoint-(\d+)\.pth\.tar', name)
        if m:
            found.append((int(m.group(1)), name))
    for _, name in sorted(found)[:-keep] if keep > 0 else []:
        os.remove(os.path.join(output_dir, name))
    return path


def _what_else(path: str, checkpoint: Any = None) -> str:
    """What a file that is not a pre-training checkpoint is, and what to do with it, in a sentence (or '')."""
    if path.endswith('.safetensors'):
        return ('it is a safetensors file (an exported encoder or published weights: weights only, no optimizer '
                'state); fine-tune it with `timm-mlit-run train.py --pretrained-path FILE`, publish it with '
                '`timm-mlit-publish FILE --model ...`')
    if isinstance(checkpoint, dict) and 'state_dict' in checkpoint and ('arch' in checkpoint or 'args' in checkpoint):
        arch, epoch = checkpoint.get('arch', '?'), checkpoint.get('epoch', '?')
        return (f'it is a timm train.py checkpoint ({arch}, epoch {epoch}) of supervised training, not of MAE '
                f'pre-training; continue it with `timm-mlit-run train.py --resume {path} ...`, evaluate it with '
                f'`timm-mlit-run validate.py --checkpoint {path} ...`, publish it with '
                f'`timm-mlit-publish {path} --model {arch}`')
    return ''


def load_pretrain_checkpoint(path: str) -> Dict[str, Any]:
    """Read a pre-training checkpoint, or raise CheckpointError saying what the file is and why it cannot be used."""
    if os.path.isdir(path):
        raise CheckpointError(
            f'{path} is a folder; give a checkpoint file such as {os.path.join(path, "last.pth.tar")}')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint {path} does not exist')
    try:
        checkpoint = load_torch_file(path)
    except Exception as e:  # torch raises many types for a damaged file
        other = _what_else(path)
        if other:
            raise CheckpointError(f'{path} is not a timm-mlit pre-training checkpoint: {other}') from None
        first = _ANSI_RE.sub('', str(e)).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f'checkpoint {path} is unreadable (damaged, or not a torch file): {first}') from None
    if not isinstance(checkpoint, dict) or checkpoint.get('format') != CHECKPOINT_FORMAT:
        other = _what_else(path, checkpoint)
        raise CheckpointError(f'{path} is not a timm-mlit pre-training checkpoint' + (f': {other}' if other else ''))
    return checkpoint


# what decides the learning rate of every update: a resumed run rebuilds its schedule from these
_SCHEDULE_ARGS = ('epochs', 'sched', 'sched_on_updates', 'lr', 'lr_base', 'lr_base_size', 'min_lr', 'warmup_epochs',
                  'warmup_lr', 'warmup_prefix', 'cooldown_epochs', 'batch_size', 'grad_accum_steps',
                  'train_num_samples', 'world_size')


def resume_training(checkpoint: Dict[str, Any], args, optimizer, lr_scheduler, loss_scaler, updates_per_epoch: int,
                    num_epochs: int) -> int:
    """Restore the optimizer, loss scaler and RNG state of a pre-training checkpoint and move the schedule, rebuilt
    from `args` (as timm's train.py does), to the first update after it. Returns the first epoch to train."""
    start_epoch = checkpoint['epoch'] + 1
    if start_epoch >= num_epochs:
        raise CheckpointError(
            f'{args.resume} has finished {start_epoch} epoch(s) and this run is {num_epochs} epochs long: nothing '
            f'left to train. To extend the run, pass --epochs larger than {start_epoch}')
    before = checkpoint.get('args') or {}
    changed = [f'--{k.replace("_", "-")} {before[k]} -> {getattr(args, k)}' for k in _SCHEDULE_ARGS
               if k in before and before[k] != getattr(args, k)]
    if changed and args.rank == 0:
        _logger.warning(f'Resuming {args.resume} with other arguments than it was trained with ({", ".join(changed)}); '
                        f'the learning rate schedule follows the new arguments from epoch {start_epoch} on')
    optimizer.load_state_dict(checkpoint['optimizer'])
    if loss_scaler is not None and 'scaler' in checkpoint:
        loss_scaler.load_state_dict(checkpoint['scaler'])
    if lr_scheduler is not None:
        lr_scheduler.step(start_epoch)  # each sets the lr only in its own mode (per epoch or per update)
        lr_scheduler.step_update(start_epoch * updates_per_epoch)
    rng = checkpoint['rng']
    if len(rng) == args.world_size:
        set_rng_state(rng[args.rank])
    else:
        _logger.warning(f'{args.resume} was written by {len(rng)} processes, not {args.world_size}: RNG states '
                        f're-seeded')
        random_seed(args.seed + start_epoch, args.rank)
    return start_epoch


def export_encoder(state_dict: Dict[str, torch.Tensor], path: str, arch: str = '',
                   model_kwargs: Optional[Dict[str, Any]] = None) -> str:
    """Save the encoder of an MAE state dict, head-less, as a safetensors file timm's loaders read.

    The metadata records `arch` and, as JSON, the encoder's creation kwargs (`model_kwargs`), so that
    `timm-mlit-publish` builds the model it was trained as."""
    tensors = {k[len('encoder.'):]: v.detach().cpu().contiguous() for k, v in state_dict.items()
               if k.startswith('encoder.')}
    if not tensors:
        raise CheckpointError('the checkpoint holds no encoder weights')
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    metadata = {'format': 'pt', 'arch': arch, 'source': 'timm-mlit mmLiT pre-training',
                'model_kwargs': json.dumps(dict(model_kwargs or {}))}
    atomic_write(path, lambda f: f.write(safetensors.torch.save(tensors, metadata=metadata)))
    return path
