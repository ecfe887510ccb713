"""What a published folder says about its model: the card, the creation kwargs and the training arguments.

The model card is README.md in the layout of timm's own: the Hub's metadata (library_name timm, license, tags,
datasets, base_model, the measured metrics as model-index), Model Details with the measured params / GMACs /
activations (`model_stats`), usage snippets that run as written, and the citations: mLiT (arXiv 2407.17783) and,
for masked-autoencoder weights, MAE (arXiv 2111.06377).

The checkpoint says what it is: the head's rows give num_classes (0 for a head-less encoder), the patch projection
the input channels, the positional embedding the image size; what the weights cannot tell (pooling, routing top-k,
depth, expert counts, ...) comes from the kwargs the checkpoint recorded (`model_kwargs`, train.py's
--model-kwargs and --gp). These kwargs are config.json's model_args; the recorded training arguments go to
`training_args.yaml`, which the card links to.
"""
import argparse
import json
import math
import re
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import yaml
from timm.models import split_model_name_tag
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ._weights import LABEL_NAMES
from .layers import MoE, named_moe_layers

__all__ = ['model_stats', 'write_model_card', 'write_training_args', 'recorded_args', 'recorded_model_kwargs',
           'from_pretraining', 'read_label_names', 'model_config', 'cfg_entry', 'hub_repo_id', 'PublishError',
           'state_dict_mismatches']

_PRETRAIN_FORMAT = 'timm-mlit-pretrain/'
_REPO_ID_RE = re.compile(r'^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$')
_MLIT_PAPER = ('How Lightweight Can A Vision Transformer Be', 'https://arxiv.org/abs/2407.17783')
_MAE_PAPER = ('Masked Autoencoders Are Scalable Vision Learners', 'https://arxiv.org/abs/2111.06377')
_CITATIONS = {
    _MLIT_PAPER: '@article{tan2024mlit,\n  title={How Lightweight Can A Vision Transformer Be},\n'
                 '  author={Tan, Jen Hong},\n  journal={arXiv preprint arXiv:2407.17783},\n  year={2024}\n}',
    _MAE_PAPER: '@inproceedings{he2022masked,\n  title={Masked Autoencoders Are Scalable Vision Learners},\n'
                '  author={He, Kaiming and Chen, Xinlei and Xie, Saining and Li, Yanghao and Doll{\\\'a}r, Piotr '
                'and Girshick, Ross},\n  booktitle={CVPR},\n  year={2022}\n}',
}


class PublishError(ValueError):
    """A checkpoint, an argument or the output folder is not what publishing needs; the message says which and why.
    A ValueError, as checkpoint.CheckpointError is: what was given is wrong, not the machine. Defined here, below
    hub.py (which re-exports it), so that both raise the one class."""


# ---------------------------------------------------------------------------------------------------- the stats

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
    'sparse' path: the compute of the experts each token is routed to, not the dense path's all-expert matmul (with
    a private W2, Table 9's third row, the layers have no sparse path and every expert's W2 counts)."""
    device = next(model.parameters()).device
    x = torch.rand(1, *input_size, generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    moes = [m for _, m in named_moe_layers(model) if isinstance(m, MoE)]  # (a Mobile V-MoE router has no impl)
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


# ------------------------------------------------------------------------------------------------- the snippets

_TRANSFORMS = (
    "model = model.eval()\n"
    "\n"
    "# get model specific transforms (normalization, resize)\n"
    "data_config = timm.data.resolve_model_data_config(model)\n"
    "transforms = timm.data.create_transform(**data_config, is_training=False)\n"
    "\n"
)


def _snippet_head(model: torch.nn.Module) -> str:
    """The imports and a stand-in image of the model's channels and size, that every snippet starts with."""
    mode, grey = ('L', '128') if model.in_chans == 1 else ('RGB', '(128, 128, 128)')
    size = f'({model.img_size[1]}, {model.img_size[0]})'  # PIL: (width, height)
    return (
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


def _head_snippet(model: torch.nn.Module, model_id: str, head: str, has_label_names: bool) -> Tuple[str, str]:
    """Image Classification for a model with a head, Fine-tuning for an encoder."""
    if model.num_classes <= 0:
        return (
            'Fine-tuning',
            head + f"model = timm.create_model('{model_id}', pretrained=True, num_classes=10)  # a new 10-class head\n"
            "output = model(torch.rand(2, *model.pretrained_cfg['input_size']))  # train it as any timm model\n")
    k = min(5, model.num_classes)
    labels = (
        "label_names = model.pretrained_cfg['label_names']\n"
        "print([label_names[i] for i in top5_class_indices[0].tolist()])\n") if has_label_names else ''
    return (
        'Image Classification',
        head + f"model = timm.create_model('{model_id}', pretrained=True)\n" + _TRANSFORMS
        + "with torch.no_grad():\n"
        "    output = model(transforms(img).unsqueeze(0))  # unsqueeze single image into batch of 1\n"
        "\n"
        f"top5_probabilities, top5_class_indices = torch.topk(output.softmax(dim=1) * 100, k={k})\n" + labels)


def _feature_map_snippet(model_id: str, head: str, maps: List[Tuple[int, ...]]) -> Tuple[str, str]:
    return (
        'Feature Map Extraction',
        head + "model = timm.create_model(\n"
        f"    '{model_id}',\n"
        "    pretrained=True,\n"
        "    features_only=True,\n"
        ")\n" + _TRANSFORMS
        + "with torch.no_grad():\n"
        "    output = model(transforms(img).unsqueeze(0))  # unsqueeze single image into batch of 1\n"
        "\n"
        "for o in output:\n"
        "    # print shape of each feature map in output\n"
        + ''.join(f"    # torch.Size({list(s)})\n" for s in maps)
        + "    print(o.shape)\n")


def _embedding_snippet(model: torch.nn.Module, model_id: str, head: str, tokens: Tuple[int, ...]) -> Tuple[str, str]:
    remove_head = "    num_classes=0,  # remove classifier nn.Linear\n" if model.num_classes > 0 else ''
    return (
        'Image Embeddings',
        head + "model = timm.create_model(\n"
        f"    '{model_id}',\n"
        "    pretrained=True,\n" + remove_head + ")\n" + _TRANSFORMS
        + "with torch.no_grad():\n"
        "    output = model(transforms(img).unsqueeze(0))  # output is (batch_size, num_features) shaped tensor\n"
        "\n"
        + ("    # or equivalently (without needing to set num_classes=0)\n\n" if remove_head else '')
        + "    output = model.forward_features(transforms(img).unsqueeze(0))\n"
        f"    # output is unpooled, a {tokens} shaped tensor\n"
        "\n"
        "    output = model.forward_head(output, pre_logits=True)\n"
        "    # output is a (1, num_features) shaped tensor\n")


def _usage_snippets(model: torch.nn.Module, model_id: str, has_label_names: bool) -> str:
    """The Model Usage section, in the form of timm's cards; every block runs as written once `model_id` exists."""
    x = torch.rand(1, model.in_chans, *model.img_size)
    with torch.no_grad():
        tokens = tuple(model.forward_features(x).shape)
        maps = [tuple(t.shape) for t in model.forward_intermediates(
            x, indices=min(3, len(model.blocks)), intermediates_only=True)]  # features_only's default
    head = _snippet_head(model)
    sections = [_head_snippet(model, model_id, head, has_label_names), _feature_map_snippet(model_id, head, maps),
                _embedding_snippet(model, model_id, head, tokens)]
    return ''.join(f'### {title}\n```python\n{code}```\n\n' for title, code in sections)


# ----------------------------------------------------------------------------------------------------- the card

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


def _card_data(title: str, task: str, license: str, dataset: str, pretrain_dataset: str,
               metrics: Optional[Dict[str, float]], base_model: str):
    """The card's YAML metadata, as the Hub reads it (model-index from the metrics)."""
    from huggingface_hub import EvalResult, ModelCardData

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
    return ModelCardData(
        library_name='timm', license=license, pipeline_tag=task, model_name=title,
        tags=[task, 'timm', 'timm-mlit', 'mlit', 'vision-transformer', 'mixture-of-experts'],
        datasets=datasets or None, base_model=base_model or None, eval_results=eval_results,
    )


def _intro(classifier: bool, mae_pretrained: bool, dataset: str, pretrain_dataset: str, base_model: str) -> str:
    """One sentence: what the model is and how it was trained."""
    what = 'image classification model' if classifier else 'feature backbone (an encoder without classifier head)'
    origin = []
    if mae_pretrained:
        origin.append('pre-trained as a masked autoencoder (mmLiT)' + (f' on {pretrain_dataset}' if pretrain_dataset
                                                                        else ''))
    if classifier and (dataset or base_model):
        origin.append(('fine-tuned' if mae_pretrained or base_model else 'trained')
                      + (f' on {dataset}' if dataset else '')
                      + (f' from [{base_model}](https://huggingface.co/{base_model})' if base_model else ''))
    return (f'An mLiT {what}: a tiny vision transformer with Mixture-of-Experts feed-forward layers'
            + (f', {", then ".join(origin)}' if origin else '') + '.')


def _details(model: torch.nn.Module, papers: List[Tuple[str, str]], dataset: str, pretrain_dataset: str,
             base_model: str, training_args_file: str, metrics: Optional[Dict[str, float]]) -> List[str]:
    """The Model Details list, as in timm's cards."""
    stats = model_stats(model, (model.in_chans, *model.img_size))
    classifier = model.num_classes > 0
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
    details.append(f'- **Original:** {_code_url() or _MLIT_PAPER[1]} (timm-mlit, a timm plugin: import timm_mlit '
                   'before creating the model)')
    if training_args_file:
        details.append(f'- **Training arguments:** [`{training_args_file}`]({training_args_file}), as the '
                       'checkpoint recorded them')
    if metrics:
        details.append(f'- **Metrics ({dataset}):** ' + ', '.join(f'{k} {v}' for k, v in metrics.items()))
    return details


def _training_section(commands: Sequence[str]) -> str:
    return ('## Training\nThe commands that made these weights and measured them, as they were run:\n```bash\n'
            + '\n'.join(commands) + '\n```\n\n')


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
        commands: Sequence[str] = (),
):
    """README.md in the layout of timm's model cards, with the Hub's metadata (huggingface_hub.ModelCardData).

    Args:
        model_id: what the usage snippets pass to timm.create_model ('hf-hub:ORG/NAME').
        dataset: the dataset trained (fine-tuned) and evaluated on; `metrics` were measured on it.
        pretrain_dataset: the dataset of the masked-autoencoder pre-training.
        base_model: the Hub repository this model was fine-tuned from.
        mae_pretrained: the weights come from masked-autoencoder pre-training (cite MAE).
        training_args_file: the file in the folder holding the training arguments, if any.
        commands: the shell commands that trained and evaluated the weights, in order (a "Training" section).
    """
    classifier = model.num_classes > 0
    task = 'image-classification' if classifier else 'image-feature-extraction'
    card_data = _card_data(title, task, license, dataset, pretrain_dataset, metrics, base_model)
    mae_pretrained = mae_pretrained or bool(pretrain_dataset)
    papers = [_MLIT_PAPER] + ([_MAE_PAPER] if mae_pretrained else [])
    details = _details(model, papers, dataset, pretrain_dataset, base_model, training_args_file, metrics)
    body = (
        f'# Model card for {title}\n\n'
        + (f'{description}\n\n' if description else '')
        + f'{_intro(classifier, mae_pretrained, dataset, pretrain_dataset, base_model)}\n\n'
        + '## Model Details\n' + '\n'.join(details) + '\n\n'
        + '## Model Usage\n' + _usage_snippets(model, model_id, has_label_names)
        + (_training_section(commands) if commands else '')
        + '## Citation\n' + ''.join(f'```bibtex\n{_CITATIONS[p]}\n```\n' for p in papers)
    )
    Path(path).write_text(f'---\n{card_data.to_yaml()}\n---\n{body}', encoding='utf-8')


# ---------------------------------------------------------------------------------------- the training arguments

def recorded_args(args: Any) -> Dict[str, Any]:
    """A checkpoint's recorded arguments (train.py's Namespace, the pre-training's dict) as a dict."""
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, dict) else {}


def checkpoint_args(path: Optional[str]) -> Optional[Dict[str, Any]]:
    """The arguments the checkpoint at `path` records (timm's train.py stores its Namespace, timm-mlit-pretrain a
    dict); None without a path or a readable checkpoint (whoever loads the file names its problem)."""
    if not path:
        return None
    from .checkpoint import load_torch_file
    try:
        ckpt = load_torch_file(path)
    except Exception:
        return None
    return recorded_args(ckpt.get('args')) if isinstance(ckpt, dict) else None


def _plain(value: Any) -> Any:
    """`value` with only what YAML and JSON write: tuples as lists, other objects as their str."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_training_args(path: Path, args: Dict[str, Any]):
    """The training arguments a checkpoint recorded, as YAML (the card links to this file)."""
    text = yaml.safe_dump(_plain(args), default_flow_style=False)  # as timm's train.py writes its args.yaml
    Path(path).write_text('# the training arguments the published checkpoint recorded\n' + text, encoding='utf-8')


# ------------------------------------------------------------------------------ what the checkpoint records

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


def recorded_model_kwargs(state_dict: Dict[str, torch.Tensor], meta: Dict[str, Any], source: str) -> Dict[str, Any]:
    """The creation kwargs of the model a checkpoint holds: from its weights, then those it records (a pre-training
    checkpoint's or encoder export's `model_kwargs`, then --model-kwargs and --gp of its training args)."""
    kwargs = _model_kwargs_from_state_dict(state_dict, source)
    recorded = meta.get('model_kwargs')
    if recorded is not None and not isinstance(recorded, dict):
        raise PublishError(f'checkpoint {source}: its model_kwargs is a {type(recorded).__name__}, not a dict')
    args = recorded_args(meta.get('args'))
    kwargs.update(recorded or {}, **(args.get('model_kwargs') or {}))
    if args.get('gp'):
        kwargs['global_pool'] = args['gp']
    return kwargs



def state_dict_mismatches(expected: Dict[str, torch.Tensor], state_dict: Dict[str, torch.Tensor], arch: str) -> str:
    """Why `state_dict` does not fit a model whose own state dict is `expected` ('' where it fits)."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    problems = []
    for what, keys in (('missing', missing), ('unexpected', unexpected)):
        if keys:
            problems.append(f'{len(keys)} {what} keys ({", ".join(keys[:3])}{", ..." if len(keys) > 3 else ""})')
    if wrong:
        k = wrong[0]
        problems.append(f'{len(wrong)} shape mismatches (e.g. {k}: checkpoint {tuple(state_dict[k].shape)}, '
                        f'{arch} {tuple(expected[k].shape)})')
    return '; '.join(problems)

def from_pretraining(meta: Dict[str, Any]) -> bool:
    """Is this a pre-training checkpoint or the encoder exported from one?"""
    return str(meta.get('format', '')).startswith(_PRETRAIN_FORMAT) or 'pre-training' in str(meta.get('source', ''))


def _read_text(path: Path, option: str) -> str:
    try:
        return Path(path).read_text(encoding='utf-8')
    except UnicodeDecodeError as e:
        raise PublishError(f'{option} {path}: not UTF-8 text ({e})') from e
    except OSError as e:
        raise PublishError(f'{option} {path}: cannot read it ({e.strerror or e})') from e


def read_commands(path: Path) -> List[str]:
    """The lines of a shell script, blank ones left out: the commands, one a line, and # comments; at least one
    command."""
    commands = [line.rstrip() for line in _read_text(path, '--commands').splitlines() if line.strip()]
    if all(line.lstrip().startswith('#') for line in commands):
        raise PublishError(f'--commands {path}: holds no command (one a line; # starts a comment)')
    return commands


def read_label_names(path: Path) -> List[str]:
    """Label names from a JSON list or a text file with one name a line."""
    path = Path(path)
    text = _read_text(path, '--label-names')
    if path.suffix != '.json':
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        names = json.loads(text)
    except json.JSONDecodeError as e:
        raise PublishError(f'--label-names {path}: not valid JSON ({e})') from e
    if not isinstance(names, list) or not all(isinstance(n, (str, int)) and not isinstance(n, bool) for n in names):
        raise PublishError(f'--label-names {path}: expected a JSON list of names, e.g. ["cat", "dog"]')
    return [str(n) for n in names]


def hub_repo_id(text: str, option: str) -> str:
    """`text` (ORG/NAME or hf-hub:ORG/NAME) as a Hub repository id ORG/NAME."""
    repo_id = text[len('hf-hub:'):] if text.startswith('hf-hub:') else text
    if not _REPO_ID_RE.match(repo_id):
        raise PublishError(f'{option} {text!r}: expected a Hub repository id ORG/NAME, '
                           'e.g. timm-mlit/mlit_xxs.mae_in_fashion_mnist')
    return repo_id


# -------------------------------------------------------------------------------------------------- config.json

def model_config(model: torch.nn.Module, tag: str, dataset: str,
                  label_names: Optional[Sequence[str]]) -> Dict[str, Any]:
    """What config.json records beyond the model's own cfg: the label names, given or the dataset's."""
    # the tag and the input size go into the model's own pretrained_cfg: timm < 1.0.31 replaces a
    # model_config['pretrained_cfg'] wholesale instead of merging it, and does not read the size off the model
    model.pretrained_cfg = dict(model.pretrained_cfg, tag=tag or None, input_size=(model.in_chans, *model.img_size))
    if label_names is None and dataset in LABEL_NAMES and len(LABEL_NAMES[dataset]) == model.num_classes:
        label_names = LABEL_NAMES[dataset]
    if label_names is None:
        return {}
    if len(label_names) != model.num_classes:
        raise PublishError(f'{len(label_names)} label names for a head of {model.num_classes} classes')
    return dict(label_names=list(label_names))


def cfg_entry(model: str, tag: str, num_classes: int, dataset: str) -> str:
    """The pretrained cfg entry of the published weights, for `default_cfgs` in timm_mlit/mlit.py."""
    name = f'{split_model_name_tag(model)[0]}.{tag or "<tag>"}'
    labels = f", label_names=LABEL_NAMES['{dataset}']" if dataset in LABEL_NAMES else ''
    return f"'{name}': _cfg(**weights_source('{name}'), num_classes={num_classes}{labels}),"
