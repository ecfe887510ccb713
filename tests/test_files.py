"""Tests of timm_mlit.files: atomic writes, the temporaries killed writers leave, folders held by one run, and
folders replaced whole."""
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from timm_mlit.files import (
    FolderInUseError,
    WriteError,
    atomic_write,
    lock_folder,
    new_folder,
    recover_interrupted,
    replace_folder,
)

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


# ------------------------------------------------------------------------------------ folders replaced whole

def _write(name: str, text: str):
    """A build_fn that writes one file."""
    return lambda folder: (folder / name).write_text(text)


def _not_called(folder):
    raise AssertionError(f'built {folder}')


def _folder(path, **files):
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _contents(folder):
    return {p.name: p.read_text() for p in folder.iterdir()}


def test_replace_folder_builds_beside_the_target_and_renames_it_in(tmp_path):
    built = []

    def build(folder):
        built.append(folder)
        (folder / 'a.txt').write_text('new')
    out = replace_folder(build, tmp_path / 'sub' / 'out')
    assert out == tmp_path / 'sub' / 'out' and _contents(out) == {'a.txt': 'new'}
    assert built[0].parent == out.parent and built[0].name.startswith('.out.') and built[0].name.endswith('.tmp')
    assert os.listdir(out.parent) == ['out']


def test_an_existing_folder_is_replaced_only_with_overwrite_and_where_the_check_allows_it(tmp_path):
    out = _folder(tmp_path / 'out', **{'a.txt': 'old'})
    with pytest.raises(FileExistsError, match='overwrite'):
        replace_folder(_not_called, out)

    def refuse(folder):
        raise ValueError(f'{folder} is not ours')
    with pytest.raises(ValueError, match='is not ours'):
        replace_folder(_not_called, out, overwrite=True, check_existing=refuse)
    assert _contents(out) == {'a.txt': 'old'} and os.listdir(tmp_path) == ['out']

    checked = []
    replace_folder(_write('b.txt', 'new'), out, overwrite=True, check_existing=checked.append)
    assert _contents(out) == {'b.txt': 'new'} and os.listdir(tmp_path) == ['out']
    assert checked == [out, out]  # before the build, and again right before the swap


def test_a_folder_that_appears_while_building_is_not_replaced_without_overwrite(tmp_path):
    out = tmp_path / 'out'

    def build(folder):
        _folder(out, **{'theirs.txt': 'another process got there first'})
        (folder / 'a.txt').write_text('new')
    with pytest.raises(FileExistsError):
        replace_folder(build, out)
    assert list(_contents(out)) == ['theirs.txt'] and os.listdir(tmp_path) == ['out']


@pytest.mark.parametrize('existed', [False, True])
def test_a_failed_build_names_the_folder_and_leaves_it_as_it_was(existed, tmp_path):
    out = tmp_path / 'out'
    if existed:
        _folder(out, **{'a.txt': 'old'})

    def full_disk(folder):
        (folder / 'a.txt').write_text('part of it')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(OSError) as e:
        replace_folder(full_disk, out, overwrite=True)
    assert str(e.value) == f'cannot write {out}: No space left on device; ' + (
        'it is as it was' if existed else 'nothing was written')
    assert os.listdir(tmp_path) == (['out'] if existed else [])
    assert not existed or _contents(out) == {'a.txt': 'old'}


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    out = _folder(tmp_path / 'out', **{'a.txt': 'old'})
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the new folder's rename into place, once the old one is aside
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(src, dst)
    monkeypatch.setattr(os, 'replace', replace)
    with pytest.raises(OSError, match=f'cannot write {out}: Input/output error; it is as it was'):
        replace_folder(_write('a.txt', 'new'), out, overwrite=True)
    assert _contents(out) == {'a.txt': 'old'} and os.listdir(tmp_path) == ['out']


def _leftover(parent, name: str, pid: int, kind: str, host: str = '') -> 'os.PathLike':
    """A folder that a replacement of `parent/name` by process `pid` of `host` (this machine) leaves."""
    host = host or re.sub(r'[^A-Za-z0-9-]', '-', socket.gethostname()) or 'localhost'
    folder = parent / f'.{name}.{host}.{pid}.k3x9q2.{kind}'
    folder.mkdir()
    return folder


def test_recover_interrupted_removes_the_unfinished_folders_of_gone_processes_of_this_machine_only(tmp_path, caplog):
    caplog.set_level('INFO')
    dead = dead_pid()
    unfinished = _leftover(tmp_path, 'out', dead, 'tmp')
    others = [_leftover(tmp_path, 'out', os.getppid(), 'tmp'),  # a running replacement's
              _leftover(tmp_path, 'out', dead, 'tmp', host='another-machine'),  # its process cannot be looked up
              _leftover(tmp_path, 'other', dead, 'tmp')]  # another folder's
    recover_interrupted(tmp_path / 'out')
    assert not unfinished.exists() and all(p.is_dir() for p in others)
    assert str(unfinished) in caplog.text


def test_recover_interrupted_puts_back_the_old_copy_of_a_missing_folder(tmp_path, caplog):
    out = tmp_path / 'out'
    old = _leftover(tmp_path, 'out', dead_pid(), 'old')
    _folder(old / 'out', **{'a.txt': 'old'})
    recover_interrupted(out)
    assert _contents(out) == {'a.txt': 'old'} and os.listdir(tmp_path) == ['out']
    assert f'restored {out} from {old}' in caplog.text

    stale = _leftover(tmp_path, 'out', dead_pid(), 'old')  # out exists: a stale copy is dropped
    _folder(stale / 'out', **{'a.txt': 'older'})
    recover_interrupted(out)
    assert _contents(out) == {'a.txt': 'old'} and os.listdir(tmp_path) == ['out']


def test_leftovers_without_a_process_id_are_put_back_only_where_the_folder_is_missing(tmp_path, caplog):
    """`.<name>.<random>.tmp/.old` (tempfile's names alone) cannot be told from a running replacement's."""
    out = tmp_path / 'out'
    unfinished = _folder(tmp_path / '.out.a1b2c3d4.tmp', **{'a.txt': 'part'})
    old = tmp_path / '.out.e5f6g7h8.old'
    _folder(old)
    _folder(old / 'out', **{'a.txt': 'old'})
    recover_interrupted(out)
    assert _contents(out) == {'a.txt': 'old'} and not old.exists() and f'restored {out}' in caplog.text
    assert unfinished.is_dir() and str(unfinished) in caplog.text  # named, left for whoever knows it is over

    kept = _folder(tmp_path / '.out.i9j0k1l2.old')
    _folder(kept / 'out', **{'a.txt': 'older'})
    recover_interrupted(out)
    assert (kept / 'out').is_dir() and f'{kept}/out is a previous copy of {out}' in caplog.text
