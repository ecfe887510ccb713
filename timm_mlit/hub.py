"""Publishing weights of the package's models (mLiT, Mobile V-MoE): `timm-mlit-publish`, a thin layer over timm's
save_for_hf and the Hugging Face Hub.

    timm-mlit-publish CHECKPOINT --model mlit_xxs --output-dir DIR [--tag TAG] [--ema] [--dataset cifar100]
        [--pretrain-dataset NAME] [--base-model ORG/NAME] [--metric top1=74.95 ...] [--label-names FILE]
        [--license apache-2.0] [--no-training-args] [--overwrite]
        [--repo-id ORG/NAME [--private] [--revision BRANCH] [--commit-message MSG]]

CHECKPOINT may be
- our pre-training export: a head-less encoder, safetensors, keys as the MLiT state dict without head.*; its
  metadata records `arch` and the encoder's creation kwargs (`model_kwargs`, JSON);
- a pre-training checkpoint (timm-mlit-pretrain's last.pth.tar: `arch`, `model_kwargs`, the MAE state dict):
  the encoder is kept;
- a whole MAE state dict (mae.py; keys `encoder.*`, `decoder.*`): the encoder is kept;
- a timm train.py checkpoint (torch.save'd dict with 'state_dict', optional 'state_dict_ema', 'arch', 'args', ...):
  `--ema` takes the EMA weights (and fails if there are none);
- a plain state dict, .pth or .safetensors.

The model is rebuilt as the checkpoint was trained (checkpoint.build_model); keys or shapes that do not fit
`--model` (another architecture, another size) are an error, as is a recorded 'arch' naming another model.

DIR receives what the Hub and timm read: `model.safetensors` (no pickle), `config.json` (timm's save_for_hf:
architecture, num_classes, label_names, model_args = the creation kwargs, pretrained_cfg), a `README.md` model card
(timm_mlit/model_card.py) and, when the checkpoint records its training arguments, `training_args.yaml`. The folder
is built in a temporary folder beside DIR, loaded back with timm.create_model('local-dir:...') and checked to give
the same outputs, then renamed into place (files.replace_folder): DIR is whole or absent, a full disk included. An
existing DIR is an error unless --overwrite, which replaces only a folder this tool wrote (these files and nothing
else) or an empty one, never one that is or holds CHECKPOINT. A later publish to DIR clears what a killed one left
beside it (files.recover_interrupted): its unfinished folder, and a previous DIR it had swapped out, put back if DIR
is missing.

`--repo-id` then uploads DIR as it is (HfApi.create_repo + upload_folder). timm's push_to_hf_hub is not used: it
re-serialises the model into a folder of its own (pickle as well as safetensors by default) and keeps a Hub
README that already exists, so what it uploads is not the folder that was built and checked here.

Adding a pretrained tag (the procedure; one cfg entry + one file):
1. Publish: `timm-mlit-publish ckpt.pth.tar --model mlit_xxs --tag mae_ft_cifar100 --dataset cifar100
   --metric top1=74.95 --output-dir out/mlit_xxs.mae_ft_cifar100 --repo-id timm-mlit/mlit_xxs.mae_ft_cifar100`.
   The tag is `<how>_<dataset>`: `mae_in_<data>` a pre-trained encoder, `mae_ft_<data>` MAE + fine-tuned,
   `<data>` trained from scratch. It prints the cfg entry of step 3.
2. Embed (small weights only, they ship in the wheel): publish with `--output-dir
   timm_mlit/weights/mlit_xxs.mae_ft_cifar100` (or move the folder there): the embedded copy is the Hub folder.
3. Add the printed entry to `default_cfgs` in the module it names, e.g. in timm_mlit/mlit.py
   `'mlit_xxs.mae_ft_cifar100': _cfg(**weights_source('mlit_xxs.mae_ft_cifar100'), num_classes=100,
   label_names=LABEL_NAMES['cifar100']),`. weights_source (timm_mlit/_weights.py) gives it the hf_hub_id and, when
   the file of step 2 is there, the `file` that timm loads first. The first entry with weights becomes the arch's
   default tag (`timm.create_model('mlit_xxs', pretrained=True)`); write a tag only for weights that exist.
"""
import argparse
import json
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import timm
import torch
from safetensors import SafetensorError
from timm.models import save_for_hf

from . import __version__, files, model_card
from ._weights import HF_HUB_ORG
from .checkpoint import CheckpointError, build_model, from_pretraining, package_model, read_checkpoint, recorded_args
from .cli import HelpFormatter, exit_on_error, log_to_stderr
from .model_card import PublishError, write_model_card
from .model_stats import model_stats

__all__ = ['PublishError', 'PushError', 'load_checkpoint_state_dict', 'model_from_checkpoint', 'model_stats',
           'write_model_card', 'publish', 'push_folder', 'main']

PROG = 'timm-mlit-publish'
MODEL_FILES = ('model.safetensors', 'config.json', 'README.md')  # every published folder has these
TRAINING_ARGS_FILE = 'training_args.yaml'  # and this one when the checkpoint records its training arguments
PUBLISHED_FILES = MODEL_FILES + (TRAINING_ARGS_FILE,)
_TAG_RE = re.compile(r'^[a-z0-9][a-z0-9_]*$')


class PushError(RuntimeError):
    """The Hub (network, token, permissions) refused an upload; a RuntimeError: what was given was right."""


# ------------------------------------------------------------------------------------------- reading a checkpoint

def load_checkpoint_state_dict(path: Path, use_ema: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """`checkpoint.read_checkpoint` (the state dict and what the checkpoint records beside it), its errors as a
    PublishError that names --ema when that option asked for what is not there."""
    try:
        return read_checkpoint(path, use_ema=use_ema)
    except (CheckpointError, FileNotFoundError) as e:
        msg = str(e)
        raise PublishError(f'--ema: {msg}' if use_ema and 'EMA' in msg else msg) from e


def _load_model(path: Path, model_name: str, use_ema: bool = False) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    if not package_model(model_name):
        ours = ', '.join(m for m in timm.list_models() if package_model(m))
        raise PublishError(f'--model {model_name!r} is not an mLiT model nor another model of timm-mlit ({ours})')
    state_dict, meta = load_checkpoint_state_dict(path, use_ema=use_ema)
    try:
        model, kwargs = build_model(model_name, state_dict, meta, str(path))
    except CheckpointError as e:
        raise PublishError(str(e)) from e
    setattr(model, 'publish_model_args', kwargs)  # (an nn.Module attribute is typed a Tensor or a Module)
    return model, meta


def model_from_checkpoint(path: Path, model_name: str, use_ema: bool = False) -> torch.nn.Module:
    """Build `model_name` as the checkpoint was trained and load it, strictly; eval mode. The kwargs it was built
    with are in `model.publish_model_args`."""
    return _load_model(path, model_name, use_ema=use_ema)[0]


# ---------------------------------------------------------------------------------------------- the output folder

def _not_published_because(folder: Path) -> str:
    """Why `folder` is not one this tool wrote (or an empty one); '' if it is."""
    if folder.is_symlink():
        return 'it is a symbolic link'
    if not folder.is_dir():
        return 'it is a file'
    names = set()
    foreign = []
    for p in folder.iterdir():
        if p.name in PUBLISHED_FILES and p.is_file() and not p.is_symlink():
            names.add(p.name)
        else:
            foreign.append(p.name)
    if foreign:
        return f'it holds {", ".join(sorted(foreign)[:3])}{", ..." if len(foreign) > 3 else ""}'
    missing = [n for n in MODEL_FILES if n not in names]
    if names and missing:
        return f'it has no {", ".join(missing)}'
    return ''


def _check_output(output_dir: Path, checkpoint: Path, overwrite: bool):
    target, source = output_dir.resolve(), Path(checkpoint).resolve()
    if source == target or target in source.parents:
        raise PublishError(f'--output-dir {output_dir} is or holds the checkpoint {checkpoint}: publishing there '
                           'would replace it; choose another folder')
    if not os.path.lexists(output_dir):
        return
    if not overwrite:
        raise PublishError(f'output folder {output_dir} exists; pass --overwrite to replace it')
    problem = _not_published_because(output_dir)
    if problem:
        raise PublishError(
            f'--overwrite: {output_dir} is not a folder timm-mlit-publish wrote ({problem}); --overwrite replaces only '
            f'such a folder ({", ".join(MODEL_FILES)}, optionally {TRAINING_ARGS_FILE}) or an empty one: remove it '
            'yourself or choose another --output-dir')


def _outputs_match(model: torch.nn.Module, folder: Path) -> bool:
    """Does timm, loading `folder`, give the model's outputs exactly?"""
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    x = torch.rand(1, *model_card.input_size(model), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(model(x), reloaded(x))


def _check_arguments(tag: str, dataset: str, metrics: Optional[Dict[str, float]], base_model: str) -> str:
    """Refuse what would make a wrong folder before any work; returns `base_model` as a plain repository id."""
    if tag and not _TAG_RE.match(tag):
        raise PublishError(f'--tag {tag!r}: use lower-case letters, digits and _, e.g. mae_ft_cifar100')
    if metrics and not dataset:
        raise PublishError('--metric needs --dataset: the dataset the metric was measured on')
    return model_card.hub_repo_id(base_model, '--base-model') if base_model else ''


def _architecture(model: torch.nn.Module) -> str:
    """The architecture name in the pretrained cfg timm gives every model it creates."""
    cfg: Dict[str, Any] = getattr(model, 'pretrained_cfg')
    return cfg['architecture']


@contextmanager
def _safetensors_os_errors():
    """A SafetensorError that names an OS error (a full disk) in its text, raised as that OSError."""
    try:
        yield
    except SafetensorError as e:
        os_error = re.search(r'os error (\d+)', str(e))
        if not os_error:
            raise
        raise OSError(int(os_error[1]), os.strerror(int(os_error[1]))) from e


def _write_folder(folder: Path, model: torch.nn.Module, model_config: Dict[str, Any], args: Dict[str, Any],
                  card: Dict[str, Any]):
    """Fill the empty `folder` with what the Hub and timm read, readable by all, and check it loads back."""
    model_args: Dict[str, Any] = getattr(model, 'publish_model_args')  # (set by _load_model)
    try:
        # model_args given explicitly: timm < 1.0.31 does not record a model's creation kwargs by itself
        save_for_hf(model, str(folder), model_config=model_config, model_args=model_args, safe_serialization=True)
    except ValueError as e:  # a recorded kwarg JSON cannot hold
        raise PublishError(f'cannot write config.json for {_architecture(model)} with {model_args}: {e}') from e
    if args:
        model_card.write_training_args(folder / TRAINING_ARGS_FILE, args)
    write_model_card(folder / 'README.md', model, **card)
    names = sorted(p.name for p in folder.iterdir())
    if names != sorted(MODEL_FILES + ((TRAINING_ARGS_FILE,) if args else ())):
        raise PublishError(f'unexpected files in {folder}: {names}')
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)  # mkdtemp (and safetensors) make private files: publish readable ones
    for p in folder.iterdir():
        os.chmod(p, 0o666 & ~umask)
    if not _outputs_match(model, folder):
        raise PublishError(f'{folder} does not load back to the same outputs; nothing was written')


def publish(
        checkpoint: Path,
        model_name: str,
        output_dir: Path,
        tag: str = '',
        use_ema: bool = False,
        overwrite: bool = False,
        dataset: str = '',
        pretrain_dataset: str = '',
        metrics: Optional[Dict[str, float]] = None,
        label_names: Optional[Sequence[str]] = None,
        license: str = 'apache-2.0',
        repo_id: str = '',
        description: str = '',
        base_model: str = '',
        training_args: bool = True,
        commands: Sequence[str] = (),
) -> Path:
    """Write the Hub folder for `checkpoint` to `output_dir`, atomically (see the module docstring).

    Args:
        base_model: the Hub repository (ORG/NAME) the checkpoint was fine-tuned from, for the card's metadata.
        training_args: write the training arguments the checkpoint records to `training_args.yaml`.
        commands: the shell commands that made and measured the weights, for the card's "Training" section.

    Returns:
        `output_dir`.
    """
    output_dir = Path(output_dir).absolute()
    base_model = _check_arguments(tag, dataset, metrics, base_model)
    files.recover_interrupted(output_dir)  # first, so that the check sees a folder a killed publish had moved aside
    _check_output(output_dir, checkpoint, overwrite)  # before the model is loaded: a wrong folder fails at once
    model, meta = _load_model(checkpoint, model_name, use_ema=use_ema)
    config = model_card.model_config(model, tag, dataset, label_names)
    arch = _architecture(model)
    title = f'{arch}.{tag}' if tag else arch
    args = recorded_args(meta.get('args')) if training_args else {}
    card = dict(
        model_id=f'hf-hub:{repo_id or f"{HF_HUB_ORG}/{title}"}', title=title, license=license, dataset=dataset,
        pretrain_dataset=pretrain_dataset, metrics=metrics, description=description, base_model=base_model,
        mae_pretrained=from_pretraining(meta) or tag.startswith('mae_'),
        training_args_file=TRAINING_ARGS_FILE if args else '', has_label_names='label_names' in config,
        commands=list(commands))

    def build(folder: Path):
        with _safetensors_os_errors():
            _write_folder(folder, model, config, args, card)

    return files.replace_folder(build, output_dir, overwrite,
                                check_existing=lambda folder: _check_output(folder, checkpoint, overwrite))


# ------------------------------------------------------------------------------------------------------- the Hub

def push_folder(
        folder: Path,
        repo_id: str,
        private: bool = False,
        revision: Optional[str] = None,
        commit_message: str = 'Add mLiT weights',
        token: Optional[str] = None,
):
    """Upload a folder made by `publish` to the Hub repository `repo_id` (created if needed); PushError where the
    Hub refuses (no network, a bad token, no permission)."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    try:
        api = HfApi(token=token, library_name='timm', library_version=timm.__version__)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), revision=revision, commit_message=commit_message)
    except Exception as e:
        raise PushError(
            f'could not push {folder} to the Hugging Face Hub repository {repo_id!r}: '
            f'{type(e).__name__}: {str(e).rstrip(". ")}. '
            f'The folder is complete; push it again with `hf upload {repo_id} {folder}`') from e


# -------------------------------------------------------------------------------------------------- command line

def _parse_metric(text: str) -> Tuple[str, float]:
    name, sep, value = text.partition('=')
    try:
        if not sep or not name:
            raise ValueError
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected NAME=VALUE, e.g. top1=74.95, got {text!r}') from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=HelpFormatter,
        description='Turn a checkpoint of a timm-mlit model (mLiT, Mobile V-MoE) into a Hugging Face Hub / timm\n'
                    "model folder: model.safetensors, timm's config.json, a model card and the recorded training "
                    'arguments.')
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    parser.add_argument('checkpoint', type=Path,
                        help='encoder .safetensors, pre-training or train.py checkpoint, or a state dict')
    parser.add_argument('--model', required=True, help='architecture: mlit_xxs, mobile_vmoe_vit_xxs_patch3_36, ...')
    parser.add_argument('--output-dir', required=True, type=Path,
                        help='folder to write; must not exist unless --overwrite')
    parser.add_argument('--tag', default='',
                        help='pretrained tag, e.g. mae_ft_cifar100 or mae_in_cifar100; none: the arch name alone')
    parser.add_argument('--ema', action='store_true', help="publish a train.py checkpoint's EMA weights")
    parser.add_argument('--overwrite', action='store_true',
                        help='replace an existing output folder, if timm-mlit-publish wrote it (or it is empty)')
    parser.add_argument('--dataset', default='',
                        help='dataset trained/evaluated on (card metadata; label names for cifar10/100, ...)')
    parser.add_argument('--pretrain-dataset', default='', help='dataset of the MAE pre-training (card metadata)')
    parser.add_argument('--base-model', default='', metavar='ORG/NAME',
                        help="the Hub repository fine-tuned from, e.g. timm-mlit/mlit_xxs.mae_in_fashion_mnist "
                             "(card metadata base_model)")
    parser.add_argument('--metric', action='append', type=_parse_metric, default=[], metavar='NAME=VALUE',
                        help='a measured metric for the model card, e.g. top1=74.95; repeatable; needs --dataset')
    parser.add_argument('--label-names', type=Path, metavar='FILE',
                        help="class names: a .json list or one name a line; default: the --dataset's, if known")
    parser.add_argument('--license', default='apache-2.0', help='license of the weights (card metadata)')
    parser.add_argument('--description', default='', help='a paragraph for the model card')
    parser.add_argument('--commands', type=Path, metavar='FILE',
                        help='a shell script of the commands that made and measured the weights, one a line, '
                             '# comments allowed: the model card shows it')
    parser.add_argument('--no-training-args', dest='training_args', action='store_false',
                        help=f'do not publish the training arguments the checkpoint records ({TRAINING_ARGS_FILE}; '
                             'they name local paths such as data_dir)')
    parser.add_argument('--repo-id', default='', metavar='ORG/NAME',
                        help='then push the folder to this Hub repository')
    parser.add_argument('--private', action='store_true', help='create the Hub repository private')
    parser.add_argument('--revision', default=None, help='Hub branch to push to (created if needed); default: main')
    parser.add_argument('--commit-message', default='Add mLiT weights', help='message of the Hub commit')
    return parser


def _publish_and_push(args: argparse.Namespace):
    """The command: publish, say what was written and the cfg entry to add, then push if asked."""
    label_names = model_card.read_label_names(args.label_names) if args.label_names else None
    commands = model_card.read_commands(args.commands) if args.commands else ()
    folder = publish(
        args.checkpoint, args.model, args.output_dir, tag=args.tag, use_ema=args.ema, overwrite=args.overwrite,
        dataset=args.dataset, pretrain_dataset=args.pretrain_dataset, metrics=dict(args.metric),
        label_names=label_names, license=args.license, repo_id=args.repo_id, description=args.description,
        base_model=args.base_model, training_args=args.training_args, commands=commands)
    num_classes = json.loads((folder / 'config.json').read_text())['num_classes']
    print(f'wrote {folder}: {", ".join(sorted(p.name for p in folder.iterdir()))}')
    print(model_card.cfg_entry(args.model, args.tag, num_classes, args.dataset))
    if args.repo_id:
        push_folder(folder, args.repo_id, private=args.private, revision=args.revision,
                    commit_message=args.commit_message)
        print(f'pushed {folder} to https://huggingface.co/{args.repo_id}')


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`timm-mlit-publish`: 0 once done; an error ends it as `timm-mlit-publish: error: ...`, status 1."""
    args = _parser().parse_args(argv)
    log_to_stderr(PROG, logging.getLogger(files.__name__))  # leftovers of a killed publish restored or removed
    with exit_on_error(PROG, (ValueError, OSError, PushError)):
        _publish_and_push(args)
    return 0


if __name__ == '__main__':
    main()
