"""End-to-end tests of the pre-training program (timm_mlit.pretrain), on tiny synthetic image folders."""
import csv
import errno
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from test_files import dead_pid

import timm_mlit  # noqa: F401
from timm_mlit import precision
from timm_mlit.files import lock_folder
from timm_mlit.pretrain import PretrainError, main

# a 3-layer encoder, no gate noise / MoE dropout: small, fast and deterministic up to the data pipeline
TINY = ['--model', 'mlit_xxs', '--model-kwargs', 'depth=3', '--workers', '0', '--warmup-epochs', '1',
        '--log-interval', '1']
NOISE_FREE = ['--model-kwargs', 'depth=3', 'noisy_gating=False', 'moe_drop_rate=0',
              '--mae-kwargs', 'decoder_noisy_gating=False', 'decoder_moe_drop_rate=0', '--beta', '0',
              '--no-amp']  # (float32 whatever the CPU: these runs are compared at float32 tolerance)


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('imgs')
    rng = np.random.default_rng(0)
    for c in range(2):
        os.makedirs(root / 'train' / f'c{c}')
        for i in range(12):
            img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / 'train' / f'c{c}' / f'{i}.png')
    return str(root)


def run(tmp_path, image_folder, name, *extra):
    argv = ['--data-dir', image_folder, '--output', str(tmp_path), '--experiment', name, *TINY, *extra]
    assert main(argv) == 0
    return tmp_path / name


def summary(run_dir):
    with open(run_dir / 'summary.csv') as f:
        return list(csv.DictReader(f))


def state(path):
    return torch.load(path, map_location='cpu', weights_only=True)['state_dict']


def assert_same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


@pytest.mark.slow
def test_run_writes_logs_checkpoints_plot_and_encoder(tmp_path, image_folder, caplog):
    caplog.set_level('INFO')
    out = run(tmp_path, image_folder, 'a', '--epochs', '3', '-b', '8', '--checkpoint-hist', '2')
    rows = summary(out)
    assert [r['epoch'] for r in rows] == ['0', '1', '2']
    for key in ('train_loss', 'train_loss_masked', 'train_loss_unmasked', 'train_loss_moe', 'lr',
                'train_img_per_sec', 'train_min_expert_share'):
        assert key in rows[0]
    assert sorted(p for p in os.listdir(out) if p.startswith('checkpoint')) == [
        'checkpoint-1.pth.tar', 'checkpoint-2.pth.tar']  # only the last 2 kept
    assert os.path.samefile(out / 'last.pth.tar', out / 'checkpoint-2.pth.tar')
    assert not [p for p in os.listdir(out) if '.tmp' in p]
    with open(out / 'expert_load.csv') as f:
        load = list(csv.DictReader(f))
    layers = {r['layer'] for r in load}
    assert len(layers) == 3 + 4  # every encoder and decoder MoE layer
    per_layer = {}
    for r in load:
        if r['epoch'] == '2':
            per_layer[r['layer']] = per_layer.get(r['layer'], 0.) + float(r['share'])
    assert all(abs(s - 1) < 1e-4 for s in per_layer.values())
    assert (out / 'loss.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    logs = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Train: 1 [')]
    assert logs and all(w in logs[0] for w in ('loss', 'masked', 'unmasked', 'moe', 'lr', 'img/s'))
    # the exported encoder is head-less and loads into timm
    enc = load_file(out / 'encoder.safetensors')
    assert not any(k.startswith('head') for k in enc)
    ckpt = state(out / 'last.pth.tar')
    for k, v in enc.items():
        assert torch.equal(v, ckpt['encoder.' + k])


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path, image_folder):
    args = ['--epochs', '3', '-b', '8', '--model-kwargs', 'depth=3']  # gate noise and dropout on: RNG state matters
    full = run(tmp_path, image_folder, 'full', *args)
    # the run "stopped" after epoch 0: its checkpoint is all that is left of it
    os.makedirs(tmp_path / 'stopped')
    shutil.copy(full / 'checkpoint-0.pth.tar', tmp_path / 'stopped' / 'last.pth.tar')
    assert main(['--data-dir', image_folder, *TINY, *args, '--resume', str(tmp_path / 'stopped' / 'last.pth.tar')]) == 0
    resumed = summary(tmp_path / 'stopped')
    assert [r['epoch'] for r in resumed] == ['1', '2']
    for a, b in zip(summary(full)[1:], resumed):
        for k in ('train_loss', 'train_loss_masked', 'train_loss_unmasked', 'train_loss_moe', 'lr'):
            assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-6, abs=1e-9), k
    assert_same_weights(state(full / 'last.pth.tar'), state(tmp_path / 'stopped' / 'last.pth.tar'))


@pytest.mark.slow
def test_grad_accumulation_equals_the_large_batch(tmp_path, image_folder):
    common = ['--epochs', '1', '--opt', 'sgd', '--lr', '0.05', *NOISE_FREE]
    big = run(tmp_path, image_folder, 'big', *common, '-b', '8')
    acc = run(tmp_path, image_folder, 'acc', *common, '-b', '4', '--grad-accum-steps', '2')
    assert_same_weights(state(big / 'last.pth.tar'), state(acc / 'last.pth.tar'), atol=1e-5)


@pytest.mark.slow
def test_two_process_torchrun_equals_one_process(tmp_path, image_folder):
    """2 ranks x batch 4 == 1 process x batch 8. Gate noise, MoE dropout and the balance loss (a CV² over each
    rank's own tokens) are per-rank quantities, so they are switched off; masks and augmentation are keyed on the
    sample index (data.MAEPretrainDataset) and the sampler splits one permutation, so both runs see the same
    images with the same masks at every step. SGD keeps the comparison at float tolerance (Adam's first steps
    amplify rounding in near-zero gradients)."""
    common = ['--data-dir', image_folder, *TINY, '--epochs', '2', '--opt', 'sgd', '--lr', '0.05', *NOISE_FREE,
              '--device', 'cpu', '--output', str(tmp_path)]
    one = run(tmp_path, image_folder, 'one', *common[common.index('--epochs'):-4], '-b', '8')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           '-m', 'timm_mlit.pretrain', *common, '-b', '4', '--experiment', 'two']
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert '2 process(es), global batch 8' in proc.stderr + proc.stdout
    for a, b in zip(summary(one), summary(tmp_path / 'two')):
        assert float(a['train_loss']) == pytest.approx(float(b['train_loss']), rel=1e-5)
    assert_same_weights(state(one / 'last.pth.tar'), state(tmp_path / 'two' / 'last.pth.tar'), atol=1e-5)


@pytest.mark.slow
def test_pretraining_picks_bfloat16_where_the_cpu_has_it_no_amp_keeps_float32_and_so_does_its_resume(
        tmp_path, image_folder, monkeypatch, caplog):
    import logging
    caplog.set_level(logging.INFO, logger='timm_mlit.pretrain')
    monkeypatch.setattr(precision, 'cpu_has_bf16', lambda: True)  # as on a CPU with bf16 units
    monkeypatch.delenv(precision.PRECISION_ENV, raising=False)
    run(tmp_path, image_folder, 'auto', '--epochs', '1', '-b', '8', '--device', 'cpu')
    assert 'precision: bfloat16 autocast (cpu has bfloat16 units)' in caplog.text
    assert yaml.safe_load((tmp_path / 'auto' / 'args.yaml').read_text())['amp_dtype'] == 'bfloat16'  # as it ran
    caplog.clear()
    fp32 = run(tmp_path, image_folder, 'fp32', '--epochs', '1', '-b', '8', '--device', 'cpu', '--no-amp')
    assert 'precision: float32' in caplog.text and 'bfloat16' not in caplog.text
    recorded = yaml.safe_load((fp32 / 'args.yaml').read_text())
    assert recorded['amp'] is False and recorded['amp_dtype'] is None
    caplog.clear()  # resumed with no precision given: it stays float32 on this bfloat16 machine
    run(tmp_path, image_folder, 'fp32', '--epochs', '2', '-b', '8', '--device', 'cpu',
        '--resume', str(fp32 / 'last.pth.tar'))
    assert 'precision: float32 (as the resumed run was trained)' in caplog.text
    caplog.clear()  # --amp-dtype alone asks for autocast
    run(tmp_path, image_folder, 'dtype', '--epochs', '1', '-b', '8', '--device', 'cpu', '--amp-dtype', 'bfloat16')
    assert 'precision: bfloat16 autocast (--amp-dtype bfloat16)' in caplog.text


@pytest.mark.slow
def test_exported_encoder_loads_for_fine_tuning(tmp_path, image_folder):
    out = run(tmp_path, image_folder, 'e', '--epochs', '1', '-b', '8')
    path = str(out / 'encoder.safetensors')
    enc = load_file(path)
    # as timm's train.py --pretrained-path does it (num_classes=-1 forces head adaptation)
    m = timm.create_model('mlit_xxs', depth=3, pretrained=True, num_classes=10,
                          pretrained_cfg_overlay=dict(file=path, num_classes=-1))
    assert m.head.out_features == 10
    for k, v in enc.items():
        assert torch.equal(m.state_dict()[k], v), k
    # head-less, as a feature extractor
    m = timm.create_model('mlit_xxs', depth=3, pretrained=True, num_classes=0,
                          pretrained_cfg_overlay=dict(file=path, num_classes=0))
    assert torch.equal(m.pos_embed, enc['pos_embed'])
    # --export-only writes the same file from any checkpoint
    again = tmp_path / 'again.safetensors'
    assert main(['--export-only', str(out / 'checkpoint-0.pth.tar'), '--export-path', str(again)]) == 0
    assert load_file(again).keys() == enc.keys()


@pytest.mark.parametrize('name, classes', [('mlit_xxs.untrained', 100), ('mlit_xxs', 10)])
def test_exported_encoder_loads_with_the_default_class_count(tmp_path, name, classes):
    """timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH)): the cfg and the model
    both say `classes` (the tag's; mlit_xxs's default tag is the 10-class Fashion-MNIST one), so timm loads
    strictly: the model's filter keeps the model's fresh head."""
    from timm_mlit.pretrain import export_encoder
    enc = timm.create_model('mlit_xxs', depth=3, num_classes=0)
    path = export_encoder({'encoder.' + k: v for k, v in enc.state_dict().items()}, str(tmp_path / 'e.safetensors'))
    m = timm.create_model(name, depth=3, pretrained=True, pretrained_cfg_overlay=dict(file=path))
    assert torch.equal(m.pos_embed, enc.pos_embed)
    assert m.head.out_features == classes


# ---------------------------------------------------------------- bad input gives a clear error

def test_missing_data_dir(tmp_path):
    with pytest.raises(SystemExit, match='data dir .* does not exist'):
        main(['--data-dir', str(tmp_path / 'missing'), '--output', str(tmp_path)])
    assert not os.listdir(tmp_path)


def test_a_data_dir_that_is_a_file_or_an_image_folder_with_an_unreadable_class_is_named(tmp_path, monkeypatch):
    from test_data import deny_reading
    (tmp_path / 'file').write_text('')
    with pytest.raises(SystemExit, match='data dir .*file is a file, not a folder'):
        main(['--data-dir', str(tmp_path / 'file'), '--output', str(tmp_path / 'out')])
    images = tmp_path / 'images'
    for name in ('cat', 'dog'):
        (images / 'train' / name).mkdir(parents=True)
    deny_reading(monkeypatch, images / 'train' / 'dog')
    with pytest.raises(SystemExit, match=f'cannot read the folder {images}/train/dog'):
        main(['--data-dir', str(images), '--output', str(tmp_path / 'out')])
    assert not (tmp_path / 'out').exists()


def test_unknown_model(tmp_path, image_folder):
    with pytest.raises(SystemExit, match="unknown model 'mlit_huge'"):
        main(['--data-dir', image_folder, '--model', 'mlit_huge', '--output', str(tmp_path)])
    with pytest.raises(SystemExit, match='not an mLiT model'):
        main(['--data-dir', image_folder, '--model', 'resnet18', '--output', str(tmp_path)])


def test_config_key_that_is_not_an_argument(tmp_path, capsys):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('model: mlit_xxs\nlearning_rate: 0.1\n')
    with pytest.raises(SystemExit):
        main(['-c', str(cfg)])
    assert 'learning_rate is not an argument' in capsys.readouterr().err


def test_config_values_are_read_and_the_command_line_wins(tmp_path, image_folder):
    from timm_mlit.pretrain_args import parse_args as _parse_args
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('model: mlit_xs\nbatch_size: 33\nepochs: 7\n')
    args = _parse_args(['-c', str(cfg), '--epochs', '9'])
    assert (args.model, args.batch_size, args.epochs) == ('mlit_xs', 33, 9)
    assert _parse_args([]).batch_size == 256  # an earlier config does not leak


@pytest.mark.parametrize('name', ['mmlit_s_cifar100', 'mmlit_xs_cifar100', 'mmlit_xxs_cifar100'])
def test_cifar100_configs_are_table_3(name):
    from timm_mlit.pretrain_args import parse_args as _parse_args
    cfg = os.path.join(os.path.dirname(__file__), '..', 'train_configs', 'pretrain', f'{name}.yaml')
    a = _parse_args(['-c', cfg])
    size = name.split('_')[1]
    assert (a.epochs, a.warmup_epochs, a.batch_size) == {
        's': (4000, 200, 840), 'xs': (6000, 300, 1280), 'xxs': (8000, 400, 1280)}[size]
    assert (a.model, a.dataset, a.opt, a.weight_decay, a.lr_base, a.lr_base_size, a.sched) == (
        f'mlit_{size}', 'torch/cifar100', 'adamw', 0.05, 3e-4, 256, 'cosine')
    assert (a.scale, a.hflip, a.mean, a.std, a.alpha, a.beta, a.mask_ratio) == (
        [0.6, 1.0], 0.5, [0.5] * 3, [0.5] * 3, 0.1, 0.5, 0.75)
    assert a.amp and a.amp_dtype == 'float16'


@pytest.mark.slow
def test_bad_resume_file_is_refused_and_nothing_is_lost(tmp_path, image_folder):
    out = run(tmp_path, image_folder, 'r', '--epochs', '1', '-b', '8')
    before = {p: (out / p).read_bytes() for p in os.listdir(out)}
    broken = out / 'broken.pth.tar'
    broken.write_bytes((out / 'last.pth.tar').read_bytes()[:1000])
    with pytest.raises(SystemExit, match='unreadable'):
        main(['--data-dir', image_folder, *TINY, '--resume', str(broken)])
    with pytest.raises(SystemExit, match='belongs to model mlit_xxs'):
        main(['--data-dir', image_folder, *TINY[:2], '--model-kwargs', 'depth=6', '--workers', '0',
              '--resume', str(out / 'last.pth.tar')])
    with pytest.raises(SystemExit, match='not a timm-mlit pre-training checkpoint'):
        torch.save({'state_dict': {}}, tmp_path / 'other.pth')
        main(['--data-dir', image_folder, *TINY, '--resume', str(tmp_path / 'other.pth')])
    broken.unlink()
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before


def test_fp16_on_cpu_is_refused(tmp_path, image_folder):
    with pytest.raises(SystemExit, match='bfloat16'):
        main(['--data-dir', image_folder, '--amp', '--amp-dtype', 'float16', '--device', 'cpu',
              '--output', str(tmp_path)])


def test_library_functions_raise_ordinary_errors_and_only_main_exits(tmp_path, image_folder):
    from timm_mlit.pretrain import build_dataset, build_model
    from timm_mlit.pretrain_args import parse_args as _parse_args
    with pytest.raises(PretrainError, match="unknown model 'mlit_huge'") as e:
        build_model(_parse_args(['--model', 'mlit_huge']))
    assert isinstance(e.value, ValueError) and not isinstance(e.value, SystemExit)
    args = _parse_args(['--data-dir', str(tmp_path / 'missing'), *TINY])
    with pytest.raises(PretrainError, match='data dir .* does not exist'):
        build_dataset(args, build_model(args))
    with pytest.raises(SystemExit) as e:  # main: the same message, one line, status 1
        main(['--data-dir', image_folder, '--model', 'mlit_huge', '--output', str(tmp_path / 'out')])
    assert str(e.value) == "timm-mlit-pretrain: error: unknown model 'mlit_huge'; mLiT models: " + ', '.join(
        timm.list_models(module='mlit'))
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('argv, match', [
    (['--mask-ratio', '0'], r'mask_ratio must be in \(0, 1\)'),
    (['--mae-kwargs', 'decoder_nosiy_gating=False'], 'decoder_nosiy_gating'),
])
def test_bad_mae_settings_are_refused_before_anything_is_written(tmp_path, image_folder, argv, match):
    with pytest.raises(SystemExit, match=match):
        main(['--data-dir', image_folder, '--output', str(tmp_path), *argv])
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------- resume: the schedule follows the arguments

@pytest.mark.slow
def test_extending_a_run_trains_the_new_epochs_on_the_new_schedule(tmp_path, image_folder, caplog):
    args = ['-b', '8', *NOISE_FREE, '--warmup-epochs', '0', '--lr', '1e-3']
    short = run(tmp_path, image_folder, 'short', *args, '--epochs', '2')
    before = state(short / 'last.pth.tar')
    caplog.set_level('WARNING')
    resume = ['--resume', str(short / 'last.pth.tar')]
    assert main(['--data-dir', image_folder, *TINY, *args, '--epochs', '4', *resume]) == 0
    rows = summary(short)
    assert [r['epoch'] for r in rows] == ['0', '1', '2', '3']
    # the lr of the new epochs is the 4-epoch schedule's, as in an uninterrupted 4-epoch run (not the finished
    # 2-epoch schedule's 0); summary.csv holds the lr at the end of each epoch
    full = summary(run(tmp_path, image_folder, 'full', *args, '--epochs', '4'))
    assert float(rows[2]['lr']) > 0
    for extended, uninterrupted in zip(rows[2:], full[2:]):
        assert float(extended['lr']) == pytest.approx(float(uninterrupted['lr']), rel=1e-6, abs=1e-12)
    after = state(short / 'last.pth.tar')
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the new epochs trained
    assert any('--epochs 2 -> 4' in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_resuming_a_finished_run_says_there_is_nothing_to_train(tmp_path, image_folder):
    out = run(tmp_path, image_folder, 'done', '-b', '8', '--epochs', '2')
    before = {p: (out / p).read_bytes() for p in os.listdir(out)}
    for epochs in ('1', '2'):
        with pytest.raises(SystemExit, match='finished 2 epoch.*nothing left to train.*--epochs larger than 2'):
            main(['--data-dir', image_folder, *TINY, '-b', '8', '--epochs', epochs,
                  '--resume', str(out / 'last.pth.tar')])
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before


def test_train_py_checkpoint_is_named_with_what_to_do(tmp_path, image_folder):
    import argparse
    model = timm.create_model('mlit_xxs', num_classes=10, depth=3)
    path = tmp_path / 'model_best.pth.tar'
    torch.save({'epoch': 4, 'arch': 'mlit_xxs', 'state_dict': model.state_dict(), 'optimizer': {},
                'args': argparse.Namespace(model='mlit_xxs', lr=1e-3)}, path)
    for flag in ('--resume', '--export-only'):
        with pytest.raises(SystemExit) as e:
            main(['--data-dir', image_folder, *TINY, flag, str(path), '--output', str(tmp_path / 'out')])
        msg = str(e.value)
        assert 'timm train.py checkpoint (mlit_xxs, epoch 4)' in msg and 'timm-mlit-run train.py --resume' in msg
        assert '\x1b[' not in msg and 'weights_only' not in msg
    assert not (tmp_path / 'out').exists()


# ---------------------------------------------------------------- bad arguments: one line, before anything is written

@pytest.mark.parametrize('argv, match', [
    (['-b', '0'], '--batch-size must be at least 1, got 0'),
    (['--epochs', '0'], '--epochs must be at least 1, got 0'),
    (['--workers', '-1'], '--workers must be at least 0, got -1'),
    (['--lr', 'nan'], '--lr must be a finite number, got nan'),
    (['--lr', '-1'], '--lr must be above 0'),
    (['--sched', 'bogus'], "--sched 'bogus' is not a timm schedule"),
    (['--opt', 'bogus'], "--opt 'bogus' is not a timm optimizer"),
    (['--grad-accum-steps', '0'], '--grad-accum-steps must be at least 1'),
    (['--amp', '--amp-dtype', 'int8'], '--amp-dtype must be float16 or bfloat16'),
    (['--device', 'gpu0'], "--device 'gpu0' is not a device"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, image_folder, argv, match):
    out = tmp_path / 'out'
    with pytest.raises(SystemExit, match=match) as e:
        main(['--data-dir', image_folder, '--output', str(out), *argv])
    assert str(e.value).startswith('timm-mlit-pretrain: error: ') and '\n' not in str(e.value)
    assert not out.exists()


def test_bad_values_in_a_config_file_are_caught_too(tmp_path, image_folder):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('batch_size: 0\n')
    with pytest.raises(SystemExit, match='--batch-size must be at least 1'):
        main(['-c', str(cfg), '--data-dir', image_folder, '--output', str(tmp_path / 'out')])


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_cuda_without_a_gpu_is_refused(tmp_path, image_folder):
    with pytest.raises(SystemExit, match='--device cuda: CUDA is not available here'):
        main(['--data-dir', image_folder, '--output', str(tmp_path / 'out'), '--device', 'cuda'])


def test_output_paths_are_checked_before_the_run(tmp_path, image_folder):
    a_file = tmp_path / 'file'
    a_file.write_text('x')
    cases = [
        (['--output', str(a_file / 'runs')], f'--output {a_file / "runs"}: {a_file} is a file'),
        (['--output', str(tmp_path), '--export-path', str(tmp_path)], f'--export-path {tmp_path} is a folder'),
        (['--output', str(tmp_path), '--export-path', str(a_file / 'enc.safetensors')], 'is a file, not a folder'),
        (['--resume', str(tmp_path)], f'--resume {tmp_path} is a folder; give a checkpoint file'),
        (['--resume', str(tmp_path / 'nope.pth.tar')], 'nope.pth.tar: no such file'),
    ]
    for argv, match in cases:
        with pytest.raises(SystemExit) as e:
            main(['--data-dir', image_folder, '--experiment', 'x', *argv])
        assert match in str(e.value), (argv, str(e.value))
    assert sorted(os.listdir(tmp_path)) == ['file']


def test_every_option_has_help_and_there_is_a_version(capsys):
    from timm_mlit.pretrain_args import build_parser as _parser
    parser = _parser()[1]
    assert [a.option_strings for a in parser._actions if not a.help] == []
    with pytest.raises(SystemExit) as e:
        main(['--version'])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f'timm-mlit-pretrain {timm_mlit.__version__}'
    main_help = parser.format_help()
    assert '(default: 256)' in main_help  # -b: defaults are shown


# ---------------------------------------------------------------- interrupted writes leave nothing behind

@pytest.mark.slow
def test_files_left_by_a_killed_run_are_removed_on_resume(tmp_path, image_folder):
    out = run(tmp_path, image_folder, 'k', '-b', '8', '--epochs', '1')
    dead = out / f'checkpoint-1.pth.tar.tmp.{dead_pid()}'  # what a SIGKILL during torch.save leaves
    dead.write_bytes(b'partial')
    live = out / f'checkpoint-1.pth.tar.tmp.{os.getppid()}'  # a writer that is still running: not ours to remove
    live.write_bytes(b'in progress')
    assert main(['--data-dir', image_folder, *TINY, '-b', '8', '--epochs', '2',
                 '--resume', str(out / 'last.pth.tar')]) == 0
    assert not dead.exists() and live.exists()


# ---------------------------------------------------------------- one run per folder

def _pretrain(*argv):
    """timm-mlit-pretrain ARGV, started in its own process."""
    return subprocess.Popen([sys.executable, '-m', 'timm_mlit.pretrain', *TINY, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))


def _files(folder):
    return {p: (folder / p).read_bytes() for p in os.listdir(folder)}


@pytest.mark.slow
def test_a_new_run_never_writes_into_another_runs_folder(tmp_path, image_folder):
    old = tmp_path / 'a'
    old.mkdir()
    for name in ('args.yaml', 'summary.csv', 'checkpoint-7.pth.tar', 'last.pth.tar'):
        (old / name).write_text(f'{name} of an earlier run')
    before = _files(old)
    proc = _pretrain('--data-dir', image_folder, '--output', str(tmp_path), '--experiment', 'a', '-b', '8',
                     '--train-num-samples', '8', '--epochs', '1')
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]
    assert _files(old) == before
    assert (tmp_path / 'a-1' / 'last.pth.tar').exists() and f'this run writes {tmp_path / "a-1"}' in log


@pytest.mark.slow
def test_two_runs_started_at_once_write_a_folder_each(tmp_path, image_folder):
    procs = [_pretrain('--data-dir', image_folder, '--output', str(tmp_path), '--experiment', 'a', '-b', '8',
                       '--train-num-samples', '8', '--epochs', '1', '--seed', str(seed)) for seed in (1, 2)]
    for proc in procs:
        log = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, log[-3000:]
    assert sorted(os.listdir(tmp_path)) == ['a', 'a-1']
    seeds = set()
    for folder in (tmp_path / 'a', tmp_path / 'a-1'):  # each folder one run's files: its args, rows, checkpoint
        assert [r['epoch'] for r in summary(folder)] == ['0']
        seed = yaml.safe_load((folder / 'args.yaml').read_text())['seed']
        assert torch.load(folder / 'last.pth.tar', weights_only=True)['args']['seed'] == seed
        seeds.add(seed)
    assert seeds == {1, 2}


@pytest.mark.slow
def test_resuming_into_a_folder_another_run_holds_is_refused(tmp_path, image_folder):
    out = run(tmp_path, image_folder, 'r', '-b', '8', '--train-num-samples', '8', '--epochs', '1')
    with lock_folder(str(out)):
        before = _files(out)
        proc = _pretrain('--data-dir', image_folder, '-b', '8', '--train-num-samples', '8', '--epochs', '2',
                         '--resume', str(out / 'last.pth.tar'))
        log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1
    assert log.splitlines()[-1] == (f'timm-mlit-pretrain: error: {out} is in use: another run (pid {os.getpid()}) '
                                    f'holds it')
    assert _files(out) == before


@pytest.mark.slow
def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_keeps_the_last_one(tmp_path, image_folder,
                                                                                  monkeypatch):
    save = torch.save

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):
        if obj.get('epoch') == 1:
            f.write(b'the first part of a checkpoint')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, 'save', save_until_the_disk_is_full)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, image_folder, 'full', '-b', '8', '--train-num-samples', '8', '--epochs', '2')
    out = tmp_path / 'full'
    assert e.value.code == f'timm-mlit-pretrain: error: no space left on device writing {out}/checkpoint-1.pth.tar'
    assert not [p for p in os.listdir(out) if '.tmp' in p] and not (out / 'checkpoint-1.pth.tar').exists()
    assert torch.load(out / 'last.pth.tar', weights_only=True)['epoch'] == 0


# ---------------------------------------------------------------- plots

def test_loss_plot_draws_every_loss_term(tmp_path):
    import matplotlib.pyplot as plt

    from timm_mlit.plots import loss_figure, plot_losses
    csv_path = tmp_path / 'summary.csv'
    with open(csv_path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['epoch', 'train_loss', 'train_loss_masked', 'train_loss_unmasked', 'train_loss_moe', 'lr'])
        for e in range(30):
            w.writerow([e, 1 / (e + 1), 0.9 / (e + 1), 0.5 / (e + 1), 0.015, 1e-3])
    fig = loss_figure(str(csv_path))
    ax = fig.axes[0]
    assert ax.get_legend_handles_labels()[1] == [  # one line per loss term, none for lr
        'train_loss', 'train_loss_masked', 'train_loss_unmasked', 'train_loss_moe']
    assert (ax.get_xscale(), ax.get_yscale(), ax.get_xlabel(), ax.get_ylabel()) == ('log', 'log', 'epoch', 'loss')
    assert list(ax.lines[0].get_xdata()) == list(range(1, 31))  # epochs counted from 1 on the log axis
    plt.close(fig)
    assert plot_losses(str(csv_path), str(tmp_path / 'loss.png')) == str(tmp_path / 'loss.png')
    assert Image.open(tmp_path / 'loss.png').size == (640, 420)
    assert plot_losses(str(tmp_path / 'missing.csv'), str(tmp_path / 'x.png')) is None


def test_expert_load_plot_has_one_panel_per_layer(tmp_path):
    from timm_mlit.plots import plot_expert_load, read_expert_load
    csv_path = tmp_path / 'expert_load.csv'
    with open(csv_path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['epoch', 'layer', 'expert', 'share'])
        for e in range(3):
            for layer, n in (('blocks.0.mlp', 3), ('blocks.1.mlp', 5)):
                for j in range(n):
                    w.writerow([e, layer, j, 1 / n])
    loads = read_expert_load(str(csv_path))
    assert list(loads) == ['blocks.0.mlp', 'blocks.1.mlp'] and len(loads['blocks.1.mlp'][2]) == 5
    assert plot_expert_load(str(csv_path), str(tmp_path / 'load.png'))
    assert Image.open(tmp_path / 'load.png').size == (640, 240)  # two panels side by side


@pytest.mark.slow
def test_plots_are_redrawn_every_epoch(tmp_path, image_folder):
    out = run(tmp_path, image_folder, 'p', '-b', '8', '--epochs', '1')
    for name in ('loss.png', 'expert_load.png'):
        assert (out / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_config_by_recipe_name(capsys):
    from timm_mlit.pretrain_args import parse_args as _parse_args
    from timm_mlit.recipes import resolve_recipe
    args = _parse_args(['-c', 'pretrain/mmlit_xxs_cifar100'])
    assert args.config == resolve_recipe('pretrain/mmlit_xxs_cifar100') and args.epochs == 8000
    with pytest.raises(SystemExit):
        _parse_args(['-c', 'pretrain/mmlit_xxs_cifar10'])
    err = capsys.readouterr().err
    assert 'is neither a file nor a recipe name' in err and 'pretrain/mmlit_xxs_cifar100' in err
