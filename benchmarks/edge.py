"""Inference routes for the edge, on the Fashion-MNIST test set: accuracy, batch-1 latency and throughput.

The shipped mlit_xxs Fashion-MNIST classifier (`pretrained=True`) and its dense ViT twin's architecture (random
weights: its speed only), each run as:
  * eager float32 (PyTorch), and eager bfloat16 autocast
  * PyTorch dynamic quantization (`torch.ao.quantization.quantize_dynamic`, int8 weights in the `nn.Linear` modules
    it can reach: attention, head; not the MoE experts' fused matmuls)
  * ONNX Runtime float32, and ONNX Runtime int8 (`timm_mlit.edge`: dynamic quantization of every MatMul)
Top-1 on the 10k test images (read as `python -m timm_mlit` reads them: timm's eval pipeline), batch-1 latency
(median of interleaved calls; ONNX Runtime's threads do not busy-wait between calls, so that they leave the cores
to the routes measured in between) and batch-256 images/s.

    python benchmarks/edge.py --out benchmarks/results
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import at_least, checked, machine, results_folder, write_results  # noqa: E402
from models import build  # noqa: E402

import timm_mlit  # noqa: E402,F401
from timm_mlit.__main__ import open_test_set  # noqa: E402
from timm_mlit.cli import exit_on_error  # noqa: E402
from timm_mlit.edge import export_onnx, onnx_session, quantize_int8  # noqa: E402


def test_images(model, dataset, limit):
    """The test set (`open_test_set`'s) through timm's eval transform for `model`, as one tensor, with its labels."""
    from timm.data import create_loader, resolve_data_config
    if limit:
        dataset.data, dataset.targets = dataset.data[:limit], dataset.targets[:limit]
    loader = create_loader(dataset, batch_size=500, is_training=False, num_workers=0, use_prefetcher=False,
                           device=torch.device('cpu'), **resolve_data_config({}, model=model))
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def routes(model, tmp):
    """name -> callable(x: tensor) -> logits tensor."""
    def eager(m, dtype=None):
        def fn(x):
            with torch.no_grad(), torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                return m(x).float()
        return fn

    def ort(path):
        session = onnx_session(path, spin=False)  # (spinning threads would take the cores from the other routes)
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    fp32 = export_onnx(model, os.path.join(tmp, f'{id(model)}.onnx'), input_size=(3, 36, 36))
    int8 = quantize_int8(fp32, os.path.join(tmp, f'{id(model)}_int8.onnx'))
    # every nn.Linear called as a module; the MoE experts read their nn.Linear weights into fused matmuls
    # (F.linear), which a quantized module (whose .weight is a method) cannot serve: they stay float32
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and '.experts.' not in n}
    dyn = torch.ao.quantization.quantize_dynamic(model, linear, dtype=torch.qint8)
    return {'eager float32': eager(model), 'eager bfloat16': eager(model, torch.bfloat16),
            'torch dynamic int8': eager(dyn), 'onnxruntime float32': ort(fp32), 'onnxruntime int8': ort(int8)}


def median_seconds(fns, x, repeats):
    for fn in fns.values():
        fn(x)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn(x)
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


@exit_on_error('edge.py')
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data-dir', default=None, help='Fashion-MNIST idx files (default: as python -m timm_mlit)')
    parser.add_argument('--limit', type=at_least(0), default=0, help='the first N test images only (0: all)')
    parser.add_argument('--repeats', type=at_least(1), default=50,
                        help='batch-1 calls per route (batch 256: a fifth)')
    parser.add_argument('--out', type=checked(results_folder), default='benchmarks/results')
    args = parser.parse_args(argv)
    dataset, _ = open_test_set(args.data_dir)  # (before any model is built: a folder without the files ends here)
    mlit = timm.create_model('mlit_xxs', pretrained=True).eval()
    vit = build('vit_twin@mlit_xxs', num_classes=10).eval()
    x, y = test_images(mlit, dataset, args.limit)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, model in (('mlit_xxs', mlit), ('vit_twin@mlit_xxs', vit)):
            fns = routes(model, tmp)
            lat = median_seconds(fns, x[:1], args.repeats)
            thr = median_seconds(fns, x[:256], max(3, args.repeats // 5))
            ref = None
            for name, fn in fns.items():
                row = dict(model=label, route=name, latency_b1_ms=lat[name] * 1e3, img_s=min(256, len(x)) / thr[name])
                if label == 'mlit_xxs':  # (the twin has random weights: speed only)
                    pred = torch.cat([fn(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
                    row['test_top1'] = 100. * (pred == y).float().mean().item()
                    ref = ref if ref is not None else row['test_top1']
                    row['top1_vs_eager_float32'] = row['test_top1'] - ref
                rows.append(row)
                print(row, flush=True)
    meta = dict(machine=machine(), torch=torch.__version__, images=len(x), weights=mlit.pretrained_cfg.get('tag'),
                command='python benchmarks/edge.py ' + ' '.join(argv if argv is not None else sys.argv[1:]))
    write_results(args.out, 'edge_cpu', meta, rows,
                  ['model', 'route', 'test_top1', 'top1_vs_eager_float32', 'latency_b1_ms', 'img_s'])


if __name__ == '__main__':
    main()
