"""Tests of timm_mlit.checkpoint: reading every kind of checkpoint, and the pre-training checkpoints' I/O."""
import argparse
import datetime
import json
import os
import random

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

import timm_mlit  # noqa: F401
from timm_mlit.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    export_encoder,
    load_pretrain_checkpoint,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    state_dict_of,
)
from timm_mlit.mae import MaskedAutoencoderMLiT


@pytest.fixture(scope='module')
def encoder():
    return timm.create_model('mlit_xxs', depth=3, num_classes=0, moe_loss_weight=0.)


def _weights(seed: int):
    g = torch.Generator().manual_seed(seed)
    return {'w': torch.randn(3, 2, generator=g), 'b': torch.randn(3, generator=g)}


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- read_checkpoint

@pytest.fixture
def train_py_checkpoint(tmp_path):
    """What timm's train.py saves: argparse.Namespace args, optimizer state, EMA weights."""
    path = tmp_path / 'model_best.pth.tar'
    torch.save({'epoch': 7, 'arch': 'mlit_xxs', 'state_dict': _weights(0), 'state_dict_ema': _weights(1),
                'optimizer': {'state': {}, 'param_groups': []}, 'version': 2, 'metric': 81.5,
                'args': argparse.Namespace(model='mlit_xxs', lr=1e-3, model_kwargs={'depth': 1})}, path)
    return path


def test_train_py_checkpoint_gives_its_weights_and_what_it_records(train_py_checkpoint):
    state_dict, meta = read_checkpoint(train_py_checkpoint)
    _assert_equal(state_dict, _weights(0))
    assert set(meta) == {'epoch', 'arch', 'version', 'metric', 'args'}  # no weights, no optimizer state
    assert meta['epoch'] == 7 and meta['args'].model_kwargs == {'depth': 1}


def test_use_ema_takes_the_ema_weights(train_py_checkpoint):
    state_dict, meta = read_checkpoint(train_py_checkpoint, use_ema=True)
    _assert_equal(state_dict, _weights(1))
    assert meta['arch'] == 'mlit_xxs'


def test_use_ema_without_ema_weights_is_an_error(tmp_path):
    path = tmp_path / 'no_ema.pth.tar'
    torch.save({'epoch': 0, 'state_dict': _weights(0)}, path)
    with pytest.raises(CheckpointError, match=f'checkpoint {path} has no EMA weights'):
        read_checkpoint(path, use_ema=True)
    bare = tmp_path / 'bare.pth'
    torch.save(_weights(0), bare)
    with pytest.raises(CheckpointError, match='is a bare state dict, it has no EMA weights'):
        read_checkpoint(bare, use_ema=True)


def test_bare_state_dict_has_no_meta(tmp_path):
    path = tmp_path / 'bare.pth'
    torch.save(_weights(2), path)
    state_dict, meta = read_checkpoint(path)
    _assert_equal(state_dict, _weights(2))
    assert meta == {}


def test_whole_mae_is_reduced_to_its_encoder(tmp_path, encoder):
    mae = MaskedAutoencoderMLiT(encoder)
    path = tmp_path / 'mae.pth'
    torch.save({'state_dict': mae.state_dict(), 'format': CHECKPOINT_FORMAT, 'epoch': 3}, path)
    state_dict, meta = read_checkpoint(path)
    _assert_equal(state_dict, encoder.state_dict())
    assert meta['format'] == CHECKPOINT_FORMAT and meta['epoch'] == 3


def test_ddp_and_compile_prefixes_are_removed(tmp_path):
    path = tmp_path / 'ddp.pth'
    w = _weights(3)
    torch.save({'model': {'module.' + k: v for k, v in w.items()} | {'_orig_mod.module.extra': torch.ones(1)}}, path)
    state_dict, _ = read_checkpoint(path)
    _assert_equal(state_dict, w | {'extra': torch.ones(1)})


def test_safetensors_metadata_gives_arch_and_model_kwargs(tmp_path, encoder):
    path = export_encoder({'encoder.' + k: v for k, v in encoder.state_dict().items()},
                          str(tmp_path / 'encoder.safetensors'), arch='mlit_xxs', model_kwargs={'depth': 1})
    state_dict, meta = read_checkpoint(path)
    _assert_equal(state_dict, encoder.state_dict())
    assert meta['arch'] == 'mlit_xxs' and meta['model_kwargs'] == {'depth': 1}
    # no arch, no kwargs: neither key is reported
    path = export_encoder({'encoder.w': torch.ones(2)}, str(tmp_path / 'anon.safetensors'))
    assert 'arch' not in read_checkpoint(path)[1]
    safetensors.torch.save_file(_weights(0), str(tmp_path / 'plain.safetensors'))
    assert read_checkpoint(tmp_path / 'plain.safetensors')[1] == {}


def test_safetensors_with_bad_model_kwargs_is_an_error(tmp_path):
    path = tmp_path / 'bad.safetensors'
    safetensors.torch.save_file(_weights(0), str(path), metadata={'model_kwargs': '{depth: 1'})
    with pytest.raises(CheckpointError, match='its metadata model_kwargs is not JSON'):
        read_checkpoint(path)


def test_corrupt_missing_and_odd_files_are_named(tmp_path, train_py_checkpoint):
    broken = tmp_path / 'broken.pth.tar'
    broken.write_bytes(train_py_checkpoint.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=f'cannot read checkpoint {broken}: it is corrupt or not a checkpoint'):
        read_checkpoint(broken)
    with pytest.raises(FileNotFoundError, match=f'checkpoint {tmp_path / "nope.pth"} does not exist'):
        read_checkpoint(tmp_path / 'nope.pth')
    torch.save([torch.ones(1)], tmp_path / 'list.pth')
    with pytest.raises(CheckpointError, match='holds a list, not a state dict'):
        read_checkpoint(tmp_path / 'list.pth')
    torch.save({'state_dict': {'w': 'not a tensor'}}, tmp_path / 'str.pth')
    with pytest.raises(CheckpointError, match='does not hold a state dict of tensors'):
        read_checkpoint(tmp_path / 'str.pth')


def test_other_pickled_classes_are_refused(tmp_path):
    path = tmp_path / 'pickle.pth'
    torch.save({'state_dict': _weights(0), 'when': datetime.date(2024, 1, 1)}, path)  # not allow-listed
    with pytest.raises(CheckpointError, match='corrupt or not a checkpoint'):
        read_checkpoint(path)


def test_state_dict_of_a_loaded_checkpoint(encoder):
    mae_sd = MaskedAutoencoderMLiT(encoder).state_dict()
    _assert_equal(state_dict_of({'state_dict': mae_sd, 'epoch': 1}), encoder.state_dict())
    _assert_equal(state_dict_of({'model': _weights(0)}), _weights(0))
    _assert_equal(state_dict_of(_weights(0)), _weights(0))
    with pytest.raises(CheckpointError, match='the checkpoint has no EMA weights'):
        state_dict_of({'state_dict': _weights(0)}, use_ema=True)


# ---------------------------------------------------------------- pre-training checkpoints

def _state(epoch):
    return dict(format=CHECKPOINT_FORMAT, epoch=epoch, arch='mlit_xxs', model_kwargs={}, state_dict=_weights(epoch),
                rng=[rng_state()])


def test_save_checkpoint_keeps_the_newest_and_links_last(tmp_path):
    for epoch in range(4):
        save_checkpoint(_state(epoch), str(tmp_path), epoch, keep=2)
    assert sorted(os.listdir(tmp_path)) == ['checkpoint-2.pth.tar', 'checkpoint-3.pth.tar', 'last.pth.tar']
    assert os.path.samefile(tmp_path / 'last.pth.tar', tmp_path / 'checkpoint-3.pth.tar')  # a link, not a copy
    ckpt = load_pretrain_checkpoint(str(tmp_path / 'last.pth.tar'))
    assert ckpt['epoch'] == 3
    _assert_equal(ckpt['state_dict'], _weights(3))


def test_last_is_a_copy_where_links_fail(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError('links not supported')
    monkeypatch.setattr(os, 'link', no_link)
    save_checkpoint(_state(0), str(tmp_path), 0, keep=0)  # keep=0: every epoch checkpoint kept
    save_checkpoint(_state(1), str(tmp_path), 1, keep=0)
    assert sorted(os.listdir(tmp_path)) == ['checkpoint-0.pth.tar', 'checkpoint-1.pth.tar', 'last.pth.tar']
    assert (tmp_path / 'last.pth.tar').read_bytes() == (tmp_path / 'checkpoint-1.pth.tar').read_bytes()
    assert not os.path.samefile(tmp_path / 'last.pth.tar', tmp_path / 'checkpoint-1.pth.tar')


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    torch.save({'rng': rng_state()}, tmp_path / 'rng.pth')
    expected = (torch.rand(3), random.random(), np.random.rand(3))
    torch.manual_seed(2), random.seed(2), np.random.seed(2)
    set_rng_state(torch.load(tmp_path / 'rng.pth', weights_only=True)['rng'])  # weights-only loadable
    got = (torch.rand(3), random.random(), np.random.rand(3))
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and np.array_equal(got[2], expected[2])


def test_load_pretrain_checkpoint_says_what_else_a_file_is(tmp_path, train_py_checkpoint, encoder):
    with pytest.raises(CheckpointError) as e:
        load_pretrain_checkpoint(str(train_py_checkpoint))
    assert 'timm train.py checkpoint (mlit_xxs, epoch 7)' in str(e.value) and 'timm-mlit-run train.py' in str(e.value)
    enc = export_encoder({'encoder.w': torch.ones(2)}, str(tmp_path / 'e.safetensors'))
    with pytest.raises(CheckpointError, match='is a safetensors file'):
        load_pretrain_checkpoint(enc)
    torch.save({'state_dict': {}}, tmp_path / 'other.pth')
    with pytest.raises(CheckpointError, match='other.pth is not a timm-mlit pre-training checkpoint$'):
        load_pretrain_checkpoint(str(tmp_path / 'other.pth'))
    broken = tmp_path / 'broken.pth.tar'
    broken.write_bytes(train_py_checkpoint.read_bytes()[:200])
    with pytest.raises(CheckpointError, match='is unreadable') as e:
        load_pretrain_checkpoint(str(broken))
    assert '\n' not in str(e.value) and '\x1b[' not in str(e.value)
    with pytest.raises(CheckpointError, match='is a folder'):
        load_pretrain_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_pretrain_checkpoint(str(tmp_path / 'nope.pth.tar'))


def test_export_encoder_writes_head_less_weights_with_metadata(tmp_path, encoder):
    mae_sd = MaskedAutoencoderMLiT(encoder).state_dict()
    path = export_encoder(mae_sd, str(tmp_path / 'sub' / 'enc.safetensors'), arch='mlit_xxs',
                          model_kwargs={'depth': 1})
    _assert_equal(safetensors.torch.load_file(path), encoder.state_dict())
    with safetensors.safe_open(path, framework='pt') as f:
        assert json.loads(f.metadata()['model_kwargs']) == {'depth': 1}
    assert os.listdir(tmp_path / 'sub') == ['enc.safetensors']  # no temporary file left
    with pytest.raises(CheckpointError, match='holds no encoder weights'):
        export_encoder(_weights(0), str(tmp_path / 'x.safetensors'))
