""" Super-classes for Mobile V-MoE's super-class-guided router, from a confusion graph or a dataset's own division

"Mobile V-MoEs", Daxberger et al., arXiv 2309.04354, §2.2: when a dataset has no super-classes, (1) train a dense
model, (2) take its confusion matrix on a held-out validation set, (3) build a confusion graph from it and cluster
the graph into E groups, one per expert. The paper does not name the clustering algorithm; this uses spectral
clustering (scikit-learn's `SpectralClustering` on a precomputed affinity: Shi & Malik, "Normalized Cuts and Image
Segmentation", 2000; Ng, Jordan & Weiss, "On Spectral Clustering", 2001), the usual choice for a weighted graph:

    nodes = classes; edge weight w_ij = R_ij + R_ji, where R = the confusion matrix with each row divided by its
    class's count (how often a class-i image is called j, so frequent classes do not dominate); no self-loops.

    timm-mlit-superclasses --model vit_tiny_patch16_224 --model-kwargs img_size=36 patch_size=3 ... \\
        --checkpoint output/train/dense/last.pth.tar --dataset torch/fashion_mnist --data-dir DIR \\
        --split validation --num-superclasses 4 --output superclasses.json --plot confusion.png
    timm-mlit-superclasses --cifar100-coarse data/cifar-100-python --output cifar100_coarse.json

CIFAR-100's own 20 coarse classes are in its pickles (`coarse_labels` beside `fine_labels`, names in `meta`), which
torchvision does not expose; `--cifar100-coarse` reads them.

The JSON file (`SuperClasses.to_json`) maps every class index to its super-class, with class names where known, and
is what `timm-mlit-run train.py --superclasses FILE` reads.
"""
import argparse
import json
import numbers
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
from timm.utils import ParseKwargs

from . import __version__
from .cifar100 import COARSE_CLASSES, coarse_of_fine
from .cli import HelpFormatter, exit_on_error
from .files import atomic_write, check_writable_path

__all__ = ['RouterTaskError', 'SuperClasses', 'load_superclasses', 'confusion_graph', 'cluster_confusion',
           'cifar100_coarse', 'superclasses_from_confusion', 'main']

PROG = 'timm-mlit-superclasses'
FORMAT = 'timm-mlit-superclasses/1'


class RouterTaskError(ValueError):
    """A model that the super-class router loss cannot train, or a super-class file that does not fit it (raised by
    `timm_mlit.task`, defined here so that it can be caught without importing timm.task)."""


@dataclass
class SuperClasses:
    """A division of C classes into E super-classes: `assignment[c]` is class c's super-class, in [0, E)."""
    assignment: List[int]
    class_names: Optional[List[str]] = None
    superclass_names: Optional[List[str]] = None
    source: str = ''
    extra: Dict[str, object] = field(default_factory=dict)  # e.g. the confusion matrix the groups came from

    def __post_init__(self):
        self.assignment = _check_assignment(self.assignment, 'the division')
        for what, names, n in (('class_names', self.class_names, self.num_classes),
                               ('superclass_names', self.superclass_names, self.num_superclasses)):
            if names is None:
                continue
            if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(x, str) for x in names):
                raise ValueError(f'{what} must be a list of names (strings), got {str(names)[:80]}')
            if len(names) != n:
                raise ValueError(f'{what} has {len(names)} names for {n} entries')

    @property
    def num_classes(self) -> int:
        return len(self.assignment)

    @property
    def num_superclasses(self) -> int:
        return max(self.assignment) + 1

    def groups(self) -> List[List[int]]:
        """The classes of each super-class, in order."""
        return [[c for c, s in enumerate(self.assignment) if s == g] for g in range(self.num_superclasses)]

    def matrix(self):
        """The class -> super-class matrix [C, E] (one-hot rows) as a float tensor: soft class targets times it are
        soft super-class targets."""
        import torch
        return torch.nn.functional.one_hot(torch.tensor(self.assignment), self.num_superclasses).float()

    def describe(self) -> str:
        """One line per super-class: its classes, by name where known."""
        lines = []
        for g, members in enumerate(self.groups()):
            label = self.superclass_names[g] if self.superclass_names else f'super-class {g}'
            names = [self.class_names[c] if self.class_names else str(c) for c in members]
            lines.append(f'{label}: {", ".join(names)}')
        return '\n'.join(lines)

    def to_json(self) -> dict:
        classes = [dict(index=c, superclass=s, **({'name': self.class_names[c]} if self.class_names else {}))
                   for c, s in enumerate(self.assignment)]
        return dict(format=FORMAT, num_classes=self.num_classes, num_superclasses=self.num_superclasses,
                    source=self.source, classes=classes, superclass_names=self.superclass_names,
                    groups=self.groups(), **self.extra)

    def save(self, path: str) -> str:
        text = json.dumps(self.to_json(), indent=1) + '\n'
        return atomic_write(in_its_folder(path), lambda f: f.write(text.encode()))


def in_its_folder(path: str) -> str:
    """`path`, its folder made where missing (an output may name a new folder, as `check_writable_path` allows)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path


def _listed(items: List[int], most: int = 10) -> str:
    """`items` as a list; of a longer one its first `most` and the count, so that a message stays a line."""
    return str(items) if len(items) <= most else f'{str(items[:most])[:-1]}, ... ({len(items)} in all)]'


def _index(value, what: str, n: int) -> int:
    """`value` as an index in [0, n): an integer (a bool or a float, which int() would quietly turn into one, is
    not), bounded before anything is built from it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f'{what} must be an integer, got {value!r}')
    index = int(value)
    if not 0 <= index < n:
        raise ValueError(f'{what} is {value}, out of range 0..{n - 1}')
    return index


def _check_assignment(assignment: Sequence[int], where: str) -> List[int]:
    """The assignment as ints, each a super-class in [0, C) (each of E super-classes non-empty: E <= C)."""
    assignment = list(assignment)
    if not assignment:
        raise ValueError(f'{where} has no classes')
    assignment = [_index(s, f'{where}: class {c}\'s super-class', len(assignment)) for c, s in enumerate(assignment)]
    missing = sorted(set(range(max(assignment) + 1)) - set(assignment))
    if missing:
        raise ValueError(f'{where} numbers its super-classes 0..{max(assignment)} but none has the classes of '
                         f'super-class(es) {_listed(missing)}: super-classes must be numbered 0..E-1, each non-empty')
    return assignment


def load_superclasses(path: str, num_classes: Optional[int] = None,
                      num_superclasses: Optional[int] = None) -> SuperClasses:
    """Read a super-class file written by `SuperClasses.save` (timm-mlit-superclasses), checked to cover exactly
    classes 0..C-1 once each and, where given, to match the model's `num_classes` and number of experts.

    `path` may also name a division shipped in timm_mlit/superclass_files (`cifar100_coarse`: CIFAR-100's own 20).

    Raises:
        FileNotFoundError: no such file. ValueError: a file that is not one, or does not fit the model.
    """
    shipped = os.path.join(os.path.dirname(__file__), 'superclass_files', f'{path}.json')
    path = shipped if not os.path.exists(path) and path.isidentifier() and os.path.isfile(shipped) else path
    if not os.path.isfile(path):
        what = 'is not a file' if os.path.exists(path) else 'does not exist'
        raise FileNotFoundError(f'super-class file {path} {what} (write one with {PROG})')
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (ValueError, RecursionError) as e:
        raise ValueError(f'{path} is not a super-class file ({type(e).__name__}: {e}); write one with {PROG}') from e
    classes = data.get('classes') if isinstance(data, dict) else None
    if not isinstance(classes, list) or not all(isinstance(c, dict) for c in classes):
        raise ValueError(f'{path} is not a super-class file: it has no "classes" list of {{"index": I, "superclass": '
                         f'S}} entries; write one with {PROG}')
    if not classes:
        raise ValueError(f'{path} lists no classes')
    # every index bounded by the class count before a set or a list is built from it
    bound = max(len(classes), num_classes or 0)
    index = [_index(c.get('index'), f'{path}: classes[{k}]: its index', bound) for k, c in enumerate(classes)]
    assignment = {i: _index(c.get('superclass'), f'{path}: classes[{k}]: its superclass', len(classes))
                  for k, (i, c) in enumerate(zip(index, classes))}
    dup = sorted(i for i, count in Counter(index).items() if count > 1)
    if dup:
        raise ValueError(f'{path} lists class(es) {_listed(dup)} more than once')
    n = num_classes if num_classes is not None else len(classes)
    uncovered = sorted(set(range(n)) - set(index))
    extra = sorted(set(index) - set(range(n)))
    if uncovered:
        raise ValueError(f'{path} does not cover every class: class(es) {_listed(uncovered)} of the {n} have no '
                         f'super-class')
    if extra:
        raise ValueError(f'{path} lists class(es) {_listed(extra)}, but the model has {n} classes (0..{n - 1})')
    names = [c.get('name') for c in sorted(classes, key=lambda c: c['index'])]
    try:
        sc = SuperClasses([assignment[c] for c in range(n)], class_names=names if all(names) else None,
                          superclass_names=data.get('superclass_names'), source=str(data.get('source', '')))
    except ValueError as e:
        raise ValueError(f'{path}: {e}') from e
    if num_superclasses is not None and sc.num_superclasses != num_superclasses:
        raise ValueError(
            f'{path} divides the classes into {sc.num_superclasses} super-classes, but the model\'s router has '
            f'{num_superclasses} experts: create the model with num_experts={sc.num_superclasses} (one expert per '
            f'super-class)')
    return sc


def confusion_graph(confusion: np.ndarray) -> np.ndarray:
    """The symmetric affinity of the confusion graph (module docstring): row-normalised confusions, both
    directions added, no self-loops."""
    confusion = np.asarray(confusion, dtype=np.float64)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f'a confusion matrix must be square, got shape {confusion.shape}')
    bad = np.argwhere(~(confusion >= 0) | ~np.isfinite(confusion))
    if len(bad):
        i, j = bad[0]
        raise ValueError(f'confusion matrix entry [{i}, {j}] is {confusion[i, j]:g}: counts must be finite and >= 0')
    rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    affinity = rates + rates.T
    np.fill_diagonal(affinity, 0)
    return affinity


def cluster_confusion(confusion: np.ndarray, num_superclasses: int, seed: int = 0) -> List[int]:
    """Spectral clustering of the confusion graph into `num_superclasses` groups; the super-classes are numbered in
    order of their first class (class 0 is always in super-class 0)."""
    from sklearn.cluster import SpectralClustering

    affinity = confusion_graph(confusion)
    n = affinity.shape[0]
    if isinstance(num_superclasses, bool) or not isinstance(num_superclasses, numbers.Integral) \
            or not 2 <= num_superclasses <= n:
        raise ValueError(f'num_superclasses must be between 2 and the number of classes ({n}), got {num_superclasses}')
    if num_superclasses == n:
        return list(range(n))
    # a tiny floor keeps the graph connected when some classes are never confused (the clustering needs that)
    affinity = affinity + 1e-6 * (1 - np.eye(n))
    labels = SpectralClustering(num_superclasses, affinity='precomputed', assign_labels='cluster_qr',
                                random_state=seed).fit_predict(affinity)
    order = {}
    for label in labels:
        order.setdefault(int(label), len(order))
    return [order[int(label)] for label in labels]


def superclasses_from_confusion(confusion: np.ndarray, num_superclasses: int, class_names=None,
                                source: str = '', seed: int = 0) -> SuperClasses:
    """`cluster_confusion` as a `SuperClasses`, the confusion matrix kept beside the groups."""
    assignment = cluster_confusion(confusion, num_superclasses, seed)
    return SuperClasses(assignment, class_names=list(class_names) if class_names is not None else None,
                        source=source, extra=dict(confusion=np.asarray(confusion).astype(int).tolist()))


def cifar100_coarse(root: str) -> SuperClasses:
    """CIFAR-100's own 20 super-classes, read from its python pickles (`timm_mlit.cifar100`); `root` is the
    cifar-100-python folder or the one holding it."""
    folder, assignment, fine_names, coarse_names = coarse_of_fine(root)
    try:
        return SuperClasses(assignment, class_names=fine_names, superclass_names=coarse_names,
                            source='CIFAR-100 coarse labels')
    except ValueError as e:
        raise ValueError(f'{folder}: {e}') from e


def predict(model, dataset, batch_size: int = 256, workers: int = 2, device: str = 'cpu'):
    """(predictions, targets) of `model` over `dataset` (already transformed), as numpy arrays."""
    import torch

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    preds, targets = [], []
    model = model.to(device).eval()
    with torch.inference_mode():
        for x, y in loader:
            preds.append(model(x.to(device)).argmax(-1).cpu())
            targets.append(torch.as_tensor(y))
    if not preds:
        raise ValueError('the split holds no images')
    return torch.cat(preds).numpy(), torch.cat(targets).numpy()


def class_names_of(dataset) -> Optional[List[str]]:
    """The class names of a timm or torchvision dataset, in index order, where it knows them."""
    names = getattr(dataset, 'classes', None)
    if names:
        return list(names)
    class_to_idx = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None)
    if class_to_idx:
        return [name for name, _ in sorted(class_to_idx.items(), key=lambda kv: kv[1])]
    return None


def dense_model(args):
    """--model as --checkpoint was trained (`checkpoint.build_model`: what the checkpoint records, --model-kwargs and
    --num-classes over it), its weights loaded strictly."""
    from .checkpoint import build_model, read_checkpoint

    state_dict, meta = read_checkpoint(args.checkpoint)
    given = dict(args.model_kwargs, **({} if args.num_classes is None else dict(num_classes=args.num_classes)))
    try:
        model, _ = build_model(args.model, state_dict, meta, args.checkpoint, given)
    except RuntimeError as e:  # timm: an unknown model
        raise ValueError(f'cannot build --model {args.model}: {e}') from e
    if model.num_classes < args.num_superclasses:
        raise ValueError(f'--num-superclasses {args.num_superclasses} is more than the {model.num_classes} classes '
                         f'of {args.model} (each super-class needs a class of its own)')
    return model


def confusion_of_checkpoint(args) -> SuperClasses:
    """Evaluate the checkpoint on the split and cluster its confusion graph (the CLI's main path)."""
    from sklearn.metrics import confusion_matrix
    from timm.data import create_dataset, create_transform, resolve_data_config

    import timm_mlit.data  # noqa: F401  (registers the idx-file MNIST family and others with create_dataset)

    model = dense_model(args)
    n = model.num_classes
    data_args = {k: getattr(args, k) for k in ('input_size', 'crop_pct', 'mean', 'std', 'interpolation')
                 if getattr(args, k) is not None}
    transform = create_transform(**resolve_data_config(data_args, model=model))
    where = f'split {args.split!r} of {args.dataset or "the image folder"} in {args.data_dir}'
    timm_mlit.data.check_image_folder(args.data_dir, args.dataset)  # timm's reader skips an unreadable class folder
    try:
        dataset = create_dataset(args.dataset, root=args.data_dir, split=args.split, transform=transform)
    except (AssertionError, RuntimeError, ValueError) as e:  # timm: an unknown dataset is an AssertionError
        raise ValueError(f'cannot read {where}: {e}') from e
    if args.dataset.startswith('torch/') and args.split not in ('train', 'training'):
        print(f'{PROG}: warning: split {args.split!r} of {args.dataset} reads the test files in {args.data_dir}: '
              f'they should be images held out of the training data (e.g. a copy whose test files are the last '
              f'training images), never the test set you report', file=sys.stderr)
    names = class_names_of(dataset)
    if names is not None and len(names) != n:
        raise ValueError(f'{where} has {len(names)} classes, but {args.model} has {n} (--num-classes): the split '
                         f'must hold the classes the checkpoint was trained on')
    try:
        preds, targets = predict(model, dataset, args.batch_size, args.workers, args.device)
    except RuntimeError as e:  # timm's readers: an image they cannot read, after retries
        raise ValueError(f'cannot evaluate {args.model} on {where}: {str(e).splitlines()[0]}') from e
    if not (0 <= targets.min() and targets.max() < n):
        raise ValueError(f'{where} has class index {targets.max()}, but {args.model} has {n} classes (--num-classes)')
    confusion = confusion_matrix(targets, preds, labels=list(range(n)))
    accuracy = float(np.trace(confusion) / max(confusion.sum(), 1))
    source = (f'spectral clustering of the confusion graph of {args.model} ({args.checkpoint}) on {args.dataset} '
              f'split {args.split!r} ({len(targets)} images, top-1 {100 * accuracy:.2f}%)')
    sc = superclasses_from_confusion(confusion, args.num_superclasses, names, source, args.seed)
    sc.extra['top1'] = 100 * accuracy
    return sc


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """Everything that can be checked before a file is read or a model built: a mistake found in seconds, not after
    the evaluation."""
    if args.cifar100_coarse:
        given = [opt for opt, value in (('--model', args.model), ('--checkpoint', args.checkpoint),
                                        ('--data-dir', args.data_dir), ('--plot', args.plot)) if value is not None]
        if given:
            parser.error(f'{", ".join(given)}: for a dense model\'s confusions, not with --cifar100-coarse')
        if args.num_superclasses not in (None, COARSE_CLASSES):
            raise ValueError(f'--num-superclasses {args.num_superclasses}: CIFAR-100 has {COARSE_CLASSES} coarse '
                             f'classes (give {COARSE_CLASSES} or leave it out)')
    else:
        missing = [opt for opt, value in (('--model', args.model), ('--checkpoint', args.checkpoint),
                                          ('--data-dir', args.data_dir), ('--num-superclasses', args.num_superclasses))
                   if value is None]
        if missing:
            parser.error(f'the following arguments are required without --cifar100-coarse: {", ".join(missing)}')
        if args.num_superclasses < 2:
            raise ValueError(f'--num-superclasses must be at least 2, got {args.num_superclasses}')
        if args.num_classes is not None and args.num_classes < args.num_superclasses:
            raise ValueError(f'--num-superclasses {args.num_superclasses} is more than the {args.num_classes} classes '
                             f'of --num-classes (each super-class needs a class of its own)')
        if args.batch_size < 1 or args.workers < 0:
            raise ValueError(f'--batch-size must be >= 1 and --workers >= 0, got {args.batch_size} and {args.workers}')
        from ._checks import check_device  # (torch, imported only where a model is evaluated)
        check_device(args.device)
        if not os.path.isfile(args.checkpoint):
            raise FileNotFoundError(f'checkpoint {args.checkpoint} does not exist or is not a file')
        if not os.path.isdir(args.data_dir):
            raise FileNotFoundError(f'--data-dir {args.data_dir} does not exist or is not a folder')
        if '/' not in args.dataset:  # a folder: without the split's folder timm reads every image under --data-dir
            from timm.data.dataset_factory import _EVAL_SYNONYM, _TRAIN_SYNONYM, _search_split
            splits = sorted(set(os.listdir(args.data_dir)) & {*_TRAIN_SYNONYM, *_EVAL_SYNONYM, 'test'})
            if splits and _search_split(args.data_dir, args.split) == args.data_dir:
                raise ValueError(f'--data-dir {args.data_dir} has no folder of --split {args.split!r}, only {splits}')
    check_writable_path(args.output, '--output')
    if args.plot:
        check_writable_path(args.plot, '--plot')
        if os.path.abspath(args.plot) == os.path.abspath(args.output):
            raise ValueError(f'--plot and --output are both {args.output}: give the drawing a file of its own')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, formatter_class=HelpFormatter, description=__doc__.split('\n\n')[1])
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    parser.add_argument('--output', '-o', required=True, help='the super-class JSON file to write')
    src = parser.add_argument_group('from a dense model\'s confusions')
    src.add_argument('--model', help='timm model name of the dense baseline')
    src.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                     help='model arguments, as train.py\'s --model-kwargs')
    src.add_argument('--checkpoint', help='its weights (a train.py checkpoint or a state dict)')
    src.add_argument('--num-classes', type=int, default=None,
                     help='classes of its head (default: the checkpoint\'s for this package\'s models, else the '
                          'model\'s)')
    src.add_argument('--dataset', default='', help='timm dataset name (e.g. torch/fashion_mnist; \'\' = a folder)')
    src.add_argument('--data-dir', help='the dataset\'s root folder')
    src.add_argument('--split', default='validation',
                     help='the held-out split to take the confusions on (never the test set you report)')
    src.add_argument('--input-size', type=int, nargs=3, metavar='N', help='C H W of the evaluation transform, as '
                     'validate.py\'s options (default for these five: the model\'s pretrained cfg)')
    src.add_argument('--crop-pct', type=float)
    src.add_argument('--mean', type=float, nargs='+')
    src.add_argument('--std', type=float, nargs='+')
    src.add_argument('--interpolation')
    src.add_argument('--num-superclasses', '-E', type=int,
                     help=f'E: how many super-classes (one per expert); with --cifar100-coarse, whose division is '
                          f'fixed, it may only confirm it ({COARSE_CLASSES}), so that a script passing E to every '
                          f'step is told when its E does not fit')
    src.add_argument('--plot', help='also draw the confusion matrix, classes grouped by super-class, to this PNG')
    src.add_argument('-b', '--batch-size', type=int, default=256)
    src.add_argument('-j', '--workers', type=int, default=2)
    src.add_argument('--device', default='cpu')
    src.add_argument('--seed', type=int, default=0, help='seed of the clustering')
    parser.add_argument('--cifar100-coarse', metavar='DIR',
                        help='instead: CIFAR-100\'s own 20 coarse classes, from its python pickles in DIR')
    return parser


@exit_on_error(PROG)
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    sc = cifar100_coarse(args.cifar100_coarse) if args.cifar100_coarse else confusion_of_checkpoint(args)
    if args.cifar100_coarse and args.num_superclasses not in (None, sc.num_superclasses):
        raise ValueError(f'--num-superclasses {args.num_superclasses}: {args.cifar100_coarse} divides its classes into '
                         f'{sc.num_superclasses} coarse classes')
    sc.save(args.output)
    print(sc.describe())
    print(f'{PROG}: wrote {sc.num_superclasses} super-classes of {sc.num_classes} classes to {args.output}')
    if args.plot:
        from .plots import plot_confusion
        plot_confusion(np.asarray(sc.extra['confusion']), sc.groups(), in_its_folder(args.plot),
                       class_names=sc.class_names,
                       title=f'{args.model} on {args.dataset or args.data_dir} ({args.split})')
        print(f'{PROG}: drew the confusion matrix to {args.plot}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
