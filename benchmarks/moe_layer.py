"""MoE layer speed at every layer shape of mlit_s/xs/xxs: each moe_impl vs the 'loop' reference vs a dense SwiGLU
of the same active FLOPs.

"Same active FLOPs": a token runs k experts, each a SwiGLU of hidden d with m -> d -> m (eq. 13 as written), so the
dense twin is one SwiGLU of hidden k·d (timm.layers.SwiGLU) with the same single dropout (p=0.1) on its output, as
the MoE layer has (timm's SwiGLU(drop=...) would drop twice, inside and after, and be slower than a fair twin).
Timings are medians of interleaved repeats; the ratios (impl / dense SwiGLU) are what to read.

    python benchmarks/moe_layer.py --out benchmarks/results            # CPU, fp32, 64 images x 145 tokens
    python benchmarks/moe_layer.py --device cuda --dtype bfloat16 --batch 256
"""
import argparse
import sys
from pathlib import Path

import timm
import torch
from timm.layers import SwiGLU

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import at_least, checked, device_here, machine, results_folder, time_interleaved, write_results  # noqa: E402,E501

import timm_mlit  # noqa: E402,F401
from timm_mlit.cli import exit_on_error  # noqa: E402
from timm_mlit.layers import MOE_IMPLS  # noqa: E402
from timm_mlit.layers.moe import MoE  # noqa: E402


def layer_shapes(name: str):
    model = timm.create_model(name)
    seen = []
    for blk in model.blocks:
        shape = (blk.mlp.experts.dim, blk.mlp.experts.hidden_dim, blk.mlp.gate.num_experts, blk.mlp.gate.top_k)
        if shape not in seen:
            seen.append(shape)
    return seen


@exit_on_error('moe_layer.py')
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', choices=timm.list_models('mlit_*'),
                        default=['mlit_xxs', 'mlit_xs', 'mlit_s'])
    parser.add_argument('--impls', nargs='+', choices=MOE_IMPLS, default=['dense', 'sparse', 'auto', 'loop'])
    parser.add_argument('--batch', type=at_least(1), default=64, help='images; tokens = batch x 145')
    parser.add_argument('--repeats', type=at_least(1), default=7)
    parser.add_argument('--device', type=checked(device_here), default='cpu')
    parser.add_argument('--dtype', choices=['float32', 'bfloat16', 'float16'], default='float32')
    parser.add_argument('--layer-stride', type=at_least(1), default=1, help='time every n-th layer shape (1: all)')
    parser.add_argument('--extra-experts', type=at_least(1), nargs='*', default=[8, 12],
                        help="also time mlit_xxs's first layer shape with these expert counts (where 'auto' switches)")
    parser.add_argument('--out', type=checked(results_folder), default='benchmarks/results')
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    tokens = args.batch * 145
    shapes = {name: layer_shapes(name)[::args.layer_stride] for name in args.models}
    first = shapes[args.models[0]][0]
    for t in args.extra_experts:
        if t < first[3]:
            parser.error(f'--extra-experts {t}: fewer experts than the {first[3]} each token goes to')
    shapes[args.models[0]] += [(first[0], first[1], t, first[3]) for t in args.extra_experts]
    rows = []
    for name in args.models:
        for dim, hidden, experts, k in shapes[name]:
            x = torch.randn(tokens, dim, device=device, dtype=dtype)
            layers = {impl: MoE(dim, hidden, experts, k, impl=impl) for impl in args.impls}
            ref_state = next(iter(layers.values())).state_dict()
            for layer in layers.values():
                layer.load_state_dict(ref_state)
            layers['swiglu'] = torch.nn.Sequential(SwiGLU(dim, k * hidden, norm_layer=None), torch.nn.Dropout(0.1))
            for layer in layers.values():
                layer.to(device=device, dtype=dtype)

            for mode in ('eval', 'train'):
                fns = {}
                for impl, layer in layers.items():
                    layer.train(mode == 'train')
                    if mode == 'eval':
                        def fn(layer=layer):
                            with torch.no_grad():
                                layer(x)
                    else:
                        xg = x.clone().requires_grad_()

                        def fn(layer=layer, xg=xg):
                            layer(xg).float().sum().backward()
                    fns[impl] = fn
                times = time_interleaved(fns, args.repeats, device=args.device)
                row = dict(model=name, dim=dim, hidden=hidden, experts=experts, mode=mode,
                           swiglu_ms=times['swiglu'] * 1e3)
                for impl in args.impls:
                    row[f'{impl}_ms'] = times[impl] * 1e3
                    row[f'{impl}/swiglu'] = times[impl] / times['swiglu']
                rows.append(row)
                print(row, flush=True)
    columns = ['model', 'dim', 'hidden', 'experts', 'mode', 'swiglu_ms'] + \
        [f'{i}/swiglu' for i in args.impls]
    meta = dict(machine=machine(), device=args.device, dtype=args.dtype, tokens=tokens, torch=torch.__version__,
                command='python benchmarks/moe_layer.py ' + ' '.join(argv if argv is not None else sys.argv[1:]))
    write_results(args.out, f'moe_layer_{args.device}_{args.dtype}', meta, rows, columns)


if __name__ == '__main__':
    main()
