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


def write_raw_idx(path, type_byte: int, shape, payload: bytes = b''):
    """An idx file with any header: a magic number of `type_byte`, len(shape) dimensions, then `payload`."""
    path.write_bytes(bytes([0, 0, type_byte, len(shape)]) + struct.pack(f'>{len(shape)}i', *shape) + payload)


@pytest.mark.parametrize('header, payload, match', [
    (b'\x00\x00\x08\xff', b'\x00' * 100, '255 dimensions'),  # ndim 255 in a 104-byte file
    (b'\x00\x00\x08\x41' + b'\x00\x00\x00\x01' * 65, b'\x00', '65 dimensions'),  # more than numpy holds
    (b'\x00\x00\x08\x03' + struct.pack('>3i', -1, 28, 28), b'\x00' * 100, 'negative'),
    # 2**64 values: a product that wraps around to 0 in int64
    (b'\x00\x00\x08\x04' + struct.pack('>4i', *(1 << 16,) * 4), b'', '18,446,744,073,709,551,616 values'),
    (b'\x00\x00\x08\x03' + struct.pack('>3i', *(2 ** 31 - 1,) * 3), b'\x00' * 100, 'truncated: the header says'),
    (b'\x00\x00\x07\x03' + struct.pack('>3i', 1, 2, 2), b'\x00' * 4, 'type byte 0x07'),
    (b'\x00\x00\x08', b'', 'only 3 bytes'),
], ids=['ndim255', 'ndim65', 'negative', 'wraps', 'larger_than_file', 'type_byte', 'short'])
def test_read_idx_refuses_an_impossible_header_naming_the_file(tmp_path, header, payload, match):
    bad = tmp_path / 'bad-idx3-ubyte'
    bad.write_bytes(header + payload)
    with pytest.raises(ValueError, match=f'^{bad}: .*{match}') as e:
        read_idx(str(bad))
    assert '\n' not in str(e.value)


@pytest.mark.parametrize('labels', [[3, -1, 2], [3, 10, 2]])
def test_idx_dataset_refuses_labels_outside_its_classes(tmp_path, labels):
    write_idx(tmp_path / 't10k-images-idx3-ubyte', np.zeros((3, 28, 28), np.uint8))
    write_raw_idx(tmp_path / 't10k-labels-idx1-ubyte', 0x09, [3], np.array(labels, np.int8).tobytes())
    with pytest.raises(ValueError, match=rf'^{tmp_path}/t10k-labels-idx1-ubyte: .*label {labels[1]}.* 10 classes'):
        IdxFashionMNIST(str(tmp_path), train=False)


def test_idx_dataset_refuses_float_images_before_any_is_read(tmp_path):
    write_raw_idx(tmp_path / 't10k-images-idx3-ubyte', 0x0D, [2, 28, 28], np.zeros((2, 28, 28), '>f4').tobytes())
    write_idx(tmp_path / 't10k-labels-idx1-ubyte', np.array([1, 2], np.uint8))
    with pytest.raises(ValueError, match=rf'^{tmp_path}/t10k-images-idx3-ubyte: .*float32.*uint8'):
        IdxFashionMNIST(str(tmp_path), train=False)


def test_a_data_dir_that_is_a_file_is_not_called_missing(tmp_path):
    (tmp_path / 'f').write_text('x')
    with pytest.raises(NotADirectoryError, match=f'data folder {tmp_path}/f is a file, not a folder'):
        IdxFashionMNIST(str(tmp_path / 'f'))


def deny_reading(monkeypatch, folder):
    """What chmod 000 on `folder` does for a user who is not root (root reads anything): its entries cannot be
    listed or looked up."""
    folder = os.path.abspath(folder)
    real_access, real_scandir, real_stat = os.access, os.scandir, os.stat

    def inside(path):
        return os.path.abspath(os.fspath(path)).startswith(folder + os.sep)

    def access(path, mode, **kwargs):
        return False if os.path.abspath(os.fspath(path)) == folder and mode & (os.R_OK | os.X_OK) else \
            real_access(path, mode, **kwargs)

    def scandir(path='.'):
        if os.path.abspath(os.fspath(path)) == folder:
            raise PermissionError(13, 'Permission denied', str(path))
        return real_scandir(path)

    def stat(path, *args, **kwargs):
        if isinstance(path, (str, bytes, os.PathLike)) and inside(path):
            raise PermissionError(13, 'Permission denied', str(path))
        return real_stat(path, *args, **kwargs)
    monkeypatch.setattr(os, 'access', access)
    monkeypatch.setattr(os, 'scandir', scandir)
    monkeypatch.setattr(os, 'stat', stat)


def test_an_unreadable_data_folder_is_not_called_empty(tmp_path, monkeypatch):
    make_fashion_mnist(str(tmp_path))
    deny_reading(monkeypatch, tmp_path)
    with pytest.raises(PermissionError, match=f'cannot read the data folder {tmp_path}'):
        IdxFashionMNIST(str(tmp_path))


@pytest.mark.skipif(not hasattr(os, 'geteuid') or os.geteuid() == 0, reason='root reads a folder chmod 000')
def test_an_unreadable_data_folder_is_not_called_empty_for_real(tmp_path):
    make_fashion_mnist(str(tmp_path / 'd'))
    os.chmod(tmp_path / 'd', 0)
    try:
        with pytest.raises(PermissionError, match=f'cannot read the data folder {tmp_path}/d'):
            IdxFashionMNIST(str(tmp_path / 'd'))
    finally:
        os.chmod(tmp_path / 'd', 0o755)


@pytest.mark.parametrize('content', [b'not gzip at all', 'cut'], ids=['not_gzip', 'truncated_gzip'])
def test_read_idx_names_a_gzip_file_it_cannot_decompress(tmp_path, content):
    import gzip
    bad = tmp_path / 't10k-images-idx3-ubyte.gz'
    whole = gzip.compress(b'\x00\x00\x08\x03' + struct.pack('>3i', 2, 28, 28) + bytes(2 * 28 * 28))
    bad.write_bytes(whole[:-10] if content == 'cut' else content)
    with pytest.raises(ValueError, match=f'^{bad}: not a readable gzip file') as e:
        read_idx(str(bad))
    assert '\n' not in str(e.value)
