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
import os
import pickle
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
from timm.utils import ParseKwargs

from .cli import HelpFormatter, exit_on_error
from .files import atomic_write

__all__ = ['RouterTaskError', 'SuperClasses', 'load_superclasses', 'confusion_graph', 'cluster_confusion',
           'cifar100_coarse', 'superclasses_from_confusion', 'main']

PROG = 'timm-mlit-superclasses'
FORMAT = 'timm-mlit-superclasses/1'


class RouterTaskError(ValueError):
    """A model that the super-class router loss cannot train, or a super-class file that does not fit it (raised by
    `timm_mlit.task`, defined here so that it can be caught without importing timm.task, timm >= 1.0.29)."""


@dataclass
class SuperClasses:
    """A division of C classes into E super-classes: `assignment[c]` is class c's super-class, in [0, E)."""
    assignment: List[int]
    class_names: Optional[List[str]] = None
    superclass_names: Optional[List[str]] = None
    source: str = ''
    extra: Dict[str, object] = field(default_factory=dict)  # e.g. the confusion matrix the groups came from

    def __post_init__(self):
        self.assignment = [int(s) for s in self.assignment]
        _check_assignment(self.assignment, 'the division')
        for what, names, n in (('class_names', self.class_names, self.num_classes),
                               ('superclass_names', self.superclass_names, self.num_superclasses)):
            if names is not None and len(names) != n:
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
        return atomic_write(path, lambda f: f.write(text.encode()))


def _check_assignment(assignment: Sequence[int], where: str):
    if not assignment:
        raise ValueError(f'{where} has no classes')
    if min(assignment) < 0:
        raise ValueError(f'{where} has a negative super-class index')
    missing = sorted(set(range(max(assignment) + 1)) - set(assignment))
    if missing:
        raise ValueError(f'{where} numbers its super-classes 0..{max(assignment)} but none has the classes of '
                         f'super-class(es) {missing}: super-classes must be numbered 0..E-1, each non-empty')


def load_superclasses(path: str, num_classes: Optional[int] = None,
                      num_superclasses: Optional[int] = None) -> SuperClasses:
    """Read a super-class file written by `SuperClasses.save` (timm-mlit-superclasses), checked to cover exactly
    classes 0..C-1 once each and, where given, to match the model's `num_classes` and number of experts.

    Raises:
        FileNotFoundError: no such file. ValueError: a file that is not one, or does not fit the model.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'super-class file {path} does not exist (write one with {PROG})')
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
        classes = data['classes']
        index = [int(c['index']) for c in classes]
        assignment = {int(c['index']): int(c['superclass']) for c in classes}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f'{path} is not a super-class file ({type(e).__name__}: {e}); write one with {PROG}') from e
    if len(set(index)) != len(index):
        dup = sorted({i for i in index if index.count(i) > 1})
        raise ValueError(f'{path} lists class(es) {dup} more than once')
    n = num_classes if num_classes is not None else max(index) + 1
    uncovered = sorted(set(range(n)) - set(index))
    extra = sorted(set(index) - set(range(n)))
    if uncovered:
        raise ValueError(f'{path} does not cover every class: class(es) {uncovered} of the {n} have no super-class')
    if extra:
        raise ValueError(f'{path} lists class(es) {extra}, but the model has {n} classes (0..{n - 1})')
    names = [c.get('name') for c in sorted(classes, key=lambda c: int(c['index']))]
    sc = SuperClasses([assignment[c] for c in range(n)], class_names=names if all(names) else None,
                      superclass_names=data.get('superclass_names'), source=data.get('source', ''))
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
    if not 2 <= num_superclasses <= n:
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
    """CIFAR-100's own 20 super-classes, read from its python pickles (`cifar-100-python/train` and `meta`, as
    https://www.cs.toronto.edu/~kriz/cifar.html ships them); `root` is that folder or the one holding it."""
    folder = root if os.path.isfile(os.path.join(root, 'train')) else os.path.join(root, 'cifar-100-python')
    paths = [os.path.join(folder, name) for name in ('train', 'meta')]
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f'no CIFAR-100 pickle {p} (expected the cifar-100-python folder of the python '
                                    f'version of CIFAR-100)')
    train, meta = [_unpickle(p) for p in paths]
    try:
        fine, coarse = train['fine_labels'], train['coarse_labels']
        fine_names, coarse_names = meta['fine_label_names'], meta['coarse_label_names']
    except KeyError as e:
        raise ValueError(f'{folder} is not CIFAR-100 in its python format: no {e} in its pickles') from e
    assignment = {}
    for f, c in zip(fine, coarse):
        if assignment.setdefault(int(f), int(c)) != int(c):
            raise ValueError(f'{paths[0]}: fine class {f} appears under two coarse classes')
    return SuperClasses([assignment[f] for f in range(len(fine_names))], class_names=list(fine_names),
                        superclass_names=list(coarse_names), source='CIFAR-100 coarse labels')


def _unpickle(path: str) -> dict:
    with open(path, 'rb') as f:
        data = pickle.load(f, encoding='bytes')
    return {(k.decode() if isinstance(k, bytes) else k): _decode(v) for k, v in data.items()}


def _decode(v):
    if isinstance(v, list):
        return [x.decode() if isinstance(x, bytes) else x for x in v]
    return v


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


def confusion_of_checkpoint(args) -> SuperClasses:
    """Evaluate the checkpoint on the split and cluster its confusion graph (the CLI's main path)."""
    import timm
    from sklearn.metrics import confusion_matrix
    from timm.data import create_dataset, create_transform, resolve_data_config

    import timm_mlit.data  # noqa: F401  (registers the idx-file MNIST family and others with create_dataset)

    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f'checkpoint {args.checkpoint} does not exist')
    model = timm.create_model(args.model, num_classes=args.num_classes, checkpoint_path=args.checkpoint,
                              **args.model_kwargs)
    data_args = {k: getattr(args, k) for k in ('input_size', 'crop_pct', 'mean', 'std', 'interpolation')
                 if getattr(args, k) is not None}
    transform = create_transform(**resolve_data_config(data_args, model=model))
    if args.dataset.startswith('torch/') and args.split not in ('train', 'training'):
        print(f'{PROG}: warning: split {args.split!r} of {args.dataset} reads the test files in {args.data_dir}: '
              f'they should be images held out of the training data (e.g. a copy whose test files are the last '
              f'training images), never the test set you report', file=sys.stderr)
    dataset = create_dataset(args.dataset, root=args.data_dir, split=args.split, transform=transform)
    preds, targets = predict(model, dataset, args.batch_size, args.workers, args.device)
    n = model.num_classes
    confusion = confusion_matrix(targets, preds, labels=list(range(n)))
    accuracy = float(np.trace(confusion) / max(confusion.sum(), 1))
    source = (f'spectral clustering of the confusion graph of {args.model} ({args.checkpoint}) on {args.dataset} '
              f'split {args.split!r} ({len(targets)} images, top-1 {100 * accuracy:.2f}%)')
    sc = superclasses_from_confusion(confusion, args.num_superclasses, class_names_of(dataset), source, args.seed)
    sc.extra['top1'] = 100 * accuracy
    return sc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, formatter_class=HelpFormatter, description=__doc__.split('\n\n')[1])
    parser.add_argument('--output', '-o', required=True, help='the super-class JSON file to write')
    src = parser.add_argument_group('from a dense model\'s confusions')
    src.add_argument('--model', help='timm model name of the dense baseline')
    src.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                     help='model arguments, as train.py\'s --model-kwargs')
    src.add_argument('--checkpoint', help='its weights (a train.py checkpoint or a state dict)')
    src.add_argument('--num-classes', type=int, default=None, help='classes of its head (default: the model\'s)')
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
    src.add_argument('--num-superclasses', '-E', type=int, help='E: how many super-classes (one per expert)')
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
    if args.cifar100_coarse:
        sc = cifar100_coarse(args.cifar100_coarse)
    else:
        missing = [opt for opt, value in (('--model', args.model), ('--checkpoint', args.checkpoint),
                                          ('--data-dir', args.data_dir), ('--num-superclasses', args.num_superclasses))
                   if value is None]
        if missing:
            parser.error(f'the following arguments are required without --cifar100-coarse: {", ".join(missing)}')
        sc = confusion_of_checkpoint(args)
    sc.save(args.output)
    print(sc.describe())
    print(f'{PROG}: wrote {sc.num_superclasses} super-classes of {sc.num_classes} classes to {args.output}')
    if getattr(args, 'plot', None) and 'confusion' in sc.extra:
        from .plots import plot_confusion
        plot_confusion(np.asarray(sc.extra['confusion']), sc.groups(), args.plot, class_names=sc.class_names,
                       title=f'{args.model} on {args.dataset or args.data_dir} ({args.split})')
        print(f'{PROG}: drew the confusion matrix to {args.plot}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
