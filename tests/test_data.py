"""Tests of timm_mlit.data: idx datasets in torchvision's and Debian's layouts, and the seeded MAE pipeline."""
import os
import struct

import numpy as np
import pytest
import torch
from timm.data import create_dataset, create_transform

import timm_mlit.data  # noqa: F401  (puts the idx datasets behind create_dataset('torch/...'))
from timm_mlit.data import DEBIAN_FASHION_MNIST, IdxFashionMNIST, MAEPretrainDataset, read_idx, write_idx


def make_fashion_mnist(root: str, n_train: int = 12, n_test: int = 5, gz: bool = True, layout: str = 'flat'):
    """Synthetic Fashion-MNIST idx files; 'flat' is Debian's layout, 'torchvision' is root/FashionMNIST/raw."""
    folder = root if layout == 'flat' else os.path.join(root, 'FashionMNIST', 'raw')
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (('train', n_train), ('t10k', n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        ext = '.gz' if gz else ''
        write_idx(os.path.join(folder, f'{split}-images-idx3-ubyte{ext}'), images)
        write_idx(os.path.join(folder, f'{split}-labels-idx1-ubyte{ext}'), labels)
        out[split] = images, labels
    return out


@pytest.mark.parametrize('gz', [True, False])
@pytest.mark.parametrize('layout', ['flat', 'torchvision'])
def test_timm_create_dataset_reads_fashion_mnist_idx_files(tmp_path, gz, layout):
    written = make_fashion_mnist(str(tmp_path), gz=gz, layout=layout)
    ds = create_dataset('torch/fashion_mnist', root=str(tmp_path), split='train', download=False)
    assert isinstance(ds, IdxFashionMNIST) and len(ds) == 12
    img, label = ds[3]
    assert img.mode == 'RGB' and img.size == (28, 28)  # grey turned into the 3 channels mLiT expects
    arr = np.asarray(img)
    assert (arr[..., 0] == written['train'][0][3]).all() and (arr[..., 2] == arr[..., 0]).all()
    assert label == written['train'][1][3]
    val = create_dataset('torch/fashion_mnist', root=str(tmp_path), split='validation')
    assert len(val) == 5


def test_grey_mode_is_available(tmp_path):
    make_fashion_mnist(str(tmp_path))
    assert IdxFashionMNIST(str(tmp_path), img_mode='L')[0][0].mode == 'L'


def test_missing_or_damaged_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        create_dataset('torch/fashion_mnist', root=str(tmp_path / 'nope'), split='train')
    with pytest.raises(FileNotFoundError, match='train-images-idx3-ubyte'):
        create_dataset('torch/fashion_mnist', root=str(tmp_path), split='train')
    bad = tmp_path / 'x-idx3-ubyte'
    bad.write_bytes(b'\x00\x00\x08\x03' + struct.pack('>3i', 10, 28, 28) + b'\x00' * 100)
    with pytest.raises(ValueError, match='truncated'):
        read_idx(str(bad))
    bad.write_bytes(b'PK\x03\x04....')
    with pytest.raises(ValueError, match='not an idx file'):
        read_idx(str(bad))


def test_timm_transform_pipeline_gives_3x36x36(tmp_path):
    make_fashion_mnist(str(tmp_path))
    t = create_transform(36, is_training=True, scale=(0.6, 1.), mean=(0.5,) * 3, std=(0.5,) * 3, color_jitter=None)
    ds = create_dataset('torch/fashion_mnist', root=str(tmp_path), split='train')
    ds.transform = t
    assert ds[0][0].shape == (3, 36, 36)


@pytest.mark.skipif(not os.path.isdir(DEBIAN_FASHION_MNIST), reason='apt-get install dataset-fashion-mnist')
def test_real_fashion_mnist_from_the_debian_package():
    train = create_dataset('torch/fashion_mnist', root=DEBIAN_FASHION_MNIST, split='train')
    test = create_dataset('torch/fashion_mnist', root=None, split='validation')  # the Debian folder is the default
    assert (len(train), len(test)) == (60000, 10000)
    assert sorted(set(train.targets.tolist())) == list(range(10))
    assert train[0][0].mode == 'RGB'


def test_mae_samples_depend_only_on_seed_epoch_and_index(tmp_path):
    make_fashion_mnist(str(tmp_path))
    base = create_dataset('torch/fashion_mnist', root=str(tmp_path), split='train')
    t = create_transform(36, is_training=True, scale=(0.6, 1.), mean=(0.5,) * 3, std=(0.5,) * 3, color_jitter=None)
    ds = MAEPretrainDataset(base, t, num_patches=144, seed=1)
    a_img, a_noise = ds[4]
    torch.manual_seed(123)  # the caller's RNG must neither matter nor be changed
    state = torch.get_rng_state()
    b_img, b_noise = ds[4]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a_img, b_img) and torch.equal(a_noise, b_noise) and a_noise.shape == (144,)
    assert not torch.equal(ds[5][1], a_noise)
    ds.set_epoch(1)
    assert not torch.equal(ds[4][1], a_noise)  # a fresh augmentation and mask every epoch


def test_registration_adds_to_timms_table_in_place_and_keeps_what_others_registered(monkeypatch):
    """A table as timm ships it, plus an entry another plugin put there: ours replace only the torchvision classes
    they extend, in the same dict object, and leave every other entry as it was."""
    from timm.data import dataset_factory
    from torchvision.datasets import CIFAR10, KMNIST, MNIST, FashionMNIST

    from timm_mlit.data import TIMM_TORCH_DATASETS, register_timm_datasets

    class OtherSVHN(torch.utils.data.Dataset):
        pass

    table = dict(cifar10=CIFAR10, mnist=MNIST, kmnist=KMNIST, fashion_mnist=FashionMNIST, svhn=OtherSVHN)
    monkeypatch.setattr(dataset_factory, '_TORCH_BASIC_DS', table)
    with pytest.warns(UserWarning, match=r"torch/svhn.*keeps .*OtherSVHN"):
        added = register_timm_datasets()
    assert dataset_factory._TORCH_BASIC_DS is table
    assert table['cifar10'] is CIFAR10 and table['svhn'] is OtherSVHN
    assert sorted(added) == ['fashion_mnist', 'flowers102', 'kmnist', 'mnist']
    assert all(table[name] is TIMM_TORCH_DATASETS[name] for name in added)
    with pytest.warns(UserWarning):  # a second call: still OtherSVHN kept, ours kept in their places
        again = register_timm_datasets()
    assert again == added and all(table[name] is cls for name, cls in added.items())
