"""benchmarks/fashion_mnist_zoo.py: the held-out split, the pilots' plan (like for like, never the test set), the
validation curves and table, and resuming, with a fake runner in place of timm's scripts; timm_mlit.plots'
read_column / plot_metric."""
import csv
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

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
    assert pre.kind == 'pretrain' and _arg(pre.argv, '--epochs') == str(zoo.PRETRAIN_EPOCHS)
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
        name, epochs = _arg(argv, '--experiment'), int(_arg(argv, '--epochs'))
        d = os.path.join(_arg(argv, '--output'), name)
        os.makedirs(d, exist_ok=True)
        start = torch.load(_arg(argv, '--resume'), weights_only=False)['epoch'] + 1 if '--resume' in argv else 0
        offset = [f'tune_{p.key}' for p in zoo.PILOTS].index(name) if name.startswith('tune_') else 0
        for epoch in range(start, epochs):
            on_poll(f'Train: {epoch} [   3/4 (100%)]  Loss: 1.0\n')
            if name.startswith('tune_'):
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
    a.write_text('epoch,train_loss,eval_top1\n0,2.0,60.5\n1,1.5,70.25\n2,1.2,\n')
    b.write_text('epoch,train_loss\n0,2.0\n')
    assert read_column(str(a), 'eval_top1') == ([1, 2], [60.5, 70.25])
    with pytest.raises(KeyError, match="no column 'eval_top1'.*epoch, train_loss"):
        read_column(str(b), 'eval_top1')
    out = tmp_path / 'curves.png'
    assert plot_metric({'run a': str(a), 'missing': str(tmp_path / 'none.csv')}, 'eval_top1', str(out)) == str(out)
    assert out.read_bytes()[:4] == b'\x89PNG'
    assert plot_metric({'missing': str(tmp_path / 'none.csv')}, 'eval_top1', str(tmp_path / 'x.png')) is None
    assert not (tmp_path / 'x.png').exists()
