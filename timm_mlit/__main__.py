"""`python -m timm_mlit`: the shipped mmLiT-XXS classifying the Fashion-MNIST test set, offline.

    python -m timm_mlit                       # mlit_xxs, pretrained=True, the 10k test images: top-1 and images/s
    python -m timm_mlit --limit 1000          # the first 1,000 test images only
    python -m timm_mlit --data-dir DIR        # Fashion-MNIST idx files in DIR (flat, or torchvision's layout)
    python -m timm_mlit --list                # every mLiT model with its parameter count

The model is `timm.create_model('mlit_xxs', pretrained=True)`: its default tag's weights, embedded in the package
(timm_mlit/weights/), so nothing is downloaded. The test images come from --data-dir when it is given (nothing is
downloaded into it); otherwise from Debian's `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist), else
from a copy in $XDG_CACHE_HOME/timm_mlit/fashion-mnist (~/.cache/...), which torchvision downloads where there is
network. With none of these the command stops and says how to get them. The images go through timm's own
evaluation pipeline (resolve_data_config + create_loader: resize to 36, bicubic, mean = std = 0.5), as timm's
validate.py would.
"""
import argparse
import os
import socket
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import timm
import torch
from timm.data import create_dataset, create_loader, resolve_data_config

import timm_mlit  # noqa: F401  (registers the models)
from timm_mlit.data import DEBIAN_FASHION_MNIST


def cache_dir() -> Path:
    return Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'timm_mlit' / 'fashion-mnist'


def list_models():
    """Every mLiT arch: its default tag, encoder parameters and those with the default tag's head."""
    x = torch.randn(2, 3, 36, 36)
    for name in timm.list_models('mlit_*'):
        model = timm.create_model(name).eval()
        with torch.no_grad():
            out = model(x)
        params = sum(p.numel() for p in model.parameters())
        encoder = params - sum(p.numel() for p in model.get_classifier().parameters())
        tag = model.pretrained_cfg['tag']
        print(f'{name:10s} default tag {tag!r:24s} encoder params={encoder:>9,d}  with its {model.num_classes}-class '
              f'head={params:>9,d}  input={tuple(x.shape)}  output={tuple(out.shape)}')


# what reading idx files that are missing, truncated, corrupt or unreadable raises (read_idx: ValueError)
_READ_ERRORS = (OSError, RuntimeError, ValueError, EOFError)
DOWNLOAD_TIMEOUT_S = 30.


def _fail(msg: str):
    sys.exit(f'python -m timm_mlit: {msg}')


def _read_test_set(folder: Path, download: bool = False):
    return create_dataset('torch/fashion_mnist', root=str(folder), split='validation', download=download)


def open_test_set(data_dir: Optional[str]):
    """The Fashion-MNIST test split through timm's create_dataset, and the folder it came from; exits with what to
    do when it is nowhere."""
    get_it = (f'Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; it goes to '
              f'{DEBIAN_FASHION_MNIST}), or pass --data-dir to a folder holding t10k-images-idx3-ubyte[.gz] and '
              f't10k-labels-idx1-ubyte[.gz].')
    if data_dir is not None:
        try:
            return _read_test_set(Path(data_dir)), Path(data_dir)
        except _READ_ERRORS as e:
            _fail(f'no readable Fashion-MNIST test set in --data-dir {data_dir} ({type(e).__name__}: {e}).\n{get_it}')
    cache = cache_dir()
    for folder in (Path(DEBIAN_FASHION_MNIST), cache):
        if folder.is_dir():
            try:
                return _read_test_set(folder), folder
            except FileNotFoundError:  # no idx files there (an earlier download that failed at once): go on
                continue
            except _READ_ERRORS as e:  # e.g. a download cut short: say so, do not guess
                _fail(f'the Fashion-MNIST files in {folder} cannot be read ({type(e).__name__}: {e}); remove them '
                      f'to download again, or pass --data-dir.\n{get_it}')
    # torchvision's download, into the cache; its urlopen has no timeout of its own
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        return _read_test_set(cache, download=True), cache
    except Exception as e:  # no network, no permission, a mirror down, ...
        _fail(f'the Fashion-MNIST test set is not in {DEBIAN_FASHION_MNIST} nor in {cache}, and could not be '
              f'downloaded into {cache} ({type(e).__name__}: {e}).\n{get_it}')
    finally:
        socket.setdefaulttimeout(previous)


def evaluate(model_name: str = 'mlit_xxs', data_dir: Optional[str] = None, batch_size: int = 256,
             limit: int = 0) -> Dict[str, object]:
    """Top-1 of `model_name` with pretrained=True on the Fashion-MNIST test set (the first `limit` images if > 0)."""
    shipped = [n for n in timm.list_pretrained('mlit_*') if n.endswith('.mae_ft_fashion_mnist')]
    try:
        model = timm.create_model(model_name, pretrained=True).eval()
    except Exception as e:  # unknown name, no weights for it, weights not in the package nor reachable, ...
        _fail(f'cannot load {model_name} with pretrained=True ({type(e).__name__}: {e})\n'
              f'Fashion-MNIST classifiers shipped: {", ".join(shipped)}')
    cfg = model.pretrained_cfg
    if model.num_classes != 10 or 'fashion_mnist' not in (cfg.get('tag') or ''):
        _fail(f'{model_name} with pretrained=True is {cfg.get("architecture")}.{cfg.get("tag")}, not a Fashion-MNIST '
              f'classifier; shipped: {", ".join(shipped)}')
    labels = cfg['label_names']
    dataset, folder = open_test_set(data_dir)
    if limit > 0:  # (not a Subset: create_loader sets the transform on the dataset it is given)
        dataset.data, dataset.targets = dataset.data[:limit], dataset.targets[:limit]
    if len(dataset) == 0:
        _fail(f'the Fashion-MNIST test set in {folder} has no images')
    loader = create_loader(dataset, batch_size=batch_size, is_training=False, num_workers=0, use_prefetcher=False,
                           device=torch.device('cpu'), **resolve_data_config({}, model=model))
    forward_s = 0.
    preds = []
    start = time.perf_counter()
    with torch.inference_mode():
        for images, _ in loader:
            t = time.perf_counter()
            preds.append(model(images).argmax(dim=-1))
            forward_s += time.perf_counter() - t
    total_s = time.perf_counter() - start
    preds, targets = torch.cat(preds), dataset.targets
    hits = torch.bincount(targets[preds == targets], minlength=len(labels))
    counts = torch.bincount(targets, minlength=len(labels))
    return dict(
        model=f'{cfg["architecture"]}.{cfg["tag"]}', weights=cfg.get('file') or cfg.get('hf_hub_id'),
        params=sum(p.numel() for p in model.parameters()), data=str(folder), images=len(preds),
        top1=100. * float(hits.sum()) / len(preds), img_s=len(preds) / forward_s, img_s_total=len(preds) / total_s,
        predictions=preds,
        per_class={name: 100. * float(h) / c for name, h, c in zip(labels, hits, counts) if c})


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m timm_mlit', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='mlit_xxs', help='a model whose default weights classify Fashion-MNIST')
    parser.add_argument('--data-dir', default=None, help='folder of the Fashion-MNIST idx files')
    parser.add_argument('-b', '--batch-size', type=int, default=256)
    parser.add_argument('--limit', type=int, default=0, help='evaluate only the first N test images')
    parser.add_argument('--list', action='store_true', help='list the mLiT models and their sizes, and exit')
    args = parser.parse_args(argv)
    if args.list:
        list_models()
        return None
    if args.batch_size < 1 or args.limit < 0:
        parser.error('--batch-size must be >= 1 and --limit >= 0')
    r = evaluate(args.model, args.data_dir, args.batch_size, args.limit)
    print(f'{r["model"]}: {r["params"]:,d} params, weights {r["weights"]}')
    print(f'Fashion-MNIST test ({r["data"]}): {r["images"]} images, top-1 {r["top1"]:.2f}%, '
          f'{r["img_s"]:.0f} images/s (model; {r["img_s_total"]:.0f} with data loading; batch {args.batch_size}, '
          f'{torch.get_num_threads()} threads)')
    for name, acc in r['per_class'].items():
        print(f'  {name:12s} {acc:6.2f}%')
    return r


if __name__ == '__main__':
    main()
