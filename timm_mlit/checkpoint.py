"""Checkpoints: reading the weights of any checkpoint we publish or fine-tune from, and the pre-training checkpoints.

Readers: `read_checkpoint(path)` takes an exported encoder (safetensors with `arch` / `model_kwargs` metadata), a
pre-training checkpoint, a timm train.py checkpoint (optionally its EMA weights), a whole masked autoencoder or a
bare state dict, and returns the mLiT weights and what the file records beside them; `state_dict_of` does the same
for a checkpoint already loaded (what `mlit.checkpoint_filter_fn` gets from timm). `build_model` builds the model a
checkpoint holds as it was trained (the kwargs its weights tell and those it records, `recorded_model_kwargs`) and
loads it: what timm-mlit-publish publishes and timm-mlit-export exports.

Pre-training (`timm-mlit-pretrain`): `save_checkpoint` writes checkpoint-<epoch>.pth.tar atomically, makes
last.pth.tar a hard link to it and keeps the newest few; `load_pretrain_checkpoint` reads one back, or says what
else the file is and what to do with it; `resume_training` restores a run from one (the RNG states of `rng_state`
included, so that it repeats an uninterrupted run); `export_encoder` writes the head-less encoder timm's loaders
read.
"""
import argparse
import json
import logging
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union, cast

import numpy as np
import safetensors
import safetensors.torch
import timm
import torch
import torch.nn as nn
from timm.models import clean_state_dict, is_model, model_entrypoint, split_model_name_tag
from timm.utils import random_seed

from .files import atomic_write, temporary_name

__all__ = [
    'CHECKPOINT_FORMAT', 'CheckpointError', 'encoder_state_dict', 'state_dict_of', 'load_torch_file', 'read_checkpoint',
    'recorded_args', 'checkpoint_args', 'from_pretraining', 'recorded_model_kwargs', 'state_dict_mismatches',
    'package_model', 'build_model', 'rng_state', 'set_rng_state', 'save_checkpoint', 'load_pretrain_checkpoint',
    'resume_training', 'export_encoder',
]

_logger = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 'timm-mlit-pretrain/1'
_CONTAINERS = ('state_dict', 'state_dict_ema', 'model')  # the keys under which train.py / pre-training keep weights
_ANSI_RE = re.compile(r'\x1b\[[0-9;]*m')
PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the file and what is wrong with it."""


# ------------------------------------------------------------------------------------------- reading weights

def _is_mae(state_dict: Dict[str, torch.Tensor]) -> bool:
    """Are these a masked autoencoder's weights (mae.py: `encoder.*`, with or without `decoder.*`)?"""
    return any(k.startswith('encoder.') for k in state_dict) and all(
        k.startswith(('encoder.', 'decoder.')) for k in state_dict)


def encoder_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The mLiT weights of a state dict: DDP / torch.compile prefixes removed (timm's clean_state_dict) and, for a
    whole masked autoencoder (mae.py), only its encoder, with the `encoder.` prefix removed."""
    state_dict = clean_state_dict(state_dict)
    if _is_mae(state_dict):
        state_dict = {k[len('encoder.'):]: v for k, v in state_dict.items() if k.startswith('encoder.')}
    return state_dict


def _is_container(checkpoint: Dict[str, Any]) -> bool:
    return any(k in checkpoint for k in _CONTAINERS)


def _weights_of(checkpoint: Dict[str, Any], use_ema: bool, name: str) -> Dict[str, torch.Tensor]:
    """The state dict a loaded checkpoint holds, as it is (see `state_dict_of`)."""
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
    return state_dict


def state_dict_of(checkpoint: Dict[str, Any], use_ema: bool = False,
                  name: str = 'the checkpoint') -> Dict[str, torch.Tensor]:
    """The mLiT weights of a loaded checkpoint: its 'state_dict_ema' (`use_ema`), 'state_dict' or 'model' container
    unwrapped (a bare state dict as it is), then `encoder_state_dict`. `name` names the checkpoint in errors."""
    return encoder_state_dict(_weights_of(checkpoint, use_ema, name))  # a whole MAE: its encoder


def _first_line(e: BaseException) -> str:
    """The first line of an error's message (torch's run on for paragraphs, in colour), or its type's name."""
    text = _ANSI_RE.sub('', str(e)).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
        state dict), with 'masked_autoencoder': True where the weights were a whole MAE, decoder included.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint {path} does not exist')
    try:
        if path.suffix == '.safetensors':
            weights, meta = _read_safetensors(path)
        else:
            checkpoint = load_torch_file(path)
    except CheckpointError:
        raise
    except Exception as e:  # torch and safetensors raise many types for a damaged file
        raise CheckpointError(f'cannot read checkpoint {path}: it is corrupt or not a checkpoint ({_first_line(e)})') \
            from e
    if path.suffix != '.safetensors':
        if not isinstance(checkpoint, dict):
            raise CheckpointError(f'checkpoint {path} holds a {type(checkpoint).__name__}, not a state dict')
        meta = {k: v for k, v in checkpoint.items() if k not in _CONTAINERS + ('optimizer',)} \
            if _is_container(checkpoint) else {}
        weights = _weights_of(checkpoint, use_ema, name=f'checkpoint {path}')
    weights = clean_state_dict(weights)
    if _is_mae(weights) and any(k.startswith('decoder.') for k in weights):
        meta['masked_autoencoder'] = True
    return encoder_state_dict(weights), meta


# ---------------------------------------------------------------------- what a checkpoint records; its model

def recorded_args(args: Any) -> Dict[str, Any]:
    """A checkpoint's recorded arguments (train.py's Namespace, the pre-training's dict) as a dict."""
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, dict) else {}


def checkpoint_args(path: Optional[str]) -> Optional[Dict[str, Any]]:
    """The arguments the checkpoint at `path` records (timm's train.py stores its Namespace, timm-mlit-pretrain a
    dict); None without a path or a readable checkpoint (whoever loads the file names its problem)."""
    if not path:
        return None
    try:
        ckpt = load_torch_file(path)
    except Exception:
        return None
    return recorded_args(ckpt.get('args')) if isinstance(ckpt, dict) else None


def from_pretraining(meta: Dict[str, Any]) -> bool:
    """Is this a pre-training checkpoint, a whole masked autoencoder or the encoder exported from one?"""
    return (str(meta.get('format', '')).startswith(CHECKPOINT_FORMAT.rpartition('/')[0])
            or 'pre-training' in str(meta.get('source', '')) or bool(meta.get('masked_autoencoder')))


def _model_kwargs_from_state_dict(state_dict: Dict[str, torch.Tensor], recorded: Dict[str, Any],
                                  source: str) -> Dict[str, Any]:
    """num_classes, in_chans and img_size as the weights were trained. The position embedding holds the patch grid
    after its prefix tokens (mLiT's dummy patch, or a ViT's class and register tokens as `recorded` sets them): a
    square one, or that of a recorded img_size, checked here so that no other size is ever built."""
    proj, pos_embed = state_dict.get('patch_embed.proj.weight'), state_dict.get('pos_embed')
    if proj is None or pos_embed is None or proj.ndim != 4 or pos_embed.ndim != 3:
        raise CheckpointError(f'{source} is not an mLiT checkpoint (nor a Mobile V-MoE one): no '
                              'patch_embed.proj.weight / pos_embed')
    reg_tokens = recorded.get('reg_tokens')
    reg_tokens = reg_tokens if isinstance(reg_tokens, int) else 0
    prefix = 0 if recorded.get('no_embed_class') else int(recorded.get('class_token', True) is not False) + reg_tokens
    patches, size = pos_embed.shape[1] - prefix, recorded.get('img_size')
    if size is None:
        grid = math.isqrt(max(patches, 0))
        size, fits, what = grid * proj.shape[-1], grid > 0 and grid * grid == patches, 'a square patch grid'
    else:
        hw = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (list, tuple)) else ()
        fits = len(hw) == 2 and all(isinstance(v, int) and v > 0 for v in hw) and (
            (hw[0] // proj.shape[-2]) * (hw[1] // proj.shape[-1]) == patches)
        what = f'the patch grid of its recorded img_size {size!r}'
    if not fits:
        raise CheckpointError(f'{source}: pos_embed of {pos_embed.shape[1]} tokens is not {prefix} + {what}')
    head = state_dict.get('head.weight')
    return dict(num_classes=0 if head is None else head.shape[0], in_chans=proj.shape[1], img_size=size)


def recorded_model_kwargs(state_dict: Dict[str, torch.Tensor], meta: Dict[str, Any], source: str,
                          from_weights: bool = True) -> Dict[str, Any]:
    """The creation kwargs of the model a checkpoint holds: what its weights tell (`from_weights`: the head,
    channels and image size of a ViT-like model), then what it records (a pre-training checkpoint's or encoder
    export's `model_kwargs`, then --model-kwargs and --gp of its training args)."""
    args = recorded_args(meta.get('args'))
    recorded, trained = meta.get('model_kwargs') or {}, args.get('model_kwargs') or {}
    for what, value in (('model_kwargs', recorded), ("training arguments' model_kwargs", trained)):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise CheckpointError(f'checkpoint {source}: its {what} is a {type(value).__name__}, not a dict of names')
    kwargs = dict(recorded, **trained)
    if args.get('gp'):
        kwargs['global_pool'] = args['gp']
    for name in () if from_weights else ('num_classes', 'in_chans'):  # as train.py passes them to create_model
        if isinstance(args.get(name), int):
            kwargs.setdefault(name, args[name])
    return dict(_model_kwargs_from_state_dict(state_dict, kwargs, source), **kwargs) if from_weights else kwargs


def state_dict_mismatches(expected: Dict[str, torch.Tensor], state_dict: Dict[str, torch.Tensor], arch: str) -> str:
    """Why `state_dict` does not fit a model whose own state dict is `expected` ('' where it fits)."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    problems = []
    for what, keys in (('missing', missing), ('unexpected', unexpected)):
        if keys:
            problems.append(f'{len(keys)} {what} keys ({", ".join(keys[:3])}{", ..." if len(keys) > 3 else ""})')
    if wrong:
        k = wrong[0]
        problems.append(f'{len(wrong)} shape mismatches (e.g. {k}: checkpoint {tuple(state_dict[k].shape)}, '
                        f'{arch} {tuple(expected[k].shape)})')
    return '; '.join(problems)


def package_model(name: str) -> bool:
    """Is `name` (a tag allowed) a model that this package registers with timm, of any of its model families?"""
    arch = split_model_name_tag(name)[0]
    return is_model(arch) and model_entrypoint(arch).__module__.startswith(f'{__package__}.')


def build_model(model_name: str, state_dict: Dict[str, torch.Tensor], meta: Dict[str, Any], source: str,
                model_kwargs: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """`model_name` built as the checkpoint (`state_dict`, `meta`: `read_checkpoint`'s) was trained, its weights
    loaded strictly; eval mode. The creation kwargs are `recorded_model_kwargs` (what the weights tell only for
    this package's models), `model_kwargs` over them; they are returned with the model.

    timm.models.load_checkpoint is not used: it loads into a model built without what the checkpoint records, and
    lists every key that does not fit; this names the first few."""
    arch = split_model_name_tag(model_name)[0]
    if not is_model(arch):
        raise CheckpointError(f'{model_name!r} is not a timm model: a checkpoint\'s model is built from its '
                              'architecture name (e.g. mlit_xxs)')
    ckpt_arch = meta.get('arch')
    if ckpt_arch and split_model_name_tag(str(ckpt_arch))[0] != arch:
        raise CheckpointError(f'checkpoint {source} was trained as {ckpt_arch!r}, not {arch!r}')
    kwargs = dict(recorded_model_kwargs(state_dict, meta, source, from_weights=package_model(arch)),
                  **(model_kwargs or {}))
    try:
        model = timm.create_model(arch, **kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f'cannot build {arch} with {kwargs} (from checkpoint {source}): {e}') from e
    problems = state_dict_mismatches(model.state_dict(), state_dict, arch)
    if problems:
        raise CheckpointError(f'checkpoint {source} does not fit {arch} built with {kwargs} (a checkpoint of another '
                              f'architecture or size?): {problems}')
    model.load_state_dict(state_dict, strict=True)
    return model.eval(), kwargs


# ------------------------------------------------------------------------------------------- pre-training

def rng_state() -> Dict[str, Any]:
    """This process's torch, Python, NumPy (and CUDA) RNG states, in tensors and tuples torch.load reads back."""
    # (cast: numpy's stubs type the call without arguments as legacy=False's dict; the default, legacy=True, gives
    # this tuple for the global RandomState, an MT19937)
    np_state = cast(Tuple[str, np.ndarray, int, int, float], np.random.get_state())
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
        raise CheckpointError(f'checkpoint {path} is unreadable (damaged, or not a torch file): {_first_line(e)}') \
            from None
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
