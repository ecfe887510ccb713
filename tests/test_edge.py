"""The edge route: ONNX graphs that ONNX Runtime runs like the model, int8 weights, whole files or none."""
import numpy as np
import pytest
import timm
import torch

import timm_mlit  # noqa: F401
from timm_mlit import edge

pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model('mlit_xxs', num_classes=10).eval()
    folder = tmp_path_factory.mktemp('edge')
    fp32 = edge.export_onnx(model, str(folder / 'sub' / 'mlit_xxs.onnx'))  # (the folder is made)
    int8 = edge.quantize_int8(fp32, str(folder / 'mlit_xxs_int8.onnx'))
    return model, fp32, int8


def _run(path, x):
    session = edge.onnx_session(path)
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def test_float32_graph_matches_the_model_at_any_batch_size(exported):
    model, fp32, _ = exported
    for batch in (1, 5):
        x = torch.randn(batch, 3, 36, 36)
        with torch.no_grad():
            assert torch.allclose(_run(fp32, x), model(x), atol=1e-4)


def test_int8_graph_is_smaller_and_follows_the_float32_one(exported):
    model, fp32, int8 = exported
    import os
    assert os.path.getsize(int8) < 0.35 * os.path.getsize(fp32)
    x = torch.randn(16, 3, 36, 36)
    a, b = _run(fp32, x).flatten().numpy(), _run(int8, x).flatten().numpy()
    assert np.corrcoef(a, b)[0, 1] > 0.95
    import onnx
    ops = [n.op_type for n in onnx.load(int8).graph.node]
    assert ops.count('MatMulInteger') > ops.count('MatMul')  # the weights' matmuls, the MoE's fused ones too


def test_bad_paths_are_refused_before_anything_is_written(exported, tmp_path):
    model, fp32, _ = exported
    with pytest.raises(ValueError, match='is a folder'):
        edge.export_onnx(model, str(tmp_path))
    with pytest.raises(FileNotFoundError, match='no such ONNX file'):
        edge.quantize_int8(str(tmp_path / 'missing.onnx'), str(tmp_path / 'out.onnx'))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_writes_an_int8_file_and_names_bad_input(tmp_path, capsys):
    out = tmp_path / 'm.onnx'
    assert edge.main(['mlit_xxs', str(out), '--num-classes', '10', '--int8']) == 0
    assert out.is_file() and 'int8 weights' in capsys.readouterr().out
    with pytest.raises(SystemExit, match='timm-mlit-export: error: cannot create no_such_model'):
        edge.main(['no_such_model', str(tmp_path / 'x.onnx')])
    with pytest.raises(SystemExit, match='--checkpoint .*: no such file'):
        edge.main(['mlit_xxs', str(tmp_path / 'x.onnx'), '--checkpoint', str(tmp_path / 'none.pth')])
    assert sorted(p.name for p in tmp_path.iterdir()) == ['m.onnx']


@pytest.mark.slow
def test_edge_benchmark_scores_every_route_on_fashion_mnist_idx_files(tmp_path):
    import json
    import sys
    from pathlib import Path

    from test_data import make_fashion_mnist
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
    import edge as edge_benchmark
    make_fashion_mnist(str(tmp_path / 'fmnist'), n_train=8, n_test=24)
    edge_benchmark.main(['--data-dir', str(tmp_path / 'fmnist'), '--repeats', '2', '--out', str(tmp_path)])
    rows = json.loads((tmp_path / 'edge_cpu.json').read_text())['rows']
    routes = ['eager float32', 'eager bfloat16', 'torch dynamic int8', 'onnxruntime float32', 'onnxruntime int8']
    assert [(r['model'], r['route']) for r in rows] == [(m, r) for m in ('mlit_xxs', 'vit_twin@mlit_xxs')
                                                        for r in routes]
    scored = {r['route']: r for r in rows if r['model'] == 'mlit_xxs'}
    assert scored['onnxruntime float32']['test_top1'] == scored['eager float32']['test_top1']  # same graph
    assert all(0 <= r['test_top1'] <= 100 and r['latency_b1_ms'] > 0 for r in scored.values())


@pytest.mark.slow
def test_readme_export_command_writes_the_shipped_classifier_as_int8(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from readme import snippet
    argv = snippet('export-int8').strip().split()
    exe = Path(sys.executable).parent / argv[0]
    proc = subprocess.run([str(exe) if exe.exists() else argv[0]] + argv[1:], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch.manual_seed(0)
    x = torch.randn(16, 3, 36, 36).clamp(-1, 1)  # (the classifier's inputs are normalised to [-1, 1])
    model = timm.create_model('mlit_xxs', pretrained=True).eval()
    with torch.no_grad():
        agree = (_run(str(tmp_path / 'mlit_xxs_int8.onnx'), x).argmax(1) == model(x).argmax(1)).float().mean()
    assert agree >= 0.75


# ------------------------------------------------------------------------------ the command line, from checkpoints

def _export_cli(*argv: str):
    """timm-mlit-export as a console script, in a process of its own."""
    import subprocess
    import sys
    from pathlib import Path
    exe = Path(sys.executable).parent / 'timm-mlit-export'
    return subprocess.run([str(exe) if exe.exists() else 'timm-mlit-export', *argv], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize('model_name,model_kwargs,gp,recorded', [
    ('mlit_xxs', {'top_k': 1}, 'avg', True),  # routing and pooling, that the weights cannot tell
    ('mobile_vmoe_vit_xxs_patch3_36', {'num_experts': 4}, None, True),  # docs/mobile_vmoe.md's Mobile V-MoE recipe
    ('mobile_vmoe_vit_xxs_patch3_36', {'num_experts': 4, 'top_k': 2}, None, False),  # a bare state dict
])
def test_checkpoint_exports_the_model_it_was_trained_as(model_name, model_kwargs, gp, recorded, tmp_path):
    from test_publish import _train_py_checkpoint, _trained
    checkpoint, out = tmp_path / 'last.pth.tar', tmp_path / 'model.onnx'
    model = _trained(model_name, seed=3, num_classes=10, **model_kwargs, **({'global_pool': gp} if gp else {}))
    if recorded:
        _train_py_checkpoint(checkpoint, model, model_name, model_kwargs, gp)
    else:
        torch.save(model.state_dict(), checkpoint)
    extra = [] if recorded else ['--model-kwargs'] + [f'{k}={v}' for k, v in model_kwargs.items()]
    proc = _export_cli(model_name, str(out), '--checkpoint', str(checkpoint), *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    x = torch.randn(16, 3, 36, 36, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    got = _run(str(out), x)
    assert (got - expected).abs().max() < 1e-4
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_model_from_a_checkpoint_is_the_trained_model_and_a_mae_is_refused(tmp_path):
    from test_publish import _train_py_checkpoint, _trained

    from timm_mlit.checkpoint import CheckpointError
    model = _trained('mlit_xxs', seed=3, num_classes=10, depth=3, top_k=1, global_pool='avg')
    checkpoint = _train_py_checkpoint(tmp_path / 'ck.pth.tar', model, 'mlit_xxs', {'depth': 3, 'top_k': 1}, 'avg')
    x = torch.randn(8, 3, 36, 36, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(edge.model_from_checkpoint('mlit_xxs', str(checkpoint))(x), model(x))
    with pytest.raises(CheckpointError, match='masked autoencoder'):
        edge.model_from_checkpoint('mlit_xxs', str(_pretraining_checkpoint(tmp_path, 'pretrain')))


def _pretraining_checkpoint(tmp_path, kind: str):
    from timm_mlit.checkpoint import CHECKPOINT_FORMAT
    from timm_mlit.mae import MaskedAutoencoderMLiT
    mae = MaskedAutoencoderMLiT('mlit_xxs', depth=3)
    if kind == 'pretrain':  # timm-mlit-pretrain's last.pth.tar
        path = tmp_path / 'run' / 'last.pth.tar'
        path.parent.mkdir()
        torch.save({'format': CHECKPOINT_FORMAT, 'epoch': 4, 'arch': 'mlit_xxs', 'model_kwargs': {'depth': 3},
                    'state_dict': mae.state_dict(), 'optimizer': {}, 'args': {'model': 'mlit_xxs'}}, path)
    else:  # a whole masked autoencoder's state dict
        path = tmp_path / 'mae.pth'
        torch.save(mae.state_dict(), path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['pretrain', 'mae_state_dict'])
def test_pretraining_checkpoint_is_one_line_saying_how_to_export_its_encoder(kind, tmp_path):
    checkpoint = _pretraining_checkpoint(tmp_path, kind)
    proc = _export_cli('mlit_xxs', str(tmp_path / 'out.onnx'), '--checkpoint', str(checkpoint), '--num-classes',
                       '10')
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('timm-mlit-export: error: '), proc.stderr[-3000:]
    assert str(checkpoint) in lines[0] and 'masked autoencoder' in lines[0]
    # the route to its encoder: the pre-training's encoder export, or publishing the encoder first
    assert ('encoder.safetensors' if kind == 'pretrain' else 'timm-mlit-publish') in lines[0]
    assert not (tmp_path / 'out.onnx').exists()
