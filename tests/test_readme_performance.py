"""The README's performance figures are the committed benchmark results (benchmarks/results/*.json), not typed in:
each table cell and each figure of the targets table is recomputed here from the JSON the command wrote."""
import json
import re
from pathlib import Path

import pytest
from readme import README

RESULTS = Path(__file__).resolve().parents[1] / 'benchmarks' / 'results'
LAYER = json.loads((RESULTS / 'moe_layer_cpu_float32.json').read_text())
MODELS = json.loads((RESULTS / 'models_cpu_float32.json').read_text())
IMPLS = ('auto', 'dense', 'sparse', 'loop')


def _table(name: str):
    """Rows (lists of cells) of the markdown table after `<!-- table: name -->`, header and rule left out."""
    block = README.split(f'<!-- table: {name} -->\n', 1)[1].split('\n\n', 1)[0]
    return [[c.strip() for c in line.strip('|').split('|')] for line in block.splitlines()[2:]]


def _range(rows, impl):
    values = [r[f'{impl}/swiglu'] for r in rows]
    return f'{min(values):.2f}–{max(values):.2f}'


def _shapes(experts: int, mode: str):
    return [r for r in LAYER['rows'] if r['experts'] == experts and r['mode'] == mode]


def test_layer_range_table_is_the_committed_benchmark():
    table = _table('moe-layer-ranges')
    assert len(table) == 7
    for row, (experts, mode) in zip(table, [(e, m) for e in (3, 4, 5) for m in ('eval', 'train')]):
        assert row[0].startswith(f'{experts} experts') and row[1].startswith(mode), row
        assert row[2:] == [_range(_shapes(experts, mode), impl) for impl in IMPLS], row
    wide = [r for r in LAYER['rows'] if r['experts'] > 5 and r['mode'] == 'train']
    assert table[6][2:] == [' / '.join(f"{r[f'{impl}/swiglu']:.2f}" for r in wide) for impl in IMPLS]
    assert f"`{LAYER['meta']['command']}`" in README


def _fmt_rate(v: float) -> str:
    return f'{v:.1f}' if v < 100 else f'{v:,.0f}'


def test_models_table_is_the_committed_benchmark():
    rows = {r['model']: r for r in MODELS['rows']}
    order = ['mlit_xxs', 'mlit_xxs@sparse', 'mlit_xxs@loop', 'mlit_xxs@dense', 'vit_twin@mlit_xxs', 'resnet10t',
             'mobilenetv3_small_050']
    table = _table('models')
    assert len(table) == len(order)
    for cells, spec in zip(table, order):
        r = rows[spec]
        assert cells[1:] == [f"{r['params']:,}", f"{r['latency_b1_ms']:.1f}", _fmt_rate(r['eval_img_s']),
                             _fmt_rate(r['train_img_s']), f"{r['train_peak_mib']:,.0f}"], spec
    command = ' '.join(README.split('growth of a training step): `', 1)[1].split('`', 1)[0].split())
    assert command == MODELS['meta']['command']


@pytest.mark.parametrize('figure', ['eval_vs_loop', 'eval_vs_dense_twin', 'train_vs_dense_twin'])
def test_targets_table_quotes_the_model_ratios(figure):
    xxs = {r['model']: r for r in MODELS['rows']}['mlit_xxs']
    assert f'| {xxs[figure]:.2f}× (' in README


def test_targets_table_quotes_the_worst_layer_and_every_one_over_the_target():
    rows = [r for r in LAYER['rows'] if r['mode'] == 'train' and r['experts'] <= 5]
    over = [r for r in rows if r['auto/swiglu'] > 1.3]
    worst = max(rows, key=lambda r: r['auto/swiglu'])
    line = next(line for line in README.splitlines() if line.startswith('| MoE layer fwd+bwd ≤ 1.3×'))
    assert f"max {worst['auto/swiglu']:.2f} ({worst['model']}'s" in line
    if over:
        assert f'over 1.3 on {len(over)} of the {len(rows)} shapes' in line
        for r in over:
            assert re.search(rf"\(hidden {r['hidden']}\) {r['auto/swiglu']:.2f}", line), r
    else:
        assert f'met on all {len(rows)} shapes in this run' in line


def test_prose_figures_are_the_committed_benchmarks():
    widths = {r['width']: r for r in json.loads((RESULTS / 'matmul_widths_cpu.json').read_text())['rows']}
    quoted = re.findall(r'(\d+\.\d+) ms at (\d+) columns against (\d+\.\d+) ms at (\d+)|'
                        r'(\d+\.\d+) ms at (\d+) against (\d+\.\d+) ms at (\d+), for', README)
    assert len(quoted) == 2
    for groups in quoted:
        plain_ms, width, padded_ms, padded = [g for g in groups if g]
        row = widths[int(width)]
        assert f"{row['ms']:.2f}" == plain_ms and f"{row['padded_ms']:.2f}" == padded_ms
        assert row['padded_width'] == int(padded)
    train = [r for r in LAYER['rows'] if r['mode'] == 'train']
    noise = max(abs(r['auto/swiglu'] - r['sparse/swiglu']) for r in train)
    assert f'in training up to {noise:.2f} at one shape in this run' in README
    rows = {r['model']: r for r in MODELS['rows']}
    dense_vs_loop = rows['mlit_xxs@dense']['eval_img_s'] / rows['mlit_xxs@loop']['eval_img_s']
    assert f"runs {dense_vs_loop:.2f}× `'loop'` ({rows['mlit_xxs@dense']['eval_img_s']:.0f} img/s)" in README
