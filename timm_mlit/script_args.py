""" What timm-mlit-run reads of a script and its command line before it runs the script

- `read_script(path)`: the options the script's argparse parsers declare, with their literal defaults, and whether
  it takes timm's `ClassificationTask` (what `--superclasses` replaces), read from its source by `ast`.
- `find_option`, `config_values`, `resolve_config_args`: an option's value among the arguments, the YAML values of
  the `-c/--config` file, and a recipe name given to `-c` made the packaged recipe's path (`timm_mlit.recipes`).
- `take_superclass_args`: the launcher's own `--superclasses FILE [--router-loss-weight W]`, taken out.
- `check_inputs`: refuse, before the script starts, a CUDA device on a machine without one and an image folder with
  a folder that cannot be listed.
"""
import ast
import os
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
import yaml

from .data import check_image_folder
from .recipes import resolve_recipe

__all__ = ['ScriptSource', 'read_script', 'find_option', 'config_values', 'resolve_config_args',
           'take_superclass_args', 'check_inputs']


@dataclass(frozen=True)
class ScriptSource:
    """What a script's source declares. `options`: each option string of its `add_argument` calls -> the default
    given there when it is a literal string, else None; `names`: every name, attribute and imported name in it."""
    path: str
    options: Dict[str, Optional[str]] = field(default_factory=dict)
    names: FrozenSet[str] = frozenset()

    @property
    def takes_config(self) -> bool:
        """A `-c/--config FILE` option whose YAML values are the defaults (timm's train.py)."""
        return '--config' in self.options

    @property
    def trains_with_amp(self) -> bool:
        """A training script with a config and timm's `--amp`/`--amp-dtype` options (timm's train.py)."""
        return self.takes_config and '--amp-dtype' in self.options

    @property
    def takes_classification_task(self) -> bool:
        """It refers to `ClassificationTask` (train.py imports it from timm.task and builds one)."""
        return 'ClassificationTask' in self.names


def read_script(path: str) -> ScriptSource:
    """The options and names of the script at `path`, read from its syntax tree; nothing of it runs.

    The tree, not the script's parser objects: to get those the module body would have to run, and a script is
    free to do its work there (the stand-ins in tests/ do, and a script that is not guarded by
    `if __name__ == '__main__'` would train before any check) or to build its parser inside `main()`; it would
    also import all the script imports (wandb, apex, ...) twice. The tree also sees what a text search cannot tell
    apart: `'--config'` in a help string or a comment is no option. A file that cannot be read or parsed declares
    nothing: running it names the problem.
    """
    try:
        with open(path, 'rb') as f:
            tree = ast.parse(f.read(), filename=path)  # (bytes: a coding cookie is honoured)
    except (OSError, SyntaxError, ValueError):
        return ScriptSource(path)
    options: Dict[str, Optional[str]] = {}
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.add(node.name.rpartition('.')[2])
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == 'add_argument':
            default = next((kw.value for kw in node.keywords if kw.arg == 'default'), None)
            literal = default.value if isinstance(default, ast.Constant) and isinstance(default.value, str) else None
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith('-'):
                    options.setdefault(arg.value, literal)
    return ScriptSource(path, options, frozenset(names))


def find_option(args: Sequence[str], name: str) -> Tuple[bool, Optional[str]]:
    """(whether `name` is among `args` before any `--`, its value in `name V` or `name=V` form: the last one given,
    which is the one argparse keeps)."""
    found: Tuple[bool, Optional[str]] = (False, None)
    for i, arg in enumerate(args):
        if arg == '--':
            break
        if arg == name:
            found = True, args[i + 1] if i + 1 < len(args) else None
        elif arg.startswith(name + '='):
            found = True, arg[len(name) + 1:]
    return found


def _config_slots(args: Sequence[str]) -> List[Tuple[int, str]]:
    """Where `args` name a config file, as (index, prefix): `args[index]` is prefix + the value, for each of
    `-c X`, `--config X` (prefix ''), `--config=X` and `-cX`, before any `--`."""
    slots = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == '--':
            break
        if arg in ('-c', '--config'):
            if i + 1 < len(args) and args[i + 1]:
                slots.append((i + 1, ''))
            i += 2
            continue
        if arg.startswith('--config=') and arg != '--config=':
            slots.append((i, '--config='))
        elif arg.startswith('-c') and not arg.startswith('--') and len(arg) > 2:
            slots.append((i, '-c'))
        i += 1
    return slots


def resolve_config_args(args: Sequence[str]) -> List[str]:
    """`args` with the value of each `-c X`, `-cX`, `--config X` and `--config=X` replaced by `resolve_recipe(X)`:
    a file stays as it is, a recipe name becomes the packaged recipe's path. Nothing after `--` is touched.

    Raises:
        FileNotFoundError: a value that is neither a file nor a recipe (the message lists close recipe names).
    """
    out = list(args)
    for i, prefix in _config_slots(out):
        out[i] = prefix + resolve_recipe(out[i][len(prefix):])
    return out


def config_values(args: Sequence[str]) -> dict:
    """The YAML mapping of the (last) config file in `args`, already resolved to a path; {} without one."""
    slots = _config_slots(args)
    if not slots:
        return {}
    i, prefix = slots[-1]
    with open(args[i][len(prefix):]) as f:
        try:
            cfg = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f'config {f.name} is not YAML: {" ".join(str(e).split())}') from None
    return cfg if isinstance(cfg, dict) else {}


def take_superclass_args(args: Sequence[str]) -> Tuple[List[str], Optional[str], Optional[float]]:
    """(ARGS without --superclasses / --router-loss-weight, the file, the weight); both forms `--x V`, `--x=V`."""
    out, values = [], {}
    i = 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        name, sep, value = arg.partition('=')
        if name in ('--superclasses', '--router-loss-weight'):
            if not sep:
                if i + 1 >= len(args):
                    raise ValueError(f'{name} needs a value')
                value = args[i + 1]
                i += 1
            values[name] = value
        else:
            out.append(arg)
        i += 1
    weight = None
    if '--router-loss-weight' in values:
        if '--superclasses' not in values:
            raise ValueError('--router-loss-weight needs --superclasses FILE')
        try:
            weight = float(values['--router-loss-weight'])
        except ValueError:
            raise ValueError(f'--router-loss-weight must be a number, got {values["--router-loss-weight"]!r}') from None
        if not weight >= 0:
            raise ValueError(f'--router-loss-weight must be >= 0, got {weight}')
    return out, values.get('--superclasses'), weight


def check_inputs(script: ScriptSource, args: Sequence[str]):
    """Raise where the script would stop at once or read part of its data: a CUDA --device (from its arguments, else
    its config, else its default: cuda for timm's train.py and validate.py) on a machine without CUDA, where timm
    stops in a bare AssertionError; a --data-dir that is a file; an image folder --data-dir with a folder it cannot
    list (`check_image_folder`).
    `args` have their config already resolved to a path."""
    cfg = config_values(args) if script.takes_config else {}
    given, data_dir, dataset = (find_option(args, f'--{k}')[1] for k in ('device', 'data-dir', 'dataset'))
    data_dir = data_dir or cfg.get('data_dir')
    if data_dir and os.path.isfile(data_dir):  # timm would look for images in it and say it found none
        raise ValueError(f'--data-dir {data_dir} is a file, not a folder')
    check_image_folder(data_dir, dataset or cfg.get('dataset') or '')
    if '--device' not in script.options:
        return
    device = str(given or cfg.get('device') or script.options['--device'] or '')
    if device.startswith('cuda') and not torch.cuda.is_available():
        origin = '' if given else f' (device: {device} in the config)' if cfg.get('device') else \
            f" ({os.path.basename(script.path)}'s default)"
        raise ValueError(f'--device {device}{origin} but CUDA is not available here; add --device cpu')
