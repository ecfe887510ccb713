"""Publishing mLiT weights: `timm-mlit-publish`, a thin layer over timm's save_for_hf and the Hugging Face Hub.

    timm-mlit-publish CHECKPOINT --model mlit_xxs --output-dir DIR [--tag TAG] [--ema] [--dataset cifar100]
        [--pretrain-dataset NAME] [--metric top1=74.95 ...] [--label-names FILE] [--license apache-2.0] [--overwrite]
        [--repo-id ORG/NAME [--private] [--revision BRANCH] [--commit-message MSG]]

CHECKPOINT may be
- our pre-training export: a head-less encoder, safetensors, keys as the MLiT state dict without head.*;
- a whole MAE state dict (mae.py; keys `encoder.*`, `decoder.*`): the encoder is kept;
- a timm train.py checkpoint (torch.save'd dict with 'state_dict', optional 'state_dict_ema', 'arch', 'args', ...):
  `--ema` takes the EMA weights (and fails if there are none);
- a plain state dict, .pth or .safetensors.

The checkpoint says what it is: the head's rows give num_classes (0 for a head-less encoder), the patch projection
the input channels, the positional embedding the image size. Keys or shapes that do not fit `--model` (another
architecture, another size) are an error, as is a train.py 'arch' naming another model.

DIR receives what the Hub and timm read: `model.safetensors` (no pickle), `config.json` (timm's format, written by
timm's save_for_hf: architecture, num_classes, label_names, model_args, pretrained_cfg) and a `README.md` model card
(metadata: library_name timm, license, tags, datasets, the measured metrics as model-index; a usage snippet). The
folder is built in a temporary folder beside DIR, loaded back with timm.create_model('local-dir:...') and checked
to give the same outputs, then renamed into place: DIR is whole or absent. An existing DIR is an error unless
--overwrite.

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
3. Add the printed entry to `default_cfgs` in timm_mlit/mlit.py, e.g.
   `'mlit_xxs.mae_ft_cifar100': _cfg(**weights_source('mlit_xxs.mae_ft_cifar100'), num_classes=100,
   label_names=LABEL_NAMES['cifar100']),`. weights_source (timm_mlit/_weights.py) gives it the hf_hub_id and, when
   the file of step 2 is there, the `file` that timm loads first. The first entry with weights becomes the arch's
   default tag (`timm.create_model('mlit_xxs', pretrained=True)`); write a tag only for weights that exist.
"""
import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import safetensors.torch
import timm
import torch
from timm.models import is_model, save_for_hf, split_model_name_tag

from ._weights import HF_HUB_ORG, LABEL_NAMES
from .mlit import encoder_state_dict

__all__ = ['PublishError', 'load_checkpoint_state_dict', 'model_from_checkpoint', 'write_model_card', 'publish',
           'push_folder', 'main']

MODEL_FILES = ('model.safetensors', 'config.json', 'README.md')
_TAG_RE = re.compile(r'^[a-z0-9][a-z0-9_]*$')


class PublishError(RuntimeError):
    """A checkpoint, an argument or the Hub said no; the message says which and why."""


def load_checkpoint_state_dict(path: Path, use_ema: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read the weights of any checkpoint we publish from (see the module docstring).

    Returns:
        The state dict (wrapper prefixes removed, an MAE reduced to its encoder) and the train.py metadata
        ('arch', 'epoch', ...; empty for a bare state dict).
    """
    path = Path(path)
    if not path.is_file():
        raise PublishError(f'checkpoint {path} does not exist')
    try:
        if path.suffix == '.safetensors':
            checkpoint = safetensors.torch.load_file(str(path), device='cpu')
        else:
            # train.py stores its args as an argparse.Namespace: allow that one class, nothing else unpickles
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise PublishError(f'cannot read checkpoint {path}: it is corrupt or not a checkpoint ({e})') from e
    if not isinstance(checkpoint, dict):
        raise PublishError(f'checkpoint {path} holds a {type(checkpoint).__name__}, not a state dict')

    meta = {}
    if 'state_dict' in checkpoint or 'state_dict_ema' in checkpoint or 'model' in checkpoint:
        meta = {k: v for k, v in checkpoint.items() if k not in ('state_dict', 'state_dict_ema', 'model', 'optimizer')}
        if use_ema:
            if checkpoint.get('state_dict_ema') is None:
                raise PublishError(f'--ema: checkpoint {path} has no EMA weights (no state_dict_ema)')
            state_dict = checkpoint['state_dict_ema']
        else:
            state_dict = checkpoint.get('state_dict', checkpoint.get('model'))
    elif use_ema:
        raise PublishError(f'--ema: checkpoint {path} is a bare state dict, it has no EMA weights')
    else:
        state_dict = checkpoint
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise PublishError(f'checkpoint {path} does not hold a state dict of tensors')
    return encoder_state_dict(state_dict), meta  # DDP / compile prefixes removed; a whole MAE: its encoder


def _model_kwargs_from_state_dict(state_dict: Dict[str, torch.Tensor], source: str) -> Dict[str, Any]:
    """num_classes, in_chans and img_size as the weights were trained."""
    proj, pos_embed = state_dict.get('patch_embed.proj.weight'), state_dict.get('pos_embed')
    if proj is None or pos_embed is None or proj.ndim != 4 or pos_embed.ndim != 3:
        raise PublishError(f'{source} is not an mLiT checkpoint: no patch_embed.proj.weight / pos_embed')
    grid = math.isqrt(pos_embed.shape[1] - 1)  # one dummy token, then a square grid of patches
    if grid * grid != pos_embed.shape[1] - 1:
        raise PublishError(f'{source}: pos_embed of {pos_embed.shape[1]} tokens is not 1 + a square patch grid')
    head = state_dict.get('head.weight')
    return dict(
        num_classes=0 if head is None else head.shape[0],
        in_chans=proj.shape[1],
        img_size=grid * proj.shape[-1],
    )


def _model_kwargs_from_train_args(args: Any) -> Dict[str, Any]:
    """Model kwargs recorded in a timm train.py checkpoint's args: --model-kwargs and --gp (global pool)."""
    if args is None:
        return {}
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    kwargs = dict(args.get('model_kwargs') or {})
    if args.get('gp'):
        kwargs['global_pool'] = args['gp']
    return kwargs


def model_from_checkpoint(path: Path, model_name: str, use_ema: bool = False) -> torch.nn.Module:
    """Build `model_name` as the checkpoint was trained and load it, strictly; eval mode. The kwargs it was built
    with are in `model.publish_model_args`."""
    arch = split_model_name_tag(model_name)[0]
    if not arch.startswith('mlit_') or not is_model(arch):
        raise PublishError(f'--model {model_name!r} is not an mLiT model (mlit_s, mlit_xs, mlit_xxs)')
    state_dict, meta = load_checkpoint_state_dict(path, use_ema=use_ema)
    ckpt_arch = meta.get('arch')
    if ckpt_arch and split_model_name_tag(str(ckpt_arch))[0] != arch:
        raise PublishError(f'checkpoint {path} was trained as {ckpt_arch!r}, not {arch!r}')
    kwargs = _model_kwargs_from_state_dict(state_dict, str(path))
    # what the weights cannot tell (pooling, expert counts, sharing, gating) comes from train.py's args
    kwargs.update(_model_kwargs_from_train_args(meta.get('args')))
    try:
        model = timm.create_model(arch, **kwargs)
    except (TypeError, ValueError) as e:
        raise PublishError(f'cannot build {arch} with {kwargs} (from checkpoint {path}): {e}') from e

    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        problems = []
        for what, keys in (('missing', missing), ('unexpected', unexpected)):
            if keys:
                problems.append(f'{len(keys)} {what} keys ({", ".join(keys[:3])}{", ..." if len(keys) > 3 else ""})')
        if wrong:
            k = wrong[0]
            problems.append(f'{len(wrong)} shape mismatches (e.g. {k}: checkpoint {tuple(state_dict[k].shape)}, '
                            f'{arch} {tuple(expected[k].shape)})')
        raise PublishError(
            f'checkpoint {path} does not fit {arch} (a checkpoint of another architecture or size?): '
            + '; '.join(problems))
    model.load_state_dict(state_dict, strict=True)
    model.publish_model_args = kwargs
    return model.eval()


def _read_label_names(path: Path) -> List[str]:
    """Label names from a JSON list or a text file with one name a line."""
    text = Path(path).read_text(encoding='utf-8')
    if Path(path).suffix == '.json':
        names = json.loads(text)
        if not isinstance(names, list):
            raise PublishError(f'--label-names {path}: expected a JSON list of names')
        return [str(n) for n in names]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _usage_snippet(model_id: str) -> str:
    return (
        "```python\n"
        "import timm\n"
        "import torch\n"
        "import timm_mlit  # noqa: F401  (pip install timm-mlit) registers the mLiT models with timm\n"
        "\n"
        f"model = timm.create_model('{model_id}', pretrained=True).eval()\n"
        "data_config = timm.data.resolve_data_config({}, model=model)  # 36x36, mean = std = 0.5\n"
        "transform = timm.data.create_transform(**data_config)  # for PIL images\n"
        "with torch.no_grad():\n"
        "    output = model(torch.rand(1, *data_config['input_size']))  # or transform(img).unsqueeze(0)\n"
        "```\n"
    )


def write_model_card(
        path: Path,
        model: torch.nn.Module,
        model_id: str,
        title: str,
        license: str = 'apache-2.0',
        datasets: Sequence[str] = (),
        metrics: Optional[Dict[str, float]] = None,
        metrics_dataset: str = '',
        description: str = '',
):
    """README.md with the Hub's metadata (huggingface_hub.ModelCardData) and a usage snippet for `model_id`."""
    from huggingface_hub import EvalResult, ModelCardData

    classifier = model.num_classes > 0
    task = 'image-classification' if classifier else 'image-feature-extraction'
    eval_results = None
    if metrics:
        if not metrics_dataset:
            raise PublishError('--metric needs --dataset: the dataset the metric was measured on')
        eval_results = [
            EvalResult(
                task_type=task, dataset_type=metrics_dataset, dataset_name=metrics_dataset,
                metric_type='accuracy' if name in ('top1', 'acc', 'accuracy') else name,
                metric_name=name, metric_value=value)
            for name, value in metrics.items()]
    card_data = ModelCardData(
        library_name='timm', license=license, pipeline_tag=task, model_name=title,
        tags=[task, 'timm', 'timm-mlit', 'mlit', 'vision-transformer', 'mixture-of-experts'],
        datasets=list(datasets) or None, eval_results=eval_results,
    )
    n_params = sum(p.numel() for p in model.parameters())
    details = [
        f'- **Architecture:** {model.pretrained_cfg["architecture"]}, '
        f'{"a classifier of " + str(model.num_classes) + " classes" if classifier else "an encoder without head"}',
        f'- **Params (M):** {n_params / 1e6:.2f}',
        f'- **Image size:** {model.img_size[0]}x{model.img_size[1]}, {model.in_chans} channels',
        '- **Paper:** How Lightweight Can A Vision Transformer Be, https://arxiv.org/abs/2407.17783',
        '- **Code:** timm-mlit (`pip install timm-mlit`), a timm plugin: import timm_mlit before creating the model',
    ]
    if metrics:
        details.append(f'- **Metrics ({metrics_dataset}):** ' + ', '.join(f'{k} {v}' for k, v in metrics.items()))
    body = (
        f'# Model card for {title}\n\n'
        + (f'{description}\n\n' if description else '')
        + 'An mLiT (arXiv 2407.17783): a tiny vision transformer with Mixture-of-Experts feed-forward layers.\n\n'
        + '## Model Details\n' + '\n'.join(details) + '\n\n'
        + '## Model Usage\n' + _usage_snippet(model_id)
        + '\n## Citation\n```bibtex\n@article{tan2024mlit,\n  title={How Lightweight Can A Vision Transformer Be},\n'
        + '  author={Tan, Jen Hong},\n  journal={arXiv preprint arXiv:2407.17783},\n  year={2024}\n}\n```\n'
    )
    Path(path).write_text(f'---\n{card_data.to_yaml()}\n---\n{body}', encoding='utf-8')


def _outputs_match(model: torch.nn.Module, folder: Path) -> bool:
    """Does timm, loading `folder`, give the model's outputs exactly?"""
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    x = torch.rand(1, model.in_chans, *model.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(model(x), reloaded(x))


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
) -> Path:
    """Write the Hub folder for `checkpoint` to `output_dir`, atomically (see the module docstring).

    Returns:
        `output_dir`.
    """
    output_dir = Path(output_dir).absolute()
    if output_dir.exists() and not overwrite:
        raise PublishError(f'output folder {output_dir} exists; pass --overwrite to replace it')
    if tag and not _TAG_RE.match(tag):
        raise PublishError(f'--tag {tag!r}: use lower-case letters, digits and _, e.g. mae_ft_cifar100')
    model = model_from_checkpoint(checkpoint, model_name, use_ema=use_ema)
    arch = model.pretrained_cfg['architecture']

    # the tag and the input size go into the model's own pretrained_cfg: timm < 1.0.31 replaces a
    # model_config['pretrained_cfg'] wholesale instead of merging it, and does not read the size off the model
    model.pretrained_cfg = dict(model.pretrained_cfg, tag=tag or None, input_size=(model.in_chans, *model.img_size))
    model_config: Dict[str, Any] = {}
    if label_names is None and dataset in LABEL_NAMES and len(LABEL_NAMES[dataset]) == model.num_classes:
        label_names = LABEL_NAMES[dataset]
    if label_names is not None:
        if len(label_names) != model.num_classes:
            raise PublishError(f'{len(label_names)} label names for a head of {model.num_classes} classes')
        model_config['label_names'] = list(label_names)
    title = f'{arch}.{tag}' if tag else arch
    model_id = f'hf-hub:{repo_id or f"{HF_HUB_ORG}/{title}"}'

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{output_dir.name}.', suffix='.tmp', dir=output_dir.parent))
    try:
        # model_args given explicitly: timm < 1.0.31 does not record a model's creation kwargs by itself
        save_for_hf(model, tmp, model_config=model_config, model_args=model.publish_model_args,
                    safe_serialization=True)
        write_model_card(
            tmp / 'README.md', model, model_id, title, license=license,
            datasets=list(dict.fromkeys(d for d in (dataset, pretrain_dataset) if d)), metrics=metrics,
            metrics_dataset=dataset, description=description)
        if sorted(p.name for p in tmp.iterdir()) != sorted(MODEL_FILES):
            raise PublishError(f'unexpected files in {tmp}: {sorted(p.name for p in tmp.iterdir())}')
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp (and safetensors) make private files: publish readable ones
        for p in tmp.iterdir():
            os.chmod(p, 0o666 & ~umask)
        if not _outputs_match(model, tmp):
            raise PublishError(f'{tmp} does not load back to the same outputs; nothing was written')
        if output_dir.exists():  # --overwrite: move the old folder aside, then swap
            old = Path(tempfile.mkdtemp(prefix=f'.{output_dir.name}.', suffix='.old', dir=output_dir.parent))
            os.replace(output_dir, old / output_dir.name)
            os.replace(tmp, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def push_folder(
        folder: Path,
        repo_id: str,
        private: bool = False,
        revision: Optional[str] = None,
        commit_message: str = 'Add mLiT weights',
        token: Optional[str] = None,
):
    """Upload a folder made by `publish` to the Hub repository `repo_id` (created if needed)."""
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
        raise PublishError(
            f'could not push {folder} to the Hugging Face Hub repository {repo_id!r}: '
            f'{type(e).__name__}: {str(e).rstrip(". ")}. '
            f'The folder is complete; push it again with `hf upload {repo_id} {folder}`') from e


def _cfg_entry(model: str, tag: str, num_classes: int, dataset: str) -> str:
    name = f'{split_model_name_tag(model)[0]}.{tag or "<tag>"}'
    labels = f", label_names=LABEL_NAMES['{dataset}']" if dataset in LABEL_NAMES else ''
    return f"'{name}': _cfg(**weights_source('{name}'), num_classes={num_classes}{labels}),"


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
        prog='timm-mlit-publish', description='Turn an mLiT checkpoint into a Hugging Face Hub / timm model folder.')
    parser.add_argument('checkpoint', type=Path, help='encoder .safetensors, train.py checkpoint or state dict')
    parser.add_argument('--model', required=True, help='architecture: mlit_s, mlit_xs or mlit_xxs')
    parser.add_argument('--output-dir', required=True, type=Path, help='folder to write (must not exist)')
    parser.add_argument('--tag', default='', help='pretrained tag, e.g. mae_ft_cifar100 or mae_in_cifar100')
    parser.add_argument('--ema', action='store_true', help="publish a train.py checkpoint's EMA weights")
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output folder')
    parser.add_argument('--dataset', default='', help='dataset trained/evaluated on (metadata, label names)')
    parser.add_argument('--pretrain-dataset', default='', help='dataset of the MAE pre-training (metadata)')
    parser.add_argument('--metric', action='append', type=_parse_metric, default=[], metavar='NAME=VALUE',
                        help='a measured metric for the model card, e.g. top1=74.95; repeatable')
    parser.add_argument('--label-names', type=Path, help='class names: a JSON list or one name a line')
    parser.add_argument('--license', default='apache-2.0')
    parser.add_argument('--description', default='', help='a paragraph for the model card')
    parser.add_argument('--repo-id', default='', help='then push the folder to this Hub repository')
    parser.add_argument('--private', action='store_true', help='create the Hub repository private')
    parser.add_argument('--revision', default=None, help='Hub branch to push to (created if needed)')
    parser.add_argument('--commit-message', default='Add mLiT weights')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        label_names = _read_label_names(args.label_names) if args.label_names else None
        folder = publish(
            args.checkpoint, args.model, args.output_dir, tag=args.tag, use_ema=args.ema, overwrite=args.overwrite,
            dataset=args.dataset, pretrain_dataset=args.pretrain_dataset, metrics=dict(args.metric),
            label_names=label_names, license=args.license, repo_id=args.repo_id, description=args.description)
        num_classes = json.loads((folder / 'config.json').read_text())['num_classes']
        print(f'wrote {folder}: {", ".join(MODEL_FILES)}')
        entry = _cfg_entry(args.model, args.tag, num_classes, args.dataset)
        print(f'pretrained cfg entry for timm_mlit/mlit.py: {entry}')
        if args.repo_id:
            push_folder(folder, args.repo_id, private=args.private, revision=args.revision,
                        commit_message=args.commit_message)
            print(f'pushed {folder} to https://huggingface.co/{args.repo_id}')
    except (PublishError, OSError) as e:
        print(f'timm-mlit-publish: error: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
