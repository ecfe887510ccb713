"""benchmarks/epoch_profile.py: its arguments are checked before any work, and a tiny profile writes its table."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'epoch_profile.py'
FASHION_MNIST = '/usr/share/datasets/fashion-mnist'


def _run(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize('args, message', [
    (['--patch-drop-rates', '0', '1.0'], 'not in [0, 1)'),
    (['--steps', '0'], 'must be positive'),
    (['--recipe', 'scratch/no_such_recipe'], 'no_such_recipe'),
])
def test_bad_arguments_end_in_one_line_and_write_nothing(tmp_path, args, message):
    proc = _run(*args, '--out', str(tmp_path / 'out'), cwd=tmp_path)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert 'Traceback' not in proc.stderr
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST), reason='needs apt-get install dataset-fashion-mnist')
def test_a_tiny_profile_writes_every_phase_for_every_rate(tmp_path):
    proc = _run('--data-dir', FASHION_MNIST, '--patch-drop-rates', '0', '0.5', '--steps', '1', '--repeats', '1',
                '--workers', '0', '--val-images', '10', '--augment-images', '4', '--out', str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / 'epoch_profile_mlit_xxs.json').read_text())
    rows = result['rows']
    assert [r['patch_drop_rate'] for r in rows] == [0., 0.5]
    for row in rows:
        phases = [row[f'{p}_s'] for p in ('data_wait', 'forward', 'backward', 'optimizer')]
        assert all(t > 0 for t in phases) and row['train_s'] == pytest.approx(sum(phases))
    assert 'epoch_profile.py' in result['meta']['command'] and (tmp_path / 'epoch_profile_mlit_xxs.md').exists()
