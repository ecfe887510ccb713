""" Fashion-MNIST: Mobile V-MoE (super-class routing, end-to-end routing) against its dense twin and mLiT-XXS

    python benchmarks/mobile_vmoe_fashion_mnist.py --out /var/tmp/mvmoe --jobs 2      # ~2 h on 2 CPU cores
    python benchmarks/mobile_vmoe_fashion_mnist.py --out /var/tmp/mvmoe --dry-run     # the commands only

One pipeline for every row (arXiv 2309.04354's claim to test: the MoE beats its dense twin at equal per-image
compute), each stage skipped when its output is complete, so re-running after a kill continues (train.py --resume):

1. A held-out split: the first 55,000 of the 60,000 training images to train on, the last 5,000 to validate on,
   written as idx files (OUT/fmnist-holdout: train-* and t10k-*, so that train.py's 'validation' split is the
   held-out 5,000). Nothing below looks at the 10k test set until step 5.
2. The dense twin and mLiT-XXS, with timm's train.py (`timm-mlit-run`) and the same recipe for every row: the
   Fashion-MNIST scratch recipe with `--epochs EPOCHS --warmup-epochs 0 --aa '' -b 128 --lr 2e-3 --smoothing 0.1`.
   The dense twin is timm's VisionTransformer with mLiT-XXS's input, patch, width and depth (36x36, patch 3, 108
   wide, 9 layers, 6 heads, MLP ratio 2): the same module as `mobile_vmoe_vit_xxs_patch3_36` with moe_layers=0.
3. Super-classes: `timm-mlit-superclasses` on the dense twin's confusions on the held-out 5,000, E groups.
4. `mobile_vmoe_vit_xxs_patch3_36` (num_experts=E, top_k=1, MoE in the last 2 layers) trained twice: with the
   super-class router loss (`--superclasses`, λ = 0.3) and end-to-end (no super-class loss).
5. Each final checkpoint (last.pth.tar: no selection) scored once on the 10k test images by validate.py; the
   router's super-class accuracy on them (for the end-to-end router: under the best one-to-one matching of experts
   to super-classes, scipy's linear_sum_assignment, since nothing told it which expert is which); the parameters an
   image touches, counted from the routing on the test images; batch-1 latency and batch-256 images/s (eval, fp32,
   medians of interleaved runs on this machine with nothing else running).

Writes RESULTS/mobile_vmoe_fashion_mnist.{json,md}, the super-classes and their confusion-matrix heat map
(mobile_vmoe_fashion_mnist_superclasses.json / _confusion.png) beside them.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import at_least, checked, markdown_table, results_folder, time_interleaved  # noqa: E402
from fashion_mnist import hardware  # noqa: E402

import timm_mlit  # noqa: E402,F401
from timm_mlit.cli import fail  # noqa: E402
from timm_mlit.data import DEBIAN_FASHION_MNIST, IdxFashionMNIST, read_idx, write_idx  # noqa: E402

REPO = str(Path(__file__).resolve().parents[1])
RESULTS = os.path.join(REPO, 'benchmarks', 'results')
STEM = 'mobile_vmoe_fashion_mnist'
PROG = f'{STEM}.py'
DENSE_KWARGS = dict(img_size=36, patch_size=3, embed_dim=108, depth=9, num_heads=6, mlp_ratio=2)
EVAL_CFG = ['--input-size', '3', '36', '36', '--crop-pct', '1.0', '--mean', '0.5', '0.5', '0.5', '--std', '0.5', '0.5',
            '0.5', '--interpolation', 'bicubic']


@dataclass
class Row:
    name: str
    label: str
    model: str
    kwargs: Dict[str, object] = field(default_factory=dict)
    superclasses: bool = False


def rows(num_experts: int) -> List[Row]:
    moe = 'mobile_vmoe_vit_xxs_patch3_36'
    return [
        Row('dense_twin', 'dense twin (ViT, no MoE)', 'vit_tiny_patch16_224', DENSE_KWARGS),
        Row('mlit_xxs', 'mLiT-XXS (per-token top-2)', 'mlit_xxs'),
        Row('moe_superclass', f'Mobile V-MoE, super-class routing (E={num_experts}, k=1)', moe,
            dict(num_experts=num_experts), superclasses=True),
        Row('moe_end_to_end', f'Mobile V-MoE, end-to-end routing (E={num_experts}, k=1)', moe,
            dict(num_experts=num_experts)),
    ]


def kwargs_argv(kwargs: Dict[str, object]) -> List[str]:
    return ['--model-kwargs'] + [f'{k}={v}' for k, v in kwargs.items()] if kwargs else []


def train_argv(args, row: Row) -> List[str]:
    run = os.path.join(args.out, 'runs', row.name)
    argv = ['timm-mlit-run', 'train.py', '-c', 'scratch/mlit_xxs_fashion_mnist', '--data-dir', holdout_dir(args),
            '--epochs', str(args.epochs), '--warmup-epochs', '0', '--aa', '', '-b', '128', '--lr', '2e-3',
            '--smoothing', '0.1', '--output', os.path.join(args.out, 'runs'), '--workers', '1', '--seed', '0',
            '--checkpoint-hist', '1', '--log-interval', '50', '--device', 'cpu', '--experiment', row.name,
            '--model', row.model] + kwargs_argv(row.kwargs)
    if row.superclasses:
        argv += ['--superclasses', superclasses_path(args)]
    if os.path.isfile(os.path.join(run, 'last.pth.tar')):
        argv += ['--resume', os.path.join(run, 'last.pth.tar')]
    return argv


def holdout_dir(args) -> str:
    return os.path.join(args.out, 'fmnist-holdout')


def superclasses_path(args) -> str:
    return os.path.join(args.out, 'superclasses.json')


def epochs_done(args, row: Row) -> int:
    summary = os.path.join(args.out, 'runs', row.name, 'summary.csv')
    if not os.path.isfile(summary):
        return 0
    with open(summary) as f:
        return max(len(f.read().strip().splitlines()) - 1, 0)


def prepare_holdout(args):
    """The first 55k training images to train on, the last 5k as the 'validation' (t10k-*) split."""
    out = holdout_dir(args)
    if os.path.isfile(os.path.join(out, 't10k-labels-idx1-ubyte.gz')):
        return
    os.makedirs(out, exist_ok=True)
    src = args.data_dir
    images, labels = (read_idx(os.path.join(src, f'train-{k}-idx{d}-ubyte.gz')).numpy()
                      for k, d in (('images', 3), ('labels', 1)))
    n = len(labels) - args.holdout
    for split, sl in (('train', slice(0, n)), ('t10k', slice(n, None))):
        write_idx(os.path.join(out, f'{split}-images-idx3-ubyte.gz'), images[sl])
        write_idx(os.path.join(out, f'{split}-labels-idx1-ubyte.gz'), labels[sl])


def run_all(commands: List[List[str]], logs: List[str], threads: int):
    """Run the commands side by side, each with `threads` threads; raise if one fails."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    procs = []
    for argv, log in zip(commands, logs):
        print(f'$ {" ".join(repr(a) if not a else a for a in argv)}  > {log}', flush=True)
        procs.append(subprocess.Popen(argv, stdout=open(log, 'a'), stderr=subprocess.STDOUT, env=env, cwd=REPO))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f'a stage failed (exit codes {codes}); see {logs}')


def train_rows(args, todo: List[Row]):
    todo = [r for r in todo if epochs_done(args, r) < args.epochs]
    for i in range(0, len(todo), args.jobs):
        batch = todo[i:i + args.jobs]
        run_all([train_argv(args, r) for r in batch],
                [os.path.join(args.out, 'runs', f'{r.name}.log') for r in batch], max(1, args.threads // len(batch)))


def make_superclasses(args, dense: Row):
    if os.path.isfile(superclasses_path(args)):
        return
    argv = ['timm-mlit-superclasses', '--model', dense.model] + kwargs_argv(dense.kwargs) + [
        '--num-classes', '10', '--checkpoint', os.path.join(args.out, 'runs', dense.name, 'last.pth.tar'),
        '--dataset', 'torch/fashion_mnist', '--data-dir', holdout_dir(args), '--split', 'validation',
        '--num-superclasses', str(args.num_superclasses), '--output', superclasses_path(args),
        '--plot', os.path.join(args.out, 'confusion.png')] + EVAL_CFG
    run_all([argv], [os.path.join(args.out, 'superclasses.log')], args.threads)


def build(row: Row, checkpoint: str):
    import timm
    return timm.create_model(row.model, num_classes=10, checkpoint_path=checkpoint, **row.kwargs).eval()


def test_loader(args, batch_size: int = 256):
    from timm.data import create_dataset, create_transform
    transform = create_transform((3, 36, 36), interpolation='bicubic', mean=(.5,) * 3, std=(.5,) * 3, crop_pct=1.)
    ds = create_dataset('torch/fashion_mnist', root=args.data_dir, split='validation', transform=transform)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=1)


def score(args, row: Row) -> dict:
    """validate.py's top-1 on the 10k test images, and the routing statistics of the test images."""
    ckpt = os.path.join(args.out, 'runs', row.name, 'last.pth.tar')
    result_file = os.path.join(args.out, 'eval', f'{row.name}.json')
    if not os.path.isfile(result_file):
        os.makedirs(os.path.dirname(result_file), exist_ok=True)
        argv = ['timm-mlit-run', 'validate.py', '--dataset', 'torch/fashion_mnist', '--data-dir', args.data_dir,
                '--split', 'validation', '--model', row.model] + kwargs_argv(row.kwargs) + [
            '--num-classes', '10', '--checkpoint', ckpt, '-b', '256', '-j', '1', '--device', 'cpu'] + EVAL_CFG + [
            '--results-file', result_file, '--results-format', 'json']
        run_all([argv], [os.path.join(args.out, 'eval', f'{row.name}.log')], args.threads)
    with open(result_file) as f:
        top1 = json.load(f)['top1']
    model = build(row, ckpt)
    return dict(row=row.name, model=row.label, test_top1=top1, **routing_stats(args, row, model))


def routing_stats(args, row: Row, model) -> dict:
    """Total parameters, the mean parameters an image touches on the test set, the router's super-class accuracy."""
    from scipy.optimize import linear_sum_assignment

    from timm_mlit.layers import MoE
    from timm_mlit.mobile_vmoe import image_routers
    from timm_mlit.superclasses import load_superclasses

    total = sum(p.numel() for p in model.parameters())
    # per-token MoE layers (mLiT): which experts each image's 145 tokens chose, read from the gates' routing
    chosen: Dict[str, List[torch.Tensor]] = {}
    hooks = [m.gate.register_forward_hook(lambda mod, inp, out, name=name: chosen.setdefault(name, []).append(
        torch.nn.functional.one_hot(out.top_idx, mod.num_experts).sum(1).reshape(-1, 145, mod.num_experts).amax(1)))
        for name, m in model.named_modules() if isinstance(m, MoE)]
    routers = image_routers(model)
    logits, labels = [], []
    with torch.inference_mode():
        for x, y in test_loader(args):
            model(x)
            labels.append(y)
            if routers:
                logits.append(routers[0][1].last_logits.argmax(1))
    for h in hooks:
        h.remove()
    out = dict(params_total=total, params_touched=total)
    if chosen:  # mLiT: the private W of an expert that no token of the image chose is untouched
        idle = 0.
        for name, m in model.named_modules():
            if isinstance(m, MoE):
                private = getattr(m.experts, m.experts.private)
                per_expert = private.weight[0].numel() + private.bias[0].numel()
                idle = idle + (m.gate.num_experts - torch.cat(chosen[name]).sum(1)).double() * per_expert
        out['params_touched'] = round(total - float(idle.mean()))
    if routers:  # Mobile V-MoE: k of E experts per MoE layer
        moe_mlps = [blk.mlp for blk in model.blocks if blk.is_moe]
        per_expert = sum(p.numel() for p in moe_mlps[0].parameters()) // model.num_experts
        out['params_touched'] = total - len(moe_mlps) * (model.num_experts - model.top_k) * per_expert
        sc = load_superclasses(superclasses_path(args), num_classes=10)
        super_true = torch.tensor(sc.assignment)[torch.cat(labels)].numpy()
        pred = torch.cat(logits).numpy()
        if row.superclasses:
            out['router_superclass_acc'] = 100. * float((pred == super_true).mean())
        else:
            counts = np.zeros((sc.num_superclasses, model.num_experts))
            np.add.at(counts, (super_true, pred), 1)
            r, c = linear_sum_assignment(-counts)
            out['router_superclass_acc_matched'] = 100. * counts[r, c].sum() / len(pred)
        out['expert_share'] = np.bincount(pred, minlength=model.num_experts).tolist()
    return out


def speed(args, selected: List[Row], repeats: int) -> Dict[str, dict]:
    """Batch-1 latency and batch-256 images/s of every row's model (eval, fp32), interleaved medians."""
    models = {r.name: build(r, os.path.join(args.out, 'runs', r.name, 'last.pth.tar')) for r in selected}
    one, batch = torch.randn(1, 3, 36, 36), torch.randn(256, 3, 36, 36)
    fns = {}
    for name, m in models.items():
        fns[f'{name}/1'] = lambda m=m: m(one)
        fns[f'{name}/256'] = lambda m=m: m(batch)
    with torch.inference_mode():
        t = time_interleaved(fns, repeats=repeats)
    return {name: dict(latency_ms_b1=1e3 * t[f'{name}/1'], img_s_b256=256 / t[f'{name}/256']) for name in models}


def write(args, results: List[dict]):
    os.makedirs(args.results, exist_ok=True)
    meta = dict(
        command=' '.join(sys.argv), epochs=args.epochs, num_superclasses=args.num_superclasses,
        hardware=hardware('cpu'), torch=torch.__version__, train_images=60000 - args.holdout,
        holdout_images=args.holdout,
        test_images=10000, date=time.strftime('%Y-%m-%d'),
        recipe=f"train_configs/scratch/mlit_xxs_fashion_mnist.yaml with --epochs {args.epochs} --warmup-epochs 0 "
               "--aa '' -b 128 --lr 2e-3 --smoothing 0.1 (every row)")
    with open(os.path.join(args.results, f'{STEM}.json'), 'w') as f:
        json.dump(dict(meta=meta, rows=results), f, indent=2)
    cols = ['model', 'params (total)', 'params touched / image', 'test top-1 (%)', 'router super-class acc. (%)',
            'batch-1 latency (ms)', 'batch-256 img/s']

    def acc(r):
        if 'router_superclass_acc' in r:
            return f"{r['router_superclass_acc']:.1f}"
        if 'router_superclass_acc_matched' in r:
            return f"{r['router_superclass_acc_matched']:.1f} (best matching)"
        return '—'
    table = markdown_table(cols, [[r['model'], f"{r['params_total']:,}", f"{r['params_touched']:,}",
                                   f"{r['test_top1']:.2f}", acc(r), f"{r['latency_ms_b1']:.2f}",
                                   f"{r['img_s_b256']:.0f}"] for r in results])
    with open(os.path.join(args.results, f'{STEM}.md'), 'w') as f:
        f.write(f'<!-- {json.dumps(meta)} -->\n{table}\n')
    shutil.copyfile(superclasses_path(args), os.path.join(args.results, f'{STEM}_superclasses.json'))
    shutil.copyfile(os.path.join(args.out, 'confusion.png'), os.path.join(args.results, f'{STEM}_confusion.png'))
    print(table)


def check_data(args):
    """End the command in one line unless --data-dir holds what `prepare_holdout` and `test_loader` read (checked
    before anything is made)."""
    for name in ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'):
        if not os.path.isfile(os.path.join(args.data_dir, name)):
            fail(PROG, f'{os.path.join(args.data_dir, name)} not found: --data-dir must hold the Fashion-MNIST idx '
                       f'files (apt-get install dataset-fashion-mnist)')
    try:
        IdxFashionMNIST(args.data_dir, train=False)
    except (OSError, ValueError) as e:
        fail(PROG, e)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', type=checked(results_folder), required=True,
                   help='run folder (keep it outside the repository)')
    p.add_argument('--data-dir', default=DEBIAN_FASHION_MNIST, help='Fashion-MNIST idx files')
    p.add_argument('--results', type=checked(results_folder), default=RESULTS, help='where the table goes')
    p.add_argument('--epochs', type=at_least(1), default=2)
    p.add_argument('--holdout', type=at_least(1), default=5000, help='the last this many training images validate')
    p.add_argument('--num-superclasses', '-E', type=at_least(2), default=4, help='E: super-classes = experts')
    p.add_argument('--jobs', type=at_least(1), default=2, help='training runs side by side (they share --threads)')
    p.add_argument('--threads', type=at_least(1), default=len(os.sched_getaffinity(0)))
    p.add_argument('--repeats', type=at_least(1), default=15, help='timing repeats (medians)')
    p.add_argument('--dry-run', action='store_true', help='print the training commands and stop')
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None):
    args = parse_args(argv)
    all_rows = rows(args.num_superclasses)
    if args.dry_run:
        for r in all_rows:
            print(' '.join(a or "''" for a in train_argv(args, r)))
        return 0
    check_data(args)
    os.makedirs(os.path.join(args.out, 'runs'), exist_ok=True)
    prepare_holdout(args)
    train_rows(args, all_rows[:2])
    make_superclasses(args, all_rows[0])
    train_rows(args, all_rows[2:])
    results = [score(args, r) for r in all_rows]
    timings = speed(args, all_rows, args.repeats)
    for r in results:
        r.update(timings[r['row']])
    write(args, results)
    return 0


if __name__ == '__main__':
    sys.exit(main())
