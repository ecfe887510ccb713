""" Run one of timm's scripts with the mLiT plugin registered

    timm-mlit-run validate.py --model mlit_xxs --checkpoint output/train/RUN/model_best.pth.tar ...
    timm-mlit-run train -c scratch/mlit_xxs_cifar10 --data-dir data/cifar10
    python -m timm_mlit.run /path/to/pytorch-image-models/benchmark.py --model mlit_xxs

timm's train.py imports plugins itself (`--device-modules timm_mlit`, which every packaged recipe sets), but
validate.py, benchmark.py, inference.py and onnx_export.py have no such hook. This runs SCRIPT as `__main__`,
unmodified, after importing `timm_mlit` (the models) and `timm_mlit.data` (the torch/svhn, torch/flowers102 and
idx-file MNIST-family datasets), with `sys.argv` = [SCRIPT, ARGS...] and the script's folder first on `sys.path`,
as `python SCRIPT ARGS...` would have them.

SCRIPT is a path to a file, or a bare name (`validate.py` or `validate`) looked up in $TIMM_SCRIPTS_DIR, a checkout
of https://github.com/huggingface/pytorch-image-models (timm's wheel does not ship the scripts).

Before the script starts (`timm_mlit.script_args`): for a script with a `-c/--config FILE` option (timm's train.py),
`-c NAME` may name a packaged recipe (`scratch/mlit_xxs_cifar10`, see `--list-recipes`); a CUDA device on a machine
without one and an unreadable image folder are refused in one line; train.py gets the precision this machine trains
fastest in where nothing sets one (`timm_mlit.precision.auto_precision_args`).

`--superclasses FILE [--router-loss-weight W]` (taken out of the script's arguments) trains a Mobile V-MoE with the
super-class router loss of arXiv 2309.04354 (`timm_mlit.task.SuperClassRouterTask`, λ = W, default 0.3): train.py
gets that task where it builds its ClassificationTask, and summary.csv the router's super-class accuracy as
train_router_acc and eval_router_acc.

While the script runs, the first model with MoE layers it creates is watched (`timm_mlit.moe_recorder`): each
summary.csv row (one per epoch) gets the mean MoE balance loss of the training forwards since the previous row as
`train_moe_loss`, and `expert_load.csv` beside it each MoE layer's expert shares. Under DDP these are the primary
process's own forwards. What this changes in timm while the script runs, and why, is listed in
`timm_mlit.timm_patches`.
"""
import os
import runpy
import sys
from contextlib import ExitStack
from typing import List, Optional, Sequence

from . import __version__
from . import data as _datasets  # noqa: F401  (importing it registers the datasets timm's table lacks)
from .cli import exit_on_error
from .moe_recorder import EXPERT_LOAD_CSV, MoERecorder
from .precision import auto_precision_args
from .recipes import list_recipes, recipes_dir
from .script_args import check_inputs, read_script, resolve_config_args, take_superclass_args
from .superclasses import RouterTaskError, load_superclasses
from .timm_patches import SuperClassRouting, patched_timm

__all__ = ['main', 'resolve_script', 'SCRIPTS_DIR_ENV']

PROG = 'timm-mlit-run'
SCRIPTS_DIR_ENV = 'TIMM_SCRIPTS_DIR'


def _usage() -> str:
    scripts_dir = os.environ.get(SCRIPTS_DIR_ENV, '')
    folder = recipes_dir()
    return f"""usage: timm-mlit-run SCRIPT [ARGS...]
       timm-mlit-run {{-h,--help | --version | --list-recipes}}

Run a timm script (train.py, validate.py, benchmark.py, inference.py, onnx_export.py, ...) with the mLiT models
and datasets registered.

positional arguments:
  SCRIPT          a path, or a bare name (train.py or train) looked up in ${SCRIPTS_DIR_ENV}
                  (now: {scripts_dir or 'not set'})
  ARGS            the script's own arguments; for a script with a -c/--config option (timm's train.py),
                  -c NAME names a packaged recipe (e.g. scratch/mlit_xxs_cifar10), -c FILE a YAML file

super-class routing (Mobile V-MoE; taken out of ARGS, for train.py):
  --superclasses FILE        train with the super-class router loss, super-classes from FILE
                             (written by timm-mlit-superclasses)
  --router-loss-weight W     its weight lambda (default 0.3)

options (only in the first place: anything after SCRIPT is the script's):
  -h, --help      show this message and exit
  --version       print timm-mlit-run's version and exit
  --list-recipes  print the names of the {len(list_recipes())} packaged recipes and exit
                  (in {folder if folder is not None else 'nowhere: none found'})

While a script trains an mLiT, summary.csv gets train_moe_loss (the mean MoE balance loss of the epoch's training
forwards) and {EXPERT_LOAD_CSV} beside it each MoE layer's expert shares per epoch."""


def resolve_script(script: str, scripts_dir: Optional[str] = None) -> str:
    """The absolute path of SCRIPT: the file itself if it exists, else `<scripts_dir>/<name>[.py]`.

    Args:
        script: a path, or a bare name such as 'validate.py' or 'validate'.
        scripts_dir: where bare names are looked up; default $TIMM_SCRIPTS_DIR.

    Raises:
        FileNotFoundError: no such script; the message says where it looked and, for a bare name, what to set.
    """
    if os.path.isfile(script):
        return os.path.abspath(script)
    if scripts_dir is None:
        scripts_dir = os.environ.get(SCRIPTS_DIR_ENV, '')
    looked = [script]
    bare = os.path.basename(script) == script
    if bare and scripts_dir:
        names = [script] if script.endswith('.py') else [script, script + '.py']
        for name in names:
            path = os.path.join(scripts_dir, name)
            if os.path.isfile(path):
                return os.path.abspath(path)
            looked.append(path)
    if not bare:
        hint = ''
    elif not scripts_dir:
        hint = f'; {SCRIPTS_DIR_ENV} is not set (point it at a pytorch-image-models checkout to use bare names)'
    elif not os.path.isdir(scripts_dir):
        hint = f'; {SCRIPTS_DIR_ENV}={scripts_dir} is not a directory'
    else:
        hint = f' (in {SCRIPTS_DIR_ENV}={scripts_dir})'
    raise FileNotFoundError(f'script {script!r} not found: looked for {", ".join(looked)}{hint}')


def _run_as_main(path: str, args: List[str], routing: Optional[SuperClassRouting]):
    """Run the script at `path` as `__main__` with `args`, as `python SCRIPT ARGS...` would, inside `patched_timm`."""
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [path] + args
    sys.path.insert(0, os.path.dirname(path))  # as `python SCRIPT` does: the script's folder comes first
    try:
        with ExitStack() as stack:
            if routing is not None:  # a model that does not fit the super-class file is a usage error, in one line
                stack.enter_context(exit_on_error(PROG, (RouterTaskError,)))
            stack.enter_context(patched_timm(MoERecorder(), routing))
            runpy.run_path(path, run_name='__main__')
            if routing is not None:
                routing.check_task()  # (validate.py and the like build none and write no summary)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path


def main(argv: Optional[Sequence[str]] = None):
    """Run `argv[0]` as `__main__` with `argv[1:]` as its arguments. Its SystemExit (status) passes through."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == '--version':
        print(f'{PROG} {__version__}')
        return 0
    if argv[0] == '--list-recipes':
        print('\n'.join(list_recipes()))
        return 0
    with exit_on_error(PROG, (OSError, ValueError)):  # the launcher's own errors: the script's pass through
        args, superclasses, weight = take_superclass_args(argv[1:])
        script = read_script(resolve_script(argv[0]))
        if script.takes_config:  # -c NAME: the packaged recipe
            args = resolve_config_args(args)
        check_inputs(script, args)
        if script.trains_with_amp:  # train.py: the precision for this machine, where nothing sets one
            args = auto_precision_args(args, prog=PROG)
        routing = None
        if superclasses is not None:  # refused before the script runs, not after
            if not script.takes_classification_task:
                raise ValueError(f'--superclasses is for train.py: {os.path.basename(script.path)} would have '
                                 f'built no classification task to add the super-class router loss to')
            routing = SuperClassRouting(load_superclasses(superclasses), 0.3 if weight is None else weight)
    _run_as_main(script.path, args, routing)
    return 0


if __name__ == '__main__':
    sys.exit(main())
