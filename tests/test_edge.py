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


def test_cli_writes_an_int8_file_and_names_bad_input(tmp_path, capsys):
    out = tmp_path / 'm.onnx'
    assert edge.main(['mlit_xxs', str(out), '--num-classes', '10', '--int8']) == 0
    assert out.is_file() and 'int8 weights' in capsys.readouterr().out
    with pytest.raises(SystemExit, match='timm-mlit-export: error: cannot create no_such_model'):
        edge.main(['no_such_model', str(tmp_path / 'x.onnx')])
    with pytest.raises(SystemExit, match='--checkpoint .*: no such file'):
        edge.main(['mlit_xxs', str(tmp_path / 'x.onnx'), '--checkpoint', str(tmp_path / 'none.pth')])
    assert sorted(p.name for p in tmp_path.iterdir()) == ['m.onnx']


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
