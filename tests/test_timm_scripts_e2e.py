"""End-to-end: timm's own, unmodified train.py / validate.py / benchmark.py run mLiT with our recipes.

Needs the scripts (not in timm's wheel): TIMM_SCRIPTS_DIR=/path/to/pytorch-image-models. A few epochs on a tiny
image folder written by the test, CPU, batch 8. The commands are those of README.md and docs/training.md, with
small-run overrides appended.
"""
import csv
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from readme import snippet
from safetensors.torch import load_file

import timm_mlit  # noqa: F401
from timm_mlit.data import DEBIAN_FASHION_MNIST, read_idx, write_idx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS_DIR = os.environ.get('TIMM_SCRIPTS_DIR', '')
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SCRIPTS_DIR, reason='TIMM_SCRIPTS_DIR is not set: point it at a pytorch-image-models '
                                               'checkout (train.py, validate.py, benchmark.py)'),
]
CLASSES = 3
SMALL_RUN = '-b 8 -j 1 --device cpu'  # appended to every documented command (-j 0 fails with timm 1.0.28's loader)


def timm_mlit_run(command: str, *extra: str) -> subprocess.CompletedProcess:
    """Run a documented command line (`timm-mlit-run SCRIPT ...`) with this interpreter, from the repository root."""
    argv = shlex.split(command)
    assert argv[0] == 'timm-mlit-run'
    env = dict(os.environ, TIMM_SCRIPTS_DIR=SCRIPTS_DIR)
    r = subprocess.run([sys.executable, '-m', 'timm_mlit.run', *argv[1:], *extra], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f'{command} {extra}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}'
    return r


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    """train/ and validation/ folders of 3 noisy colour classes (32x32, as CIFAR): learnable, not trivially."""
    root = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    colours = np.array([(200, 60, 60), (60, 200, 60), (60, 60, 200)])
    for split, n in (('train', 16), ('validation', 10)):
        for c in range(CLASSES):
            d = root / split / f'class{c}'
            d.mkdir(parents=True)
            for i in range(n):
                img = np.clip(colours[c] + rng.normal(0, 110, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f'{i}.png')
    return root


def _summary(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _own_top1(checkpoint, data_dir) -> float:
    """The model's own evaluation: timm's eval transform from the model's cfg, fp32, plain loop."""
    model = timm.create_model('mlit_xxs', num_classes=CLASSES, checkpoint_path=str(checkpoint)).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    ds = timm.data.create_dataset('', root=str(data_dir), split='validation', transform=transform)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(ds), 8):
            x, y = zip(*[ds[j] for j in range(i, min(i + 8, len(ds)))])
            correct += (model(torch.stack(x)).argmax(-1) == torch.tensor(y)).sum().item()
    return 100. * correct / len(ds)


# --- the commands of docs/training.md ---
TRAIN_SCRATCH = snippet('train-scratch').strip()
FINETUNE = snippet('train-finetune').strip()
VALIDATE = snippet('validate').strip()


def _with(command, **replace):
    for old, new in replace.items():
        command = command.replace(old, str(new))
    return command


def test_scratch_recipe_through_train_py_then_validate_py_top1_equals_the_models_own(image_folder, tmp_path):
    out = tmp_path / 'train'
    cmd = _with(TRAIN_SCRATCH, **{'data/cifar10': image_folder})
    r = timm_mlit_run(cmd, '--dataset', '', '--num-classes', str(CLASSES), '--epochs', '2', '--warmup-epochs', '1',
                      *SMALL_RUN.split(), '--output', str(out), '--experiment', 'scratch')
    run = out / 'scratch'
    for name in ('args.yaml', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar', 'checkpoint-1.pth.tar'):
        assert (run / name).is_file(), name
    rows = _summary(run / 'summary.csv')
    assert [r['epoch'] for r in rows] == ['0', '1']
    assert all(0 <= float(r['eval_top1']) <= 100 and float(r['train_loss']) > 0 for r in rows)
    args = yaml.safe_load((run / 'args.yaml').read_text())
    # Table 6's CIFAR-10 base lr, by the linear rule at batch 8
    assert f'Learning rate ({1e-3 * 8 / 256}) calculated from base learning rate (0.001)' in r.stdout + r.stderr
    assert 'with linear scaling' in r.stdout + r.stderr
    assert args['amp'] and args['amp_dtype'] == 'bfloat16' and args['layer_decay'] is None

    ckpt = run / 'last.pth.tar'
    results = tmp_path / 'results.json'
    cmd = _with(VALIDATE, **{'--dataset torch/cifar100': "--dataset ''", 'data/cifar100': image_folder,
                             '--split test': '--split validation', '--num-classes 100': f'--num-classes {CLASSES}',
                             'output/train/RUN/model_best.pth.tar': ckpt})
    timm_mlit_run(cmd, *SMALL_RUN.split(), '--results-file', str(results), '--results-format', 'json')
    top1 = json.loads(results.read_text())['top1']
    assert top1 == round(_own_top1(ckpt, image_folder), 4)


def _expected_layer_scales(model, decay: float):
    """(lr scale, shape, decayed?) of every parameter, by the rule the paper's layer-wise decay means: stem (patch
    and position embedding) = layer 0, block i = layer i+1, final norm with the last block, head = scale 1."""
    depth = len(model.blocks)
    no_wd = model.no_weight_decay()
    out = []
    for name, p in model.named_parameters():
        if name.startswith(('pos_embed', 'patch_embed')):
            layer = 0
        elif name.startswith('blocks.'):
            layer = int(name.split('.')[1]) + 1
        elif name.startswith('norm.'):
            layer = depth
        else:
            assert name.startswith('head.'), name
            layer = depth + 1
        decayed = p.ndim > 1 and name not in no_wd
        out.append((round(decay ** (depth + 1 - layer), 10), tuple(p.shape), decayed))
    return sorted(out)


def test_finetune_from_exported_encoder_loads_it_new_head_and_layer_decay_groups(image_folder, tmp_path):
    from timm_mlit.checkpoint import export_encoder
    from timm_mlit.mae import MaskedAutoencoderMLiT

    torch.manual_seed(123)  # an encoder train.py's own seed would not produce
    mae = MaskedAutoencoderMLiT(timm.create_model('mlit_xxs', num_classes=0, moe_loss_weight=0.))
    encoder_file = tmp_path / 'pretrain' / 'encoder.safetensors'
    export_encoder(mae.state_dict(), str(encoder_file), arch='mlit_xxs')  # what timm-mlit-pretrain writes

    out = tmp_path / 'train'
    cmd = _with(FINETUNE, **{'data/cifar100': image_folder, 'output/pretrain/RUN/encoder.safetensors': encoder_file})
    timm_mlit_run(cmd, '--dataset', '', '--num-classes', str(CLASSES), '--epochs', '1', '--warmup-epochs', '1',
                  *SMALL_RUN.split(), '--output', str(out), '--experiment', 'ft')
    ckpt = torch.load(out / 'ft' / 'last.pth.tar', map_location='cpu', weights_only=False)
    sd = ckpt['state_dict']
    encoder = load_file(str(encoder_file))
    assert set(sd) - set(encoder) == {'head.weight', 'head.bias'}
    assert sd['head.weight'].shape == (CLASSES, 108)
    # 6 AdamW updates during warm-up move a weight by < 6 * lr; a different init differs by ~0.1
    moved = max((sd[k].float() - v.float()).abs().max().item() for k, v in encoder.items())
    assert moved < 2e-3
    fresh = timm.create_model('mlit_xxs', num_classes=CLASSES).state_dict()
    assert max((fresh[k] - v).abs().max().item() for k, v in encoder.items()) > 0.05

    # train.py's optimizer, as saved: layer-wise lr decay 0.9 (Table 4), every parameter in its layer's group
    opt = ckpt['optimizer']
    model = timm.create_model('mlit_xxs', num_classes=CLASSES)
    seen = []
    base_lrs = set()
    for group in opt['param_groups']:
        base_lrs.add(round(group['lr'] / group['lr_scale'], 12))
        for idx in group['params']:
            seen.append((round(group['lr_scale'], 10), tuple(opt['state'][idx]['exp_avg'].shape),
                         group['weight_decay'] > 0))
    assert sorted(seen) == _expected_layer_scales(model, 0.9)
    assert len(base_lrs) == 1  # the scheduler applied each group's scale to one lr
    scales = sorted({s for s, _, _ in seen})
    assert scales[0] == pytest.approx(0.9 ** 10) and scales[-1] == 1.0 and len(scales) == 11



@pytest.mark.skipif(not os.path.isdir(DEBIAN_FASHION_MNIST),
                    reason='Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)')
def test_fashion_mnist_recipe_trains_through_train_py(tmp_path):
    """The real Fashion-MNIST (its first 64 train and 32 test images, so it runs in seconds) through the recipe,
    train.py's torch/fashion_mnist dataset, transforms and evaluation."""
    subset = tmp_path / 'fashion-mnist'
    subset.mkdir()
    for split, n in (('train', 64), ('t10k', 32)):
        images = read_idx(os.path.join(DEBIAN_FASHION_MNIST, f'{split}-images-idx3-ubyte.gz'))[:n]
        labels = read_idx(os.path.join(DEBIAN_FASHION_MNIST, f'{split}-labels-idx1-ubyte.gz'))[:n]
        write_idx(str(subset / f'{split}-images-idx3-ubyte.gz'), images.numpy())
        write_idx(str(subset / f'{split}-labels-idx1-ubyte.gz'), labels.numpy())
    out = tmp_path / 'train'
    timm_mlit_run('timm-mlit-run train.py -c train_configs/scratch/mlit_xxs_fashion_mnist.yaml',
                  '--data-dir', str(subset), '--epochs', '1', '--warmup-epochs', '0', *SMALL_RUN.split(),
                  '--output', str(out), '--experiment', 'fm')
    rows = _summary(out / 'fm' / 'summary.csv')
    assert len(rows) == 1 and 0 <= float(rows[0]['eval_top1']) <= 100
    assert torch.load(out / 'fm' / 'last.pth.tar', map_location='cpu', weights_only=False)[
        'state_dict']['head.weight'].shape == (10, 108)


def test_distillation_recipe_trains_with_a_local_dir_teacher_through_train_py(tmp_path):
    """scratch/mlit_xxs_fashion_mnist_kd: timm's LogitDistillationTask with a teacher that timm's save_for_hf wrote
    (a folder train.py loads through `--kd-model-name local-dir:FOLDER`), on 64 real Fashion-MNIST images."""
    from timm.models import save_for_hf
    subset = tmp_path / 'fashion-mnist'
    subset.mkdir()
    for split, n in (('train', 64), ('t10k', 32)):
        for kind in ('images-idx3', 'labels-idx1'):
            a = read_idx(os.path.join(DEBIAN_FASHION_MNIST, f'{split}-{kind}-ubyte.gz'))[:n]
            write_idx(str(subset / f'{split}-{kind}-ubyte.gz'), a.numpy())
    teacher = tmp_path / 'teacher'
    save_for_hf(timm.create_model('resnet10t', num_classes=10), str(teacher), safe_serialization=True,
                data_config=dict(input_size=(3, 36, 36), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0))
    out = tmp_path / 'train'
    r = timm_mlit_run('timm-mlit-run train.py -c scratch/mlit_xxs_fashion_mnist_kd',
                      '--kd-model-name', f'local-dir:{teacher}', '--data-dir', str(subset), '--epochs', '1',
                      '--warmup-epochs', '0', *SMALL_RUN.split(), '--output', str(out), '--experiment', 'kd')
    log = r.stdout + r.stderr
    assert 'LogitDistillationTask' in log or 'KD teacher' in log, log[-3000:]
    rows = _summary(out / 'kd' / 'summary.csv')
    assert len(rows) == 1 and 0 <= float(rows[0]['eval_top1']) <= 100
    state = torch.load(out / 'kd' / 'last.pth.tar', map_location='cpu', weights_only=False)['state_dict']
    assert state['head.weight'].shape == (10, 108) and not any(k.startswith('teacher') for k in state)


# --- the README's "Fine-tune on your own images": its folder layout and its two commands ---
IMAGE_FOLDER = snippet('image-folder')
TRAIN_IMAGE_FOLDER, VALIDATE_IMAGE_FOLDER = snippet('finetune-image-folder').strip().splitlines()


def _write_image_folder(layout: str, root, per_class: int = 4) -> list:
    """The README's layout (lines `my_images/<split>/<class>/*.png ...`) under `root`: `per_class` noisy 36x36 PNGs
    a folder, a colour per class. Returns the class names."""
    rng = np.random.default_rng(0)
    colours = {}
    for line in layout.strip().splitlines():
        top, split, name, files = line.split()[0].split('/')
        assert top == 'my_images' and files == '*.png', line
        colour = colours.setdefault(name, np.array([(200, 60, 60), (60, 60, 200), (60, 200, 60)][len(colours) % 3]))
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.clip(colour + rng.normal(0, 60, (36, 36, 3)), 0, 255).astype(np.uint8)).save(
                folder / f'{i}.png')
    return sorted(colours)


def test_readme_image_folder_recipe_fine_tunes_the_shipped_encoder_and_validate_py_scores_the_test_split(tmp_path):
    root, out = tmp_path / 'my_images', tmp_path / 'train'
    classes = _write_image_folder(IMAGE_FOLDER, root)
    assert sorted(p.name for p in root.iterdir()) == ['test', 'train', 'validation']
    num_classes = f'--num-classes {len(classes)}'
    timm_mlit_run(_with(TRAIN_IMAGE_FOLDER, **{'--data-dir my_images': f'--data-dir {root}',
                                               '--num-classes 2': num_classes}),
                  '--epochs', '1', '--warmup-epochs', '0', *SMALL_RUN.split(), '--output', str(out))
    run = out / 'my_images'
    rows = _summary(run / 'summary.csv')
    assert len(rows) == 1 and 0 <= float(rows[0]['eval_top1']) <= 100
    args = yaml.safe_load((run / 'args.yaml').read_text())
    assert (args['dataset'], args['train_split'], args['val_split']) == ('', 'train', 'validation')
    # the shipped MAE encoder, a new head: one AdamW step at lr 4e-3 * 8 / 256 moves a weight by ~1e-4
    encoder = load_file(timm.models.get_pretrained_cfg(args['model']).file)
    state = torch.load(run / 'last.pth.tar', map_location='cpu', weights_only=False)['state_dict']
    assert set(state) - set(encoder) == {'head.weight', 'head.bias'} and state['head.weight'].shape[0] == len(classes)
    assert max((state[k].float() - v.float()).abs().max().item() for k, v in encoder.items()) < 2e-3

    results, best = tmp_path / 'test.json', run / 'model_best.pth.tar'
    timm_mlit_run(_with(VALIDATE_IMAGE_FOLDER, **{'--data-dir my_images': f'--data-dir {root}',
                                                  '--num-classes 2': num_classes,
                                                  'output/train/my_images/model_best.pth.tar': best}),
                  *SMALL_RUN.split(), '--results-file', str(results), '--results-format', 'json')
    assert 0 <= json.loads(results.read_text())['top1'] <= 100


def test_benchmark_py_runs_mlit(tmp_path):
    results = tmp_path / 'bench.json'
    timm_mlit_run('timm-mlit-run benchmark.py --model mlit_xxs --bench inference', '--device', 'cpu', '-b', '2',
                  '--num-warm-iter', '1', '--num-bench-iter', '5', '--results-file', str(results),
                  '--results-format', 'json')
    result = json.loads(results.read_text())
    result = result[0] if isinstance(result, list) else result
    assert result['model'] == 'mlit_xxs' and result['infer_samples_per_sec'] > 0
