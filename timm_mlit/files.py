"""Writing files so that nothing is lost or half-written.

`atomic_write(path, write_fn)` writes to `<path>.tmp.<pid>` beside the target, fsyncs it and renames it over the
target: a reader (or a run resumed after a crash) sees the old file or the new one, never a partial one. A process
killed mid-write (SIGKILL, power loss) leaves its temporary file behind; `remove_stale_temporaries(folder)` removes
those whose writer is no longer running, and leaves the temporaries of live writers alone.
"""
import errno
import os
import re
from typing import BinaryIO, Callable, List

__all__ = ['atomic_write', 'temporary_name', 'process_alive', 'remove_stale_temporaries', 'check_writable_path']

_TMP_RE = re.compile(r'^(?P<target>.+)\.tmp\.(?P<pid>\d+)$')


def temporary_name(path: str) -> str:
    """The temporary file `atomic_write` uses for `path` in this process."""
    return f'{path}.tmp.{os.getpid()}'


def atomic_write(path: str, write_fn: Callable[[BinaryIO], None]) -> str:
    """Write `path` through `write_fn(binary_file)`: to a temporary file, fsync, then rename over `path`."""
    tmp = temporary_name(path)
    try:
        with open(tmp, 'wb') as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this machine may still be running (True where that cannot be told)."""
    if os.name == 'nt' or pid <= 0 or pid == os.getpid():  # on Windows os.kill(pid, 0) is no probe
        return True
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM  # exists, owned by someone else
    return True


def remove_stale_temporaries(folder: str) -> List[str]:
    """Remove the `<name>.tmp.<pid>` files in `folder` whose writing process is gone; return their paths."""
    removed = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for name in sorted(names):
        m = _TMP_RE.match(name)
        path = os.path.join(folder, name)
        if m and os.path.isfile(path) and not process_alive(int(m.group('pid'))):
            os.remove(path)
            removed.append(path)
    return removed


def check_writable_path(path: str, what: str, folder: bool = False) -> str:
    """Raise ValueError unless `path` can be written as a file (`folder=False`: it is not a folder) or a folder (it is
    not a file), its nearest existing ancestor being a writable folder; so a run finds out before it starts, not
    when it writes its result. Returns the absolute path."""
    path = os.path.abspath(path)
    if not folder and os.path.isdir(path):
        raise ValueError(f'{what} {path} is a folder; give a file name')
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f'{what} {path} is a file, not a folder')
    parent = path if folder and os.path.isdir(path) else os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f'{what} {path}: {parent} is a file, not a folder')
    if not os.access(parent, os.W_OK):
        raise ValueError(f'{what} {path}: {parent} is not writable')
    return path
