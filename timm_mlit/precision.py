""" The precision a training run should use on this machine, without the user knowing its CPU's flags

bfloat16 autocast where the device has fast bfloat16 units: a CPU with AVX512_BF16 or AMX (there the models' matmuls
run several times faster in bfloat16 and the attention takes `layers.ops.chunked_attention`), a CUDA GPU that
supports bfloat16; float32 everywhere else, where bfloat16 would be emulated and slower. `TIMM_MLIT_PRECISION`
overrides the choice: `float32` (the path of a CPU without bfloat16 units) or `bfloat16`.

Used by `timm-mlit-pretrain` (no `--amp` / `--no-amp` given) and by `timm-mlit-run train.py` (neither the command
line nor the recipe sets `amp`). Measured by benchmarks/models.py and benchmarks/pretrain_throughput.py.
"""
import os
from pathlib import Path
from typing import Optional

import torch

__all__ = ['PRECISION_ENV', 'auto_amp_dtype', 'cpu_has_bf16']

PRECISION_ENV = 'TIMM_MLIT_PRECISION'
_CHOICES = ('auto', 'float32', 'bfloat16')


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively: AVX512_BF16 or AMX-BF16 (x86). PyTorch's own CPU probes where
    they exist, else the flags in /proc/cpuinfo."""
    probes = [getattr(torch.cpu, name, None) for name in ('_is_avx512_bf16_supported', '_is_amx_tile_supported')]
    if all(probe is not None for probe in probes):
        return any(probe() for probe in probes)
    try:
        flags = Path('/proc/cpuinfo').read_text().split()
    except OSError:
        return False
    return 'avx512_bf16' in flags or 'amx_bf16' in flags


def auto_amp_dtype(device) -> Optional[torch.dtype]:
    """The autocast dtype for training on `device` (None: float32, no autocast), after `TIMM_MLIT_PRECISION`."""
    choice = os.environ.get(PRECISION_ENV, 'auto').strip().lower() or 'auto'
    if choice not in _CHOICES:
        raise ValueError(f'{PRECISION_ENV}={choice!r}: use one of {", ".join(_CHOICES)}')
    if choice != 'auto':
        return torch.bfloat16 if choice == 'bfloat16' else None
    device = torch.device(device)
    if device.type == 'cpu':
        return torch.bfloat16 if cpu_has_bf16() else None
    if device.type == 'cuda' and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.bfloat16  # Ampere and later compute bfloat16 natively (is_bf16_supported counts emulation too)
    return None
