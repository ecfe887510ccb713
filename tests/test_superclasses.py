"""The super-class file, its reader and the super-class tool (timm-mlit-superclasses): every input checked before
anything is built or evaluated from it, and each problem said in one line."""
import json
import os
import pickle
import resource
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import timm_mlit  # noqa: F401
from timm_mlit.superclasses import SuperClasses, cifar100_coarse, load_superclasses, superclasses_from_confusion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROG = 'timm-mlit-superclasses'
CLASSES = 4
DENSE = dict(moe_layers=0, depth=1, num_classes=CLASSES)
MEMORY_LIMIT = 4 << 30  # a run that allocates without bound ends in MemoryError here, not by the kernel's hand


def run(*argv, timeout=300) -> subprocess.CompletedProcess:
    """`python -m ARGV` in a process whose address space is bounded."""
    return subprocess.run([sys.executable, '-m', *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS='1'),
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT)))


def one_line_error(r: subprocess.CompletedProcess, prog: str = PROG) -> str:
    """The message of a run that ended in exactly one `<prog>: error: <msg>` line, status 1."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith(f'{prog}: error: '), r.stderr[-3000:]
    return lines[0][len(f'{prog}: error: '):]


def tool(*argv) -> subprocess.CompletedProcess:
    return run('timm_mlit.superclasses', *argv)


def write_json(path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def superclass_file(tmp_path, classes, name='sc.json') -> str:
    return write_json(tmp_path / name, dict(format='timm-mlit-superclasses/1', classes=classes))


# --- the super-class file ---

@contextmanager
def bounded_memory(extra: int = 1 << 30):
    """This process may grow by `extra` bytes at most: an allocation without bound raises MemoryError instead of
    taking the machine's memory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open('/proc/self/statm') as f:
        size = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (size + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(autouse=True)
def _bounded():
    """Every test here: a regression that allocates without bound fails it, and spares the machine."""
    with bounded_memory(2 << 30):
        yield


@pytest.mark.parametrize('field, value', [('superclass', 10 ** 9), ('index', 10 ** 9), ('index', -10 ** 9)])
def test_a_huge_index_is_refused_naming_its_entry_before_anything_is_built_from_it(tmp_path, field, value):
    classes = [dict(index=0, superclass=0), dict(index=1, superclass=0)]
    classes[0][field] = value
    with pytest.raises(ValueError, match=rf'classes\[0\]: its {field} is {value}, out of range'):
        load_superclasses(superclass_file(tmp_path, classes))


@pytest.mark.slow
def test_timm_mlit_run_refuses_a_huge_superclass_index_in_one_line(tmp_path):
    path = superclass_file(tmp_path, [dict(index=0, superclass=10 ** 9), dict(index=1, superclass=0)])
    script = tmp_path / 'train.py'
    script.write_text('from timm.task import ClassificationTask\nraise SystemExit("the script ran")\n')
    msg = one_line_error(run('timm_mlit.run', script, '--superclasses', path, timeout=120), 'timm-mlit-run')
    assert path in msg and 'classes[0]' in msg and str(10 ** 9) in msg


@pytest.mark.parametrize('field, value, says', [
    ('superclass', 0.7, 'must be an integer'), ('superclass', True, 'must be an integer'),
    ('index', True, 'must be an integer'), ('index', '1', 'must be an integer'), ('superclass', None, 'integer'),
    ('superclass', -1, 'out of range'), ('index', 2, 'out of range')])
def test_a_superclass_entry_that_is_no_valid_index_is_named(tmp_path, field, value, says):
    classes = [dict(index=0, superclass=0), dict(index=1, superclass=1)]
    classes[1][field] = value
    with pytest.raises(ValueError, match=rf'classes\[1\].*{field}.*{says}'):
        load_superclasses(superclass_file(tmp_path, classes))


def test_a_superclass_file_without_classes_says_so(tmp_path):
    with pytest.raises(ValueError, match='no classes'):
        load_superclasses(superclass_file(tmp_path, []))
    for bad in ([1, 2], dict(classes=[3]), dict(classes=[dict(index=0, superclass=0, name=5)]),
                dict(classes=[dict(index=0, superclass=0)], superclass_names='abc')):
        with pytest.raises(ValueError, match='sc.json'):
            load_superclasses(write_json(tmp_path / 'sc.json', bad))
    (tmp_path / 'deep.json').write_text('[' * 100000 + ']' * 100000)
    with pytest.raises(ValueError, match='deep.json'):
        load_superclasses(str(tmp_path / 'deep.json'))


def test_a_message_lists_a_few_of_many_classes(tmp_path):
    path = superclass_file(tmp_path, [dict(index=0, superclass=0), dict(index=1, superclass=1)])
    with pytest.raises(ValueError, match=r'\[2, 3, .*, \.\.\. \(999998 in all\)\] of the 1000000') as e:
        load_superclasses(path, num_classes=10 ** 6)
    assert len(str(e.value)) < 300


@pytest.mark.parametrize('assignment', [[0, 0.7, 1], [0, True, 1], [0, 10 ** 9, 1], [0, -1, 1], [0, '1', 1]])
def test_a_division_takes_only_integer_superclasses_of_its_range(assignment):
    with pytest.raises(ValueError, match='class 1'):
        SuperClasses(assignment)
    assert SuperClasses([np.int64(0), 1, 1]).assignment == [0, 1, 1]


def test_saving_removes_a_stale_temporary_of_a_dead_writer(tmp_path):
    """The file goes through `files.atomic_write`, which clears what a killed writer left."""
    dead = subprocess.Popen([sys.executable, '-c', ''])
    dead.wait()
    (tmp_path / f'sc.json.tmp.{dead.pid}').write_text('{"half": ')
    SuperClasses([0, 1]).save(str(tmp_path / 'sc.json'))
    assert os.listdir(tmp_path) == ['sc.json']


@pytest.mark.parametrize('bad', [-3, float('nan'), float('inf')])
def test_a_confusion_matrix_with_an_impossible_count_is_named(bad):
    confusion = np.eye(4) * 10 + 1
    confusion[2, 1] = bad
    with pytest.raises(ValueError, match=r'\[2, 1\]'):
        superclasses_from_confusion(confusion, 2)


# --- CIFAR-100's own super-classes ---

def write_cifar100(root, protocol=2, **change) -> str:
    """A cifar-100-python folder in the real files' layout: dicts of bytes keys, labels as lists of ints, the images
    a uint8 array, names as lists of bytes (the real ones are Python 2 pickles, protocol 2, read with
    encoding='bytes')."""
    folder = root / 'cifar-100-python'
    folder.mkdir(parents=True, exist_ok=True)
    fine = list(range(100)) * 2
    train = {b'filenames': [b'x.png'] * 200, b'batch_label': b'training batch 1 of 1', b'fine_labels': fine,
             b'coarse_labels': [f // 5 for f in fine], b'data': np.zeros((200, 3072), np.uint8)}
    meta = {b'fine_label_names': [f'fine{i}'.encode() for i in range(100)],
            b'coarse_label_names': [f'coarse{i}'.encode() for i in range(20)]}
    for name, obj in (('train', train), ('meta', meta)):
        obj = change.get(name, obj)
        data = obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=protocol)
        (folder / name).write_bytes(data)
    return str(folder)


class RunsCode:
    """Unpickling this runs a shell command: what a crafted CIFAR-100 file could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


class ExecsCode(RunsCode):
    def __reduce__(self):
        return exec, (f'open({self.marker!r}, "w").close()',)


@pytest.mark.parametrize('protocol, numpy_module', [(2, 'numpy._core.multiarray'), (2, 'numpy.core.multiarray'),
                                                    (5, 'numpy._core.numeric'), (5, 'numpy.core.numeric')])
def test_cifar100_files_in_the_real_layout_still_load(tmp_path, protocol, numpy_module):
    """As the real files are (protocol 2, written by numpy 1: numpy.core) and as numpy 2 writes them (numpy._core),
    and at protocol 5 (Python >= 3.14's default)."""
    folder = write_cifar100(tmp_path, protocol)
    train = (tmp_path / 'cifar-100-python' / 'train')
    data = train.read_bytes()
    old = b'numpy._core.multiarray' if protocol == 2 else b'\x13numpy._core.numeric'  # (protocol 5: length-prefixed)
    new = numpy_module.encode() if protocol == 2 else bytes([len(numpy_module)]) + numpy_module.encode()
    assert old in data
    train.write_bytes(data.replace(old, new))
    sc = cifar100_coarse(folder)
    assert sc.num_classes == 100 and sc.num_superclasses == 20 and sc.groups()[3] == [15, 16, 17, 18, 19]
    assert sc.class_names[17] == 'fine17' and sc.superclass_names[3] == 'coarse3'


@pytest.mark.parametrize('crafted', [RunsCode, ExecsCode])
@pytest.mark.parametrize('where', ['train', 'meta'])
def test_a_crafted_cifar100_pickle_runs_no_code(tmp_path, crafted, where):
    marker = tmp_path / 'ran'
    payload = {b'fine_labels': [0], b'coarse_labels': [0], b'data': crafted(marker)} if where == 'train' else \
        crafted(marker)
    write_cifar100(tmp_path, **{where: payload})
    with pytest.raises(ValueError, match=f'cifar-100-python/{where}'):
        cifar100_coarse(str(tmp_path))
    assert not marker.exists()


@pytest.mark.slow
def test_the_tool_refuses_a_crafted_cifar100_pickle_in_one_line(tmp_path):
    marker = tmp_path / 'ran'
    write_cifar100(tmp_path, meta=RunsCode(marker))
    msg = one_line_error(tool('--cifar100-coarse', tmp_path, '-o', tmp_path / 'sc.json'))
    assert 'cifar-100-python/meta' in msg and not marker.exists() and not (tmp_path / 'sc.json').exists()


def _labels(fine, coarse):
    return {b'fine_labels': fine, b'coarse_labels': coarse, b'data': np.zeros((len(fine), 3072), np.uint8)}


BAD_CIFAR = {
    'truncated': dict(train=pickle.dumps(_labels(list(range(100)), [f // 5 for f in range(100)]), protocol=2)[:300]),
    'garbage': dict(meta=b'\x80\x02this is not a pickle'),
    'empty': dict(meta=b''),
    'a list, not a dict': dict(train=[1, 2, 3]),
    'no labels': dict(train={b'data': np.zeros(3, np.uint8)}),
    'label lists of two lengths': dict(train=_labels(list(range(100)), [f // 5 for f in range(99)])),
    'a fine label beyond the names': dict(train=_labels(list(range(101)), [f // 5 for f in range(100)] + [0])),
    'a coarse label beyond the names': dict(train=_labels(list(range(100)), [f // 5 for f in range(99)] + [20])),
    'a fine class without images': dict(train=_labels(list(range(99)), [f // 5 for f in range(99)])),
    'labels that are not ints': dict(train=_labels([float(f) for f in range(100)], [f // 5 for f in range(100)])),
    'names that are not text': dict(meta={b'fine_label_names': list(range(100)), b'coarse_label_names': [b'a'] * 20}),
    'a fine class under two coarse classes': dict(train=_labels([0] + list(range(100)),
                                                                [1] + [f // 5 for f in range(100)])),
}


@pytest.mark.parametrize('case', sorted(BAD_CIFAR))
def test_a_broken_cifar100_folder_is_named_in_one_message(tmp_path, case):
    write_cifar100(tmp_path, **BAD_CIFAR[case])
    with pytest.raises(ValueError, match='cifar-100-python'):
        cifar100_coarse(str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize('case', ['truncated', 'a list, not a dict', 'label lists of two lengths'])
def test_the_tool_names_a_broken_cifar100_folder_in_one_line(tmp_path, case):
    write_cifar100(tmp_path, **BAD_CIFAR[case])
    assert 'cifar-100-python' in one_line_error(tool('--cifar100-coarse', tmp_path, '-o', tmp_path / 'sc.json'))
    assert not (tmp_path / 'sc.json').exists()


@pytest.mark.slow
def test_num_superclasses_beside_cifar100_coarse_is_checked_against_its_20(tmp_path):
    write_cifar100(tmp_path)
    msg = one_line_error(tool('--cifar100-coarse', tmp_path, '--num-superclasses', '4', '-o', tmp_path / 'a.json'))
    assert '--num-superclasses 4' in msg and '20' in msg and not (tmp_path / 'a.json').exists()
    r = tool('--cifar100-coarse', tmp_path, '--num-superclasses', '20', '-o', tmp_path / 'new' / 'b.json')
    assert r.returncode == 0, r.stderr
    assert load_superclasses(str(tmp_path / 'new' / 'b.json'), num_superclasses=20).num_classes == 100
    assert os.listdir(tmp_path / 'new') == ['b.json']  # written in place, no temporary left
    r = tool('--cifar100-coarse', tmp_path, '--plot', tmp_path / 'c.png', '-o', tmp_path / 'c.json')
    assert r.returncode == 2 and '--plot' in r.stderr and not (tmp_path / 'c.json').exists()


# --- from a dense model's confusions ---

@pytest.fixture(scope='module')
def images(tmp_path_factory):
    """validation/ of 4 classes, 3 images each, and a dense checkpoint of a 4-class model (a train.py-like dict)."""
    root = tmp_path_factory.mktemp('sc_tool')
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        d = root / 'data' / 'validation' / f'class{c}'
        d.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(d / f'{i}.png')
    torch.manual_seed(0)
    model = timm.create_model('mobile_vmoe_vit_xxs_patch3_36', **DENSE)
    torch.save({'state_dict': model.state_dict(), 'arch': 'mobile_vmoe_vit_xxs_patch3_36'}, root / 'dense.pth')
    return root


def dense_argv(root, *more):
    kwargs = [f'{k}={v}' for k, v in DENSE.items() if k != 'num_classes']
    return ['--model', 'mobile_vmoe_vit_xxs_patch3_36', '--model-kwargs', *kwargs, '--checkpoint', root / 'dense.pth',
            '--num-classes', CLASSES, '--dataset', '', '--data-dir', root / 'data', '-j', '0', '-b', '4', *more]


@pytest.mark.slow
def test_the_tool_writes_its_outputs_into_a_new_folder_and_leaves_no_temporary(images, tmp_path):
    out, png = tmp_path / 'new' / 'sc.json', tmp_path / 'plots' / 'confusion.png'
    r = tool(*dense_argv(images, '-E', '2', '-o', out, '--plot', png))
    assert r.returncode == 0, r.stderr[-3000:]
    assert load_superclasses(str(out), num_classes=CLASSES, num_superclasses=2).class_names[0] == 'class0'
    assert os.listdir(out.parent) == ['sc.json'] and os.listdir(png.parent) == ['confusion.png']


@pytest.mark.slow
@pytest.mark.parametrize('case', ['corrupt', 'truncated', 'another architecture', 'wrong --num-classes'])
def test_the_tool_names_a_checkpoint_that_does_not_fit_in_one_line(images, tmp_path, case):
    ckpt = tmp_path / 'ckpt.pth'
    more = []
    if case == 'corrupt':
        ckpt.write_bytes(b'PK\x03\x04 not a checkpoint at all' * 10)
    elif case == 'truncated':
        ckpt.write_bytes((images / 'dense.pth').read_bytes()[:5000])
    elif case == 'another architecture':
        torch.save(timm.create_model('vit_tiny_patch16_224', img_size=32, depth=1, num_classes=CLASSES).state_dict(),
                   ckpt)
    else:
        ckpt, more = images / 'dense.pth', ['--num-classes', '3']
    argv = dense_argv(images, '-E', '2', '-o', tmp_path / 'sc.json', *more)
    argv[argv.index('--checkpoint') + 1] = ckpt
    msg = one_line_error(tool(*argv))
    assert str(ckpt) in msg and not (tmp_path / 'sc.json').exists()


@pytest.mark.slow
@pytest.mark.parametrize('case', ['-E 1', '-E 5', '-E 3 --num-classes 2', 'output under a file', 'output a folder',
                                  'plot under a file', 'plot is the output', 'missing checkpoint', '--device bogus'])
def test_the_tool_checks_its_arguments_before_evaluating_anything(images, tmp_path, case):
    """The split holds a broken image: a check made after the evaluation would never be reached."""
    (tmp_path / 'file').write_text('')
    out, png, more = tmp_path / 'sc.json', tmp_path / 'c.png', []
    if case.startswith('-E') or case.startswith('--device'):
        more = case.split()
    elif case.startswith('output'):
        out = tmp_path / 'file' / 'sc.json' if 'under' in case else tmp_path
    elif case.startswith('plot'):
        png = tmp_path / 'file' / 'c.png' if 'under' in case else out
    argv = dense_argv(images, '-E', '2', *more, '-o', out, '--plot', png)
    argv[argv.index('--data-dir') + 1] = tmp_path / 'broken'
    (tmp_path / 'broken' / 'validation' / 'class0').mkdir(parents=True)
    (tmp_path / 'broken' / 'validation' / 'class0' / '0.png').write_bytes(b'not a png')
    if case == 'missing checkpoint':
        argv[argv.index('--checkpoint') + 1] = tmp_path / 'none.pth'
    msg = one_line_error(tool(*argv))
    assert '.tmp.' not in msg
    named = {'-E 1': '--num-superclasses', '-E 5': '--num-superclasses', '-E 3 --num-classes 2': '--num-superclasses',
             'output under a file': str(tmp_path / 'file'), 'output a folder': str(tmp_path),
             'plot under a file': str(tmp_path / 'file'), 'plot is the output': '--plot',
             'missing checkpoint': 'none.pth', '--device bogus': "--device 'bogus'"}[case]
    assert named in msg


@pytest.mark.slow
@pytest.mark.parametrize('case', ['5 classes', 'no image readable', 'no folder of the split'])
def test_the_tool_names_a_split_it_cannot_evaluate(images, tmp_path, case):
    data = tmp_path / 'data' / 'validation'
    for c in range(CLASSES + (case == '5 classes')):
        (data / f'class{c}').mkdir(parents=True)
        if case == 'no image readable':
            (data / f'class{c}' / '0.png').write_bytes(b'not a png')
        else:
            Image.new('RGB', (36, 36)).save(data / f'class{c}' / '0.png')
    split = 'holdout' if case == 'no folder of the split' else 'validation'  # (timm would read train/ and all)
    argv = dense_argv(images, '-E', '2', '-o', tmp_path / 'sc.json', '--split', split)
    argv[argv.index('--data-dir') + 1] = tmp_path / 'data'
    r = tool(*argv)
    if case == 'no image readable':  # (timm's reader warns of each image it skips)
        assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-3000:]
        msg = r.stderr.strip().splitlines()[-1]
    else:
        msg = one_line_error(r)
    assert {'5 classes': '5 classes', 'no image readable': "split 'validation'",
            'no folder of the split': "--split 'holdout'"}[case] in msg
    assert not (tmp_path / 'sc.json').exists()


def test_the_tool_names_an_unreadable_class_folder_of_its_split(images, tmp_path, monkeypatch):
    from test_data import deny_reading

    from timm_mlit.superclasses import main
    deny_reading(monkeypatch, images / 'data' / 'validation' / 'class1')
    argv = [str(a) for a in dense_argv(images, '-E', '2', '-o', tmp_path / 'sc.json')]
    with pytest.raises(SystemExit, match=f"cannot read the folder {images}/data/validation/class1 "):
        main(argv)
    assert not (tmp_path / 'sc.json').exists()


# --- timm-mlit-run ---

@pytest.mark.slow
def test_timm_mlit_run_refuses_superclasses_for_a_script_that_trains_nothing_at_once(tmp_path):
    sc = SuperClasses([0, 1]).save(str(tmp_path / 'sc.json'))
    script = tmp_path / 'validate.py'
    script.write_text('open(__file__ + ".ran", "w").close()\n')
    msg = one_line_error(run('timm_mlit.run', script, '--superclasses', sc, timeout=120), 'timm-mlit-run')
    assert 'train.py' in msg and not os.path.exists(f'{script}.ran')


def test_cifar100_coarse_ships_with_the_package_as_its_20_groups_of_5():
    sc = load_superclasses('cifar100_coarse', num_classes=100, num_superclasses=20)
    groups = {sc.superclass_names[g]: sorted(sc.class_names[c] for c in members) for g, members in
              enumerate(sc.groups())}
    assert sorted(len(m) for m in groups.values()) == [5] * 20 and sc.class_names == sorted(sc.class_names)
    assert groups['aquatic_mammals'] == ['beaver', 'dolphin', 'otter', 'seal', 'whale']
    assert groups['vehicles_2'] == ['lawn_mower', 'rocket', 'streetcar', 'tank', 'tractor']
    assert groups['people'] == ['baby', 'boy', 'girl', 'man', 'woman']
    with pytest.raises(FileNotFoundError, match='cifar10_coarse does not exist'):
        load_superclasses('cifar10_coarse')
