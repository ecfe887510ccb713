"""Where one training epoch of a Fashion-MNIST recipe spends its time, phase by phase, and what patch dropout saves.

    python benchmarks/epoch_profile.py --out benchmarks/results                   # mlit_xxs, patch_drop_rate 0 vs 0.5
    python benchmarks/epoch_profile.py --recipe scratch/mlit_xxs_fashion_mnist --patch-drop-rates 0 0.25 0.5 \
        --steps 10 --repeats 3 --out benchmarks/results

The pieces are built from the recipe as timm's train.py builds them: the dataset (`timm.data.create_dataset`, the
idx files of --data-dir), the loader (`timm.data.create_loader`: the recipe's RandomResizedCrop, flip, AutoAugment,
normalisation, --workers worker processes), the model (`timm.create_model` with the recipe's arguments and the
patch dropout under test), the optimizer (`timm.optim.create_optimizer_v2`) and the precision `timm-mlit-run` picks
for this CPU (`timm_mlit.precision.auto_amp_dtype`). Each training step is split into its phases: waiting for the
loader's next batch, forward with the loss, backward, optimizer step. The variants (one per patch-drop rate) share
one loader and run round-robin, --steps steps per turn, --repeats turns; the medians per step are scaled to an
epoch of --epoch-images images. `augment_core_s` is the CPU time the augmentation costs per epoch on one core
(measured in this process, without workers): the loader's workers take it from the same cores as the model.
Also evaluated: one validation pass over --val-images images (train.py's per-epoch eval).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timm  # noqa: E402
from common import checked, machine, results_folder, write_results  # noqa: E402
from timm.data import create_dataset, create_loader, resolve_data_config  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

import timm_mlit  # noqa: E402,F401
import timm_mlit.data  # noqa: E402,F401  (registers torch/fashion_mnist)
from timm_mlit.cli import exit_on_error  # noqa: E402
from timm_mlit.precision import auto_amp_dtype  # noqa: E402
from timm_mlit.recipes import resolve_recipe  # noqa: E402

PHASES = ('data_wait', 'forward', 'backward', 'optimizer')


def _loader(cfg: dict, data_dir: str, workers: int, training: bool):
    dataset = create_dataset(cfg['dataset'], root=data_dir, split='train' if training else 'validation',
                             is_training=training, batch_size=cfg['batch_size'])
    data_config = resolve_data_config(cfg)
    loader = create_loader(
        dataset, input_size=data_config['input_size'], batch_size=cfg['batch_size'], is_training=training,
        no_aug=False, scale=cfg.get('scale'), hflip=cfg.get('hflip', 0.5), auto_augment=cfg.get('aa'),
        color_jitter=cfg.get('color_jitter', 0.), interpolation=cfg.get('train_interpolation', 'bilinear'),
        mean=data_config['mean'], std=data_config['std'], num_workers=workers, crop_pct=data_config['crop_pct'],
        device=torch.device('cpu'), use_prefetcher=False, persistent_workers=training)
    return dataset, loader


def _augment_core_seconds(dataset, n: int) -> float:
    """Seconds of one core to load and augment `n` training images (the loader workers' work)."""
    start = time.process_time()
    for i in range(n):
        dataset[i % len(dataset)]
    return (time.process_time() - start) / n


@exit_on_error('epoch_profile.py')
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--recipe', default='scratch/mlit_xxs_fashion_mnist', help='a packaged recipe or YAML file')
    parser.add_argument('--data-dir', default=None, help='the idx files (default: the recipe\'s data_dir)')
    parser.add_argument('--patch-drop-rates', type=float, nargs='+', default=[0., 0.5])
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--steps', type=int, default=8, help='timed steps per turn (after a warm-up turn)')
    parser.add_argument('--repeats', type=int, default=3, help='turns of every variant, round-robin')
    parser.add_argument('--epoch-images', type=int, default=55000, help='the epoch the step times are scaled to')
    parser.add_argument('--val-images', type=int, default=5000)
    parser.add_argument('--augment-images', type=int, default=512, help='images for augment_core_s')
    parser.add_argument('--out', type=checked(results_folder), default='benchmarks/results')
    args = parser.parse_args(argv)
    for rate in args.patch_drop_rates:
        if not 0 <= rate < 1:
            parser.error(f'--patch-drop-rates: {rate} is not in [0, 1)')
    if min(args.steps, args.repeats, args.workers + 1, args.epoch_images, args.augment_images) < 1:
        parser.error('--steps, --repeats, --epoch-images and --augment-images must be positive, --workers >= 0')
    with open(resolve_recipe(args.recipe)) as f:
        try:
            cfg = yaml.safe_load(f)
        except yaml.YAMLError as e:
            parser.error(f'--recipe {args.recipe} is not YAML: {" ".join(str(e).split())}')
    unset = [k for k in ('model', 'num_classes', 'dataset', 'batch_size') if not isinstance(cfg, dict) or k not in cfg]
    if unset:
        parser.error(f'--recipe {args.recipe} is not a train.py recipe: it sets no {", ".join(unset)}')
    data_dir = args.data_dir or cfg.get('data_dir')
    if not data_dir:
        parser.error('the recipe names no data_dir: give --data-dir')
    amp_dtype = auto_amp_dtype('cpu') if cfg.get('amp') is None else getattr(torch, cfg.get('amp_dtype', 'float16'))

    dataset, loader = _loader(cfg, data_dir, args.workers, training=True)
    _, val_loader = _loader(cfg, data_dir, args.workers, training=False)
    batches = iter(loader)

    def variant(rate: float):
        torch.manual_seed(0)
        model = timm.create_model(cfg['model'], num_classes=cfg['num_classes'], patch_drop_rate=rate).train()
        opt = create_optimizer_v2(model, cfg.get('opt', 'adamw'), lr=1e-3, weight_decay=cfg.get('weight_decay', 0.))
        times = {p: [] for p in PHASES}

        def turn(record: bool):
            nonlocal batches
            for _ in range(args.steps):
                t = [time.perf_counter()]
                try:
                    x, y = next(batches)
                except StopIteration:
                    batches = iter(loader)
                    x, y = next(batches)
                t.append(time.perf_counter())
                with torch.autocast('cpu', dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = F.cross_entropy(model(x), y)
                t.append(time.perf_counter())
                loss.backward()
                t.append(time.perf_counter())
                opt.step()
                opt.zero_grad(set_to_none=True)
                t.append(time.perf_counter())
                if record:
                    for p, a, b in zip(PHASES, t, t[1:]):
                        times[p].append(b - a)
        return model, turn, times

    variants = {rate: variant(rate) for rate in args.patch_drop_rates}
    for _, turn, _ in variants.values():
        turn(record=False)
    for _ in range(args.repeats):
        for _, turn, _ in variants.values():
            turn(record=True)

    def validate(model) -> float:
        start = time.perf_counter()
        model.eval()
        with torch.no_grad(), torch.autocast('cpu', dtype=amp_dtype, enabled=amp_dtype is not None):
            for i, (x, _) in enumerate(val_loader):
                if i * cfg['batch_size'] >= args.val_images:
                    break
                model(x)
        model.train()
        return time.perf_counter() - start

    augment_core_s = _augment_core_seconds(dataset, args.augment_images) * args.epoch_images
    steps_per_epoch = args.epoch_images / cfg['batch_size']
    rows = []
    for rate, (model, _, times) in variants.items():
        row = dict(model=cfg['model'], patch_drop_rate=rate)
        for p in PHASES:
            row[f'{p}_s'] = statistics.median(times[p]) * steps_per_epoch
        row['train_s'] = sum(row[f'{p}_s'] for p in PHASES)
        row['img_s'] = args.epoch_images / row['train_s']
        row['validate_s'] = validate(model)
        row['augment_core_s'] = augment_core_s
        rows.append(row)
    for row in rows:
        row['vs_first'] = rows[0]['train_s'] / row['train_s']
    command = 'python benchmarks/epoch_profile.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
    meta = dict(machine=machine(), recipe=args.recipe, amp_dtype=str(amp_dtype).replace('torch.', ''),
                batch=cfg['batch_size'], workers=args.workers, epoch_images=args.epoch_images,
                val_images=args.val_images, steps_timed=args.steps * args.repeats, torch=torch.__version__,
                timm=timm.__version__, command=command)
    write_results(args.out, f'epoch_profile_{cfg["model"]}', meta, rows,
                  ['model', 'patch_drop_rate', 'data_wait_s', 'forward_s', 'backward_s', 'optimizer_s', 'train_s',
                   'img_s', 'validate_s', 'augment_core_s', 'vs_first'])


if __name__ == '__main__':
    main()
