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
    with pytest.raises(SystemExit, match=r"'train.py' not found: .*pytorch-image-models/train.py") as e:
        main(['train.py'])
    assert e.value.code != 0


def test_bare_name_without_timm_scripts_dir_says_to_set_it(monkeypatch, tmp_path):
    monkeypatch.delenv('TIMM_SCRIPTS_DIR', raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match='TIMM_SCRIPTS_DIR is not set'):
        resolve_script('validate.py')
    with pytest.raises(SystemExit, match='is not a directory'):
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
