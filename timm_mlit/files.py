"""Writing files so that nothing is lost, half-written or mixed with another run's.

`atomic_write(path, write_fn)` writes to `<path>.tmp.<pid>` beside the target, fsyncs it and renames it over the
target: a reader (or a run resumed after a crash) sees the old file or the new one, never a partial one; a failed
write raises `WriteError`, naming the target. A process killed mid-write (SIGKILL, power loss) leaves its temporary
file behind; `remove_stale_temporaries(folder)` removes those whose writer is no longer running, and leaves the
temporaries of live writers alone; `atomic_write` does so for its own target before it writes.

A run's folder is its own (`hold_folder`): `new_folder` never returns one that exists (timm's
`get_outdir(inc=True)`: NAME-1, NAME-2, ...) and `lock_folder` holds one for the process (POSIX `flock`, dropped by
the kernel when the process ends however it ends, so a killed run never keeps it).
"""
import errno
import logging
import os
import re
from contextlib import suppress
from typing import BinaryIO, Callable, List, Optional, TextIO, Tuple

from timm.utils import get_outdir

try:
    import fcntl
except ImportError:  # Windows: folders are not locked
    fcntl = None

__all__ = ['atomic_write', 'temporary_name', 'process_alive', 'remove_stale_temporaries', 'check_writable_path',
           'WriteError', 'new_folder', 'lock_folder', 'hold_folder', 'FolderInUseError', 'LOCK_NAME']

LOCK_NAME = '.lock'
_logger = logging.getLogger(__name__)

_TMP_RE = re.compile(r'^(?P<target>.+)\.tmp\.(?P<pid>\d+)$')


class WriteError(OSError):
    """A file that could not be written (a full disk, no permission); `filename` is the target, not the temporary."""

    def __str__(self):
        if self.strerror is None or self.filename is None:
            return super().__str__()
        return f'{self.strerror[:1].lower()}{self.strerror[1:]} writing {self.filename}'


class FolderInUseError(OSError):
    """A folder that another running process holds (`lock_folder`)."""


def temporary_name(path: str) -> str:
    """The temporary file `atomic_write` uses for `path` in this process."""
    return f'{path}.tmp.{os.getpid()}'


def atomic_write(path: str, write_fn: Callable[[BinaryIO], None]) -> str:
    """Write `path` through `write_fn(binary_file)`: to a temporary file, fsync, then rename over `path`; the
    temporaries that killed writers of `path` left are removed first. WriteError where it cannot be written."""
    remove_stale_temporaries(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    tmp = temporary_name(path)
    try:
        with open(tmp, 'wb') as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(e.errno, e.strerror or str(e), path) from e
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


def remove_stale_temporaries(folder: str, target: Optional[str] = None) -> List[str]:
    """Remove the `<name>.tmp.<pid>` files in `folder` (those of `<target>` only, where given) whose writing process
    is gone; return their paths. What cannot be listed or removed stays: it never stops a write."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in sorted(names):
        m = _TMP_RE.match(name)
        path = os.path.join(folder, name)
        if (m and target in (None, m.group('target')) and os.path.isfile(path)
                and not process_alive(int(m.group('pid')))):
            with suppress(OSError):
                os.remove(path)
                removed.append(path)
                _logger.warning(f'removed {path}: the incomplete file of a writer that was killed')
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


def new_folder(path: str) -> str:
    """Make and return a folder no other run writes: `path`, or where it exists `path-1`, `path-2`, ...
    (timm's get_outdir(inc=True), as timm's train.py names its runs). ValueError past `path-99`."""
    for _ in range(100):
        try:
            return get_outdir(path, inc=True)
        except FileExistsError:  # another process made the same name between get_outdir's check and its makedirs
            continue
        except AssertionError:  # get_outdir's limit
            break
    raise ValueError(f'{path} and {path}-1 ... {path}-99 all exist; choose another name')


def lock_folder(folder: str) -> TextIO:
    """Hold `folder` for this process: an exclusive lock on `folder/.lock`, which records the holder's pid. The lock
    lasts while the returned file is open (close it, or use it as a context manager) and never outlives the process.
    FolderInUseError naming the folder where another process (or another open of this one) holds it."""
    f = open(os.path.join(folder, LOCK_NAME), 'a+')
    if fcntl is not None:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip()
            f.close()
            holder = f'another run (pid {pid})' if pid.isdigit() else 'another run'
            raise FolderInUseError(f'{folder} is in use: {holder} holds it') from None
    f.truncate(0)
    f.write(f'{os.getpid()}\n')
    f.flush()
    return f


def hold_folder(path: str, resuming: str = '') -> Tuple[str, TextIO]:
    """(a folder for one run, the lock that holds it; see `lock_folder`): `path` where it is the folder of the
    checkpoint `resuming` (a run going on in its own folder), else `new_folder(path)`, the name taken instead of an
    existing `path` logged: another run's folder is never written."""
    path = os.path.abspath(path)
    if not (resuming and os.path.realpath(path) == os.path.realpath(os.path.dirname(os.path.abspath(resuming)))):
        asked, path = path, new_folder(path)
        if path != asked:
            _logger.warning(f'{asked} exists (another run\'s?): this run writes {path}')
    return path, lock_folder(path)
