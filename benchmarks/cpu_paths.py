"""The pieces of the CPU bfloat16 path, each against what it replaced, in one interleaved run.

  * attention of one mlit_xxs layer (128 images, 3 K/V groups of 2 query heads, 145 tokens, heads of 18),
    forward + backward: PyTorch's scaled_dot_product_attention in float32 and bfloat16, and
    `ops.chunked_attention` in bfloat16 with blocks of 256 KiB, 1 MiB (the default), 4 MiB of scores and the whole
    batch at once
  * the MoE output dropout of one layer (18,560 x 108 float32), forward + backward: nn.Dropout and `ops.MaskDropout`
  * an mlit_xxs training step (batch 128, AdamW) under bfloat16 autocast with `moe_impl='dense'` and `'sparse'`
  * an mlit_s training step (batch 128, AdamW) in bfloat16 autocast and in float32, with the sparse MoE's blocks of
    rows unpadded and padded (`ops.sorted_mix.ROW_GRANULE`), so that their matmul shapes recur

    python benchmarks/cpu_paths.py --out benchmarks/results
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import at_least, checked, machine, results_folder, time_interleaved, write_results  # noqa: E402
from models import build, train_step_fn  # noqa: E402

import timm_mlit.layers.ops.cpu_attention as cpu_attention  # noqa: E402
import timm_mlit.layers.ops.sorted_mix as sorted_mix  # noqa: E402
from timm_mlit.cli import exit_on_error  # noqa: E402
from timm_mlit.layers.ops import MaskDropout  # noqa: E402


def attention_fns(batch: int):
    G, r, N, hd = 3, 2, 145, 18

    def tensors(dtype):
        q, k, v = (torch.randn(batch, G, n, hd, dtype=dtype, requires_grad=True) for n in (r * N, N, N))
        return q, k, v, torch.randn(batch, G, r * N, hd, dtype=dtype)

    def sdpa(dtype):
        q, k, v, g = tensors(dtype)
        return lambda: F.scaled_dot_product_attention(q, k, v).backward(g)

    def chunked(chunk_bytes):
        q, k, v, g = tensors(torch.bfloat16)
        q, k, v = (t.detach().reshape(batch * G, -1, hd).requires_grad_() for t in (q, k, v))
        g = g.reshape(batch * G, -1, hd)

        def fn():
            cpu_attention.CHUNK_BYTES = chunk_bytes
            cpu_attention.chunked_attention(q, k, v, hd ** -0.5).backward(g)
        return fn
    fns = {'attention: SDPA float32': sdpa(torch.float32), 'attention: SDPA bfloat16': sdpa(torch.bfloat16)}
    for label, size in (('256 KiB', 2 ** 18), ('1 MiB', 2 ** 20), ('4 MiB', 2 ** 22), ('whole batch', 2 ** 40)):
        fns[f'attention: chunked bfloat16, blocks of {label}'] = chunked(size)
    return fns


def dropout_fns(batch: int):
    x = torch.randn(batch * 145, 108, requires_grad=True)
    g = torch.randn(batch * 145, 108)
    return {'dropout 0.1: nn.Dropout': lambda: F.dropout(x, 0.1, True).backward(g),
            'dropout 0.1: MaskDropout': lambda: MaskDropout.apply(x, 0.1).backward(g)}


def moe_fns(batch: int):
    x, target = torch.randn(batch, 3, 36, 36), torch.randint(0, 100, (batch,))
    fns = {}
    for impl in ('dense', 'sparse'):
        model = build(f'mlit_xxs@{impl}').train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        fns[f"mlit_xxs training step, bfloat16: moe_impl='{impl}'"] = train_step_fn(
            model, x, target, opt, torch.bfloat16, torch.device('cpu'))
    return fns


def padding_fns(batch: int):
    x, target = torch.randn(batch, 3, 36, 36), torch.randint(0, 100, (batch,))
    first = build('mlit_s@sparse').train()
    fns = {}
    for precision, dtype in (('bfloat16', torch.bfloat16), ('float32', None)):
        for label, granule in (('unpadded', 1), (f'padded ({sorted_mix.ROW_GRANULE} rows)', sorted_mix.ROW_GRANULE)):
            model = build('mlit_s@sparse').train()
            model.load_state_dict(first.state_dict())  # one initialisation, so that each case routes alike
            step = train_step_fn(model, x, target, torch.optim.AdamW(model.parameters(), lr=1e-4), dtype,
                                 torch.device('cpu'))

            def fn(step=step, granule=granule):
                sorted_mix.ROW_GRANULE = granule
                step()
            fns[f'mlit_s training step, {precision}: MoE blocks {label}'] = fn
    return fns


@exit_on_error('cpu_paths.py')
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=at_least(1), default=128)
    parser.add_argument('--repeats', type=at_least(1), default=9)
    parser.add_argument('--out', type=checked(results_folder), default='benchmarks/results')
    args = parser.parse_args(argv)
    rows = []
    saved = cpu_attention.CHUNK_BYTES, sorted_mix.ROW_GRANULE
    try:
        for group in (attention_fns, dropout_fns, moe_fns, padding_fns):
            fns = group(args.batch)
            seconds = time_interleaved(fns, args.repeats)
            first = next(iter(seconds.values()))
            for name, s in seconds.items():
                rows.append(dict(case=name, ms=s * 1e3, vs_first_of_group=s / first))
                print(rows[-1], flush=True)
    finally:
        cpu_attention.CHUNK_BYTES, sorted_mix.ROW_GRANULE = saved
    meta = dict(machine=machine(), torch=torch.__version__, batch=args.batch,
                command='python benchmarks/cpu_paths.py ' + ' '.join(argv if argv is not None else sys.argv[1:]))
    write_results(args.out, 'cpu_paths_cpu', meta, rows, ['case', 'ms', 'vs_first_of_group'])


if __name__ == '__main__':
    main()
