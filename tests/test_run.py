"""timm-mlit-run: runs a script as __main__ with the plugin registered; bare names from $TIMM_SCRIPTS_DIR."""
import json
import os
import subprocess
import sys

import pytest

from timm_mlit.run import main, resolve_script

# A stand-in for timm's scripts: records what a real one would see.
FAKE_SCRIPT = '''
import json, sys
import timm
from timm.data import dataset_factory
with open(sys.argv[1], 'w') as f:
    json.dump(dict(name=__name__, argv=sys.argv, path0=sys.path[0], mlit=timm.is_model('mlit_xxs'),
                   datasets=sorted(k for k in ('svhn', 'flowers102') if k in dataset_factory._TORCH_BASIC_DS)), f)
if len(sys.argv) > 2:
    sys.exit(int(sys.argv[2]))
'''


@pytest.fixture
def scripts_dir(tmp_path, monkeypatch):
    d = tmp_path / 'pytorch-image-models'
    d.mkdir()
    (d / 'validate.py').write_text(FAKE_SCRIPT)
    monkeypatch.setenv('TIMM_SCRIPTS_DIR', str(d))
    return d


@pytest.mark.parametrize('name', ['validate.py', 'validate'])
def test_bare_name_runs_the_script_from_timm_scripts_dir_as_main_with_models_registered(scripts_dir, tmp_path, name):
    out = tmp_path / 'seen.json'
    argv_before = list(sys.argv)
    assert main([name, str(out)]) == 0
    seen = json.loads(out.read_text())
    assert seen['name'] == '__main__'
    assert seen['argv'] == [str(scripts_dir / 'validate.py'), str(out)]
    assert seen['path0'] == str(scripts_dir)
    assert seen['mlit'] is True
    assert seen['datasets'] == ['flowers102', 'svhn']
    assert sys.argv == argv_before  # restored


def test_a_path_runs_without_timm_scripts_dir(tmp_path, monkeypatch):
    monkeypatch.delenv('TIMM_SCRIPTS_DIR', raising=False)
    script = tmp_path / 'my_script.py'
    script.write_text(FAKE_SCRIPT)
    out = tmp_path / 'seen.json'
    main([str(script), str(out)])
    assert json.loads(out.read_text())['mlit'] is True


def test_the_scripts_exit_status_passes_through(scripts_dir, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(['validate.py', str(tmp_path / 'seen.json'), '3'])
    assert e.value.code == 3


def test_missing_script_is_a_clear_error_naming_where_it_looked(scripts_dir):
    with pytest.raises(SystemExit, match=r"^timm-mlit-run: error: script 'train.py' not found: "
                                         r".*pytorch-image-models/train.py") as e:
        main(['train.py'])
    assert e.value.code != 0


def test_an_error_raised_by_the_script_itself_is_not_made_a_launcher_error(tmp_path):
    script = tmp_path / 'fails.py'
    script.write_text('open("/no/such/file")\n')
    with pytest.raises(FileNotFoundError, match='/no/such/file'):
        main([str(script)])


def test_bare_name_without_timm_scripts_dir_says_to_set_it(monkeypatch, tmp_path):
    monkeypatch.delenv('TIMM_SCRIPTS_DIR', raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match='TIMM_SCRIPTS_DIR is not set'):
        resolve_script('validate.py')
    with pytest.raises(FileNotFoundError, match='is not a directory'):
        resolve_script('validate.py', scripts_dir=str(tmp_path / 'nowhere'))


def test_no_arguments_prints_usage_and_fails(capsys):
    assert main([]) == 2
    assert 'usage: timm-mlit-run SCRIPT' in capsys.readouterr().err


def test_python_dash_m_runs_a_script(scripts_dir, tmp_path):
    out = tmp_path / 'seen.json'
    env = dict(os.environ, TIMM_SCRIPTS_DIR=str(scripts_dir))
    r = subprocess.run([sys.executable, '-m', 'timm_mlit.run', 'validate', str(out), '0'], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())['mlit'] is True
    r = subprocess.run([sys.executable, '-m', 'timm_mlit.run', 'nonexistent.py'], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "timm-mlit-run: error: script 'nonexistent.py' not found" in r.stderr


# --- the launcher's own options, recipe names, and what it records of a training run ---

ARGV_SCRIPT = '''
import json, os, sys
with open(os.environ['SEEN'], 'w') as f:
    json.dump(sys.argv[1:], f)
'''

# A stand-in for train.py's config handling: `-c/--config FILE`, read as YAML.
CONFIG_SCRIPT = '''
import argparse, json, os, sys
import yaml
parser = argparse.ArgumentParser()
parser.add_argument('-c', '--config', default='', type=str, metavar='FILE')
args, rest = parser.parse_known_args()
with open(args.config) as f:
    cfg = yaml.safe_load(f)
with open(os.environ['SEEN'], 'w') as f:
    json.dump(dict(config=args.config, model=cfg['model'], rest=rest), f)
'''


def _seen(tmp_path, monkeypatch, script_text, name, *args):
    script = tmp_path / name
    script.write_text(script_text)
    seen = tmp_path / f'{name}.json'
    monkeypatch.setenv('SEEN', str(seen))
    assert main([str(script), *args]) == 0
    return json.loads(seen.read_text())


def test_version_is_printed_only_as_the_first_argument(tmp_path, monkeypatch, capsys):
    import timm_mlit
    assert main(['--version']) == 0
    assert capsys.readouterr().out.strip() == f'timm-mlit-run {timm_mlit.__version__}'
    assert _seen(tmp_path, monkeypatch, ARGV_SCRIPT, 'show.py', '--version', '-h') == ['--version', '-h']


def test_help_lists_the_options_and_the_current_scripts_dir(scripts_dir, capsys):
    assert main(['--help']) == 0
    out = capsys.readouterr().out
    assert out.startswith('usage: timm-mlit-run SCRIPT [ARGS...]')
    for option in ('--version', '--list-recipes', '-c NAME'):
        assert option in out
    assert f'(now: {scripts_dir})' in out


def test_list_recipes_prints_names_that_resolve_to_recipe_files(capsys):
    from timm_mlit.recipes import resolve_recipe
    assert main(['--list-recipes']) == 0
    names = capsys.readouterr().out.split()
    assert 'scratch/mlit_xxs_fashion_mnist' in names and 'pretrain/mmlit_xxs_cifar100' in names
    for name in names:
        assert name.split('/')[0] in ('finetune', 'pretrain', 'scratch', 'transfer')
        path = resolve_recipe(name)
        assert os.path.isfile(path) and path.endswith(f'{name}.yaml')


@pytest.mark.parametrize('form', [['-c', 'scratch/mlit_xs_svhn'], ['--config', 'scratch/mlit_xs_svhn.yaml'],
                                  ['--config=scratch/mlit_xs_svhn'], ['-cscratch/mlit_xs_svhn'],
                                  ['-c', 'train_configs/scratch/mlit_xs_svhn.yaml']])
def test_a_recipe_name_becomes_the_packaged_recipe_for_a_script_with_a_config_option(tmp_path, monkeypatch, form):
    monkeypatch.chdir(tmp_path)  # not in a checkout: names resolve to the package's recipes
    seen = _seen(tmp_path, monkeypatch, CONFIG_SCRIPT, 'train.py', *form, '--epochs', '1')
    assert seen['model'] == 'mlit_xs' and os.path.isabs(seen['config'])
    assert seen['config'].replace(os.sep, '/').endswith('train_configs/scratch/mlit_xs_svhn.yaml')
    assert seen['rest'] == ['--epochs', '1']


def test_an_existing_config_file_wins_over_a_recipe_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'scratch').mkdir()
    (tmp_path / 'scratch' / 'mlit_xs_svhn.yaml').write_text('model: my_model\n')
    seen = _seen(tmp_path, monkeypatch, CONFIG_SCRIPT, 'train.py', '-c', 'scratch/mlit_xs_svhn.yaml')
    assert seen == dict(config='scratch/mlit_xs_svhn.yaml', model='my_model', rest=[])


def test_an_unknown_recipe_is_a_clear_error_naming_close_recipes(tmp_path):
    script = tmp_path / 'train.py'
    script.write_text(CONFIG_SCRIPT)
    with pytest.raises(SystemExit, match=r"timm-mlit-run: error: 'scratch/mlit_xxs_cifr10' is neither a file nor a "
                                         r"recipe name; did you mean scratch/mlit_xxs_cifar10") as e:
        main([str(script), '-c', 'scratch/mlit_xxs_cifr10'])
    assert e.value.code != 0


def test_config_values_are_left_alone_for_scripts_without_a_config_option_and_after_double_dash(tmp_path,
                                                                                                monkeypatch):
    assert _seen(tmp_path, monkeypatch, ARGV_SCRIPT, 'show.py', '-c', 'scratch/mlit_xs_svhn') == [
        '-c', 'scratch/mlit_xs_svhn']
    from timm_mlit.script_args import resolve_config_args
    assert resolve_config_args(['--', '-c', 'no/such']) == ['--', '-c', 'no/such']
    assert resolve_config_args(['-c', '']) == ['-c', '']


# A stand-in for train.py's loop, as far as the recorder sees it: the model from timm's create_model, training
# forwards (and, not counted, evaluation forwards and an EMA copy's), one update_summary call per epoch. It writes
# what the model itself reported after each training forward, for the test to compare with the summary.
TRAIN_SCRIPT = '''
import copy, json, os, sys
from collections import OrderedDict
import torch
from timm import utils
from timm.models import create_model
from timm_mlit.layers import moe_stats, named_moe_layers

out = sys.argv[1]
torch.manual_seed(0)
model = create_model('mlit_xxs', num_classes=3)
ema = copy.deepcopy(model).train()  # a copy carries the hooks: it must not count
opt = torch.optim.SGD(model.parameters(), lr=0.1)
layers = [name for name, _ in named_moe_layers(model)]
own = []
for epoch in range(2):
    model.train()
    losses, loads = [], []
    for step in range(3):
        ema(torch.randn(4, 3, 36, 36))  # were it counted, it would count the model's layers' previous values
        loss = model(torch.randn(4, 3, 36, 36)).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(model.moe_loss().item())
        load = moe_stats(model).load
        loads.append([load[name] for name in layers])
    model.eval()
    with torch.no_grad():
        model(torch.randn(4, 3, 36, 36))
    own.append(dict(moe_loss=sum(losses) / len(losses),
                    shares=[(total / total.sum()).tolist() for total in (sum(ld) for ld in zip(*loads))]))
    utils.update_summary(epoch, OrderedDict(loss=1.0), OrderedDict(top1=50.0), filename=os.path.join(out,
                         'summary.csv'), lr=0.1, write_header=epoch == 0)
with open(os.path.join(out, 'own.json'), 'w') as f:
    json.dump(dict(own=own, layers=layers), f)
'''


def _csv(path):
    import csv
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def test_training_records_the_moe_loss_in_the_summary_and_expert_shares_beside_it(tmp_path):
    import timm
    import timm.models
    import timm.utils
    before = (timm.create_model, timm.models.create_model, timm.utils.update_summary)
    script = tmp_path / 'my_train.py'
    script.write_text(TRAIN_SCRIPT)
    out = tmp_path / 'run'
    out.mkdir()
    assert main([str(script), str(out)]) == 0
    assert (timm.create_model, timm.models.create_model, timm.utils.update_summary) == before  # restored

    own = json.loads((out / 'own.json').read_text())
    rows = _csv(out / 'summary.csv')
    assert list(rows[0]) == ['epoch', 'train_loss', 'train_moe_loss', 'eval_top1', 'lr']
    assert [float(r['train_moe_loss']) for r in rows] == pytest.approx([e['moe_loss'] for e in own['own']], rel=1e-5)

    loads = _csv(out / 'expert_load.csv')
    for epoch, expected in enumerate(own['own']):
        for layer, layer_shares in zip(own['layers'], expected['shares']):
            got = [float(r['share']) for r in loads if r['epoch'] == str(epoch) and r['layer'] == layer]
            assert [r['expert'] for r in loads if r['epoch'] == str(epoch) and r['layer'] == layer] == [
                str(j) for j in range(len(layer_shares))]
            assert got == pytest.approx(layer_shares, abs=2e-6)
    assert len(loads) == 2 * sum(len(s) for s in own['own'][0]['shares'])


def test_a_model_without_moe_layers_changes_nothing():
    import torch

    from timm_mlit.moe_recorder import MoERecorder
    recorder = MoERecorder()
    model = recorder.watch(torch.nn.Linear(2, 2))
    model(torch.randn(1, 2))
    assert recorder.end_epoch(0) is None and not model._forward_hooks


SCRIPTS_DIR = os.environ.get('TIMM_SCRIPTS_DIR', '')


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(os.path.join(SCRIPTS_DIR, 'train.py')),
                    reason='TIMM_SCRIPTS_DIR is not set (or has no train.py)')
def test_timm_train_py_run_records_moe_loss_and_expert_load_per_epoch(tmp_path):
    """The real, unmodified train.py, from a packaged recipe named on the command line, on a tiny image folder."""
    import numpy as np
    import timm
    from PIL import Image

    import timm_mlit  # noqa: F401
    rng = np.random.default_rng(0)
    for split, n in (('train', 8), ('validation', 4)):
        for c in range(3):
            d = tmp_path / 'images' / split / f'class{c}'
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f'{i}.png')
    r = subprocess.run([sys.executable, '-m', 'timm_mlit.run', 'train.py', '-c', 'scratch/mlit_xxs_fashion_mnist',
                        '--data-dir', str(tmp_path / 'images'), '--dataset', '', '--num-classes', '3', '--epochs', '2',
                        '--warmup-epochs', '1', '-b', '8', '-j', '1', '--device', 'cpu',
                        '--output', str(tmp_path / 'out'), '--experiment', 'e'],
                       cwd=tmp_path, env=dict(os.environ, TIMM_SCRIPTS_DIR=SCRIPTS_DIR), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    run = tmp_path / 'out' / 'e'
    rows = _csv(run / 'summary.csv')
    assert [r['epoch'] for r in rows] == ['0', '1']
    assert all(0 < float(r['train_moe_loss']) < 1 for r in rows)  # 1e-2 * (CV^2 + CV^2) per layer, 9 layers

    model = timm.create_model('mlit_xxs', num_classes=3)
    experts = {name: m.gate.num_experts for name, m in model.named_modules() if type(m).__name__ == 'MoE'}
    loads = _csv(run / 'expert_load.csv')
    for epoch in ('0', '1'):
        for layer, n in experts.items():
            shares = [float(r['share']) for r in loads if r['epoch'] == epoch and r['layer'] == layer]
            assert len(shares) == n and sum(shares) == pytest.approx(1, abs=1e-5)
    assert len(loads) == 2 * sum(experts.values())


# --- checks made before the script starts: the device it would run on, the image folder it would read ---

# A stand-in for train.py's options that the launcher reads: -c/--config (YAML values are defaults), --device
# (default cuda), --dataset, --data-dir. It writes what it was given, so a test sees whether it ran.
DEVICE_SCRIPT = '''
import argparse, json, os
import yaml
parser = argparse.ArgumentParser()
parser.add_argument('-c', '--config', default='', type=str, metavar='FILE')
parser.add_argument('--device', default='cuda', type=str)
parser.add_argument('--device-modules', default=None, type=str, nargs='+')
parser.add_argument('--dataset', default='')
parser.add_argument('--data-dir', default=None)
args, _ = parser.parse_known_args()
if args.config:
    with open(args.config) as f:
        parser.set_defaults(**yaml.safe_load(f))
with open(os.environ['SEEN'], 'w') as f:
    json.dump(vars(parser.parse_known_args()[0]), f)
'''


@pytest.fixture
def device_script(tmp_path, monkeypatch):
    """train.py (the stand-in) in tmp_path, the working folder, beside cuda.yaml and cpu.yaml, on a machine without
    CUDA; SEEN is where the script writes what it was given, if it runs."""
    import torch
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('SEEN', str(tmp_path / 'seen.json'))
    (tmp_path / 'cuda.yaml').write_text('device: cuda\n')
    (tmp_path / 'cpu.yaml').write_text('device: cpu\n')
    (tmp_path / 'train.py').write_text(DEVICE_SCRIPT)
    return tmp_path / 'train.py'


@pytest.mark.parametrize('args, said', [
    ([], "--device cuda (train.py's default)"),
    (['--device', 'cuda'], '--device cuda'),
    (['--device=cuda:0'], '--device cuda:0'),
    (['-c', 'cuda.yaml'], '--device cuda (device: cuda in the config)'),
    (['-c', 'cpu.yaml', '--device', 'cuda'], '--device cuda'),
    (['--device', 'cpu', '--device=cuda'], '--device cuda'),  # argparse keeps the last
])
def test_cuda_without_cuda_is_one_line_before_the_script_starts(device_script, args, said):
    with pytest.raises(SystemExit) as e:
        main([str(device_script), *args])
    assert str(e.value) == f'timm-mlit-run: error: {said} but CUDA is not available here; add --device cpu'
    assert not (device_script.parent / 'seen.json').exists()


@pytest.mark.parametrize('args', [['--device', 'cpu'], ['--device=cpu'], ['-c', 'cpu.yaml'],
                                  ['-c', 'cuda.yaml', '--device', 'cpu'],
                                  ['--device-modules', 'timm_mlit', '--device', 'cpu'],
                                  ['--device', 'cuda', '--device', 'cpu']])
def test_a_cpu_device_from_the_arguments_or_the_config_runs(device_script, args):
    assert main([str(device_script), *args]) == 0
    assert json.loads((device_script.parent / 'seen.json').read_text())['device'] == 'cpu'


def test_a_script_without_a_device_option_is_not_asked_for_one(tmp_path, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert _seen(tmp_path, monkeypatch, ARGV_SCRIPT, 'show.py', '--device', 'cuda') == ['--device', 'cuda']


def test_validate_py_default_device_is_checked_in_a_process_without_a_gpu(tmp_path):
    (tmp_path / 'validate.py').write_text(DEVICE_SCRIPT)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', SEEN=str(tmp_path / 'seen.json'))
    r = subprocess.run([sys.executable, '-m', 'timm_mlit.run', str(tmp_path / 'validate.py'), '--model', 'mlit_xxs'],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and not (tmp_path / 'seen.json').exists()
    assert r.stderr == ("timm-mlit-run: error: --device cuda (validate.py's default) but CUDA is not available here; "
                        "add --device cpu\n")


@pytest.mark.skipif(not os.path.isfile(os.path.join(SCRIPTS_DIR, 'train.py')),
                    reason='TIMM_SCRIPTS_DIR is not set (or has no train.py)')
def test_the_readme_training_command_without_a_gpu_says_add_device_cpu(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'timm_mlit.run', 'train.py', '-c',
                        'train_configs/scratch/mlit_xxs_fashion_mnist.yaml', '--output', str(tmp_path / 'out')],
                       env=dict(os.environ, TIMM_SCRIPTS_DIR=SCRIPTS_DIR, CUDA_VISIBLE_DEVICES=''),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "timm-mlit-run: error: --device cuda (train.py's default) but CUDA is not available here; add --device cpu")
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('form', ['args', 'config'])
def test_an_image_folder_with_an_unreadable_class_folder_is_refused_naming_it(device_script, monkeypatch, form):
    from test_data import deny_reading
    images = device_script.parent / 'images'
    for name in ('cat', 'dog', 'emu'):
        (images / 'train' / name).mkdir(parents=True)
        (images / 'train' / name / '0.png').write_bytes(b'')
    (device_script.parent / 'images.yaml').write_text(f'data_dir: {images}\n')
    args = [str(device_script), '--device', 'cpu'] + (
        ['--data-dir', str(images)] if form == 'args' else ['-c', 'images.yaml'])
    deny_reading(monkeypatch, images / 'train' / 'dog')
    with pytest.raises(SystemExit, match=f'^timm-mlit-run: error: cannot read the folder {images}/train/dog '):
        main(args)
    assert not (device_script.parent / 'seen.json').exists()
    assert main(args + ['--dataset', 'torch/fashion_mnist']) == 0  # not an image folder: not walked


@pytest.mark.parametrize('form', ['args', 'config'])
def test_a_data_dir_that_is_a_file_is_refused_before_the_script_runs(device_script, form):
    data = device_script.parent / 'data.idx'
    data.write_bytes(b'')
    (device_script.parent / 'data.yaml').write_text(f'data_dir: {data}\n')
    args = [str(device_script), '--device', 'cpu'] + (
        ['--data-dir', str(data)] if form == 'args' else ['-c', 'data.yaml'])
    with pytest.raises(SystemExit, match=f'^timm-mlit-run: error: --data-dir {data} is a file, not a folder$'):
        main(args)
    assert not (device_script.parent / 'seen.json').exists()


def test_a_config_that_is_not_yaml_is_one_line_naming_it(device_script):
    device_script.write_text(DEVICE_SCRIPT + "parser.add_argument('--amp-dtype')\n")  # as train.py: precision read too
    (device_script.parent / 'bad.yaml').write_text('device: [cpu\n')
    with pytest.raises(SystemExit, match=r'^timm-mlit-run: error: config bad.yaml is not YAML: .*line 2') as e:
        main([str(device_script), '-c', 'bad.yaml', '--device', 'cpu'])
    assert '\n' not in str(e.value)
