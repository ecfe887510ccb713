""" CIFAR-100's coarse classes, read from its python pickles without running anything they name

CIFAR-100 (https://www.cs.toronto.edu/~kriz/cifar.html) gives each image a fine and a coarse label (`fine_labels`,
`coarse_labels` in `cifar-100-python/train`, the names in `meta`); torchvision does not expose the coarse ones.
The files are pickles, and `pickle.load` calls whatever a pickle names: a crafted file would run code. These are
read by an unpickler that finds only what the real files hold (dicts, lists, ints and bytes, and the numpy arrays
of the images), so any other name (os.system, builtins.exec, ...) is refused.
"""
import os
import pickle
from typing import Dict, List, Tuple

import numpy as np

__all__ = ['COARSE_CLASSES', 'coarse_of_fine']

COARSE_CLASSES = 20


def coarse_of_fine(root: str) -> Tuple[str, List[int], List[str], List[str]]:
    """(the folder read, each fine class's coarse class, the fine class names, the coarse class names), from the
    `train` and `meta` pickles in `root` (the cifar-100-python folder or the one holding it), every label checked
    against the names."""
    folder = root if os.path.isfile(os.path.join(root, 'train')) else os.path.join(root, 'cifar-100-python')
    paths = [os.path.join(folder, name) for name in ('train', 'meta')]
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f'no CIFAR-100 pickle {p} (expected the cifar-100-python folder of the python '
                                    f'version of CIFAR-100)')
    train_path, meta_path = paths
    train, meta = _unpickle(train_path), _unpickle(meta_path)
    fine, coarse = (_list_of(train, key, int, train_path) for key in ('fine_labels', 'coarse_labels'))
    fine_names = _list_of(meta, 'fine_label_names', str, meta_path)
    coarse_names = _list_of(meta, 'coarse_label_names', str, meta_path)
    if len(fine) != len(coarse):
        raise ValueError(f'{train_path} has {len(fine)} fine_labels but {len(coarse)} coarse_labels (one of each per '
                         f'image)')
    for what, labels, names in (('fine', fine, fine_names), ('coarse', coarse, coarse_names)):
        bad = next((label for label in labels if not 0 <= label < len(names)), None)
        if bad is not None:
            raise ValueError(f'{train_path} has {what} label {bad}, but {meta_path} names {len(names)} {what} classes '
                             f'(0..{len(names) - 1})')
    assignment: Dict[int, int] = {}
    for f, c in zip(fine, coarse):
        if assignment.setdefault(f, c) != c:
            raise ValueError(f'{train_path}: fine class {f} appears under two coarse classes')
    missing = sorted(set(range(len(fine_names))) - set(assignment))
    if missing:
        raise ValueError(f'{train_path} has no image of fine class(es) {missing[:10]}, so no coarse class for them')
    return folder, [assignment[f] for f in range(len(fine_names))], fine_names, coarse_names


_NDARRAY = object()  # numpy.ndarray as a pickle names it: only an argument of _reconstruct, never called
_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's array-rebuilding function, wherever this numpy keeps it
_FROMBUFFER = np.empty(0).__reduce_ex__(5)[0]  # the same at pickle protocol 5: an array of the file's own bytes


def _empty_array(subtype, shape, typecode):
    """numpy's `_reconstruct(ndarray, (0,), b'b')`, as every numpy pickle calls it: an empty array that the pickle
    then fills from its own bytes, so no array is larger than the file."""
    if subtype is not _NDARRAY or tuple(shape) != (0,):
        raise pickle.UnpicklingError('an array that numpy did not pickle')
    return _RECONSTRUCT(np.ndarray, (0,), typecode)


def _latin1(text, encoding):
    """`_codecs.encode(text, 'latin1')`: bytes as Python 3 pickles them at protocol 2."""
    if not isinstance(text, str) or encoding != 'latin1':
        raise pickle.UnpicklingError('bytes that Python did not pickle')
    return text.encode('latin1')


def _empty_bytes(*args):
    if args:
        raise pickle.UnpicklingError('bytes that Python did not pickle')
    return b''


class _CifarUnpickler(pickle.Unpickler):
    """The CIFAR-100 pickles hold dicts, lists, ints, bytes and numpy arrays: their pickles name numpy's
    `_reconstruct`, `ndarray` and `dtype` (`_frombuffer` at protocol 5; bytes written by Python 3 at protocol 2,
    `_codecs.encode` and `bytes`), and nothing else is found, so a crafted file can call nothing (os.system,
    builtins.exec, ...)."""
    GLOBALS = {**{(f'numpy.{core}.multiarray', '_reconstruct'): _empty_array for core in ('core', '_core')},
               **{(f'numpy.{core}.numeric', '_frombuffer'): _FROMBUFFER for core in ('core', '_core')},
               ('numpy', 'ndarray'): _NDARRAY, ('numpy', 'dtype'): np.dtype, ('_codecs', 'encode'): _latin1,
               ('__builtin__', 'bytes'): _empty_bytes}

    def find_class(self, module, name):
        if (module, name) not in self.GLOBALS:
            raise pickle.UnpicklingError(f'it names {module}.{name}, which no CIFAR-100 file holds (refused)')
        return self.GLOBALS[module, name]


def _unpickle(path: str) -> dict:
    """A CIFAR-100 pickle's dict, keys and lists of bytes decoded, read without running anything it names."""
    try:
        with open(path, 'rb') as f:
            data = _CifarUnpickler(f, encoding='bytes').load()
    except OSError:
        raise
    except Exception as e:  # a damaged pickle raises many types
        msg = str(e).splitlines()[0] if str(e) else ''
        raise ValueError(f'{path} is not a CIFAR-100 pickle ({type(e).__name__}{": " if msg else ""}{msg})') from None
    if not isinstance(data, dict):
        raise ValueError(f'{path} holds a {type(data).__name__}, not the dict of a CIFAR-100 pickle')
    return {(k.decode('latin1') if isinstance(k, bytes) else k): _decode(v) for k, v in data.items()}


def _decode(v):
    if isinstance(v, list):
        return [x.decode('latin1') if isinstance(x, bytes) else x for x in v]
    return v


def _list_of(data: dict, key: str, kind: type, path: str) -> list:
    """data[key], if it is a non-empty list of `kind` (bools are no ints here)."""
    values = data.get(key)
    if not isinstance(values, list) or not values or \
            not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
        what = 'missing' if values is None else f'not a list of {"labels" if kind is int else "names"}'
        raise ValueError(f'{path} is not CIFAR-100 in its python format: its {key} is {what}')
    return values
