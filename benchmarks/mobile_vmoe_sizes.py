"""The registered Mobile V-MoE sizes: parameters (in all, and touched by one image) and compute per image, counted.

    python benchmarks/mobile_vmoe_sizes.py --out benchmarks/results       # docs/mobile_vmoe.md's table (a minute)

For every `mobile_vmoe_*` model timm lists, at its default input size, with 1000 classes (the paper's ImageNet
setting): parameters; parameters an image touches (all but the (E - k) experts it does not choose, in each MoE
layer); FLOPs of one inference forward per image, counted by PyTorch's `FlopCounterMode` (timm_mlit.model_stats'
counter: matmuls and the attention products, a multiply-add counting two) and the same in multiply-adds (MMAC, the
unit in which ViT-S/16's usual "4.6 G" and the paper's "54M FLOPs" are given); and the same for its dense twin
(`moe_layers=0`). The counts do not depend on the machine.
"""
import argparse
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import checked, machine, results_folder, write_results  # noqa: E402

import timm_mlit  # noqa: E402,F401
from timm_mlit.cli import exit_on_error  # noqa: E402
from timm_mlit.model_stats import count_flops, touched_params  # noqa: E402

COLUMNS = ['model', 'input', 'E', 'k', 'params_m', 'touched_m', 'mflop', 'mmac', 'dense_params_m', 'dense_mmac']


def measure(names, num_classes: int = 1000):
    rows = []
    for name in names:
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=num_classes)
        dense = timm.create_model(name, num_classes=num_classes, moe_layers=0)
        size = model.pretrained_cfg['input_size']
        mflop = count_flops(model, torch.randn(1, *size)) / 1e6
        rows.append(dict(
            model=name, input=f'{size[1]}x{size[2]}', E=model.num_experts, k=model.top_k,
            params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            touched_m=round(touched_params(model) / 1e6, 2), mflop=round(mflop, 1), mmac=round(mflop / 2, 1),
            dense_params_m=round(sum(p.numel() for p in dense.parameters()) / 1e6, 2),
            dense_mmac=round(count_flops(dense, torch.randn(1, *size)) / 2e6, 1)))
        print(rows[-1], flush=True)
    return rows


@exit_on_error('mobile_vmoe_sizes.py')
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=None, help='default: every registered mobile_vmoe_* model')
    parser.add_argument('--out', type=checked(results_folder), default='benchmarks/results')
    args = parser.parse_args(argv)
    names = args.models or timm.list_models('mobile_vmoe_*')
    unknown = [n for n in names if n not in timm.list_models('mobile_vmoe_*')]
    if unknown:
        parser.error(f'not a registered Mobile V-MoE model: {", ".join(unknown)}')
    torch.set_num_threads(1)
    rows = measure(names)
    command = 'python benchmarks/mobile_vmoe_sizes.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
    meta = dict(machine=machine(), torch=torch.__version__, num_classes=1000, counter='torch.utils.flop_counter',
                command=command)
    write_results(args.out, 'mobile_vmoe_sizes', meta, rows, COLUMNS)
    return 0


if __name__ == '__main__':
    sys.exit(main())
