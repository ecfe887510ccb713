"""Publishing (timm_mlit/hub.py) and every way of loading mLiT weights, with no network.

The Hugging Face Hub is never reached: Hub loads read a cache the tests build in the hub's own layout
(models--org--name/{blobs,snapshots/<commit>,refs/main}) with HF_HUB_OFFLINE=1 and HF_HOME / HF_HUB_CACHE in tmp.
"""
import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import yaml
from PIL import Image
from readme import snippet
from timm.layers import resample_abs_pos_embed
from timm.models import _registry
from timm.models._pretrained import PretrainedCfg

import timm_mlit  # noqa: F401
from timm_mlit import _weights, hub
from timm_mlit.mlit import _cfg

REPO_ROOT = Path(__file__).resolve().parents[1]
HUB_ID = 'timm-mlit/mlit_xxs.mae_ft_cifar100'
SHIPPED = _weights.WEIGHTS_DIR / 'mlit_xxs.mae_ft_fashion_mnist'

# README snippets, read from README.md and executed verbatim below (test_readme_snippet_*).
SNIPPET_PRETRAINED = snippet('hub-pretrained')
SNIPPET_HF_HUB = snippet('hub-hf-hub')
SNIPPET_TORCH_HUB = snippet('hub-torch-hub')


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


# ------------------------------------------------------------------------------------------------------- publishing

def test_publish_writes_safetensors_timm_config_and_model_card(published):
    folder = published['folder']
    assert sorted(p.name for p in folder.iterdir()) == [
        'README.md', 'config.json', 'model.safetensors', 'training_args.yaml']  # the checkpoint carries train args
    assert _same_weights(published['model'], safetensors.torch.load_file(folder / 'model.safetensors'))

    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'mlit_xxs'
    assert config['num_classes'] == 100
    assert config['label_names'] == list(_weights.LABEL_NAMES['cifar100'])
    assert config['model_args']['img_size'] in (36, [36, 36]) and config['model_args']['in_chans'] == 3
    assert config['pretrained_cfg']['tag'] == 'mae_ft_cifar100'
    assert config['pretrained_cfg']['mean'] == [0.5, 0.5, 0.5] and config['pretrained_cfg']['input_size'] == [3, 36, 36]
    assert not {'file', 'hf_hub_id', 'url', 'source'} & set(config['pretrained_cfg'])

    card = huggingface_hub.ModelCard.load(folder / 'README.md')
    assert card.data.library_name == 'timm' and card.data.license == 'apache-2.0'
    assert 'timm' in card.data.tags and card.data.datasets == ['cifar100']
    metrics = {r.metric_name: (r.metric_type, r.metric_value, r.dataset_type) for r in card.data.eval_results}
    assert metrics == {'top1': ('accuracy', 74.95, 'cifar100'), 'top5': ('top5', 93.1, 'cifar100')}
    assert "import timm_mlit" in card.text and f"'hf-hub:{HUB_ID}'" in card.text


def test_local_dir_round_trip_gives_bit_identical_outputs(published):
    model = timm.create_model(f'local-dir:{published["folder"]}', pretrained=True)
    assert torch.equal(_out(model, _x()), published['expected'])
    assert model.pretrained_cfg['label_names'][:2] == ['apple', 'aquarium_fish']


def _encoder_safetensors(tmp: Path, model) -> Path:
    path = tmp / 'encoder.safetensors'
    safetensors.torch.save_file({k: v for k, v in model.state_dict().items() if not k.startswith('head.')}, path)
    return path


@pytest.mark.parametrize('kind', ['encoder_safetensors', 'mae_state_dict', 'train_ema', 'train_no_ema', 'plain_pth'])
def test_publish_takes_every_checkpoint_kind(kind, tmp_path):
    model, ema = _model(10, seed=2), _model(10, seed=3)
    extra = []
    if kind == 'encoder_safetensors':  # our pre-training export: the encoder without head
        expected = _model(0, seed=2)
        checkpoint = _encoder_safetensors(tmp_path, expected)
    elif kind == 'mae_state_dict':  # a whole MAE: encoder.* is kept, decoder.* dropped
        checkpoint, expected = tmp_path / 'mae.pth', _model(0, seed=2)
        sd = {f'encoder.{k}': v for k, v in expected.state_dict().items()}
        sd['decoder.pred.weight'] = torch.zeros(27, 108)
        torch.save(sd, checkpoint)
    elif kind in ('train_ema', 'train_no_ema'):
        checkpoint = tmp_path / 'model_best.pth.tar'
        torch.save({'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()},
                    'state_dict_ema': ema.state_dict(), 'arch': 'mlit_xxs', 'epoch': 9,
                    'args': argparse.Namespace(model='mlit_xxs')}, checkpoint)
        expected = ema if kind == 'train_ema' else model
        extra = ['--ema'] if kind == 'train_ema' else []
    else:
        checkpoint, expected = tmp_path / 'weights.pth', model
        torch.save(model.state_dict(), checkpoint)

    out = tmp_path / 'out'
    assert _publish(tmp_path, checkpoint, out, *extra) == 0
    assert _same_weights(expected, safetensors.torch.load_file(out / 'model.safetensors'))
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert loaded.num_classes == expected.num_classes
    assert torch.equal(_out(loaded, _x()), _out(expected, _x()))


def test_publish_keeps_the_input_size_and_channels_of_the_checkpoint(tmp_path):
    model = _model(10, seed=4, img_size=48, in_chans=1)
    checkpoint = tmp_path / 'gray48.safetensors'
    safetensors.torch.save_file(model.state_dict(), checkpoint)
    assert _publish(tmp_path, checkpoint, tmp_path / 'out') == 0
    loaded = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True)
    assert tuple(loaded.pretrained_cfg['input_size']) == (1, 48, 48)
    assert torch.equal(_out(loaded, _x(1, 48)), _out(model, _x(1, 48)))


def _bad_checkpoint(kind: str, tmp: Path) -> Path:
    if kind == 'other_size':
        path = tmp / 'xs.pth'
        torch.save(timm.create_model('mlit_xs', num_classes=10).state_dict(), path)
    elif kind == 'other_arch':
        path = tmp / 'resnet.pth.tar'
        torch.save({'state_dict': _model(10).state_dict(), 'arch': 'resnet18', 'epoch': 1}, path)
    elif kind == 'not_mlit':
        path = tmp / 'resnet.safetensors'
        safetensors.torch.save_file({'conv1.weight': torch.zeros(8, 3, 3, 3), 'fc.weight': torch.zeros(10, 8)}, path)
    elif kind == 'corrupt_pth':
        path = tmp / 'corrupt.pth'
        path.write_bytes(os.urandom(4096))
    elif kind == 'truncated_safetensors':
        good = _encoder_safetensors(tmp, _model(10))
        path = tmp / 'truncated.safetensors'
        path.write_bytes(good.read_bytes()[:5000])
    elif kind == 'ema_missing':
        path = tmp / 'no_ema.pth.tar'
        torch.save({'state_dict': _model(10).state_dict(), 'arch': 'mlit_xxs'}, path)
    else:
        path = tmp / 'missing.pth'
    return path


@pytest.mark.parametrize('kind,message', [
    ('other_size', 'does not fit mlit_xxs'),
    ('other_arch', "trained as 'resnet18'"),
    ('not_mlit', 'not an mLiT checkpoint'),
    ('corrupt_pth', 'corrupt'),
    ('truncated_safetensors', 'corrupt'),
    ('ema_missing', 'no EMA weights'),
    ('missing_file', 'does not exist'),
])
def test_bad_checkpoint_is_a_clear_error_and_writes_nothing(kind, message, tmp_path, capsys):
    checkpoint = _bad_checkpoint(kind, tmp_path)
    out_parent = tmp_path / 'outputs'
    rc = _publish(tmp_path, checkpoint, out_parent / 'out', *(['--ema'] if kind == 'ema_missing' else []))
    assert rc == 1
    assert message in capsys.readouterr().err
    assert not out_parent.exists() or list(out_parent.iterdir()) == []  # no folder, no half-built temp folder


def test_existing_output_is_an_error_unless_overwrite(published, tmp_path, capsys):
    checkpoint = tmp_path / 'w.safetensors'
    model = _model(100, seed=5)
    safetensors.torch.save_file(model.state_dict(), checkpoint)
    out = tmp_path / 'out'
    shutil.copytree(published['folder'], out)  # a folder timm-mlit-publish wrote
    assert _publish(tmp_path, checkpoint, out) == 1
    assert 'exists' in capsys.readouterr().err
    assert _same_weights(published['model'], safetensors.torch.load_file(out / 'model.safetensors'))

    assert _publish(tmp_path, checkpoint, out, '--overwrite') == 0
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out', 'w.safetensors']  # no temp or old folder left
    assert _same_weights(model, safetensors.torch.load_file(out / 'model.safetensors'))


def test_overwrite_of_an_empty_folder_publishes_into_it(tmp_path):
    checkpoint = _encoder_safetensors(tmp_path, _model(10))
    (tmp_path / 'out').mkdir()
    assert _publish(tmp_path, checkpoint, tmp_path / 'out', '--overwrite') == 0
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['README.md', 'config.json', 'model.safetensors']


def _run_folder(tmp: Path) -> Path:
    """A training run's folder, as train.py leaves it: the checkpoint beside the logs."""
    run = tmp / 'runs' / 'RUN'
    run.mkdir(parents=True)
    torch.save({'state_dict': _model(10, seed=6).state_dict(), 'arch': 'mlit_xxs'}, run / 'last.pth.tar')
    (run / 'summary.csv').write_text('epoch,loss\n0,1.0\n')
    return run


@pytest.mark.parametrize('where', ['run_folder', 'checkpoint_itself', 'above_the_run_folder'])
def test_overwrite_refuses_an_output_that_is_or_holds_the_checkpoint(where, tmp_path, capsys):
    run = _run_folder(tmp_path)
    checkpoint = run / 'last.pth.tar'
    out = {'run_folder': run, 'checkpoint_itself': checkpoint, 'above_the_run_folder': run.parent}[where]
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert _publish(tmp_path, checkpoint, out, '--overwrite') == 1
    err = capsys.readouterr().err
    assert 'holds the checkpoint' in err and str(checkpoint) in err and 'Traceback' not in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert [p.name for p in run.parent.iterdir()] == ['RUN']  # no temporary folder beside it either


@pytest.mark.parametrize('kind', ['file', 'folder_with_other_files', 'link_to_a_published_folder'])
def test_overwrite_replaces_only_a_folder_that_timm_mlit_publish_wrote(kind, published, tmp_path, capsys):
    checkpoint = _encoder_safetensors(tmp_path, _model(10))
    out = tmp_path / 'out'
    if kind == 'file':
        out.write_text('notes')
    elif kind == 'folder_with_other_files':
        shutil.copytree(published['folder'], out)
        (out / 'notes.txt').write_text('mine')
    else:
        shutil.copytree(published['folder'], tmp_path / 'real')
        out.symlink_to(tmp_path / 'real')

    def snapshot():
        return {p.relative_to(tmp_path): p.read_bytes() for p in sorted(tmp_path.rglob('*')) if p.is_file()}

    before = snapshot()
    assert _publish(tmp_path, checkpoint, out, '--overwrite') == 1
    err = capsys.readouterr().err
    assert 'is not a folder timm-mlit-publish wrote' in err and str(out) in err
    assert snapshot() == before and out.is_symlink() == (kind == 'link_to_a_published_folder')
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]


def test_unknown_model_and_bad_flags_are_clear_errors(tmp_path, capsys):
    checkpoint = _encoder_safetensors(tmp_path, _model(10))
    assert _main([str(checkpoint), '--model', 'resnet18', '--output-dir', str(tmp_path / 'a')]) == 1
    assert 'not an mLiT model' in capsys.readouterr().err
    assert _publish(tmp_path, checkpoint, tmp_path / 'b', '--tag', 'Bad Tag') == 1
    assert '--tag' in capsys.readouterr().err
    assert _publish(tmp_path, checkpoint, tmp_path / 'c', '--metric', 'top1=80') == 1
    assert '--metric needs --dataset' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _publish(tmp_path, checkpoint, tmp_path / 'd', '--metric', 'top1')
    assert not any(p.name != 'encoder.safetensors' for p in tmp_path.iterdir())


# -------------------------------------------------------------------------------------------------------- pushing

def test_repo_id_pushes_the_published_folder(tmp_path, monkeypatch):
    calls = {}

    class Repo:
        repo_id = 'me/mlit_xxs.test'

    def create_repo(self, repo_id, private=False, exist_ok=False, **kw):
        calls['create_repo'] = dict(repo_id=repo_id, private=private, exist_ok=exist_ok)
        return Repo()

    def create_branch(self, repo_id, branch, exist_ok=False, **kw):
        calls['create_branch'] = dict(repo_id=repo_id, branch=branch)

    def upload_folder(self, repo_id, folder_path, revision=None, commit_message=None, **kw):
        calls['upload_folder'] = dict(repo_id=repo_id, folder_path=folder_path, revision=revision,
                                      commit_message=commit_message, files=sorted(os.listdir(folder_path)))

    for name, fn in (('create_repo', create_repo), ('create_branch', create_branch), ('upload_folder', upload_folder)):
        monkeypatch.setattr(huggingface_hub.HfApi, name, fn)
    checkpoint = _encoder_safetensors(tmp_path, _model(10))
    out = tmp_path / 'out'
    assert _publish(tmp_path, checkpoint, out, '--repo-id', 'me/mlit_xxs.test', '--private', '--revision', 'v1',
                    '--commit-message', 'XXS encoder') == 0
    assert calls['create_repo'] == dict(repo_id='me/mlit_xxs.test', private=True, exist_ok=True)
    assert calls['create_branch'] == dict(repo_id='me/mlit_xxs.test', branch='v1')
    assert calls['upload_folder'] == dict(repo_id='me/mlit_xxs.test', folder_path=str(out), revision='v1',
                                          commit_message='XXS encoder',
                                          files=['README.md', 'config.json', 'model.safetensors'])
    assert "hf-hub:me/mlit_xxs.test" in (out / 'README.md').read_text()  # the card's snippet names the repo


def test_push_to_unreachable_hub_is_a_clear_error_naming_the_repo(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, 'ENDPOINT', 'http://127.0.0.1:9')  # nothing listens there
    folder = tmp_path / 'folder'
    folder.mkdir()
    with pytest.raises(hub.PushError, match=r"could not push .* repository 'me/mlit_xxs.test'.*Connect"):
        hub.push_folder(folder, 'me/mlit_xxs.test', token='hf_not_a_token')


@pytest.mark.slow
def test_push_offline_from_the_command_line_is_a_clear_error(published, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'), HF_HUB_CACHE=str(tmp_path / 'hf' / 'hub'))
    checkpoint = _encoder_safetensors(tmp_path, _model(10))
    out = tmp_path / 'out'
    proc = subprocess.run(
        [sys.executable, '-m', 'timm_mlit.hub', str(checkpoint), '--model', 'mlit_xxs', '--output-dir', str(out),
         '--repo-id', 'me/mlit_xxs.test'], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "could not push" in proc.stderr and "'me/mlit_xxs.test'" in proc.stderr and 'offline' in proc.stderr
    assert 'Traceback' not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']


# -------------------------------------------------------------------------------------------------------- loading

def test_hf_hub_cache_round_trip_offline(published, offline_hf):
    put_in_hf_cache(published['folder'], offline_hf, HUB_ID)
    model = timm.create_model(f'hf-hub:{HUB_ID}', pretrained=True)
    assert torch.equal(_out(model, _x()), published['expected'])

    # a registered tag whose cfg names the same Hub repo (as mlit.py's cfgs will, once the weights exist)
    with registered_cfg('mlit_xxs.hubtest', _cfg(hf_hub_id=HUB_ID, num_classes=100)):
        model = timm.create_model('mlit_xxs.hubtest', pretrained=True)
    assert torch.equal(_out(model, _x()), published['expected'])

    # and the loads above really came from that cache: offline, a repo that is not there fails
    with pytest.raises(Exception, match='offline|cache|local'):
        timm.create_model('hf-hub:timm-mlit/mlit_xxs.not_cached', pretrained=True)


def test_embedded_default_weights_load_without_network_or_cache(embedded, published, offline_hf):
    assert embedded['file'] == str(_weights.WEIGHTS_DIR / 'mlit_xxs.embedtest' / 'model.safetensors')
    assert embedded['hf_hub_id'] == 'timm-mlit/mlit_xxs.embedtest'  # not in the (empty) cache: the file must win
    model = timm.create_model('mlit_xxs', pretrained=True)
    assert torch.equal(_out(model, _x()), published['expected'])
    assert model.pretrained_cfg['tag'] == 'embedtest'
    assert list(offline_hf.iterdir()) == []  # nothing was cached or downloaded


def test_an_entry_with_weights_becomes_the_default_tag_ahead_of_untrained(embedded):
    from timm.models import generate_default_cfgs
    cfgs = generate_default_cfgs({'mlit_xxs.untrained': _cfg(), 'mlit_xxs.embedtest': embedded})
    assert cfgs['mlit_xxs'].tags[0] == 'embedtest'


def test_weights_source_gives_no_file_for_weights_that_are_not_there(tmp_path, monkeypatch):
    monkeypatch.setattr(_weights, 'WEIGHTS_DIR', tmp_path)
    assert _weights.weights_source('mlit_xxs.nothing') == dict(hf_hub_id='timm-mlit/mlit_xxs.nothing')


def test_every_registered_tag_points_at_weights_that_exist():
    files = {}
    for arch in ('mlit_s', 'mlit_xs', 'mlit_xxs'):
        for name, cfg in timm.models.get_arch_pretrained_cfgs(arch).items():
            if name.endswith('.untrained'):
                assert not cfg.has_weights, name
                continue
            assert cfg.hf_hub_id == f'{_weights.HF_HUB_ORG}/{name}', name
            if cfg.file:
                assert Path(cfg.file) == _weights.embedded_weights(name) and Path(cfg.file).is_file(), name
                files[Path(cfg.file).parent.name] = name
    on_disk = {p.parent.name for p in _weights.WEIGHTS_DIR.glob('*/model.safetensors')}
    assert on_disk == set(files), f'embedded weights without a cfg entry: {on_disk - set(files)}'


def test_a_tag_that_does_not_exist_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r'Invalid pretrained tag \(no_such_tag\) for mlit_xxs'):
        timm.create_model('mlit_xxs.no_such_tag', pretrained=True)
    with pytest.raises(RuntimeError, match='No pretrained weights exist for mlit_xxs'):
        timm.create_model('mlit_xxs.untrained', pretrained=True)


def test_pretrained_weights_adapt_to_another_image_size(embedded, published):
    model = timm.create_model('mlit_xxs.embedtest', pretrained=True, img_size=48)
    source = published['model'].state_dict()
    expected = resample_abs_pos_embed(source['pos_embed'], new_size=(16, 16), num_prefix_tokens=1, verbose=False)
    assert model.pos_embed.shape == (1, 1 + 16 * 16, 108)
    assert torch.equal(model.pos_embed.data, expected)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.items() if k.startswith(('blocks.', 'norm.', 'head.')))
    assert _out(model, _x(3, 48)).shape == (2, 100)


def test_pretrained_weights_adapt_to_one_input_channel(embedded, published):
    model = timm.create_model('mlit_xxs.embedtest', pretrained=True, in_chans=1)
    source = published['model'].state_dict()['patch_embed.proj.weight']
    assert model.patch_embed.proj.weight.shape == (108, 1, 3, 3)
    # timm's adapt_input_conv: a grey image gives the same patch embedding as the RGB image with that value in R=G=B
    assert torch.allclose(model.patch_embed.proj.weight, source.sum(dim=1, keepdim=True))
    grey = _x(1)
    with torch.no_grad():
        assert torch.allclose(model.eval()(grey), published['model'](grey.expand(-1, 3, -1, -1)), atol=1e-5)


def test_torch_hub_local_loads_our_models_only_with_kwargs_passed_through(embedded, published, offline_hf):
    hubconf = torch.hub._import_module('hubconf', str(REPO_ROOT / 'hubconf.py'))
    assert sorted(f for f in dir(hubconf) if callable(getattr(hubconf, f)) and not f.startswith('_')) == [
        'mlit_s', 'mlit_xs', 'mlit_xxs', 'mobile_vmoe_vit_tiny_patch16_224', 'mobile_vmoe_vit_xxs_patch3_36']
    moe = torch.hub.load(str(REPO_ROOT), 'mobile_vmoe_vit_xxs_patch3_36', source='local', num_experts=4)
    assert moe.num_experts == 4
    model = torch.hub.load(str(REPO_ROOT), 'mlit_xxs', source='local', pretrained=True)
    assert torch.equal(_out(model, _x()), published['expected'])
    model = torch.hub.load(str(REPO_ROOT), 'mlit_xxs', source='local', pretrained=True, num_classes=7, img_size=48)
    assert model.num_classes == 7 and _out(model, _x(3, 48)).shape == (2, 7)
    assert torch.equal(model.blocks[0].norm1.weight, published['model'].blocks[0].norm1.weight)


# ------------------------------------------------------------------------------------------- README snippets, verbatim

def test_readme_snippet_pretrained(embedded, published, offline_hf):
    namespace = {}
    exec(SNIPPET_PRETRAINED, namespace)
    assert torch.equal(_out(namespace['model'], _x()), published['expected'])


def test_readme_snippet_torch_hub(embedded, published, offline_hf, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    namespace = {}
    exec(SNIPPET_TORCH_HUB, namespace)
    assert torch.equal(_out(namespace['model'], _x()), published['expected'])


def _readme_hf_hub_repo() -> str:
    """The Hub repository docs/publishing.md's hf-hub snippet loads."""
    model_id, = set(re.findall(r"'hf-hub:([^']+)'", SNIPPET_HF_HUB))
    return model_id


def test_readme_snippet_hf_hub_names_a_registered_tag():
    hub_ids = {cfg.hf_hub_id: name for arch in ('mlit_s', 'mlit_xs', 'mlit_xxs')
               for name, cfg in timm.models.get_arch_pretrained_cfgs(arch).items() if cfg.has_weights}
    repo = _readme_hf_hub_repo()
    assert repo in hub_ids, f'{repo} is no tag of timm_mlit/mlit.py'
    assert (_weights.WEIGHTS_DIR / hub_ids[repo]).is_dir()  # the folder that will be uploaded there ships


def test_readme_snippet_hf_hub(offline_hf, capsys):
    put_in_hf_cache(SHIPPED, offline_hf, _readme_hf_hub_repo())  # the shipped folder, as it would be uploaded
    namespace = {}
    exec(SNIPPET_HF_HUB, namespace)
    assert _same_weights(namespace['model'], safetensors.torch.load_file(SHIPPED / 'model.safetensors'))
    names = eval(capsys.readouterr().out.strip())
    assert names and all(name in _weights.LABEL_NAMES['fashion_mnist'] for name in names)


@pytest.mark.slow
def test_readme_snippet_hf_hub_in_a_fresh_offline_process(offline_hf, tmp_path):
    put_in_hf_cache(SHIPPED, offline_hf, _readme_hf_hub_repo())
    check = (
        '\nimport safetensors.torch\n'
        f'saved = safetensors.torch.load_file({str(SHIPPED / "model.safetensors")!r})\n'
        'assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())\n'
    )
    proc = subprocess.run([sys.executable, '-c', SNIPPET_HF_HUB + check], cwd=tmp_path, env=dict(os.environ),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert all(name in _weights.LABEL_NAMES['fashion_mnist'] for name in eval(proc.stdout.strip().splitlines()[-1]))


def test_hubconf_docstring_names_tags_that_exist(embedded, offline_hf):
    hubconf = torch.hub._import_module('hubconf', str(REPO_ROOT / 'hubconf.py'))
    tags = re.findall(r"pretrained_cfg='(\w+)'", hubconf.__doc__)
    assert tags
    for tag in tags:
        assert f'mlit_xxs.{tag}' in timm.list_pretrained('mlit_xxs.*'), tag
        model = torch.hub.load(str(REPO_ROOT), 'mlit_xxs', source='local', pretrained=True, pretrained_cfg=tag)
        assert model.pretrained_cfg['tag'] == tag


def _card_python_blocks(folder: Path):
    return re.findall(r'```python\n(.*?)```', (folder / 'README.md').read_text(), re.S)


def test_model_card_usage_snippets_run_as_written(published, offline_hf):
    """Every python block of the card, verbatim, against the folder placed in a Hugging Face cache."""
    put_in_hf_cache(published['folder'], offline_hf, HUB_ID)
    blocks = _card_python_blocks(published['folder'])
    assert len(blocks) == 3  # image classification, feature map extraction, image embeddings
    for code in blocks:
        namespace = {}
        exec(compile(code, 'model card', 'exec'), namespace)
        model = namespace['model']
        assert isinstance(namespace['output'], (torch.Tensor, list))
        assert model.pretrained_cfg.get('tag') == 'mae_ft_cifar100'
    # the classification block gives the published model's outputs on its image
    namespace = {}
    exec(blocks[0], namespace)
    x = namespace['transforms'](namespace['img']).unsqueeze(0)
    assert torch.equal(namespace['output'], _out(published['model'], x))


def test_encoder_card_usage_snippets_run_as_written(tmp_path, offline_hf):
    expected = _model(0, seed=2)
    out = hub.publish(_encoder_safetensors(tmp_path, expected), 'mlit_xxs', tmp_path / 'enc', tag='mae_in_cifar100',
                      repo_id='me/mlit_xxs.mae_in_cifar100')
    put_in_hf_cache(out, offline_hf, 'me/mlit_xxs.mae_in_cifar100')
    blocks = _card_python_blocks(out)
    assert blocks and 'Image Classification' not in (out / 'README.md').read_text()  # no head to classify with
    for code in blocks:
        namespace = {}
        exec(compile(code, 'model card', 'exec'), namespace)
        assert namespace['model'].pretrained_cfg.get('tag') == 'mae_in_cifar100'


@pytest.mark.slow
def test_embedded_weights_ship_in_the_wheel_and_load_offline_from_the_install(published, tmp_path):
    """A fresh install of a wheel holding weights in timm_mlit/weights/ loads them with no network and no cache."""
    src = tmp_path / 'src'
    shutil.copytree(REPO_ROOT / 'timm_mlit', src / 'timm_mlit', ignore=shutil.ignore_patterns('__pycache__'))
    for name in ('pyproject.toml', 'README.md', 'LICENSE'):  # what the build reads beside the package
        if (REPO_ROOT / name).is_file():
            shutil.copy(REPO_ROOT / name, src / name)
    if (REPO_ROOT / 'train_configs').is_dir():  # the recipes, packaged from the top of the checkout
        shutil.copytree(REPO_ROOT / 'train_configs', src / 'train_configs')
    shutil.copytree(published['folder'], src / 'timm_mlit/weights/mlit_xxs.embedtest')
    pip = [sys.executable, '-m', 'pip', '-q', '--disable-pip-version-check']
    subprocess.run(pip + ['wheel', '--no-deps', '--no-build-isolation', '--no-index', '-w', str(tmp_path / 'dist'),
                          str(src)], check=True, capture_output=True, timeout=300)
    target = tmp_path / 'site'
    subprocess.run(pip + ['install', '--no-deps', '--no-index', '--target', str(target),
                          *map(str, (tmp_path / 'dist').glob('*.whl'))], check=True, capture_output=True, timeout=300)
    script = f"""
import safetensors.torch, timm, torch
import timm_mlit
from timm_mlit import _weights
from timm_mlit.mlit import _cfg
assert _weights.WEIGHTS_DIR.is_relative_to({str(target)!r}), _weights.WEIGHTS_DIR
cfg = _cfg(**_weights.weights_source('mlit_xxs.embedtest'), num_classes=100)
assert cfg['file'].startswith({str(target)!r}), cfg
model = timm.create_model('mlit_xxs', pretrained=True, pretrained_cfg=cfg)
saved = safetensors.torch.load_file({str(published['folder'] / 'model.safetensors')!r})
assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
"""
    env = dict(os.environ, PYTHONPATH=str(target), HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'),
               HF_HUB_CACHE=str(tmp_path / 'hf' / 'hub'))
    proc = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / 'hf' / 'hub').exists() or not any((tmp_path / 'hf' / 'hub').iterdir())


def test_publish_builds_the_model_with_the_train_py_model_kwargs(tmp_path):
    """Pooling and gating change no weight shape: they come from the checkpoint's train.py args, into config.json."""
    model = _model(10, seed=5, global_pool='avg', noisy_gating=False)
    ckpt = tmp_path / 'ckpt.pth.tar'
    args = argparse.Namespace(model='mlit_xxs', gp='avg', model_kwargs=dict(noisy_gating=False))
    torch.save({'arch': 'mlit_xxs', 'state_dict': model.state_dict(), 'args': args}, ckpt)
    out = hub.publish(ckpt, 'mlit_xxs', tmp_path / 'out')
    config = json.loads((out / 'config.json').read_text())
    assert config['model_args']['global_pool'] == 'avg' and config['model_args']['noisy_gating'] is False
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert loaded.global_pool == 'avg'
    assert torch.equal(_out(loaded, _x()), _out(model, _x()))


# ------------------------------------------------------------------------------- model kwargs of a pre-training run

PRETRAIN_MODEL_KWARGS = ['depth=3', 'top_k=1', 'global_pool=avg', 'num_experts=(2,2,2)']


@pytest.fixture(scope='module')
def pretrain_run(tmp_path_factory):
    """A real tiny pre-training run (timm_mlit.pretrain) of an encoder built with routing, pooling and
    shape-changing kwargs: its last.pth.tar and encoder.safetensors."""
    from timm_mlit import pretrain
    root = tmp_path_factory.mktemp('pretrain')
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / 'imgs' / 'train' / f'c{c}').mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                root / 'imgs' / 'train' / f'c{c}' / f'{i}.png')
    argv = ['--data-dir', str(root / 'imgs'), '--output', str(root), '--experiment', 'run', '--model', 'mlit_xxs',
            '--model-kwargs', *PRETRAIN_MODEL_KWARGS, '--workers', '0', '--epochs', '1', '--warmup-epochs', '0',
            '-b', '8', '--log-interval', '1', '--no-amp', '--device', 'cpu']
    assert pretrain.main(argv) == 0
    return root / 'run'


@pytest.mark.slow
@pytest.mark.parametrize('source', ['last.pth.tar', 'last.pth.tar without args', 'encoder.safetensors'])
def test_publish_builds_a_pretrained_encoder_with_the_kwargs_it_was_trained_with(source, pretrain_run, tmp_path):
    checkpoint = pretrain_run / source.split()[0]
    if source.endswith('without args'):  # a checkpoint recording only arch and model_kwargs
        ckpt = torch.load(checkpoint, map_location='cpu', weights_only=True)
        del ckpt['args']
        checkpoint = tmp_path / 'last.pth.tar'
        torch.save(ckpt, checkpoint)
    out = hub.publish(checkpoint, 'mlit_xxs', tmp_path / 'out')
    model_args = json.loads((out / 'config.json').read_text())['model_args']
    assert model_args['top_k'] == 1 and model_args['global_pool'] == 'avg' and model_args['depth'] == 3
    assert list(model_args['num_experts']) == [2, 2, 2]

    training_args = out / 'training_args.yaml'
    assert training_args.is_file() == (source == 'last.pth.tar')  # the only one of the three recording its args
    if source == 'last.pth.tar':
        assert yaml.safe_load(training_args.read_text())['model_kwargs']['num_experts'] == [2, 2, 2]

    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert loaded.global_pool == 'avg' and len(loaded.blocks) == 3
    assert [(b.mlp.gate.top_k, b.mlp.gate.num_experts) for b in loaded.blocks] == [(1, 2)] * 3
    # the encoder as the run itself records it: built from the checkpoint's kwargs, given its encoder weights
    ckpt = torch.load(pretrain_run / 'last.pth.tar', map_location='cpu', weights_only=True)
    encoder = timm.create_model(ckpt['arch'], num_classes=0, **ckpt['model_kwargs']).eval()
    encoder.load_state_dict({k[len('encoder.'):]: v for k, v in ckpt['state_dict'].items() if k.startswith('encoder.')})
    assert torch.equal(_out(loaded, _x()), _out(encoder, _x()))


def test_encoder_metadata_naming_another_architecture_is_an_error(tmp_path, capsys):
    path = tmp_path / 'encoder.safetensors'
    safetensors.torch.save_file(_model(0).state_dict(), path, metadata={'arch': 'mlit_s', 'model_kwargs': '{}'})
    assert _publish(tmp_path, path, tmp_path / 'out') == 1
    assert "trained as 'mlit_s'" in capsys.readouterr().err


def test_encoder_metadata_with_broken_model_kwargs_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / 'encoder.safetensors'
    safetensors.torch.save_file(_model(0).state_dict(), path, metadata={'arch': 'mlit_xxs', 'model_kwargs': '{top'})
    assert _publish(tmp_path, path, tmp_path / 'out') == 1
    err = capsys.readouterr().err
    assert 'model_kwargs' in err and str(path) in err and 'Traceback' not in err



def test_publish_raises_an_ordinary_error_that_only_main_turns_into_an_exit(tmp_path):
    checkpoint = _encoder_safetensors(tmp_path, _model(10))
    with pytest.raises(ValueError, match=r"^--tag 'Bad Tag': use lower-case") as e:
        hub.publish(checkpoint, 'mlit_xxs', tmp_path / 'out', tag='Bad Tag')
    assert isinstance(e.value, hub.PublishError)
    with pytest.raises(SystemExit) as e:
        hub.main([str(checkpoint), '--model', 'mlit_xxs', '--output-dir', str(tmp_path / 'out'), '--tag', 'Bad Tag'])
    assert str(e.value.code).startswith("timm-mlit-publish: error: --tag 'Bad Tag'") and '\n' not in e.value.code
    assert issubclass(hub.PushError, RuntimeError) and not (tmp_path / 'out').exists()

# ------------------------------------------------------------------------------- interrupted publishes

def _hidden(folder: Path, name: str = 'out'):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f'.{name}.'))


def _interrupted_publish(checkpoint: Path, out: Path, at: str, *extra: str):
    """Run timm-mlit-publish in a child process that dies at `at` with os._exit (no clean-up runs, as with a
    SIGKILL): 'build' while it writes the folder, 'swap' between the two renames of --overwrite."""
    code = f'''
import os, sys
from timm_mlit import hub
if {at!r} == 'build':
    def write_model_card(*args, **kwargs):
        os._exit(9)
    hub.write_model_card = write_model_card
else:
    real_replace = os.replace
    def replace(src, dst):
        real_replace(src, dst)
        os._exit(9)
    os.replace = replace
hub.main(sys.argv[1:])
'''
    proc = subprocess.run([sys.executable, '-c', code, str(checkpoint), '--model', 'mlit_xxs', '--output-dir',
                           str(out), *extra], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr


@pytest.mark.slow
def test_the_folder_of_a_killed_publish_is_removed_by_the_next(tmp_path, caplog):
    caplog.set_level('INFO')
    checkpoint = _encoder_safetensors(tmp_path, _model(10))
    out = tmp_path / 'out'
    _interrupted_publish(checkpoint, out, 'build')
    leftovers = _hidden(tmp_path)
    assert len(leftovers) == 1 and (tmp_path / leftovers[0] / 'model.safetensors').is_file() and not out.exists()

    assert _publish(tmp_path, checkpoint, out) == 0
    assert _hidden(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ['encoder.safetensors', 'out']
    assert leftovers[0] in caplog.text


@pytest.mark.slow
def test_a_publish_killed_while_replacing_the_output_gets_the_old_folder_back(published, tmp_path, caplog):
    checkpoint = _encoder_safetensors(tmp_path, _model(10))
    out = tmp_path / 'out'
    shutil.copytree(published['folder'], out)
    _interrupted_publish(checkpoint, out, 'swap', '--overwrite')
    assert not out.exists() and len(_hidden(tmp_path)) == 2  # the old copy moved aside, the new one not yet in

    assert _publish(tmp_path, checkpoint, out) == 1  # no --overwrite: the restored folder is kept, not replaced
    assert _same_weights(published['model'], safetensors.torch.load_file(out / 'model.safetensors'))
    assert _hidden(tmp_path) == []
    assert f'restored {out}' in caplog.text


@pytest.mark.slow
def test_the_folder_of_a_running_publish_is_left_alone(tmp_path):
    checkpoint = _encoder_safetensors(tmp_path, _model(10))
    out = tmp_path / 'out'
    code = ('import sys, time\nfrom timm_mlit import hub\n'
            'def write_model_card(*args, **kwargs):\n    print("building", flush=True)\n    time.sleep(300)\n'
            'hub.write_model_card = write_model_card\nhub.main(sys.argv[1:])\n')
    proc = subprocess.Popen([sys.executable, '-c', code, str(checkpoint), '--model', 'mlit_xxs', '--output-dir',
                             str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == 'building'
        running = _hidden(tmp_path)
        assert len(running) == 1
        assert _publish(tmp_path, checkpoint, out) == 0
        assert _hidden(tmp_path) == running  # still there: its process is alive
    finally:
        proc.kill()
        proc.wait()
    assert _publish(tmp_path, checkpoint, out, '--overwrite') == 0
    assert _hidden(tmp_path) == []


def test_leftovers_of_an_older_publish_are_named_or_restored(published, tmp_path, caplog):
    """Folders an older timm-mlit-publish left (`.<name>.<random>.tmp/.old`, no process id to check): a hidden old
    copy of a missing output is put back, an unfinished folder is named with how to remove it."""
    checkpoint = _encoder_safetensors(tmp_path, _model(10))
    out = tmp_path / 'out'
    unfinished = Path(tempfile.mkdtemp(prefix='.out.', suffix='.tmp', dir=tmp_path))
    (unfinished / 'model.safetensors').write_bytes(b'weights')
    old = Path(tempfile.mkdtemp(prefix='.out.', suffix='.old', dir=tmp_path))
    shutil.copytree(published['folder'], old / 'out')

    assert _publish(tmp_path, checkpoint, out) == 1  # the old copy is back in place: it exists
    assert _same_weights(published['model'], safetensors.torch.load_file(out / 'model.safetensors'))
    assert not old.exists() and f'restored {out}' in caplog.text
    assert unfinished.is_dir() and str(unfinished) in caplog.text


# ------------------------------------------------------------------------------------------ command line

@pytest.mark.parametrize('name,content,problem', [
    ('labels.json', '["apple", "bear",', 'line 1 column'),
    ('labels.json', '{"0": "apple"}', 'a JSON list'),
    ('labels.json', '[["apple"], "bear"]', 'a JSON list'),
    ('labels.txt', b'\xff\xfe\x00apple', 'UTF-8'),
    ('missing.json', None, 'No such file'),
])
def test_a_bad_label_names_file_is_a_one_line_error(name, content, problem, tmp_path, capsys):
    checkpoint = tmp_path / 'w.safetensors'
    safetensors.torch.save_file(_model(2).state_dict(), checkpoint)
    labels = tmp_path / name
    if isinstance(content, str):
        labels.write_text(content)
    elif content is not None:
        labels.write_bytes(content)
    assert _publish(tmp_path, checkpoint, tmp_path / 'out', '--label-names', str(labels)) == 1
    err = capsys.readouterr().err
    assert err.startswith(f'timm-mlit-publish: error: --label-names {labels}') and err.count('\n') == 1
    assert problem in err
    assert not (tmp_path / 'out').exists()


def test_version_and_help_with_defaults_for_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        hub.main(['--version'])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f'timm-mlit-publish {timm_mlit.__version__}'
    parser = hub._parser()
    text = ' '.join(parser.format_help().split())
    for action in parser._actions:
        assert action.help, action.option_strings or action.dest
        if action.nargs != 0 and action.default not in (None, '', [], argparse.SUPPRESS):  # flags: on or off
            assert f'default: {action.default}' in text, action.option_strings


# ----------------------------------------------------------------------------------------------- the model card

def test_model_stats_count_macs_and_the_outputs_of_conv_linear_and_attention():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, kernel_size=2, stride=2)  # [1, 4, 4, 4]
            self.norm = torch.nn.LayerNorm(4)  # not a matmul: its output is not counted
            self.fc = torch.nn.Linear(4, 6)  # [1, 16, 6]

        def forward(self, x):
            x = self.norm(self.conv(x).flatten(2).transpose(1, 2))  # [1, 16, 4]
            q = k = v = self.fc(x).reshape(1, 16, 2, 3).transpose(1, 2)  # [1, 2, 16, 3]
            return torch.nn.functional.scaled_dot_product_attention(q, k, v).relu()

    stats = hub.model_stats(Tiny(), (3, 8, 8))
    tokens, heads, head_dim = 16, 2, 3
    conv_out, fc_out, scores = 4 * 4 * 4, tokens * 6, heads * tokens * tokens
    assert stats['params'] == sum(p.numel() for p in Tiny().parameters())
    assert stats['activations'] == conv_out + fc_out + scores + heads * tokens * head_dim
    assert stats['macs'] == conv_out * 3 * 2 * 2 + fc_out * 4 + 2 * scores * head_dim


def test_model_stats_do_not_depend_on_the_attention_kernel_or_the_moe_implementation():
    model = _model(10)
    stats = hub.model_stats(model, (3, 36, 36))
    for block in model.blocks:
        block.attn.fused_attn = not block.attn.fused_attn
    assert hub.model_stats(model, (3, 36, 36)) == stats
    for impl in ('dense', 'loop'):
        for block in model.blocks:
            block.mlp.impl = impl
        assert hub.model_stats(model, (3, 36, 36)) == stats
        assert all(block.mlp.impl == impl for block in model.blocks)  # the model is left as it was


def _card_stats(text: str):
    return {k: float(v) for k, v in re.findall(r'^ {2}- (Params \(M\)|GMACs|Activations \(M\)): ([0-9.]+)$', text,
                                                re.M)}


def test_model_card_has_timm_layout_and_measured_stats(published):
    card = huggingface_hub.ModelCard.load(published['folder'] / 'README.md')
    text = card.text
    for heading in ('# Model card for mlit_xxs.mae_ft_cifar100', '## Model Details', '## Model Usage',
                    '### Image Classification', '### Feature Map Extraction', '### Image Embeddings', '## Citation'):
        assert re.search(rf'^{re.escape(heading)}$', text, re.M), heading
    assert text.index('## Model Details') < text.index('## Model Usage') < text.index('## Citation')
    for item in ('- **Model Type:** Image classification / feature backbone', '- **Model Stats:**',
                 '  - Image size: 36 x 36', '- **Papers:**', '  - How Lightweight Can A Vision Transformer Be: ',
                 '  - Masked Autoencoders Are Scalable Vision Learners: ', '- **Dataset:** cifar100',
                 '- **Pretrain Dataset:** cifar100', '- **Original:** '):
        assert item in text, item
    stats = hub.model_stats(published['model'], (3, 36, 36))
    assert _card_stats(text) == {'Params (M)': round(stats['params'] / 1e6, 3),
                                 'GMACs': round(stats['macs'] / 1e9, 3),
                                 'Activations (M)': round(stats['activations'] / 1e6, 3)}


def test_fine_tuned_card_names_its_base_model_and_publishes_the_training_args(tmp_path):
    model = _model(10, seed=7)
    args = argparse.Namespace(model='mlit_xxs', lr=5e-3, epochs=30, input_size=(3, 36, 36), model_kwargs={},
                              pretrained_path='output/pretrain/run/encoder.safetensors', gp=None)
    checkpoint = tmp_path / 'model_best.pth.tar'
    torch.save({'state_dict': model.state_dict(), 'arch': 'mlit_xxs', 'args': args}, checkpoint)
    out = tmp_path / 'out'
    assert _publish(tmp_path, checkpoint, out, '--tag', 'mae_ft_fashion_mnist', '--dataset', 'fashion_mnist',
                    '--base-model', 'timm-mlit/mlit_xxs.mae_in_fashion_mnist') == 0
    card = huggingface_hub.ModelCard.load(out / 'README.md')
    assert card.data.base_model == 'timm-mlit/mlit_xxs.mae_in_fashion_mnist'
    assert 'timm-mlit/mlit_xxs.mae_in_fashion_mnist' in card.text and 'training_args.yaml' in card.text
    recorded = yaml.safe_load((out / 'training_args.yaml').read_text())
    assert recorded == {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()}
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True)  # the extra file does not disturb timm
    assert torch.equal(_out(loaded, _x()), _out(model, _x()))


def test_the_card_shows_the_commands_that_made_the_weights(tmp_path, capsys):
    checkpoint = _encoder_safetensors(tmp_path, _model(10))
    commands = tmp_path / 'commands.sh'
    lines = ["timm-mlit-pretrain -c train_configs/pretrain/mmlit_xxs_fashion_mnist.yaml --epochs 10",
             "timm-mlit-run train.py -c train_configs/finetune/mmlit_xxs_fashion_mnist.yaml --aa '' -b 128"]
    commands.write_text(f'# made on 2 CPU cores\n{lines[0]}\n\n{lines[1]}\n')
    assert _publish(tmp_path, checkpoint, tmp_path / 'out', '--commands', str(commands)) == 0
    text = (tmp_path / 'out' / 'README.md').read_text()
    assert '## Training\n' in text and '```bash\n# made on 2 CPU cores\n' + '\n'.join(lines) + '\n```' in text
    commands.write_text('# nothing but a comment\n')
    assert _publish(tmp_path, checkpoint, tmp_path / 'out2', '--commands', str(commands)) == 1
    assert 'holds no command' in capsys.readouterr().err and not (tmp_path / 'out2').exists()
    assert _publish(tmp_path, checkpoint, tmp_path / 'out2', '--commands', str(tmp_path / 'none.sh')) == 1
    assert '--commands' in capsys.readouterr().err and not (tmp_path / 'out2').exists()


def test_a_base_model_that_is_no_hub_repository_is_an_error(tmp_path, capsys):
    checkpoint = _encoder_safetensors(tmp_path, _model(10))
    assert _publish(tmp_path, checkpoint, tmp_path / 'out', '--base-model', 'not a repo') == 1
    assert '--base-model' in capsys.readouterr().err and not (tmp_path / 'out').exists()


def test_no_training_args_leaves_them_out(tmp_path):
    checkpoint = tmp_path / 'last.pth.tar'
    torch.save({'state_dict': _model(10).state_dict(), 'arch': 'mlit_xxs',
                'args': argparse.Namespace(model='mlit_xxs', data_dir='/home/me/data')}, checkpoint)
    assert _publish(tmp_path, checkpoint, tmp_path / 'out', '--no-training-args') == 0
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert 'training_args' not in (tmp_path / 'out' / 'README.md').read_text()
