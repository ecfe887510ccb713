"""The inference path compiles as one graph and exports to ONNX, with outputs matching eager."""
import shutil

import pytest
import timm
import torch

import timm_mlit  # noqa: F401


@pytest.fixture(scope='module')
def model_and_input():
    torch.manual_seed(0)
    return timm.create_model('mlit_xxs', num_classes=10).eval(), torch.randn(3, 3, 36, 36)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which('g++') is None and shutil.which('c++') is None,
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_torch_compile_fullgraph_matches_eager(model_and_input):
    model, x = model_and_input
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)


@pytest.mark.slow
def test_onnx_export_matches_eager(model_and_input, tmp_path):
    ort = pytest.importorskip('onnxruntime')
    pytest.importorskip('onnxscript')
    model, x = model_and_input
    path = tmp_path / 'mlit_xxs.onnx'
    torch.onnx.export(model, (x,), str(path), dynamo=True)
    session = ort.InferenceSession(str(path))
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    assert abs(out - expected).max() < 1e-4
