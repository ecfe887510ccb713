""" The route to the edge: a model as an ONNX graph for ONNX Runtime, in float32 or with int8 weights

    timm-mlit-export mlit_xxs mlit_xxs.onnx --pretrained                 # float32 graph, batch size free
    timm-mlit-export mlit_xxs mlit_xxs_int8.onnx --pretrained --int8     # int8 weights (dynamic quantization)
    timm-mlit-export mlit_xxs out.onnx --checkpoint output/train/RUN/model_best.pth.tar
    timm-mlit-export mobile_vmoe_vit_xxs_patch3_36 out.onnx --num-classes 10 --model-kwargs num_experts=4

A checkpoint's model is built as it was trained, as timm-mlit-publish builds it (checkpoint.build_model): the head,
channels and image size its weights tell, then the kwargs it records (train.py's --model-kwargs and --gp, a
pre-training export's model_kwargs), then --num-classes and --model-kwargs over them. A masked autoencoder's
checkpoint (pre-training's last.pth.tar) is refused, saying how to export its encoder.

The graph is `torch.onnx.export(dynamo=True)` of the model in eval mode, its batch dimension dynamic; the MoE layers
take their fixed-shape ('dense') form there, every expert run and mixed by the gate, as under torch.compile.
`--int8` quantizes it with ONNX Runtime's dynamic quantization (`onnxruntime.quantization.quantize_dynamic`): the
weights of every MatMul stored as int8, the activations quantized per batch at run time, no calibration data.
Chosen over PyTorch's own dynamic quantization (`torch.ao.quantization.quantize_dynamic`), which reaches only
`nn.Linear` modules (not the stacked expert weights nor the MoE's fused projection, which call F.linear) and keeps
PyTorch's per-op overhead: benchmarks/edge.py measures both routes' accuracy on the Fashion-MNIST test set, batch-1
latency and throughput.

Each file is written whole or not at all (`files.atomic_write`). The float32 graph is checked before it is written:
ONNX Runtime runs it on a random batch of two and its output must match the PyTorch model's to 1e-4. The int8 graph
is checked to load; what int8 costs in accuracy is measured by benchmarks/edge.py.
"""
import argparse
import os
import shutil
import tempfile
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.utils import ParseKwargs

from . import __version__
from .checkpoint import CHECKPOINT_FORMAT, CheckpointError, build_model, read_checkpoint
from .cli import HelpFormatter, exit_on_error
from .files import atomic_write, check_writable_path

__all__ = ['export_onnx', 'quantize_int8', 'onnx_session', 'model_from_checkpoint', 'main']

PROG = 'timm-mlit-export'


def _input_size(model: nn.Module) -> Tuple[int, int, int]:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    size = cfg.get('input_size')
    if size is None:
        raise ValueError('the model has no pretrained_cfg["input_size"]: pass input_size=(C, H, W)')
    return tuple(size)


def _onnx_modules():
    try:
        import onnxruntime
        from onnxruntime import quantization
    except ImportError as e:
        raise ImportError(f'the edge route needs ONNX Runtime and the ONNX exporter: pip install "timm-mlit[edge]" '
                          f'({e})') from e
    return onnxruntime, quantization


def onnx_session(path: str, threads: Optional[int] = None, spin: bool = True):
    """An ONNX Runtime CPU session for `path`, with `threads` intra-op threads (default: torch's thread count).
    `spin=False` stops its threads from busy-waiting for the next call (ONNX Runtime's default, which lowers its
    latency and takes the cores from anything else running meanwhile)."""
    ort, _ = _onnx_modules()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    if not spin:
        options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def _check(model: nn.Module, path: str, input_size, atol: float):
    """Run `path` in ONNX Runtime on a random batch of 2: its output must match `model`'s to `atol`."""
    x = torch.randn(2, *input_size)
    session = onnx_session(path)
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        err = (torch.from_numpy(out) - model(x)).abs().max().item()
    if not err <= atol:
        raise RuntimeError(f'the exported graph differs from the model by {err:.3g} (more than {atol})')


def _write(src: str, dst: str):
    """Copy `src` to `dst` whole or not at all, making dst's folder if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    with open(src, 'rb') as f:
        atomic_write(dst, lambda g: shutil.copyfileobj(f, g))


def export_onnx(model: nn.Module, path: str, input_size: Optional[Sequence[int]] = None) -> str:
    """Write `model` (put in eval mode) to `path` as an ONNX graph with a dynamic batch size; checked against the
    model in ONNX Runtime. Returns `path`."""
    _onnx_modules()
    check_writable_path(path, 'ONNX file')
    model = model.eval()
    input_size = tuple(input_size) if input_size is not None else _input_size(model)
    with tempfile.TemporaryDirectory() as tmp:
        graph = os.path.join(tmp, 'model.onnx')
        x = torch.randn(2, *input_size)  # (2: a batch of 1 would be specialised away)
        torch.onnx.export(model, (x,), graph, dynamo=True, external_data=False,
                          dynamic_shapes=({0: torch.export.Dim('batch')},))
        _check(model, graph, input_size, atol=1e-4)
        _write(graph, path)
    return path


def quantize_int8(src: str, dst: str) -> str:
    """Write the ONNX graph `src` to `dst` with int8 weights (ONNX Runtime's dynamic quantization). Returns `dst`."""
    _, quantization = _onnx_modules()
    if not os.path.isfile(src):
        raise FileNotFoundError(f'{src}: no such ONNX file')
    check_writable_path(dst, 'ONNX file')
    with tempfile.TemporaryDirectory() as tmp:
        # pre-processing (shape inference, ONNX Runtime's graph optimisation) folds the concatenated weights of the
        # MoE's fused projection into constants, which only then are quantized: 37 of the 55 matmuls of mlit_xxs
        # instead of 28 (the rest multiply activations by activations: attention, the experts' mix)
        from onnxruntime.quantization.shape_inference import quant_pre_process
        pre, out = os.path.join(tmp, 'pre.onnx'), os.path.join(tmp, 'int8.onnx')
        quant_pre_process(src, pre)
        quantization.quantize_dynamic(pre, out, weight_type=quantization.QuantType.QInt8)
        onnx_session(out)  # it loads
        _write(out, dst)
    return dst


def _mae_note(path: str, meta: dict, model_name: str) -> str:
    """What a masked autoencoder's checkpoint is and how to export its encoder, in a sentence."""
    arch = meta.get('arch') or model_name
    if meta.get('format') == CHECKPOINT_FORMAT:
        encoder = os.path.join(os.path.dirname(path), 'encoder.safetensors')
        return (f'{path} is a timm-mlit-pretrain checkpoint ({arch}, epoch {meta.get("epoch", "?")}): a whole masked '
                f'autoencoder, decoder included, whose encoder has no classifier head. To export the encoder, give '
                f'the encoder.safetensors that pre-training writes at its end: `{PROG} {arch} OUT.onnx --checkpoint '
                f'{encoder}` (`timm-mlit-pretrain --export-only {path} --export-path FILE` writes this epoch\'s)')
    return (f'{path} holds a whole masked autoencoder (encoder and decoder, as pre-training trains it), not a model to '
            f'export. To export its encoder, publish it first: `timm-mlit-publish {path} --model {arch} --output-dir '
            f'DIR`, then `{PROG} local-dir:DIR OUT.onnx --pretrained`')


def model_from_checkpoint(model_name: str, path: str, model_kwargs: Optional[dict] = None) -> nn.Module:
    """`model_name` built as the checkpoint at `path` was trained and loaded (checkpoint.build_model), `model_kwargs`
    over the kwargs it records; eval mode."""
    state_dict, meta = read_checkpoint(path)
    if meta.get('masked_autoencoder'):
        raise CheckpointError(_mae_note(path, meta, model_name))
    return build_model(model_name, state_dict, meta, path, model_kwargs)[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, formatter_class=HelpFormatter, description=__doc__)
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    parser.add_argument('model', help='a timm model name (mlit_xxs, mlit_xxs.mae_ft_fashion_mnist, ...)')
    parser.add_argument('output', help='the ONNX file to write')
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument('--pretrained', action='store_true', help="the model's pretrained weights")
    weights.add_argument('--checkpoint', default='',
                         help='weights from a checkpoint, the model built as it records (train.py, encoder export)')
    parser.add_argument('--num-classes', type=int, default=None,
                        help="the head's classes (default: the checkpoint's, else the model's)")
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                        help="model arguments, as train.py's --model-kwargs (over those the checkpoint records)")
    parser.add_argument('--int8', action='store_true', help='int8 weights (ONNX Runtime dynamic quantization)')
    return parser


@exit_on_error(PROG, (ValueError, OSError, ImportError, RuntimeError))
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import timm

    import timm_mlit  # noqa: F401  (registers the models)
    check_writable_path(args.output, 'ONNX file')
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f'--checkpoint {args.checkpoint}: ' + (
            'a folder; give a checkpoint file in it' if os.path.isdir(args.checkpoint) else 'no such file'))
    kwargs = dict(args.model_kwargs, **({} if args.num_classes is None else dict(num_classes=args.num_classes)))
    try:
        if args.checkpoint:
            model = model_from_checkpoint(args.model, args.checkpoint, kwargs)
        else:
            model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    except (RuntimeError, TypeError) as e:  # timm: unknown model, no weights for the tag; a kwarg it does not take
        raise ValueError(f'cannot create {args.model}: {e}') from e
    if not args.int8:
        export_onnx(model, args.output)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            quantize_int8(export_onnx(model, os.path.join(tmp, 'float32.onnx')), args.output)
    print(f'{PROG}: wrote {args.output} ({"int8" if args.int8 else "float32"} weights, '
          f'{os.path.getsize(args.output):,} bytes)')
    return 0
