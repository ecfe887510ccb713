"""Mobile V-MoE end to end: timm-mlit-superclasses from a dense checkpoint, then timm's own train.py with the
super-class router loss (timm-mlit-run --superclasses) and validate.py on its checkpoint.

The train.py / validate.py tests need the scripts: TIMM_SCRIPTS_DIR=/path/to/pytorch-image-models.
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
from PIL import Image
from readme import snippet

import timm_mlit  # noqa: F401
from timm_mlit.data import DEBIAN_FASHION_MNIST, read_idx, write_idx
from timm_mlit.script_args import take_superclass_args as _take_superclass_args
from timm_mlit.superclasses import SuperClasses, load_superclasses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS_DIR = os.environ.get('TIMM_SCRIPTS_DIR', '')
needs_scripts = pytest.mark.skipif(not SCRIPTS_DIR, reason='TIMM_SCRIPTS_DIR is not set: point it at a '
                                                           'pytorch-image-models checkout (train.py, validate.py)')
CLASSES = 4
MODEL = ['--model', 'mobile_vmoe_vit_xxs_patch3_36', '--model-kwargs', 'num_experts=2', 'depth=3',
         '--num-classes', str(CLASSES), '--input-size', '3', '36', '36']
SMALL_RUN = ['-b', '8', '-j', '1', '--device', 'cpu']
SUPERCLASSES = snippet('vmoe-superclasses').strip()
TRAIN = snippet('vmoe-train').strip()


def readme_argv(command: str, **replace) -> list:
    """A command of docs/mobile_vmoe.md as argv for `python -m`, its words replaced (timm-mlit-X -> timm_mlit.X)."""
    for old, new in replace.items():
        assert old in command, old
        command = command.replace(old, str(new))
    argv = shlex.split(command)
    modules = {'timm-mlit-superclasses': 'timm_mlit.superclasses', 'timm-mlit-run': 'timm_mlit.run'}
    return [modules[argv[0]]] + argv[1:]


def run(*argv, check=True) -> subprocess.CompletedProcess:
    env = dict(os.environ, TIMM_SCRIPTS_DIR=SCRIPTS_DIR)
    r = subprocess.run([sys.executable, '-m', *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    if check:
        assert r.returncode == 0, f'{argv}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}'
    return r


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    """train/ and validation/ folders of 4 colour classes, two pairs of similar colours (two natural groups)."""
    root = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    colours = np.array([(220, 40, 40), (180, 70, 40), (40, 40, 220), (40, 80, 180)])
    for split, n in (('train', 12), ('validation', 8)):
        for c in range(CLASSES):
            d = root / split / f'class{c}'
            d.mkdir(parents=True)
            for i in range(n):
                img = np.clip(colours[c] + rng.normal(0, 70, (36, 36, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f'{i}.png')
    return root


def _summary(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_superclasses_cli_clusters_a_dense_checkpoints_confusions(image_folder, tmp_path):
    torch.manual_seed(0)
    dense = timm.create_model('mobile_vmoe_vit_xxs_patch3_36', moe_layers=0, depth=2, num_classes=CLASSES)
    ckpt = tmp_path / 'dense.pth'
    torch.save(dense.state_dict(), ckpt)
    out, png = tmp_path / 'sc.json', tmp_path / 'confusion.png'
    r = run(*readme_argv(SUPERCLASSES, **{
        'moe_layers=0': 'moe_layers=0 depth=2', '--num-classes 10': f'--num-classes {CLASSES}',
        'output/train/dense/last.pth.tar': ckpt, '--dataset torch/fashion_mnist': "--dataset ''",
        'data/fmnist-holdout': image_folder, '--num-superclasses 4': '--num-superclasses 2',
        'superclasses.json': out, 'confusion.png': png}), '-j', '0')
    sc = load_superclasses(str(out), num_classes=CLASSES, num_superclasses=2)
    assert sc.class_names == [f'class{c}' for c in range(CLASSES)]
    assert 'super-class 0: class0' in r.stdout and png.stat().st_size > 1000
    data = json.loads(out.read_text())
    assert np.asarray(data['confusion']).sum() == 8 * CLASSES  # every validation image counted once
    r = run('timm_mlit.superclasses', '--model', 'x', '-o', str(out), check=False)
    assert r.returncode == 2 and '--checkpoint' in r.stderr


def test_superclass_options_are_taken_out_of_the_scripts_arguments():
    rest, path, weight = _take_superclass_args(['--model', 'm', '--superclasses', 'f.json', '--router-loss-weight=0.5',
                                                '-b', '8'])
    assert rest == ['--model', 'm', '-b', '8'] and path == 'f.json' and weight == 0.5
    assert _take_superclass_args(['--superclasses=f.json']) == ([], 'f.json', None)
    with pytest.raises(ValueError, match='needs --superclasses'):
        _take_superclass_args(['--router-loss-weight', '0.3'])
    with pytest.raises(ValueError, match='must be a number'):
        _take_superclass_args(['--superclasses', 'f', '--router-loss-weight', 'x'])
    with pytest.raises(ValueError, match='needs a value'):
        _take_superclass_args(['--superclasses'])


@pytest.mark.slow
@needs_scripts
def test_train_py_with_the_superclass_router_loss_then_validate_py(image_folder, tmp_path):
    sc_file = SuperClasses([0, 0, 1, 1], class_names=[f'class{c}' for c in range(CLASSES)]).save(
        str(tmp_path / 'sc.json'))
    out = tmp_path / 'train'
    run(*readme_argv(TRAIN, **{'num_experts=4': 'num_experts=2 depth=3', 'superclasses.json': sc_file}),
        '--dataset', '', '--data-dir', str(image_folder), '--num-classes', str(CLASSES), '--epochs', '2',
        '--warmup-epochs', '0', '--mixup', '0.2', '--model-ema', *SMALL_RUN, '--output', str(out), '--experiment', 'sc')
    rows = _summary(out / 'sc' / 'summary.csv')
    assert [r['epoch'] for r in rows] == ['0', '1']
    for r in rows:
        assert 0 <= float(r['train_router_acc']) <= 100 and 0 <= float(r['eval_router_acc']) <= 100
        assert float(r['train_moe_loss']) >= 0
    # with --model-ema the eval metrics are the EMA model's: the router accuracy beside them is the EMA router's too
    ckpt = torch.load(out / 'sc' / 'last.pth.tar', map_location='cpu', weights_only=False)
    model = timm.create_model('mobile_vmoe_vit_xxs_patch3_36', num_experts=2, depth=3, num_classes=CLASSES).eval()
    model.load_state_dict(ckpt['state_dict_ema'])
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    ds = timm.data.create_dataset('', root=str(image_folder), split='validation', transform=transform)
    with torch.no_grad():
        x, y = map(torch.stack, zip(*[(img, torch.tensor(t)) for img, t in ds]))
        model(x)
    super_of = torch.tensor([0, 0, 1, 1])
    ema_acc = 100. * (model.blocks[1].router.last_logits.argmax(1) == super_of[y]).float().mean().item()
    assert float(rows[-1]['eval_router_acc']) == pytest.approx(ema_acc)
    results = tmp_path / 'results.json'
    run('timm_mlit.run', 'validate.py', '--data-dir', str(image_folder), *MODEL, '--checkpoint',
        str(out / 'sc' / 'last.pth.tar'), *SMALL_RUN, '--results-file', str(results), '--results-format', 'json')
    assert 0 <= json.loads(results.read_text())['top1'] <= 100


@pytest.mark.slow
@needs_scripts
def test_train_py_names_a_superclass_file_that_does_not_fit_the_model(image_folder, tmp_path):
    sc_file = SuperClasses([0, 1, 2, 2]).save(str(tmp_path / 'sc3.json'))
    r = run('timm_mlit.run', 'train.py', '--data-dir', str(image_folder), *MODEL, '--epochs', '1', *SMALL_RUN,
            '--output', str(tmp_path / 'train'), '--superclasses', sc_file, check=False)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        "timm-mlit-run: error: the super-class file has 3 super-classes, but the model's router has 2 experts: "
        "create the model with num_experts=3")
    # a script that builds no training task cannot take the router loss: said, not silently ignored
    ckpt = tmp_path / 'weights.pth'
    torch.save(timm.create_model('mobile_vmoe_vit_xxs_patch3_36', num_experts=2, depth=3,
                                 num_classes=CLASSES).state_dict(), ckpt)
    r = run('timm_mlit.run', 'validate.py', '--data-dir', str(image_folder), *MODEL, '--checkpoint', str(ckpt),
            *SMALL_RUN, '--superclasses', sc_file, check=False)
    assert r.returncode == 1 and 'built no classification task' in r.stderr.strip().splitlines()[-1]


@pytest.mark.slow
@needs_scripts
@pytest.mark.skipif(not os.path.isdir(DEBIAN_FASHION_MNIST),
                    reason='Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)')
def test_fashion_mnist_benchmark_command_runs_every_stage(tmp_path):
    """docs/mobile_vmoe.md's benchmark command on the first 700 training and 300 test images of the real Fashion-MNIST
    (200 held out), one epoch: every stage runs and the table has its four rows."""
    data = tmp_path / 'fmnist'
    data.mkdir()
    for split, n in (('train', 700), ('t10k', 300)):
        for kind, dims in (('images', 3), ('labels', 1)):
            name = f'{split}-{kind}-idx{dims}-ubyte.gz'
            write_idx(str(data / name), read_idx(os.path.join(DEBIAN_FASHION_MNIST, name))[:n].numpy())
    argv = shlex.split(snippet('vmoe-benchmark').strip().replace('/var/tmp/mvmoe', str(tmp_path / 'out')))
    results = tmp_path / 'results'
    r = subprocess.run([sys.executable, *argv[1:], '--data-dir', str(data), '--holdout', '200', '--epochs', '1',
                        '--results', str(results), '--repeats', '2', '--threads', '1', '--jobs', '1'],
                       cwd=ROOT, env=dict(os.environ, TIMM_SCRIPTS_DIR=SCRIPTS_DIR), capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {row['row']: row for row in json.loads((results / 'mobile_vmoe_fashion_mnist.json').read_text())['rows']}
    assert sorted(rows) == ['dense_twin', 'mlit_xxs', 'moe_end_to_end', 'moe_superclass']
    for row in rows.values():
        assert 0 <= row['test_top1'] <= 100 and row['params_touched'] <= row['params_total']
        assert row['latency_ms_b1'] > 0 and row['img_s_b256'] > 0
    moe, dense = rows['moe_superclass'], rows['dense_twin']
    assert moe['params_touched'] - dense['params_total'] == 4 * 108  # the router (E=4) is all a k=1 image adds
    assert 0 <= moe['router_superclass_acc'] <= 100 and 'router_superclass_acc_matched' in rows['moe_end_to_end']
    assert sum(moe['expert_share']) == 300  # every test image routed once
    assert (results / 'mobile_vmoe_fashion_mnist_confusion.png').stat().st_size > 1000
    assert '| Mobile V-MoE, super-class routing' in (results / 'mobile_vmoe_fashion_mnist.md').read_text()
