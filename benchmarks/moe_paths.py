"""Whole-model training step with the sparse MoE path's two dispatches, in one run: tokens grouped by expert pair
(`ops.PairedExpertMix`, what 'sparse' runs for top-2 among at most `experts.MAX_EXPERTS_FOR_PAIRS` experts) against
(token, expert) pairs sorted by expert (`ops.SortedExpertMix`, what it runs otherwise). The pairs are kept only
while this shows them faster at the model level.

Each model: images/s of a training step (forward, cross-entropy, backward, AdamW step; moe_impl='sparse'), medians
of interleaved repeats; `paired_vs_sorted` is the ratio of the two in the same run.

    python benchmarks/moe_paths.py --out benchmarks/results
"""
import argparse
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import at_least, checked, machine, results_folder, time_interleaved, write_results  # noqa: E402

import timm_mlit  # noqa: E402,F401
from timm_mlit.cli import exit_on_error  # noqa: E402
from timm_mlit.layers import experts  # noqa: E402

DISPATCH = {'paired': experts.MAX_EXPERTS_FOR_PAIRS, 'sorted': 0}  # MAX_EXPERTS_FOR_PAIRS for each dispatch


def train_step(model, x, target, opt, dispatch: str):
    def step():
        experts.MAX_EXPERTS_FOR_PAIRS = DISPATCH[dispatch]
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


@exit_on_error('moe_paths.py')
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', choices=timm.list_models('mlit_*'),
                        default=['mlit_xxs', 'mlit_xs', 'mlit_s'])
    parser.add_argument('--train-batch', type=at_least(1), default=128)
    parser.add_argument('--repeats', type=at_least(1), default=7)
    parser.add_argument('--out', type=checked(results_folder), default='benchmarks/results')
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x = torch.randn(args.train_batch, 3, 36, 36)
    target = torch.randint(0, 100, (args.train_batch,))
    fns, rows = {}, []
    for name in args.models:
        model = timm.create_model(name, num_classes=100, moe_impl='sparse').train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for dispatch in DISPATCH:
            fns[(name, dispatch)] = train_step(model, x, target, opt, dispatch)
    try:
        times = time_interleaved(fns, args.repeats)
    finally:
        experts.MAX_EXPERTS_FOR_PAIRS = DISPATCH['paired']
    for name in args.models:
        paired, sorted_ = (args.train_batch / times[(name, d)] for d in DISPATCH)
        rows.append(dict(model=name, paired_train_img_s=paired, sorted_train_img_s=sorted_,
                         paired_vs_sorted=paired / sorted_))
    meta = dict(machine=machine(), device='cpu', train_batch=args.train_batch, repeats=args.repeats,
                torch=torch.__version__, timm=timm.__version__,
                command='python benchmarks/moe_paths.py ' + ' '.join(argv if argv is not None else sys.argv[1:]))
    write_results(args.out, 'moe_paths_cpu_float32', meta, rows,
                  ['model', 'paired_train_img_s', 'sorted_train_img_s', 'paired_vs_sorted'])


if __name__ == '__main__':
    main()
