"""Publishing mLiT weights: `timm-mlit-publish`, a thin layer over timm's save_for_hf and the Hugging Face Hub.

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

The checkpoint says what it is: the head's rows give num_classes (0 for a head-less encoder), the patch projection
the input channels, the positional embedding the image size; what the weights cannot tell (pooling, routing top-k,
depth, expert counts, ...) comes from the kwargs the checkpoint recorded (`model_kwargs`, train.py's
--model-kwargs and --gp). Keys or shapes that do not fit `--model` (another architecture, another size) are an
error, as is a recorded 'arch' naming another model.

DIR receives what the Hub and timm read: `model.safetensors` (no pickle), `config.json` (timm's format, written by
timm's save_for_hf: architecture, num_classes, label_names, model_args = the creation kwargs, pretrained_cfg), a
`README.md` model card in the layout of timm's own (metadata: library_name timm, license, tags, datasets,
base_model, the measured metrics as model-index; Model Details with measured params / GMACs / activations; usage
snippets) and, when the checkpoint records its training arguments, `training_args.yaml`. The folder is built in a
temporary folder beside DIR, loaded back with timm.create_model('local-dir:...') and checked to give the same
outputs, then renamed into place: DIR is whole or absent. An existing DIR is an error unless --overwrite, and
--overwrite replaces only a folder this tool wrote (these files and nothing else) or an empty one, never one that
is or holds CHECKPOINT. The temporary folders are named `.<DIR name>.<host>.<pid>.<random>.tmp` (`.old` for the
previous DIR while it is swapped out); a later publish to DIR removes those of processes that are gone and, if DIR
is missing, puts a swapped-out previous DIR back.

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
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import safetensors
import safetensors.torch
import timm
import torch
import yaml
from timm.models import is_model, save_for_hf, split_model_name_tag
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from . import __version__
from ._weights import HF_HUB_ORG, LABEL_NAMES
from .files import process_alive
from .layers import MoE
from .mlit import encoder_state_dict

__all__ = ['PublishError', 'load_checkpoint_state_dict', 'model_from_checkpoint', 'model_stats', 'write_model_card',
           'publish', 'push_folder', 'main']

_logger = logging.getLogger(__name__)

MODEL_FILES = ('model.safetensors', 'config.json', 'README.md')  # every published folder has these
TRAINING_ARGS_FILE = 'training_args.yaml'  # and this one when the checkpoint records its training arguments
PUBLISHED_FILES = MODEL_FILES + (TRAINING_ARGS_FILE,)
_TAG_RE = re.compile(r'^[a-z0-9][a-z0-9_]*$')
_REPO_ID_RE = re.compile(r'^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$')
_PRETRAIN_FORMAT = 'timm-mlit-pretrain/'
_MLIT_PAPER = ('How Lightweight Can A Vision Transformer Be', 'https://arxiv.org/abs/2407.17783')
_MAE_PAPER = ('Masked Autoencoders Are Scalable Vision Learners', 'https://arxiv.org/abs/2111.06377')
_CITATIONS = {
    _MLIT_PAPER: '@article{tan2024mlit,\n  title={How Lightweight Can A Vision Transformer Be},\n'
                 '  author={Tan, Jen Hong},\n  journal={arXiv preprint arXiv:2407.17783},\n  year={2024}\n}',
    _MAE_PAPER: '@inproceedings{he2022masked,\n  title={Masked Autoencoders Are Scalable Vision Learners},\n'
                '  author={He, Kaiming and Chen, Xinlei and Xie, Saining and Li, Yanghao and Doll{\\\'a}r, Piotr '
                'and Girshick, Ross},\n  booktitle={CVPR},\n  year={2022}\n}',
}


class PublishError(RuntimeError):
    """A checkpoint, an argument or the Hub said no; the message says which and why."""


# ------------------------------------------------------------------------------------------- reading a checkpoint

def _read_safetensors(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Tensors and metadata; the metadata's `model_kwargs` (JSON, as pretrain.export_encoder writes it) parsed."""
    state_dict = safetensors.torch.load_file(str(path), device='cpu')
    with safetensors.safe_open(str(path), framework='pt') as f:
        meta = dict(f.metadata() or {})
    if meta.get('model_kwargs'):
        try:
            meta['model_kwargs'] = json.loads(meta['model_kwargs'])
        except json.JSONDecodeError as e:
            raise PublishError(f'checkpoint {path}: its metadata model_kwargs is not JSON ({e})') from e
    else:
        meta.pop('model_kwargs', None)
    if not meta.get('arch'):
        meta.pop('arch', None)
    return state_dict, meta


def load_checkpoint_state_dict(path: Path, use_ema: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read the weights of any checkpoint we publish from (see the module docstring).

    Returns:
        The state dict (wrapper prefixes removed, an MAE reduced to its encoder) and what the checkpoint records
        beside it ('arch', 'model_kwargs', 'args', 'epoch', ...; a safetensors file's metadata; empty for a bare
        state dict).
    """
    path = Path(path)
    if not path.is_file():
        raise PublishError(f'checkpoint {path} does not exist')
    try:
        if path.suffix == '.safetensors':
            state_dict, meta = _read_safetensors(path)
            return encoder_state_dict(state_dict), meta
        # train.py stores its args as an argparse.Namespace: allow that one class, nothing else unpickles
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except PublishError:
        raise
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


def _args_dict(args: Any) -> Dict[str, Any]:
    """A checkpoint's recorded arguments (train.py's Namespace, the pre-training's dict) as a dict."""
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, dict) else {}


def _model_kwargs_from_train_args(args: Any) -> Dict[str, Any]:
    """Model kwargs recorded in a checkpoint's args: --model-kwargs and train.py's --gp (global pool)."""
    args = _args_dict(args)
    kwargs = dict(args.get('model_kwargs') or {})
    if args.get('gp'):
        kwargs['global_pool'] = args['gp']
    return kwargs


def _recorded_model_kwargs(meta: Dict[str, Any], source: str) -> Dict[str, Any]:
    """The creation kwargs a checkpoint records: a pre-training checkpoint's or encoder export's `model_kwargs`,
    then those in its training args."""
    recorded = meta.get('model_kwargs')
    if recorded is not None and not isinstance(recorded, dict):
        raise PublishError(f'checkpoint {source}: its model_kwargs is a {type(recorded).__name__}, not a dict')
    return dict(recorded or {}, **_model_kwargs_from_train_args(meta.get('args')))


def _load_model(path: Path, model_name: str, use_ema: bool = False) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    arch = split_model_name_tag(model_name)[0]
    if not arch.startswith('mlit_') or not is_model(arch):
        raise PublishError(f'--model {model_name!r} is not an mLiT model (mlit_s, mlit_xs, mlit_xxs)')
    state_dict, meta = load_checkpoint_state_dict(path, use_ema=use_ema)
    ckpt_arch = meta.get('arch')
    if ckpt_arch and split_model_name_tag(str(ckpt_arch))[0] != arch:
        raise PublishError(f'checkpoint {path} was trained as {ckpt_arch!r}, not {arch!r}')
    kwargs = _model_kwargs_from_state_dict(state_dict, str(path))
    # what the weights cannot tell (pooling, routing, depth, expert counts, sharing, gating) the checkpoint records
    kwargs.update(_recorded_model_kwargs(meta, str(path)))
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
            f'checkpoint {path} does not fit {arch} built with {kwargs} (a checkpoint of another architecture or '
            'size?): ' + '; '.join(problems))
    model.load_state_dict(state_dict, strict=True)
    model.publish_model_args = kwargs
    return model.eval(), meta


def model_from_checkpoint(path: Path, model_name: str, use_ema: bool = False) -> torch.nn.Module:
    """Build `model_name` as the checkpoint was trained and load it, strictly; eval mode. The kwargs it was built
    with are in `model.publish_model_args`."""
    return _load_model(path, model_name, use_ema=use_ema)[0]


def _from_pretraining(meta: Dict[str, Any]) -> bool:
    """Is this a pre-training checkpoint or the encoder exported from one?"""
    return str(meta.get('format', '')).startswith(_PRETRAIN_FORMAT) or 'pre-training' in str(meta.get('source', ''))


def _read_label_names(path: Path) -> List[str]:
    """Label names from a JSON list or a text file with one name a line."""
    path = Path(path)
    try:
        text = path.read_text(encoding='utf-8')
    except UnicodeDecodeError as e:
        raise PublishError(f'--label-names {path}: not UTF-8 text ({e})') from e
    except OSError as e:
        raise PublishError(f'--label-names {path}: cannot read it ({e.strerror or e})') from e
    if path.suffix != '.json':
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        names = json.loads(text)
    except json.JSONDecodeError as e:
        raise PublishError(f'--label-names {path}: not valid JSON ({e})') from e
    if not isinstance(names, list) or not all(isinstance(n, (str, int)) and not isinstance(n, bool) for n in names):
        raise PublishError(f'--label-names {path}: expected a JSON list of names, e.g. ["cat", "dog"]')
    return [str(n) for n in names]


def _hub_repo_id(text: str, option: str) -> str:
    repo_id = text[len('hf-hub:'):] if text.startswith('hf-hub:') else text
    if not _REPO_ID_RE.match(repo_id):
        raise PublishError(f'{option} {text!r}: expected a Hub repository id ORG/NAME, '
                           'e.g. timm-mlit/mlit_xxs.mae_in_fashion_mnist')
    return repo_id


# ----------------------------------------------------------------------------------------------- the model card

class _MatmulOutputCount(TorchDispatchMode):
    """Activations as fvcore counts them (timm's benchmark): the elements output by convolutions and matrix
    multiplies. Linear layers reach aten as mm / addmm, attention's q·kᵀ and scores·v as bmm; norms, activation
    functions, softmax and other elementwise ops are not counted."""

    _OPS = (torch.ops.aten.convolution, torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm,
            torch.ops.aten.baddbmm)

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in self._OPS:
            self.count += out.numel()
        return out


def model_stats(model: torch.nn.Module, input_size: Sequence[int]) -> Dict[str, int]:
    """Parameters, MACs and activations of one eval forward at batch 1 and `input_size` (C, H, W), the figures of a
    timm model card. MACs are FlopCounterMode's flops / 2. While measuring, attention runs on the math kernel, so
    that its two matmuls count (as matmuls) whatever kernel the model would use, and the MoE layers on their
    'sparse' path: the compute of the experts each token is routed to, not the dense path's all-expert matmul."""
    device = next(model.parameters()).device
    x = torch.rand(1, *input_size, generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    impls = [m.impl for m in moes]
    model.eval()
    try:
        for m in moes:
            m.impl = 'sparse'
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            flops = FlopCounterMode(display=False)
            with flops:
                model(x)
            activations = _MatmulOutputCount()
            with activations:
                model(x)
    finally:
        model.train(was_training)
        for m, impl in zip(moes, impls):
            m.impl = impl
    return dict(params=sum(p.numel() for p in model.parameters()), macs=flops.get_total_flops() // 2,
                activations=activations.count)


def _code_url() -> str:
    """The package's source repository, if its metadata names one."""
    try:
        urls = importlib_metadata.metadata('timm-mlit').get_all('Project-URL') or []
    except importlib_metadata.PackageNotFoundError:
        return ''
    for entry in urls:
        label, _, url = entry.partition(',')
        if label.strip().lower() in ('source', 'repository', 'code', 'homepage'):
            return url.strip()
    return ''


def _usage_snippets(model: torch.nn.Module, model_id: str, has_label_names: bool) -> str:
    """The Model Usage section, in the form of timm's cards; every block runs as written once `model_id` exists."""
    mode, grey = ('L', '128') if model.in_chans == 1 else ('RGB', '(128, 128, 128)')
    size = f'({model.img_size[1]}, {model.img_size[0]})'  # PIL: (width, height)
    head = (
        "import timm\n"
        "import torch\n"
        "from PIL import Image\n"
        "\n"
        "import timm_mlit  # noqa: F401  registers the mLiT models with timm (the timm-mlit package)\n"
        "\n"
        f"img = Image.new('{mode}', {size}, {grey})  # stands in for your image: "
        f"Image.open('image.png').convert('{mode}')\n"
        "\n"
    )
    transforms = (
        "model = model.eval()\n"
        "\n"
        "# get model specific transforms (normalization, resize)\n"
        "data_config = timm.data.resolve_model_data_config(model)\n"
        "transforms = timm.data.create_transform(**data_config, is_training=False)\n"
        "\n"
    )
    x = torch.rand(1, model.in_chans, *model.img_size)
    with torch.no_grad():
        tokens = tuple(model.forward_features(x).shape)
        maps = [tuple(t.shape) for t in model.forward_intermediates(
            x, indices=min(3, len(model.blocks)), intermediates_only=True)]  # features_only's default
    sections = []
    if model.num_classes > 0:
        k = min(5, model.num_classes)
        labels = (
            "label_names = model.pretrained_cfg['label_names']\n"
            "print([label_names[i] for i in top5_class_indices[0].tolist()])\n") if has_label_names else ''
        sections.append((
            'Image Classification',
            head + f"model = timm.create_model('{model_id}', pretrained=True)\n" + transforms
            + "with torch.no_grad():\n"
            "    output = model(transforms(img).unsqueeze(0))  # unsqueeze single image into batch of 1\n"
            "\n"
            f"top5_probabilities, top5_class_indices = torch.topk(output.softmax(dim=1) * 100, k={k})\n" + labels))
    else:
        sections.append((
            'Fine-tuning',
            head + f"model = timm.create_model('{model_id}', pretrained=True, num_classes=10)  # a new 10-class head\n"
            "output = model(torch.rand(2, *model.pretrained_cfg['input_size']))  # train it as any timm model\n"))
    sections.append((
        'Feature Map Extraction',
        head + "model = timm.create_model(\n"
        f"    '{model_id}',\n"
        "    pretrained=True,\n"
        "    features_only=True,\n"
        ")\n" + transforms
        + "with torch.no_grad():\n"
        "    output = model(transforms(img).unsqueeze(0))  # unsqueeze single image into batch of 1\n"
        "\n"
        "for o in output:\n"
        "    # print shape of each feature map in output\n"
        + ''.join(f"    # torch.Size({list(s)})\n" for s in maps)
        + "    print(o.shape)\n"))
    remove_head = "    num_classes=0,  # remove classifier nn.Linear\n" if model.num_classes > 0 else ''
    sections.append((
        'Image Embeddings',
        head + "model = timm.create_model(\n"
        f"    '{model_id}',\n"
        "    pretrained=True,\n" + remove_head + ")\n" + transforms
        + "with torch.no_grad():\n"
        "    output = model(transforms(img).unsqueeze(0))  # output is (batch_size, num_features) shaped tensor\n"
        "\n"
        + ("    # or equivalently (without needing to set num_classes=0)\n\n" if remove_head else '')
        + "    output = model.forward_features(transforms(img).unsqueeze(0))\n"
        f"    # output is unpooled, a {tokens} shaped tensor\n"
        "\n"
        "    output = model.forward_head(output, pre_logits=True)\n"
        "    # output is a (1, num_features) shaped tensor\n"))
    return ''.join(f'### {title}\n```python\n{code}```\n\n' for title, code in sections)


def write_model_card(
        path: Path,
        model: torch.nn.Module,
        model_id: str,
        title: str,
        license: str = 'apache-2.0',
        dataset: str = '',
        pretrain_dataset: str = '',
        metrics: Optional[Dict[str, float]] = None,
        description: str = '',
        base_model: str = '',
        mae_pretrained: bool = False,
        training_args_file: str = '',
        has_label_names: bool = False,
):
    """README.md in the layout of timm's model cards, with the Hub's metadata (huggingface_hub.ModelCardData).

    Args:
        model_id: what the usage snippets pass to timm.create_model ('hf-hub:ORG/NAME').
        dataset: the dataset trained (fine-tuned) and evaluated on; `metrics` were measured on it.
        pretrain_dataset: the dataset of the masked-autoencoder pre-training.
        base_model: the Hub repository this model was fine-tuned from.
        mae_pretrained: the weights come from masked-autoencoder pre-training (cite MAE).
        training_args_file: the file in the folder holding the training arguments, if any.
    """
    from huggingface_hub import EvalResult, ModelCardData

    classifier = model.num_classes > 0
    task = 'image-classification' if classifier else 'image-feature-extraction'
    eval_results = None
    if metrics:
        if not dataset:
            raise PublishError('--metric needs --dataset: the dataset the metric was measured on')
        eval_results = [
            EvalResult(
                task_type=task, dataset_type=dataset, dataset_name=dataset,
                metric_type='accuracy' if name in ('top1', 'acc', 'accuracy') else name,
                metric_name=name, metric_value=value)
            for name, value in metrics.items()]
    datasets = list(dict.fromkeys(d for d in (dataset, pretrain_dataset) if d))
    card_data = ModelCardData(
        library_name='timm', license=license, pipeline_tag=task, model_name=title,
        tags=[task, 'timm', 'timm-mlit', 'mlit', 'vision-transformer', 'mixture-of-experts'],
        datasets=datasets or None, base_model=base_model or None, eval_results=eval_results,
    )
    mae_pretrained = mae_pretrained or bool(pretrain_dataset)
    papers = [_MLIT_PAPER] + ([_MAE_PAPER] if mae_pretrained else [])
    stats = model_stats(model, (model.in_chans, *model.img_size))
    code_url = _code_url()

    what = 'image classification model' if classifier else 'feature backbone (an encoder without classifier head)'
    origin = []
    if mae_pretrained:
        origin.append('pre-trained as a masked autoencoder (mmLiT)' + (f' on {pretrain_dataset}' if pretrain_dataset
                                                                        else ''))
    if classifier and (dataset or base_model):
        origin.append(('fine-tuned' if mae_pretrained or base_model else 'trained')
                      + (f' on {dataset}' if dataset else '')
                      + (f' from [{base_model}](https://huggingface.co/{base_model})' if base_model else ''))
    intro = (f'An mLiT {what}: a tiny vision transformer with Mixture-of-Experts feed-forward layers'
             + (f', {", then ".join(origin)}' if origin else '') + '.')

    details = [
        f'- **Model Type:** {"Image classification / feature backbone" if classifier else "Feature backbone"}',
        '- **Model Stats:**',
        f'  - Params (M): {stats["params"] / 1e6:.3f}',
        f'  - GMACs: {stats["macs"] / 1e9:.3f}',
        f'  - Activations (M): {stats["activations"] / 1e6:.3f}',
        f'  - Image size: {model.img_size[0]} x {model.img_size[1]}',
        '- **Papers:**',
        *[f'  - {name}: {url}' for name, url in papers],
    ]
    if dataset:
        details.append(f'- **Dataset:** {dataset}')
    if pretrain_dataset:
        details.append(f'- **Pretrain Dataset:** {pretrain_dataset}')
    if base_model:
        details.append(f'- **Base Model:** [{base_model}](https://huggingface.co/{base_model})')
    details.append(f'- **Original:** {code_url or _MLIT_PAPER[1]} (timm-mlit, a timm plugin: import timm_mlit '
                   'before creating the model)')
    if training_args_file:
        details.append(f'- **Training arguments:** [`{training_args_file}`]({training_args_file}), as the '
                       'checkpoint recorded them')
    if metrics:
        details.append(f'- **Metrics ({dataset}):** ' + ', '.join(f'{k} {v}' for k, v in metrics.items()))
    body = (
        f'# Model card for {title}\n\n'
        + (f'{description}\n\n' if description else '')
        + f'{intro}\n\n'
        + '## Model Details\n' + '\n'.join(details) + '\n\n'
        + '## Model Usage\n' + _usage_snippets(model, model_id, has_label_names)
        + '## Citation\n' + ''.join(f'```bibtex\n{_CITATIONS[p]}\n```\n' for p in papers)
    )
    Path(path).write_text(f'---\n{card_data.to_yaml()}\n---\n{body}', encoding='utf-8')


def _plain(value: Any) -> Any:
    """`value` with only what YAML and JSON write: tuples as lists, other objects as their str."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _write_training_args(path: Path, args: Dict[str, Any]):
    text = yaml.safe_dump(_plain(args), default_flow_style=False)  # as timm's train.py writes its args.yaml
    Path(path).write_text('# the training arguments the published checkpoint recorded\n' + text, encoding='utf-8')


# ---------------------------------------------------------------------------------------------- the output folder

_HOST = re.sub(r'[^A-Za-z0-9-]', '-', socket.gethostname()) or 'localhost'


def _work_prefix(output_dir: Path) -> str:
    """Prefix of this process's temporary folders beside `output_dir`: `.<name>.<host>.<pid>.`"""
    return f'.{output_dir.name}.{_HOST}.{os.getpid()}.'


def _recover_interrupted(output_dir: Path):
    """Clear what interrupted publishes to `output_dir` left beside it.

    Folders of this machine's processes that are gone: an unfinished `.tmp` is removed; an `.old` copy (a publish
    killed between its two renames) is put back if `output_dir` is missing, else removed. Folders of a live
    process or of another machine are left alone. Those of an older timm-mlit-publish (`.<name>.<random>.tmp`/`.old`,
    no process id) cannot be told from a running publish: an old copy is put back only where `output_dir` is
    missing, the rest is named in a warning.
    """
    parent, name = output_dir.parent, output_dir.name
    if not parent.is_dir():
        return
    ours = re.compile(rf'\.{re.escape(name)}\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[a-z0-9_]+\.(?P<kind>tmp|old)')
    legacy = re.compile(rf'\.{re.escape(name)}\.[a-z0-9_]{{8}}\.(?P<kind>tmp|old)')
    stale, older = [], []
    for p in parent.iterdir():
        if p.is_symlink() or not p.is_dir():
            continue
        m = ours.fullmatch(p.name)
        if m:
            if m['host'] == _HOST and not process_alive(int(m['pid'])):
                stale.append((m['kind'], p))
            continue
        m = legacy.fullmatch(p.name)
        if m:
            older.append((m['kind'], p))

    old_copies = sorted((p for kind, p in stale + older if kind == 'old' and (p / name).is_dir()),
                        key=lambda p: p.stat().st_mtime, reverse=True)
    for old in old_copies:
        if not os.path.lexists(output_dir):
            os.replace(old / name, output_dir)
            _logger.warning(f'restored {output_dir} from {old}: a publish was interrupted while replacing it')
    for kind, p in stale:
        shutil.rmtree(p, ignore_errors=True)
        if kind == 'tmp':
            _logger.info(f'removed {p}: the unfinished folder of an interrupted publish')
    for kind, p in older:
        if kind == 'old' and not (p / name).exists():
            shutil.rmtree(p, ignore_errors=True)  # emptied: its copy was put back above
        elif kind == 'old':
            _logger.warning(f'{p}/{name} is a previous copy of {output_dir} that an interrupted publish of an older '
                            f'timm-mlit-publish moved aside; remove {p} if no timm-mlit-publish is running')
        else:
            _logger.warning(f'{p} is the unfinished folder of a publish to {output_dir} by an older '
                            'timm-mlit-publish; remove it if no timm-mlit-publish is running')


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
        base_model: str = '',
        training_args: bool = True,
) -> Path:
    """Write the Hub folder for `checkpoint` to `output_dir`, atomically (see the module docstring).

    Args:
        base_model: the Hub repository (ORG/NAME) the checkpoint was fine-tuned from, for the card's metadata.
        training_args: write the training arguments the checkpoint records to `training_args.yaml`.

    Returns:
        `output_dir`.
    """
    output_dir = Path(output_dir).absolute()
    if tag and not _TAG_RE.match(tag):
        raise PublishError(f'--tag {tag!r}: use lower-case letters, digits and _, e.g. mae_ft_cifar100')
    if metrics and not dataset:
        raise PublishError('--metric needs --dataset: the dataset the metric was measured on')
    base_model = _hub_repo_id(base_model, '--base-model') if base_model else ''
    _recover_interrupted(output_dir)
    _check_output(output_dir, checkpoint, overwrite)
    model, meta = _load_model(checkpoint, model_name, use_ema=use_ema)
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
    recorded_args = _args_dict(meta.get('args')) if training_args else {}
    expected_files = sorted(MODEL_FILES + ((TRAINING_ARGS_FILE,) if recorded_args else ()))

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_work_prefix(output_dir), suffix='.tmp', dir=output_dir.parent))
    old = None
    try:
        try:
            # model_args given explicitly: timm < 1.0.31 does not record a model's creation kwargs by itself
            save_for_hf(model, tmp, model_config=model_config, model_args=model.publish_model_args,
                        safe_serialization=True)
        except ValueError as e:  # a recorded kwarg JSON cannot hold
            raise PublishError(f'cannot write config.json for {arch} with {model.publish_model_args}: {e}') from e
        if recorded_args:
            _write_training_args(tmp / TRAINING_ARGS_FILE, recorded_args)
        write_model_card(
            tmp / 'README.md', model, model_id, title, license=license, dataset=dataset,
            pretrain_dataset=pretrain_dataset, metrics=metrics, description=description, base_model=base_model,
            mae_pretrained=_from_pretraining(meta) or tag.startswith('mae_'),
            training_args_file=TRAINING_ARGS_FILE if recorded_args else '', has_label_names=label_names is not None)
        if sorted(p.name for p in tmp.iterdir()) != expected_files:
            raise PublishError(f'unexpected files in {tmp}: {sorted(p.name for p in tmp.iterdir())}')
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp (and safetensors) make private files: publish readable ones
        for p in tmp.iterdir():
            os.chmod(p, 0o666 & ~umask)
        if not _outputs_match(model, tmp):
            raise PublishError(f'{tmp} does not load back to the same outputs; nothing was written')
        if os.path.lexists(output_dir):  # --overwrite: move the old folder aside, then swap
            _check_output(output_dir, checkpoint, overwrite)  # still one this tool wrote?
            old = Path(tempfile.mkdtemp(prefix=_work_prefix(output_dir), suffix='.old', dir=output_dir.parent))
            os.replace(output_dir, old / output_dir.name)
            try:
                os.replace(tmp, output_dir)
            except BaseException:
                os.replace(old / output_dir.name, output_dir)  # put the old folder back
                raise
        else:
            os.replace(tmp, output_dir)
    finally:
        for p in (tmp, old):
            if p is not None and p.exists():
                shutil.rmtree(p, ignore_errors=True)
    return output_dir


# ------------------------------------------------------------------------------------------------------- the Hub

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


# -------------------------------------------------------------------------------------------------- command line

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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has one (not for flags and options that are off unless given)."""

    def _get_help_string(self, action):
        if action.nargs == 0 or action.default in (None, '', []):
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='timm-mlit-publish', formatter_class=_HelpFormatter,
        description='Turn an mLiT checkpoint into a Hugging Face Hub / timm model folder: model.safetensors, '
                    "timm's config.json, a model card and the recorded training arguments.")
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    parser.add_argument('checkpoint', type=Path,
                        help='encoder .safetensors, pre-training or train.py checkpoint, or a state dict')
    parser.add_argument('--model', required=True, help='architecture: mlit_s, mlit_xs or mlit_xxs')
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
    parser.add_argument('--no-training-args', dest='training_args', action='store_false',
                        help=f'do not publish the training arguments the checkpoint records ({TRAINING_ARGS_FILE}; '
                             'they name local paths such as data_dir)')
    parser.add_argument('--repo-id', default='', metavar='ORG/NAME',
                        help='then push the folder to this Hub repository')
    parser.add_argument('--private', action='store_true', help='create the Hub repository private')
    parser.add_argument('--revision', default=None, help='Hub branch to push to (created if needed); default: main')
    parser.add_argument('--commit-message', default='Add mLiT weights', help='message of the Hub commit')
    return parser


class _StderrHandler(logging.Handler):
    """Notes of the library (restored or removed leftovers) as `timm-mlit-publish: warning: ...` lines; looks
    sys.stderr up at each line, so a replaced stream is followed."""

    def emit(self, record: logging.LogRecord):
        print(f'timm-mlit-publish: {record.levelname.lower()}: {record.getMessage()}', file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if not any(isinstance(h, _StderrHandler) for h in _logger.handlers):
        _logger.addHandler(_StderrHandler())
    if _logger.level == logging.NOTSET:
        _logger.setLevel(logging.INFO)
    try:
        label_names = _read_label_names(args.label_names) if args.label_names else None
        folder = publish(
            args.checkpoint, args.model, args.output_dir, tag=args.tag, use_ema=args.ema, overwrite=args.overwrite,
            dataset=args.dataset, pretrain_dataset=args.pretrain_dataset, metrics=dict(args.metric),
            label_names=label_names, license=args.license, repo_id=args.repo_id, description=args.description,
            base_model=args.base_model, training_args=args.training_args)
        num_classes = json.loads((folder / 'config.json').read_text())['num_classes']
        print(f'wrote {folder}: {", ".join(sorted(p.name for p in folder.iterdir()))}')
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
