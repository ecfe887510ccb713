"""The main job (`python -m timm_mlit`) given a data folder it cannot use: one line naming the file or folder and what
is wrong with it, status 1, and no traceback."""
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from test_data import deny_reading, write_raw_idx

from timm_mlit.__main__ import main
from timm_mlit.data import write_idx

PROG = 'python -m timm_mlit'


def fashion_folder(folder, images=None, labels=None):
    """Fashion-MNIST test files in `folder`: 4 valid images and labels unless given."""
    folder.mkdir(exist_ok=True)
    if images is None:
        write_idx(folder / 't10k-images-idx3-ubyte', np.zeros((4, 28, 28), np.uint8))
    if labels is None:
        write_idx(folder / 't10k-labels-idx1-ubyte', np.arange(4, dtype=np.uint8))
    return folder


def run_job(*args):
    env = dict(os.environ, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, '-m', 'timm_mlit', '--log-freq', '0', *args], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.mark.parametrize('case', ['ndim255', 'negative_label'])
def test_main_job_names_the_broken_idx_file_in_one_line(tmp_path, case):
    folder = fashion_folder(tmp_path / 'd', images=case == 'ndim255' or None, labels=case == 'negative_label' or None)
    if case == 'ndim255':
        bad = folder / 't10k-images-idx3-ubyte'
        bad.write_bytes(b'\x00\x00\x08\xff' + b'\x00' * 100)
        what = 'impossible header: 255 dimensions'
    else:
        bad = folder / 't10k-labels-idx1-ubyte'
        write_raw_idx(bad, 0x09, [4], np.array([0, 1, -3, 2], np.int8).tobytes())
        what = 'label -3 is outside the 10 classes'
    proc = run_job('--data-dir', str(folder))
    assert proc.returncode == 1, proc.stderr
    assert 'Traceback' not in proc.stderr and proc.stdout == ''
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f'{PROG}: error: ') and f'{bad}: {what}' in last, proc.stderr


@pytest.mark.parametrize('case, match', [
    ('label_10', r't10k-labels-idx1-ubyte: label 10 \(3 more like it\) is outside the 10 classes'),
    ('float_images', r't10k-images-idx3-ubyte: float32 images .* are uint8'),
    ('wrong_type_byte', r't10k-images-idx3-ubyte: not an idx file \(unknown type byte 0x07'),
])
def test_main_job_names_what_is_wrong_with_an_idx_file(tmp_path, monkeypatch, case, match):
    from timm_mlit import __main__ as job
    ran = []
    monkeypatch.setattr(job, 'create_loader', lambda *a, **k: ran.append(a))  # nothing gets as far as evaluating
    folder = fashion_folder(tmp_path, images=case != 'label_10' or None, labels=case == 'label_10' or None)
    if case == 'label_10':
        write_idx(folder / 't10k-labels-idx1-ubyte', np.arange(10, 14, dtype=np.uint8))
    else:
        data = np.zeros((4, 28, 28), '>f4').tobytes() if case == 'float_images' else bytes(4 * 28 * 28)
        write_raw_idx(folder / 't10k-images-idx3-ubyte', 0x0D if case == 'float_images' else 0x07, [4, 28, 28], data)
    with pytest.raises(SystemExit, match=f'^{PROG}: error: .*{folder}/{match}') as e:
        main(['--data-dir', str(folder)])
    assert '\n' not in str(e.value) and ran == []


def test_main_job_calls_a_data_dir_that_is_a_file_a_file(tmp_path):
    (tmp_path / 'f').write_text('x')
    with pytest.raises(SystemExit, match=f'data folder {tmp_path}/f is a file, not a folder'):
        main(['--data-dir', str(tmp_path / 'f')])


def test_main_job_calls_an_unreadable_data_folder_unreadable(tmp_path, monkeypatch):
    folder = fashion_folder(tmp_path / 'd')
    deny_reading(monkeypatch, folder)
    with pytest.raises(SystemExit, match=f'cannot read the data folder {folder} '):
        main(['--data-dir', str(folder)])


@pytest.mark.skipif(not hasattr(os, 'geteuid') or os.geteuid() == 0, reason='root reads a folder chmod 000')
def test_main_job_calls_an_unreadable_data_folder_unreadable_for_real(tmp_path):
    folder = fashion_folder(tmp_path / 'd')
    os.chmod(folder, 0)
    try:
        proc = run_job('--data-dir', str(folder))
    finally:
        os.chmod(folder, 0o755)
    assert proc.returncode == 1 and f'cannot read the data folder {folder} ' in proc.stderr.splitlines()[-1]


def test_main_job_reads_a_header_that_matches_its_file(tmp_path):
    # the checks refuse only what is wrong: 4 images of 28x28 whose header says so are read
    folder = fashion_folder(tmp_path)
    assert (folder / 't10k-images-idx3-ubyte').read_bytes()[:16] == b'\x00\x00\x08\x03' + struct.pack('>3i', 4, 28, 28)
    assert main(['--data-dir', str(folder), '--log-freq', '0'])['images'] == 4
