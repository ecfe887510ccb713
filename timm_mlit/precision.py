""" The precision a training run should use on this machine, without the user knowing its CPU's flags

bfloat16 autocast where the device has fast bfloat16 units: a CPU with AVX512_BF16 or AMX (there the models' matmuls
run several times faster in bfloat16 and the attention takes `layers.ops.chunked_attention`), a CUDA GPU that
supports bfloat16; float32 everywhere else, where bfloat16 would be emulated and slower. `TIMM_MLIT_PRECISION`
overrides the choice: `float32` (the path of a CPU without bfloat16 units) or `bfloat16`.

Used by `timm-mlit-pretrain` through `run_amp_dtype`, and by `timm-mlit-run train.py` through `auto_precision_args`,
which writes the choice into train.py's arguments where neither they nor the recipe set `amp` or `amp_dtype`. A
resumed run keeps the precision its checkpoint records, so that a run started in float32 does not turn bfloat16
half-way (or back) because it was resumed on another machine or under another default. Measured by
benchmarks/models.py and benchmarks/pretrain_throughput.py.
"""
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import torch

from .checkpoint import checkpoint_args
from .script_args import config_values, find_option

__all__ = ['PRECISION_ENV', 'auto_amp_dtype', 'auto_precision_args', 'cpu_has_bf16', 'cpu_name', 'run_amp_dtype']

PRECISION_ENV = 'TIMM_MLIT_PRECISION'
_CHOICES = ('auto', 'float32', 'bfloat16')


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively: AVX512_BF16 or AMX-BF16 (x86). PyTorch's own CPU probes where
    they exist, else the flags in /proc/cpuinfo."""
    probes = [getattr(torch.cpu, name, None) for name in ('_is_avx512_bf16_supported', '_is_amx_tile_supported')]
    if all(probe is not None for probe in probes):
        return any(probe() for probe in probes if probe is not None)
    try:
        flags = Path('/proc/cpuinfo').read_text().split()
    except OSError:
        return False
    return 'avx512_bf16' in flags or 'amx_bf16' in flags


def cpu_name() -> str:
    """This CPU's model name as /proc/cpuinfo gives it (e.g. 'AMD EPYC'), else what `platform` knows ('x86_64')."""
    try:
        names = re.findall(r'model name\s*:\s*(.+)', Path('/proc/cpuinfo').read_text())
    except OSError:
        names = []
    return names[0].strip() if names else platform.processor() or platform.machine()


def _env_choice() -> str:
    choice = os.environ.get(PRECISION_ENV, 'auto').strip().lower() or 'auto'
    if choice not in _CHOICES:
        raise ValueError(f'{PRECISION_ENV}={choice!r}: use one of {", ".join(_CHOICES)}')
    return choice


def auto_amp_dtype(device) -> Optional[torch.dtype]:
    """The autocast dtype for training on `device` (None: float32, no autocast), after `TIMM_MLIT_PRECISION`."""
    choice = _env_choice()
    if choice != 'auto':
        return torch.bfloat16 if choice == 'bfloat16' else None
    device = torch.device(device)
    if device.type == 'cpu':
        return torch.bfloat16 if cpu_has_bf16() else None
    if device.type == 'cuda' and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.bfloat16  # Ampere and later compute bfloat16 natively (is_bf16_supported counts emulation too)
    return None


_DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16}


def run_amp_dtype(device, amp: Optional[bool] = None, amp_dtype: Optional[str] = None,
                  resumed: Optional[Mapping[str, Any]] = None) -> Tuple[Optional[torch.dtype], str]:
    """(autocast dtype or None for float32, why) of a training run on `device`. `amp` / `amp_dtype`: what the
    command line or recipe says (None where it says nothing); `resumed`: the arguments the resumed checkpoint
    records (timm's train.py and `timm-mlit-pretrain` both store them), None for a new run.

    In order: `--no-amp` is float32; `--amp-dtype X` is X (with or without `--amp`); `--amp` alone is float16 on
    CUDA (timm's default) and bfloat16 elsewhere (CPU autocast has no float16 path here); `TIMM_MLIT_PRECISION`
    when set; a resumed run's recorded precision; else `auto_amp_dtype(device)`."""
    if amp is False:
        return None, '--no-amp'
    if amp_dtype is not None or amp:
        name = amp_dtype or ('float16' if torch.device(device).type == 'cuda' else 'bfloat16')
        if name not in _DTYPES:
            raise ValueError(f'--amp-dtype must be float16 or bfloat16, got {name}')
        return _DTYPES[name], f'--amp-dtype {name}' if amp_dtype else '--amp'
    choice = _env_choice()
    if choice != 'auto':
        return auto_amp_dtype(device), f'{PRECISION_ENV}={choice}'
    recorded = (resumed or {}).get('amp')
    if isinstance(recorded, bool):  # (older runs record None: their precision followed the machine)
        name = (resumed or {}).get('amp_dtype') or 'float16'
        if recorded and (name not in _DTYPES or (name == 'float16' and torch.device(device).type != 'cuda')):
            raise ValueError(f'the resumed run was trained in {name} autocast, which {torch.device(device).type} '
                             f'cannot run here: give --amp-dtype bfloat16, or {PRECISION_ENV}=float32 for float32')
        return (_DTYPES[name] if recorded else None), 'as the resumed run was trained'
    dtype = auto_amp_dtype(device)
    return dtype, (f'{torch.device(device).type} has bfloat16 units' if dtype is not None
                   else f'{torch.device(device).type} has no bfloat16 units')


def auto_precision_args(args: Sequence[str], prog: str = 'timm-mlit-run') -> List[str]:
    """`args` for train.py with the precision made explicit where neither they nor their recipe say anything of
    `amp`: an `--amp-dtype` (or recipe `amp_dtype`) given alone gets the `--amp` train.py needs to use it; a
    `--resume` keeps the precision its checkpoint records; a new run takes `--amp --amp-dtype bfloat16`
    where its device has bfloat16 units (`run_amp_dtype`; `--device` from the arguments, else the recipe, else
    train.py's default, cuda). What is added is said on stderr after `prog`."""
    cfg = config_values(args)
    args = list(args)
    end = args.index('--') if '--' in args else len(args)  # (before a `--`: after it they would be positional)
    if find_option(args, '--amp')[0] or 'amp' in cfg:
        return args
    dtype_given, name = find_option(args, '--amp-dtype')
    if dtype_given or 'amp_dtype' in cfg:  # train.py reads the dtype only with --amp: alone it would run float32
        name = name if dtype_given else cfg['amp_dtype']
        print(f'{prog}: {name} autocast (--amp added to the amp_dtype given)', file=sys.stderr)
        return args[:end] + ['--amp'] + args[end:]
    device = find_option(args, '--device')[1] or cfg.get('device') or 'cuda'
    resumed = checkpoint_args(find_option(args, '--resume')[1] or cfg.get('resume'))
    try:
        dtype, why = run_amp_dtype(device, resumed=resumed)
    except RuntimeError:
        raise ValueError(f'--device {device!r} is not a device: use cpu, cuda or cuda:N') from None
    if dtype is None:
        if resumed is not None:
            print(f'{prog}: float32 ({why})', file=sys.stderr)
        return args
    name = str(dtype).split('.')[1]
    print(f'{prog}: {name} autocast (--amp --amp-dtype {name}): {why}; {PRECISION_ENV}=float32 for float32',
          file=sys.stderr)
    return args[:end] + ['--amp', '--amp-dtype', name] + args[end:]
