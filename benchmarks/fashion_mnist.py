""" Fashion-MNIST: mLiT from scratch vs mmLiT (MAE pre-training + fine-tuning) vs timm peers, in one command

    python benchmarks/fashion_mnist.py --budget cpu --out /tmp/fmnist-run     # ~1 h on 2 CPU cores
    python benchmarks/fashion_mnist.py --budget full --out output/fmnist-full  # the recipes' epochs, for a GPU
    python benchmarks/fashion_mnist.py --budget cpu --dry-run                  # the plan and the commands only

Every training run goes through the project's own tools, unmodified: timm's train.py (via `timm-mlit-run`, from
$TIMM_SCRIPTS_DIR or --timm-scripts) with the recipes in train_configs/, and `timm-mlit-pretrain` for the MAE
pre-training. Rows:

- mLiT-<size> from scratch: train_configs/scratch/mlit_xxs_fashion_mnist.yaml (`--model mlit_<size>`; the CIFAR-10
  recipes of all three sizes are the same but for the model).
- mmLiT-<size>: `timm-mlit-pretrain` on all 60k training images (labels unused), then train.py with
  train_configs/finetune/mmlit_xxs_fashion_mnist.yaml from the exported encoder (--pretrained-path; layer decay
  0.8, lr_base 2.5e-3: the fine-tuning recipe). It fine-tunes for exactly as many epochs as the scratch row trains.
- timm peers, trained with the scratch recipe (same epochs, data, augmentation, optimizer and schedule as the mLiT
  scratch row, only --model changes): a dense ViT of mLiT-XXS's width and depth (vit_tiny_patch16_224 with
  img_size=36 patch_size=3 embed_dim=108 depth=9 num_heads=6 mlp_ratio=2) and resnet10t at 36x36.

Budgets (--budget): `cpu` fits the whole comparison in ~60-70 min on 2 quiet CPU cores (see BUDGETS for the
numbers and the throughput they were sized from); `full` is the recipes' own schedule for a GPU: mLiT-XXS, XS and S,
100 fine-tuning/scratch epochs on the 60k images, and Table 3's pre-training (8000/6000/4000 epochs).

Every row is measured the same way: the final checkpoint (last.pth.tar, no selection on the test set) evaluated by
timm's validate.py on the 10k test images (resize to 36, centre crop 1.0, bicubic, mean/std 0.5). train.py runs
with --val-split '' so nothing looks at the test set during training.

Each stage writes into OUT/<stage>/ (train.py/pretrain outputs, stage.log, done.json). Re-running the same command
after a kill skips the stages with a done.json and continues an interrupted one from its newest checkpoint
(--resume). OUT/benchmark.log holds the orchestration log with time-left estimates. The results table goes to
RESULTS_DIR/fashion_mnist_<budget>.md and .json (rewritten after every row, marked incomplete until the end); the
JSON also names the mmLiT-XXS fine-tuned checkpoint and its pre-trained encoder, and the commit of the code.

The stages run with this checkout as working directory, so they import its timm_mlit; for a long run in a repository
others are editing, run the script from a clean clone (with PYTHONPATH=CLONE) so that every stage runs the same code.
"""
import argparse
import dataclasses
import fcntl
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import at_least, checked, device_name, results_folder  # noqa: E402

from timm_mlit.cli import exit_on_error  # noqa: E402
from timm_mlit.precision import cpu_name  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, 'train_configs')
SCRATCH_CFG = os.path.join(CONFIGS, 'scratch', 'mlit_xxs_fashion_mnist.yaml')
FINETUNE_CFG = os.path.join(CONFIGS, 'finetune', 'mmlit_xxs_fashion_mnist.yaml')
PRETRAIN_CFG_CPU = os.path.join(CONFIGS, 'pretrain', 'mmlit_xxs_fashion_mnist.yaml')
PRETRAIN_CFG_TABLE3 = os.path.join(CONFIGS, 'pretrain', 'mmlit_{size}_cifar100.yaml')  # Table 3, per size
DEFAULT_DATA = '/usr/share/datasets/fashion-mnist'  # apt-get install dataset-fashion-mnist
NUM_CLASSES = 10
EVAL_BATCH = 256
VIT_KWARGS = dict(img_size=36, patch_size=3, embed_dim=108, depth=9, num_heads=6, mlp_ratio=2)

# img/s on 2 quiet CPU cores, fp32, batch 256 (measured for this script; only used for time estimates)
NOMINAL_IMG_S = {'mlit_xxs': 75., 'mlit_xs': 40., 'mlit_s': 20., 'vit': 73., 'resnet10t': 450.,
                 'pretrain_mlit_xxs': 100., 'pretrain_mlit_xs': 55., 'pretrain_mlit_s': 28., 'eval': 300.}
STARTUP_S = 20.  # process start, dataset load, first (slow) iteration


@dataclasses.dataclass(frozen=True)
class Budget:
    name: str
    description: str
    sizes: Sequence[str]
    epochs: Optional[int]  # scratch / fine-tune / peer epochs (None: the recipe's)
    warmup_epochs: Optional[int]
    pretrain_epochs: Optional[int]  # None: the pre-training config's
    pretrain_warmup_epochs: Optional[int]
    labelled_per_class: Optional[int] = None  # None: all 60k labelled training images
    pretrain_images: Optional[int] = None  # None: all 60k training images
    test_images: Optional[int] = None  # None: the 10k test set
    peers: Sequence[str] = ('vit', 'resnet10t')
    table3_pretrain: bool = False  # pre-train with Table 3's per-size CIFAR-100 recipe (else the Fashion-MNIST config)


BUDGETS = {
    # Sized from throughput measured on this 2-core machine (fp32, batch 256, steady state): mlit_xxs 76-82 img/s
    # in train.py, the dense ViT peer ~74, resnet10t ~500, MAE pre-training ~100; evaluation of 10k ~30-40 s per
    # model. Pre-training 2 x 60k images ~20 min, each mLiT/ViT run 5 x 10k ~11-12 min, resnet10t ~2 min,
    # 4 evaluations ~3 min: ~60 min in all, ~70 min at the slower 55-60 img/s seen at batch 128.
    'cpu': Budget(
        'cpu', 'CPU budget: MAE pre-training 2 epochs on all 60,000 training images (labels unused); every '
        'supervised run (scratch, fine-tune, peers) 5 epochs (1 warm-up) on a labelled subset of 10,000 training '
        'images (the first 1,000 of each class); test on all 10,000 test images',
        sizes=('xxs',), epochs=5, warmup_epochs=1, pretrain_epochs=2, pretrain_warmup_epochs=0,
        labelled_per_class=1000),
    'full': Budget(
        'full', 'Full budget (for a GPU): the recipes\' schedules: MAE pre-training as in Table 3 (8000/6000/4000 '
        'epochs for XXS/XS/S) on all 60,000 training images; scratch, fine-tune and peers 100 epochs (5 warm-up) on '
        'all 60,000 labelled images; test on all 10,000 test images',
        sizes=('xxs', 'xs', 's'), epochs=None, warmup_epochs=None, pretrain_epochs=None,
        pretrain_warmup_epochs=None, table3_pretrain=True),
    # --smoke (hidden): the whole pipeline on a few hundred images to catch bugs before a long run
    'smoke': Budget(
        'smoke', 'SMOKE TEST (not a result): 1 pre-training epoch on 256 images, 1 epoch on 260 labelled images, '
        'test on the first 500 test images',
        sizes=('xxs',), epochs=1, warmup_epochs=0, pretrain_epochs=1, pretrain_warmup_epochs=0,
        labelled_per_class=26, pretrain_images=256, test_images=500),
}


class BenchmarkError(ValueError):
    """What stops the benchmark, in a sentence; `main` turns it into `fashion_mnist.py: error: ...`, status 1."""


# ---------------------------------------------------------------- plan

@dataclasses.dataclass
class Stage:
    name: str  # folder under OUT
    kind: str  # 'pretrain' | 'train' | 'eval'
    argv: List[str]  # without --resume
    epochs: int = 1
    images: int = 0  # per epoch
    nominal_img_s: float = 1.
    row: str = ''

    @property
    def nominal_s(self) -> float:
        return STARTUP_S + self.epochs * self.images / self.nominal_img_s


@dataclasses.dataclass
class Row:
    key: str
    label: str
    model: str
    model_kwargs: Dict[str, object]
    train: str  # stage names
    eval: str
    pretrain: Optional[str] = None
    recipe: str = ''


@dataclasses.dataclass
class Plan:
    budget: Budget
    out: str
    data_dir: str  # labelled training images (and test images for --smoke)
    test_dir: str
    stages: List[Stage]
    rows: List[Row]
    epochs: int
    pretrain_epochs: Dict[str, int]
    n_train: int
    n_pretrain: int
    n_test: int
    device: str


def read_yaml(path: str) -> dict:
    import yaml
    with open(path) as f:
        return yaml.safe_load(f)


def _kwargs_argv(kwargs: Dict[str, object]) -> List[str]:
    return ['--model-kwargs'] + [f'{k}={v}' for k, v in kwargs.items()] if kwargs else []


def validate_args(scripts_dir: str, model: str, checkpoint: str, test_dir: str, results_file: str, device: str,
                  workers: int, kwargs: Optional[Dict[str, object]] = None, log_freq: int = 1) -> List[str]:
    """validate.py and its arguments: the Fashion-MNIST test images of `test_dir` in the recipes' eval transform
    (resize to 36, centre crop 1.0, bicubic, mean/std 0.5), top-1/top-5 written to `results_file` as JSON."""
    return [os.path.join(scripts_dir, 'validate.py'), '--model', model, *_kwargs_argv(kwargs or {}),
            '--checkpoint', checkpoint, '--dataset', 'torch/fashion_mnist', '--data-dir', test_dir,
            '--split', 'validation', '--num-classes', str(NUM_CLASSES), '--input-size', '3', '36', '36',
            '--crop-pct', '1.0', '--interpolation', 'bicubic', '--mean', '0.5', '0.5', '0.5', '--std', '0.5', '0.5',
            '0.5', '-b', str(EVAL_BATCH), '-j', str(workers), '--device', device, '--log-freq', str(log_freq),
            '--results-file', results_file, '--results-format', 'json']


def find_idx(source_dir: str, name: str) -> str:
    """The path of the idx file `name` (plain or .gz) in source_dir, or a BenchmarkError that says how to get it."""
    for n in (name, name + '.gz'):
        if os.path.exists(os.path.join(source_dir, n)):
            return os.path.join(source_dir, n)
    raise BenchmarkError(f'{name}[.gz] not found in {source_dir} (apt-get install dataset-fashion-mnist)')


def make_plan(budget: Budget, out: str, source_dir: str, scripts_dir: str, device: str = 'cpu', workers: int = 2,
              python: str = sys.executable) -> Plan:
    """Every stage of the comparison, in running order, with its full command line."""
    # (one long function on purpose: the whole plan reads in one place, stage after stage in running order)
    out = os.path.abspath(out)
    scratch_cfg = read_yaml(SCRATCH_CFG)
    epochs = budget.epochs if budget.epochs is not None else int(scratch_cfg['epochs'])
    warmup = budget.warmup_epochs if budget.warmup_epochs is not None else int(scratch_cfg['warmup_epochs'])
    if int(read_yaml(FINETUNE_CFG)['epochs']) != int(scratch_cfg['epochs']):
        raise BenchmarkError('the fine-tune and scratch recipes disagree on epochs')
    subset = budget.labelled_per_class is not None or budget.test_images is not None
    data_dir = os.path.join(out, 'data') if subset else source_dir
    test_dir = data_dir if budget.test_images is not None else source_dir
    n_train = NUM_CLASSES * budget.labelled_per_class if budget.labelled_per_class is not None else 60000
    n_pretrain = budget.pretrain_images or 60000
    n_test = budget.test_images or 10000
    cuda = device.startswith('cuda')
    run = [python, '-m', 'timm_mlit.run']
    train_py = os.path.join(scripts_dir, 'train.py')

    def train_argv(name, cfg, model, kwargs, extra=()):
        argv = run + [train_py, '-c', cfg, '--data-dir', data_dir, '--val-split', '', '--epochs', str(epochs),
                      '--warmup-epochs', str(warmup), '--device', device, '-j', str(workers), '--log-interval', '10',
                      '--checkpoint-hist', '1', '--output', out, '--experiment', name]
        if model != 'mlit_xxs':
            argv += ['--model', model] + _kwargs_argv(kwargs)
        if cuda:  # the configs set no precision: timm-mlit-run picks bfloat16 on a CPU with bf16 units
            argv += ['--amp', '--amp-dtype', 'bfloat16']
        return argv + list(extra)

    def eval_stage(row_key, model, kwargs, train_name):
        argv = run + validate_args(scripts_dir, model, os.path.join(out, train_name, 'last.pth.tar'), test_dir,
                                   os.path.join(out, f'eval_{row_key}', 'results.json'), device, workers,
                                   kwargs=kwargs, log_freq=1)
        return Stage(f'eval_{row_key}', 'eval', argv, images=n_test, nominal_img_s=NOMINAL_IMG_S['eval'], row=row_key)

    stages, rows, pretrain_epochs = [], [], {}
    for size in budget.sizes:
        model = f'mlit_{size}'
        # mmLiT: pre-train, fine-tune, evaluate
        pcfg_path = PRETRAIN_CFG_TABLE3.format(size=size) if budget.table3_pretrain else PRETRAIN_CFG_CPU
        pcfg = read_yaml(pcfg_path)
        p_epochs = budget.pretrain_epochs if budget.pretrain_epochs is not None else int(pcfg['epochs'])
        p_warmup = budget.pretrain_warmup_epochs if budget.pretrain_warmup_epochs is not None \
            else int(pcfg['warmup_epochs'])
        pretrain_epochs[model] = p_epochs
        p_name = f'pretrain_{model}'
        p_argv = [python, '-m', 'timm_mlit.pretrain', '-c', pcfg_path, '--model', model,
                  '--dataset', 'torch/fashion_mnist', '--data-dir', source_dir, '--train-split', 'train',
                  '--epochs', str(p_epochs), '--warmup-epochs', str(p_warmup), '--device', device,
                  '-j', str(workers), '--log-interval', '20', '--checkpoint-hist', '1',
                  '--output', out, '--experiment', p_name]
        if budget.pretrain_images:
            p_argv += ['--train-num-samples', str(budget.pretrain_images)]
        if not cuda and pcfg.get('amp'):
            p_argv += ['--no-amp']  # the config's float16 autocast needs CUDA (without `amp`: chosen per device)
        stages.append(Stage(p_name, 'pretrain', p_argv, p_epochs, n_pretrain,
                            NOMINAL_IMG_S.get(f'pretrain_{model}', 50.), row=f'mmlit_{size}'))
        ft = f'finetune_{model}'
        encoder = os.path.join(out, p_name, 'encoder.safetensors')
        stages.append(Stage(ft, 'train', train_argv(ft, FINETUNE_CFG, model, {}, ['--pretrained-path', encoder]),
                            epochs, n_train, NOMINAL_IMG_S.get(model, 20.), row=f'mmlit_{size}'))
        stages.append(eval_stage(f'mmlit_{size}', model, {}, ft))
        rows.append(Row(f'mmlit_{size}', f'mmLiT-{size.upper()} (MAE pre-train + fine-tune)', model, {}, ft,
                        f'eval_mmlit_{size}', pretrain=p_name,
                        recipe=f'{os.path.relpath(pcfg_path, REPO)} + {os.path.relpath(FINETUNE_CFG, REPO)}'))
        # mLiT from scratch
        sc = f'scratch_{model}'
        stages.append(Stage(sc, 'train', train_argv(sc, SCRATCH_CFG, model, {}), epochs, n_train,
                            NOMINAL_IMG_S.get(model, 20.), row=f'mlit_{size}'))
        stages.append(eval_stage(f'mlit_{size}', model, {}, sc))
        rows.append(Row(f'mlit_{size}', f'mLiT-{size.upper()} (from scratch)', model, {}, sc, f'eval_mlit_{size}',
                        recipe=os.path.relpath(SCRATCH_CFG, REPO)))
    for peer in budget.peers:
        if peer == 'vit':
            key, label, model, kwargs = ('vit_dense', 'ViT, dense (mLiT-XXS width/depth; timm)',
                                         'vit_tiny_patch16_224', VIT_KWARGS)
        else:
            key, label, model, kwargs = peer, f'{peer} (timm)', peer, {}
        name = f'scratch_{key}'
        stages.append(Stage(name, 'train', train_argv(name, SCRATCH_CFG, model, kwargs), epochs, n_train,
                            NOMINAL_IMG_S.get(peer, 50.), row=key))
        stages.append(eval_stage(key, model, kwargs, name))
        rows.append(Row(key, label, model, dict(kwargs), name, f'eval_{key}',
                        recipe=f'{os.path.relpath(SCRATCH_CFG, REPO)} with --model {model}'))
    return Plan(budget, out, data_dir, test_dir, stages, rows, epochs, pretrain_epochs, n_train, n_pretrain, n_test,
                device)


# ---------------------------------------------------------------- data

def prepare_data(plan: Plan, source_dir: str, log: Callable[[str], None] = print):
    """The labelled subset (first `labelled_per_class` images of each class, in file order) and, for --smoke, the
    first `test_images` test images, as plain idx files in plan.data_dir; the full test set is linked otherwise."""
    b = plan.budget
    if plan.data_dir == source_dir:
        return
    marker = os.path.join(plan.data_dir, 'subset.json')
    spec = dict(source=os.path.abspath(source_dir), labelled_per_class=b.labelled_per_class,
                test_images=b.test_images)
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f).get('spec') == spec:
                return
    from timm_mlit.data import read_idx, write_idx

    os.makedirs(plan.data_dir, exist_ok=True)
    images = read_idx(find_idx(source_dir, 'train-images-idx3-ubyte')).numpy()
    labels = read_idx(find_idx(source_dir, 'train-labels-idx1-ubyte')).numpy()
    if b.labelled_per_class is not None:
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:b.labelled_per_class]
                                       for c in range(NUM_CLASSES)]))
    else:
        keep = np.arange(len(labels))
    write_idx(os.path.join(plan.data_dir, 'train-images-idx3-ubyte'), images[keep])
    write_idx(os.path.join(plan.data_dir, 'train-labels-idx1-ubyte'), labels[keep])
    for kind in ('images-idx3', 'labels-idx1'):
        name = f't10k-{kind}-ubyte'
        dst = os.path.join(plan.data_dir, name)
        for stale in (dst, dst + '.gz'):
            if os.path.lexists(stale):
                os.remove(stale)
        src = find_idx(source_dir, name)
        if b.test_images is not None:
            write_idx(dst, read_idx(src).numpy()[:b.test_images])
        else:
            os.symlink(src, dst + ('.gz' if src.endswith('.gz') else ''))
    counts = np.bincount(labels[keep], minlength=NUM_CLASSES).tolist()
    with open(marker, 'w') as f:
        json.dump(dict(spec=spec, train_images=int(len(keep)), per_class=counts), f)
    log(f'data: {len(keep)} labelled training images ({counts} per class) in {plan.data_dir}')


# ---------------------------------------------------------------- stage state

def _write_json(path: str, obj):
    from timm_mlit.files import atomic_write
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def stage_dir(plan: Plan, stage: Stage) -> str:
    return os.path.join(plan.out, stage.name)


def latest_checkpoint(folder: str) -> Optional[str]:
    """last.pth.tar, else the newest checkpoint-<epoch>.pth.tar (train.py replaces `last` by unlink + rename)."""
    last = os.path.join(folder, 'last.pth.tar')
    if os.path.isfile(last):
        return last
    numbered = []
    for f in os.listdir(folder) if os.path.isdir(folder) else []:
        m = re.fullmatch(r'checkpoint-(\d+)\.pth\.tar', f)
        if m:
            numbered.append((int(m.group(1)), os.path.join(folder, f)))
    return max(numbered)[1] if numbered else None


def checkpoint_epoch(path: str) -> int:
    from timm_mlit.checkpoint import load_torch_file
    return int(load_torch_file(path)['epoch'])


def is_complete(plan: Plan, stage: Stage) -> bool:
    """Whether the stage's outputs say it ran to the end (checked before writing done.json)."""
    d = stage_dir(plan, stage)
    if stage.kind == 'eval':
        r = _read_json(os.path.join(d, 'results.json'))
        return r is not None and 'top1' in r
    if stage.kind == 'pretrain' and not os.path.isfile(os.path.join(d, 'encoder.safetensors')):
        return False
    ckpt = latest_checkpoint(d)
    return ckpt is not None and checkpoint_epoch(ckpt) == stage.epochs - 1


def resume_argv(plan: Plan, stage: Stage) -> List[str]:
    if stage.kind == 'eval':
        return []
    ckpt = latest_checkpoint(stage_dir(plan, stage))
    return ['--resume', ckpt] if ckpt else []


# ---------------------------------------------------------------- running and progress

_PROGRESS = {
    'train': re.compile(r'Train: (\d+) \[\s*(\d+)/(\d+)'),
    'pretrain': re.compile(r'Train: (\d+) \[\s*(\d+)/(\d+)'),
    'eval': re.compile(r'Test: \[\s*(\d+)/(\d+)\]'),
}


def parse_progress(kind: str, text: str, epochs: int) -> Optional[float]:
    """Fraction of the stage done according to the newest progress line in `text`, or None."""
    matches = list(_PROGRESS[kind].finditer(text))
    if not matches:
        return None
    g = [int(x) for x in matches[-1].groups()]
    if kind == 'eval':
        return min(1., (g[0] + 1) / max(g[1], 1))
    epoch, i, n = g
    # train.py counts batches from 0 ("9/10" is the last), timm-mlit-pretrain from 1 ("10/10")
    done = min(i + (1 if kind == 'train' else 0), n) / max(n, 1)
    return min(1., (epoch + done) / max(epochs, 1))


def fmt_s(s: float) -> str:
    s = int(round(max(s, 0)))
    return f'{s // 3600}h{s % 3600 // 60:02d}m' if s >= 3600 else f'{s // 60}m{s % 60:02d}s'


def _die_with_parent():  # a training process must not outlive a killed orchestrator (it would race a re-run)
    try:
        import ctypes
        ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def subprocess_runner(argv: List[str], log_path: str, on_poll: Callable[[str], None], poll_s: float = 30.) -> int:
    """Run argv with stdout+stderr appended to log_path; call on_poll(new log text) every poll_s seconds."""
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    with open(log_path, 'ab') as logf:
        logf.write(f'\n$ {" ".join(argv)}\n'.encode())
        logf.flush()
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                preexec_fn=_die_with_parent)
    offset = os.path.getsize(log_path)
    try:
        while True:
            try:
                rc = proc.wait(timeout=poll_s)
            except subprocess.TimeoutExpired:
                rc = None
            with open(log_path, 'rb') as f:
                f.seek(offset)
                new = f.read().decode(errors='replace')
                offset = f.tell()
            on_poll(new)
            if rc is not None:
                return rc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait()


class Orchestrator:
    def __init__(self, plan: Plan, runner=subprocess_runner, log_file: Optional[str] = None, poll_s: float = 30.,
                 report_s: float = 60.):
        self.plan, self.runner, self.poll_s, self.report_s = plan, runner, poll_s, report_s
        self.log_file = log_file
        self.slowdown_done = [0., 0.]  # [actual s, nominal s] of the work done in this invocation

    def log(self, msg: str):
        line = f'{datetime.now():%Y-%m-%d %H:%M:%S} {msg}'
        print(line, flush=True)
        if self.log_file:
            with open(self.log_file, 'a') as f:
                f.write(line + '\n')

    def slowdown(self) -> float:
        actual, nominal = self.slowdown_done
        return actual / nominal if nominal > 30 else 1.

    def remaining_nominal(self, after: int) -> float:
        return sum(s.nominal_s for s in self.plan.stages[after:] if not self.is_done(s))

    def is_done(self, stage: Stage) -> bool:
        return os.path.isfile(os.path.join(stage_dir(self.plan, stage), 'done.json'))

    def run_stage(self, index: int) -> dict:
        # (long on purpose: a stage's life - skip if done, run or resume, watch, record - reads in one place)
        plan, stage = self.plan, self.plan.stages[index]
        d = stage_dir(plan, stage)
        n = len(plan.stages)
        done_path = os.path.join(d, 'done.json')
        if self.is_done(stage):
            self.log(f'[{index + 1}/{n}] {stage.name}: done already, skipped ({done_path})')
            return _read_json(done_path)
        os.makedirs(d, exist_ok=True)
        if os.path.isfile(os.path.join(d, 'wall.json')) and is_complete(plan, stage):
            # killed after its last checkpoint / results but before done.json: nothing left to run
            self.log(f'[{index + 1}/{n}] {stage.name}: outputs complete, recording it')
            return self._finish(index, stage, [], 0., (_read_json(os.path.join(d, 'wall.json')) or {}).get(
                'wall_s', 0.), os.getloadavg()[0])
        wall_path = os.path.join(d, 'wall.json')
        prior = (_read_json(wall_path) or {}).get('wall_s', 0.)  # time spent in earlier, killed attempts
        resume = resume_argv(plan, stage)
        argv = stage.argv + resume
        what = f'resuming from {resume[1]}' if resume else 'starting'
        self.log(f'[{index + 1}/{n}] {stage.name}: {what}; log {os.path.join(d, "stage.log")}; nominal '
                 f'{fmt_s(stage.nominal_s)} (x{self.slowdown():.2f} as measured so far)')
        self.log('    ' + ' '.join(a if a else "''" for a in argv))
        load_start = os.getloadavg()[0]
        t0 = time.time()
        state = dict(first=None, last_report=t0, text='')

        def on_poll(new_text: str):
            now = time.time()
            _write_json(wall_path, dict(wall_s=prior + now - t0))
            state['text'] = (state['text'] + new_text)[-20000:]
            f = parse_progress(stage.kind, state['text'], stage.epochs)
            if f is None:
                return
            if state['first'] is None:
                state['first'] = (now, f)
            if now - state['last_report'] < self.report_s:
                return
            state['last_report'] = now
            t1, f1 = state['first']
            # f counts the epochs of earlier, killed attempts too: so does the time spent on the stage
            elapsed = prior + now - t0
            if f > f1 and now > t1:  # the rate since the first progress line (start-up excluded)
                left = (1 - f) * (now - t1) / (f - f1)
            elif f > 0:  # one progress line so far: the rate since the first start, start-up included
                left = (1 - f) * elapsed / f
            else:
                left = stage.nominal_s * self.slowdown()
            factor = self.slowdown()
            if f > 0.05:  # this stage's projected length against its nominal one, with the stages before it
                factor = (self.slowdown_done[0] + elapsed + left) / (self.slowdown_done[1] + stage.nominal_s)
            total = left + self.remaining_nominal(index + 1) * factor
            self.log(f'    {stage.name}: {100 * f:.0f}% after {fmt_s(elapsed)}, ~{fmt_s(left)} left in this stage; '
                     f'~{fmt_s(total)} left overall (ETA {datetime.now() + timedelta(seconds=total):%H:%M}, '
                     f'load {os.getloadavg()[0]:.1f})')

        rc = self.runner(argv, os.path.join(d, 'stage.log'), on_poll)
        wall = time.time() - t0
        _write_json(wall_path, dict(wall_s=prior + wall))
        if rc != 0 or not is_complete(plan, stage):
            tail = ''
            try:
                with open(os.path.join(d, 'stage.log'), errors='replace') as f:
                    tail = ''.join(f.readlines()[-15:])
            except OSError:
                pass
            raise BenchmarkError(f'stage {stage.name} {"failed (exit status %s)" % rc if rc else "did not finish"}; '
                                 f'log {os.path.join(d, "stage.log")}; re-run the same command to resume.\n{tail}')
        self.slowdown_done[0] += prior + wall  # the whole stage's time against its whole nominal time
        self.slowdown_done[1] += stage.nominal_s
        return self._finish(index, stage, argv, wall, prior, load_start)

    def _finish(self, index: int, stage: Stage, argv: List[str], wall: float, prior: float, load_start: float):
        d = stage_dir(self.plan, stage)
        info = dict(stage=stage.name, kind=stage.kind, argv=argv, wall_s=round(prior + wall, 1),
                    attempts_wall_s=dict(earlier=round(prior, 1), last=round(wall, 1)), epochs=stage.epochs,
                    images_per_epoch=stage.images, load_average=[round(load_start, 2), round(os.getloadavg()[0], 2)],
                    finished=datetime.now().isoformat(timespec='seconds'),
                    measured=dict(hardware=hardware(self.plan.device), code=code_version()))  # what ran it
        if stage.kind in ('train', 'pretrain'):
            info['img_s'] = round(stage.epochs * stage.images / max(prior + wall, 1e-9), 1)
            info['checkpoint'] = latest_checkpoint(d)
            if stage.kind == 'pretrain':
                info['encoder'] = os.path.join(d, 'encoder.safetensors')
        else:
            info.update(read_eval(d, stage.images))
        _write_json(os.path.join(d, 'done.json'), info)
        self.log(f'[{index + 1}/{len(self.plan.stages)}] {stage.name}: done in {fmt_s(prior + wall)}'
                 + (f', top-1 {info["top1"]:.2f}%' if 'top1' in info else f', {info.get("img_s", 0):.1f} img/s'))
        return info

    def run(self, write_table: Callable[[Plan, bool], None]):
        t0 = time.time()
        self.log(f'Fashion-MNIST benchmark, budget {self.plan.budget.name}: {len(self.plan.stages)} stages, '
                 f'~{fmt_s(self.remaining_nominal(0))} of work left at nominal throughput; output {self.plan.out}')
        for i, stage in enumerate(self.plan.stages):
            self.run_stage(i)
            if stage.kind == 'eval':
                write_table(self.plan, False)
        write_table(self.plan, True)
        self.log(f'all stages done ({fmt_s(time.time() - t0)} in this invocation)')


def read_eval(folder: str, n_test: int) -> dict:
    """top-1/top-5 from validate.py's results file; exact parameter count and test throughput from its log."""
    r = _read_json(os.path.join(folder, 'results.json')) or {}
    out = dict(top1=r.get('top1'), top5=r.get('top5'), test_images=n_test)
    try:
        with open(os.path.join(folder, 'stage.log'), errors='replace') as f:
            text = f.read()
    except OSError:
        text = ''
    counts = re.findall(r'param count:\s*(\d+)', text)
    out['param_count'] = int(counts[-1]) if counts else None
    # last "Test: [ i/N]  Time: x (avg s, ...)" line: mean seconds per batch over the whole test set
    tm = re.findall(r'Test: \[\s*\d+/(\d+)\]\s+Time: [\d.]+s \(([\d.]+)s,', text)
    out['test_img_s'] = round(n_test / (int(tm[-1][0]) * float(tm[-1][1])), 1) if tm else None
    return out


# ---------------------------------------------------------------- results

def hardware(device: str) -> str:
    import torch
    if device.startswith('cuda') and torch.cuda.is_available():
        return f'{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})'
    model = cpu_name()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    try:
        mem = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30
    except (ValueError, OSError):
        mem = 0
    return f'{model}, {cores} CPU cores, {mem:.0f} GiB RAM, no GPU; torch {torch.get_num_threads()} threads'


def code_version() -> dict:
    """Which timm_mlit the stages imported (they run with cwd = this checkout) and its git commit, if any."""
    import timm_mlit
    info = dict(checkout=REPO, timm_mlit=os.path.dirname(os.path.abspath(timm_mlit.__file__)), commit=None,
                modified=None)
    try:
        git = ['git', '-C', REPO]
        info['commit'] = subprocess.run(git + ['rev-parse', 'HEAD'], capture_output=True, text=True,
                                        check=True).stdout.strip()
        info['modified'] = subprocess.run(git + ['status', '--porcelain', '--untracked-files=no'],
                                          capture_output=True, text=True, check=True).stdout.split('\n')[:-1]
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def collect(plan: Plan) -> List[dict]:
    rows = []
    for row in plan.rows:
        def done(name):
            return _read_json(os.path.join(plan.out, name, 'done.json')) if name else None
        pre, tr, ev = done(row.pretrain), done(row.train), done(row.eval)
        if ev is None or tr is None or (row.pretrain and pre is None):
            continue
        wall = tr['wall_s'] + (pre['wall_s'] if pre else 0.)
        rows.append(dict(
            key=row.key, model=row.label, arch=row.model, model_kwargs=row.model_kwargs, recipe=row.recipe,
            params=ev['param_count'], pretrain_epochs=pre['epochs'] if pre else 0, epochs=tr['epochs'],
            pretrain_images=pre['images_per_epoch'] if pre else 0, train_images=tr['images_per_epoch'],
            test_images=ev['test_images'], top1=ev['top1'], top5=ev['top5'],
            wall_s=round(wall, 1), pretrain_wall_s=pre['wall_s'] if pre else 0., train_wall_s=tr['wall_s'],
            eval_wall_s=ev['wall_s'], pretrain_img_s=pre['img_s'] if pre else None, train_img_s=tr['img_s'],
            test_img_s=ev['test_img_s'], checkpoint=tr['checkpoint'], encoder=pre['encoder'] if pre else None,
            load_average=dict(pretrain=pre['load_average'] if pre else None, train=tr['load_average'],
                              eval=ev['load_average']),
            measured=tr.get('measured')))  # the hardware and code that trained it (None in older done.json)
    return rows


def write_table(plan: Plan, results_dir: str, complete: bool) -> Dict[str, str]:
    """Write fashion_mnist_<budget>.json and .md from the finished stages' done.json files."""
    import timm
    import torch
    rows = collect(plan)
    b = plan.budget
    import timm_mlit
    meta = dict(
        budget=b.name, description=b.description, complete=complete and len(rows) == len(plan.rows),
        hardware=hardware(plan.device), device=plan.device, precision='bf16 autocast' if plan.device.startswith(
            'cuda') else 'fp32', torch=torch.__version__, timm=timm.__version__, timm_mlit=timm_mlit.__version__,
        python=platform.python_version(), epochs=plan.epochs, pretrain_epochs=plan.pretrain_epochs,
        labelled_train_images=plan.n_train, pretrain_images=plan.n_pretrain, test_images=plan.n_test,
        written=datetime.now().isoformat(timespec='seconds'), out=plan.out, code=code_version(),
        like_for_like=('every supervised row trains for the same epochs on the same labelled images with the same '
                       'augmentation, batch, optimizer (AdamW, wd 0.05), cosine schedule and warm-up: the scratch '
                       'recipe (lr_base 1e-3) for mLiT and the timm peers, the fine-tuning recipe (lr_base 2.5e-3, '
                       'layer decay 0.8) for mmLiT; the final checkpoint of each is evaluated by validate.py on the '
                       'test images; wall time = pre-training + training, summed over resumed attempts'))
    weights = {}
    for r in rows:
        if r['key'] == 'mmlit_xxs':
            weights = dict(mmlit_xxs_finetuned_checkpoint=r['checkpoint'], mmlit_xxs_pretrained_encoder=r['encoder'],
                           mmlit_xxs_top1=r['top1'],
                           note='final fine-tuning checkpoint (the one evaluated in the table, not chosen on the '
                                'test set) and the MAE encoder it was fine-tuned from')
    os.makedirs(results_dir, exist_ok=True)
    stem = os.path.join(results_dir, f'fashion_mnist_{b.name}')
    _write_json(stem + '.json', dict(meta=meta, weights=weights, rows=rows))

    def num(v, f='{:.2f}'):
        return '-' if v is None else f.format(v)

    lines = [f'# Fashion-MNIST: mLiT vs mmLiT vs timm peers ({b.name} budget)', '',
             f'{b.description}.', '',
             f'Hardware: {meta["hardware"]}; {meta["precision"]}; torch {meta["torch"]}, timm {meta["timm"]}, '
             f'timm-mlit {meta["timm_mlit"]} (commit {meta["code"]["commit"]}'
             f'{", with local changes" if meta["code"]["modified"] else ""}).', '',
             f'Like for like: {meta["like_for_like"]}.', '']
    if not meta['complete']:
        lines += [f'**Incomplete: {len(rows)} of {len(plan.rows)} rows so far.**', '']
    lines += ['| Model | Params | Epochs (pre-train + train) | Test top-1 (%) | Wall time | '
              'img/s (pre-train / train / test) |', '|---|---:|---:|---:|---:|---:|']
    for r in rows:
        wall = fmt_s(r['wall_s']) if not r['pretrain_epochs'] else \
            f'{fmt_s(r["wall_s"])} ({fmt_s(r["pretrain_wall_s"])} + {fmt_s(r["train_wall_s"])})'
        lines.append(
            f'| {r["model"]} | {num(r["params"], "{:,}")} | {r["pretrain_epochs"]} + {r["epochs"]} | '
            f'{num(r["top1"])} | {wall} | '
            f'{num(r["pretrain_img_s"], "{:.0f}")} / {num(r["train_img_s"], "{:.0f}")} / '
            f'{num(r["test_img_s"], "{:.0f}")} |')
    lines += ['', f'Pre-training on {plan.n_pretrain:,} images (labels unused), training on {plan.n_train:,} labelled '
              f'images, test on {plan.n_test:,} images. Train/pre-train img/s: images seen / wall time of the stage '
              '(process start, data loading and checkpoints included); test img/s: validate.py\'s batch times. '
              'Parameter counts include the 10-class head (all experts of the MoE layers counted). '
              f'Written by benchmarks/fashion_mnist.py at {meta["written"]}.']
    from timm_mlit.files import atomic_write
    atomic_write(stem + '.md', lambda f: f.write(('\n'.join(lines) + '\n').encode()))
    return dict(json=stem + '.json', md=stem + '.md')


# ---------------------------------------------------------------- main

def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--budget', choices=('cpu', 'full'), default='cpu')
    p.add_argument('--smoke', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--out', type=checked(results_folder), default='',
                   help='stage folders (default: output/fashion_mnist_<budget>)')
    p.add_argument('--results-dir', type=checked(results_folder), default='',
                   help='where fashion_mnist_<budget>.md/.json go (default: benchmarks/results; --out for --smoke)')
    p.add_argument('--data-dir', default=DEFAULT_DATA, help='Fashion-MNIST idx files (60k train, 10k test)')
    p.add_argument('--timm-scripts', default=os.environ.get('TIMM_SCRIPTS_DIR', ''),
                   help='folder with timm\'s train.py and validate.py (default: $TIMM_SCRIPTS_DIR)')
    p.add_argument('--device', type=checked(device_name), default=None,
                   help='cpu or cuda (default: cuda when available)')
    p.add_argument('-j', '--workers', type=at_least(0), default=min(8, os.cpu_count() or 2),
                   help='data loading processes')
    p.add_argument('--dry-run', action='store_true', help='print the plan and the commands, run nothing')
    return p.parse_args(argv)


@exit_on_error('fashion_mnist.py', (BenchmarkError,))
def main(argv: Optional[Sequence[str]] = None, runner=subprocess_runner) -> int:
    args = _parse_args(argv)
    budget = BUDGETS['smoke' if args.smoke else args.budget]
    out = os.path.abspath(args.out or os.path.join('output', f'fashion_mnist_{budget.name}'))
    results_dir = args.results_dir or (out if args.smoke else os.path.join(REPO, 'benchmarks', 'results'))
    device = args.device
    if not device:
        import torch
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    scripts = os.path.abspath(args.timm_scripts) if args.timm_scripts else ''
    plan = make_plan(budget, out, os.path.abspath(args.data_dir), scripts or '$TIMM_SCRIPTS_DIR', device,
                     args.workers)
    if args.dry_run:
        print(f'{budget.description}.\nOutput: {out}; results: {results_dir}/fashion_mnist_{budget.name}.md')
        total = 0.
        for s in plan.stages:
            total += s.nominal_s
            print(f'\n# {s.name} ({s.kind}, ~{fmt_s(s.nominal_s)} at 2-core CPU throughput)\n'
                  + ' '.join(a if a else "''" for a in s.argv))
        print(f'\n~{fmt_s(total)} in all at the nominal 2-core CPU throughput')
        return 0
    if runner is subprocess_runner:
        missing = [s for s in ('train.py', 'validate.py') if not os.path.isfile(os.path.join(scripts, s))]
        if not scripts or missing:
            raise BenchmarkError(f'timm\'s {", ".join(missing or ["train.py", "validate.py"])} not found: pass '
                                 '--timm-scripts or set TIMM_SCRIPTS_DIR to a pytorch-image-models checkout')
    if not os.path.isdir(args.data_dir):
        what = 'is a file, not a folder' if os.path.exists(args.data_dir) else 'does not exist'
        raise BenchmarkError(f'{args.data_dir} {what} (apt-get install dataset-fashion-mnist)')
    for split in ('train', 't10k'):  # (before anything is made)
        for kind in ('images-idx3', 'labels-idx1'):
            find_idx(args.data_dir, f'{split}-{kind}-ubyte')
    os.makedirs(out, exist_ok=True)
    lock = open(os.path.join(out, '.lock'), 'w')
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise BenchmarkError(f'another fashion_mnist.py is running on {out}')
    orch = Orchestrator(plan, runner=runner, log_file=os.path.join(out, 'benchmark.log'))
    prepare_data(plan, os.path.abspath(args.data_dir), orch.log)
    orch.run(lambda p, complete: write_table(p, results_dir, complete))
    orch.log(f'results: {os.path.join(results_dir, f"fashion_mnist_{budget.name}")}.md / .json')
    return 0


if __name__ == '__main__':
    sys.exit(main())
