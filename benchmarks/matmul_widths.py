"""Matmul time against output width: why the MoE layer pads its matmul widths to multiples of 16 (`_gemm_pad` in
timm_mlit/layers/moe.py).

Times x [rows, m] @ W [m, w] (the forward of an nn.Linear with w outputs) for every w in a range, medians of
interleaved repeats, and for each width the time at the next multiple of 16 beside it: `pad/plain` < 1 means
padding the weight with zero rows and computing the extra columns is faster than the odd width.

    python benchmarks/matmul_widths.py --out benchmarks/results    # 18,560 rows = 64 images x 145 tokens x k = 2
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import at_least, checked, device_here, machine, results_folder, time_interleaved, write_results  # noqa: E402

from timm_mlit.cli import exit_on_error  # noqa: E402


@exit_on_error('matmul_widths.py')
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rows', type=at_least(1), default=18560)
    parser.add_argument('--dim', type=at_least(1), default=108, help='input width m (mlit_xxs: 108)')
    parser.add_argument('--widths', type=at_least(1), nargs=2, default=[24, 100], metavar=('FIRST', 'LAST'))
    parser.add_argument('--repeats', type=at_least(1), default=15)
    parser.add_argument('--device', type=checked(device_here), default='cpu')
    parser.add_argument('--out', type=checked(results_folder), default='benchmarks/results')
    args = parser.parse_args(argv)
    if args.widths[0] > args.widths[1]:
        parser.error(f'--widths {args.widths[0]} {args.widths[1]}: FIRST must not be larger than LAST')
    x = torch.randn(args.rows, args.dim, device=args.device)
    widths = range(args.widths[0], args.widths[1] + 1)
    padded = {w + (-w % 16) for w in widths}
    weights = {w: torch.randn(args.dim, w, device=args.device) for w in sorted(set(widths) | padded)}
    fns = {w: (lambda w=w: torch.mm(x, weights[w])) for w in weights}
    times = time_interleaved(fns, args.repeats, device=args.device)
    rows = []
    for w in widths:
        p = w + (-w % 16)
        rows.append(dict(width=w, ms=times[w] * 1e3, padded_width=p, padded_ms=times[p] * 1e3,
                         **{'pad/plain': times[p] / times[w]}))
    meta = dict(machine=machine(), device=args.device, rows=args.rows, dim=args.dim, torch=torch.__version__,
                command='python benchmarks/matmul_widths.py ' + ' '.join(argv if argv is not None else sys.argv[1:]))
    write_results(args.out, f'matmul_widths_{args.device}', meta, rows,
                  ['width', 'ms', 'padded_width', 'padded_ms', 'pad/plain'])


if __name__ == '__main__':
    main()
