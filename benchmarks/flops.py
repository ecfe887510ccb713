"""FLOPs per image at 36×36: mLiT against its dense ViT twin, counted, not timed.

Speed ratios between two models are bounded by their work: where both run their kernels at the same FLOP rate, model
A is (FLOPs of B) / (FLOPs of A) times as fast as B. This counts the floating-point operations each model executes
per image with PyTorch's own counter (`torch.utils.flop_counter.FlopCounterMode`: matmuls, convolutions and the
attention products; element-wise work is not counted), for inference (eval mode, no autograd) and for a training
step's forward and backward (train mode: mLiT's noisy gating, the MoE dropout). Attention runs under the math
backend of scaled_dot_product_attention here so that the counter sees its two products (the fused CPU kernels do the
same products but are not counted); the counts do not depend on the machine.

    python benchmarks/flops.py --out benchmarks/results      # docs/performance.md's table (a few seconds)

Specs as in benchmarks/models.py: `mlit_xxs`, `mlit_xxs@sparse` (each MoE implementation forced), `vit_twin@mlit_xxs`.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import at_least, checked, machine, results_folder, write_results  # noqa: E402
from models import build, check_spec  # noqa: E402

from timm_mlit import model_stats  # noqa: E402
from timm_mlit.cli import exit_on_error  # noqa: E402

DEFAULT_SPECS = ['mlit_xxs', 'mlit_xxs@sparse', 'vit_twin@mlit_xxs', 'mlit_xs', 'mlit_xs@sparse', 'vit_twin@mlit_xs',
                 'mlit_s', 'mlit_s@sparse', 'vit_twin@mlit_s']


def count_flops(model: torch.nn.Module, batch: int = 4, train: bool = False, input_size=(3, 36, 36)) -> float:
    """FLOPs per image of one forward (eval mode, no autograd) or, with `train`, one forward and backward; a
    multiply-add counts as two (the package's counter, timm_mlit.model_stats, on `batch` random images)."""
    return model_stats.count_flops(model, torch.randn(batch, *input_size), train=train)


def measure(specs, batch: int = 4):
    torch.manual_seed(0)
    rows = []
    for spec in specs:
        model = build(spec)
        rows.append(dict(model=spec, params=sum(p.numel() for p in model.parameters()),
                         eval_mflop=round(count_flops(model, batch) / 1e6, 2),
                         train_mflop=round(count_flops(model, batch, train=True) / 1e6, 2)))
    by_spec = {r['model']: r for r in rows}
    for r in rows:  # the twin's work over this model's: its speed ratio to the twin at an equal FLOP rate
        twin = by_spec.get(f'vit_twin@{r["model"].split("@")[0]}')
        if twin and not r['model'].startswith('vit_twin@'):
            r['eval_ceiling_vs_vit'] = round(twin['eval_mflop'] / r['eval_mflop'], 3)
            r['train_ceiling_vs_vit'] = round(twin['train_mflop'] / r['train_mflop'], 3)
    return rows


@exit_on_error('flops.py')
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--specs', nargs='+', type=checked(check_spec), default=DEFAULT_SPECS)
    parser.add_argument('--batch', type=at_least(1), default=4,
                        help='images per counted pass (the counts are per image)')
    parser.add_argument('--out', type=checked(results_folder), default='benchmarks/results')
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = measure(args.specs, args.batch)
    meta = dict(machine=machine(), torch=torch.__version__, input='3x36x36', counter='torch.utils.flop_counter',
                command='python benchmarks/flops.py ' + ' '.join(argv if argv is not None else sys.argv[1:]))
    write_results(args.out, 'flops', meta, rows, ['model', 'params', 'eval_mflop', 'train_mflop',
                                                  'eval_ceiling_vs_vit', 'train_ceiling_vs_vit'])
    return 0


if __name__ == '__main__':
    sys.exit(main())
