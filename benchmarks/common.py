"""Shared helpers for the benchmarks: argument types checked before anything runs, interleaved timing with medians,
JSON + markdown output."""
import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

from timm_mlit.files import atomic_write, check_writable_path
from timm_mlit.precision import cpu_name


def checked(check: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse `type` from `check(text)`, which raises ValueError naming the problem: argparse then ends the
    command with that message as its one-line error (status 2), before the script does anything."""
    def parse(text: str) -> str:
        try:
            check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text
    parse.__name__ = check.__name__
    return parse


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse `type`: an integer >= `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f'must be >= {minimum}, got {value}')
        return value
    parse.__name__ = f'int >= {minimum}'
    return parse


def device_name(name: str) -> torch.device:
    """`name` as a torch device (cpu, cuda, cuda:N), which this machine may lack; ValueError if it names none."""
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f'{name!r} is not a device: use cpu, cuda or cuda:N') from None


def device_here(name: str):
    """Raise ValueError unless `name` is a torch device that this machine has."""
    if device_name(name).type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'{name}: CUDA is not available here')


def results_folder(path: str):
    """Raise ValueError unless the results can be written to the folder `path` (made when they are)."""
    check_writable_path(path, 'folder', folder=True)


def existing_folder(path: str):
    """Raise ValueError unless `path` is a folder."""
    if not os.path.isdir(path):
        raise ValueError(f'{path} is a file, not a folder' if os.path.exists(path) else f'{path} does not exist')


def machine() -> str:
    """The device a benchmark ran on: the GPU's name, or the CPU's model name (its speed ratios differ between
    CPU models: bfloat16 units, AMX) and the threads used."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = cpu_name()
    arch = '' if name == platform.machine() else f', {platform.machine()}'
    return f'{name}{arch}, {torch.get_num_threads()} threads'


def sync(device: str):
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def time_interleaved(fns: Dict[str, Callable[[], None]], repeats: int, warmup: int = 2, device: str = 'cpu') \
        -> Dict[str, float]:
    """Median seconds per call of each fn, the fns run round-robin so that load on a shared machine hits them
    alike (compare the ratios between them, not lone times)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def write_results(out_dir: str, stem: str, meta: dict, rows: List[dict], columns: List[str]):
    """Write `stem.json` (meta + rows) and `stem.md` (a markdown table of `columns`)."""
    meta = dict(meta, load_average_at_end=[round(v, 2) for v in os.getloadavg()])  # how shared the machine was
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    body = json.dumps(dict(meta=meta, rows=rows), indent=2)
    atomic_write(str(out / f'{stem}.json'), lambda f: f.write(body.encode()))
    table = markdown_table(columns, [[_fmt(row.get(c, '')) for c in columns] for row in rows])
    text = f"<!-- {json.dumps(meta)} -->\n{table}\n"
    atomic_write(str(out / f'{stem}.md'), lambda f: f.write(text.encode()))
    print(text)


def markdown_table(header: List[str], rows: List[List[str]]) -> str:
    """A markdown table of already formatted cells: the one layout of the result files and the docs' tables."""
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return '\n'.join(lines + ['| ' + ' | '.join(r) + ' |' for r in rows])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f'{v:.3g}' if abs(v) < 100 else f'{v:,.0f}'
    return str(v)
