"""Training logs and their curves: the expert-load CSV a run appends to, and PNG plots drawn from its CSV logs.

- `append_expert_load(csv, epoch, shares)` / `read_expert_load(csv)`: each MoE layer's expert shares per epoch
  (columns epoch, layer, expert, share); `truncate_csv(csv, epoch)` drops the rows a resumed run trains again.

- `plot_losses(summary_csv, png)`: every loss column of a timm-style summary.csv (`train_loss`, `train_loss_masked`,
  ... and `eval_loss` where there is one) against the epoch, on log-log axes as the mLiT paper's Fig. 6.
- `plot_expert_load(expert_load_csv, png)`: one panel per MoE layer, each expert's share of the routing per epoch
  beside the even share 1/E, so that a layer whose experts collapse onto a few stands out.
- `plot_metric(summaries, column, png)`: one column (e.g. `eval_top1`) of several runs' summary.csv against the
  epoch, one line per run: the validation curves of runs compared with each other; `plot_series(series, png)` draws
  the same from values already read (e.g. recorded in a results file).

The plots of CSV logs read the files the run has written so far, so a run can redraw them after every epoch (and
the plots of a run that was killed show every finished epoch). Each PNG is written atomically: a reader sees the
previous plot or the new one, never a half-written file.
"""
import csv
import io
import math
import os
from collections import defaultdict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .files import atomic_write

__all__ = [
    'append_expert_load', 'read_expert_load', 'truncate_csv', 'loss_figure', 'plot_losses', 'plot_expert_load',
    'plot_confusion', 'read_column', 'plot_metric', 'plot_series',
]


def _pyplot():
    import matplotlib
    matplotlib.use('Agg', force=False)  # files only; no display needed
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str):
    atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=100))


def _loss_series(summary_csv: str) -> Dict[str, Tuple[List[int], List[float]]]:
    """{column: (epochs counted from 1, values)} for each loss column, positive finite values only."""
    with open(summary_csv, newline='') as f:
        columns = next(csv.reader(f), [])
    series = {}
    for col in columns:
        if 'loss' in col:
            pts = [(e, v) for e, v in zip(*read_column(summary_csv, col)) if v > 0]
            if pts:
                series[col] = ([p[0] for p in pts], [p[1] for p in pts])
    return series


def loss_figure(summary_csv: str, title: str = ''):
    """The matplotlib Figure of every loss column of `summary_csv` on log-log axes; None when there is nothing to
    draw. The caller closes it (`plot_losses` saves and closes it)."""
    series = _loss_series(summary_csv) if os.path.exists(summary_csv) else {}
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for col, (epochs, values) in series.items():
        ax.plot(epochs, values, marker='o' if len(epochs) < 20 else None, markersize=3,
                linewidth=2 if col in ('train_loss', 'loss') else 1.2, label=col)
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('epoch')
    ax.set_ylabel('loss')
    ax.set_title(title or 'training loss')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize='small')
    fig.tight_layout()
    return fig


def plot_losses(summary_csv: str, path: str, title: str = '') -> Optional[str]:
    """Draw every loss column of `summary_csv` on log-log axes into `path`; None when there is nothing to draw."""
    fig = loss_figure(summary_csv, title)
    if fig is None:
        return None
    try:
        _save(fig, path)
    finally:
        _pyplot().close(fig)
    return path


def read_column(summary_csv: str, column: str) -> Tuple[List[int], List[float]]:
    """(epochs counted from 1, values) of one column of a timm-style summary.csv; rows without a number there are
    skipped (train.py writes its header again on every resume). An epoch written twice (a run killed after its summary
    row, before its checkpoint, then resumed) counts once, with its last value. KeyError naming the columns there are
    when the file has no such column."""
    with open(summary_csv, newline='') as f:
        rows = list(csv.DictReader(f))
    if rows and column not in rows[0]:
        raise KeyError(f'{summary_csv} has no column {column!r} (it has {", ".join(rows[0])})')
    by_epoch = {}
    for r in rows:
        try:
            e, v = int(float(r['epoch'])) + 1, float(r[column])
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            by_epoch[e] = v
    epochs = sorted(by_epoch)
    return epochs, [by_epoch[e] for e in epochs]


def plot_metric(summaries: Dict[str, str], column: str, path: str, title: str = '', ylabel: str = '') -> Optional[str]:
    """One line per run ({label: summary.csv}) of `column` against the epoch; runs without the file or without a
    value yet are left out; None when no run has one."""
    series = {label: read_column(p, column) for label, p in summaries.items() if os.path.exists(p)}
    return plot_series(series, path, title=title or column, ylabel=ylabel or column)


def plot_series(series: Mapping[str, Tuple[Sequence[int], Sequence[float]]], path: str, title: str = '',
                ylabel: str = '') -> Optional[str]:
    """One line per run ({label: (epochs, values)}) against the epoch, runs without a value left out; None when no
    run has one."""
    series = {label: s for label, s in series.items() if len(s[0])}
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    try:
        for label, (epochs, values) in series.items():
            ax.plot(epochs, values, marker='o' if len(epochs) < 30 else None, markersize=3, label=label)
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
        ax.set_xlabel('epoch')
        ax.set_ylabel(ylabel)
        ax.set_title(title or ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize='small')
        fig.tight_layout()
        _save(fig, path)
    finally:
        plt.close(fig)
    return path


EXPERT_LOAD_COLUMNS = ('epoch', 'layer', 'expert', 'share')


def append_expert_load(path: str, epoch: int, shares: Dict[str, Sequence[float]]):
    """Append the rows of `epoch` ({layer name: each expert's share}) to an expert_load.csv, header first if new."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, 'a', newline='') as f:
        w = csv.writer(f)
        if new:
            w.writerow(EXPERT_LOAD_COLUMNS)
        for name, layer_shares in shares.items():
            for j, v in enumerate(layer_shares):
                w.writerow([epoch, name, j, f'{float(v):.6f}'])


def truncate_csv(path: str, start_epoch: int):
    """Drop the rows of epochs >= `start_epoch` from a CSV log whose first column is the epoch (a resumed run
    trains them again); atomically."""
    if not os.path.exists(path):
        return
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and r[0] != rows[0][0] and int(float(r[0])) < start_epoch]
    text = io.StringIO()
    csv.writer(text, lineterminator='\n').writerows(kept)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def read_expert_load(expert_load_csv: str) -> Dict[str, Dict[int, List[float]]]:
    """{layer: {epoch: [share of expert 0, 1, ...]}} from an expert_load.csv (columns epoch, layer, expert, share)."""
    loads: Dict[str, Dict[int, Dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    with open(expert_load_csv, newline='') as f:
        for r in csv.DictReader(f):
            loads[r['layer']][int(r['epoch'])][int(r['expert'])] = float(r['share'])
    return {layer: {e: [s[j] for j in sorted(s)] for e, s in sorted(by_epoch.items())}
            for layer, by_epoch in loads.items()}


def plot_expert_load(expert_load_csv: str, path: str, title: str = '') -> Optional[str]:
    """One panel per MoE layer: each expert's share of the routing per epoch, and the even share 1/E dashed."""
    loads = read_expert_load(expert_load_csv) if os.path.exists(expert_load_csv) else {}
    if not loads:
        return None
    plt = _pyplot()
    n = len(loads)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False, sharex=True)
    try:
        for ax, (layer, by_epoch) in zip(axes.flat, loads.items()):
            epochs = list(by_epoch)
            num_experts = len(next(iter(by_epoch.values())))
            for j in range(num_experts):
                ax.plot(epochs, [by_epoch[e][j] if j < len(by_epoch[e]) else float('nan') for e in epochs],
                        marker='o' if len(epochs) < 20 else None, markersize=3, label=f'expert {j}')
            ax.axhline(1 / num_experts, color='grey', linestyle='--', linewidth=1, label='even share')
            ax.set_ylim(0, 1)
            ax.set_title(layer, fontsize='small')
            ax.grid(True, alpha=0.3)
        for ax in axes.flat[n:]:
            ax.axis('off')
        for ax in axes[-1]:
            ax.set_xlabel('epoch')
        for ax in axes[:, 0]:
            ax.set_ylabel('share of routing')
        handles, labels = max((ax.get_legend_handles_labels() for ax in axes.flat[:n]), key=lambda hl: len(hl[0]))
        fig.legend(handles, labels, loc='lower center', ncol=min(len(labels), 7), fontsize='small')
        fig.suptitle(title or 'expert load per MoE layer')
        fig.tight_layout(rect=(0, 0.08, 1, 0.96))
        _save(fig, path)
    finally:
        plt.close(fig)
    return path


def plot_confusion(confusion, groups: Sequence[Sequence[int]], path: str, class_names: Optional[Sequence[str]] = None,
                   title: str = '') -> str:
    """A heat map of a confusion matrix (rows: true class, columns: predicted, each row as a share of its class),
    its classes ordered by super-class and each super-class framed, so the groups the clustering found show as
    the blocks of confusion they came from."""
    import numpy as np

    plt = _pyplot()
    confusion = np.asarray(confusion, dtype=float)
    order = [c for g in groups for c in g]
    rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    rates = rates[np.ix_(order, order)]
    names = [class_names[c] if class_names else str(c) for c in order]
    n = len(order)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 0.6 + 0.5 * n))
    im = ax.imshow(np.sqrt(rates), cmap='viridis')  # sqrt: the small confusions between classes stay visible
    for i in range(n):
        for j in range(n):
            if confusion[order[i], order[j]]:
                ax.text(j, i, f'{int(confusion[order[i], order[j]])}', ha='center', va='center', fontsize=7,
                        color='white' if rates[i, j] < 0.5 else 'black')
    start = 0
    for g in groups:
        ax.add_patch(plt.Rectangle((start - .5, start - .5), len(g), len(g), fill=False, edgecolor='red', lw=2))
        start += len(g)
    ax.set_xticks(range(n), names, rotation=60, ha='right', fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel('predicted')
    ax.set_ylabel('true class')
    ax.set_title(title or 'confusion matrix, classes grouped by super-class', fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, label='sqrt(share of the true class)')
    fig.tight_layout()
    try:
        _save(fig, path)
    finally:
        plt.close(fig)
    return path
