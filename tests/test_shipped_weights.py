"""The weights shipped in the package, for every size that has them: the mmLiT Fashion-MNIST classifier (the
size's default tag, `<arch>.mae_ft_fashion_mnist`) and the MAE encoder it was fine-tuned from
(`<arch>.mae_in_fashion_mnist`), and the main job (`python -m timm_mlit`) that shows them off.

Re-evaluated on the real Fashion-MNIST test set (Debian's dataset-fashion-mnist; skipped where it is not installed),
each shipped classifier gives the top-1 its model card reports and the README states.
"""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image
from test_data import make_fashion_mnist
from timm.data import create_transform, resolve_data_config

import timm_mlit  # noqa: F401
from timm_mlit import _weights
from timm_mlit.__main__ import main
from timm_mlit.data import DEBIAN_FASHION_MNIST, write_idx
from timm_mlit.precision import cpu_name

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))
from readme_tables import card_top1  # noqa: E402  (the test top-1 in a shipped card's metadata, or None)

FT = 'mlit_xxs.mae_ft_fashion_mnist'
ENC = 'mlit_xxs.mae_in_fashion_mnist'
# every size with shipped Fashion-MNIST weights (what the main job lists as shipped, in its order)
SHIPPED_FT = [n for n in timm.list_pretrained('mlit_*') if n.endswith('.mae_ft_fashion_mnist')]
SHIPPED = [n.split('.')[0] for n in SHIPPED_FT]
needs_fmnist = pytest.mark.skipif(not os.path.isfile(os.path.join(DEBIAN_FASHION_MNIST, 't10k-images-idx3-ubyte.gz')),
                                  reason='Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)')


@pytest.mark.parametrize('arch', SHIPPED)
def test_default_tag_is_the_embedded_fashion_mnist_classifier(arch):
    model = timm.create_model(arch, pretrained=True)
    cfg = model.pretrained_cfg
    assert cfg['tag'] == 'mae_ft_fashion_mnist'
    assert Path(cfg['file']) == _weights.WEIGHTS_DIR / f'{arch}.mae_ft_fashion_mnist' / 'model.safetensors'
    assert model.num_classes == 10 and tuple(cfg['label_names']) == _weights.LABEL_NAMES['fashion_mnist']
    shipped = safetensors.torch.load_file(cfg['file'])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in shipped.items())
    assert set(shipped) == set(model.state_dict())


def test_every_size_keeps_its_untrained_tag_and_defaults_to_its_shipped_classifier_or_to_untrained():
    assert 'mlit_xxs' in SHIPPED
    for arch in timm.list_models('mlit_*'):
        untrained = timm.create_model(f'{arch}.untrained').pretrained_cfg
        assert untrained['tag'] == 'untrained' and not untrained.get('file'), arch
        default = 'mae_ft_fashion_mnist' if arch in SHIPPED else 'untrained'
        assert timm.create_model(arch).pretrained_cfg['tag'] == default, arch


@pytest.mark.parametrize('arch', SHIPPED)
def test_shipped_folders_are_hub_ready(arch):
    for name, num_classes in ((f'{arch}.mae_ft_fashion_mnist', 10), (f'{arch}.mae_in_fashion_mnist', 0)):
        folder = _weights.WEIGHTS_DIR / name
        assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
        model = timm.create_model(f'local-dir:{folder}', pretrained=True)  # timm's own reader of a Hub folder
        assert model.num_classes == num_classes and model.pretrained_cfg['tag'] == name.split('.')[1]


@pytest.mark.slow
def test_default_weights_load_offline_without_any_cache(tmp_path):
    code = ('import timm, timm_mlit; m = timm.create_model("mlit_xxs", pretrained=True); '
            'print(m.pretrained_cfg["tag"], m.num_classes)')
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'), TORCH_HOME=str(tmp_path / 'torch'))
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ['mae_ft_fashion_mnist', '10']
    assert not (tmp_path / 'hf').exists() and not (tmp_path / 'torch').exists()  # nothing fetched, nothing cached


@pytest.mark.parametrize('arch', SHIPPED)
def test_shipped_encoder_is_the_one_the_classifier_was_fine_tuned_from(arch):
    encoder = timm.create_model(f'{arch}.mae_in_fashion_mnist', pretrained=True)
    classifier = timm.create_model(arch, pretrained=True)
    fresh = timm.create_model(arch, num_classes=0)
    assert encoder.num_classes == 0
    # fine-tuning moved every weight matrix of the blocks, and each stays closer to the encoder's than to an untrained
    # model's
    tuned, enc, init = classifier.state_dict(), encoder.state_dict(), fresh.state_dict()
    matrices = [k for k in enc if k.startswith('blocks.') and enc[k].dim() >= 2]
    assert len(matrices) >= 4 * len(classifier.blocks)
    for k in matrices:
        assert not torch.equal(tuned[k], enc[k]), k
        assert (tuned[k] - enc[k]).norm() < (tuned[k] - init[k]).norm(), k


@needs_fmnist
@pytest.mark.slow
@pytest.mark.parametrize('arch', SHIPPED)
def test_shipped_weights_give_the_reported_accuracy_on_the_test_set(arch):
    r = main(['--model', arch])
    name = f'{arch}.mae_ft_fashion_mnist'
    assert r['images'] == 10000 and r['data'] == DEBIAN_FASHION_MNIST and r['model'] == name
    # 0.05 points = 5 of the 10k images: another CPU's float rounding may flip a borderline prediction or two
    assert r['top1'] == pytest.approx(card_top1(name), abs=0.05)
    readme = (ROOT / 'README.md').read_text()
    assert f'{card_top1(name):.2f}%' in readme


def test_every_tested_mmlit_of_the_zoo_ships_at_its_measured_top1():
    """The zoo's results (benchmarks/results/fashion_mnist_zoo.json, what the runs wrote) and the package agree: each
    size whose mmLiT was tested ships as its default tag, its card at that top-1, and no size ships without one."""
    rows = json.loads((ROOT / 'benchmarks' / 'results' / 'fashion_mnist_zoo.json').read_text())['rows']
    tested = {r['arch']: r['top1'] for r in rows if r['key'].startswith('mmlit_') and r.get('top1') is not None}
    assert tested and sorted(tested) == sorted(SHIPPED)
    for arch, top1 in tested.items():
        assert timm.models.get_pretrained_cfg(arch).tag == 'mae_ft_fashion_mnist'
        assert card_top1(f'{arch}.mae_ft_fashion_mnist') == pytest.approx(top1, abs=0.005)
        assert (_weights.WEIGHTS_DIR / f'{arch}.mae_in_fashion_mnist' / 'model.safetensors').is_file()


def card_commands(name: str) -> list:
    """The shell commands on a shipped model card (its Training section), comments dropped."""
    card = (_weights.WEIGHTS_DIR / name / 'README.md').read_text()
    assert '## Training\n' in card, f'the card of {name} gives no commands'
    block = card.split('## Training\n')[1].split('```bash\n')[1].split('```')[0]
    return [line for line in block.splitlines() if line and not line.startswith('#')]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get('TIMM_SCRIPTS_DIR'), reason='TIMM_SCRIPTS_DIR is not set: point it at a '
                    'pytorch-image-models checkout (train.py, validate.py) of the installed timm version')
@pytest.mark.parametrize('arch', SHIPPED)
def test_shipped_cards_commands_run_as_written(tmp_path, arch):
    """The commands on each shipped classifier's card, run by a shell as written (OUT a fresh folder, the test images
    swapped for small ones, small-run flags appended): pre-training, fine-tuning from its encoder, the test."""
    out, test_images = tmp_path / 'out', tmp_path / 'test'
    make_fashion_mnist(str(out / 'data'), n_train=32, n_test=8)  # the layout the header describes
    make_fashion_mnist(str(test_images), n_train=8, n_test=8)
    small = {'timm_mlit.pretrain': '--epochs 1 --warmup-epochs 0 -b 16 --workers 0',  # (argparse: last one wins)
             'train.py': '--epochs 1 --warmup-epochs 0 -b 16 -j 0', 'validate.py': '-b 8 -j 0'}
    env = dict(os.environ, OUT=str(out), PATH=f'{Path(sys.executable).parent}{os.pathsep}{os.environ["PATH"]}')
    lines = card_commands(f'{arch}.mae_ft_fashion_mnist')
    assert [k for k in small if any(k in line for line in lines)] == list(small)
    assert sum(f'--data-dir {DEBIAN_FASHION_MNIST} ' in line for line in lines) == 1  # the test, on the real images
    for line in lines:
        line = line.replace(DEBIAN_FASHION_MNIST, str(test_images))
        line += ''.join(f' {flags}' for key, flags in small.items() if key in line)
        proc = subprocess.run(['bash', '-c', line], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f'{line}\n{proc.stderr[-3000:]}'
    size = arch.split('_')[1]
    assert (out / f'pretrain_{arch}' / 'encoder.safetensors').is_file()
    assert (out / f'finetune_{arch}' / 'last.pth.tar').is_file()
    results = json.loads((out / f'eval_mmlit_{size}' / 'results.json').read_text())
    assert results['model'] == arch and 0 <= results['top1'] <= 100


@pytest.mark.slow
@needs_fmnist
def test_main_job_prints_top1_images_per_second_and_classes():
    out = subprocess.run([sys.executable, '-m', 'timm_mlit', '--limit', '300'], capture_output=True, text=True,
                         check=True).stdout
    assert re.search(r'Fashion-MNIST test \(.*\): 300 images, top-1 [0-9.]+%, [0-9]+ images/s', out), out
    assert 'mlit_xxs.mae_ft_fashion_mnist' in out and 'Ankle boot' in out


def test_main_job_reads_a_folder_of_idx_files(tmp_path):
    # 20 test images in the flat layout (as Debian's package has them); the job's predictions are the model's on
    # the same images through timm's eval transform, in file order, and its top-1 counts them against the labels
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    labels = (np.arange(20) % 10).astype(np.uint8)
    write_idx(tmp_path / 't10k-images-idx3-ubyte.gz', images)
    write_idx(tmp_path / 't10k-labels-idx1-ubyte.gz', labels)
    r = main(['--data-dir', str(tmp_path), '-b', '8'])
    assert r['images'] == 20 and r['data'] == str(tmp_path)
    model = timm.create_model('mlit_xxs', pretrained=True).eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    x = torch.stack([transform(Image.fromarray(im, mode='L').convert('RGB')) for im in images])
    with torch.no_grad():
        expected = model(x).argmax(-1)
    assert torch.equal(r['predictions'], expected)
    assert r['top1'] == pytest.approx(100. * (expected.numpy() == labels).mean())
    assert r['per_class']['Ankle boot'] == 100. * np.mean(expected.numpy()[labels == 9] == 9)
    assert main(['--data-dir', str(tmp_path), '--limit', '3'])['images'] == 3


def test_main_job_writes_its_results_file(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (12, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / 't10k-images-idx3-ubyte.gz', images)
    write_idx(tmp_path / 't10k-labels-idx1-ubyte.gz', (np.arange(12) % 10).astype(np.uint8))
    assert main(['--data-dir', str(tmp_path), '--log-freq', '0', '--results-file', str(tmp_path / 'new' / 'r.json')])
    assert json.loads((tmp_path / 'new' / 'r.json').read_text())['meta']['command'] == \
        f'python -m timm_mlit --data-dir {shlex.quote(str(tmp_path))}'  # its folder made
    path = tmp_path / 'out' / 'job.json'
    path.parent.mkdir()
    path.write_text('an older result\n')  # replaced whole
    r = main(['--data-dir', str(tmp_path), '-b', '4', '--log-freq', '0', '--results-file', str(path)])
    written = json.loads(path.read_text())
    assert written['result'] == json.loads(json.dumps({k: v for k, v in r.items() if k != 'predictions'}))
    assert written['result']['images'] == 12 and set(written['result']['per_class']) == set(
        timm.models.get_pretrained_cfg(FT).label_names)
    # the command that measures: the options given, but not --log-freq's (no figure depends on it) nor the file
    assert written['meta'] == dict(command=f'python -m timm_mlit --data-dir {shlex.quote(str(tmp_path))} -b 4',
                                   torch=torch.__version__, timm_mlit=timm_mlit.__version__, machine=cpu_name(),
                                   threads=torch.get_num_threads(), batch_size=4)
    assert os.listdir(path.parent) == ['job.json']  # no temporary left beside it


def test_main_job_refuses_a_results_file_it_cannot_write_before_evaluating(tmp_path, monkeypatch):
    ran = []
    from timm_mlit import __main__ as job
    monkeypatch.setattr(job, 'evaluate', lambda *a, **k: ran.append(a))
    (tmp_path / 'a_file').write_text('x')
    with pytest.raises(SystemExit, match=r'^python -m timm_mlit: error: --results-file .*a_file/r\.json: .*a_file is '
                                         r'a file, not a folder$'):
        main(['--results-file', str(tmp_path / 'a_file' / 'r.json')])
    with pytest.raises(SystemExit, match=r'error: --results-file .* is a folder; give a file name$'):
        main(['--results-file', str(tmp_path)])
    assert ran == []


def test_main_job_says_what_is_wrong_with_a_bad_data_folder(tmp_path):
    with pytest.raises(SystemExit, match='no readable Fashion-MNIST test set in --data-dir .*missing'):
        main(['--data-dir', str(tmp_path / 'missing')])
    assert not (tmp_path / 'missing').exists()  # nothing downloaded into a folder the user named
    (tmp_path / 't10k-images-idx3-ubyte.gz').write_bytes(b'not gzip')
    (tmp_path / 't10k-labels-idx1-ubyte.gz').write_bytes(b'not gzip')
    with pytest.raises(SystemExit, match='BadGzipFile'):
        main(['--data-dir', str(tmp_path)])


def test_main_job_without_the_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    # no Debian package, an empty cache, and a download that fails at once (a proxy that refuses connections), as
    # with no network
    from timm_mlit import __main__ as job
    monkeypatch.setattr(job, 'DEBIAN_FASHION_MNIST', str(tmp_path / 'no-debian'))
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    for var in ('HTTP_PROXY', 'HTTPS_PROXY', 'http_proxy', 'https_proxy'):
        monkeypatch.setenv(var, 'http://127.0.0.1:9')
    for var in ('NO_PROXY', 'no_proxy'):
        monkeypatch.delenv(var, raising=False)
    import urllib.request
    monkeypatch.setattr(urllib.request, '_opener', None)  # urlopen's cached opener: rebuilt with these proxies
    with pytest.raises(SystemExit) as e:
        main([])
    msg = str(e.value)
    assert 'could not be downloaded into ' + str(tmp_path / 'cache' / 'timm_mlit' / 'fashion-mnist') in msg
    assert 'apt-get install dataset-fashion-mnist' in msg and '--data-dir' in msg


def test_main_job_refuses_a_model_without_fashion_mnist_weights(capsys):
    with pytest.raises(SystemExit, match=f'(?s)cannot load mlit_s.untrained .*Fashion-MNIST classifiers shipped: '
                                         f'{", ".join(SHIPPED_FT)}$'):
        main(['--model', 'mlit_s.untrained'])
    with pytest.raises(SystemExit, match='not a Fashion-MNIST classifier'):
        main(['--model', ENC])


@pytest.mark.parametrize('name, match', [
    ('resnet18', r'error: resnet18 is not an mLiT model'),
    ('mlit_s.untrained', r'error: cannot load mlit_s.untrained with pretrained=True: .*mlit_s\.untrained'),
    (ENC, r'error: .*not a Fashion-MNIST classifier'),
    ('no_such_model', r"error: unknown model 'no_such_model'"),
])
def test_main_job_refuses_a_model_before_loading_any_weights(name, match, monkeypatch):
    # the check reads timm's registry and pretrained cfgs: no weights are loaded (for resnet18, from the Hub)
    loads = []
    monkeypatch.setattr(timm.models._builder, 'load_pretrained', lambda *args, **kwargs: loads.append(args))
    with pytest.raises(SystemExit, match=f'(?s)^python -m timm_mlit: {match}.*Fashion-MNIST classifiers shipped: '
                                         f'{", ".join(SHIPPED_FT)}$') as e:
        main(['--model', name])
    assert loads == [] and '\n' not in str(e.value)


def job_parser():
    from timm_mlit import __main__ as job
    return job.build_parser()


def test_main_job_prints_its_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(['--version'])
    assert e.value.code == 0
    assert capsys.readouterr().out == f'timm-mlit {timm_mlit.__version__}\n'


def test_main_job_help_explains_every_option_and_shows_its_default(capsys):
    import argparse
    with pytest.raises(SystemExit):
        main(['--help'])
    text = ' '.join(capsys.readouterr().out.split())
    for action in job_parser()._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
        assert action.option_strings[-1] in text
        if action.default not in (None, False, argparse.SUPPRESS):
            assert f'(default: {action.default})' in text, action.option_strings


@pytest.mark.slow
def test_main_job_logs_its_progress_to_stderr(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / 't10k-images-idx3-ubyte.gz', rng.integers(0, 256, (20, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / 't10k-labels-idx1-ubyte.gz', (np.arange(20) % 10).astype(np.uint8))
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    proc = subprocess.run([sys.executable, '-m', 'timm_mlit', '--data-dir', str(tmp_path), '-b', '8', '--log-freq',
                           '2'], capture_output=True, text=True, check=True, env=env, timeout=300)
    progress = re.findall(r'^Test: \[\s*(\d+)/(\d+)\]\s+Time: .*Acc@1: .*$', proc.stderr, flags=re.M)
    assert progress == [('0', '3'), ('2', '3')], proc.stderr  # every 2nd of the 3 batches, and the last one
    assert re.search(r'Fashion-MNIST test \(.*\): 20 images, top-1 [0-9.]+%', proc.stdout), proc.stdout
    assert 'Test: [' not in proc.stdout


def test_main_job_lists_every_model(capsys):
    main(['--list'])
    out = capsys.readouterr().out
    for name in ('mlit_s', 'mlit_xs', 'mlit_xxs'):
        tag = 'mae_ft_fashion_mnist' if name in SHIPPED else 'untrained'
        assert re.search(rf"^{name}\s+default tag '{tag}'", out, flags=re.M), out
    assert re.search(r"^mlit_xxs\s+default tag 'mae_ft_fashion_mnist'\s+encoder params=\s+651,373", out, flags=re.M)
    for name in timm.list_models('mobile_vmoe_*'):  # every family the package registers
        line = rf"^{name}\s+default tag 'untrained'.*input=\(2, 3, (36, 36|224, 224)\)"
        assert re.search(line, out, flags=re.M), name


@pytest.mark.slow
def test_the_wheel_ships_the_weight_folders(tmp_path):
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', str(ROOT), '--no-deps', '--no-build-isolation', '-q',
                    '-w', str(tmp_path)], check=True, capture_output=True, timeout=600)
    import zipfile
    wheel, = tmp_path.glob('timm_mlit-*.whl')
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in [n for arch in SHIPPED for n in (f'{arch}.mae_ft_fashion_mnist', f'{arch}.mae_in_fashion_mnist')]:
        for f in ('model.safetensors', 'config.json', 'README.md'):
            assert f'timm_mlit/weights/{name}/{f}' in names
    assert 'timm_mlit/py.typed' in names and 'timm_mlit/superclass_files/cifar100_coarse.json' in names
    assert any(n.endswith('.dist-info/licenses/LICENSE') or n.endswith('.dist-info/LICENSE') for n in names)
    recipes = sorted(p.relative_to(ROOT / 'train_configs').as_posix() for p in (ROOT / 'train_configs').rglob('*.yaml'))
    assert recipes and all(f'timm_mlit/train_configs/{r}' in names for r in recipes)


def test_readme_pretrained_snippet_loads_the_shipped_classifier():
    from readme import snippet
    ns = {'__name__': '__readme__'}
    exec(compile(snippet('hub-pretrained'), 'README.md hub-pretrained', 'exec'), ns)
    model = ns['model']
    assert model.pretrained_cfg['tag'] == 'mae_ft_fashion_mnist' and not model.training
    shipped = safetensors.torch.load_file(_weights.WEIGHTS_DIR / FT / 'model.safetensors')
    assert all(torch.equal(model.state_dict()[k], v) for k, v in shipped.items())
