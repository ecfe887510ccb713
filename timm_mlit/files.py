"""Writing files so that nothing is lost, half-written or mixed with another run's.

`atomic_write(path, write_fn)` writes to `<path>.tmp.<pid>` beside the target, fsyncs it and renames it over the
target: a reader (or a run resumed after a crash) sees the old file or the new one, never a partial one; a failed
write raises `WriteError`, naming the target. A process killed mid-write (SIGKILL, power loss) leaves its temporary
file behind; `remove_stale_temporaries(folder)` removes those whose writer is no longer running, and leaves the
temporaries of live writers alone; `atomic_write` does so for its own target before it writes.

A run's folder is its own (`hold_folder`): `new_folder` never returns one that exists (timm's
`get_outdir(inc=True)`: NAME-1, NAME-2, ...) and `lock_folder` holds one for the process (POSIX `flock`, dropped by
the kernel when the process ends however it ends, so a killed run never keeps it).

A folder made whole or not at all (`replace_folder(build_fn, output_dir)`): it is built in a temporary folder beside
the target, `.<name>.<host>.<pid>.<random>.tmp`, then renamed into place; an existing target is first moved aside into
`.<name>.<host>.<pid>.<random>.old` and removed once the new one is in. `recover_interrupted(output_dir)` clears what a
killed replacement left: the temporary folders of processes of this machine that are gone, and an old copy put back
where the target is missing.
"""
import errno
import logging
import os
import re
import shutil
import socket
import tempfile
from contextlib import suppress
from pathlib import Path
from types import ModuleType
from typing import BinaryIO, Callable, List, Optional, TextIO, Tuple, Union

from timm.utils import get_outdir

fcntl: Optional[ModuleType]  # None where there is none
try:
    import fcntl
except ImportError:  # Windows: folders are not locked
    fcntl = None

__all__ = ['atomic_write', 'temporary_name', 'process_alive', 'remove_stale_temporaries', 'check_writable_path',
           'WriteError', 'new_folder', 'lock_folder', 'hold_folder', 'FolderInUseError', 'LOCK_NAME', 'replace_folder',
           'recover_interrupted']

LOCK_NAME = '.lock'
_logger = logging.getLogger(__name__)

_TMP_RE = re.compile(r'^(?P<target>.+)\.tmp\.(?P<pid>\d+)$')
_HOST = re.sub(r'[^A-Za-z0-9-]', '-', socket.gethostname()) or 'localhost'
PathLike = Union[str, os.PathLike]


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


def atomic_write(path: str, write_fn: Callable[[BinaryIO], object]) -> str:
    """Write `path` through `write_fn(binary_file)`: to a temporary file, fsync, then rename over `path`; the
    temporaries that killed writers of `path` left are removed first. What `write_fn` returns (a count of bytes
    written, say) is ignored. WriteError where it cannot be written."""
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
    removed: List[str] = []
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


# ------------------------------------------------------------------------------------ a folder, whole or not at all

def _work_prefix(output_dir: Path) -> str:
    """Prefix of this process's temporary folders beside `output_dir`: `.<name>.<host>.<pid>.`"""
    return f'.{output_dir.name}.{_HOST}.{os.getpid()}.'


def recover_interrupted(output_dir: PathLike):
    """Clear what interrupted `replace_folder`s of `output_dir` left beside it.

    Folders of this machine's processes that are gone: an unfinished `.tmp` is removed; an `.old` copy (a process
    killed between the two renames of a replacement) is put back if `output_dir` is missing, else removed. Folders of
    a live process or of another machine are left alone. Folders named without host and process id
    (`.<name>.<random>.tmp`/`.old`, tempfile's names alone) cannot be told from those of a running replacement: an old
    copy is put back only where `output_dir` is missing, the rest is named in a warning.
    """
    output_dir = Path(output_dir).absolute()
    parent, name = output_dir.parent, output_dir.name
    if not parent.is_dir():
        return
    ours = re.compile(rf'\.{re.escape(name)}\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[a-z0-9_]+\.(?P<kind>tmp|old)')
    no_pid = re.compile(rf'\.{re.escape(name)}\.[a-z0-9_]{{8}}\.(?P<kind>tmp|old)')
    stale, unknown = [], []
    for p in parent.iterdir():
        if p.is_symlink() or not p.is_dir():
            continue
        m = ours.fullmatch(p.name)
        if m:
            if m['host'] == _HOST and not process_alive(int(m['pid'])):
                stale.append((m['kind'], p))
            continue
        m = no_pid.fullmatch(p.name)
        if m:
            unknown.append((m['kind'], p))

    old_copies = sorted((p for kind, p in stale + unknown if kind == 'old' and (p / name).is_dir()),
                        key=lambda p: p.stat().st_mtime, reverse=True)
    for old in old_copies:
        if not os.path.lexists(output_dir):
            os.replace(old / name, output_dir)
            _logger.warning(f'restored {output_dir} from {old}: a process was interrupted while replacing it')
    for kind, p in stale:
        shutil.rmtree(p, ignore_errors=True)
        if kind == 'tmp':
            _logger.info(f'removed {p}: the unfinished folder of an interrupted replacement of {output_dir}')
    for kind, p in unknown:
        if kind == 'old' and not (p / name).exists():
            shutil.rmtree(p, ignore_errors=True)  # emptied: its copy was put back above
        elif kind == 'old':
            _logger.warning(f'{p}/{name} is a previous copy of {output_dir} that an interrupted replacement moved '
                            f'aside; remove {p} if nothing is writing {output_dir}')
        else:
            _logger.warning(f'{p} is the unfinished folder of a replacement of {output_dir}; remove it if nothing is '
                            f'writing {output_dir}')


def _check_replaceable(output_dir: Path, overwrite: bool, check_existing: Optional[Callable[[Path], None]]):
    if not os.path.lexists(output_dir):
        return
    if check_existing is not None:
        check_existing(output_dir)
    if not overwrite:
        raise FileExistsError(f'{output_dir} exists; pass overwrite=True to replace it')


def _swap_in(folder: Path, output_dir: Path):
    """Rename the finished `folder` to `output_dir`; an existing one is moved aside first, then removed."""
    if not os.path.lexists(output_dir):
        os.replace(folder, output_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=_work_prefix(output_dir), suffix='.old', dir=output_dir.parent))
    try:
        os.replace(output_dir, old / output_dir.name)
        try:
            os.replace(folder, output_dir)
        except BaseException:
            os.replace(old / output_dir.name, output_dir)  # put the old folder back
            raise
    finally:
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)


def _not_written(output_dir: Path, existed: bool, e: OSError) -> OSError:
    return OSError(f'cannot write {output_dir}: {e.strerror or e}; '
                   + ('it is as it was' if existed else 'nothing was written'))


def replace_folder(build_fn: Callable[[Path], None], output_dir: PathLike, overwrite: bool = False,
                   check_existing: Optional[Callable[[Path], None]] = None) -> Path:
    """Make the folder `output_dir` with `build_fn(folder)`, whole or not at all (a full disk, a killed process).

    `build_fn` fills an empty temporary folder beside `output_dir`, which is then renamed into place; what interrupted
    replacements of `output_dir` left is cleared first (`recover_interrupted`). An existing `output_dir` is kept
    (FileExistsError) unless `overwrite`; then it is moved aside, the new folder renamed in and the old one removed.
    `check_existing(output_dir)`, where given, runs on an existing `output_dir` before the build and again right
    before the swap (another process may have written it meanwhile), and raises the caller's own error to keep it.

    Returns:
        `output_dir`, absolute.

    Raises:
        OSError: building or renaming failed; its message names `output_dir` and says that it is as it was, or that
            nothing was written. The temporary folder is removed whatever happens.
    """
    output_dir = Path(output_dir).absolute()
    recover_interrupted(output_dir)
    _check_replaceable(output_dir, overwrite, check_existing)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    existed = os.path.lexists(output_dir)
    work = Path(tempfile.mkdtemp(prefix=_work_prefix(output_dir), suffix='.tmp', dir=output_dir.parent))
    try:
        try:
            build_fn(work)
        except OSError as e:
            raise _not_written(output_dir, existed, e) from e
        _check_replaceable(output_dir, overwrite, check_existing)
        try:
            _swap_in(work, output_dir)
        except OSError as e:
            raise _not_written(output_dir, existed, e) from e
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return output_dir
