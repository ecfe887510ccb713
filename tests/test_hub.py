"""Publishing (timm_mlit/hub.py): the folder timm-mlit-publish writes from every kind of checkpoint, --overwrite,
pushing, interrupted publishes and the command line, with no network."""
import argparse
import json
import os
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
from hub_helpers import HUB_ID, _encoder_safetensors, _main, _model, _out, _publish, _same_weights, _x
from hub_helpers import _card_python_blocks as _card_python_blocks  # (re-exported for tests/test_publish.py)
from hub_helpers import offline_hf as offline_hf  # (re-exported for tests/test_publish.py)
from hub_helpers import put_in_hf_cache as put_in_hf_cache  # (re-exported for tests/test_publish.py)
from PIL import Image

import timm_mlit  # noqa: F401
from timm_mlit import _weights, hub

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
