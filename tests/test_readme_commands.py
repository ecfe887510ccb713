"""The shell commands of README.md and docs/ for pre-training, publishing and the Fashion-MNIST pipelines, run as
written (paths pointed at test data, with small-run flags appended). The train.py / validate.py commands (README.md,
docs/training.md) are run by test_timm_scripts_e2e.py; those that made the shipped weights (on their model
cards) by test_shipped_weights.py; the zoo's publish command by test_fashion_mnist_zoo.py."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import timm
import torch
from readme import snippet
from safetensors.torch import load_file
from test_data import make_fashion_mnist

import timm_mlit  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def command(name: str, env: Optional[dict] = None, **replace) -> list:
    """The command block `name` (README.md or docs/) as argv, with `replace` applied; leading VAR=value words go
    into `env`."""
    text = snippet(name).strip()
    for old, new in replace.items():
        assert old in text, f'the command {name!r} no longer contains {old!r}'
        text = text.replace(old, str(new))
    return command_from(text, env)


def command_from(text: str, env: Optional[dict] = None) -> list:
    """One command line as argv (python: this interpreter; a console script: the one beside it); leading
    VAR=value words go into `env`."""
    argv = shlex.split(text)
    while '=' in argv[0] and env is not None:
        key, value = argv.pop(0).split('=', 1)
        env[key] = value
    if argv[0] == 'python':
        return [sys.executable] + argv[1:]
    exe = BIN / argv[0]  # the console script installed beside this interpreter
    return [str(exe) if exe.exists() else argv[0]] + argv[1:]


@pytest.mark.slow
def test_readme_pretrain_command_runs_and_exports_an_encoder(tmp_path):
    data = tmp_path / 'fmnist'
    make_fashion_mnist(str(data), n_train=32, n_test=8)
    out = tmp_path / 'out'
    argv = command('pretrain-fashion-mnist', **{'output/pretrain': out}) + [
        '--data-dir', str(data), '--epochs', '1', '--warmup-epochs', '0', '-b', '16', '--workers', '0',
        '--experiment', 'readme']
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    encoder = load_file(out / 'readme' / 'encoder.safetensors')
    model = timm.create_model('mlit_xxs', num_classes=0)
    assert encoder.keys() == model.state_dict().keys()


@pytest.mark.slow
def test_readme_publish_command_writes_a_hub_folder(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('mlit_xxs', num_classes=10).eval()
    ckpt = tmp_path / 'model_best.pth.tar'
    torch.save({'arch': 'mlit_xxs', 'state_dict': model.state_dict(), 'epoch': 3}, ckpt)
    out = tmp_path / 'hub'
    argv = command('publish', **{'output/train/RUN/model_best.pth.tar': ckpt, 'hub/mlit_xxs.ft': out})
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = torch.from_numpy(np.random.default_rng(0).random((2, 3, 36, 36), dtype=np.float32))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.slow
def test_readme_fashion_mnist_benchmark_command_plans_the_comparison(tmp_path):
    """The command as written, with --dry-run: the plan and every stage's command, nothing run."""
    scripts = tmp_path / 'pytorch-image-models'
    scripts.mkdir()
    for name in ('train.py', 'validate.py'):
        (scripts / name).write_text('raise SystemExit("not run in a dry run")\n')
    env = dict(os.environ)
    argv = command('fashion-mnist-benchmark', env=env, **{'/path/to/pytorch-image-models': scripts,
                                                          'output/fmnist': tmp_path / 'out'})
    assert env['TIMM_SCRIPTS_DIR'] == str(scripts)
    proc = subprocess.run(argv + ['--dry-run'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ('pretrain_mlit_xxs', 'finetune_mlit_xxs', 'scratch_mlit_xxs', 'scratch_resnet10t'):
        assert stage in proc.stdout


@pytest.mark.slow
def test_readme_fashion_mnist_zoo_commands_plan_the_pilots_and_the_zoo(tmp_path):
    """The two commands as written, with --dry-run: `tune` plans the MAE and the pilots on the held-out split, `zoo`
    every size with the pilots the committed fashion_mnist_tune.json chose, each scored once on the test set."""
    scripts = tmp_path / 'pytorch-image-models'
    scripts.mkdir()
    for name in ('train.py', 'validate.py'):
        (scripts / name).write_text('raise SystemExit("not run in a dry run")\n')
    lines = snippet('fashion-mnist-zoo').strip().splitlines()
    assert [line.split()[3] for line in lines] == ['tune', 'zoo']
    outputs = []
    for line in lines:
        env = dict(os.environ)
        text = line.replace('/path/to/pytorch-image-models', str(scripts)).replace('/var/tmp/zoo/out', str(tmp_path))
        argv = command_from(text, env)
        proc = subprocess.run(argv + ['--dry-run'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(proc.stdout)
    tune, zoo = outputs
    assert '# pretrain_mlit_xxs' in tune and tune.count('# tune_') == 7 and '--val-split validation' in tune
    # every size's mmLiT and mLiT, but those the committed fashion_mnist_zoo.json records as tested: kept, not rerun
    with open(os.path.join(ROOT, 'benchmarks', 'results', 'fashion_mnist_zoo.json')) as f:
        recorded = {r['key'] for r in json.load(f)['rows']}
    for size in ('xxs', 'xs', 's'):
        for key, train in ((f'mmlit_{size}', f'finetune_mlit_{size}'), (f'mlit_{size}', f'scratch_mlit_{size}')):
            planned = key not in recorded
            assert (f'# {train} ' in zoo) == planned and zoo.count(f'# eval_{key} ') == planned
            assert (f'\n{key}: tested, as ' in '\n' + zoo) == (not planned)
