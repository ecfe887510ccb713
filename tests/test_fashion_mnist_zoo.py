"""benchmarks/fashion_mnist_zoo.py: the held-out split, the pilots' plan (like for like, never the test set), the
validation curves and table, and resuming, with a fake runner in place of timm's scripts; timm_mlit.plots'
read_column / plot_metric."""
import argparse
import csv
import importlib.util
import json
import os
import shlex

import numpy as np
import pytest
import torch
from readme import snippet

from timm_mlit.data import IdxFashionMNIST, write_idx
from timm_mlit.plots import plot_metric, read_column

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location('fashion_mnist_zoo', os.path.join(ROOT, 'benchmarks',
                                                                                 'fashion_mnist_zoo.py'))
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)


def _arg(argv, flag):
    return argv[argv.index(flag) + 1]


@pytest.fixture
def source(tmp_path):
    """60 training images whose pixel value is their index, labels index % 10; 20 test images of value 255."""
    d = tmp_path / 'src'
    d.mkdir()
    write_idx(d / 'train-images-idx3-ubyte.gz', np.stack([np.full((28, 28), i, np.uint8) for i in range(60)]))
    write_idx(d / 'train-labels-idx1-ubyte.gz', np.arange(60) % 10)
    write_idx(d / 't10k-images-idx3-ubyte.gz', np.full((20, 28, 28), 255, np.uint8))
    write_idx(d / 't10k-labels-idx1-ubyte.gz', np.arange(20) % 10)
    return str(d)


def test_holdout_is_the_last_images_and_the_test_set_is_not_copied(tmp_path, source):
    data = str(tmp_path / 'data')
    zoo.prepare_holdout(source, data, holdout=15, log=lambda m: None)
    train, val = IdxFashionMNIST(data, train=True), IdxFashionMNIST(data, train=False)
    assert train.data[:, 0, 0].tolist() == list(range(45)) and val.data[:, 0, 0].tolist() == list(range(45, 60))
    assert val.targets.tolist() == [i % 10 for i in range(45, 60)]
    before = os.path.getmtime(os.path.join(data, 'train-images-idx3-ubyte'))
    zoo.prepare_holdout(source, data, holdout=15, log=lambda m: pytest.fail('rewrote an up-to-date split'))
    assert os.path.getmtime(os.path.join(data, 'train-images-idx3-ubyte')) == before
    zoo.prepare_holdout(source, data, holdout=10, log=lambda m: None)  # another split: rewritten
    assert len(IdxFashionMNIST(data, train=False)) == 10
    with pytest.raises(zoo.fm.BenchmarkError, match='cannot hold out 60 of 60'):
        zoo.prepare_holdout(source, str(tmp_path / 'other'), holdout=60)


def test_pilots_are_like_for_like_and_validate_on_the_held_out_split(tmp_path):
    plan = zoo.make_tune_plan(str(tmp_path), '/data/fmnist', '/scripts')
    pre, pilots = plan.stages[0], plan.stages[1:]
    assert pre.kind == 'pretrain' and _arg(pre.argv, '--epochs') == str(zoo.SCHEDULE['xxs'][0])
    assert [s.name for s in pilots] == [f'tune_{p.key}' for p in zoo.PILOTS]
    for flag in ('--epochs', '--warmup-epochs', '--data-dir', '--device', '--model'):
        assert len({_arg(s.argv, flag) for s in pilots}) == 1, flag
    data = os.path.join(str(tmp_path), 'data')
    assert _arg(pre.argv, '--data-dir') == data and all(_arg(s.argv, '--data-dir') == data for s in pilots)
    assert all(_arg(s.argv, '--val-split') == 'validation' for s in pilots)
    assert not any('/data/fmnist' in a for s in plan.stages for a in s.argv)  # the source (and its test set): never
    encoder = os.path.join(str(tmp_path), pre.name, 'encoder.safetensors')
    for p, s in zip(zoo.PILOTS, pilots):
        assert (_arg(s.argv, '-c') == zoo.fm.FINETUNE_CFG) == (p.kind == 'finetune')
        assert ('--pretrained-path' in s.argv) == (p.kind == 'finetune')
        if p.kind == 'finetune':
            assert _arg(s.argv, '--pretrained-path') == encoder
        assert s.argv[-len(p.extra) - 2 * (p.kind == 'finetune'):][:len(p.extra)] == list(p.extra)
    # the paper's recipes are among the pilots, unchanged
    assert {p.key for p in zoo.PILOTS if not p.extra} == {'ft_paper', 'sc_paper'}


class FakeTrain:
    """Writes what timm-mlit-pretrain / train.py write: a checkpoint per epoch, progress lines, train.py's summary.csv
    with eval_top1 (= 50 + 10 * epoch + pilot index), the encoder; `kill_at=(stage, epoch)` dies after that epoch."""

    def __init__(self, kill_at=None):
        self.calls, self.kill_at = [], kill_at

    def __call__(self, argv, log_path, on_poll):
        self.calls.append(list(argv))
        if any(a.endswith('validate.py') for a in argv):  # top-1 = 80 + 1 per size step, + 5 for mmLiT
            model = _arg(argv, '--model')
            top1 = 80 + ['mlit_xxs', 'mlit_xs', 'mlit_s'].index(model) + 5 * ('finetune_' in _arg(argv, '--checkpoint'))
            on_poll(f'Model {model} created, param count: 1000\nTest: [   0/1]  Time: 0.500s (0.500s,  1.0/s)\n')
            with open(log_path, 'a') as f:
                f.write(f'Model {model} created, param count: 1000\n'
                        'Test: [   0/1]  Time: 0.500s (0.500s,  1.0/s)  Loss: 1 (1)\n')
            with open(_arg(argv, '--results-file'), 'w') as f:
                json.dump(dict(model=model, top1=top1, top5=99.0), f)
            return 0
        name, epochs = _arg(argv, '--experiment'), int(_arg(argv, '--epochs'))
        d = os.path.join(_arg(argv, '--output'), name)
        os.makedirs(d, exist_ok=True)
        start = torch.load(_arg(argv, '--resume'), weights_only=False)['epoch'] + 1 if '--resume' in argv else 0
        offset = [f'tune_{p.key}' for p in zoo.PILOTS].index(name) if name.startswith('tune_') else 0
        write_summary = name.startswith(('tune_', 'finetune_', 'scratch_'))
        for epoch in range(start, epochs):
            on_poll(f'Train: {epoch} [   3/4 (100%)]  Loss: 1.0\n')
            if write_summary:
                summary = os.path.join(d, 'summary.csv')
                new = not os.path.exists(summary)
                with open(summary, 'a', newline='') as f:
                    w = csv.writer(f)
                    if new:
                        w.writerow(['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr'])
                    w.writerow([epoch, 1.0, 1.0, 50 + 10 * epoch + offset, 99, 1e-3])
            torch.save({'epoch': epoch}, os.path.join(d, 'last.pth.tar'))
            if self.kill_at == (name, epoch):
                return 1
        if 'timm_mlit.pretrain' in argv:
            open(os.path.join(d, 'encoder.safetensors'), 'wb').close()
        return 0


def test_pilots_run_resume_and_write_curves_and_table(tmp_path, source):
    def run(runner):
        return zoo.main(['tune', '--out', str(tmp_path / 'out'), '--results-dir', str(tmp_path / 'res'),
                         '--data-dir', source, '--timm-scripts', str(tmp_path), '-j', '1', '--holdout', '15'],
                        runner=runner)

    killed = FakeTrain(kill_at=('tune_ft_noaa_b128', 1))
    with pytest.raises(SystemExit):
        run(killed)
    partial = json.loads((tmp_path / 'res' / 'fashion_mnist_tune.json').read_text())
    assert not partial['meta']['complete'] and [r['key'] for r in partial['rows']] == ['ft_paper']
    runner = FakeTrain()
    assert run(runner) == 0
    names = [_arg(c, '--experiment') for c in runner.calls]
    assert names == [f'tune_{p.key}' for p in zoo.PILOTS[1:]]  # pre-training and the first pilot: done already
    assert _arg(runner.calls[0], '--resume').endswith(os.path.join('tune_ft_noaa_b128', 'last.pth.tar'))
    res = json.loads((tmp_path / 'res' / 'fashion_mnist_tune.json').read_text())
    assert res['meta']['complete'] and len(res['rows']) == len(zoo.PILOTS)
    for i, r in enumerate(res['rows']):
        assert r['val_top1'] == [50. + 10 * e + i for e in range(zoo.PILOT_EPOCHS)]
        assert r['final_val_top1'] == r['val_top1'][-1] and r['complete']
    md = (tmp_path / 'res' / 'fashion_mnist_tune.md').read_text()
    assert zoo.PILOTS[0].label in md and '50.00 / 60.00 / 70.00' in md
    png = tmp_path / 'res' / 'fashion_mnist_tune.png'
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    data = str(tmp_path / 'out' / 'data')  # the split the pilots trained and validated on
    assert len(IdxFashionMNIST(data, train=True)) == 45 and len(IdxFashionMNIST(data, train=False)) == 15


def test_read_column_and_plot_metric(tmp_path):
    a, b = tmp_path / 'a.csv', tmp_path / 'b.csv'
    a.write_text('epoch,train_loss,eval_top1\n0,2.0,60.5\n1,1.5,70.0\n'  # killed before epoch 1's checkpoint,
                 'epoch,train_loss,eval_top1\n1,1.5,70.25\n2,1.2,\n')  # resumed: train.py repeats its header
    b.write_text('epoch,train_loss\n0,2.0\n')
    assert read_column(str(a), 'eval_top1') == ([1, 2], [60.5, 70.25])
    with pytest.raises(KeyError, match="no column 'eval_top1'.*epoch, train_loss"):
        read_column(str(b), 'eval_top1')
    out = tmp_path / 'curves.png'
    assert plot_metric({'run a': str(a), 'missing': str(tmp_path / 'none.csv')}, 'eval_top1', str(out)) == str(out)
    assert out.read_bytes()[:4] == b'\x89PNG'
    assert plot_metric({'missing': str(tmp_path / 'none.csv')}, 'eval_top1', str(tmp_path / 'x.png')) is None
    assert not (tmp_path / 'x.png').exists()


def _tune_results(folder, finals):
    """A complete fashion_mnist_tune.json whose pilots end at `finals` (one per PILOTS entry)."""
    rows = [dict(key=p.key, label=p.label, final_val_top1=v, val_top1=[v - 1, v], complete=True, wall_s=60.,
                 img_s=75.) for p, v in zip(zoo.PILOTS, finals)]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'fashion_mnist_tune.json'), 'w') as f:
        json.dump(dict(meta=dict(complete=True), rows=rows), f)
    return dict(meta=dict(complete=True), rows=rows)


def test_zoo_takes_the_best_pilot_of_each_kind_on_validation(tmp_path):
    with pytest.raises(zoo.fm.BenchmarkError, match='run the tune phase to its end first'):
        zoo.chosen_pilots(str(tmp_path))
    kinds = [p.kind for p in zoo.PILOTS]
    finals = [80.0 + i for i in range(len(zoo.PILOTS))]  # the last pilot of each kind is best
    _tune_results(str(tmp_path), finals[:-1])  # written before the last pilot was added: not complete
    with pytest.raises(zoo.fm.BenchmarkError, match=f'incomplete \\(no {zoo.PILOTS[-1].key}\\)'):
        zoo.chosen_pilots(str(tmp_path))
    data = _tune_results(str(tmp_path), finals)
    chosen = zoo.chosen_pilots(str(tmp_path))
    last = {k: max(i for i, x in enumerate(kinds) if x == k) for k in set(kinds)}
    assert chosen == {k: zoo.PILOTS[i] for k, i in last.items()}
    marked = [line for line in zoo.tune_table(data).splitlines() if line.endswith('| **chosen** |')]
    assert [line.split(' | ')[0][2:] for line in marked] == [zoo.PILOTS[i].label for i in sorted(last.values())]
    data['meta']['complete'], data['rows'] = False, data['rows'][:2]  # nothing is marked before every pilot ran
    table = zoo.tune_table(data)
    assert f'**Incomplete: 2 of {len(zoo.PILOTS)} pilots done.**' in table and '**chosen**' not in table
    _tune_results(str(tmp_path), [80.0] * len(zoo.PILOTS))  # a tie: the first listed, the paper's recipe
    assert {p.key for p in zoo.chosen_pilots(str(tmp_path)).values()} == {'ft_paper', 'sc_paper'}


def test_zoo_plan_ships_mmlit_first_like_for_like_and_tests_once(tmp_path):
    chosen = {'finetune': zoo.PILOTS[1], 'scratch': zoo.PILOTS[-1]}
    plan = zoo.make_zoo_plan(str(tmp_path), '/data/fmnist', '/scripts', chosen)
    names = [s.name for s in plan.stages]
    sizes = list(zoo.SCHEDULE)
    assert names == [n for z in sizes for n in (f'pretrain_mlit_{z}', f'finetune_mlit_{z}', f'eval_mmlit_{z}')] + \
        [n for z in sizes for n in (f'scratch_mlit_{z}', f'eval_mlit_{z}')]
    st = {s.name: s for s in plan.stages}
    for z, (p_epochs, epochs) in zoo.SCHEDULE.items():
        ft, sc = st[f'finetune_mlit_{z}'].argv, st[f'scratch_mlit_{z}'].argv
        assert _arg(st[f'pretrain_mlit_{z}'].argv, '--epochs') == str(p_epochs)
        assert _arg(ft, '--epochs') == _arg(sc, '--epochs') == str(epochs)  # equal fine-tuning epochs per size
        assert _arg(ft, '--model') == _arg(sc, '--model') == f'mlit_{z}'
        assert _arg(ft, '--pretrained-path') == os.path.join(str(tmp_path), f'pretrain_mlit_{z}', 'encoder.safetensors')
        assert ft[-len(chosen['finetune'].extra) - 2:-2] == list(chosen['finetune'].extra)
        assert sc[-len(chosen['scratch'].extra):] == list(chosen['scratch'].extra)
    trains = [s for s in plan.stages if s.kind != 'eval']
    assert not any('/data/fmnist' in a for s in trains for a in s.argv)  # training never sees the test set
    evals = [s for s in plan.stages if s.kind == 'eval']
    assert len(evals) == 2 * len(sizes)  # once per trained model
    for s in evals:
        assert s.argv[:2] == ['env', 'TIMM_MLIT_PRECISION=float32']  # as the shipped weights are used
        assert _arg(s.argv, '--data-dir') == '/data/fmnist' and _arg(s.argv, '--split') == 'validation'
        assert _arg(s.argv, '--checkpoint').endswith('last.pth.tar')  # the final checkpoint: nothing selected


def test_zoo_runs_every_row_and_writes_the_table(tmp_path, source):
    res = tmp_path / 'res'
    _tune_results(str(res), [80.0 + i for i in range(len(zoo.PILOTS))])
    runner = FakeTrain()
    assert zoo.main(['zoo', '--out', str(tmp_path / 'out'), '--results-dir', str(res), '--data-dir', source,
                     '--timm-scripts', str(tmp_path), '-j', '1', '--holdout', '15', '--sizes', 'xxs', 'xs'],
                    runner=runner) == 0
    out = json.loads((res / 'fashion_mnist_zoo.json').read_text())
    assert out['meta']['complete']
    top1 = {r['key']: r['top1'] for r in out['rows']}
    assert top1 == {'mmlit_xxs': 85, 'mmlit_xs': 86, 'mlit_xxs': 80, 'mlit_xs': 81}
    for r in out['rows']:
        assert len(r['val_top1']) == r['epochs'] == zoo.SCHEDULE[r['arch'].split('_')[1]][1]
        assert (r['pretrain_epochs'] > 0) == r['key'].startswith('mmlit') and r['checkpoint'].endswith('last.pth.tar')
    md = (res / 'fashion_mnist_zoo.md').read_text()
    assert '| mmLiT-XXS (MAE + fine-tune) | 1,000 | {} + {} | 85.00 |'.format(*zoo.SCHEDULE['xxs']) in md
    assert '| XXS | 1,000 | {} + {} / {} | 85.00 | 80.00 | +5.00 |'.format(*zoo.SCHEDULE['xxs'],
                                                                       zoo.SCHEDULE['xxs'][1]) in md
    assert (res / 'fashion_mnist_zoo.png').read_bytes()[:4] == b'\x89PNG'
    calls = len(runner.calls)
    assert zoo.main(['zoo', '--out', str(tmp_path / 'out'), '--results-dir', str(res), '--data-dir', source,
                     '--timm-scripts', str(tmp_path), '-j', '1', '--holdout', '15', '--sizes', 'xxs', 'xs'],
                    runner=runner) == 0
    assert len(runner.calls) == calls  # all done: nothing runs again
    tune = (res / 'fashion_mnist_tune.json').read_text()
    (res / 'fashion_mnist_zoo.json').unlink()
    assert zoo.main(['curves', '--out', str(tmp_path / 'out'), '--results-dir', str(res), '--data-dir', source,
                     '--sizes', 'xxs', 'xs']) == 0
    assert json.loads((res / 'fashion_mnist_zoo.json').read_text())['rows'] == out['rows']  # redrawn from OUT
    assert (res / 'fashion_mnist_tune.json').read_text() == tune  # no pilot ran in OUT: the recipes' results kept


def test_a_tested_row_whose_run_folder_is_gone_is_kept_and_not_run_or_published_again(tmp_path, source, capsys,
                                                                                       monkeypatch):
    import shutil

    import timm_mlit.plots
    res, out = tmp_path / 'res', tmp_path / 'out'
    _tune_results(str(res), [80.0 + i for i in range(len(zoo.PILOTS))])
    drawn = []
    plot_series = timm_mlit.plots.plot_series
    monkeypatch.setattr(timm_mlit.plots, 'plot_series', lambda series, *a, **kw: drawn.append(
        {k: (list(e), list(v)) for k, (e, v) in series.items()}) or plot_series(series, *a, **kw))

    def zoo_main(phase, *sizes, runner=None):
        argv = [phase, '--out', str(out), '--results-dir', str(res), '--data-dir', source, '--timm-scripts',
                str(tmp_path), '-j', '1', '--holdout', '15', '--sizes', *sizes]
        return zoo.main(argv, runner=runner) if runner else zoo.main(argv)

    def published_models():
        calls = []
        plan = zoo._plans(zoo._parse_args(['publish', '--out', str(out), '--results-dir', str(res), '--data-dir',
                                           source]), '/scripts')['zoo']
        zoo.publish_zoo(plan, str(res), str(tmp_path / 'weights'), publish=lambda argv: calls.append(argv) or 0)
        return {a[a.index('--model') + 1] for a in calls}

    def rows():
        return {r['key']: r for r in json.loads((res / 'fashion_mnist_zoo.json').read_text())['rows']}

    assert zoo_main('zoo', 'xxs', runner=FakeTrain()) == 0
    before = rows()
    xxs_curve = before['mmlit_xxs']['val_top1']
    assert xxs_curve and drawn[-1]['mmLiT-XXS (MAE + fine-tune)'] == (list(range(1, len(xxs_curve) + 1)), xxs_curve)
    shutil.rmtree(out)  # the machine that held the run folder is gone; its results are not
    runner = FakeTrain()
    assert zoo_main('zoo', 'xxs', 'xs', runner=runner) == 0
    assert 'mmlit_xxs: tested, as' in capsys.readouterr().out
    assert 'mmlit_xxs: tested, as' in (out / 'zoo.log').read_text()  # in the run's own log, beside its stages
    assert {_arg(a, '--model') for a in runner.calls} == {'mlit_xs'}  # XXS is not trained or tested again
    data = json.loads((res / 'fashion_mnist_zoo.json').read_text())
    assert data['meta']['complete'] and list(rows()) == ['mmlit_xxs', 'mmlit_xs', 'mlit_xxs', 'mlit_xs']
    assert {k: r for k, r in rows().items() if k in before} == before
    assert list(drawn[-1]) == [r['model'] for r in data['rows']]  # every row's curve, the kept ones' as recorded
    assert drawn[-1]['mmLiT-XXS (MAE + fine-tune)'][1] == xxs_curve
    md = (res / 'fashion_mnist_zoo.md').read_text()
    assert '| XXS | 1,000 | {} + {} / {} | 85.00 | 80.00 | +5.00 |'.format(*zoo.SCHEDULE['xxs'],
                                                                       zoo.SCHEDULE['xxs'][1]) in md
    assert '| XS | 1,000 |' in md and '| S |' not in md
    assert zoo_main('curves', 'xs') == 0  # a size run alone keeps the others' rows too
    assert list(rows()) == [r['key'] for r in data['rows']]
    assert published_models() == {'mlit_xs'}  # the XXS published before is left alone
    # trained again in a run folder that has its training's folder: the recorded row stands, and is not published,
    # until the new run has been tested
    shutil.rmtree(out / 'eval_mmlit_xs')
    shutil.rmtree(out / 'finetune_mlit_xs')
    (out / 'finetune_mlit_xs').mkdir()
    with pytest.raises(SystemExit):
        zoo_main('zoo', 'xs', runner=FakeTrain(kill_at=('finetune_mlit_xs', 0)))
    assert rows()['mmlit_xs'] == data['rows'][1] and published_models() == set()
    assert zoo_main('zoo', 'xs', runner=FakeTrain()) == 0
    assert rows()['mmlit_xs']['checkpoint'] == data['rows'][1]['checkpoint'] and published_models() == {'mlit_xs'}


def test_a_run_cut_short_keeps_its_validation_curve_in_the_results_until_it_is_tested(tmp_path, source):
    import shutil
    res, out = tmp_path / 'res', tmp_path / 'out'
    _tune_results(str(res), [80.0 + i for i in range(len(zoo.PILOTS))])
    common = ['--out', str(out), '--results-dir', str(res), '--data-dir', source, '--timm-scripts', str(tmp_path),
              '-j', '1', '--holdout', '15', '--sizes', 'xxs']
    epochs = zoo.SCHEDULE['xxs'][1]

    def unfinished():
        data = json.loads((res / 'fashion_mnist_zoo.json').read_text())
        return [(u['key'], u['epochs_done'], u['epochs'], u['val_top1']) for u in data['unfinished']]

    with pytest.raises(SystemExit):  # killed after the third epoch from scratch, before any test of it
        zoo.main(['zoo', *common], runner=FakeTrain(kill_at=('scratch_mlit_xxs', 2)))
    assert zoo.main(['curves', *common]) == 0
    assert unfinished() == [('mlit_xxs', 3, epochs, [50, 60, 70])]
    data = json.loads((res / 'fashion_mnist_zoo.json').read_text())
    assert [r['key'] for r in data['rows']] == ['mmlit_xxs'] and not data['meta']['complete']
    wall = json.loads((out / 'scratch_mlit_xxs' / 'wall.json').read_text())['wall_s']  # killed attempts included
    assert data['unfinished'][0]['wall_s'] == round(wall, 1)
    md = (res / 'fashion_mnist_zoo.md').read_text()
    assert f'| not finished (3 of {epochs} epochs) |' in md
    assert f'| mLiT-XXS (from scratch) | 3 of {epochs} | 50.00 / 60.00 / 70.00 |' in md
    shutil.rmtree(out)  # the run folder is lost; begun again from zero, the new run is cut short sooner
    with pytest.raises(SystemExit):
        zoo.main(['zoo', *common], runner=FakeTrain(kill_at=('scratch_mlit_xxs', 0)))
    assert zoo.main(['curves', *common]) == 0
    assert unfinished() == [('mlit_xxs', 3, epochs, [50, 60, 70])]  # the longer curve stays
    with pytest.raises(SystemExit):  # ... until the new run gets further
        zoo.main(['zoo', *common], runner=FakeTrain(kill_at=('scratch_mlit_xxs', 3)))
    assert zoo.main(['curves', *common]) == 0
    assert unfinished() == [('mlit_xxs', 4, epochs, [50, 60, 70, 80])]
    wall = json.loads((out / 'scratch_mlit_xxs' / 'wall.json').read_text())['wall_s']
    assert json.loads((res / 'fashion_mnist_zoo.json').read_text())['unfinished'][0]['wall_s'] == round(wall, 1)
    assert zoo.main(['zoo', *common], runner=FakeTrain()) == 0  # resumed to the end and tested
    data = json.loads((res / 'fashion_mnist_zoo.json').read_text())
    assert unfinished() == [] and data['meta']['complete']
    assert [r['key'] for r in data['rows']] == ['mmlit_xxs', 'mlit_xxs']
    assert '## Not tested yet' not in (res / 'fashion_mnist_zoo.md').read_text()


@pytest.mark.slow
def test_each_row_keeps_the_code_that_trained_it_when_the_results_are_written_again(tmp_path, source,
                                                                                   monkeypatch):
    res, out = tmp_path / 'res', tmp_path / 'out'
    _tune_results(str(res), [80.0 + i for i in range(len(zoo.PILOTS))])

    def zoo_main(commit, *sizes):
        monkeypatch.setattr(zoo.fm, 'code_version', lambda: dict(commit=commit))
        assert zoo.main(['zoo', '--out', str(out), '--results-dir', str(res), '--data-dir', source, '--timm-scripts',
                         str(tmp_path), '-j', '1', '--holdout', '15', '--sizes', *sizes], runner=FakeTrain()) == 0
        data = json.loads((res / 'fashion_mnist_zoo.json').read_text())
        return data['meta']['code']['commit'], {r['key']: r['measured']['code']['commit'] for r in data['rows']}

    assert zoo_main('aaa', 'xxs') == ('aaa', {'mmlit_xxs': 'aaa', 'mlit_xxs': 'aaa'})
    assert json.loads((out / 'scratch_mlit_xxs' / 'done.json').read_text())['measured']['code'] == {'commit': 'aaa'}
    # the XS rows are trained by newer code: the XXS rows, read again from the run folder, keep theirs
    assert zoo_main('bbb', 'xxs', 'xs') == ('bbb', {'mmlit_xxs': 'aaa', 'mmlit_xs': 'bbb', 'mlit_xxs': 'aaa',
                                                    'mlit_xs': 'bbb'})
    # a training's done.json from before stages recorded what ran them: the results' record of the same run
    for stage in ('finetune_mlit_xxs', 'scratch_mlit_xxs'):
        done = json.loads((out / stage / 'done.json').read_text())
        del done['measured']
        (out / stage / 'done.json').write_text(json.dumps(done))
    assert zoo_main('ccc', 'xxs', 'xs')[1] == {'mmlit_xxs': 'aaa', 'mmlit_xs': 'bbb', 'mlit_xxs': 'aaa',
                                               'mlit_xs': 'bbb'}
    data = json.loads((res / 'fashion_mnist_zoo.json').read_text())  # ... only if it is the same run
    data['rows'][0]['train_wall_s'] += 1
    (res / 'fashion_mnist_zoo.json').write_text(json.dumps(data))
    assert zoo_main('ddd', 'xxs', 'xs')[1] == {'mmlit_xxs': 'ddd', 'mmlit_xs': 'bbb', 'mlit_xxs': 'aaa',
                                               'mlit_xs': 'bbb'}


@pytest.mark.slow
def test_publish_ships_each_tested_mmlit_as_encoder_and_classifier_with_its_commands(tmp_path, source):
    import timm
    from safetensors.torch import load_file

    import timm_mlit  # noqa: F401
    from timm_mlit.checkpoint import export_encoder
    res, out, weights = tmp_path / 'res', tmp_path / 'out', tmp_path / 'weights'
    common = ['--out', str(out), '--results-dir', str(res), '--data-dir', source, '--timm-scripts',
              str(tmp_path / 'timm'), '-j', '1', '--holdout', '15', '--sizes', 'xxs']
    with pytest.raises(SystemExit, match='nothing to publish: the tune phase has not chosen the recipes yet'):
        zoo.main(['publish', *common, '--weights-dir', str(weights)])
    _tune_results(str(res), [80.0 + i for i in range(len(zoo.PILOTS))])
    assert zoo.main(['zoo', *common], runner=FakeTrain()) == 0
    torch.manual_seed(0)
    model = timm.create_model('mlit_xxs', num_classes=10)  # the fake run's files made real: a model, its encoder
    train_args = argparse.Namespace(model='mlit_xxs', amp=True, amp_dtype='bfloat16', epochs=20)  # as train.py
    torch.save({'state_dict': model.state_dict(), 'arch': 'mlit_xxs', 'epoch': 19, 'args': train_args},
               out / 'finetune_mlit_xxs' / 'last.pth.tar')
    torch.save({'epoch': 9, 'args': dict(model='mlit_xxs', amp=False, amp_dtype=None)},
               out / 'pretrain_mlit_xxs' / 'last.pth.tar')
    mae = {f'encoder.{k}': v for k, v in model.state_dict().items() if not k.startswith('head.')}  # as mae.py
    export_encoder(mae, str(out / 'pretrain_mlit_xxs' / 'encoder.safetensors'), arch='mlit_xxs')
    done = out / 'pretrain_mlit_xxs' / 'done.json'  # as a stage run outside the orchestrator records itself
    done.write_text(json.dumps(dict(json.loads(done.read_text()), argv=[])))
    # docs/results.md's command, published with other flags than the zoo ran with: the cards hold what ran (done.json)
    readme = shlex.split(snippet('shipped-weights').strip().replace('/var/tmp/zoo/out', str(out)))
    assert readme[:5] == ['python', 'benchmarks/fashion_mnist_zoo.py', 'publish', '--out', str(out)]
    other = [a if a != str(tmp_path / 'timm') else str(tmp_path / 'elsewhere') for a in common[2:]]
    other[other.index('-j') + 1] = '2'
    assert zoo.main(readme[2:] + other + ['--weights-dir', str(weights)]) == 0
    assert sorted(p.name for p in weights.iterdir()) == ['mlit_xxs.mae_ft_fashion_mnist',
                                                          'mlit_xxs.mae_in_fashion_mnist']  # no scratch rows
    card = (weights / 'mlit_xxs.mae_ft_fashion_mnist' / 'README.md').read_text()
    best_ft = [p for p in zoo.PILOTS if p.kind == 'finetune'][-1]  # _tune_results: the last of each kind is best
    assert 'value: 85.0' in card and ('20 epochs with timm train.py (train_configs/finetune/mmlit_xxs_fashion_mnist'
                                      f'.yaml {shlex.join(best_ft.extra)})') in card
    assert 'timm-mlit/mlit_xxs.mae_in_fashion_mnist' in card
    lines = card.split('## Training\n')[1].split('```bash\n')[1].split('```')[0].splitlines()
    assert lines[0].startswith('# From the timm-mlit repository root. OUT: the run folder; OUT/data holds the '
                               'first 55,000 Fashion-MNIST training images (train-*)')
    assert '# pretrain_mlit_xxs: training precision float32' in lines
    assert '# finetune_mlit_xxs: training precision bfloat16 autocast' in lines
    assert any(x.startswith('# pretrain_mlit_xxs ran outside the orchestrator') for x in lines)
    commands = [c for c in lines if not c.startswith('#')]
    assert len(commands) == 4 and commands[0].startswith(
        'python -m timm_mlit.pretrain -c train_configs/pretrain/mmlit_xxs_fashion_mnist.yaml ')
    assert commands[1].startswith('python -m timm_mlit.run "$TIMM_SCRIPTS_DIR"/train.py -c '
                                  'train_configs/finetune/mmlit_xxs_fashion_mnist.yaml ')
    assert '--data-dir "$OUT"/data --val-split validation' in commands[1] and ' -j 1 ' in commands[1]
    assert '--pretrained-path "$OUT"/pretrain_mlit_xxs/encoder.safetensors' in commands[1]
    assert commands[2] == 'mkdir -p "$OUT"/eval_mmlit_xxs'  # the folder of validate.py's --results-file
    assert commands[3].startswith('env TIMM_MLIT_PRECISION=float32 python -m timm_mlit.run '
                                  '"$TIMM_SCRIPTS_DIR"/validate.py ')
    assert '--results-file "$OUT"/eval_mmlit_xxs/results.json' in commands[3]
    assert f'--data-dir {source} ' in commands[3]  # the test images where they are (the header names them)
    assert str(tmp_path) not in '\n'.join(commands).replace(source, '') and '--resume' not in '\n'.join(commands)
    encoder_card = (weights / 'mlit_xxs.mae_in_fashion_mnist' / 'README.md').read_text()
    assert 'timm_mlit.pretrain' in encoder_card and 'train.py' not in encoder_card
    loaded = load_file(weights / 'mlit_xxs.mae_ft_fashion_mnist' / 'model.safetensors')
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    # a pair that cannot be published leaves the shipped pair as it was
    shipped = {p: p.read_bytes() for p in weights.rglob('*') if p.is_file()}
    torch.save({'epoch': 19, 'args': train_args}, out / 'finetune_mlit_xxs' / 'last.pth.tar')  # no weights in it
    with pytest.raises(SystemExit, match='timm-mlit-publish .* failed'):
        zoo.main(['publish', *common, '--weights-dir', str(weights)])
    assert {p: p.read_bytes() for p in weights.rglob('*') if p.is_file()} == shipped
    # publishing again replaces them
    model2 = timm.create_model('mlit_xxs', num_classes=10)
    torch.save({'state_dict': model2.state_dict(), 'epoch': 19, 'args': train_args},
               out / 'finetune_mlit_xxs' / 'last.pth.tar')
    assert zoo.main(['publish', *common, '--weights-dir', str(weights)]) == 0
    loaded = load_file(weights / 'mlit_xxs.mae_ft_fashion_mnist' / 'model.safetensors')
    assert all(torch.equal(loaded[k], v) for k, v in model2.state_dict().items())
    # a recipe chosen after the zoo ran is not put on cards of weights it did not make
    results = res / 'fashion_mnist_zoo.json'
    data = json.loads(results.read_text())
    data['rows'][0]['recipe'] += ' --lr 9e-3'
    results.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match='ran without the recipe the results name'):
        zoo.main(['publish', *common, '--weights-dir', str(weights)])


def _zoo_row(key, top1, params=1000):
    pre = key.startswith('mmlit')
    return dict(key=key, top1=top1, params=params, wall_s=3600. * (3 if pre else 2), pretrain_wall_s=3600. if pre
                else 0., train_wall_s=7200., pretrain_img_s=100. if pre else None, train_img_s=80., test_img_s=300.)


def test_size_table_puts_mmlit_beside_mlit_quotes_the_paper_and_checks_its_claims():
    rows = [_zoo_row('mmlit_xxs', 90.5), _zoo_row('mmlit_xs', 91.0), _zoo_row('mlit_xxs', 89.0)]
    md = zoo.size_table(dict(meta={}, rows=rows))
    assert '| XXS | 1,000 | {} + {} / {} | 90.50 | 89.00 | +1.50 | 3h00m (1h00m + 2h00m) / 2h00m | 100 / 80 / 80 / ' \
           '300 |'.format(*zoo.SCHEDULE['xxs'], zoo.SCHEDULE['xxs'][1]) in md
    assert '| XS | 1,000 | {} + {} / {} | 91.00 | not run yet | - |'.format(*zoo.SCHEDULE['xs'],
                                                                             zoo.SCHEDULE['xs'][1]) in md
    assert '| S | - |' in md and 'not run yet | not run yet |' in md
    # the paper's Table 8 beside it, marked as quoted, mmLiT / mLiT
    assert 'Quoted from the paper' in md and '| XXS | 0.67 | 73.42 / 56.98 | 92.21 / 80.78 | 97.32 / 94.97 |' in md
    # the claims as far as the tested rows decide them: "open" while a size is untested and none breaks them
    assert ("The paper's claims on this data: pre-training helps at every size: open (mmLiT ahead at XXS; mLiT-XS, "
            "mmLiT-S, mLiT-S not tested); mmLiT S > XS > XXS: open (XS > XXS; mmLiT-S not tested).") in md
    epochs = zoo.SCHEDULE['xs'][1]
    unfinished = [dict(key='mlit_xs', epochs_done=3, epochs=epochs)]
    md = zoo.size_table(dict(meta={}, rows=rows + [_zoo_row('mlit_xs', 91.2)], unfinished=unfinished))
    assert ("pre-training helps at every size: no (mmLiT ahead at XXS, not at XS; mmLiT-S, mLiT-S not tested); "
            "mmLiT S > XS > XXS: open (XS > XXS; mmLiT-S not tested); mLiT S > XS > XXS: open (XS > XXS; mLiT-S not "
            "tested).") in md  # one size where it fails decides "no"
    md = zoo.size_table(dict(meta={}, rows=rows, unfinished=unfinished))  # how far a run not tested got
    assert f'| 91.00 | not finished (3 of {epochs} epochs) | - | 3h00m (1h00m + 2h00m) / - |' in md
    unfinished[0]['epochs_done'] = epochs
    assert '| 91.00 | trained, not tested | - |' in zoo.size_table(dict(meta={}, rows=rows, unfinished=unfinished))
    rows += [_zoo_row('mmlit_s', 90.8), _zoo_row('mlit_xs', 91.2), _zoo_row('mlit_s', 89.5)]
    md = zoo.size_table(dict(meta={}, rows=rows[::-1]), sizes=('s', 'xxs', 'xs'))
    assert md.index('| XXS |') < md.index('| XS |') < md.index('| S |')
    assert ("The paper's claims on this data: pre-training helps at every size: no (mmLiT ahead at XXS, S, not at XS); "
            "mmLiT S > XS > XXS: no; mLiT S > XS > XXS: no.") in md
    for r in rows:
        if r['key'].startswith('mmlit'):
            r['top1'] += {'xxs': 1, 'xs': 2, 's': 3}[r['key'].split('_')[1]] + 2
    assert 'pre-training helps at every size: yes (mmLiT ahead at XXS, XS, S); mmLiT S > XS > XXS: yes' in \
        zoo.size_table(dict(meta={}, rows=rows))
    assert 'more than one machine' not in zoo.size_table(dict(meta={}, rows=rows))
    amd, xeon = 'AMD EPYC, 2 CPU cores, 24 GiB RAM, no GPU; torch 2 threads', 'Intel(R) Xeon(R) Processor, 2 CPU cores'
    for r in rows:
        r['measured'] = dict(hardware=xeon if r['key'].endswith('_s') else amd)
    assert ('Measured on more than one machine (compare wall times and img/s within one): mmLiT-XXS, mmLiT-XS, '
            'mLiT-XXS, mLiT-XS on AMD EPYC; mmLiT-S, mLiT-S on Intel(R) Xeon(R) Processor.') in \
        zoo.size_table(dict(meta={}, rows=rows))


def test_run_precision_reads_the_checkpoint_then_the_log(tmp_path):
    ckpt, log = tmp_path / 'last.pth.tar', tmp_path / 'stage.log'
    torch.save({'epoch': 0, 'args': argparse.Namespace(amp=True, amp_dtype='bfloat16')}, ckpt)
    assert zoo.run_precision(str(ckpt), str(log)) == 'bfloat16 autocast'
    torch.save({'epoch': 0, 'args': dict(amp=None, amp_dtype='float16')}, ckpt)  # older runs: not recorded
    assert zoo.run_precision(str(ckpt), str(log)).startswith('not recorded')
    log.write_text('... INFO precision: bfloat16 autocast (chosen for this device)\n')  # as timm-mlit-pretrain logs
    assert zoo.run_precision(str(ckpt), str(log)) == 'bfloat16 autocast (as its log records)'
    log.write_text('timm-mlit-run: float32 (as the resumed run was trained)\n')  # as the train.py launcher logs
    assert zoo.run_precision(None, str(log)) == 'float32 (as its log records)'
