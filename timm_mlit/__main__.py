"""`python -m timm_mlit`: a shipped mmLiT (XXS by default) classifying the Fashion-MNIST test set, offline.

    python -m timm_mlit                       # mlit_xxs, pretrained=True, the 10k test images: top-1 and images/s
    python -m timm_mlit --model mlit_s        # the shipped mmLiT-S instead (mlit_xs: mmLiT-XS)
    python -m timm_mlit --limit 1000          # the first 1,000 test images only
    python -m timm_mlit --data-dir DIR        # Fashion-MNIST idx files in DIR (flat, or torchvision's layout)
    python -m timm_mlit --list                # every model of the package with its parameter count
    python -m timm_mlit --log-freq 5          # a progress line (stderr) every 5 batches instead of 10
    python -m timm_mlit --results-file r.json # also write the figures printed (and the machine) as JSON

The model is `timm.create_model(MODEL, pretrained=True)`: its default tag's weights, embedded in the package
(timm_mlit/weights/), so nothing is downloaded. The test images come from --data-dir when it is given (nothing is
downloaded into it); otherwise from Debian's `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist), else
from a copy in $XDG_CACHE_HOME/timm_mlit/fashion-mnist (~/.cache/...), which torchvision downloads where there is
network. With none of these the command stops and says how to get them. The images go through timm's own
evaluation pipeline (resolve_data_config + create_loader: resize to 36, bicubic, mean = std = 0.5), as timm's
validate.py would, and the progress is logged as validate.py logs it, to stderr.
"""
import argparse
import json
import logging
import os
import shlex
import socket
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import timm
import torch
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.models import get_pretrained_cfg, is_model, parse_model_name, split_model_name_tag
from timm.utils import AverageMeter, accuracy, setup_default_logging

import timm_mlit  # (registers the models)
from timm_mlit.cli import HelpFormatter, exit_on_error
from timm_mlit.data import DEBIAN_FASHION_MNIST
from timm_mlit.files import atomic_write, check_writable_path
from timm_mlit.precision import cpu_name

_logger = logging.getLogger('timm_mlit')
PROG = 'python -m timm_mlit'


def cache_dir() -> Path:
    return Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'timm_mlit' / 'fashion-mnist'


def list_models():
    """Every model the package registers (mLiT, then Mobile V-MoE): its default tag, encoder parameters and those
    with the default tag's head, at its input size."""
    names = timm.list_models('mlit_*') + timm.list_models('mobile_vmoe_*')
    width = max(len(n) for n in names)
    for name in names:
        model = timm.create_model(name).eval()
        x = torch.randn(2, *getattr(model, 'pretrained_cfg')['input_size'])
        with torch.no_grad():
            out = model(x)
        params = sum(p.numel() for p in model.parameters())
        encoder = params - sum(p.numel() for p in model.get_classifier().parameters())
        tag = getattr(model, 'pretrained_cfg')['tag']
        print(f'{name:{width}s} default tag {tag!r:24s} encoder params={encoder:>10,d}  with its '
              f'{model.num_classes}-class head={params:>10,d}  input={tuple(x.shape)}  output={tuple(out.shape)}')


# what reading idx files that are missing, truncated, corrupt or unreadable raises (read_idx: ValueError)
_READ_ERRORS = (OSError, RuntimeError, ValueError, EOFError)
DOWNLOAD_TIMEOUT_S = 30.


def _read_test_set(folder: Path, download: bool = False):
    return create_dataset('torch/fashion_mnist', root=str(folder), split='validation', download=download)


def open_test_set(data_dir: Optional[str]):
    """The Fashion-MNIST test split through timm's create_dataset, and the folder it came from; FileNotFoundError
    (nowhere) or ValueError (unreadable) saying what to do."""
    get_it = (f'Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; it goes to '
              f'{DEBIAN_FASHION_MNIST}), or pass --data-dir to a folder holding t10k-images-idx3-ubyte[.gz] and '
              f't10k-labels-idx1-ubyte[.gz].')
    if data_dir is not None:
        try:
            return _read_test_set(Path(data_dir)), Path(data_dir)
        except _READ_ERRORS as e:
            raise ValueError(f'no readable Fashion-MNIST test set in --data-dir {data_dir} ({type(e).__name__}: {e}). '
                             f'{get_it}') from e
    cache = cache_dir()
    for folder in (Path(DEBIAN_FASHION_MNIST), cache):
        if folder.is_dir():
            try:
                return _read_test_set(folder), folder
            except FileNotFoundError:  # no idx files there (an earlier download that failed at once): go on
                continue
            except _READ_ERRORS as e:  # e.g. a download cut short: say so, do not guess
                raise ValueError(f'the Fashion-MNIST files in {folder} cannot be read ({type(e).__name__}: {e}); '
                                 f'remove them to download again, or pass --data-dir. {get_it}') from e
    # torchvision's download, into the cache; its urlopen has no timeout of its own
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        return _read_test_set(cache, download=True), cache
    except Exception as e:  # no network, no permission, a mirror down, ...
        raise FileNotFoundError(f'the Fashion-MNIST test set is not in {DEBIAN_FASHION_MNIST} nor in {cache}, and '
                                f'could not be downloaded into {cache} ({type(e).__name__}: {e}). {get_it}') from e
    finally:
        socket.setdefaulttimeout(previous)


def _is_fashion_mnist_classifier(cfg) -> bool:
    return cfg.get('num_classes') == 10 and 'fashion_mnist' in (cfg.get('tag') or '')


def check_model_name(model_name: str, shipped: List[str]):
    """Raise ValueError unless `model_name` is an mLiT whose default (or named) weights classify Fashion-MNIST, from
    timm's registry and pretrained cfgs alone: nothing is created or downloaded (`--model resnet18` would otherwise
    first fetch resnet18's weights). A name with a source (hf-hub:, local-dir:) brings its cfg with the weights: it is
    checked once loaded."""
    also = f'Fashion-MNIST classifiers shipped: {", ".join(shipped)}'
    try:
        source, name = parse_model_name(model_name)
    except (AssertionError, ValueError) as e:  # an unknown source prefix (timm 1.0.28 asserts)
        raise ValueError(f'cannot parse the model name {model_name!r} ({e}); {also}') from e
    if source:
        return
    arch, _ = split_model_name_tag(name)
    if not is_model(arch):
        raise ValueError(f'unknown model {model_name!r}; {also}')
    try:
        pretrained_cfg = get_pretrained_cfg(name)
    except RuntimeError as e:  # a tag the arch does not have
        raise ValueError(f'cannot load {model_name} with pretrained=True ({e}); {also}') from e
    cfg: Dict[str, Any] = pretrained_cfg.to_dict() if pretrained_cfg is not None else {}
    weights = f'{arch}.{cfg.get("tag")}'
    if arch not in timm.list_models('mlit_*'):
        raise ValueError(f'{model_name} is not an mLiT model (its pretrained weights are {weights}); {also}')
    if not (cfg.get('file') or cfg.get('hf_hub_id') or cfg.get('url')):
        raise ValueError(f'cannot load {model_name} with pretrained=True: no weights exist for {weights}; {also}')
    if not _is_fashion_mnist_classifier(cfg):
        raise ValueError(f'{model_name} with pretrained=True is {weights} ({cfg.get("num_classes")} classes), not '
                         f'a Fashion-MNIST classifier; {also}')


def evaluate(model_name: str = 'mlit_xxs', data_dir: Optional[str] = None, batch_size: int = 256,
             limit: int = 0, log_freq: int = 10) -> Dict[str, object]:
    """Top-1 of `model_name` with pretrained=True on the Fashion-MNIST test set (the first `limit` images if > 0),
    logging the running accuracy every `log_freq` batches (never if 0)."""
    shipped = [n for n in timm.list_pretrained('mlit_*') if n.endswith('.mae_ft_fashion_mnist')]
    check_model_name(model_name, shipped)
    dataset, folder = open_test_set(data_dir)  # the data first: a wrong --data-dir is told before any loading
    if limit > 0:  # (not a Subset: create_loader sets the transform on the dataset it is given)
        dataset.data, dataset.targets = dataset.data[:limit], dataset.targets[:limit]
    if len(dataset) == 0:
        raise ValueError(f'the Fashion-MNIST test set in {folder} has no images')
    try:
        model = timm.create_model(model_name, pretrained=True).eval()
    except Exception as e:  # weights not in the package nor reachable, a hub name that does not exist, ...
        raise ValueError(f'cannot load {model_name} with pretrained=True ({type(e).__name__}: {e}); '
                         f'Fashion-MNIST classifiers shipped: {", ".join(shipped)}') from e
    cfg: Dict[str, Any] = getattr(model, 'pretrained_cfg')  # (the dict timm sets on every model it creates)
    if model.num_classes != 10 or not _is_fashion_mnist_classifier(cfg):
        raise ValueError(f'{model_name} with pretrained=True is {cfg.get("architecture")}.{cfg.get("tag")}, not a '
                         f'Fashion-MNIST classifier; Fashion-MNIST classifiers shipped: {", ".join(shipped)}')
    labels = cfg['label_names']
    _logger.info(f'Fashion-MNIST test set: {len(dataset)} images from {folder}')
    loader = create_loader(dataset, batch_size=batch_size, is_training=False, num_workers=0, use_prefetcher=False,
                           device=torch.device('cpu'), **resolve_data_config({}, model=model))
    forward_s = 0.
    preds = []
    batch_time, top1, top5 = AverageMeter(), AverageMeter(), AverageMeter()
    start = end = time.perf_counter()
    with torch.inference_mode():
        for i, (images, target) in enumerate(loader):
            t = time.perf_counter()
            output = model(images)
            forward_s += time.perf_counter() - t
            preds.append(output.argmax(dim=-1))
            acc1, acc5 = accuracy(output, target, topk=(1, 5))
            top1.update(acc1.item(), images.shape[0])
            top5.update(acc5.item(), images.shape[0])
            batch_time.update(time.perf_counter() - end)
            end = time.perf_counter()
            if log_freq and (i % log_freq == 0 or i == len(loader) - 1):  # as timm's validate.py logs
                _logger.info(
                    f'Test: [{i:>4d}/{len(loader)}]  '
                    f'Time: {batch_time.val:.3f}s ({batch_time.avg:.3f}s, {top1.count / batch_time.sum:>7.2f}/s)  '
                    f'Acc@1: {top1.val:>7.3f} ({top1.avg:>7.3f})  Acc@5: {top5.val:>7.3f} ({top5.avg:>7.3f})')
    total_s = time.perf_counter() - start
    predictions, targets = torch.cat(preds), dataset.targets
    hits = torch.bincount(targets[predictions == targets], minlength=len(labels))
    counts = torch.bincount(targets, minlength=len(labels))
    return dict(
        model=f'{cfg["architecture"]}.{cfg["tag"]}', weights=cfg.get('file') or cfg.get('hf_hub_id'),
        params=sum(p.numel() for p in model.parameters()), data=str(folder), images=len(predictions),
        top1=100. * float(hits.sum()) / len(predictions), img_s=len(predictions) / forward_s,
        img_s_total=len(predictions) / total_s, predictions=predictions,
        per_class={name: 100. * float(h) / int(c) for name, h, c in zip(labels, hits, counts) if c})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--model', default='mlit_xxs',
                        help='an mLiT model (arch or arch.tag) whose pretrained weights classify Fashion-MNIST')
    parser.add_argument('--data-dir', default=None,
                        help=f'folder of the Fashion-MNIST idx files (default: {DEBIAN_FASHION_MNIST}, else '
                             f'$XDG_CACHE_HOME/timm_mlit/fashion-mnist, downloaded there if missing)')
    parser.add_argument('-b', '--batch-size', type=int, default=256, help='images per forward')
    parser.add_argument('--limit', type=int, default=0, help='evaluate only the first N test images (0: all)')
    parser.add_argument('--log-freq', type=int, default=10,
                        help='log the running accuracy to stderr every N batches (0: never)')
    parser.add_argument('--results-file', default=None,
                        help='also write the results (top-1, images/s, per class; the command, machine, torch) to '
                             'this JSON file, atomically')
    parser.add_argument('--list', action='store_true',
                        help='list every model of the package (mLiT, Mobile V-MoE) and its size, and exit')
    parser.add_argument('--version', action='version', version=f'timm-mlit {timm_mlit.__version__}',
                        help="print the package's version and exit")
    return parser


def main(argv=None):
    """The job: the evaluation's results (None with --list); an error ends it as `python -m timm_mlit: error: ...`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.root.handlers:  # (a caller that set up logging keeps its own)
        setup_default_logging()
    if args.list:
        list_models()
        return None
    if args.batch_size < 1 or args.limit < 0 or args.log_freq < 0:
        parser.error('--batch-size must be >= 1, --limit and --log-freq >= 0')
    with exit_on_error(PROG):
        results_file = check_writable_path(args.results_file, '--results-file') if args.results_file else None
        r = evaluate(args.model, args.data_dir, args.batch_size, args.limit, args.log_freq)
    print(f'{r["model"]}: {r["params"]:,d} params, weights {r["weights"]}')
    print(f'Fashion-MNIST test ({r["data"]}): {r["images"]} images, top-1 {r["top1"]:.2f}%, '
          f'{r["img_s"]:.0f} images/s (model; {r["img_s_total"]:.0f} with data loading; batch {args.batch_size}, '
          f'{torch.get_num_threads()} threads)')
    for name, acc in r['per_class'].items():
        print(f'  {name:12s} {acc:6.2f}%')
    if results_file:
        with exit_on_error(PROG):
            write_results(results_file, r, args, parser)
    return r


def write_results(path: str, r: Dict[str, object], args: argparse.Namespace, parser: argparse.ArgumentParser):
    """`r` (less the predictions) as JSON at `path`, with what measured it: the command (its options that differ
    from `parser`'s defaults, but for the results file), the machine, its threads, torch and this package's version."""
    command = ['python -m timm_mlit'] + [
        f'{flag} {shlex.quote(str(getattr(args, dest)))}'
        for flag, dest in (('--model', 'model'), ('--data-dir', 'data_dir'), ('-b', 'batch_size'), ('--limit', 'limit'))
        if getattr(args, dest) != parser.get_default(dest)]
    meta = dict(command=' '.join(command), torch=torch.__version__, timm_mlit=timm_mlit.__version__,
                machine=cpu_name(), threads=torch.get_num_threads(), batch_size=args.batch_size)
    body = json.dumps(dict(meta=meta, result={k: v for k, v in r.items() if k != 'predictions'}), indent=1) + '\n'
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: f.write(body.encode()))


if __name__ == '__main__':
    main()
