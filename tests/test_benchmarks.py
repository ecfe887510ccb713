"""The benchmark scripts' own logic: the model specs, the on-device augmentation of the pre-training benchmark, and
a tiny run of each script that checks the files it writes."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from timm_mlit.layers import MOE_IMPLS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import matmul_widths  # noqa: E402
import models  # noqa: E402
import moe_layer  # noqa: E402
import pretrain_throughput  # noqa: E402


def test_full_crop_without_flip_is_a_plain_resize_and_normalise():
    imgs = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    out = pretrain_throughput.random_resized_crop_flip(imgs, 36, scale=(1., 1.), ratio=(1., 1.), hflip=0.)
    expected = F.interpolate(imgs.float() / 255., size=36, mode='bilinear', align_corners=False)
    assert torch.allclose(out, (expected - 0.5) / 0.5, atol=1e-5)


def test_flip_mirrors_and_crops_stay_inside_the_image():
    imgs = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    plain = pretrain_throughput.random_resized_crop_flip(imgs, 36, scale=(1., 1.), ratio=(1., 1.), hflip=0.)
    flipped = pretrain_throughput.random_resized_crop_flip(imgs, 36, scale=(1., 1.), ratio=(1., 1.), hflip=1.)
    assert torch.allclose(flipped, plain.flip(-1), atol=1e-5)
    torch.manual_seed(0)
    crops = pretrain_throughput.random_resized_crop_flip(torch.full((64, 3, 32, 32), 255, dtype=torch.uint8), 36)
    assert crops.shape == (64, 3, 36, 36) and torch.allclose(crops, torch.ones_like(crops))  # no border sampled


def test_moe_layer_benchmark_writes_ratios(tmp_path):
    moe_layer.main(['--models', 'mlit_xxs', '--layer-stride', '9', '--extra-experts', '8', '--impls', 'dense',
                    'sparse', '--batch', '2', '--repeats', '1', '--out', str(tmp_path)])
    result = json.loads((tmp_path / 'moe_layer_cpu_float32.json').read_text())
    shapes = {(r['hidden'], r['experts'], r['mode']) for r in result['rows']}
    assert shapes == {(81, 3, 'eval'), (81, 3, 'train'), (81, 8, 'eval'), (81, 8, 'train')}
    for row in result['rows']:
        assert row['dense/swiglu'] == pytest.approx(row['dense_ms'] / row['swiglu_ms'])
    assert (tmp_path / 'moe_layer_cpu_float32.md').read_text().count('\n| mlit_xxs |') == 4


def test_pretrain_benchmark_writes_images_per_second(tmp_path):
    pretrain_throughput.main(['--models', 'mlit_xxs', '--batch', '4', '--steps', '1', '--dataset-size', '16',
                              '--out', str(tmp_path)])
    rows = json.loads((tmp_path / 'pretrain_cpu_float32.json').read_text())['rows']
    assert rows[0]['model'] == 'mlit_xxs' and rows[0]['img_s'] > 0


def test_matmul_width_benchmark_pairs_each_width_with_its_padded_one(tmp_path):
    matmul_widths.main(['--rows', '64', '--dim', '8', '--widths', '30', '33', '--repeats', '1', '--out', str(tmp_path)])
    rows = json.loads((tmp_path / 'matmul_widths_cpu.json').read_text())['rows']
    assert [(r['width'], r['padded_width']) for r in rows] == [(30, 32), (31, 32), (32, 32), (33, 48)]
    same = next(r for r in rows if r['width'] == 32)
    assert same['ms'] == same['padded_ms'] and same['pad/plain'] == 1


@pytest.mark.parametrize('impl', MOE_IMPLS)
def test_a_spec_at_an_moe_impl_builds_the_model_with_that_impl(impl):
    model = models.build(f'mlit_xxs@{impl}')
    assert {blk.mlp.impl for blk in model.blocks} == {impl}


def test_the_one_expert_spec_routes_nothing_and_an_unknown_variant_is_an_error():
    model = models.build('mlit_xxs@one_expert')
    assert {(blk.mlp.gate.num_experts, blk.mlp.gate.top_k) for blk in model.blocks} == {(1, 1)}
    with pytest.raises(ValueError, match="unknown model variant 'mlit_xxs@fast'"):
        models.build('mlit_xxs@fast')


def test_default_specs_time_every_moe_impl_of_the_first_model_at_the_model_level():
    specs = models.default_specs(['mlit_xxs', 'mlit_xs'])
    assert {f'mlit_xxs@{impl}' for impl in ('dense', 'sparse', 'loop')} <= set(specs)
    assert {'mlit_xxs@one_expert', 'mlit_xs@one_expert', 'vit_twin@mlit_xs'} <= set(specs)


def test_models_benchmark_writes_each_spec_and_its_ratios(tmp_path):
    models.main(['--specs', 'mlit_xxs', 'mlit_xxs@loop', 'mlit_xxs@one_expert', '--batch', '2', '--train-batch', '2',
                 '--repeats', '1', '--no-memory', '--out', str(tmp_path)])
    rows = {r['model']: r for r in json.loads((tmp_path / 'models_cpu_float32.json').read_text())['rows']}
    assert list(rows) == ['mlit_xxs', 'mlit_xxs@loop', 'mlit_xxs@one_expert']
    xxs = rows['mlit_xxs']
    assert xxs['eval_vs_loop'] == pytest.approx(xxs['eval_img_s'] / rows['mlit_xxs@loop']['eval_img_s'])
    assert xxs['train_vs_one_expert'] == pytest.approx(xxs['train_img_s'] / rows['mlit_xxs@one_expert']['train_img_s'])


def test_models_benchmark_in_several_precisions_gives_each_models_best_against_its_vit_twin(tmp_path):
    models.main(['--specs', 'mlit_xxs', 'vit_twin@mlit_xxs', '--amp-dtype', 'float32', 'bfloat16', '--batch', '2',
                 '--train-batch', '2', '--repeats', '1', '--no-memory', '--out', str(tmp_path)])
    rows = json.loads((tmp_path / 'models_cpu_float32_bfloat16.json').read_text())['rows']
    runs = {(r['spec'], r['precision']): r for r in rows if r['precision'] != 'best'}
    assert set(runs) == {(s, p) for s in ('mlit_xxs', 'vit_twin@mlit_xxs') for p in ('float32', 'bfloat16')}
    best = {r['model']: r for r in rows if r['precision'] == 'best'}
    mlit, vit = best['mlit_xxs'], best['vit_twin@mlit_xxs']
    assert mlit['train_img_s'] == max(runs['mlit_xxs', p]['train_img_s'] for p in ('float32', 'bfloat16'))
    assert mlit['latency_b1_ms'] == min(runs['mlit_xxs', p]['latency_b1_ms'] for p in ('float32', 'bfloat16'))
    assert runs['mlit_xxs', mlit['train_precision']]['train_img_s'] == mlit['train_img_s']
    assert mlit['train_vs_vit'] == mlit['train_img_s'] / vit['train_img_s']
    assert mlit['latency_b1_vs_vit'] == mlit['latency_b1_ms'] / vit['latency_b1_ms']


def test_torch_dropout_variant_is_the_model_with_pytorchs_dropout():
    from timm_mlit.layers.dropout import Dropout
    model = models.build('mlit_xxs@torch_dropout')
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and not any(isinstance(m, Dropout) for m in drops)
    assert any(isinstance(m, Dropout) for m in models.build('mlit_xxs').modules())


def test_pretrain_benchmark_compares_precisions_in_one_run(tmp_path, monkeypatch):
    monkeypatch.setenv('TIMM_MLIT_PRECISION', 'bfloat16')
    pretrain_throughput.main(['--models', 'mlit_xxs', '--batch', '4', '--steps', '1', '--dataset-size', '16',
                              '--amp-dtype', 'previous', 'auto', '--out', str(tmp_path)])
    rows = json.loads((tmp_path / 'pretrain_cpu_previous_auto.json').read_text())['rows']
    assert [(r['precision'], r['autocast']) for r in rows] == [('previous', 'None'), ('auto', 'bfloat16')]
    assert rows[0]['vs_previous'] == 1 and rows[1]['vs_previous'] == rows[1]['img_s'] / rows[0]['img_s']


def test_cpu_paths_benchmark_times_each_piece_against_its_alternative(tmp_path):
    import cpu_paths

    import timm_mlit.layers.ops.cpu_attention as cpu_attention
    import timm_mlit.layers.ops.sorted_mix as sorted_mix
    before = cpu_attention.CHUNK_BYTES, sorted_mix.ROW_GRANULE
    cpu_paths.main(['--batch', '2', '--repeats', '1', '--out', str(tmp_path)])
    assert (cpu_attention.CHUNK_BYTES, sorted_mix.ROW_GRANULE) == before  # the block sizes are put back
    rows = json.loads((tmp_path / 'cpu_paths_cpu.json').read_text())['rows']
    cases = [r['case'] for r in rows]
    assert cases[0] == 'attention: SDPA float32' and 'dropout 0.1: MaskDropout' in cases
    padded = f'padded ({sorted_mix.ROW_GRANULE} rows)'
    assert cases[-6:] == ["mlit_xxs training step, bfloat16: moe_impl='dense'",
                          "mlit_xxs training step, bfloat16: moe_impl='sparse'",
                          'mlit_s training step, bfloat16: MoE blocks unpadded',
                          f'mlit_s training step, bfloat16: MoE blocks {padded}',
                          'mlit_s training step, float32: MoE blocks unpadded',
                          f'mlit_s training step, float32: MoE blocks {padded}']
    assert all(r['ms'] > 0 for r in rows) and rows[0]['vs_first_of_group'] == 1


def test_flops_benchmark_counts_the_attention_products_and_the_ceiling_against_the_twin(tmp_path):
    import flops
    assert flops.main(['--specs', 'mlit_xxs@sparse', 'vit_twin@mlit_xxs', '--batch', '2', '--out', str(tmp_path)]) == 0
    rows = {r['model']: r for r in json.loads((tmp_path / 'flops.json').read_text())['rows']}
    # the twin by hand: per layer and token qkv, proj and the MLP (ratio 2) are 16 d^2, the two attention products
    # 4 N d; then the patch embedding (144 patches of 3x3x3) and the 100-class head
    d, depth, n = 108, 9, 145
    vit = depth * n * (16 * d * d + 4 * n * d) + 144 * 2 * 27 * d + 2 * d * 100
    twin, mlit = rows['vit_twin@mlit_xxs'], rows['mlit_xxs@sparse']
    assert twin['eval_mflop'] == pytest.approx(vit / 1e6, abs=0.01)
    assert twin['train_mflop'] == pytest.approx(3 * vit / 1e6, rel=0.005)  # backward: two products per forward one
    assert mlit['eval_mflop'] < twin['eval_mflop'] and mlit['train_mflop'] < twin['train_mflop']
    assert mlit['eval_ceiling_vs_vit'] == pytest.approx(twin['eval_mflop'] / mlit['eval_mflop'], rel=1e-3)
    assert 'eval_ceiling_vs_vit' not in twin


# --- every script refuses bad arguments in one line, before it builds a model or writes a file ---

BENCHMARKS = Path(__file__).resolve().parents[1] / 'benchmarks'
UNDER_A_FILE = '{file}/out'  # a folder that cannot be made: its parent is a regular file
IS_A_FILE = 'is a file, not a folder'
BAD_ARGUMENTS = {  # script: [(arguments, what its error says), ...]
    'cpu_paths': [(['--out', UNDER_A_FILE], IS_A_FILE), (['--batch', '0'], 'argument --batch: must be >= 1, got 0'),
                  (['--repeats', 'x'], "argument --repeats: 'x' is not an integer")],
    'edge': [(['--out', UNDER_A_FILE], IS_A_FILE), (['--data-dir', '{empty}'], 'no idx files in {empty}'),
             (['--data-dir', '{file}'], '{file} is a file, not a folder'),
             (['--limit', '-1'], 'argument --limit: must be >= 0'), (['--repeats', '0'], 'argument --repeats')],
    'epoch_profile': [(['--out', UNDER_A_FILE], IS_A_FILE), (['--data-dir', '{empty}'], 'no idx files in {empty}'),
                      (['--recipe', 'no/such_recipe'], "'no/such_recipe' is neither a file nor a recipe name"),
                      (['--recipe', '{file}'], 'is not a train.py recipe: it sets no model, num_classes')],
    'flops': [(['--out', UNDER_A_FILE], IS_A_FILE), (['--specs', 'bogus'], "argument --specs: unknown model 'bogus'"),
              (['--specs', 'mlit_xxs@fast'], "unknown model variant 'mlit_xxs@fast'"),
              (['--specs', 'vit_twin@resnet18'], 'vit_twin@resnet18'), (['--batch', '0'], 'argument --batch')],
    'matmul_widths': [(['--out', UNDER_A_FILE], IS_A_FILE), (['--widths', '100', '24'], 'FIRST must not be larger'),
                      (['--device', 'bogus'], "argument --device: 'bogus' is not a device"),
                      (['--rows', '0'], 'argument --rows: must be >= 1')],
    'models': [(['--out', UNDER_A_FILE], IS_A_FILE), (['--specs', 'bogus'], "unknown model 'bogus'"),
               (['--specs', 'resnet18@sparse'], 'resnet18@sparse'),
               (['--models', 'bogus'], "argument --models: invalid choice: 'bogus'"),
               (['--device', 'bogus'], "'bogus' is not a device"),
               (['--amp-dtype', 'bogus'], "argument --amp-dtype: invalid choice: 'bogus'"),
               (['--train-batch', '0'], 'argument --train-batch')],
    'moe_layer': [(['--out', UNDER_A_FILE], IS_A_FILE), (['--dtype', 'bogus'], "argument --dtype: invalid choice"),
                  (['--models', 'bogus'], "argument --models: invalid choice: 'bogus'"),
                  (['--impls', 'bogus'], "argument --impls: invalid choice: 'bogus'"),
                  (['--device', 'bogus'], "'bogus' is not a device"), (['--layer-stride', '0'], '--layer-stride'),
                  (['--extra-experts', '1'], '--extra-experts 1: fewer experts than the 2 each token goes to')],
    'moe_paths': [(['--out', UNDER_A_FILE], IS_A_FILE), (['--models', 'bogus'], "invalid choice: 'bogus'"),
                  (['--train-batch', '0'], 'argument --train-batch')],
    'pretrain_throughput': [(['--out', UNDER_A_FILE], IS_A_FILE), (['--models', 'bogus'], "invalid choice: 'bogus'"),
                            (['--device', 'bogus'], "'bogus' is not a device"),
                            (['--amp-dtype', 'bogus'], "argument --amp-dtype: invalid choice: 'bogus'"),
                            (['--dataset-size', '0'], 'argument --dataset-size')],
    'mobile_vmoe_sizes': [(['--out', UNDER_A_FILE], IS_A_FILE),
                          (['--models', 'mlit_xxs'], 'not a registered Mobile V-MoE model: mlit_xxs')],
    'readme_tables': [(['--results', '{file}'], IS_A_FILE), (['--results', '{empty}/missing'], 'does not exist')],
    'mobile_vmoe_fashion_mnist': [
        (['--out', UNDER_A_FILE], IS_A_FILE), (['--out', 'o', '--results', UNDER_A_FILE], IS_A_FILE),
        (['--out', 'o', '--data-dir', '{empty}'], '{empty}/train-images-idx3-ubyte.gz'),
        (['--out', 'o', '--data-dir', '{empty}/missing'], '{empty}/missing'),
        (['--out', 'o', '--jobs', '0'], 'argument --jobs'), (['--out', 'o', '-E', '1'], 'argument --num-superclasses'),
        (['--out', 'o', '--holdout', '0'], 'argument --holdout')],
    'fashion_mnist': [
        (['--out', UNDER_A_FILE], IS_A_FILE), (['--out', 'o', '--results-dir', UNDER_A_FILE], IS_A_FILE),
        (['--out', 'o', '--data-dir', '{empty}', '--timm-scripts', '{scripts}'], 'train-images-idx3-ubyte[.gz] not '
                                                                                 'found in {empty}'),
        (['--out', 'o', '--data-dir', '{file}', '--timm-scripts', '{scripts}'], '{file} is a file, not a folder'),
        (['--out', 'o', '--device', 'bogus'], "'bogus' is not a device"), (['--out', 'o', '-j', '-1'], '--workers')],
    'fashion_mnist_zoo': [
        (['tune', '--out', UNDER_A_FILE], IS_A_FILE), (['zoo', '--out', 'o', '--results-dir', UNDER_A_FILE], IS_A_FILE),
        (['publish', '--out', 'o', '--weights-dir', UNDER_A_FILE], IS_A_FILE),
        (['tune', '--out', 'o', '--data-dir', '{empty}', '--timm-scripts', '{scripts}'],
         'train-images-idx3-ubyte[.gz] not found in {empty}'),
        (['tune', '--out', 'o', '--device', 'bogus'], "'bogus' is not a device"),
        (['tune', '--out', 'o', '-j', '-1'], '--workers'), (['tune', '--out', 'o', '--holdout', '0'], '--holdout')],
}
CASES = [(script, args, said) for script, cases in BAD_ARGUMENTS.items() for args, said in cases]


@pytest.fixture
def bad_places(tmp_path, monkeypatch):
    """The working folder, holding a regular file, an empty folder and a folder with (empty) train.py and
    validate.py; returns the names the cases' '{...}' fields take and what the folder holds."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'afile').write_text('x')
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'scripts').mkdir()
    for name in ('train.py', 'validate.py'):
        (tmp_path / 'scripts' / name).write_text('')
    places = dict(file=str(tmp_path / 'afile'), empty=str(tmp_path / 'empty'), scripts=str(tmp_path / 'scripts'))
    return places, sorted(str(p) for p in tmp_path.rglob('*'))


def test_every_benchmark_script_has_bad_argument_cases():
    scripts = {p.stem for p in BENCHMARKS.glob('*.py')} - {'common'}
    assert scripts == set(BAD_ARGUMENTS)


@pytest.mark.parametrize('script, args, said', CASES, ids=[f'{s}:{" ".join(a)}' for s, a, _ in CASES])
def test_bad_arguments_end_a_benchmark_in_one_line_before_it_makes_anything(bad_places, capsys, monkeypatch, script,
                                                                            args, said):
    import importlib
    places, before = bad_places
    main = importlib.import_module(script).main
    monkeypatch.setattr(sys, 'argv', [str(BENCHMARKS / f'{script}.py')])  # (argparse's prog)
    with pytest.raises(SystemExit) as e:
        main([a.format(**places) for a in args])
    assert e.value.code not in (0, None)
    # parser.error prints the usage and `<prog>: error: ...` (status 2); cli.fail raises with the line (status 1)
    last = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f'{script}.py: error: ') and said.format(**places) in last, last
    assert sorted(str(p) for p in Path(places['file']).parent.rglob('*')) == before  # nothing made


@pytest.mark.parametrize('script, args, said', [
    ('mobile_vmoe_fashion_mnist', ['--out', 'o', '--data-dir', '{empty}'], 'train-images-idx3-ubyte.gz'),
    ('matmul_widths', ['--widths', '100', '24'], 'FIRST must not be larger than LAST'),
    ('moe_layer', ['--dtype', 'bogus'], "invalid choice: 'bogus'"),
    ('models', ['--specs', 'bogus'], "unknown model 'bogus'"),
    ('cpu_paths', ['--out', UNDER_A_FILE], IS_A_FILE),
])
def test_a_benchmark_run_with_bad_arguments_exits_with_one_line_and_leaves_nothing(bad_places, script, args, said):
    import subprocess
    places, before = bad_places
    r = subprocess.run([sys.executable, str(BENCHMARKS / f'{script}.py'), *(a.format(**places) for a in args)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and 'Traceback' not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f'{script}.py: error: ') and said in last, r.stderr
    assert sorted(str(p) for p in Path(places['file']).parent.rglob('*')) == before
