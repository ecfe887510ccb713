"""What timm-mlit 0.1.0 wrote still loads and computes the same: tiny mLiT state dicts with the outputs that code gave
(tests/data/mlit_outputs_0.1.0.safetensors: every moe_impl, eval and a seeded training forward with its gradients),
and a pre-training checkpoint it wrote (tests/data/pretrain_checkpoint_0.1.0.pth.tar). The shipped weights, also
written by 0.1.0, are re-evaluated by test_shipped_weights.py."""
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import timm_mlit  # noqa: F401
from timm_mlit.layers import MoE
from timm_mlit.layers.dropout import torch_dropout
from timm_mlit.pretrain import main as pretrain_main

DATA = Path(__file__).resolve().parent / 'data'
OUTPUTS = safetensors.torch.load_file(str(DATA / 'mlit_outputs_0.1.0.safetensors'))
PRETRAIN_CHECKPOINT = DATA / 'pretrain_checkpoint_0.1.0.pth.tar'


def _model(shared):
    key = ''.join(shared)
    model = timm.create_model('mlit_xxs', depth=3, embed_dim=48, hidden_dims=(24, 12), num_classes=10,
                              expert_shared=shared)
    prefix = f'{key}/state/'
    model.load_state_dict({k[len(prefix):]: v for k, v in OUTPUTS.items() if k.startswith(prefix)}, strict=True)
    return model, key


def _set_impl(model, impl):
    for m in model.modules():
        if isinstance(m, MoE):
            m.impl = impl


@pytest.mark.parametrize('shared', [('v', 'w2'), ('v', 'w'), ('w', 'w2')])
@pytest.mark.parametrize('impl', ['loop', 'dense', 'sparse'])
def test_a_state_dict_of_0_1_0_gives_the_outputs_it_gave(shared, impl):
    model, key = _model(shared)
    _set_impl(model, impl)
    x = OUTPUTS['input']
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), OUTPUTS[f'{key}/eval/{impl}'], atol=1e-5)
    model.train()
    torch_dropout(model)  # 0.1.0 drew its dropout masks with PyTorch's dropout (ours draws another stream)
    torch.manual_seed(1)  # the gate noise and dropout draws of the recorded forward
    y = model(x)
    (y.square().sum() + model.moe_loss()).backward()
    assert torch.allclose(y, OUTPUTS[f'{key}/train/{impl}'], atol=1e-5)
    assert torch.allclose(model.moe_loss(), OUTPUTS[f'{key}/train_moe_loss/{impl}'][0], atol=1e-6)
    assert torch.allclose(model.blocks[0].mlp.gate.weight.grad, OUTPUTS[f'{key}/train_grad_gate0/{impl}'],
                          atol=1e-5)


def test_a_pretraining_checkpoint_of_0_1_0_exports_and_resumes(tmp_path, monkeypatch):
    if not Path('/usr/share/datasets/fashion-mnist').is_dir():
        pytest.skip('needs Fashion-MNIST (apt-get install dataset-fashion-mnist) to resume')
    export = tmp_path / 'encoder.safetensors'
    assert pretrain_main(['--export-only', str(PRETRAIN_CHECKPOINT), '--export-path', str(export)]) == 0
    ckpt = torch.load(PRETRAIN_CHECKPOINT, map_location='cpu', weights_only=True)
    exported = safetensors.torch.load_file(str(export))
    assert exported.keys() == {k[len('encoder.'):] for k in ckpt['state_dict'] if k.startswith('encoder.')}
    assert torch.equal(exported['pos_embed'], ckpt['state_dict']['encoder.pos_embed'])
    model = timm.create_model('mlit_xxs', pretrained=True, num_classes=0, **ckpt['model_kwargs'],
                              pretrained_cfg_overlay=dict(file=str(export), num_classes=0))
    assert torch.equal(model.pos_embed, exported['pos_embed'])

    args = dict(ckpt['args'])  # the run's own arguments, one epoch longer
    argv = ['--resume', str(PRETRAIN_CHECKPOINT), '--epochs', str(ckpt['epoch'] + 2), '--output', str(tmp_path),
            '--experiment', 'resumed', '--model-kwargs'] + [f'{k}={v!r}' for k, v in ckpt['model_kwargs'].items()]
    argv += ['--mae-kwargs'] + [f'{k}={v!r}' for k, v in args['mae_kwargs'].items()]
    for name in ('dataset', 'data_dir', 'train_num_samples', 'batch_size', 'warmup_epochs', 'workers'):
        argv += ['--' + name.replace('_', '-'), str(args[name])]
    assert pretrain_main(argv) == 0
    resumed = torch.load(tmp_path / 'resumed' / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert resumed['epoch'] == ckpt['epoch'] + 1
    assert not torch.equal(resumed['state_dict']['encoder.pos_embed'], ckpt['state_dict']['encoder.pos_embed'])
