"""Whole-model speed at 36×36: mLiT vs its dense twin vs timm peers of similar size, in one run.

For each model: batch-1 latency (eval), batch-256 throughput (eval), training-step images/s (forward, cross-entropy,
backward, AdamW step) and the peak memory of a training step. Models:
  * mlit_xxs / mlit_xs / mlit_s, and mlit_xxs with each MoE implementation forced (`name@<moe_impl>`: 'loop', the
    reference; 'dense'; 'sparse', also in inference)
  * each one with one expert (`name@one_expert`: num_experts=(1, 1, 1), top_k=1, one SwiGLU expert of the same
    hidden size per layer, no routing)
  * a dense ViT of the same width and depth from timm's VisionTransformer (patch 3, MLP ratio 2)
  * small timm CNNs: resnet10t, mobilenetv3_small_050
Timings are medians of interleaved repeats (all models take turns, so load on a shared machine hits them alike);
compare the ratios. Peak memory: on CUDA torch.cuda.max_memory_allocated; on CPU the growth of the process's peak
RSS during three training steps over the RSS before the first one (Linux /proc), in a fresh subprocess per model.

    python benchmarks/models.py --out benchmarks/results
    python benchmarks/models.py --specs mlit_xxs mlit_xxs@dense mlit_xxs@sparse mlit_xxs@loop mlit_xxs@one_expert \
        vit_twin@mlit_xxs resnet10t mobilenetv3_small_050 --repeats 7 --out benchmarks/results     # docs' table
    python benchmarks/models.py --specs mlit_xxs mlit_xxs@torch_dropout vit_twin@mlit_xxs \
        --amp-dtype float32 bfloat16 --no-memory --repeats 7 --out benchmarks/results     # each in its best precision
    python benchmarks/models.py --device cuda --amp-dtype bfloat16 --out benchmarks/results
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import at_least, checked, device_here, machine, results_folder, time_interleaved, write_results  # noqa: E402,E501

import timm_mlit  # noqa: E402,F401
from timm_mlit.cli import exit_on_error  # noqa: E402
from timm_mlit.layers import MOE_IMPLS  # noqa: E402
from timm_mlit.layers.dropout import torch_dropout  # noqa: E402

VIT_TWINS = dict(mlit_xxs=(108, 9, 6), mlit_xs=(128, 12, 8), mlit_s=(144, 15, 8))


def check_spec(text: str):
    """Raise ValueError unless `text` is a model spec that `build` builds, from timm's registry alone."""
    name, _, variant = text.partition('@')
    if name == 'vit_twin':
        if variant not in VIT_TWINS:
            raise ValueError(f'{text!r}: a vit_twin@ spec names one of {", ".join(VIT_TWINS)}')
    elif not timm.is_model(name):
        raise ValueError(f'unknown model {name!r} in the spec {text!r}')
    elif variant and variant not in ('one_expert', 'torch_dropout') + tuple(MOE_IMPLS):
        raise ValueError(f'unknown model variant {text!r}: use name@one_expert, name@torch_dropout or '
                         f'name@<moe_impl>, moe_impl one of {", ".join(MOE_IMPLS)}')
    elif variant and name not in timm.list_models('mlit_*'):
        raise ValueError(f'{text!r}: the @{variant} variants are of mLiT models ({", ".join(VIT_TWINS)})')


def build(text: str, num_classes: int = 100):
    """`name`, `name@one_expert` (one expert per layer), `name@<moe_impl>`, `name@torch_dropout` (PyTorch's dropout
    in the MoE layers: the float32 path before the cheaper CPU mask) or `vit_twin@name`."""
    check_spec(text)
    name, _, variant = text.partition('@')
    if name == 'vit_twin':
        dim, depth, heads = VIT_TWINS[variant]
        return timm.create_model(
            'vit_tiny_patch16_224', img_size=36, patch_size=3, embed_dim=dim, depth=depth, num_heads=heads,
            mlp_ratio=2.0, num_classes=num_classes)
    if variant == 'torch_dropout':
        return torch_dropout(timm.create_model(name, num_classes=num_classes))
    kwargs = dict(num_experts=(1, 1, 1), top_k=1) if variant == 'one_expert' else \
        dict(moe_impl=variant) if variant else {}
    return timm.create_model(name, num_classes=num_classes, **kwargs)


def default_specs(models):
    specs = []
    for name in models:
        specs += [name, f'{name}@one_expert', f'vit_twin@{name}']
    specs[1:1] = [f'{models[0]}@{impl}' for impl in ('dense', 'sparse', 'loop')]
    return specs + ['resnet10t', 'mobilenetv3_small_050']


def train_step_fn(model, x, target, opt, amp_dtype, device):
    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def worker_peak_memory(spec: str, batch: int, amp: str):
    """Run in a subprocess: peak-RSS growth (MiB) over a few CPU training steps of one model."""
    torch.set_num_threads(torch.get_num_threads())
    device = torch.device('cpu')
    model = build(spec).train()
    x, target = torch.randn(batch, 3, 36, 36), torch.randint(0, 100, (batch,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp_dtype = getattr(torch, amp) if amp else None
    step = train_step_fn(model, x, target, opt, amp_dtype, device)
    before = _rss_kib('VmRSS')  # model, optimizer and batch built; no step taken (the first one allocates most)
    Path('/proc/self/clear_refs').write_text('5')  # reset the peak-RSS mark (VmHWM) to the current RSS
    for _ in range(3):
        step()
    print(json.dumps(dict(peak_mib=(_rss_kib('VmHWM') - before) / 1024)))


def _rss_kib(field: str) -> int:
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1])
    raise RuntimeError(f'{field} not in /proc/self/status (Linux only)')


def train_peak_mib(spec, model, x, target, opt, amp_dtype, device, precision, args) -> float:
    """Peak memory of a training step: CUDA's allocator peak, or on CPU the peak-RSS growth in a fresh process."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        train_step_fn(model, x, target, opt, amp_dtype, device)()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2 ** 20
    out = subprocess.run(
        [sys.executable, __file__, '--_worker', spec, '--train-batch', str(args.train_batch),
         '--amp-dtype', precision], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])['peak_mib']


def add_ratios(rows):
    """Each model's eval and train rates over its one-expert twin's, and eval over its 'loop' reference's."""
    base = {r['model']: r for r in rows}
    for r in rows:
        twin = base.get(r['model'] + '@one_expert') if '@' not in r['model'] else None
        if twin:
            r['eval_vs_one_expert'] = r['eval_img_s'] / twin['eval_img_s']
            r['train_vs_one_expert'] = r['train_img_s'] / twin['train_img_s']
        ref = base.get(r['model'] + '@loop')
        if ref:
            r['eval_vs_loop'] = r['eval_img_s'] / ref['eval_img_s']


def _dtype(name: str):
    return None if name in ('', 'float32') else getattr(torch, name)


def add_best_precision(rows, dtypes):
    """With several precisions: each model's best latency and rates over them, and mLiT's over its ViT twin's."""
    best = {}
    for r in rows:
        b = best.setdefault(r['spec'], dict(model=r['spec'], precision='best', params=r['params']))
        for key, better in (('latency_b1_ms', min), ('eval_img_s', max), ('train_img_s', max)):
            if key not in b or better(r[key], b[key]) == r[key]:
                b[key], b[key.split('_')[0] + '_precision'] = r[key], r['precision']
    for spec, b in best.items():
        twin = best.get(f'vit_twin@{spec}')
        if twin:
            b['train_vs_vit'] = b['train_img_s'] / twin['train_img_s']
            b['eval_vs_vit'] = b['eval_img_s'] / twin['eval_img_s']
            b['latency_b1_vs_vit'] = b['latency_b1_ms'] / twin['latency_b1_ms']
    return list(best.values())


@exit_on_error('models.py')
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', choices=list(VIT_TWINS), default=['mlit_xxs', 'mlit_xs', 'mlit_s'])
    parser.add_argument('--specs', nargs='+', type=checked(check_spec), default=None,
                        help='override the model list entirely')
    parser.add_argument('--device', type=checked(device_here), default='cpu')
    parser.add_argument('--amp-dtype', nargs='+', choices=['float32', 'bfloat16', 'float16'], default=['float32'],
                        help='float32 (no autocast), bfloat16 or float16 autocast; several: every model in each, '
                             'interleaved, and each model\'s best')
    parser.add_argument('--batch', type=at_least(1), default=256)
    parser.add_argument('--train-batch', type=at_least(1), default=128)
    parser.add_argument('--repeats', type=at_least(1), default=5)
    parser.add_argument('--no-memory', action='store_true')
    parser.add_argument('--out', type=checked(results_folder), default='benchmarks/results')
    parser.add_argument('--_worker', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dtypes = args.amp_dtype
    if args._worker:
        return worker_peak_memory(args._worker, args.train_batch, _dtype(dtypes[0]) and dtypes[0])

    device = torch.device(args.device)
    specs = args.specs or default_specs(args.models)
    several = len(dtypes) > 1
    runs = {(f'{s} [{d}]' if several else s): (s, d) for s in specs for d in dtypes}  # key -> (spec, precision)
    # one model (and optimizer) per run: a model trained in turns in two precisions measured slower in both than
    # one trained in a single precision, as training does (allocator churn between the two dtypes' buffers)
    models = {k: build(s).to(device) for k, (s, _) in runs.items()}
    x1 = torch.randn(1, 3, 36, 36, device=device)
    xb = torch.randn(args.batch, 3, 36, 36, device=device)
    xt = torch.randn(args.train_batch, 3, 36, 36, device=device)
    target = torch.randint(0, 100, (args.train_batch,), device=device)

    def infer(model, x, amp_dtype):
        def fn():
            with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                model(x)
        return fn

    for m in models.values():
        m.eval()
    lat = time_interleaved({k: infer(models[k], x1, _dtype(d)) for k, (s, d) in runs.items()}, args.repeats * 4,
                           device=args.device)
    thr = time_interleaved({k: infer(models[k], xb, _dtype(d)) for k, (s, d) in runs.items()}, args.repeats,
                           device=args.device)
    for m in models.values():
        m.train()
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    train = time_interleaved(
        {k: train_step_fn(models[k], xt, target, opts[k], _dtype(d), device) for k, (s, d) in runs.items()},
        args.repeats, device=args.device)

    rows = []
    for k, (s, d) in runs.items():
        m = models[k]
        row = dict(model=k, spec=s, precision=d, params=sum(p.numel() for p in m.parameters()),
                   latency_b1_ms=lat[k] * 1e3, eval_img_s=args.batch / thr[k], train_img_s=args.train_batch / train[k])
        if not args.no_memory:
            row['train_peak_mib'] = train_peak_mib(s, m, xt, target, opts[k], _dtype(d), device, d, args)
        rows.append(row)
        print(row, flush=True)
    columns = ['model', 'params', 'latency_b1_ms', 'eval_img_s', 'train_img_s', 'train_peak_mib']
    if several:
        rows += add_best_precision(rows, dtypes)
        columns += ['train_vs_vit', 'eval_vs_vit', 'latency_b1_vs_vit']
    else:
        add_ratios(rows)
        columns += ['eval_vs_one_expert', 'train_vs_one_expert', 'eval_vs_loop']
    meta = dict(machine=machine(), device=args.device, amp_dtype='_'.join(dtypes), batch=args.batch,
                train_batch=args.train_batch, torch=torch.__version__, timm=timm.__version__,
                command='python benchmarks/models.py ' + ' '.join(argv if argv is not None else sys.argv[1:]))
    write_results(args.out, f'models_{args.device}_{"_".join(dtypes)}', meta, rows, columns)


if __name__ == '__main__':
    main()
