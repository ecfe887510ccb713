"""Shared helpers for the benchmarks: interleaved timing with medians, JSON + markdown output."""
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

from timm_mlit.precision import cpu_name


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
    (out / f'{stem}.json').write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    table = markdown_table(columns, [[_fmt(row.get(c, '')) for c in columns] for row in rows])
    text = f"<!-- {json.dumps(meta)} -->\n{table}\n"
    (out / f'{stem}.md').write_text(text)
    print(text)


def markdown_table(header: List[str], rows: List[List[str]]) -> str:
    """A markdown table of already formatted cells: the one layout of the result files and the README's tables."""
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return '\n'.join(lines + ['| ' + ' | '.join(r) + ' |' for r in rows])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f'{v:.3g}' if abs(v) < 100 else f'{v:,.0f}'
    return str(v)
