"""timm-mlit-publish beyond mLiT's round trip (tests/test_hub.py): every model family the package registers, and a
disk that fills while the folder is written."""
import argparse
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import safetensors
import safetensors.torch
import timm
import torch
from test_hub import _card_python_blocks, _main, offline_hf, put_in_hf_cache  # noqa: F401  (offline_hf: a fixture)

import timm_mlit  # noqa: F401
from timm_mlit import hub

VMOE = 'mobile_vmoe_vit_xxs_patch3_36'


def _trained(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """`name` built with `kwargs`, every weight moved off its initial value (as training would)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _train_py_checkpoint(path: Path, model: torch.nn.Module, name: str, model_kwargs: dict, gp=None) -> Path:
    """`model`'s checkpoint as timm's train.py saves it, recording --model-kwargs and --gp in its args."""
    torch.save({'state_dict': model.state_dict(), 'arch': name, 'epoch': 9,
                'args': argparse.Namespace(model=name, model_kwargs=model_kwargs, gp=gp, lr=1e-3)}, path)
    return path


def _logits(model: torch.nn.Module) -> torch.Tensor:
    x = torch.rand(4, 3, 36, 36, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(x)


def _publish(checkpoint: Path, model: str, out: Path, *extra: str) -> int:
    return _main([str(checkpoint), '--model', model, '--output-dir', str(out), *extra])


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------------------------- Mobile V-MoE

@pytest.fixture(scope='module')
def published_vmoe(tmp_path_factory):
    """A trained-looking Mobile V-MoE (4 experts, k = 2: not the arch's defaults), its train.py checkpoint and
    its published folder."""
    tmp = tmp_path_factory.mktemp('vmoe')
    model_kwargs = {'num_experts': 4, 'top_k': 2}
    model = _trained(VMOE, num_classes=10, **model_kwargs)
    checkpoint = _train_py_checkpoint(tmp / 'last.pth.tar', model, VMOE, model_kwargs)
    out = tmp / f'{VMOE}.fashion_mnist'
    assert _publish(checkpoint, VMOE, out, '--tag', 'fashion_mnist', '--dataset', 'fashion_mnist') == 0
    return dict(model=model, folder=out, expected=_logits(model), model_kwargs=model_kwargs)


def test_mobile_vmoe_publishes_with_the_kwargs_it_was_trained_with(published_vmoe):
    folder = published_vmoe['folder']
    assert sorted(p.name for p in folder.iterdir()) == [
        'README.md', 'config.json', 'model.safetensors', 'training_args.yaml']
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == VMOE and config['num_classes'] == 10
    assert {k: config['model_args'][k] for k in published_vmoe['model_kwargs']} == published_vmoe['model_kwargs']
    assert len(config['label_names']) == 10 and config['pretrained_cfg']['input_size'] == [3, 36, 36]


def test_mobile_vmoe_card_describes_a_mobile_vmoe_not_mlit(published_vmoe):
    card = huggingface_hub.ModelCard.load(published_vmoe['folder'] / 'README.md')
    assert '2309.04354' in card.text and 'Mobile V-MoE' in card.text  # its paper, cited
    assert '2407.17783' not in card.text and 'An mLiT' not in card.text and 'mLiT models' not in card.text
    assert 'mobile-vmoe' in card.data.tags and 'mlit' not in card.data.tags
    stats = timm_mlit.model_card.model_stats(published_vmoe['model'], (3, 36, 36))
    assert f'GMACs: {stats["macs"] / 1e9:.3f}' in card.text and stats['macs'] > 0


def test_mobile_vmoe_loads_back_by_local_dir_with_the_same_logits(published_vmoe):
    model = timm.create_model(f'local-dir:{published_vmoe["folder"]}', pretrained=True)
    assert (_logits(model) - published_vmoe['expected']).abs().max().item() == 0


def test_mobile_vmoe_loads_back_from_the_hf_hub_cache_offline(published_vmoe, offline_hf):  # noqa: F811
    repo_id = f'timm-mlit/{VMOE}.fashion_mnist'
    put_in_hf_cache(published_vmoe['folder'], offline_hf, repo_id)
    model = timm.create_model(f'hf-hub:{repo_id}', pretrained=True)
    assert (_logits(model) - published_vmoe['expected']).abs().max().item() == 0


def test_mobile_vmoe_card_usage_snippets_run_as_written(published_vmoe, offline_hf):  # noqa: F811
    repo_id = f'timm-mlit/{VMOE}.fashion_mnist'
    put_in_hf_cache(published_vmoe['folder'], offline_hf, repo_id)
    blocks = _card_python_blocks(published_vmoe['folder'])
    assert len(blocks) == 3  # image classification, feature map extraction, image embeddings
    namespace = {}
    exec(compile('\n'.join(blocks), 'model card', 'exec'), namespace)  # each block as written, one after another
    assert namespace['model'].pretrained_cfg.get('tag') == 'fashion_mnist' and namespace['output'].shape == (1, 108)


def test_a_rectangular_mobile_vmoe_publishes_at_its_recorded_size(tmp_path):
    model_kwargs = {'img_size': (36, 48), 'num_experts': 4}
    model = _trained(VMOE, num_classes=10, **model_kwargs)
    checkpoint = _train_py_checkpoint(tmp_path / 'ck.pth.tar', model, VMOE, model_kwargs)
    assert _publish(checkpoint, VMOE, tmp_path / 'out') == 0
    loaded = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True).eval()
    x = torch.rand(2, 3, 36, 48)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_recorded_img_size_the_weights_do_not_have_is_refused_before_anything_is_built(tmp_path, capsys):
    model = _trained('mlit_xxs', num_classes=10, depth=3)
    # a crafted record: a model of this size would need terabytes
    checkpoint = _train_py_checkpoint(tmp_path / 'ck.pth.tar', model, 'mlit_xxs', {'depth': 3, 'img_size': 300000})
    assert _publish(checkpoint, 'mlit_xxs', tmp_path / 'out') == 1
    assert 'recorded img_size 300000' in capsys.readouterr().err and not (tmp_path / 'out').exists()


def test_publish_names_the_model_file_to_add_the_cfg_entry_to(tmp_path, capsys):
    model = _trained(VMOE, num_classes=10, num_experts=4)
    checkpoint = _train_py_checkpoint(tmp_path / 'ck.pth.tar', model, VMOE, {'num_experts': 4})
    assert _publish(checkpoint, VMOE, tmp_path / 'out', '--tag', 'fashion_mnist') == 0
    out = capsys.readouterr().out
    assert f"for timm_mlit/mobile_vmoe.py: '{VMOE}.fashion_mnist'" in out


def test_a_model_outside_the_package_is_refused(tmp_path, capsys):
    model = timm.create_model('vit_tiny_patch16_224', img_size=36, patch_size=3, num_classes=10)
    checkpoint = tmp_path / 'vit.pth'
    torch.save(model.state_dict(), checkpoint)
    assert _publish(checkpoint, 'vit_tiny_patch16_224', tmp_path / 'out') == 1
    err = capsys.readouterr().err
    assert 'not an mLiT model' in err and VMOE in err  # names what it does publish
    assert not (tmp_path / 'out').exists()


# ------------------------------------------------------------------------------------------------- a full disk

_FULL = {
    'oserror': lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    # what safetensors raises for its I/O errors: its own type, the OS error in its text
    'safetensors': lambda: safetensors.SafetensorError(
        'Error while serializing: I/O error: No space left on device (os error 28)'),
}


@pytest.mark.parametrize('raised', sorted(_FULL))
def test_full_disk_while_writing_the_weights_is_one_line_and_leaves_the_published_folder(raised, tmp_path,
                                                                                            monkeypatch, capsys):
    model = _trained('mlit_xxs', num_classes=10, depth=3)
    checkpoint = _train_py_checkpoint(tmp_path / 'ck.pth.tar', model, 'mlit_xxs', {'depth': 3})
    outputs = tmp_path / 'outputs'
    published = outputs / 'published'
    assert _publish(checkpoint, 'mlit_xxs', published) == 0
    before = _snapshot(published)
    capsys.readouterr()

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b'\0' * 100)  # the write got this far
        raise _FULL[raised]()

    monkeypatch.setattr(safetensors.torch, 'save_file', full_disk)
    for out, extra in ((published, ['--overwrite']), (outputs / 'new', [])):
        with pytest.raises(SystemExit) as e:
            hub.main([str(checkpoint), '--model', 'mlit_xxs', '--output-dir', str(out), *extra])
        msg = str(e.value.code)
        assert msg.startswith('timm-mlit-publish: error: ') and '\n' not in msg
        assert str(out) in msg and 'No space left on device' in msg
    assert _snapshot(published) == before  # the published folder as it was
    assert sorted(p.name for p in outputs.iterdir()) == ['published']  # no new folder, no half-written one


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='RLIMIT_FSIZE as a stand-in for a full disk')
def test_disk_write_failure_of_the_console_script_is_one_line(tmp_path):
    """The real write failing: a file-size limit makes the weights' write fail as a full disk does."""
    import resource
    model = _trained('mlit_xxs', num_classes=10, depth=3)
    checkpoint = _train_py_checkpoint(tmp_path / 'ck.pth.tar', model, 'mlit_xxs', {'depth': 3})
    limit = os.path.getsize(checkpoint) // 4  # room for the card and config.json, not for the weights

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / 'outputs' / 'out'
    proc = subprocess.run([sys.executable, '-m', 'timm_mlit.hub', str(checkpoint), '--model', 'mlit_xxs',
                           '--output-dir', str(out)], capture_output=True, text=True, timeout=300,
                          preexec_fn=small_files)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('timm-mlit-publish: error: ') and str(out) in lines[0], lines
    assert list((tmp_path / 'outputs').iterdir()) == []
