"""Every way of loading mLiT weights (timm_mlit/_weights.py and the cfgs of mlit.py), with no network: the files
inside the package, a Hugging Face cache, tags, another image size or channel count, the docs' snippets, and a
wheel's install."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from hub_helpers import HUB_ID, REPO_ROOT, _out, _same_weights, _x, put_in_hf_cache, registered_cfg
from readme import snippet
from timm.layers import resample_abs_pos_embed

import timm_mlit  # noqa: F401
from timm_mlit import _weights
from timm_mlit.mlit import _cfg

SHIPPED = _weights.WEIGHTS_DIR / 'mlit_xxs.mae_ft_fashion_mnist'

# Snippets, read from README.md and docs/ and executed verbatim below (test_readme_snippet_*).
SNIPPET_PRETRAINED = snippet('hub-pretrained')
SNIPPET_HF_HUB = snippet('hub-hf-hub')


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


# ------------------------------------------------------------------------------------------- README snippets, verbatim

def test_readme_snippet_pretrained(embedded, published, offline_hf):
    namespace = {}
    exec(SNIPPET_PRETRAINED, namespace)
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
