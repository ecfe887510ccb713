"""The tables of README.md and docs/*.md, written from the committed benchmark results (benchmarks/results/*.json),
the shipped model cards and the registered models.

Each table sits between `<!-- begin table: NAME -->` and `<!-- end table: NAME -->` in exactly one of those pages
and is replaced whole; the prose around them quotes no figure. After re-running a benchmark:

    python benchmarks/readme_tables.py            # rewrite the tables of README.md and docs/*.md in place
    python benchmarks/readme_tables.py --check    # status 1 if a table is not what the results give

tests/test_readme_performance.py runs the check, so a table that was not regenerated fails.
"""
import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import checked, existing_folder  # noqa: E402
from common import markdown_table as _md  # noqa: E402

from timm_mlit.cli import exit_on_error, fail  # noqa: E402
from timm_mlit.files import atomic_write  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / 'benchmarks' / 'results'
README = REPO / 'README.md'
DOCS = REPO / 'docs'
IMPLS = ('auto', 'dense', 'sparse', 'loop')
# the models table's rows: 'auto' (the default), every other moe_impl, one expert, the ViT twin, two timm CNNs
MODEL_ROWS = ['mlit_xxs', 'mlit_xxs@dense', 'mlit_xxs@sparse', 'mlit_xxs@loop', 'mlit_xxs@one_expert',
              'vit_twin@mlit_xxs', 'resnet10t', 'mobilenetv3_small_050']
MLIT_SIZES = ['mlit_xxs', 'mlit_xs', 'mlit_s']
MAX_LAYER_RATIO = 1.3  # the MoE layer's target: fwd+bwd at most this times its dense SwiGLU twin


class ReadmeTableError(ValueError):
    """A result file, a row of it or a page's marker that a table needs is missing."""


def pages() -> List[Path]:
    """The pages that hold tables: README.md, then docs/*.md."""
    return [README] + sorted(DOCS.glob('*.md'))


def _page_name(page: Path) -> str:
    return page.relative_to(REPO).as_posix() if page.is_relative_to(REPO) else str(page)


def _load(results: Path, stem: str) -> dict:
    path = results / f'{stem}.json'
    if not path.is_file():
        raise ReadmeTableError(f'{path} is missing: run the benchmark that writes it (see its docstring)')
    return json.loads(path.read_text())


def _rows_by_model(data: dict, stem: str, needed: List[str]) -> Dict[str, dict]:
    rows = {r['model']: r for r in data['rows']}
    missing = [m for m in needed if m not in rows]
    if missing:
        raise ReadmeTableError(f'{stem}.json has no row for {", ".join(missing)}: re-run its benchmark with '
                               f'--specs {" ".join(needed)} (its command was `{data["meta"]["command"]}`)')
    return rows


def _measured_by(meta: dict) -> str:
    return f"Measured by `{meta['command']}` (torch {meta['torch']}, {meta['machine']})."


def _rate(v: float) -> str:
    return f'{v:.1f}' if v < 100 else f'{v:,.0f}'


# ------------------------------------------------------------------------------------------------ the tables

def _layer_shapes(results: Path, experts: int, mode: str) -> List[dict]:
    data = _load(results, 'moe_layer_cpu_float32')
    rows = [r for r in data['rows'] if r['experts'] == experts and r['mode'] == mode]
    if not rows:
        raise ReadmeTableError(f'moe_layer_cpu_float32.json has no {mode} row with {experts} experts')
    return rows


def layer_ranges(results: Path) -> str:
    """Per expert count and mode, the range over the layer shapes of each impl's time / its SwiGLU twin's."""
    data = _load(results, 'moe_layer_cpu_float32')
    table = []
    for experts in (3, 4, 5):
        for mode in ('eval', 'train'):
            rows = _layer_shapes(results, experts, mode)
            cells = [f"{min(r[f'{i}/swiglu'] for r in rows):.2f}–{max(r[f'{i}/swiglu'] for r in rows):.2f}"
                     for i in IMPLS]
            table.append([f'{experts} experts', 'train (fwd+bwd)' if mode == 'train' else mode] + cells)
    wide = [r for r in data['rows'] if r['experts'] > 5 and r['mode'] == 'train']
    if wide:
        label = ' / '.join(str(r['experts']) for r in wide) + f" experts ({wide[0]['model']} layer 0)"
        table.append([label, 'train'] + [' / '.join(f"{r[f'{i}/swiglu']:.2f}" for r in wide) for i in IMPLS])
    train = [r for r in data['rows'] if r['mode'] == 'train']
    noise = max(abs(r['auto/swiglu'] - r['sparse/swiglu']) for r in train)
    header = ['layers', 'mode'] + [f"`'{i}'`" + (' (reference)' if i == 'loop' else '') for i in IMPLS]
    return (_measured_by(data['meta']) + '\n\n' + _md(header, table) + '\n\n'
            + f"In training `'auto'` runs the same code as `'sparse'`: their largest difference in this run, "
              f"{noise:.2f}, is the noise of the machine.")


def _model_label(spec: str) -> str:
    name, _, variant = spec.partition('@')
    if name == 'vit_twin':
        return f'dense ViT, the width and depth of {variant} (timm VisionTransformer, MLP ratio 2)'
    if variant == 'one_expert':
        return f'{name} with one expert per layer (`num_experts=(1, 1, 1), top_k=1`)'
    if variant:
        extra = {'sparse': ' (also in inference)', 'loop': ' (the reference)'}.get(variant, '')
        return f"{name}, `moe_impl='{variant}'`{extra}"
    return name if name.startswith('mlit') else f'{name} (timm)'


def models_table(results: Path) -> str:
    """mlit_xxs under each moe_impl, with one expert, its ViT twin and two timm CNNs, in MODEL_ROWS' order."""
    data = _load(results, 'models_cpu_float32')
    by_spec = _rows_by_model(data, 'models_cpu_float32', MODEL_ROWS)
    header = ['model', 'params', 'latency b=1 (ms)', 'eval img/s', 'train img/s', 'train peak (MiB)']
    rows = [[_model_label(s), f"{r['params']:,}", f"{r['latency_b1_ms']:.1f}", _rate(r['eval_img_s']),
             _rate(r['train_img_s']), f"{r['train_peak_mib']:,.0f}"] for s, r in ((s, by_spec[s]) for s in MODEL_ROWS)]
    return _measured_by(data['meta']) + '\n\n' + _md(header, rows)


def targets_table(results: Path) -> str:
    """The speed goals, each beside what the committed results measure and whether that meets it."""
    layer = _load(results, 'moe_layer_cpu_float32')
    models = _load(results, 'models_cpu_float32')
    m = _rows_by_model(models, 'models_cpu_float32', ['mlit_xxs', 'mlit_xxs@loop', 'mlit_xxs@one_expert'])
    xxs, loop, one = m['mlit_xxs'], m['mlit_xxs@loop'], m['mlit_xxs@one_expert']
    shapes = [r for r in layer['rows'] if r['mode'] == 'train' and r['experts'] <= 5]
    worst = max(shapes, key=lambda r: r['auto/swiglu'])
    over = [r for r in shapes if r['auto/swiglu'] > MAX_LAYER_RATIO]

    def verdict(ok: bool) -> str:
        return 'met' if ok else 'missed'
    eval_vs_loop, eval_vs_one = xxs['eval_img_s'] / loop['eval_img_s'], xxs['eval_img_s'] / one['eval_img_s']
    train_vs_one = xxs['train_img_s'] / one['train_img_s']
    rows = [
        [f'MoE layer fwd+bwd ≤ {MAX_LAYER_RATIO}× the dense SwiGLU twin, every mLiT layer shape, CPU',
         f"`'auto'` at most {worst['auto/swiglu']:.2f}× ({worst['model']}, hidden {worst['hidden']}, "
         f"{worst['experts']} experts); over the target on {len(over)} of {len(shapes)} shapes", verdict(not over)],
        ["mlit_xxs eval throughput ≥ 2× `'loop'`, batch 256, CPU",
         f"{eval_vs_loop:.2f}× ({xxs['eval_img_s']:.0f} vs {loop['eval_img_s']:.0f} img/s); with one expert and no "
         f"routing at all, {one['eval_img_s'] / loop['eval_img_s']:.2f}×", verdict(eval_vs_loop >= 2)],
        ['mlit_xxs eval ≥ 0.8× itself with one expert',
         f"{eval_vs_one:.2f}× ({xxs['eval_img_s']:.0f} vs {one['eval_img_s']:.0f} img/s)", verdict(eval_vs_one >= .8)],
        ['mlit_xxs training step ≥ 0.65× itself with one expert',
         f"{train_vs_one:.2f}× ({_rate(xxs['train_img_s'])} vs {_rate(one['train_img_s'])} img/s)",
         verdict(train_vs_one >= .65)],
        ['H100: mmLiT-XXS pre-training ≥ 30,000 img/s, input pipeline on the GPU',
         'not measured (no GPU): `python benchmarks/pretrain_throughput.py --device cuda --amp-dtype bfloat16 '
         '--batch 1280` measures it', 'open'],
    ]
    return _md(['target', 'measured', ''], rows)


def paths_table(results: Path) -> str:
    data = _load(results, 'moe_paths_cpu_float32')
    rows = [[r['model'], _rate(r['paired_train_img_s']), _rate(r['sorted_train_img_s']), f"{r['paired_vs_sorted']:.3f}"]
            for r in data['rows']]
    return _measured_by(data['meta']) + '\n\n' + _md(
        ['model', 'grouped by expert pair, train img/s', 'sorted by expert, train img/s', 'pair / sorted'], rows)


def widths_table(results: Path) -> str:
    """The matmul widths of mlit_xxs's fused projection beside the next multiple of 16."""
    data = _load(results, 'matmul_widths_cpu')
    by_width = {r['width']: r for r in data['rows']}
    shown = [w for w in (27, 33, 40, 47, 54, 61) if w in by_width]
    if not shown:
        raise ReadmeTableError('matmul_widths_cpu.json has none of the widths 27..61 docs/performance.md shows')
    rows = [[str(w), f"{by_width[w]['ms']:.2f}", str(by_width[w]['padded_width']), f"{by_width[w]['padded_ms']:.2f}",
             f"{by_width[w]['pad/plain']:.2f}"] for w in shown]
    meta = data['meta']
    odd = [r for r in data['rows'] if r['width'] % 16]
    summary = (f"Over all {len(odd)} measured widths that are not a multiple of 16, padding is faster at "
               f"{sum(r['padded_ms'] < r['ms'] for r in odd)}, and the padded products take "
               f"{sum(r['padded_ms'] for r in odd):.0f} ms against {sum(r['ms'] for r in odd):.0f} ms in all.")
    return (_measured_by(meta) + f" {meta['rows']:,} rows of width {meta['dim']}.\n\n"
            + _md(['output width', 'ms', 'padded to', 'ms', 'padded / plain'], rows) + '\n\n' + summary)


PRECISION_STEM = 'models_cpu_float32_bfloat16'
PRETRAIN_STEM = 'pretrain_cpu_previous_auto'
EDGE_STEM = 'edge_cpu'
TUNE_STEM = 'fashion_mnist_tune'
ZOO_STEM = 'fashion_mnist_zoo'
# test top-1 (%) each shipped mmLiT classifier is to reach on Fashion-MNIST with a few CPU hours per size
ZOO_TARGETS = {'xxs': 91.0, 'xs': 91.5, 's': 92.0}
FLOPS_STEM = 'flops'


def _best_rows(results: Path):
    data = _load(results, PRECISION_STEM)
    best = {r['model']: r for r in data['rows'] if r.get('precision') == 'best'}
    runs = {(r['spec'], r['precision']): r for r in data['rows'] if r.get('precision') != 'best'}
    needed = ['mlit_xxs', 'mlit_xxs@torch_dropout', 'vit_twin@mlit_xxs']
    missing = [m for m in needed if m not in best]
    if missing:
        raise ReadmeTableError(f'{PRECISION_STEM}.json has no best row for {", ".join(missing)}: re-run '
                               f'`{data["meta"]["command"]}` with --specs {" ".join(needed)}')
    return data, best, runs


def cpu_paths_table(results: Path) -> str:
    """Each piece of the CPU bfloat16 path against its alternative (benchmarks/cpu_paths.py)."""
    data = _load(results, 'cpu_paths_cpu')
    rows = [[r['case'], f"{r['ms']:.1f}", f"{r['vs_first_of_group']:.2f}"] for r in data['rows']]
    return _measured_by(data['meta']) + '\n\n' + _md(['case (forward + backward)', 'ms', 'vs the first of its group'],
                                                      rows)


def precision_table(results: Path) -> str:
    """mlit_xxs and its ViT twin in float32 and bfloat16 autocast, and each one's best, on this CPU."""
    data, best, runs = _best_rows(results)
    labels = {'mlit_xxs': 'mlit_xxs', 'mlit_xxs@torch_dropout': 'mlit_xxs with nn.Dropout (`torch_dropout`)',
              'vit_twin@mlit_xxs': 'dense ViT twin (timm, SDPA)'}
    rows = []
    for spec, label in labels.items():
        for precision in ('float32', 'bfloat16'):
            r = runs[spec, precision]
            rows.append([label, precision, f"{r['latency_b1_ms']:.1f}", _rate(r['eval_img_s']),
                         _rate(r['train_img_s'])])
    return _measured_by(data['meta']) + '\n\n' + _md(
        ['model', 'precision', 'latency b=1 (ms)', 'eval img/s', 'train img/s'], rows)


def pretrain_table(results: Path) -> str:
    data = _load(results, PRETRAIN_STEM)
    label = {'previous': 'float32 with nn.Dropout', 'auto': 'chosen for this CPU'}
    rows = [[r['model'], label.get(r['precision'], r['precision']), r['autocast'].replace('None', 'float32'),
             _rate(r['img_s']), f"{r['vs_previous']:.2f}"] for r in data['rows']]
    return _measured_by(data['meta']) + '\n\n' + _md(
        ['model', 'path', 'precision', 'img/s', 'vs previous'], rows)


def edge_table(results: Path) -> str:
    """The edge routes of benchmarks/edge.py; its test top-1 are of the shipped mlit_xxs weights, so an eager float32
    top-1 other than their model card's (weights re-published since) fails here, naming the command to re-run."""
    data = _load(results, EDGE_STEM)
    name = f"mlit_xxs.{data['meta']['weights']}"
    fp32 = next(r for r in data['rows'] if r['model'] == 'mlit_xxs' and r['route'] == 'eager float32')
    checked_card_top1(name, fp32['test_top1'], f"{EDGE_STEM}.json measured {name} in eager float32",
                      data['meta']['command'])
    rows = []
    for r in data['rows']:
        top1 = f"{r['test_top1']:.2f} ({r['top1_vs_eager_float32']:+.2f})" if 'test_top1' in r else '— (speed only)'
        rows.append([r['model'].replace('vit_twin@mlit_xxs', 'dense ViT twin'), r['route'], top1,
                     f"{r['latency_b1_ms']:.1f}", _rate(r['img_s'])])
    return (_measured_by(data['meta']) + f" {data['meta']['images']:,} test images.\n\n"
            + _md(['model', 'route', 'test top-1 % (vs eager float32)', 'latency b=1 (ms)', 'img/s (b=256)'], rows))


def cpu_targets_table(results: Path) -> str:
    """The CPU-speed goals against the dense ViT twin, each model in its best precision, from one run."""
    data, best, runs = _best_rows(results)
    pre = _load(results, PRETRAIN_STEM)
    edge = {(r['model'], r['route']): r for r in _load(results, EDGE_STEM)['rows']}
    mlit, vit = best['mlit_xxs'], best['vit_twin@mlit_xxs']
    auto = next(r for r in pre['rows'] if r['precision'] == 'auto')
    new32, old32 = runs['mlit_xxs', 'float32'], runs['mlit_xxs@torch_dropout', 'float32']
    int8, fp32 = edge['mlit_xxs', 'onnxruntime int8'], edge['mlit_xxs', 'eager float32']

    def verdict(ok: bool) -> str:
        return 'met' if ok else 'missed'

    def best_of(r, key):
        return r[key.split('_')[0] + '_precision']
    drop = int8['test_top1'] - fp32['test_top1']
    fp32_train = new32['train_img_s'] / old32['train_img_s']
    rows = [
        ['mlit_xxs training step ≥ 1.8× the dense ViT twin, each in its best precision',
         f"{mlit['train_vs_vit']:.2f}× ({_rate(mlit['train_img_s'])} img/s in {best_of(mlit, 'train_img_s')} vs "
         f"{_rate(vit['train_img_s'])} in {best_of(vit, 'train_img_s')})", verdict(mlit['train_vs_vit'] >= 1.8)],
        ['mlit_xxs eval ≥ 2.5× the ViT twin, each in its best precision',
         f"{mlit['eval_vs_vit']:.2f}× ({_rate(mlit['eval_img_s'])} img/s in {best_of(mlit, 'eval_img_s')} vs "
         f"{_rate(vit['eval_img_s'])} in {best_of(vit, 'eval_img_s')})", verdict(mlit['eval_vs_vit'] >= 2.5)],
        ['mlit_xxs batch-1 latency ≤ the ViT twin\'s (eager PyTorch)',
         f"{mlit['latency_b1_ms']:.1f} vs {vit['latency_b1_ms']:.1f} ms ({mlit['latency_b1_vs_vit']:.2f}×); "
         f"through ONNX Runtime int8 {int8['latency_b1_ms']:.1f} ms", verdict(mlit['latency_b1_vs_vit'] <= 1)],
        ['MAE pre-training ≥ 1.8× float32 with nn.Dropout, same run',
         f"{auto['vs_previous']:.2f}× ({_rate(auto['img_s'])} img/s, {auto['autocast']})",
         verdict(auto['vs_previous'] >= 1.8)],
        ['float32 path (a CPU without bf16 units) no slower than with nn.Dropout (within 5%, the noise)',
         f"training {fp32_train:.2f}× (in float32 the two differ only in the dropout mask); eval and batch 1 run "
         f"the same kernels ({new32['eval_img_s'] / old32['eval_img_s']:.2f}× and "
         f"{new32['latency_b1_ms'] / old32['latency_b1_ms']:.2f}× in this run: its noise)",
         verdict(fp32_train >= 0.95)],
        ['int8 Fashion-MNIST test top-1 at most 0.5 points below float32',
         f"{int8['test_top1']:.2f} vs {fp32['test_top1']:.2f} ({drop:+.2f})", verdict(drop >= -0.5)],
    ]
    return _md(['target', 'measured', ''], rows)


def flops_table(results: Path) -> str:
    """FLOPs per image of each mLiT (its default MoE path and the sparse one) and its ViT twin, and the speed ratio
    to the twin that an equal FLOP rate would give."""
    data = _load(results, FLOPS_STEM)
    header = ['model', 'params', 'MFLOP per image: inference', 'training step', 'twin\'s work over the model\'s: '
              'inference', 'training step']
    rows = [[_model_label(r['model']), f"{r['params']:,}", f"{r['eval_mflop']:,.0f}", f"{r['train_mflop']:,.0f}",
             f"{r['eval_ceiling_vs_vit']:.2f}×" if 'eval_ceiling_vs_vit' in r else '',
             f"{r['train_ceiling_vs_vit']:.2f}×" if 'train_ceiling_vs_vit' in r else ''] for r in data['rows']]
    return f"Counted by `{data['meta']['command']}` (torch {data['meta']['torch']}).\n\n" + _md(header, rows)


def epoch_profile_table(results: Path) -> str:
    """One Fashion-MNIST training epoch of mLiT-XXS, phase by phase, per patch-drop rate (epoch_profile.py)."""
    data = _load(results, 'epoch_profile_mlit_xxs')
    meta = data['meta']
    header = ['patch_drop_rate', 'loader wait (s)', 'forward (s)', 'backward (s)', 'optimizer (s)',
              'training epoch (s)', 'img/s', 'speed-up', f"validation of {meta.get('val_images', 5000):,} images (s)"]
    rows = [[f"{r['patch_drop_rate']:g}", f"{r['data_wait_s']:.1f}", f"{r['forward_s']:.0f}", f"{r['backward_s']:.0f}",
             f"{r['optimizer_s']:.1f}", f"{r['train_s']:.0f}", _rate(r['img_s']), f"{r['vs_first']:.2f}×",
             f"{r['validate_s']:.0f}"] for r in data['rows']]
    first = data['rows'][0]
    return (f"{_measured_by(meta)} {meta['amp_dtype']} autocast, batch {meta['batch']}, {meta['workers']} loader "
            f"workers, {meta['steps_timed']} timed steps per rate (medians), scaled to {meta['epoch_images']:,} "
            f"images. The augmentation costs {first['augment_core_s']:.0f} core-seconds an epoch.\n\n"
            + _md(header, rows))


def fashion_mnist_tune_table(results: Path) -> str:
    """The recipe pilots on the held-out validation split, as benchmarks/fashion_mnist_zoo.py tabulates them."""
    import fashion_mnist_zoo as zoo
    data = _load(results, TUNE_STEM)
    meta, pre = data['meta'], data['meta']['pretrain']
    return (f"Measured by `python benchmarks/fashion_mnist_zoo.py tune --out OUT` ({meta['hardware']}). "
            f"{meta['description']}; the MAE pre-training they start from took {zoo.fm.fmt_s(pre['wall_s'])} "
            f"at {pre['img_s']} img/s.\n\n" + zoo.tune_table(data))


def fashion_mnist_zoo_table(results: Path) -> str:
    """The zoo per size (mmLiT beside mLiT, the paper's Table 8 quoted beside), as benchmarks/fashion_mnist_zoo.py
    tabulates it, and each size's accuracy target against its tested mmLiT."""
    import fashion_mnist_zoo as zoo
    data = _load(results, ZOO_STEM)
    meta = data['meta']
    sizes = list(meta['schedule'])
    rows = {r['key']: r for r in data['rows']}
    done = sum(f'{k}_{z}' in rows for k in ('mmlit', 'mlit') for z in sizes)
    state = '' if meta['complete'] else f' Incomplete: {done} of {2 * len(sizes)} runs so far.'
    targets = []
    for z in sizes:
        r = rows.get(f'mmlit_{z}')
        goal = ZOO_TARGETS[z]
        measured = 'not run yet' if r is None else f"{r['top1']:.2f} after {r['epochs']} fine-tuning epochs"
        verdict = 'open' if r is None else ('met' if round(r['top1'], 2) >= goal else 'missed')  # as shown
        targets.append([f'mmLiT-{z.upper()} test top-1 ≥ {goal:g}%', measured, verdict])
    return (f"Measured by `python benchmarks/fashion_mnist_zoo.py zoo --out OUT` ({meta['hardware']}). "
            f"{meta['description']}.{state}\n\n" + zoo.size_table(data, sizes) + '\n\n'
            + _md(['target', 'measured', ''], targets))


def card_top1(name: str):
    """The test top-1 in the metadata of the shipped weight folder `name`'s model card (None if it states none)."""
    from timm_mlit._weights import WEIGHTS_DIR
    m = re.search(r'value: ([0-9.]+)\s+name: top1', (WEIGHTS_DIR / name / 'README.md').read_text().split('---')[1])
    return float(m.group(1)) if m else None


def checked_card_top1(name: str, top1: float, measured: str, rerun: str, also: bool = True) -> None:
    """Refuse a results file whose `top1` (what was `measured`) is not, to the 2 decimals the tables print, the test
    top-1 that shipped weights `name`'s model card states, or where `also` (the caller's other checks) fails: the file
    predates the weights now shipped (or measured something else), and the error names the command to `rerun`."""
    from timm_mlit._weights import WEIGHTS_DIR
    card = card_top1(name)
    if card is None:
        raise ReadmeTableError(f'the model card of {WEIGHTS_DIR / name} states no top-1: re-publish it with '
                               '--metric top1=...')
    if not also or f'{top1:.2f}' != f'{card:.2f}':
        raise ReadmeTableError(f'{measured} at {top1:.2f}%, where its model card says {card:.2f}% on the 10,000 test '
                               f'images: re-run `{rerun}`')


def shipped_weights_table(results: Path) -> str:
    """The weight folders shipped in the package (timm_mlit/weights/), each classifier's test top-1 as its model card
    states it, and the sizes that ship none. (Read from the package, not from `results`.)"""
    import timm

    from timm_mlit._weights import WEIGHTS_DIR
    rows, shipped = [], []
    for arch in MLIT_SIZES:
        for tag, what in (('mae_ft_fashion_mnist', f'mmLiT-{arch.split("_")[1].upper()}: MAE-pre-trained, then '
                                                   'fine-tuned'),
                          ('mae_in_fashion_mnist', 'the MAE-pre-trained encoder it was fine-tuned from')):
            card = WEIGHTS_DIR / f'{arch}.{tag}' / 'README.md'
            if not card.is_file():
                continue
            if f'{arch}.{tag}' not in timm.list_pretrained(f'{arch}.*'):
                raise ReadmeTableError(f'{card.parent} ships, but {arch}.{tag} has no pretrained cfg entry in '
                                       'timm_mlit/mlit.py')
            top1 = card_top1(f'{arch}.{tag}')
            if tag.startswith('mae_ft'):
                shipped.append(arch)
                default = f' (`{arch}`\'s default)' if timm.models.get_pretrained_cfg(arch).tag == tag else ''
                rows.append([f'`{arch}.{tag}`{default}', what, '10, with label names',
                             '-' if top1 is None else f'{top1:.2f}%'])
            else:
                rows.append([f'`{arch}.{tag}`', what, 'head-less', '-'])
    rest = [a for a in reversed(MLIT_SIZES) if a not in shipped]
    note = (f"\n\n{' and '.join(f'`{a}`' for a in rest)} ship{'s' if len(rest) == 1 else ''} no weights (default tag "
            "`.untrained`).") if rest else ''
    return _md(['tag', 'what', 'classes', 'Fashion-MNIST test top-1'], rows) + note


def _model_params(arch: str) -> int:
    import timm
    return sum(p.numel() for p in timm.create_model(arch).parameters())


def model_zoo_table(results: Path) -> str:
    """Every registered family's models with their input size, parameters with the default head, the weights
    `pretrained=True` loads with their model card's test top-1, and the MAE encoder shipped beside them. (Read from
    timm's registry and the package, not from `results`.)"""
    import timm
    rows = []
    params = {arch: _model_params(arch) for arch in MLIT_SIZES + timm.list_models('mobile_vmoe_*')}
    for arch in MLIT_SIZES + sorted(timm.list_models('mobile_vmoe_*'), key=params.get):
        cfg = timm.models.get_pretrained_cfg(arch)
        weights = f'{arch}.{cfg.tag}'
        shipped = weights in timm.list_pretrained(f'{arch}.*')
        encoder = f'{arch}.mae_in_fashion_mnist'
        top1 = card_top1(weights) if shipped and cfg.num_classes else None
        _, height, width = cfg.input_size
        rows.append([f'`{arch}`', f'{height}x{width}', f'{params[arch]:,} ({cfg.num_classes} classes)',
                     f'`{weights}`' if shipped else 'none', '-' if top1 is None else f'{top1:.2f}%',
                     f'`{encoder}`' if encoder in timm.list_pretrained(f'{arch}.*') else '-'])
    return _md(['model', 'input', 'params', '`pretrained=True` loads', 'Fashion-MNIST test top-1',
                'MAE encoder (head-less)'], rows)


def main_job_table(results: Path) -> str:
    """`python -m timm_mlit` on every classifier shipped in the package, from the main job's own results files
    (results/main_job_<arch>.json, written by `--results-file`): each is required, and must have measured those
    weights on the whole test set (10,000 images) at the top-1 their model card states, so a size re-published
    without re-measuring its job fails here."""
    from timm_mlit._weights import WEIGHTS_DIR

    rows, measured = [], {}  # measured: each run's setting -> the commands run in it
    for arch in MLIT_SIZES:
        name, stem = f'{arch}.mae_ft_fashion_mnist', f'main_job_{arch}'
        if not (WEIGHTS_DIR / name).is_dir():
            continue
        data = _load(results, stem)
        meta, r = data['meta'], data['result']
        checked_card_top1(name, r['top1'], f"{stem}.json measured {r['model']} on {r['images']:,d} images",
                          f'python -m timm_mlit --model {name} --results-file benchmarks/results/{stem}.json',
                          also=r['model'] == name and r['images'] == 10000)
        lo, hi = min(r['per_class'].items(), key=lambda kv: kv[1]), max(r['per_class'].items(), key=lambda kv: kv[1])
        rows.append([f'`{name}`', f"{r['top1']:.2f}%", f"{r['img_s']:,.0f}", f"{r['img_s_total']:,.0f}",
                     f'{lo[0]} {lo[1]:.2f}%', f'{hi[0]} {hi[1]:.2f}%'])
        setting = f"torch {meta['torch']}, {meta['machine']}, {meta['threads']} threads, batch {meta['batch_size']}"
        commands = measured.setdefault(setting, [])
        if f"`{meta['command']}`" not in commands:
            commands.append(f"`{meta['command']}`")
    said = [(', '.join(c[:-1]) + ' and ' if len(c) > 1 else '') + f'{c[-1]} ({setting})'
            for setting, c in measured.items()]
    return ('Measured by ' + '; '.join(said) + '.\n\n' + _md(
        ['weights (`pretrained=True`)', 'top-1, 10k test images', 'img/s (model)', 'img/s (with data loading)',
         'lowest class', 'highest class'], rows))


TABLES: Dict[str, Callable[[Path], str]] = {
    'model-zoo': model_zoo_table, 'shipped-weights': shipped_weights_table, 'main-job': main_job_table,
    'fashion-mnist-tune': fashion_mnist_tune_table, 'fashion-mnist-zoo': fashion_mnist_zoo_table,
    'cpu-paths': cpu_paths_table, 'cpu-precision': precision_table, 'pretrain-precision': pretrain_table,
    'edge': edge_table, 'cpu-targets': cpu_targets_table,
    'moe-layer-ranges': layer_ranges, 'models': models_table, 'speed-targets': targets_table,
    'moe-paths': paths_table, 'matmul-widths': widths_table, 'flops': flops_table, 'epoch-profile': epoch_profile_table,
}


def _block(name: str) -> re.Pattern:
    key = re.escape(name)
    return re.compile(rf'(<!-- begin table: {key} -->\n)(?:.*?\n)?(<!-- end table: {key} -->)', re.S)


def render(text: str, results: Path = RESULTS, names: Optional[Iterable[str]] = None, page: str = 'README.md') -> str:
    """`text` (the page `page`) with the tables `names` (default: all) between their markers rewritten from
    `results`."""
    for name in TABLES if names is None else names:
        pattern = _block(name)
        if not pattern.search(text):
            raise ReadmeTableError(f'{page} has no <!-- begin table: {name} --> ... <!-- end table: {name} --> block')
        body = TABLES[name](results)
        text = pattern.sub(lambda m: m.group(1) + body + '\n' + m.group(2), text)
    return text


def render_pages(results: Path = RESULTS) -> Dict[Path, Tuple[str, str]]:
    """{page: (its text, its text with its tables rewritten from `results`)} for README.md and docs/*.md; every table
    of TABLES must sit in exactly one page."""
    texts = {page: page.read_text() for page in pages()}
    holders = {name: [page for page, text in texts.items() if _block(name).search(text)] for name in TABLES}
    for name, found in holders.items():
        if len(found) != 1:
            where = ', '.join(_page_name(p) for p in found) or 'none of README.md and docs/*.md'
            raise ReadmeTableError(f'<!-- begin table: {name} --> ... <!-- end table: {name} --> must be in one page: '
                                   f'found in {where}')
    return {page: (text, render(text, results, [n for n, found in holders.items() if found == [page]],
                                _page_name(page)))
            for page, text in texts.items()}


@exit_on_error('readme_tables.py', (ReadmeTableError,))
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--check', action='store_true', help='only check that the tables are up to date')
    parser.add_argument('--results', type=checked(existing_folder), default=str(RESULTS),
                        help='folder of the benchmark JSON files')
    args = parser.parse_args(argv)
    rendered = render_pages(Path(args.results))
    stale = [_page_name(page) for page, (old, new) in rendered.items() if new != old]
    if args.check:
        if stale:
            fail('readme_tables.py', f'the tables of {", ".join(stale)} are not what the results give; run '
                                     'python benchmarks/readme_tables.py')
        return 0
    for page, (old, new) in rendered.items():
        if new != old:
            atomic_write(str(page), lambda f, new=new: f.write(new.encode()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
