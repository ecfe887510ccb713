""" Checks of model arguments and inputs, shared by the models of this package: each names the argument or the
input and what is wrong with it, so that a mistake fails at construction or at the first forward, not deep inside.
"""
import numbers
from typing import Any, Optional, Sequence, Tuple, cast

import torch
from timm.layers import register_notrace_function

__all__ = ['check_int', 'check_ints', 'check_rate', 'check_input_image', 'check_device']


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """`value` as an int, if it is an integer >= `minimum` (bools are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f'{name} must be an int, got {value!r}')
    if value < minimum:
        raise ValueError(f'{name} must be >= {minimum}, got {value!r}')
    return int(value)


def check_ints(name: str, value: Any, length: Optional[int] = None) -> Tuple[int, ...]:
    """`value` as a tuple of positive ints, if it is a non-empty sequence of them (of `length` items, if given)."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f'{name} must be a sequence of ints, got {value!r}')
    if (len(value) != length) if length is not None else not value:
        raise ValueError(f'{name} must hold {length or "at least one"} ints, got {value!r}')
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in value):
        raise TypeError(f'{name} must hold ints, got {value!r}')
    if any(v < 1 for v in value):
        raise ValueError(f'{name} must hold positive ints, got {value!r}')
    return tuple(int(v) for v in value)


def check_rate(name: str, value: Any, upper: float = 1.) -> float:
    """`value`, if it is a real number in [0, `upper`) (a probability that still keeps something)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f'{name} must be a number, got {value!r}')
    rate = cast(float, value)  # a Real: compares with floats as one
    if not 0. <= rate < upper:
        raise ValueError(f'{name} must be in [0, {upper:g}), got {value!r}')
    return rate


def check_device(value: Any, flag: str = '--device') -> torch.device:
    """`value` as a torch device this machine has; ValueError naming `flag` if it names no device (cpu, cuda,
    cuda:N) or a CUDA one where CUDA is not available."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f'{flag} {value!r} is not a device: use cpu, cuda or cuda:N'.strip()) from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'{flag} {value}: CUDA is not available here; use cpu'.strip())
    return device


@torch.jit.unused  # (TorchScript can read no device's autocast state but CUDA's, and prints a dtype as a number)
def _check_input_dtype(x: torch.Tensor, dtype: torch.dtype):
    if not x.is_floating_point():
        raise TypeError(f'mLiT expects floating-point images, got a tensor of dtype {x.dtype}; convert it with '
                        f'.float(), normalized as the model\'s pretrained_cfg says')
    if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f'the model got {x.dtype} images, but its parameters are {dtype}; convert the images with '
                        f'.to({dtype}), or run the model under torch.autocast')


@register_notrace_function  # torch.fx: a leaf (fx only wraps public names), its checks are not traced
def check_input_image(x: torch.Tensor, in_chans: int, img_size: Tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """`x`, once checked: a tensor [B, `in_chans`, *`img_size`] of floating-point images, of `dtype` outside
    autocast. Returned so that a traced graph keeps the call (fx drops a call whose result is unused)."""
    if torch.jit.is_scripting():
        if not x.is_floating_point():
            raise TypeError('mLiT expects floating-point images, got an integer or bool tensor; convert it with '
                            '.float()')
    else:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f'mLiT expects a torch.Tensor of images [B, C, H, W], got {type(x).__name__}')
        _check_input_dtype(x, dtype)
    if x.ndim != 4:
        raise ValueError(f'mLiT expects images [B, C, H, W], got a tensor of shape {x.shape}')
    if x.shape[1] != in_chans:
        raise ValueError(f'mLiT was built for {in_chans} input channels, got an image with {x.shape[1]} channels')
    if (x.shape[2], x.shape[3]) != img_size:
        raise ValueError(
            f'mLiT was built for {img_size[0]}x{img_size[1]} images, got {x.shape[2]}x{x.shape[3]}; resize the '
            f'input or create the model with img_size=({x.shape[2]}, {x.shape[3]})')
    return x
