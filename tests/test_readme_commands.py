"""The README's shell commands for pre-training and publishing, run as written (paths pointed at test data, with
small-run flags appended). The train.py / validate.py commands are run by test_timm_scripts_e2e.py."""
import shlex
import subprocess
import sys
from pathlib import Path

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


def command(name: str, **replace) -> list:
    text = snippet(name).strip()
    for old, new in replace.items():
        assert old in text, f'README command {name!r} no longer contains {old!r}'
        text = text.replace(old, str(new))
    argv = shlex.split(text)
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
