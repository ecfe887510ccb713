"""benchmarks/fashion_mnist.py: the plan (like-for-like rows), the labelled subset, stage skipping and resume after a
kill, time-left logging, and the results table, with a fake runner in place of timm's scripts. One slow test runs
the real --smoke pipeline and needs TIMM_SCRIPTS_DIR."""
import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'benchmarks', 'fashion_mnist.py')
_spec = importlib.util.spec_from_file_location('fashion_mnist_benchmark', SCRIPT)
fm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fm)

from timm_mlit.data import write_idx  # noqa: E402

SCRIPTS_DIR = os.environ.get('TIMM_SCRIPTS_DIR', '')


@pytest.fixture(scope='module')
def fake_fmnist(tmp_path_factory):
    """A Debian-layout folder of gzipped idx files: 55 training images (class c has 4 + c % 3 images, pixel value
    = index, so a subset can be traced back), 20 test images."""
    d = tmp_path_factory.mktemp('fmnist')
    labels = np.array([c for c in range(10) for _ in range(4 + c % 3)])
    labels = labels[np.random.default_rng(0).permutation(len(labels))]
    images = np.stack([np.full((28, 28), i, np.uint8) for i in range(len(labels))])
    write_idx(d / 'train-images-idx3-ubyte.gz', images)
    write_idx(d / 'train-labels-idx1-ubyte.gz', labels)
    write_idx(d / 't10k-images-idx3-ubyte.gz', np.zeros((20, 28, 28)))
    write_idx(d / 't10k-labels-idx1-ubyte.gz', np.arange(20) % 10)
    return str(d), labels


def _arg(argv, flag):
    return argv[argv.index(flag) + 1]


# ---------------------------------------------------------------- the plan

def _train_stages(plan):
    return {s.name: s for s in plan.stages if s.kind == 'train'}


def test_cpu_plan_is_like_for_like(tmp_path):
    plan = fm.make_plan(fm.BUDGETS['cpu'], str(tmp_path), '/data/fmnist', '/scripts')
    names = [s.name for s in plan.stages]
    assert names == ['pretrain_mlit_xxs', 'finetune_mlit_xxs', 'eval_mmlit_xxs', 'scratch_mlit_xxs', 'eval_mlit_xxs',
                     'scratch_vit_dense', 'eval_vit_dense', 'scratch_resnet10t', 'eval_resnet10t']
    train = _train_stages(plan)
    # every supervised run: same epochs, warm-up, labelled images, device; no evaluation on the test set in training
    for flag in ('--epochs', '--warmup-epochs', '--data-dir', '--device', '--val-split'):
        assert len({_arg(s.argv, flag) for s in train.values()}) == 1, flag
    assert _arg(train['scratch_mlit_xxs'].argv, '--epochs') == '5' and _arg(train['scratch_mlit_xxs'].argv,
                                                                             '--val-split') == ''
    assert _arg(train['scratch_mlit_xxs'].argv, '--data-dir') == os.path.join(str(tmp_path), 'data')
    # peers: the scratch recipe, only the model changes
    for name in ('scratch_mlit_xxs', 'scratch_vit_dense', 'scratch_resnet10t'):
        assert _arg(train[name].argv, '-c') == fm.SCRATCH_CFG
    strip = {'--model', '--model-kwargs', '--experiment', 'vit_tiny_patch16_224', 'resnet10t', 'scratch_vit_dense',
             'scratch_resnet10t', 'scratch_mlit_xxs'} | {f'{k}={v}' for k, v in fm.VIT_KWARGS.items()}
    assert len({tuple(a for a in train[n].argv if a not in strip) for n in
                ('scratch_mlit_xxs', 'scratch_vit_dense', 'scratch_resnet10t')}) == 1
    vit = train['scratch_vit_dense'].argv
    assert vit[vit.index('--model-kwargs') + 1:][:6] == ['img_size=36', 'patch_size=3', 'embed_dim=108', 'depth=9',
                                                         'num_heads=6', 'mlp_ratio=2']
    # mmLiT: the fine-tune recipe from the pre-trained encoder, pre-trained on all 60k images (the source folder)
    ft = train['finetune_mlit_xxs'].argv
    assert _arg(ft, '-c') == fm.FINETUNE_CFG
    assert _arg(ft, '--pretrained-path') == os.path.join(str(tmp_path), 'pretrain_mlit_xxs', 'encoder.safetensors')
    pre = plan.stages[0]
    assert pre.argv[1:3] == ['-m', 'timm_mlit.pretrain'] and _arg(pre.argv, '--data-dir') == '/data/fmnist'
    assert '--train-num-samples' not in pre.argv and _arg(pre.argv, '--epochs') == '2'
    assert plan.n_pretrain == 60000 and plan.n_train == 10000 and plan.n_test == 10000
    # every row evaluated alike: its final checkpoint, validate.py, the full test set in the source folder
    evals = [s for s in plan.stages if s.kind == 'eval']
    for s in evals:
        assert s.argv[3] == '/scripts/validate.py' and _arg(s.argv, '--data-dir') == '/data/fmnist'
        assert _arg(s.argv, '--checkpoint').endswith('last.pth.tar')
    common = [tuple(a for a in s.argv if a not in strip and not a.startswith(str(tmp_path))
                    and a not in ('mlit_xxs',)) for s in evals]
    assert len(set(common)) == 1
    # the budget: the whole comparison at the measured 2-core throughput fits 90 minutes with room to spare
    assert sum(s.nominal_s for s in plan.stages) < 75 * 60


def test_full_plan_has_all_sizes_and_recipe_epochs(tmp_path):
    plan = fm.make_plan(fm.BUDGETS['full'], str(tmp_path), '/data/fmnist', '/scripts', device='cuda')
    assert [r.key for r in plan.rows] == ['mmlit_xxs', 'mlit_xxs', 'mmlit_xs', 'mlit_xs', 'mmlit_s', 'mlit_s',
                                         'vit_dense', 'resnet10t']
    train = _train_stages(plan)
    assert {_arg(s.argv, '--epochs') for s in train.values()} == {'100'}
    assert {_arg(s.argv, '--data-dir') for s in train.values()} == {'/data/fmnist'}  # all 60k labelled images
    assert all('--amp' in s.argv and _arg(s.argv, '--amp-dtype') == 'bfloat16' for s in train.values())
    assert plan.pretrain_epochs == {'mlit_xxs': 8000, 'mlit_xs': 6000, 'mlit_s': 4000}  # Table 3
    assert _arg(train['scratch_mlit_s'].argv, '--model') == 'mlit_s'


# ---------------------------------------------------------------- data

def test_labelled_subset_is_first_per_class_and_readable(tmp_path, fake_fmnist):
    from timm_mlit.data import IdxFashionMNIST
    src, labels = fake_fmnist
    budget = dataclasses.replace(fm.BUDGETS['cpu'], labelled_per_class=3)
    plan = fm.make_plan(budget, str(tmp_path), src, '/scripts')
    fm.prepare_data(plan, src, log=lambda m: None)
    train = IdxFashionMNIST(plan.data_dir, train=True)
    test = IdxFashionMNIST(plan.data_dir, train=False)
    expected = sorted(i for c in range(10) for i in np.flatnonzero(labels == c)[:3])
    assert [int(train.data[k, 0, 0]) for k in range(len(train))] == expected  # pixel value = source index
    assert train.targets.tolist() == labels[expected].tolist()
    assert len(test) == 20  # the whole test set, linked
    before = os.path.getmtime(os.path.join(plan.data_dir, 'train-images-idx3-ubyte'))
    fm.prepare_data(plan, src, log=lambda m: pytest.fail('rewrote an up-to-date subset'))
    assert os.path.getmtime(os.path.join(plan.data_dir, 'train-images-idx3-ubyte')) == before


# ---------------------------------------------------------------- running, skipping, resuming (fake runner)

TOP1 = {'finetune_mlit_xxs': 87.125, 'scratch_mlit_xxs': 84.5, 'scratch_vit_dense': 83.0, 'scratch_resnet10t': 89.75}
PARAMS = {'finetune_mlit_xxs': 652463, 'scratch_mlit_xxs': 652463, 'scratch_vit_dense': 870598,
          'scratch_resnet10t': 4927618}


class FakeRunner:
    """Stands in for train.py / timm-mlit-pretrain / validate.py: writes what they write (a checkpoint per epoch,
    progress lines, the encoder, validate's results file and log lines). `kill_at=(stage, epoch)` dies (status 1)
    right after that epoch's checkpoint; `interrupt_at` exits 0 early, as train.py does on Ctrl-C."""

    def __init__(self, kill_at=None, interrupt_at=None):
        self.calls, self.kill_at, self.interrupt_at = [], kill_at, interrupt_at

    def __call__(self, argv, log_path, on_poll):
        self.calls.append(list(argv))
        log = open(log_path, 'a')
        if 'validate.py' in ' '.join(argv):
            name = os.path.basename(os.path.dirname(_arg(argv, '--checkpoint')))
            assert torch.load(_arg(argv, '--checkpoint'), weights_only=False)['epoch'] >= 0
            text = (f'Model {_arg(argv, "--model")} created, param count: {PARAMS[name]}\n'
                    'Test: [   0/2]  Time: 0.600s (0.600s,  426.67/s)  Loss: 1 (1)\n'
                    'Test: [   1/2]  Time: 0.400s (0.500s,  512.00/s)  Loss: 1 (1)\n')
            log.write(text)
            log.close()
            on_poll(text)
            with open(_arg(argv, '--results-file'), 'w') as f:
                json.dump(dict(model=_arg(argv, '--model'), top1=TOP1[name], top5=99.0), f)
            return 0
        name, epochs = _arg(argv, '--experiment'), int(_arg(argv, '--epochs'))
        d = os.path.join(_arg(argv, '--output'), name)
        os.makedirs(d, exist_ok=True)
        start = torch.load(_arg(argv, '--resume'), weights_only=False)['epoch'] + 1 if '--resume' in argv else 0
        for epoch in range(start, epochs):
            text = f'Train: {epoch} [   0/4 (  0%)]  Loss: 2.0\nTrain: {epoch} [   3/4 (100%)]  Loss: 1.0\n'
            log.write(text)
            log.flush()
            on_poll(text)
            torch.save({'epoch': epoch}, os.path.join(d, 'last.pth.tar'))
            if self.kill_at == (name, epoch):
                return 1
            if self.interrupt_at == (name, epoch):
                return 0
        if '-m' in argv and 'timm_mlit.pretrain' in argv:
            with open(os.path.join(d, 'encoder.safetensors'), 'wb') as f:
                f.write(b'encoder')
        return 0


@pytest.fixture
def bench(tmp_path, fake_fmnist):
    src, _ = fake_fmnist

    def run(runner, *extra):
        return fm.main(['--budget', 'cpu', '--out', str(tmp_path / 'out'), '--results-dir', str(tmp_path / 'res'),
                        '--data-dir', src, '--timm-scripts', str(tmp_path / 'scripts'), '--device', 'cpu', '-j', '1',
                        *extra], runner=runner)
    return run, tmp_path


def _stage_of(argv):
    if 'validate.py' in ' '.join(argv):
        return 'eval:' + os.path.basename(os.path.dirname(_arg(argv, '--checkpoint')))
    return _arg(argv, '--experiment')


def test_full_run_writes_the_table_from_the_evaluations(bench):
    run, tmp = bench
    runner = FakeRunner()
    assert run(runner) == 0
    assert [_stage_of(c) for c in runner.calls] == [
        'pretrain_mlit_xxs', 'finetune_mlit_xxs', 'eval:finetune_mlit_xxs', 'scratch_mlit_xxs',
        'eval:scratch_mlit_xxs', 'scratch_vit_dense', 'eval:scratch_vit_dense', 'scratch_resnet10t',
        'eval:scratch_resnet10t']
    assert not any('--resume' in c for c in runner.calls)
    res = json.loads((tmp / 'res' / 'fashion_mnist_cpu.json').read_text())
    assert res['meta']['complete'] is True and res['meta']['budget'] == 'cpu'
    assert res['meta']['epochs'] == 5 and res['meta']['pretrain_epochs'] == {'mlit_xxs': 2}
    assert res['meta']['code']['checkout'] == ROOT and res['meta']['code']['timm_mlit'].endswith('timm_mlit')
    rows = {r['key']: r for r in res['rows']}
    assert list(rows) == ['mmlit_xxs', 'mlit_xxs', 'vit_dense', 'resnet10t']
    assert rows['mmlit_xxs']['top1'] == 87.125 and rows['mlit_xxs']['top1'] == 84.5
    assert rows['vit_dense']['params'] == 870598
    assert rows['mmlit_xxs']['pretrain_epochs'] == 2 and rows['mmlit_xxs']['epochs'] == rows['mlit_xxs']['epochs'] == 5
    assert rows['mlit_xxs']['pretrain_epochs'] == 0 and rows['mlit_xxs']['encoder'] is None
    assert rows['mlit_xxs']['test_img_s'] == round(10000 / (2 * 0.5), 1)
    assert rows['mmlit_xxs']['train_images'] == 10000 and rows['mmlit_xxs']['pretrain_images'] == 60000
    assert rows['mmlit_xxs']['wall_s'] == pytest.approx(
        rows['mmlit_xxs']['pretrain_wall_s'] + rows['mmlit_xxs']['train_wall_s'], abs=0.11)
    out = tmp / 'out'
    assert res['weights']['mmlit_xxs_finetuned_checkpoint'] == str(out / 'finetune_mlit_xxs' / 'last.pth.tar')
    assert res['weights']['mmlit_xxs_pretrained_encoder'] == str(out / 'pretrain_mlit_xxs' / 'encoder.safetensors')
    # the markdown rows are the JSON rows
    md = (tmp / 'res' / 'fashion_mnist_cpu.md').read_text()
    table = [line for line in md.splitlines() if line.startswith('| ') and not line.startswith('| Model')]
    assert len(table) == 4 and 'Incomplete' not in md
    for line, r in zip(table, res['rows']):
        cells = [c.strip() for c in line.strip('|').split('|')]
        assert cells[0] == r['model'] and cells[1] == f'{r["params"]:,}'
        assert cells[2] == f'{r["pretrain_epochs"]} + {r["epochs"]}' and cells[3] == f'{r["top1"]:.2f}'
    assert 'Hardware:' in md and 'Like for like' in md


def test_rerun_after_kill_skips_finished_stages_and_resumes(bench):
    run, tmp = bench
    with pytest.raises(SystemExit, match='scratch_mlit_xxs failed.*re-run the same command to resume'):
        run(FakeRunner(kill_at=('scratch_mlit_xxs', 2)))
    partial = json.loads((tmp / 'res' / 'fashion_mnist_cpu.json').read_text())
    assert partial['meta']['complete'] is False and [r['key'] for r in partial['rows']] == ['mmlit_xxs']
    assert 'Incomplete: 1 of 4 rows' in (tmp / 'res' / 'fashion_mnist_cpu.md').read_text()
    wall_before = json.loads((tmp / 'out' / 'scratch_mlit_xxs' / 'wall.json').read_text())['wall_s']

    runner = FakeRunner()
    assert run(runner) == 0
    stages = [_stage_of(c) for c in runner.calls]
    assert stages[0] == 'scratch_mlit_xxs'  # pre-training, fine-tuning and its evaluation were skipped
    assert _arg(runner.calls[0], '--resume') == str(tmp / 'out' / 'scratch_mlit_xxs' / 'last.pth.tar')
    assert not any('--resume' in c for c in runner.calls[1:])
    log = (tmp / 'out' / 'benchmark.log').read_text()
    for name in ('pretrain_mlit_xxs', 'finetune_mlit_xxs', 'eval_mmlit_xxs'):
        assert f'{name}: done already, skipped' in log
    assert 'scratch_mlit_xxs: resuming from' in log
    done = json.loads((tmp / 'out' / 'scratch_mlit_xxs' / 'done.json').read_text())
    assert done['attempts_wall_s']['earlier'] == pytest.approx(wall_before, abs=0.11)
    assert torch.load(tmp / 'out' / 'scratch_mlit_xxs' / 'last.pth.tar', weights_only=False)['epoch'] == 4
    assert json.loads((tmp / 'res' / 'fashion_mnist_cpu.json').read_text())['meta']['complete'] is True

    runner = FakeRunner()  # everything done: nothing runs, the table is rewritten
    assert run(runner) == 0 and runner.calls == []


def test_clean_exit_before_the_last_epoch_is_a_failure(bench):
    run, tmp = bench
    with pytest.raises(SystemExit, match='pretrain_mlit_xxs did not finish'):
        run(FakeRunner(interrupt_at=('pretrain_mlit_xxs', 0)))
    assert not (tmp / 'out' / 'pretrain_mlit_xxs' / 'done.json').exists()


def test_outputs_complete_without_done_marker_are_recorded_without_rerunning(bench):
    run, tmp = bench
    assert run(FakeRunner()) == 0
    os.remove(tmp / 'out' / 'finetune_mlit_xxs' / 'done.json')  # killed between the last checkpoint and done.json
    runner = FakeRunner()
    assert run(runner) == 0 and runner.calls == []
    assert (tmp / 'out' / 'finetune_mlit_xxs' / 'done.json').exists()


def test_second_run_on_the_same_folder_is_refused(bench):
    import fcntl
    run, tmp = bench
    os.makedirs(tmp / 'out')
    with open(tmp / 'out' / '.lock', 'w') as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit, match='another fashion_mnist.py is running'):
            run(FakeRunner())


def test_missing_timm_scripts_is_a_clear_error(tmp_path, fake_fmnist, monkeypatch):
    monkeypatch.delenv('TIMM_SCRIPTS_DIR', raising=False)
    with pytest.raises(SystemExit, match='TIMM_SCRIPTS_DIR'):
        fm.main(['--out', str(tmp_path), '--data-dir', fake_fmnist[0], '--timm-scripts', str(tmp_path)])
    assert not os.path.exists(tmp_path / 'pretrain_mlit_xxs')


def test_progress_log_estimates_time_left(tmp_path, fake_fmnist, capsys):
    src, _ = fake_fmnist
    plan = fm.make_plan(dataclasses.replace(fm.BUDGETS['cpu'], labelled_per_class=2), str(tmp_path), src, '/s')
    orch = fm.Orchestrator(plan, runner=FakeRunner(), log_file=str(tmp_path / 'log'), report_s=0)
    fm.prepare_data(plan, src, orch.log)
    orch.run_stage(0)
    log = (tmp_path / 'log').read_text()
    assert re.search(r'pretrain_mlit_xxs: \d+% after \d+m\d\ds, ~\d+m\d\ds left in this stage; ~\S+ left overall '
                     r'\(ETA \d\d:\d\d', log)
    assert 'done in' in log


def test_progress_log_of_a_resumed_stage_counts_the_earlier_attempts_time(tmp_path, fake_fmnist):
    # A resumed stage reports its first progress line at the epochs the killed attempt finished: 50% here, after
    # 1000 s of earlier attempts. The time left must come from those 1000 s, not from this attempt's second.
    src, _ = fake_fmnist
    plan = fm.make_plan(dataclasses.replace(fm.BUDGETS['cpu'], labelled_per_class=2), str(tmp_path), src, '/s')
    stage = plan.stages[0]
    assert stage.kind == 'pretrain' and stage.epochs == 2
    d = fm.stage_dir(plan, stage)
    os.makedirs(d)
    with open(os.path.join(d, 'wall.json'), 'w') as f:
        json.dump({'wall_s': 1000.}, f)

    def resumed(argv, log_path, on_poll):  # one progress line, then killed
        on_poll('Train: 0 [  10/10] loss 0.6 (masked 0.5) lr 0 16.6 img/s\n')
        return 1

    orch = fm.Orchestrator(plan, runner=resumed, log_file=str(tmp_path / 'log'), report_s=0)
    with pytest.raises(fm.BenchmarkError):
        orch.run_stage(0)
    m = re.search(r'pretrain_mlit_xxs: 50% after (\d+)m(\d\d)s, ~(\d+)m(\d\d)s left in this stage',
                  (tmp_path / 'log').read_text())
    assert m, (tmp_path / 'log').read_text()
    after, left = int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])
    assert 1000 <= after < 1060 and 1000 <= left < 1060
    # finished on a second resume: the stage's time, earlier attempts included, sets the slowdown of what follows
    orch.runner = FakeRunner()
    orch.run_stage(0)
    assert orch.slowdown_done[0] >= 1000 and orch.slowdown_done[1] == stage.nominal_s
    assert re.search(r'pretrain_mlit_xxs: done in (1[6-9])m\d\ds', (tmp_path / 'log').read_text())


# ---------------------------------------------------------------- parsing helpers

def test_parse_progress_reads_the_scripts_log_lines():
    train = ('Train: 0 [   9/10 (100%)]  Loss: 2.14 (2.24)  Time: 3.370s\n'
             'Train: 1 [   4/10 ( 50%)]  Loss: 2.0 (2.0)  Time: 3.0s\n')
    assert fm.parse_progress('train', train, 4) == pytest.approx((1 + 5 / 10) / 4)
    pre = 'Train: 0 [  10/10] loss 0.63818 (masked 0.56) lr 0 16.6 img/s\n'
    assert fm.parse_progress('pretrain', pre, 2) == pytest.approx(0.5)
    assert fm.parse_progress('eval', 'Test: [   9/40]  Time: 0.3s (0.3s, 800/s)', 1) == pytest.approx(0.25)
    assert fm.parse_progress('train', 'Scheduled epochs: 5', 5) is None


def test_latest_checkpoint_falls_back_to_numbered(tmp_path):
    assert fm.latest_checkpoint(str(tmp_path)) is None
    for e in (3, 11):
        torch.save({'epoch': e}, tmp_path / f'checkpoint-{e}.pth.tar')
    (tmp_path / 'tmp.pth.tar').write_bytes(b'half written')
    assert fm.latest_checkpoint(str(tmp_path)) == str(tmp_path / 'checkpoint-11.pth.tar')
    torch.save({'epoch': 12}, tmp_path / 'last.pth.tar')
    assert fm.latest_checkpoint(str(tmp_path)) == str(tmp_path / 'last.pth.tar')


# ---------------------------------------------------------------- the real pipeline

@pytest.mark.slow
@pytest.mark.skipif(not SCRIPTS_DIR, reason='TIMM_SCRIPTS_DIR is not set: point it at a pytorch-image-models '
                                           'checkout (train.py, validate.py)')
@pytest.mark.skipif(not os.path.isdir(fm.DEFAULT_DATA), reason='needs apt-get install dataset-fashion-mnist')
def test_smoke_pipeline_with_timm_scripts(tmp_path):
    cmd = [sys.executable, SCRIPT, '--smoke', '--out', str(tmp_path), '-j', '1', '--device', 'cpu']
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / 'fashion_mnist_smoke.json').read_text())
    assert res['meta']['complete'] and len(res['rows']) == 4
    assert all(0 <= row['top1'] <= 100 and row['params'] > 0 for row in res['rows'])
    assert os.path.isfile(res['weights']['mmlit_xxs_pretrained_encoder'])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)  # all done: skips every stage
    assert r.returncode == 0 and r.stdout.count('done already, skipped') == 9
