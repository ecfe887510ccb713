"""What the tests of publishing and loading weights share (test_hub, test_model_card, test_hubconf, test_weights,
test_publish): a model and its outputs, timm-mlit-publish as the console script runs it, a Hugging Face cache built
in the hub's own layout, a registered test tag, and the fixtures tests/conftest.py hands to every test file.

The Hugging Face Hub is never reached: Hub loads read a cache the tests build in the hub's own layout
(models--org--name/{blobs,snapshots/<commit>,refs/main}) with HF_HUB_OFFLINE=1 and HF_HOME / HF_HUB_CACHE in tmp.
"""
import argparse
import contextlib
import hashlib
import re
import shutil
import sys
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import torch
from timm.models import _registry
from timm.models._pretrained import PretrainedCfg

import timm_mlit  # noqa: F401
from timm_mlit import _weights, hub
from timm_mlit.mlit import _cfg

REPO_ROOT = Path(__file__).resolve().parents[1]
HUB_ID = 'timm-mlit/mlit_xxs.mae_ft_cifar100'


# ---------------------------------------------------------------------------------------------------------- helpers

def _model(num_classes: int = 100, seed: int = 0, name: str = 'mlit_xxs', **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=num_classes, **kwargs).eval()


def _x(in_chans: int = 3, size: int = 36) -> torch.Tensor:
    return torch.rand(2, in_chans, size, size, generator=torch.Generator().manual_seed(1))


def _out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _same_weights(model: torch.nn.Module, state_dict) -> bool:
    sd = model.state_dict()
    return sd.keys() == state_dict.keys() and all(torch.equal(sd[k], state_dict[k]) for k in sd)


def _main(argv) -> int:
    """hub.main as the console script runs it: its exit status, and an error's one line on stderr."""
    try:
        return hub.main(argv)
    except SystemExit as e:
        if not isinstance(e.code, str):  # argparse's usage errors, --help, --version: as they are
            raise
        print(e.code, file=sys.stderr)
        return 1


def _publish(tmp: Path, checkpoint: Path, out: Path, *extra: str) -> int:
    return _main([str(checkpoint), '--model', 'mlit_xxs', '--output-dir', str(out), *extra])


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


def put_in_hf_cache(folder: Path, cache: Path, repo_id: str) -> Path:
    """Place `folder` in a Hugging Face cache as the hub's downloads do: blobs named by their etag (sha256 for LFS
    files, git sha1 for others), snapshots/<commit>/<file> symlinks to them, refs/main naming the commit."""
    repo = cache / f'models--{repo_id.replace("/", "--")}'
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / 'blobs').mkdir(parents=True)
    snapshot = repo / 'snapshots' / commit
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        data = f.read_bytes()
        etag = hashlib.sha256(data).hexdigest() if f.suffix == '.safetensors' else _git_blob_sha1(data)
        (repo / 'blobs' / etag).write_bytes(data)
        (snapshot / f.name).symlink_to(Path('..') / '..' / 'blobs' / etag)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(commit)
    return snapshot


@contextlib.contextmanager
def registered_cfg(model_name_tag: str, cfg: dict, default: bool = False):
    """Register a pretrained cfg for an mLiT tag (optionally the arch's default) as mlit.py's default_cfgs would,
    and take it out again afterwards."""
    arch, tag = model_name_tag.split('.')
    saved_cfgs = {k: _registry._model_pretrained_cfgs.get(k) for k in (arch, model_name_tag)}
    saved_pretrained = set(_registry._model_has_pretrained)
    saved_tags = list(_registry._model_with_tags[arch])
    pretrained_cfg = PretrainedCfg(**dict(cfg, architecture=arch, tag=tag))
    _registry._model_pretrained_cfgs[model_name_tag] = pretrained_cfg
    _registry._model_with_tags[arch].append(model_name_tag)
    if pretrained_cfg.has_weights:
        _registry._model_has_pretrained.add(model_name_tag)
    if default:
        _registry._model_pretrained_cfgs[arch] = pretrained_cfg
        if pretrained_cfg.has_weights:
            _registry._model_has_pretrained.add(arch)
    try:
        yield
    finally:
        for k, v in saved_cfgs.items():
            if v is None:
                _registry._model_pretrained_cfgs.pop(k, None)
            else:
                _registry._model_pretrained_cfgs[k] = v
        _registry._model_has_pretrained.clear()
        _registry._model_has_pretrained.update(saved_pretrained)
        _registry._model_with_tags[arch] = saved_tags


def _encoder_safetensors(tmp: Path, model) -> Path:
    path = tmp / 'encoder.safetensors'
    safetensors.torch.save_file({k: v for k, v in model.state_dict().items() if not k.startswith('head.')}, path)
    return path


def _card_python_blocks(folder: Path):
    return re.findall(r'```python\n(.*?)```', (folder / 'README.md').read_text(), re.S)


# --------------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope='module')
def published(tmp_path_factory):
    """A trained-looking mlit_xxs classifier (CIFAR-100 head), its train.py checkpoint and its published folder."""
    tmp = tmp_path_factory.mktemp('published')
    model = _model(100, seed=0)
    checkpoint = tmp / 'last.pth.tar'
    torch.save({'state_dict': model.state_dict(), 'arch': 'mlit_xxs', 'epoch': 299,
                'args': argparse.Namespace(model='mlit_xxs', lr=5e-3)}, checkpoint)
    out = tmp / 'mlit_xxs.mae_ft_cifar100'
    rc = _publish(tmp, checkpoint, out, '--tag', 'mae_ft_cifar100', '--dataset', 'cifar100',
                  '--pretrain-dataset', 'cifar100', '--metric', 'top1=74.95', '--metric', 'top5=93.1')
    assert rc == 0
    return dict(model=model, folder=out, expected=_out(model, _x()))


@pytest.fixture
def offline_hf(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and an empty Hugging Face cache in tmp (env for subprocesses, constants for this one)."""
    home = tmp_path / 'hf_home'
    cache = home / 'hub'
    cache.mkdir(parents=True)
    for k, v in (('HF_HUB_OFFLINE', '1'), ('HF_HOME', str(home)), ('HF_HUB_CACHE', str(cache)),
                 ('TORCH_HOME', str(tmp_path / 'torch_home'))):
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HOME', str(home))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
    return cache


@pytest.fixture
def embedded(published, tmp_path, monkeypatch):
    """The published folder embedded as timm_mlit/weights/mlit_xxs.embedtest/ (in a tmp weights folder),
    registered the way mlit.py registers a weight, as mlit_xxs's default tag."""
    weights_dir = tmp_path / 'weights'
    weights_dir.mkdir()
    monkeypatch.setattr(_weights, 'WEIGHTS_DIR', weights_dir)
    shutil.copytree(published['folder'], weights_dir / 'mlit_xxs.embedtest')
    cfg = _cfg(**_weights.weights_source('mlit_xxs.embedtest'), num_classes=100,
               label_names=_weights.LABEL_NAMES['cifar100'])
    with registered_cfg('mlit_xxs.embedtest', cfg, default=True):
        yield cfg
