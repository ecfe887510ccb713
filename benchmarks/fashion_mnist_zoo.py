""" Fashion-MNIST recipes for a short CPU budget, chosen on a held-out validation split

    python benchmarks/fashion_mnist_zoo.py tune --out /var/tmp/zoo/out   # the pilots (mLiT-XXS): ~3h on 2 cores
    python benchmarks/fashion_mnist_zoo.py tune --out /var/tmp/zoo/out --dry-run   # the plan and the commands only
    python benchmarks/fashion_mnist_zoo.py zoo --out /var/tmp/zoo/out    # then every size with the chosen recipes
    python benchmarks/fashion_mnist_zoo.py curves --out /var/tmp/zoo/out # redraw the tables and plots from what ran
    python benchmarks/fashion_mnist_zoo.py publish --out /var/tmp/zoo/out   # ship every tested mmLiT (see below)

The last 5,000 of the 60k Fashion-MNIST training images are held out as the validation split (OUT/data holds the
first 55,000 as `train-*` and the held-out ones as `t10k-*`, so train.py's `--val-split validation` reads them and
logs their top-1 after every epoch in summary.csv). Pre-training and training see only the 55,000. Recipes are
chosen on the validation curves alone; the 10k test images are read only by the `zoo` phase's evaluations, once
per trained model, afterwards.

`tune` runs the MAE pre-training of mLiT-XXS (train_configs/pretrain/mmlit_xxs_fashion_mnist.yaml for the epochs
SCHEDULE gives XXS) and then each pilot of PILOTS: the paper's fine-tuning and from-scratch recipes
(train_configs/finetune/ and scratch/mlit_xxs_fashion_mnist.yaml, their 100-epoch schedules cut to PILOT_EPOCHS)
against variants for a short budget, all through timm's own train.py (`timm-mlit-run`, from $TIMM_SCRIPTS_DIR or
--timm-scripts), all with the same epochs and warm-up. It writes RESULTS_DIR/fashion_mnist_tune.md/.json (each
pilot's validation top-1 per epoch, wall time, img/s) and fashion_mnist_tune.png (the validation curves),
rewritten after every pilot.

`zoo` takes, of each kind (fine-tuning, scratch), the pilot with the best final validation top-1 in
fashion_mnist_tune.json, and trains every size with it on the same 55,000 images for SCHEDULE's epochs: mmLiT
(MAE pre-training, then fine-tuning) of XXS, XS and S first, then mLiT from scratch for as many epochs as the same
size was fine-tuned. Each final checkpoint is scored on the 10k test images by timm's validate.py, once; nothing is
selected on those scores. It writes RESULTS_DIR/fashion_mnist_zoo.md/.json (per size: test top-1, epochs, wall
time, img/s, the checkpoint and encoder to publish) and fashion_mnist_zoo.png (each run's validation curve).

`publish` writes, for every mmLiT row of fashion_mnist_zoo.json, the Hub folders timm_mlit/weights/
<arch>.mae_in_fashion_mnist (the MAE encoder) and <arch>.mae_ft_fashion_mnist (the tested final checkpoint) with
timm-mlit-publish, their model cards holding the test top-1 and the commands that made them; the pretrained cfg
entries it prints go into timm_mlit/mlit.py.

Stages run one after the other through benchmarks/fashion_mnist.py's orchestrator: each writes OUT/<stage>/ (the
script's outputs, stage.log, done.json); re-running the same command after a kill skips finished stages and resumes
an interrupted one from its newest checkpoint.
A row that fashion_mnist_zoo.json records as tested and whose training and test have no folder in OUT (its run
folder gone, or another OUT) is kept in the results as recorded and left out of the `zoo` and `publish` plans: it is
not trained, tested or published again. A run cut short before its test (a training still going, or killed and
not resumed) keeps its validation curve in the results (`unfinished`: the epochs done, the time spent, the machine),
however its run folder fares, until a run of the same row gets further or is tested; `curves` records it.
"""
import argparse
import dataclasses
import fcntl
import importlib.util
import json
import os
import re
import shlex
import sys
from datetime import datetime
from typing import Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import at_least, checked, device_name, results_folder  # noqa: E402

from timm_mlit._weights import WEIGHTS_DIR  # noqa: E402
from timm_mlit.cli import exit_on_error  # noqa: E402

_spec = importlib.util.spec_from_file_location('fashion_mnist_benchmark', os.path.join(HERE, 'fashion_mnist.py'))
fm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fm)

HOLDOUT = 5000  # the last 5,000 training images: the validation split
PRETRAIN_WARMUP = 1
PILOT_EPOCHS, PILOT_WARMUP = 3, 1
TRAIN_IMAGES = 60000 - HOLDOUT
# per size: (MAE pre-training epochs, fine-tuning = scratch epochs). Pre-training shrinks with the size as Table 3's
# 8000/6000/4000 epochs do. Every size fine-tunes (and trains from scratch) 20 epochs: XXS's validation top-1 first
# passed its 91% target at epoch 15 of 20, so the larger sizes' 91.5% and 92% want no fewer, and equal epochs make the
# S > XS > XXS comparison a fair one. On 2 CPU cores that is ~3.4 h (XXS, 90 img/s), ~4.7 h (XS, 67 img/s) and, at
# the speed the parameter counts suggest, ~7 h (S) of fine-tuning.
SCHEDULE = {'xxs': (10, 20), 'xs': (8, 20), 's': (5, 20)}
ZOO_WARMUP = 1
VAL_COLUMN = 'eval_top1'  # train.py's summary.csv: top-1 on --val-split after each epoch


@dataclasses.dataclass(frozen=True)
class Pilot:
    key: str
    label: str
    kind: str  # 'finetune' (from the MAE encoder) | 'scratch'
    extra: Sequence[str] = ()  # train.py arguments over the recipe's


PILOTS = (
    Pilot('ft_paper', 'fine-tune, paper recipe (AutoAugment, batch 256, layer decay 0.8)', 'finetune'),
    Pilot('ft_noaa_b128', 'fine-tune, no AutoAugment, batch 128, layer decay 0.8', 'finetune',
          ('--aa', '', '-b', '128')),
    Pilot('ft_noaa_b128_ld09', 'fine-tune, no AutoAugment, batch 128, layer decay 0.9', 'finetune',
          ('--aa', '', '-b', '128', '--layer-decay', '0.9')),
    # the scratch pilot's lr 2e-3 (4x its recipe's at batch 128) given to fine-tuning too, so that pre-training is
    # not judged against a better-tuned scratch run; with layer decay 0.9 and without any (1.0)
    Pilot('ft_noaa_b128_ld09_lr2e3', 'fine-tune, no AutoAugment, batch 128, layer decay 0.9, lr 2e-3', 'finetune',
          ('--aa', '', '-b', '128', '--layer-decay', '0.9', '--lr', '2e-3')),
    Pilot('ft_noaa_b128_ld10_lr2e3', 'fine-tune, no AutoAugment, batch 128, no layer decay, lr 2e-3', 'finetune',
          ('--aa', '', '-b', '128', '--layer-decay', '1.0', '--lr', '2e-3')),
    Pilot('sc_paper', 'scratch, paper recipe (AutoAugment, batch 256)', 'scratch'),
    Pilot('sc_noaa_b128_lr2e3', 'scratch, no AutoAugment, batch 128, lr 2e-3', 'scratch',
          ('--aa', '', '-b', '128', '--lr', '2e-3')),
)


def prepare_holdout(source_dir: str, data_dir: str, holdout: int = HOLDOUT, log=print):
    """data_dir/train-* = the first len - `holdout` training images of source_dir, data_dir/t10k-* = the last
    `holdout` (the validation split); rewritten only when missing or made from another source or split."""
    from timm_mlit.data import read_idx, write_idx
    marker = os.path.join(data_dir, 'holdout.json')
    spec = dict(source=os.path.abspath(source_dir), holdout=holdout)
    if (fm._read_json(marker) or {}).get('spec') == spec:
        return
    arrays = {kind: read_idx(fm.find_idx(source_dir, f'train-{kind}-ubyte')).numpy()
              for kind in ('images-idx3', 'labels-idx1')}
    n = len(arrays['labels-idx1'])
    if not 0 < holdout < n:
        raise fm.BenchmarkError(f'cannot hold out {holdout} of {n} training images')
    os.makedirs(data_dir, exist_ok=True)
    for kind, a in arrays.items():
        write_idx(os.path.join(data_dir, f'train-{kind}-ubyte'), a[:n - holdout])
        write_idx(os.path.join(data_dir, f't10k-{kind}-ubyte'), a[n - holdout:])
    fm._write_json(marker, dict(spec=spec, train_images=n - holdout, validation_images=holdout))
    log(f'data: {n - holdout} training images and {holdout} held-out validation images in {data_dir}')


def pretrain_stage(out: str, data_dir: str, model: str, epochs: int, device: str, workers: int,
                   python: str) -> fm.Stage:
    name = f'pretrain_{model}'
    argv = [python, '-m', 'timm_mlit.pretrain', '-c', fm.PRETRAIN_CFG_CPU, '--model', model,
            '--data-dir', data_dir, '--train-split', 'train', '--epochs', str(epochs),
            '--warmup-epochs', str(PRETRAIN_WARMUP), '--device', device, '-j', str(workers), '--log-interval', '50',
            '--checkpoint-hist', '1', '--output', out, '--experiment', name]
    return fm.Stage(name, 'pretrain', argv, epochs, TRAIN_IMAGES, fm.NOMINAL_IMG_S.get(f'pretrain_{model}', 50.),
                    row=model)


def train_argv(out: str, data_dir: str, scripts_dir: str, name: str, cfg: str, model: str, epochs: int, warmup: int,
               device: str, workers: int, python: str, extra: Sequence[str] = ()) -> List[str]:
    """train.py through timm-mlit-run, validating on the held-out split after every epoch."""
    argv = [python, '-m', 'timm_mlit.run', os.path.join(scripts_dir, 'train.py'), '-c', cfg, '--model', model,
            '--data-dir', data_dir, '--val-split', 'validation', '--epochs', str(epochs), '--warmup-epochs',
            str(warmup), '--device', device, '-j', str(workers), '--log-interval', '50', '--checkpoint-hist', '1',
            '--output', out, '--experiment', name, *extra]
    if device.startswith('cuda'):  # on a CPU timm-mlit-run picks the precision from the CPU's bf16 units
        argv += ['--amp', '--amp-dtype', 'bfloat16']
    return argv


def make_tune_plan(out: str, source_dir: str, scripts_dir: str, device: str = 'cpu', workers: int = 2,
                   python: str = sys.executable, pilots: Sequence[Pilot] = PILOTS) -> fm.Plan:
    out = os.path.abspath(out)
    data_dir = os.path.join(out, 'data')
    model = 'mlit_xxs'
    pre = pretrain_stage(out, data_dir, model, SCHEDULE['xxs'][0], device, workers, python)
    stages = [pre]
    for p in pilots:
        name = f'tune_{p.key}'
        cfg, extra = fm.SCRATCH_CFG, list(p.extra)
        if p.kind == 'finetune':
            cfg, extra = fm.FINETUNE_CFG, extra + ['--pretrained-path', os.path.join(out, pre.name,
                                                                                    'encoder.safetensors')]
        argv = train_argv(out, data_dir, scripts_dir, name, cfg, model, PILOT_EPOCHS, PILOT_WARMUP, device, workers,
                          python, extra)
        stages.append(fm.Stage(name, 'train', argv, PILOT_EPOCHS, TRAIN_IMAGES, fm.NOMINAL_IMG_S[model], row=p.key))
    p_epochs = SCHEDULE['xxs'][0]
    budget = fm.Budget('tune', f'Recipe pilots: mLiT-XXS, MAE pre-training {p_epochs} epochs, then each pilot '
                       f'{PILOT_EPOCHS} epochs ({PILOT_WARMUP} warm-up) on the first {TRAIN_IMAGES:,} training '
                       f'images, validated on the last {HOLDOUT:,}', sizes=('xxs',), epochs=PILOT_EPOCHS,
                       warmup_epochs=PILOT_WARMUP, pretrain_epochs=p_epochs,
                       pretrain_warmup_epochs=PRETRAIN_WARMUP, peers=())
    return fm.Plan(budget, out, data_dir, '', stages, [], PILOT_EPOCHS, {model: p_epochs}, TRAIN_IMAGES,
                   TRAIN_IMAGES, 0, device)


def choose(rows: Sequence[dict], pilots: Sequence[Pilot] = PILOTS) -> Dict[str, Pilot]:
    """Of each kind ('finetune', 'scratch') among `rows` (fashion_mnist_tune.json's), the pilot with the best final
    validation top-1; the first listed, i.e. the paper's recipe, on a tie."""
    by_key = {p.key: p for p in pilots}
    best: Dict[str, tuple] = {}
    for r in rows:
        p = by_key.get(r['key'])
        if p is not None and r['final_val_top1'] is not None and (
                p.kind not in best or r['final_val_top1'] > best[p.kind][1]):
            best[p.kind] = (p, r['final_val_top1'])
    return {kind: p for kind, (p, _) in best.items()}


def chosen_pilots(results_dir: str, pilots: Sequence[Pilot] = PILOTS) -> Dict[str, Pilot]:
    """{'finetune': pilot, 'scratch': pilot}, `choose`n from a complete fashion_mnist_tune.json in results_dir."""
    path = os.path.join(results_dir, 'fashion_mnist_tune.json')
    res = fm._read_json(path)
    missing = sorted({p.key for p in pilots} - {r['key'] for r in (res or {}).get('rows', []) if r.get('complete')})
    if not res or not res['meta'].get('complete') or missing:
        lacking = f' (no {", ".join(missing)})' if missing else ''
        raise fm.BenchmarkError(f'{path} is missing or incomplete{lacking}: run the tune phase to its end first')
    chosen = choose(res['rows'], pilots)
    if set(chosen) != {'finetune', 'scratch'}:
        raise fm.BenchmarkError(f'{path} lacks a fine-tuning or a scratch pilot')
    return chosen


def tune_table(data: dict, pilots: Sequence[Pilot] = PILOTS) -> str:
    """fashion_mnist_tune.json's pilots as a markdown table (its .md file's and docs/results.md's), the pilot `choose`
    takes of each kind marked once every pilot has run."""
    rows, meta = data['rows'], data['meta']
    chosen = {p.key for p in choose(rows, pilots).values()} if meta.get('complete') else set()
    lines = [] if meta.get('complete') else [
        f'**Incomplete: {sum(r["complete"] for r in rows)} of {len(pilots)} pilots done.**', '']
    lines += ['| pilot | validation top-1 per epoch (%) | final | wall time | img/s | |',
              '|---|---|---:|---:|---:|---|']
    for r in rows:
        final = '-' if r['final_val_top1'] is None else f'{r["final_val_top1"]:.2f}'
        lines.append(f'| {r["label"]} | {" / ".join(f"{v:.2f}" for v in r["val_top1"]) or "-"} | {final} | '
                     f'{fm.fmt_s(r["wall_s"]) if r["wall_s"] else "-"} | {r["img_s"] or "-"} | '
                     f'{"**chosen**" if r["key"] in chosen else ""} |')
    return '\n'.join(lines)


def eval_stage(out: str, test_dir: str, scripts_dir: str, key: str, model: str, train_name: str, device: str,
               workers: int, python: str) -> fm.Stage:
    """validate.py on the 10k test images, in float32 as the shipped weights are used (`python -m timm_mlit`)."""
    argv = ['env', 'TIMM_MLIT_PRECISION=float32', python, '-m', 'timm_mlit.run', *fm.validate_args(
        scripts_dir, model, os.path.join(out, train_name, 'last.pth.tar'), test_dir,
        os.path.join(out, f'eval_{key}', 'results.json'), device, workers, log_freq=10)]
    return fm.Stage(f'eval_{key}', 'eval', argv, images=10000, nominal_img_s=fm.NOMINAL_IMG_S['eval'], row=key)


def make_zoo_plan(out: str, source_dir: str, scripts_dir: str, chosen: Dict[str, Pilot],
                  sizes: Sequence[str] = ('xxs', 'xs', 's'), device: str = 'cpu', workers: int = 2,
                  python: str = sys.executable) -> fm.Plan:
    """mmLiT of every size (pre-train, fine-tune, test), then mLiT from scratch of every size (train, test)."""
    out = os.path.abspath(out)
    data_dir = os.path.join(out, 'data')
    stages, rows = [], []
    for kind in ('finetune', 'scratch'):
        pilot = chosen[kind]
        for size in sizes:
            model = f'mlit_{size}'
            p_epochs, epochs = SCHEDULE[size]
            extra, pre = list(pilot.extra), None
            if kind == 'finetune':
                pre = pretrain_stage(out, data_dir, model, p_epochs, device, workers, python)
                extra += ['--pretrained-path', os.path.join(out, pre.name, 'encoder.safetensors')]
                stages.append(pre)
            key = f'mmlit_{size}' if kind == 'finetune' else f'mlit_{size}'
            name = f'{kind}_{model}'
            cfg = fm.FINETUNE_CFG if kind == 'finetune' else fm.SCRATCH_CFG
            stages.append(fm.Stage(name, 'train', train_argv(out, data_dir, scripts_dir, name, cfg, model, epochs,
                                                              ZOO_WARMUP, device, workers, python, extra),
                                   epochs, TRAIN_IMAGES, fm.NOMINAL_IMG_S.get(model, 20.), row=key))
            stages.append(eval_stage(out, source_dir, scripts_dir, key, model, name, device, workers, python))
            label = f'mmLiT-{size.upper()} (MAE + fine-tune)' if pre else f'mLiT-{size.upper()} (from scratch)'
            rows.append(fm.Row(key, label, model, {}, name, f'eval_{key}', pretrain=pre.name if pre else None,
                               recipe=f'{os.path.relpath(cfg, fm.REPO)} {shlex.join(pilot.extra)}'.strip()))
    budget = fm.Budget('zoo', f'mmLiT and mLiT on the first {TRAIN_IMAGES:,} Fashion-MNIST training images '
                       f'(validated on the last {HOLDOUT:,}), the recipes chosen on the validation split; '
                       f'final checkpoints tested once on the 10,000 test images', sizes=tuple(sizes),
                       epochs=None, warmup_epochs=ZOO_WARMUP, pretrain_epochs=None,
                       pretrain_warmup_epochs=PRETRAIN_WARMUP, peers=())
    return fm.Plan(budget, out, data_dir, source_dir, stages, rows, 0,
                   {f'mlit_{z}': SCHEDULE[z][0] for z in sizes}, TRAIN_IMAGES, TRAIN_IMAGES, 10000, device)


# Quoted from the paper's Table 8 (100 epochs on a GPU, 36x36 images; mmLiT pre-trained on CIFAR-100): top-1 (%)
# of mmLiT / mLiT per size on each dataset, and the parameter count (M) with a 100-class head.
PAPER_DATASETS = ('CIFAR-100', 'CIFAR-10', 'SVHN', 'Flowers102')
PAPER_TABLE8 = {
    'xxs': dict(params_m=0.67, mmlit=(73.42, 92.21, 97.32, 48.59), mlit=(56.98, 80.78, 94.97, 35.34)),
    'xs': dict(params_m=1.22, mmlit=(75.91, 94.01, 97.26, 57.46), mlit=(57.93, 82.74, 95.43, 35.41)),
    's': dict(params_m=2.38, mmlit=(78.18, 94.62, 97.39, 59.59), mlit=(60.58, 84.03, 96.01, 34.41)),
}


def _machine_name(hardware: Optional[str]) -> Optional[str]:
    """The CPU (or GPU) model of a recorded hardware string: its first part."""
    return hardware.split(',')[0].split(' (')[0] if hardware else None


def _machine(row: dict) -> Optional[str]:
    """The CPU (or GPU) model that measured a row."""
    return _machine_name((row.get('measured') or {}).get('hardware'))


def _row_name(key: str) -> str:
    """'mmlit_xs' -> 'mmLiT-XS'."""
    kind, size = key.split('_')
    return f'{"mmLiT" if kind == "mmlit" else "mLiT"}-{size.upper()}'


def machines_note(rows: Sequence[dict]) -> List[str]:
    """Where the rows were measured on more than one machine, a line saying which row ran where (wall times and
    img/s compare only between rows of one machine); else nothing."""
    machines = {}
    for r in rows:
        if _machine(r):
            machines.setdefault(_machine(r), []).append(_row_name(r['key']))
    if len(machines) < 2:
        return []
    where = '; '.join(f'{", ".join(dict.fromkeys(labels))} on {m}' for m, labels in machines.items())
    return ['', f'Measured on more than one machine (compare wall times and img/s within one): {where}.']


def size_table(data: dict, sizes: Sequence[str] = tuple(SCHEDULE)) -> str:
    """fashion_mnist_zoo.json per size: mmLiT (MAE + fine-tuning) beside mLiT (from scratch, as many epochs), the
    test top-1, wall time and img/s measured here, then the paper's Table 8 for the same sizes, marked as quoted, and
    the paper's two claims checked on what ran (pre-training helps at every size; S > XS > XXS)."""
    rows = {r['key']: r for r in data['rows']}
    unfinished = {u['key']: u for u in data.get('unfinished', [])}
    sizes = [z for z in SCHEDULE if z in sizes]  # smallest first, as the S > XS > XXS check reads them

    def get(key, fmt, progress=True):
        """fmt(row); else, for a run not tested, how far it got (or '-': `progress` False); else 'not run yet'."""
        if key in rows:
            return fmt(rows[key])
        u = unfinished.get(key)
        if not u:
            return 'not run yet'
        if not progress:
            return '-'
        done = u['epochs_done'] >= u['epochs']
        return 'trained, not tested' if done else f'not finished ({u["epochs_done"]} of {u["epochs"]} epochs)'

    lines = ['| size | params | epochs: MAE + fine-tune / scratch | mmLiT test top-1 (%) | mLiT test top-1 (%) | '
             'gain from pre-training | wall time: mmLiT (MAE + fine-tune) / mLiT | img/s: MAE / fine-tune / '
             'scratch / mmLiT test |', '|---|---:|---:|---:|---:|---:|---:|---:|']
    for z in sizes:
        mm, ml = rows.get(f'mmlit_{z}'), rows.get(f'mlit_{z}')
        params = next((f'{r["params"]:,}' for r in (mm, ml) if r and r.get('params')), '-')
        gain = f'{mm["top1"] - ml["top1"]:+.2f}' if mm and ml else '-'
        wall = ' / '.join([get(f'mmlit_{z}', lambda r: f'{fm.fmt_s(r["wall_s"])} ({fm.fmt_s(r["pretrain_wall_s"])}'
                                                       f' + {fm.fmt_s(r["train_wall_s"])})', False),
                           get(f'mlit_{z}', lambda r: fm.fmt_s(r['wall_s']), False)])
        img_s = ' / '.join('-' if v is None else f'{v:.0f}' for v in (
            mm and mm['pretrain_img_s'], mm and mm['train_img_s'], ml and ml['train_img_s'],
            mm and mm['test_img_s']))  # test speeds of one model (eval runs float32): mLiT's in the run table
        lines.append(f'| {z.upper()} | {params} | {SCHEDULE[z][0]} + {SCHEDULE[z][1]} / {SCHEDULE[z][1]} | '
                     f'{get(f"mmlit_{z}", lambda r: format(r["top1"], ".2f"))} | '
                     f'{get(f"mlit_{z}", lambda r: format(r["top1"], ".2f"))} | {gain} | {wall} | {img_s} |')
    lines += machines_note([r for r in data['rows'] if r['key'].split('_')[-1] in sizes])
    lines += ['', 'Quoted from the paper\'s Table 8 (not measured here: 100 epochs on a GPU, 36x36 images, mmLiT '
              'pre-trained on CIFAR-100), top-1 (%) as mmLiT / mLiT:', '',
              '| size | params (M) | ' + ' | '.join(PAPER_DATASETS) + ' |',
              '|---|---:|' + '---:|' * len(PAPER_DATASETS)]
    for z in sizes:
        q = PAPER_TABLE8[z]
        lines.append(f'| {z.upper()} | {q["params_m"]} | '
                     + ' | '.join(f'{a:.2f} / {b:.2f}' for a, b in zip(q['mmlit'], q['mlit'])) + ' |')
    claims = []  # each "no" once a tested size breaks it, "open" while a row is missing, else "yes"
    both = [z for z in sizes if f'mmlit_{z}' in rows and f'mlit_{z}' in rows]
    if both:
        helps = [z.upper() for z in both if rows[f'mmlit_{z}']['top1'] > rows[f'mlit_{z}']['top1']]
        behind = [z.upper() for z in both if rows[f'mmlit_{z}']['top1'] <= rows[f'mlit_{z}']['top1']]
        missing = [_row_name(k) for z in sizes if z not in both for k in (f'mmlit_{z}', f'mlit_{z}') if k not in rows]
        verdict = 'no' if behind else 'open' if missing else 'yes'
        claims.append(f'pre-training helps at every size: {verdict} (mmLiT ahead at {", ".join(helps) or "no size"}'
                      + (f', not at {", ".join(behind)}' if behind else '')
                      + (f'; {", ".join(missing)} not tested' if missing else '') + ')')
    for kind, label in (('mmlit', 'mmLiT'), ('mlit', 'mLiT')):
        have = [z for z in sizes if f'{kind}_{z}' in rows]
        if len(have) > 1:
            top1 = [rows[f'{kind}_{z}']['top1'] for z in have]
            order = all(a < b for a, b in zip(top1, top1[1:]))  # an order broken among the tested ones stays broken
            missing = [_row_name(f'{kind}_{z}') for z in sizes if z not in have]
            verdict = 'no' if not order else 'open' if missing else 'yes'
            so_far = f' ({" > ".join(z.upper() for z in reversed(have))}; {", ".join(missing)} not tested)' \
                if missing and order else ''
            claims.append(f'{label} {" > ".join(z.upper() for z in reversed(sizes))}: {verdict}{so_far}')
    if claims:
        lines += ['', 'The paper\'s claims on this data: ' + '; '.join(claims) + '.']
    return '\n'.join(lines)


ZOO_KEYS = tuple(f'{kind}_{z}' for kind in ('mmlit', 'mlit') for z in SCHEDULE)  # the results' row order


def _zoo_order(key: str) -> Tuple[int, str]:
    """The results' row order: ZOO_KEYS first, in its order, then any other key by name."""
    return ZOO_KEYS.index(key) if key in ZOO_KEYS else len(ZOO_KEYS), key


def recorded_rows(results_dir: str) -> Dict[str, dict]:
    """{row key: row} of the tested runs fashion_mnist_zoo.json in results_dir records."""
    return {r['key']: r for r in (fm._read_json(os.path.join(results_dir, 'fashion_mnist_zoo.json')) or {})
            .get('rows', [])}


def without_recorded(plan: fm.Plan, recorded: Dict[str, dict]) -> Tuple[fm.Plan, List[str]]:
    """`plan` less the rows (and their stages) that `recorded` holds as tested and whose training and test have no
    folder in plan.out, i.e. whose run folder is gone: the results keep them, and nothing trains them again. A row
    whose training has a folder in plan.out (finished or cut short) stays in the plan; a pre-training alone does not
    bring a row back (the `tune` phase leaves one of mLiT-XXS), so a recorded row's pre-training cut short is not
    resumed. Returns (the plan, the keys left out)."""
    gone = [row for row in plan.rows if row.key in recorded and not any(
        os.path.isdir(os.path.join(plan.out, n)) for n in (row.train, row.eval))]
    names = {n for row in gone for n in (row.pretrain, row.train, row.eval) if n}
    return dataclasses.replace(plan, stages=[s for s in plan.stages if s.name not in names],
                               rows=[row for row in plan.rows if row not in gone]), [row.key for row in gone]


def unfinished_runs(plan: fm.Plan, previous: Sequence[dict], tested: Sequence[str]) -> List[dict]:
    """The runs not tested yet whose training logged a validation curve in plan.out (cut short, still going, or
    trained and not tested): each with that curve, the epochs done of those planned, the time spent on it in that
    folder (killed attempts included) and the machine that wrote the record (the run folder's: keep OUT on the
    machine that trains). Merged with those the results recorded before (`previous`): of one row's two, the one that
    got further is kept, so that a lost run folder, or a run begun again from zero, never shortens the curve the
    results show. Rows in `tested` (tested since) have none: their finished row holds the curve."""
    from timm_mlit.plots import read_column
    runs = {u['key']: u for u in previous if u['key'] not in tested}
    for x in plan.rows:
        stage = next((s for s in plan.stages if s.name == x.train), None)
        summary = os.path.join(plan.out, x.train, 'summary.csv')
        if x.key in tested or stage is None or not os.path.exists(summary):
            continue
        top1 = read_column(summary, VAL_COLUMN)[1]
        if not top1 or len(top1) < runs.get(x.key, {}).get('epochs_done', 0):
            continue
        wall = (fm._read_json(os.path.join(plan.out, x.train, 'wall.json')) or {}).get('wall_s')
        runs[x.key] = dict(key=x.key, model=x.label, arch=x.model, recipe=x.recipe, epochs=stage.epochs,
                           epochs_done=len(top1), val_top1=top1, wall_s=None if wall is None else round(wall, 1),
                           hardware=fm.hardware(plan.device), out=plan.out,
                           written=datetime.now().isoformat(timespec='seconds'))
    return sorted(runs.values(), key=lambda u: _zoo_order(u['key']))


def write_zoo_results(plan: fm.Plan, results_dir: str) -> Dict[str, str]:
    """fashion_mnist_zoo.json/.md (a row per finished, tested run) and fashion_mnist_zoo.png (validation curves).
    A row the results already hold and plan.out has not (yet) finished again is kept as it was, so that losing or
    moving a run folder, or running some sizes alone (`--sizes`), never drops a tested model from the results. Each
    row records the hardware and code that trained it and its run folder (`measured`): its training's done.json
    holds them, and so a row keeps them however often, and by whatever code, the results are written again."""
    from timm_mlit.plots import plot_series, read_column
    stem = os.path.join(results_dir, 'fashion_mnist_zoo')
    previous = fm._read_json(stem + '.json') or {}
    recorded = {r['key']: r for r in previous.get('rows', [])}
    current = dict(hardware=fm.hardware(plan.device), code=fm.code_version())
    rows = fm.collect(plan)
    for r in rows:
        summary = os.path.join(plan.out, next(x.train for x in plan.rows if x.key == r['key']), 'summary.csv')
        r['val_top1'] = read_column(summary, VAL_COLUMN)[1] if os.path.exists(summary) else []
        # a done.json written before stages recorded what ran them: what the results recorded for the same run,
        # else (never recorded) the code writing now, which is the code that just tested it
        same = recorded.get(r['key'], {})
        if any(same.get(k) != r[k] for k in ('checkpoint', 'train_wall_s', 'top1')):
            same = {}
        r['measured'] = dict(r['measured'] or same.get('measured') or current, out=plan.out)
    finished = {r['key'] for r in rows}
    kept = [r for r in previous.get('rows', []) if r['key'] not in finished]
    for r in kept:  # rows written before each row recorded its own: the meta of the results that held them
        r.setdefault('measured', {k: previous['meta'].get(k) for k in ('hardware', 'code', 'out')})
    rows = sorted(rows + kept, key=lambda r: _zoo_order(r['key']))
    unfinished = unfinished_runs(plan, previous.get('unfinished', []), [r['key'] for r in rows])
    sizes = tuple(z for z in SCHEDULE if z in plan.budget.sizes or any(r['arch'] == f'mlit_{z}'
                                                                       for r in rows + unfinished))
    expected = {f'{kind}_{z}' for kind in ('mmlit', 'mlit') for z in sizes}  # as the size table shows them
    hardware = sorted({r['measured']['hardware'] for r in rows} or {current['hardware']})
    meta = dict(description=plan.budget.description, hardware='; '.join(hardware), code=current['code'],
                schedule={z: dict(pretrain_epochs=SCHEDULE[z][0], epochs=SCHEDULE[z][1]) for z in sizes},
                written=datetime.now().isoformat(timespec='seconds'), out=plan.out,
                complete=expected <= {r['key'] for r in rows})
    os.makedirs(results_dir, exist_ok=True)
    fm._write_json(stem + '.json', dict(meta=meta, rows=rows, unfinished=unfinished))
    curves = {r['model']: (range(1, len(r['val_top1']) + 1), r['val_top1']) for r in rows}
    curves.update({f'{u["model"]}: {u["epochs_done"]} of {u["epochs"]} epochs, not tested':
                   (range(1, u['epochs_done'] + 1), u['val_top1']) for u in unfinished})
    png = plot_series(curves, stem + '.png', ylabel='validation top-1 (%)',
                      title=f'Fashion-MNIST: top-1 on the {HOLDOUT:,} held-out training images')
    lines = ['# Fashion-MNIST: mmLiT and mLiT of every size (recipes chosen on the validation split)', '',
             f'{meta["description"]}.', '', f'Hardware: {meta["hardware"]}.', '']
    if not meta['complete']:
        lines += [f'**Incomplete: {len(rows)} of {len(expected)} rows so far.**', '']
    lines += [size_table(dict(meta=meta, rows=rows, unfinished=unfinished), sizes), '', '## Every run', '']
    lines += ['| Model | Params | Epochs (pre-train + train) | Test top-1 (%) | Final validation top-1 (%) | '
              'Wall time (pre-train + train) | img/s (pre-train / train / test) |',
              '|---|---:|---:|---:|---:|---:|---:|']
    for r in rows:
        wall = fm.fmt_s(r['wall_s']) + (f' ({fm.fmt_s(r["pretrain_wall_s"])} + {fm.fmt_s(r["train_wall_s"])})'
                                         if r['pretrain_epochs'] else '')
        val = f'{r["val_top1"][-1]:.2f}' if r['val_top1'] else '-'
        img_s = ' / '.join('-' if v is None else f'{v:.0f}' for v in (r['pretrain_img_s'], r['train_img_s'],
                                                                       r['test_img_s']))
        lines.append(f'| {r["model"]} | {r["params"] or 0:,} | {r["pretrain_epochs"]} + {r["epochs"]} | '
                     f'{r["top1"]:.2f} | {val} | {wall} | {img_s} |')
    lines += machines_note(rows)
    if unfinished:
        lines += ['', '## Not tested yet', '', '| Model | Epochs done | Validation top-1 per epoch (%) | '
                  'Time spent so far | Machine |', '|---|---:|---|---:|---|']
        lines += [f'| {u["model"]} | {u["epochs_done"]} of {u["epochs"]} | '
                  f'{" / ".join(f"{v:.2f}" for v in u["val_top1"])} | '
                  f'{"-" if u["wall_s"] is None else fm.fmt_s(u["wall_s"])} | {_machine_name(u["hardware"])} |'
                  for u in unfinished]
    written = f'Written by benchmarks/fashion_mnist_zoo.py at {meta["written"]}'
    lines += ['', f'{written}; the curves: {os.path.basename(png)}.' if png else f'{written}.']
    from timm_mlit.files import atomic_write
    atomic_write(stem + '.md', lambda f: f.write(('\n'.join(lines) + '\n').encode()))
    return dict(json=stem + '.json', md=stem + '.md', png=png)


def _done(plan: fm.Plan, stage: fm.Stage) -> dict:
    return fm._read_json(os.path.join(fm.stage_dir(plan, stage), 'done.json')) or {}


def ran_argv(stage: fm.Stage, done: dict) -> Tuple[List[str], bool]:
    """(the command a finished stage ran, its `--resume` dropped; True) from its done.json record `done`, or (the
    plan's command; False) where it records none (a stage run outside the orchestrator, or recorded after a kill)."""
    argv = list(done.get('argv') or [])
    if '--resume' in argv:
        i = argv.index('--resume')
        del argv[i:i + 2]
    return (argv, True) if argv else (list(stage.argv), False)


def _in_repo(arg: str) -> str:
    """A recipe path relative to the repository (a run may have used another clone's absolute path)."""
    return 'train_configs/' + arg.split('/train_configs/', 1)[1] if '/train_configs/' in arg else arg


def portable(argv: Sequence[str], out: str) -> str:
    """`argv` as a shell line that runs from the timm-mlit repository root on another machine: the run folder as
    "$OUT", timm's scripts folder as "$TIMM_SCRIPTS_DIR", recipes relative to the repository, the interpreter as
    `python`."""
    scripts = next((os.path.dirname(a) for a in argv if os.path.basename(a) in ('train.py', 'validate.py')), None)
    words = []
    for a in argv:
        if os.path.isabs(a) and os.path.basename(a).startswith('python'):
            words.append('python')
            continue
        a = _in_repo(a)
        for prefix, var in sorted(((out, 'OUT'), (scripts or '', 'TIMM_SCRIPTS_DIR')), key=lambda x: -len(x[0])):
            if prefix and (a == prefix or a.startswith(prefix + '/')):
                words.append(f'"${var}"' + shlex.quote(a[len(prefix):]) if a != prefix else f'"${var}"')
                break
        else:
            words.append(shlex.quote(a))
    return ' '.join(words)


def run_precision(checkpoint: Optional[str], log: Optional[str] = None) -> str:
    """The training precision a checkpoint's recorded arguments say (timm's train.py and timm-mlit-pretrain both
    record `amp` / `amp_dtype`); else the one timm-mlit-pretrain / timm-mlit-run logged choosing in `log`."""
    from timm_mlit.checkpoint import checkpoint_args
    args = checkpoint_args(checkpoint) or {}
    if args.get('amp') is True:
        return f'{args.get("amp_dtype") or "float16"} autocast'
    if args.get('amp') is False:
        return 'float32'
    if log and os.path.isfile(log):
        with open(log, errors='replace') as f:
            found = re.findall(r'(?:precision: |timm-mlit-run: )(float32|\w+ autocast) \(', f.read())
        if found:
            return f'{found[-1]} (as its log records)'
    return 'not recorded (chosen for the machine: bfloat16 autocast where the CPU has bfloat16 units, else float32)'


def write_commands(path: str, plan: fm.Plan, stages: Sequence[fm.Stage]) -> None:
    """The shell commands that made a published model, in order, with what they need to run elsewhere."""
    kinds = {s.kind for s in stages}
    head = ('# From the timm-mlit repository root. OUT: the run folder; OUT/data holds the first '
            f'{TRAIN_IMAGES:,} Fashion-MNIST training images (train-*) and the last {HOLDOUT:,} (t10k-*, the '
            'validation split), as `benchmarks/fashion_mnist_zoo.py tune` writes them.')
    if kinds & {'train', 'eval'}:
        head += ' TIMM_SCRIPTS_DIR: a pytorch-image-models checkout (train.py, validate.py).'
    if 'eval' in kinds:
        head += f' The 10k test images: {plan.test_dir}.'
    lines = [head, '# --model overrides the model of the mlit_xxs recipe files; a stage cut short was resumed by its '
             'command with --resume "$OUT"/<stage>/last.pth.tar added.']
    commands = []
    for stage in stages:
        done = _done(plan, stage)
        argv, recorded = ran_argv(stage, done)
        if stage.kind != 'eval':
            log = os.path.join(fm.stage_dir(plan, stage), 'stage.log')
            lines.append(f'# {stage.name}: training precision {run_precision(done.get("checkpoint"), log)}')
        if not recorded:
            lines.append(f'# {stage.name} ran outside the orchestrator with the same arguments and images; its '
                         'command as the orchestrator runs it:')
        if stage.kind == 'eval':  # validate.py writes its results file but not the folder (the orchestrator made it)
            commands.append(portable(['mkdir', '-p', fm.stage_dir(plan, stage)], plan.out))
        commands.append(portable(argv, plan.out))
    with open(path, 'w') as f:
        f.write('\n'.join(lines + commands) + '\n')


def _publish(publish: Callable[[List[str]], int], argv: List[str]) -> None:
    try:
        rc = publish(argv)
    except SystemExit as e:  # (timm-mlit-publish reports its errors by exiting)
        rc = e.code
    if rc not in (0, None):
        raise fm.BenchmarkError(f'timm-mlit-publish {" ".join(argv[:5])} failed (its error is above)')


def publish_zoo(plan: fm.Plan, results_dir: str, weights_dir: str,
                publish: Optional[Callable[[List[str]], int]] = None) -> List[str]:
    """Publish every tested mmLiT of fashion_mnist_zoo.json that ran in plan.out (its recorded checkpoint the one
    OUT's finished training wrote) with timm-mlit-publish: its MAE encoder as
    `<arch>.mae_in_fashion_mnist` and its fine-tuned classifier (the final checkpoint, the one tested) as
    `<arch>.mae_ft_fashion_mnist`, into weights_dir, each card holding the test top-1 and the commands that ran
    (done.json's). Each pair is first published into OUT/publish_<arch>/check/, so that a pair that cannot be
    published leaves weights_dir as it was. Returns the folders written; what is left to do by hand is printed."""
    if publish is None:
        from timm_mlit.hub import main as publish
    tested = recorded_rows(results_dir)
    stage_of = {s.name: s for s in plan.stages}
    written = []
    for row in plan.rows:
        r = tested.get(row.key)
        if row.pretrain is None or r is None:
            continue
        if r['checkpoint'] != _done(plan, stage_of[row.train]).get('checkpoint') or not _done(plan, stage_of[row.eval]):
            print(f'{row.key}: the tested {r["checkpoint"]} is not this run folder\'s finished run; not published')
            continue
        size, arch = row.model.split('_')[1].upper(), row.model
        folder = os.path.join(plan.out, f'publish_{arch}')
        os.makedirs(folder, exist_ok=True)
        commands = {}
        for tag, names in (('mae_in', [row.pretrain]), ('mae_ft', [row.pretrain, row.train, row.eval])):
            commands[tag] = os.path.join(folder, f'{tag}_commands.sh')
            write_commands(commands[tag], plan, [stage_of[n] for n in names])
        encoder_tag, classifier_tag = 'mae_in_fashion_mnist', 'mae_ft_fashion_mnist'
        data = f'the first {TRAIN_IMAGES:,} Fashion-MNIST training images'
        train = stage_of[row.train]
        ran = [_in_repo(a) for a in ran_argv(train, _done(plan, train))[0]]
        if not set(shlex.split(r['recipe'])) <= set(ran):
            raise fm.BenchmarkError(f'{row.train} ran without the recipe the results name ({r["recipe"]}): the '
                                    'recipe chosen since then is not the one that made these weights')
        jobs = [
            [r['encoder'], '--model', arch, '--tag', encoder_tag, '--pretrain-dataset', 'fashion_mnist',
             '--description', f'mLiT-{size} encoder pre-trained as a masked autoencoder on {data} (labels unused), '
                              f'{r["pretrain_epochs"]} epochs; head-less, for fine-tuning.',
             '--commands', commands['mae_in']],
            [r['checkpoint'], '--model', arch, '--tag', classifier_tag, '--no-training-args', '--dataset',
             'fashion_mnist', '--pretrain-dataset', 'fashion_mnist', '--base-model',
             f'timm-mlit/{arch}.{encoder_tag}', '--metric', f'top1={r["top1"]:.2f}',
             '--description', f'mmLiT-{size}: the MAE encoder {arch}.{encoder_tag} fine-tuned on {data} for '
                              f'{r["epochs"]} epochs with timm train.py ({r["recipe"]}); top-1 on the 10k test '
                              'images, tested once.',
             '--commands', commands['mae_ft']],
        ]
        names = [f'{arch}.{encoder_tag}', f'{arch}.{classifier_tag}']
        for argv, name in zip(jobs, names):  # the check: both must publish before either replaces a shipped one
            _publish(publish, argv + ['--output-dir', os.path.join(folder, 'check', name), '--overwrite'])
        for argv, name in zip(jobs, names):
            _publish(publish, argv + ['--output-dir', os.path.join(weights_dir, name), '--overwrite'])
            written.append(os.path.join(weights_dir, name))
    return written


def _summary(plan: fm.Plan, stage: fm.Stage) -> str:
    return os.path.join(fm.stage_dir(plan, stage), 'summary.csv')


def write_tune_results(plan: fm.Plan, results_dir: str, pilots: Sequence[Pilot] = PILOTS) -> Dict[str, str]:
    """fashion_mnist_tune.json/.md (validation top-1 per epoch of every pilot that has one) and the curves' PNG."""
    from timm_mlit.plots import plot_metric, read_column
    labels = {p.key: p.label for p in pilots}
    rows = []
    for s in plan.stages[1:]:
        if not os.path.exists(_summary(plan, s)):
            continue
        epochs, top1 = read_column(_summary(plan, s), VAL_COLUMN)
        done = fm._read_json(os.path.join(fm.stage_dir(plan, s), 'done.json')) or {}
        rows.append(dict(key=s.row, label=labels.get(s.row, s.row), stage=s.name, epochs_done=len(epochs),
                         val_top1=top1, final_val_top1=top1[-1] if top1 else None,
                         best_val_top1=max(top1) if top1 else None, complete=bool(done),
                         wall_s=done.get('wall_s'), img_s=done.get('img_s'), argv=s.argv))
    os.makedirs(results_dir, exist_ok=True)
    stem = os.path.join(results_dir, 'fashion_mnist_tune')
    pre = fm._read_json(os.path.join(plan.out, plan.stages[0].name, 'done.json')) or {}
    meta = dict(description=plan.budget.description, hardware=fm.hardware(plan.device), code=fm.code_version(),
                pretrain=dict(epochs=plan.stages[0].epochs, wall_s=pre.get('wall_s'), img_s=pre.get('img_s'),
                              argv=plan.stages[0].argv),
                written=datetime.now().isoformat(timespec='seconds'), out=plan.out,
                complete=len(rows) == len(plan.stages) - 1 and all(r['complete'] for r in rows))
    fm._write_json(stem + '.json', dict(meta=meta, rows=rows))
    png = plot_metric({r['label']: os.path.join(plan.out, r['stage'], 'summary.csv') for r in rows}, VAL_COLUMN,
                      stem + '.png', ylabel='validation top-1 (%)',
                      title=f'mLiT-XXS on Fashion-MNIST: top-1 on the {HOLDOUT:,} held-out training images')
    lines = ['# Fashion-MNIST recipe pilots (validation split)', '', f'{meta["description"]}.', '',
             f'Hardware: {meta["hardware"]}. MAE pre-training: '
             f'{fm.fmt_s(pre["wall_s"]) + " at " + str(pre["img_s"]) + " img/s" if pre else "not finished"}.', '']
    lines.append(tune_table(dict(meta=meta, rows=rows), pilots))
    written = f'Written by benchmarks/fashion_mnist_zoo.py at {meta["written"]}'
    lines += ['', f'{written}; the curves: {os.path.basename(png)}.' if png else f'{written}.']
    from timm_mlit.files import atomic_write
    atomic_write(stem + '.md', lambda f: f.write(('\n'.join(lines) + '\n').encode()))
    return dict(json=stem + '.json', md=stem + '.md', png=png)


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('phase', choices=('tune', 'zoo', 'curves', 'publish'))
    p.add_argument('--out', type=checked(results_folder), required=True,
                   help='stage folders (keep them outside the repository)')
    p.add_argument('--results-dir', type=checked(results_folder), default=os.path.join(HERE, 'results'),
                   help='where the tables and plots go')
    p.add_argument('--data-dir', default=fm.DEFAULT_DATA, help='Fashion-MNIST idx files (60k train, 10k test)')
    p.add_argument('--timm-scripts', default=os.environ.get('TIMM_SCRIPTS_DIR', ''),
                   help='folder with timm\'s train.py and validate.py (default: $TIMM_SCRIPTS_DIR)')
    p.add_argument('--sizes', nargs='+', choices=tuple(SCHEDULE), default=list(SCHEDULE), help='zoo: the sizes')
    p.add_argument('--holdout', type=at_least(1), default=HOLDOUT,
                   help='the last N training images: the validation split')
    p.add_argument('--device', type=checked(device_name), default='cpu', help='cpu or cuda')
    p.add_argument('-j', '--workers', type=at_least(0), default=2, help='data loading processes')
    p.add_argument('--weights-dir', type=checked(results_folder), default=str(WEIGHTS_DIR),
                   help='publish: where the Hub folders go (default: the package\'s embedded weights)')
    p.add_argument('--dry-run', action='store_true', help='print the plan and the commands, run nothing')
    return p.parse_args(argv)


def _plans(args, scripts: str, log: Callable[[str], None] = print) -> Dict[str, Optional[fm.Plan]]:
    data = os.path.abspath(args.data_dir)
    plans: Dict[str, Optional[fm.Plan]] = dict(tune=make_tune_plan(args.out, data, scripts, args.device,
                                                                   args.workers), zoo=None)
    if args.phase != 'tune':
        try:
            chosen = chosen_pilots(args.results_dir)
        except fm.BenchmarkError:
            if args.phase == 'zoo':
                raise
        else:
            recorded = recorded_rows(args.results_dir)
            plans['zoo'], gone = without_recorded(
                make_zoo_plan(args.out, data, scripts, chosen, args.sizes, args.device, args.workers), recorded)
            for key in gone:
                r = recorded[key]
                log(f'{key}: tested, as {args.results_dir}/fashion_mnist_zoo.json records (top-1 {r["top1"]:.2f}, '
                      f'run in {os.path.dirname(os.path.dirname(r["checkpoint"]))}), and no folder of it in '
                      f'{os.path.abspath(args.out)}: kept as recorded, not run or published again')
    return plans


@exit_on_error('fashion_mnist_zoo.py', (fm.BenchmarkError,))
def main(argv: Optional[Sequence[str]] = None, runner=fm.subprocess_runner) -> int:
    args = _parse_args(argv)
    scripts = os.path.abspath(args.timm_scripts) if args.timm_scripts else '$TIMM_SCRIPTS_DIR'
    notes: List[str] = []  # logged to the run's zoo.log when this call runs a phase, else printed
    plans = _plans(args, scripts, log=notes.append)
    if args.phase in ('curves', 'publish') or args.dry_run:
        for note in notes:
            print(note)
    writers = dict(tune=write_tune_results, zoo=write_zoo_results)
    if args.phase == 'curves':
        for phase, plan in plans.items():
            if plan is None:
                continue
            if not any(os.path.exists(_summary(plan, s)) for s in plan.stages if s.kind == 'train'):
                # an OUT without this phase's runs (e.g. the zoo's, the pilots' folder gone) must not overwrite the
                # results those runs wrote: the zoo chooses its recipes from fashion_mnist_tune.json
                print(f'{phase}: no run of it in {plan.out}; {args.results_dir}/fashion_mnist_{phase}.* kept')
                continue
            print(json.dumps(writers[phase](plan, args.results_dir)))
        return 0
    if args.phase == 'publish':
        if plans['zoo'] is None:
            raise fm.BenchmarkError('nothing to publish: the tune phase has not chosen the recipes yet')
        written = publish_zoo(plans['zoo'], args.results_dir, args.weights_dir)
        print('\n'.join(['published:'] + written + [
            'left to do: each new tag\'s pretrained cfg entry (printed above) into timm_mlit/mlit.py; '
            f'{args.results_dir}/fashion_mnist_zoo.* into benchmarks/results/; python benchmarks/readme_tables.py '
            'for these weights (tests/test_shipped_weights.py re-evaluates them)']) if written
              else 'nothing to publish yet: no mmLiT was tested')
        return 0
    plan, write = plans[args.phase], writers[args.phase]
    if args.dry_run:
        print(f'{plan.budget.description}.\nOutput: {plan.out}; results: '
              f'{args.results_dir}/fashion_mnist_{args.phase}.*')
        for s in plan.stages:
            print(f'\n# {s.name} ({s.kind}, ~{fm.fmt_s(s.nominal_s)})\n' + ' '.join(a if a else "''" for a in s.argv))
        return 0
    needed = ('train.py',) if args.phase == 'tune' else ('train.py', 'validate.py')
    if runner is fm.subprocess_runner and not all(os.path.isfile(os.path.join(scripts, f)) for f in needed):
        raise fm.BenchmarkError(f'timm\'s {" / ".join(needed)} not found: pass --timm-scripts or set '
                                'TIMM_SCRIPTS_DIR to a pytorch-image-models checkout')
    for kind in ('images-idx3', 'labels-idx1'):  # what prepare_holdout reads, looked for before anything is made
        fm.find_idx(os.path.abspath(args.data_dir), f'train-{kind}-ubyte')
    os.makedirs(plan.out, exist_ok=True)
    lock = open(os.path.join(plan.out, '.lock'), 'w')
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise fm.BenchmarkError(f'another run is using {plan.out}')
    orch = fm.Orchestrator(plan, runner=runner, log_file=os.path.join(plan.out, 'zoo.log'))
    for note in notes:
        orch.log(note)
    prepare_holdout(os.path.abspath(args.data_dir), plan.data_dir, args.holdout, log=orch.log)
    for i, stage in enumerate(plan.stages):
        orch.run_stage(i)
        if stage.kind != 'pretrain':
            write(plan, args.results_dir)
    orch.log(f'results: {os.path.join(args.results_dir, "fashion_mnist_" + args.phase)}.md / .json / .png')
    return 0


if __name__ == '__main__':
    sys.exit(main())
