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

For a script with a `-c/--config FILE` option (timm's train.py), `-c NAME` may name a packaged recipe
(`scratch/mlit_xxs_cifar10`, see `--list-recipes` and `timm_mlit.recipes`); the script is given its path.

`--superclasses FILE [--router-loss-weight W]` (taken out of the script's arguments) trains a Mobile V-MoE with the
super-class router loss of arXiv 2309.04354 (`timm_mlit.task.SuperClassRouterTask`, λ = W, default 0.3): the
launcher gives train.py that task where it builds its ClassificationTask (timm >= 1.0.29), and summary.csv gets the
router's super-class accuracy as train_router_acc and eval_router_acc.

While the script runs, the first model with MoE layers it creates through `timm.create_model` is watched
(`MoERecorder`), and each `timm.utils.update_summary` call (train.py's one summary row per epoch) gets the mean MoE
balance loss of the training forwards since the previous row as `train_moe_loss` in summary.csv, and appends each
MoE layer's expert shares to `expert_load.csv` beside it. Under DDP these are the primary process's own forwards.
"""
import functools
import math
import os
import re
import runpy
import sys
from contextlib import ExitStack, contextmanager
from typing import Iterator, List, Optional, Sequence, Tuple

from .cli import exit_on_error
from .plots import append_expert_load, truncate_csv

__all__ = ['main', 'resolve_script', 'resolve_config_args', 'MoERecorder', 'SCRIPTS_DIR_ENV', 'EXPERT_LOAD_CSV']

PROG = 'timm-mlit-run'
SCRIPTS_DIR_ENV = 'TIMM_SCRIPTS_DIR'
EXPERT_LOAD_CSV = 'expert_load.csv'
_CONFIG_OPTION = re.compile(r"""['"]--config['"]""")
_AMP_DTYPE_OPTION = re.compile(r"""['"]--amp-dtype['"]""")
_DEVICE_OPTION = re.compile(r"""['"]--device['"](?:[^)]*?\bdefault\s*=\s*['"]([^'"]*)['"])?""")  # and its default
_TRAINING_TASK = re.compile(r'\bClassificationTask\b')  # what --superclasses replaces (train.py builds one)


def _usage() -> str:
    from .recipes import list_recipes, recipes_dir
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


def resolve_config_args(args: Sequence[str]) -> List[str]:
    """`args` with the value of each `-c X`, `-cX`, `--config X` and `--config=X` replaced by `resolve_recipe(X)`:
    a file stays as it is, a recipe name becomes the packaged recipe's path. Nothing after `--` is touched.

    Raises:
        FileNotFoundError: a value that is neither a file nor a recipe (the message lists close recipe names).
    """
    from .recipes import resolve_recipe

    out = list(args)
    for i, prefix in _config_slots(out):
        out[i] = prefix + resolve_recipe(out[i][len(prefix):])
    return out


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


def _declares(path: str, option: 're.Pattern[str]') -> Optional['re.Match[str]']:
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            return option.search(f.read())
    except OSError:
        return None


def _takes_config(path: str) -> bool:
    """Whether the script declares a `--config` option (timm's train.py does: `-c/--config FILE`)."""
    return _declares(path, _CONFIG_OPTION) is not None


def _trains_with_amp(path: str) -> bool:
    """Whether the script is a training script with a config and timm's `--amp`/`--amp-dtype` options (train.py)."""
    return _takes_config(path) and _declares(path, _AMP_DTYPE_OPTION) is not None


class MoERecorder:
    """The MoE balance loss and each MoE layer's expert shares of a model, per epoch, without touching the loop.

    `watch(model)` hooks the forward of the first model given that has MoE layers. After each of its forwards in
    training mode the hook adds what the layers recorded (`moe_stats`: the sum of their balance losses, eq. 12 of
    arXiv 2407.17783, what `MLiT.moe_loss()` returns, and each layer's load), on the model's device and without
    reading them back, so no step waits for the accelerator. `end_epoch(epoch, folder)` returns the mean loss over
    those forwards, appends each expert's share of its layer's load summed over the epoch to
    `folder/expert_load.csv` (columns epoch, layer, expert, share: what timm-mlit-pretrain writes) and starts the
    next epoch's sums.
    """

    def __init__(self):
        self.layer_names: Optional[List[str]] = None  # None until a model with MoE layers is watched
        self.router_task = None  # the SuperClassRouterTask train.py built, when training with super-classes
        self.expects_router_task = False  # --superclasses was given
        self.eval_router_accuracy = None
        self._start()

    def check_router_task(self):
        """Raise if --superclasses was given but the script built no classification task to add the loss to."""
        if self.expects_router_task and self.router_task is None:
            from .superclasses import RouterTaskError
            raise RouterTaskError('--superclasses was given, but the script built no classification task to add the '
                                  'router loss to (it is for timm\'s train.py >= 1.0.29, without distillation)')

    def _start(self):
        self.steps = 0
        self._loss = None
        self._loads = None

    def watch(self, model):
        """Hook `model` if it is the first model with MoE layers seen; return it."""
        import torch

        from .layers import moe_stats, named_moe_layers

        if self.layer_names is not None:
            return model
        layer_names = [name for name, _ in named_moe_layers(model)]
        if not layer_names:
            return model
        self.layer_names = layer_names
        recorder = self

        def hook(module, args, output):
            # a copy of the model (an EMA) carries this hook too; only the watched model counts
            if module is model and module.training:
                with torch.no_grad():
                    recorder._record(moe_stats(module))

        model.register_forward_hook(hook)
        return model

    def _record(self, stats):
        """Add one training forward's loss and loads; a forward in which a layer recorded nothing is skipped."""
        if stats is None or any(name not in stats.load for name in self.layer_names):
            return
        loss = stats.loss.detach()
        loads = [stats.load[name].float() for name in self.layer_names]
        self._loss = loss if self._loss is None else self._loss + loss
        self._loads = loads if self._loads is None else [a + b for a, b in zip(self._loads, loads)]
        self.steps += 1

    def end_epoch(self, epoch: int, folder: Optional[str] = None) -> Optional[float]:
        """The epoch's mean balance loss (nan if no training forward ran; None if no MoE model is watched), its
        expert shares appended to `folder/expert_load.csv` when a folder is given."""
        if self.layer_names is None:
            return None
        if self.steps == 0:
            self._start()
            return math.nan
        from .layers import expert_shares

        loss = (self._loss / self.steps).item()
        shares = [expert_shares(load).cpu().tolist() for load in self._loads]
        if folder is not None:
            append_expert_load(os.path.join(folder, EXPERT_LOAD_CSV), epoch, dict(zip(self.layer_names, shares)))
        self._start()
        return loss


@contextmanager
def _recording_moe(recorder: MoERecorder) -> Iterator[MoERecorder]:
    """Route timm's create_model through `recorder.watch` and give its update_summary the recorded epoch; restored
    on exit. train.py imports these functions when it starts (`from timm.models import create_model`,
    `utils.update_summary`), so they are replaced where it looks them up, in timm's namespaces."""
    import timm
    import timm.models
    import timm.utils

    create_model = timm.models.create_model
    update_summary = timm.utils.update_summary

    @functools.wraps(create_model)
    def create_and_watch(*args, **kwargs):
        return recorder.watch(create_model(*args, **kwargs))

    @functools.wraps(update_summary)
    def update_summary_with_moe(epoch, train_metrics, eval_metrics, filename, *args, **kwargs):
        loss = recorder.end_epoch(epoch, os.path.dirname(os.path.abspath(filename)))
        if loss is not None:
            train_metrics = dict(train_metrics, moe_loss=loss)
        recorder.check_router_task()
        if recorder.router_task is not None:
            train_metrics = dict(train_metrics, router_acc=recorder.router_task.train_accuracy.compute_and_reset())
            if eval_metrics is not None:
                eval_metrics = dict(eval_metrics, router_acc=recorder.eval_router_accuracy.compute_and_reset())
        return update_summary(epoch, train_metrics, eval_metrics, filename, *args, **kwargs)

    replacements = [(timm, 'create_model', create_and_watch), (timm.models, 'create_model', create_and_watch),
                    (timm.utils, 'update_summary', update_summary_with_moe)]
    trim_summary = getattr(timm.utils, 'trim_summary', None)  # timm >= 1.0.31: a resumed run trims its summary
    if trim_summary is not None:
        @functools.wraps(trim_summary)
        def trim_summary_and_load(filename, start_epoch, *args, **kwargs):
            truncate_csv(os.path.join(os.path.dirname(os.path.abspath(filename)), EXPERT_LOAD_CSV), start_epoch)
            return trim_summary(filename, start_epoch, *args, **kwargs)
        replacements.append((timm.utils, 'trim_summary', trim_summary_and_load))

    with ExitStack() as stack:
        for owner, name, new in replacements:
            old = getattr(owner, name)
            stack.callback(setattr, owner, name, old)
            setattr(owner, name, new)
        yield recorder


@contextmanager
def _superclass_routing(recorder: MoERecorder, superclasses_path: str, weight: float) -> Iterator[None]:
    """Make timm.task.ClassificationTask, where train.py takes it from when it starts, build a SuperClassRouterTask
    (kept by `recorder`), and count the router's super-class accuracy on the images train.py's validate() scores
    (its `utils.accuracy` call, right after the eval model's forward); restored on exit.

    The router's eval forwards are seen through a forward hook, which the EMA copy of the model (a deepcopy) carries
    too; each validate() pass starts the count again, so the accuracy written is that of the last pass, the model
    whose metrics train.py writes beside it (the EMA model's, with --model-ema)."""
    import torch

    from .superclasses import RouterTaskError, load_superclasses

    try:
        import timm.task
    except ImportError as e:
        raise RouterTaskError(f'--superclasses needs timm >= 1.0.29 (its train.py builds a training task); '
                              f'timm here has no timm.task ({e})') from None
    import timm.utils

    from .task import RouterAccuracy, SuperClassRouterTask, superclass_targets

    superclasses = load_superclasses(superclasses_path)
    classification_task = timm.task.ClassificationTask
    accuracy = timm.utils.accuracy
    recorder.eval_router_accuracy = RouterAccuracy()
    last = {}  # the newest eval forward of a router: its module and logits, and which ones were counted

    def remember(module, args, output):
        if not module.training:
            last.update(router=module, logits=module.last_logits)

    class Task(SuperClassRouterTask):
        def __init__(self, model, criterion=None, **kwargs):
            super().__init__(model, superclasses, weight, criterion=criterion, **kwargs)
            self.router[0].register_forward_hook(remember)
            recorder.router_task = self

    @functools.wraps(accuracy)
    def accuracy_and_router(output, target, *args, **kwargs):
        logits = last.get('logits')
        if logits is not None and logits is not last.get('counted') and target.ndim == 1 \
                and logits.shape[0] == target.shape[0]:
            if last['router'] is not last.get('counted_router'):  # another model's validate() pass: start again
                recorder.eval_router_accuracy = RouterAccuracy()
            last.update(counted=logits, counted_router=last['router'])
            with torch.no_grad():
                recorder.eval_router_accuracy.update(
                    logits, superclass_targets(target, recorder.router_task.class_to_super.to(target.device)))
        return accuracy(output, target, *args, **kwargs)

    timm.task.ClassificationTask, timm.utils.accuracy = Task, accuracy_and_router
    try:
        yield
    finally:
        timm.task.ClassificationTask, timm.utils.accuracy = classification_task, accuracy


def _take_superclass_args(args: Sequence[str]) -> Tuple[List[str], Optional[str], Optional[float]]:
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
    weight = values.get('--router-loss-weight')
    if weight is not None:
        if '--superclasses' not in values:
            raise ValueError('--router-loss-weight needs --superclasses FILE')
        try:
            weight = float(weight)
        except ValueError:
            raise ValueError(f'--router-loss-weight must be a number, got {weight!r}') from None
        if not weight >= 0:
            raise ValueError(f'--router-loss-weight must be >= 0, got {weight}')
    return out, values.get('--superclasses'), weight


def _resolve(argv: Sequence[str]) -> List[str]:
    """[SCRIPT path, ARGS...] with a recipe name given to -c/--config made its path (for a script that has one)."""
    path = resolve_script(argv[0])
    args = list(argv[1:])
    return [path] + (resolve_config_args(args) if _takes_config(path) else args)


def _option(args: Sequence[str], name: str) -> Tuple[bool, Optional[str]]:
    """(whether `name` is among `args` before any `--`, its value in `name V` or `name=V` form: the last one given,
    which is the one argparse keeps)."""
    found = False, None
    for i, arg in enumerate(args):
        if arg == '--':
            break
        if arg == name:
            found = True, args[i + 1] if i + 1 < len(args) else None
        elif arg.startswith(name + '='):
            found = True, arg[len(name) + 1:]
    return found


def _config_values(args: Sequence[str]) -> dict:
    """The YAML mapping of the (last) config file in `args`, already resolved to a path; {} without one."""
    import yaml
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


def _check_inputs(path: str, args: Sequence[str]):
    """Raise where the script would stop at once or read part of its data: a CUDA --device (from its arguments, else
    its config, else its default: cuda for timm's train.py and validate.py) on a machine without CUDA, where timm
    stops in a bare AssertionError; an image folder --data-dir with a folder it cannot list (`check_image_folder`)."""
    import torch

    from .data import check_image_folder
    cfg = _config_values(args) if _takes_config(path) else {}
    given, data_dir, dataset = (_option(args, f'--{k}')[1] for k in ('device', 'data-dir', 'dataset'))
    check_image_folder(data_dir or cfg.get('data_dir'), dataset or cfg.get('dataset') or '')
    declared = _declares(path, _DEVICE_OPTION)
    device = str(given or cfg.get('device') or (declared and declared[1]) or '')
    if declared and device.startswith('cuda') and not torch.cuda.is_available():
        origin = '' if given else f' (device: {device} in the config)' if cfg.get('device') else \
            f" ({os.path.basename(path)}'s default)"
        raise ValueError(f'--device {device}{origin} but CUDA is not available here; add --device cpu')


def auto_precision_args(args: Sequence[str]) -> List[str]:
    """`args` for train.py with the precision made explicit where neither they nor their recipe say anything of
    `amp`: an `--amp-dtype` (or recipe `amp_dtype`) given alone gets the `--amp` train.py needs to use it; a
    `--resume` keeps the precision its checkpoint records; a new run takes `--amp --amp-dtype bfloat16`
    where its device has bfloat16 units (`timm_mlit.precision.run_amp_dtype`; `--device` from the arguments, else
    the recipe, else train.py's default, cuda)."""
    from .model_card import checkpoint_args
    from .precision import PRECISION_ENV, run_amp_dtype
    cfg = _config_values(args)
    args = list(args)
    end = args.index('--') if '--' in args else len(args)  # (before a `--`: after it they would be positional)
    if _option(args, '--amp')[0] or 'amp' in cfg:
        return args
    dtype_given, name = _option(args, '--amp-dtype')
    if dtype_given or 'amp_dtype' in cfg:  # train.py reads the dtype only with --amp: alone it would run float32
        name = name if dtype_given else cfg['amp_dtype']
        print(f'{PROG}: {name} autocast (--amp added to the amp_dtype given)', file=sys.stderr)
        return args[:end] + ['--amp'] + args[end:]
    device = _option(args, '--device')[1] or cfg.get('device') or 'cuda'
    resumed = checkpoint_args(_option(args, '--resume')[1] or cfg.get('resume'))
    try:
        dtype, why = run_amp_dtype(device, resumed=resumed)
    except RuntimeError:
        raise ValueError(f'--device {device!r} is not a device: use cpu, cuda or cuda:N') from None
    if dtype is None:
        if resumed is not None:
            print(f'{PROG}: float32 ({why})', file=sys.stderr)
        return list(args)
    name = str(dtype).split('.')[1]
    print(f'{PROG}: {name} autocast (--amp --amp-dtype {name}): {why}; {PRECISION_ENV}=float32 for float32',
          file=sys.stderr)
    return args[:end] + ['--amp', '--amp-dtype', name] + args[end:]


def main(argv: Optional[Sequence[str]] = None):
    """Run `argv[0]` as `__main__` with `argv[1:]` as its arguments. Its SystemExit (status) passes through."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == '--version':
        from . import __version__
        print(f'{PROG} {__version__}')
        return 0
    if argv[0] == '--list-recipes':
        from .recipes import list_recipes
        print('\n'.join(list_recipes()))
        return 0
    with exit_on_error(PROG, (OSError, ValueError)):  # the launcher's own errors: the script's pass through
        rest, superclasses, weight = _take_superclass_args(argv[1:])
        script_argv = _resolve([argv[0]] + rest)
        _check_inputs(script_argv[0], script_argv[1:])
        if _trains_with_amp(script_argv[0]):  # train.py: the precision for this machine, where nothing sets one
            script_argv = script_argv[:1] + auto_precision_args(script_argv[1:])
        if superclasses is not None:
            from .superclasses import load_superclasses
            if not _declares(script_argv[0], _TRAINING_TASK):  # refused before the script runs, not after
                raise ValueError(f'--superclasses is for train.py: {os.path.basename(script_argv[0])} would have '
                                 f'built no classification task to add the super-class router loss to')
            load_superclasses(superclasses)  # checked before the script starts

    import timm_mlit  # noqa: F401  (registers mlit_s, mlit_xs, mlit_xxs)
    import timm_mlit.data  # noqa: F401  (registers torch/svhn, torch/flowers102, the idx MNIST family)

    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = script_argv
    sys.path.insert(0, os.path.dirname(script_argv[0]))  # as `python SCRIPT` does: the script's folder comes first
    recorder = MoERecorder()
    try:
        with ExitStack() as stack:
            stack.enter_context(_recording_moe(recorder))
            if superclasses is not None:
                from .superclasses import RouterTaskError
                # a model that does not fit the file is a usage error, named in one line
                stack.enter_context(exit_on_error(PROG, (RouterTaskError,)))
                stack.enter_context(_superclass_routing(recorder, superclasses, 0.3 if weight is None else weight))
                recorder.expects_router_task = True
            runpy.run_path(script_argv[0], run_name='__main__')
            recorder.check_router_task()  # (validate.py and the like build none and write no summary)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0

if __name__ == '__main__':
    sys.exit(main())
