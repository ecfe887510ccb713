"""The tables of README.md and docs/*.md are what benchmarks/readme_tables.py writes from the committed results
(benchmarks/results/*.json), the shipped model cards and the registered models: a table not regenerated after a
benchmark re-run fails here."""
import json
import sys
from pathlib import Path

import pytest
import timm
from readme import PAGES, page

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import readme_tables  # noqa: E402


def test_the_tables_of_every_page_are_what_the_committed_results_give():
    rendered = readme_tables.render_pages()
    assert {p.relative_to(readme_tables.REPO).as_posix() for p in rendered} >= {'README.md', 'docs/results.md',
                                                                                  'docs/performance.md'}
    for path, (text, new) in rendered.items():
        assert new == text, f'{path}: run python benchmarks/readme_tables.py'


def test_a_results_file_missing_a_model_row_is_rejected_naming_it(tmp_path):
    row = dict(params=1, latency_b1_ms=1., eval_img_s=1., train_img_s=1., train_peak_mib=1.)
    rows = [dict(row, model=spec) for spec in readme_tables.MODEL_ROWS if spec != 'mlit_xxs@dense']
    meta = dict(command='python benchmarks/models.py', torch='2', machine='cpu')
    (tmp_path / 'models_cpu_float32.json').write_text(json.dumps(dict(meta=meta, rows=rows)))
    missing = r'models_cpu_float32\.json has no row for mlit_xxs@dense:'
    with pytest.raises(readme_tables.ReadmeTableError, match=missing):
        readme_tables.models_table(tmp_path)
    rows.append(dict(row, model='mlit_xxs@dense'))
    (tmp_path / 'models_cpu_float32.json').write_text(json.dumps(dict(meta=meta, rows=rows)))
    assert "mlit_xxs, `moe_impl='dense'`" in readme_tables.models_table(tmp_path)


def _pages_in(tmp_path, monkeypatch, edit=lambda text: text):
    """README.md and docs/*.md copied into tmp_path, `edit` applied to docs/performance.md (where the models table
    lives), and readme_tables pointed at the copies."""
    (tmp_path / 'docs').mkdir(exist_ok=True)
    for name, text in PAGES.items():
        (tmp_path / name).write_text(edit(text) if name == 'docs/performance.md' else text)
    monkeypatch.setattr(readme_tables, 'README', tmp_path / 'README.md')
    monkeypatch.setattr(readme_tables, 'DOCS', tmp_path / 'docs')


def test_a_table_in_no_page_or_in_two_is_rejected(tmp_path, monkeypatch):
    with pytest.raises(readme_tables.ReadmeTableError, match='no <!-- begin table: models -->'):
        readme_tables.render(page('docs/performance.md').replace('<!-- begin table: models -->', ''),
                             names=['models'])
    _pages_in(tmp_path, monkeypatch, lambda text: text.replace('<!-- begin table: models -->', ''))
    with pytest.raises(readme_tables.ReadmeTableError, match='table: models --> must be in one page: found in none'):
        readme_tables.render_pages()
    _pages_in(tmp_path, monkeypatch)
    (tmp_path / 'docs' / 'twice.md').write_text('<!-- begin table: flops -->\n<!-- end table: flops -->\n')
    with pytest.raises(readme_tables.ReadmeTableError, match='flops --> must be in one page: found in .*performance'):
        readme_tables.render_pages()


@pytest.mark.slow
def test_check_exits_with_one_error_line_naming_the_page_whose_table_is_stale(tmp_path, monkeypatch):
    _pages_in(tmp_path, monkeypatch,
              lambda text: text.replace('<!-- end table: models -->', '| stale |\n<!-- end table: models -->'))
    with pytest.raises(SystemExit) as exit_:
        readme_tables.main(['--check'])
    assert str(exit_.value).startswith('readme_tables.py: error: the tables of ')
    assert 'performance.md' in str(exit_.value) and 'README' not in str(exit_.value)
    assert readme_tables.main([]) == 0  # rewritten in place: the check passes
    assert readme_tables.main(['--check']) == 0


def _cpu_results(tmp_path, mlit_train, vit_train, old_train=100., int8_top1=84.0):
    meta = dict(command='python benchmarks/x.py', torch='2', machine='cpu', images=10)

    def run(spec, precision, train, eval_=300., lat=10.):
        return dict(model=f'{spec} [{precision}]', spec=spec, precision=precision, params=1, latency_b1_ms=lat,
                    eval_img_s=eval_, train_img_s=train)
    runs = [run('mlit_xxs', 'float32', 100.), run('mlit_xxs', 'bfloat16', mlit_train, 800., 9.),
            run('mlit_xxs@torch_dropout', 'float32', old_train), run('mlit_xxs@torch_dropout', 'bfloat16', 90.),
            run('vit_twin@mlit_xxs', 'float32', vit_train, 300., 9.5), run('vit_twin@mlit_xxs', 'bfloat16', 10.)]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
    from models import add_best_precision
    rows = runs + add_best_precision(runs, ['float32', 'bfloat16'])
    (tmp_path / 'models_cpu_float32_bfloat16.json').write_text(json.dumps(dict(meta=meta, rows=rows)))
    pre = [dict(model='mlit_xxs', precision='previous', autocast='None', img_s=100., vs_previous=1.),
           dict(model='mlit_xxs', precision='auto', autocast='bfloat16', img_s=190., vs_previous=1.9)]
    (tmp_path / 'pretrain_cpu_previous_auto.json').write_text(json.dumps(dict(meta=meta, rows=pre)))
    edge = [dict(model='mlit_xxs', route=r, test_top1=t, top1_vs_eager_float32=t - 84.3, latency_b1_ms=5., img_s=1.)
            for r, t in (('eager float32', 84.3), ('onnxruntime int8', int8_top1))]
    (tmp_path / 'edge_cpu.json').write_text(json.dumps(dict(meta=meta, rows=edge)))


def test_edge_table_refuses_results_of_other_weights_than_the_shipped(tmp_path):
    card = readme_tables.card_top1('mlit_xxs.mae_ft_fashion_mnist')
    meta = dict(command='python benchmarks/edge.py --out benchmarks/results', torch='2', machine='cpu', images=10000,
                weights='mae_ft_fashion_mnist')
    rows = [dict(model='mlit_xxs', route='eager float32', test_top1=card, top1_vs_eager_float32=0., latency_b1_ms=5.,
                 img_s=100.)]
    (tmp_path / 'edge_cpu.json').write_text(json.dumps(dict(meta=meta, rows=rows)))
    assert f'| mlit_xxs | eager float32 | {card:.2f} (+0.00) |' in readme_tables.edge_table(tmp_path)
    rows[0]['test_top1'] = card - 0.01  # measured on weights published before these
    (tmp_path / 'edge_cpu.json').write_text(json.dumps(dict(meta=meta, rows=rows)))
    with pytest.raises(readme_tables.ReadmeTableError, match=r'its model card says .*: re-run `python benchmarks/edge'):
        readme_tables.edge_table(tmp_path)


def test_checked_card_top1_refuses_a_card_without_top1(tmp_path, monkeypatch):
    monkeypatch.setattr(readme_tables, 'card_top1', lambda name: None)  # a card published without --metric top1=
    with pytest.raises(readme_tables.ReadmeTableError, match='states no top-1: re-publish it with --metric top1='):
        readme_tables.checked_card_top1('mlit_xxs.mae_ft_fashion_mnist', 91.62, 'edge_cpu.json measured it',
                                        'python benchmarks/edge.py')


def _verdicts(tmp_path):
    lines = readme_tables.cpu_targets_table(tmp_path).splitlines()[2:]
    return [line.rstrip(' |').rsplit('| ', 1)[-1] for line in lines]


def test_cpu_targets_compare_each_models_best_precision(tmp_path):
    _cpu_results(tmp_path, mlit_train=200., vit_train=100.)  # every goal reached
    assert _verdicts(tmp_path) == ['met'] * 6
    # training 1.5x the twin's best, the float32 path 1/1.2 of the previous one, int8 0.8 points down
    _cpu_results(tmp_path, mlit_train=150., vit_train=100., old_train=120., int8_top1=83.5)
    assert _verdicts(tmp_path) == ['missed', 'met', 'met', 'met', 'missed', 'missed']
    assert '1.50× (150 img/s in bfloat16 vs 100 in float32)' in readme_tables.cpu_targets_table(tmp_path)


def test_zoo_table_marks_each_sizes_accuracy_target_met_missed_or_open(tmp_path):
    def row(key, top1, epochs):
        return dict(key=key, top1=top1, epochs=epochs, params=1000, wall_s=3600., pretrain_wall_s=1800.,
                    train_wall_s=1800., pretrain_img_s=100., train_img_s=80., test_img_s=300.)
    meta = dict(hardware='2 CPU cores', description='mmLiT and mLiT', complete=False,
                schedule={z: dict(pretrain_epochs=p, epochs=e) for z, (p, e) in
                          (('xxs', (10, 20)), ('xs', (8, 12)), ('s', (5, 6)))})
    rows = [row('mmlit_xxs', 91.2, 20), row('mmlit_xs', 90.1, 12)]
    (tmp_path / 'fashion_mnist_zoo.json').write_text(json.dumps(dict(meta=meta, rows=rows)))
    table = readme_tables.fashion_mnist_zoo_table(tmp_path)
    assert 'Incomplete: 2 of 6 runs so far.' in table
    targets = table.split('| target | measured |  |')[1]
    assert '| mmLiT-XXS test top-1 ≥ 91% | 91.20 after 20 fine-tuning epochs | met |' in targets
    assert '| mmLiT-XS test top-1 ≥ 91.5% | 90.10 after 12 fine-tuning epochs | missed |' in targets
    assert '| mmLiT-S test top-1 ≥ 92% | not run yet | open |' in targets
    assert '| XXS | 1,000 | 10 + 20 / 20 | 91.20 | not run yet |' in table  # the zoo's own size table
    rows[0]['top1'] = 90.9999999  # validate.py's float: judged as shown, not against its last digits
    (tmp_path / 'fashion_mnist_zoo.json').write_text(json.dumps(dict(meta=meta, rows=rows)))
    assert '| mmLiT-XXS test top-1 ≥ 91% | 91.00 after 20 fine-tuning epochs | met |' in \
        readme_tables.fashion_mnist_zoo_table(tmp_path)


def test_model_zoo_lists_every_registered_family_with_its_input_and_its_shipped_weights():
    table = readme_tables.model_zoo_table(Path('unused'))
    for arch in timm.list_models('mlit_*') + timm.list_models('mobile_vmoe_*'):
        cfg = timm.models.get_pretrained_cfg(arch)
        row = next(line for line in table.splitlines() if line.startswith(f'| `{arch}` |'))
        assert f"| {cfg.input_size[1]}x{cfg.input_size[2]} |" in row
        if cfg.file:
            top1 = readme_tables.card_top1(f'{arch}.{cfg.tag}')
            assert f'| `{arch}.{cfg.tag}` | {top1:.2f}% | `{arch}.mae_in_fashion_mnist` |' in row
        else:
            assert row.endswith('| none | - | - |')


def test_shipped_weights_table_reads_the_cards_and_refuses_a_folder_without_a_cfg_entry(tmp_path, monkeypatch):
    from timm_mlit import _weights
    table = readme_tables.shipped_weights_table(tmp_path)
    for card in _weights.WEIGHTS_DIR.glob('*.mae_ft_fashion_mnist/README.md'):
        name = card.parent.name
        top1 = float(card.read_text().split('value: ')[1].split()[0])
        assert f'| `{name}` (`{name.split(".")[0]}`\'s default) |' in table and f'| {top1:.2f}% |' in table
    folder = tmp_path / 'mlit_s.mae_ft_fashion_mnist'  # a folder published without its entry in timm_mlit/mlit.py
    folder.mkdir()
    (folder / 'README.md').write_text('---\nvalue: 90.0\n  name: top1\n---\n')
    monkeypatch.setattr(_weights, 'WEIGHTS_DIR', tmp_path)
    registered = timm.list_pretrained  # as if mlit.py had no entry for it, whether or not the package ships one
    monkeypatch.setattr(timm, 'list_pretrained',
                        lambda *a, **kw: [n for n in registered(*a, **kw) if n != 'mlit_s.mae_ft_fashion_mnist'])
    with pytest.raises(readme_tables.ReadmeTableError, match='mlit_s.mae_ft_fashion_mnist has no pretrained cfg'):
        readme_tables.shipped_weights_table(tmp_path)


def test_main_job_table_needs_each_shipped_classifiers_job_on_the_whole_test_set(tmp_path):
    from timm_mlit._weights import WEIGHTS_DIR
    shipped = [f'{a}.mae_ft_fashion_mnist' for a in readme_tables.MLIT_SIZES
               if (WEIGHTS_DIR / f'{a}.mae_ft_fashion_mnist').is_dir()]
    first, arch = shipped[0], shipped[0].split('.')[0]
    with pytest.raises(readme_tables.ReadmeTableError, match=f'main_job_{arch}.json is missing'):
        readme_tables.main_job_table(tmp_path)
    meta = dict(command='python -m timm_mlit', torch='2.x', machine='AMD EPYC', threads=2, batch_size=256)

    def write(name, **changes):
        result = dict(model=name, images=10000, top1=readme_tables.card_top1(name), img_s=259.4, img_s_total=250.2,
                      per_class={'Shirt': 50., 'Trouser': 95.7, 'Bag': 90.})
        path = tmp_path / f'main_job_{name.split(".")[0]}.json'
        path.write_text(json.dumps(dict(meta=meta, result=dict(result, **changes))))

    for name in shipped:
        write(name)
    table = readme_tables.main_job_table(tmp_path)
    top1 = readme_tables.card_top1(first)
    assert f'| `{first}` | {top1:.2f}% | 259 | 250 | Shirt 50.00% | Trouser 95.70% |' in table
    assert table.startswith('Measured by `python -m timm_mlit` (torch 2.x, AMD EPYC, 2 threads, batch 256)')
    assert table.count('\n| `') == len(shipped)
    if len(shipped) > 1:  # each size's own command, the setting they share said once
        meta['command'] = f'python -m timm_mlit --model {shipped[1].split(".")[0]}'
        write(shipped[1])
        assert readme_tables.main_job_table(tmp_path).startswith(
            f'Measured by `python -m timm_mlit` and `{meta["command"]}` (torch 2.x, AMD EPYC, 2 threads, batch 256).')
        meta['command'] = 'python -m timm_mlit'
    # refused, naming the fix: another top-1 (a size re-published since), a part of the test set, other weights
    for changes in (dict(top1=top1 - 1.), dict(images=1000), dict(model=first.replace('mae_ft', 'other'))):
        write(first, **changes)
        with pytest.raises(readme_tables.ReadmeTableError, match=f'card says {top1:.2f}% on the 10,000 test images: '
                                                                 f're-run `python -m timm_mlit --model {first} '):
            readme_tables.main_job_table(tmp_path)
