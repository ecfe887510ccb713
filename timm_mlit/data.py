""" Datasets and the pre-training input pipeline that timm does not already give

1. MNIST-family datasets (MNIST, KMNIST, Fashion-MNIST) that open their idx files where they are, gzipped or not:
   torchvision's layout `root/<Name>/raw/train-images-idx3-ubyte` or a flat folder such as the one of Debian's
   `dataset-fashion-mnist` package (`/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz`), which
   torchvision cannot read. Their grey images are returned as RGB by default, the 3 channels every mLiT (and
   timm's default transforms) expect.

   Importing this module puts them in the table behind timm's `create_dataset('torch/<name>')` (timm has no
   registration API; see `register_timm_datasets`), so timm's own train.py uses them through its plugin hook. It
   also adds `torch/svhn` and `torch/flowers102`, which timm's table lacks (torchvision's SVHN and Flowers102 behind
   timm's `train=` call: the train split, else the test split)::

       python train.py --device-modules timm_mlit.data --dataset torch/fashion_mnist \
           --data-dir /usr/share/datasets/fashion-mnist --model mlit_xxs ...

2. `MAEPretrainDataset`: the pre-training view of any dataset - the augmented image and the masking noise of each
   sample, both drawn from a generator seeded by (seed, epoch, sample index). Nothing about a sample then depends
   on which process or worker loads it or on what ran before, which is what makes a resumed run equal an
   uninterrupted one and a multi-process run equal a single-process one.

3. `check_image_folder`: what timm's image-folder reader leaves unsaid, a folder under the root that cannot be listed
   (its walk skips it: the class would vanish). The launcher (`timm-mlit-run`) checks a script's --data-dir with it.
"""
import gzip
import math
import os
import random
import struct
import warnings
import zlib
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, Union, cast

import numpy as np
import torch
import torch.utils.data
from PIL import Image
from torchvision.datasets import KMNIST, MNIST, SVHN, FashionMNIST, Flowers102

from .files import atomic_write

__all__ = [
    'DEBIAN_FASHION_MNIST', 'read_idx', 'write_idx', 'IdxMNIST', 'IdxKMNIST', 'IdxFashionMNIST', 'TrainTestSVHN',
    'TrainTestFlowers102', 'TIMM_TORCH_DATASETS', 'register_timm_datasets', 'check_image_folder', 'MAEPretrainDataset',
]

DEBIAN_FASHION_MNIST = '/usr/share/datasets/fashion-mnist'  # apt-get install dataset-fashion-mnist

_IDX_DTYPES: Dict[int, np.dtype] = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype('>i2'),
                                    0x0C: np.dtype('>i4'), 0x0D: np.dtype('>f4'), 0x0E: np.dtype('>f8')}
_IDX_MAX_DIMS = 64  # numpy's limit


def write_idx(path: Union[str, os.PathLike], arr) -> str:
    """Write a uint8 array in the idx format (gzipped when `path` ends in .gz), atomically: the inverse of
    `read_idx` for MNIST-family images [N, H, W] and labels [N]."""
    path = os.fspath(path)
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    data = struct.pack('>BBBB', 0, 0, 0x08, arr.ndim) + struct.pack(f'>{arr.ndim}i', *arr.shape) + arr.tobytes()

    def write(f):
        if path.endswith('.gz'):
            with gzip.GzipFile(fileobj=f, mode='wb') as gz:
                gz.write(data)
        else:
            f.write(data)
    return atomic_write(path, write)


def read_idx(path: str) -> torch.Tensor:
    """Read an idx file (http://yann.lecun.com/exdb/mnist/), plain or gzipped, into a tensor. A header that does not
    describe the file (magic number, type byte, dimensions and their product against its length) is a ValueError
    naming the file."""
    opener = gzip.open if path.endswith('.gz') else open
    try:
        with opener(path, 'rb') as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f'{path}: not a readable gzip file ({type(e).__name__}: {e})') from e
    if len(data) < 4:
        raise ValueError(f'{path}: not an idx file (only {len(data)} bytes, shorter than the 4-byte magic number)')
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f'{path}: not an idx file (bad magic number {data[:4]!r})')
    if data[2] not in _IDX_DTYPES:
        raise ValueError(f'{path}: not an idx file (unknown type byte 0x{data[2]:02X}; idx has '
                         f'{", ".join(f"0x{t:02X}" for t in _IDX_DTYPES)})')
    ndim, offset = data[3], 4 + 4 * data[3]
    if ndim > _IDX_MAX_DIMS:
        raise ValueError(f'{path}: impossible header: {ndim} dimensions, more than the {_IDX_MAX_DIMS} an array can '
                         f'have')
    if len(data) < offset:
        raise ValueError(f'{path}: truncated: the header says {ndim} dimensions, the file holds {len(data)} bytes')
    shape = struct.unpack(f'>{ndim}i', data[4:offset])
    if min(shape, default=0) < 0:
        raise ValueError(f'{path}: impossible header: negative dimension in {shape}')
    dtype = _IDX_DTYPES[data[2]]
    count = math.prod(shape)  # (exact: numpy's int64 product can wrap around to the file's length)
    if len(data) - offset != count * dtype.itemsize:
        what = 'truncated' if len(data) - offset < count * dtype.itemsize else 'longer than its header says'
        raise ValueError(f'{path}: {what}: the header says {shape} ({count:,d} values of {dtype.itemsize} bytes), '
                         f'the file holds {len(data) - offset:,d} bytes of data')
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    return torch.from_numpy(arr.astype(dtype.newbyteorder('='), copy=True))


class _IdxMixin:
    """Find and read the idx files of a torchvision MNIST-family dataset in either layout, return RGB by default.

    Args (beyond torchvision's): img_mode: PIL mode of the returned images ('RGB' or 'L').
    """
    default_root: Optional[str] = None
    _install_hint = ''
    # What the torchvision MNIST-family class this mixes into sets (declared only, for the type checker):
    root: str
    train: bool
    data: torch.Tensor
    targets: torch.Tensor
    classes: List[str]
    transform: Optional[Callable]
    target_transform: Optional[Callable]

    if TYPE_CHECKING:
        @property
        def raw_folder(self) -> str:  # a property of each class below
            ...

    def __init__(self, root: Optional[str] = None, train: bool = True, transform: Optional[Callable] = None,
                 target_transform: Optional[Callable] = None, download: bool = False, img_mode: str = 'RGB'):
        root = root if root is not None else self.default_root
        if root is None:
            raise ValueError(f'{type(self).__name__} needs a root folder (--data-dir)')
        if img_mode not in ('RGB', 'L'):
            raise ValueError(f"img_mode must be 'RGB' or 'L', got {img_mode!r}")
        self.img_mode = img_mode
        name = type(self).__name__
        if os.path.exists(root) and not os.path.isdir(root):
            raise NotADirectoryError(f'{name}: data folder {root} is a file, not a folder')
        if not os.path.isdir(root) and not download:
            raise FileNotFoundError(f'{name}: data folder {root} does not exist')
        try:
            # (cast: the next class in the MRO is the torchvision dataset, not object as mypy sees a mixin's super())
            cast(Any, super()).__init__(root, train=train, transform=transform, target_transform=target_transform,
                                        download=download)
        except RuntimeError as e:
            if self._check_exists():
                raise
            for folder in (self.raw_folder, root):  # (what cannot be listed looks empty)
                if os.path.isdir(folder) and not os.access(folder, os.R_OK | os.X_OK):
                    raise PermissionError(f'{name}: cannot read the data folder {folder} (permission denied)') from e
            images = self._files()[0]
            raise FileNotFoundError(
                f'{name}: no idx files in {root}; looked for {", ".join(self._candidates(images))}'
                f'{self._install_hint}') from e

    def _candidates(self, name: str):
        for folder in (self.raw_folder, self.root):
            for ext in ('', '.gz'):
                yield os.path.join(folder, name + ext)

    def _find(self, name: str) -> Optional[str]:
        return next((p for p in self._candidates(name) if os.path.isfile(p)), None)

    def _files(self) -> Tuple[str, str]:
        split = 'train' if self.train else 't10k'
        return f'{split}-images-idx3-ubyte', f'{split}-labels-idx1-ubyte'

    def _check_exists(self) -> bool:
        return all(self._find(n) is not None for n in self._files())

    def _load_data(self):
        name = type(self).__name__
        found = [self._find(n) for n in self._files()]
        if None in found:
            looked = ', '.join(self._candidates(self._files()[found.index(None)]))
            raise RuntimeError(f'{name}: idx file not found; looked for {looked}')
        images, labels = (read_idx(p) for p in found)
        if images.ndim != 3 or images.dtype != torch.uint8:
            raise ValueError(f'{found[0]}: {str(images.dtype)[6:]} images of shape {tuple(images.shape)}; {name} '
                             f'images are uint8 (idx type 0x08) [N, H, W]')
        if labels.ndim != 1 or labels.is_floating_point():
            raise ValueError(f'{found[1]}: {str(labels.dtype)[6:]} labels of shape {tuple(labels.shape)}; {name} '
                             f'labels are integers [N]')
        if len(images) != len(labels):
            raise ValueError(f'{found[0]} holds {len(images)} images, {found[1]} {len(labels)} labels')
        classes = len(self.classes)
        outside = labels[(labels < 0) | (labels >= classes)]
        if len(outside):
            more = f' ({len(outside) - 1} more like it)' if len(outside) > 1 else ''
            raise ValueError(f'{found[1]}: label {int(outside[0])}{more} is outside the {classes} classes of {name} '
                             f'(0 to {classes - 1})')
        return images, labels.long()

    def __getitem__(self, index: int):
        img = Image.fromarray(self.data[index].numpy(), mode='L')
        if self.img_mode != 'L':
            img = img.convert(self.img_mode)
        target = int(self.targets[index])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


class IdxMNIST(_IdxMixin, MNIST):
    """MNIST from idx files in either layout (see module docstring)."""

    @property
    def raw_folder(self) -> str:
        return os.path.join(self.root, 'MNIST', 'raw')


class IdxKMNIST(_IdxMixin, KMNIST):
    """KMNIST from idx files in either layout (see module docstring)."""

    @property
    def raw_folder(self) -> str:
        return os.path.join(self.root, 'KMNIST', 'raw')


class IdxFashionMNIST(_IdxMixin, FashionMNIST):
    """Fashion-MNIST from idx files in either layout; by default from Debian's `dataset-fashion-mnist`."""
    default_root = DEBIAN_FASHION_MNIST
    _install_hint = ' (on Debian: apt-get install dataset-fashion-mnist)'

    @property
    def raw_folder(self) -> str:
        return os.path.join(self.root, 'FashionMNIST', 'raw')


class TrainTestSVHN(SVHN):
    """torchvision's SVHN as timm's torch/ table calls its datasets: train=True is 'train', else 'test'."""

    def __init__(self, root: str, train: bool = True, **kwargs):
        super().__init__(root, split='train' if train else 'test', **kwargs)


class TrainTestFlowers102(Flowers102):
    """torchvision's Flowers102 as timm's torch/ table calls its datasets: train=True is 'train' (1,020 images),
    else 'test' (6,149); the 'val' split is unused."""

    def __init__(self, root: str, train: bool = True, **kwargs):
        super().__init__(root, split='train' if train else 'test', **kwargs)


# What `create_dataset('torch/<name>')` gets from this module. Each class reads everything the torchvision class of
# timm's table (if any) reads, so it may stand in for that one.
TIMM_TORCH_DATASETS = dict(mnist=IdxMNIST, kmnist=IdxKMNIST, fashion_mnist=IdxFashionMNIST, svhn=TrainTestSVHN,
                           flowers102=TrainTestFlowers102)


def register_timm_datasets() -> Dict[str, type]:
    """Make timm's `create_dataset('torch/mnist' | 'torch/kmnist' | 'torch/fashion_mnist')` use the classes above,
    and add 'torch/svhn' and 'torch/flowers102'. Returns the entries set.

    timm (1.0.28 to 1.0.31 at least) has no public way to add a dataset: `create_dataset` looks 'torch/<name>' up in
    the module-level dict `timm.data.dataset_factory._TORCH_BASIC_DS` and calls `cls(root=, train=, download=,
    **kwargs)`, and train.py loads plugins only by importing them (`--device-modules`). So the entries go into that
    dict, in place, on import. A name is set only where it is missing or holds the torchvision class ours extends;
    an entry that something else put there (another plugin, a later timm) is kept, with a warning, as is the rest
    of timm's table.
    """
    from timm.data import dataset_factory
    table = getattr(dataset_factory, '_TORCH_BASIC_DS', None)
    if not isinstance(table, dict):
        warnings.warn('timm.data.dataset_factory has no _TORCH_BASIC_DS table in this timm version: '
                      f'create_dataset cannot find torch/{{{",".join(TIMM_TORCH_DATASETS)}}} through timm_mlit.data; '
                      'use its classes directly')
        return {}
    added = {}
    for name, cls in TIMM_TORCH_DATASETS.items():
        current = table.get(name)
        if current is None or (isinstance(current, type) and issubclass(cls, current)):
            table[name] = added[name] = cls
        else:
            warnings.warn(f"create_dataset('torch/{name}') keeps {current.__module__}.{current.__qualname__}, "
                          f'registered by something else; {cls.__module__}.{cls.__qualname__} is not put in its place')
    return added


register_timm_datasets()


# create_dataset's names that read no image folder: those before a '/' that timm knows (any other name, '' included,
# reads the folder, or a .tar file, at root)
_NOT_IMAGE_FOLDERS = ('torch/', 'hfds/', 'hfids/', 'tfds/', 'wds/')


def check_image_folder(root: Optional[str], dataset: str = '') -> None:
    """Raise PermissionError (or another OSError) naming the first folder under `root` that cannot be listed, where
    timm's `create_dataset(dataset, root=root)` reads `root` as an image folder. timm's walk (os.walk) skips such a
    folder without a word: its class would be missing and the classes after it renumbered."""
    if not root or not os.path.isdir(root) or (dataset or '').lower().startswith(_NOT_IMAGE_FOLDERS):
        return

    def refuse(e: OSError):
        raise type(e)(f'cannot read the folder {e.filename} of the image folder {root} ({e.strerror}): its images '
                      f'would be left out') from e
    for _ in os.walk(root, onerror=refuse, followlinks=True):
        pass


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class MAEPretrainDataset(torch.utils.data.Dataset):
    """(augmented image, masking noise [num_patches]) of each sample of `dataset`; labels are dropped.

    The augmentation (which may use torch's and Python's global RNGs, as torchvision and timm transforms do) and
    the noise run under a private RNG state seeded by (seed, epoch, index); the caller's RNG state is untouched.
    Call `set_epoch` before each epoch (with non-persistent workers, so they receive the new epoch).
    """

    def __init__(self, dataset, transform: Optional[Callable], num_patches: int, seed: int = 0):
        self.dataset = dataset
        self.transform = transform
        self.num_patches = num_patches
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        img = self.dataset[index][0]
        s = _sample_seed(self.seed, self.epoch, index)
        py_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                random.seed(s)
                if self.transform is not None:
                    img = self.transform(img)
                noise = torch.rand(self.num_patches)
        finally:
            random.setstate(py_state)
        return img, noise
