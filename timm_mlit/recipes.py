""" The YAML recipes (train.py configs and pre-training configs), found by name from a checkout or an installation

    resolve_recipe('scratch/mlit_xxs_cifar10')   # -> .../train_configs/scratch/mlit_xxs_cifar10.yaml
    timm-mlit-run train.py -c scratch/mlit_xxs_cifar10 --data-dir data/cifar10
    timm-mlit-run --list-recipes

A checkout keeps them in `train_configs/<kind>/<name>.yaml` beside the package; the wheel ships the same files as
`timm_mlit/train_configs/` (pyproject.toml maps one folder onto the other), so a recipe name works wherever the
package is installed. Kinds: `finetune` (Table 4), `transfer` (Table 5), `scratch` (Table 6), `pretrain` (Table 3).
"""
import difflib
import os
from pathlib import Path
from typing import Dict, List, Optional

__all__ = ['RECIPES_FOLDER', 'recipes_dir', 'list_recipes', 'resolve_recipe']

RECIPES_FOLDER = 'train_configs'
_SUFFIXES = ('.yaml', '.yml')


def recipes_dir() -> Optional[Path]:
    """The folder of the recipes: inside the installed package, else `train_configs/` of the checkout holding it."""
    package = Path(__file__).resolve().parent
    for folder in (package / RECIPES_FOLDER, package.parent / RECIPES_FOLDER):
        if folder.is_dir():
            return folder
    return None


def list_recipes() -> List[str]:
    """The names of the recipes, `<kind>/<name>` without the .yaml suffix, sorted."""
    folder = recipes_dir()
    if folder is None:
        return []
    return sorted(p.relative_to(folder).with_suffix('').as_posix()
                  for p in folder.rglob('*') if p.suffix in _SUFFIXES and p.is_file())


def _as_name(path_or_name: str) -> str:
    """'train_configs/scratch/x.yaml', 'scratch/x.yaml' and 'scratch/x' all name 'scratch/x'."""
    name = path_or_name.replace('\\', '/')
    if name.startswith('./'):
        name = name[2:]
    _, found, rest = name.rpartition(RECIPES_FOLDER + '/')
    if found:  # a recipe path from the docs (relative to a checkout), used where no checkout is
        name = rest
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def _close_names(name: str, names: List[str]) -> List[str]:
    """Recipes of the same file name in other kinds' folders first, then those whose whole or file name is close."""
    base = name.rpartition('/')[2]
    by_base: Dict[str, List[str]] = {}
    for n in names:
        by_base.setdefault(n.rpartition('/')[2], []).append(n)
    close = list(by_base.get(base, []))
    close += difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    for b in difflib.get_close_matches(base, list(by_base), n=3, cutoff=0.6):
        close += by_base[b]
    return list(dict.fromkeys(close))[:5]


def resolve_recipe(path_or_name: str) -> str:
    """The YAML file meant by `path_or_name`: the path itself if it is a file, else the packaged recipe of that name
    (`scratch/mlit_xxs_fashion_mnist`, with or without .yaml, or with the `train_configs/` prefix of the docs).

    Raises:
        FileNotFoundError: neither a file nor a recipe; the message lists the recipes whose names come closest.
    """
    path_or_name = os.fspath(path_or_name)
    if os.path.isfile(path_or_name):
        return path_or_name
    names = list_recipes()
    name = _as_name(path_or_name)
    folder = recipes_dir()
    if folder is not None and name in names:
        return str(folder / (name + '.yaml'))
    if not names:
        raise FileNotFoundError(f'{path_or_name!r} is not a file, and no recipes were found (the package has no '
                                f'{RECIPES_FOLDER}/ folder)')
    close = _close_names(name, names)
    hint = f'; did you mean {", ".join(close)}?' if close else ''
    raise FileNotFoundError(f'{path_or_name!r} is neither a file nor a recipe name{hint} '
                            f'(`timm-mlit-run --list-recipes` lists the {len(names)} recipes)')
