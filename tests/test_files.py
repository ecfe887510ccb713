"""Tests of timm_mlit.files: atomic writes, the temporaries killed writers leave, and folders held by one run."""
import errno
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from timm_mlit.files import FolderInUseError, WriteError, atomic_write, lock_folder, new_folder

DATA = '/usr/share/datasets/fashion-mnist'


def dead_pid() -> int:
    """A process id that no running process has."""
    pid = 999_999
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def _temporaries(path):
    """(a temporary that a killed writer of `path` left, one that a running writer of it is writing)"""
    dead, live = f'{path}.tmp.{dead_pid()}', f'{path}.tmp.{os.getppid()}'
    for p in (dead, live):
        with open(p, 'wb') as f:
            f.write(b'partial')
    return dead, live


def test_atomic_write_removes_what_killed_writers_of_its_target_left(tmp_path):
    target = tmp_path / 'results.json'
    dead, live = _temporaries(target)
    other, _ = _temporaries(tmp_path / 'other.json')  # another file's: not this writer's to judge
    atomic_write(str(target), lambda f: f.write(b'{}'))
    assert target.read_bytes() == b'{}'
    assert not os.path.exists(dead) and os.path.exists(live) and os.path.exists(other)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(DATA), reason='needs the Fashion-MNIST test set (dataset-fashion-mnist)')
def test_the_main_job_removes_a_killed_writers_results_temporary(tmp_path):
    results = tmp_path / 'results.json'
    results.write_text('{"old": 1}')
    dead, live = _temporaries(results)
    proc = subprocess.run([sys.executable, '-m', 'timm_mlit', '--results-file', str(results), '--limit', '20',
                           '--data-dir', DATA, '--log-freq', '0'],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(results.read_text())['result']['images'] == 20
    assert not os.path.exists(dead) and os.path.exists(live)


def test_a_failed_write_names_the_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / 'checkpoint.pth.tar'
    target.write_bytes(b'old')

    def full_disk(f):
        f.write(b'part of it')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(WriteError) as e:
        atomic_write(str(target), full_disk)
    assert str(e.value) == f'no space left on device writing {target}'
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == ['checkpoint.pth.tar'] and target.read_bytes() == b'old'


def test_new_folder_never_returns_one_that_exists(tmp_path):
    run = tmp_path / 'runs' / 'a'
    assert new_folder(str(run)) == str(run)
    (run / 'last.pth.tar').write_bytes(b'a run')
    assert new_folder(str(run)) == f'{run}-1'
    assert new_folder(str(run)) == f'{run}-2'
    assert os.listdir(run) == ['last.pth.tar'] and not os.listdir(f'{run}-1')


def test_a_folder_is_held_until_its_lock_is_closed(tmp_path):
    with lock_folder(str(tmp_path)):
        with pytest.raises(FolderInUseError) as e:
            lock_folder(str(tmp_path))
        assert str(e.value) == f'{tmp_path} is in use: another run (pid {os.getpid()}) holds it'
    lock_folder(str(tmp_path)).close()


_HOLDER = ('import sys; from timm_mlit.files import lock_folder; held = lock_folder(sys.argv[1]); '
           'print("held", flush=True); ')


def _holder(folder, then):
    """A process that holds `folder`, then runs `then` (Python)."""
    proc = subprocess.Popen([sys.executable, '-c', _HOLDER + then, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'held'
    return proc


@pytest.mark.slow
def test_a_folder_another_process_holds_is_refused_until_it_ends_however_it_ends(tmp_path):
    live = _holder(tmp_path, 'sys.stdin.read()')
    try:
        with pytest.raises(FolderInUseError, match=re.escape(
                f'{tmp_path} is in use: another run (pid {live.pid}) holds it')):
            lock_folder(str(tmp_path))
    finally:
        live.communicate('')
    lock_folder(str(tmp_path)).close()  # its holder has finished
    killed = _holder(tmp_path, 'import os, signal; os.kill(os.getpid(), signal.SIGKILL)')
    assert killed.wait(timeout=60) == -signal.SIGKILL
    lock_folder(str(tmp_path)).close()  # a killed holder does not keep it
