"""What a published folder says about its model: the card, config.json's additions and the training arguments.

The model card is README.md in the layout of timm's own: the Hub's metadata (library_name timm, license, tags,
datasets, base_model, the measured metrics as model-index), Model Details with the params / GMACs / activations
that `model_stats` counts, usage snippets that run as written, and the citations: the paper of the model's family
(mLiT, arXiv 2407.17783; Mobile V-MoE, arXiv 2309.04354) and, for masked-autoencoder weights, MAE (arXiv 2111.06377).

The creation kwargs (config.json's model_args) are what the checkpoint records (checkpoint.recorded_model_kwargs);
the recorded training arguments go to `training_args.yaml`, which the card links to.
"""
import json
import re
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import yaml
from timm.models import model_entrypoint, split_model_name_tag

from ._weights import LABEL_NAMES
from .model_stats import model_stats

__all__ = ['model_stats', 'input_size', 'write_model_card', 'write_training_args', 'read_label_names', 'model_config',
           'cfg_entry', 'hub_repo_id', 'PublishError']

_REPO_ID_RE = re.compile(r'^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$')
_MLIT_PAPER = ('How Lightweight Can A Vision Transformer Be', 'https://arxiv.org/abs/2407.17783')
_VMOE_PAPER = ('Mobile V-MoEs: Scaling Down Vision Transformers via Sparse Mixture-of-Experts',
               'https://arxiv.org/abs/2309.04354')
_MAE_PAPER = ('Masked Autoencoders Are Scalable Vision Learners', 'https://arxiv.org/abs/2111.06377')
_CITATIONS = {
    _MLIT_PAPER: '@article{tan2024mlit,\n  title={How Lightweight Can A Vision Transformer Be},\n'
                 '  author={Tan, Jen Hong},\n  journal={arXiv preprint arXiv:2407.17783},\n  year={2024}\n}',
    _MAE_PAPER: '@inproceedings{he2022masked,\n  title={Masked Autoencoders Are Scalable Vision Learners},\n'
                '  author={He, Kaiming and Chen, Xinlei and Xie, Saining and Li, Yanghao and Doll{\\\'a}r, Piotr '
                'and Girshick, Ross},\n  booktitle={CVPR},\n  year={2022}\n}',
    _VMOE_PAPER: '@article{daxberger2023mobile,\n  title={Mobile V-MoEs: Scaling Down Vision Transformers via Sparse '
                 'Mixture-of-Experts},\n  author={Daxberger, Erik and Weers, Floris and Zhang, Bowen and Gunter, Tom '
                 'and Pang, Ruoming and Eichner, Marcin and Emmersberger, Michael and Yang, Yinfei and Toshev, '
                 'Alexander and Du, Xianzhi},\n  journal={arXiv preprint arXiv:2309.04354},\n  year={2023}\n}',
}
# each model family of the package, by the module defining its model class: how the card names it, what it is, its
# paper and its Hub tag
_FAMILIES = {
    'timm_mlit.mlit': ('An mLiT', 'a tiny vision transformer with Mixture-of-Experts feed-forward layers', _MLIT_PAPER,
                       'mlit'),
    'timm_mlit.mobile_vmoe': ('A Mobile V-MoE', 'a vision transformer whose last layers are mixtures of MLP experts, '
                              'each image routed as a whole to k of them', _VMOE_PAPER, 'mobile-vmoe'),
}


class PublishError(ValueError):
    """A checkpoint, an argument or the output folder is not what publishing needs; the message says which and why.
    A ValueError, as checkpoint.CheckpointError is: what was given is wrong, not the machine. Defined here, below
    hub.py (which re-exports it), so that both raise the one class."""


# ------------------------------------------------------------------------------------------------ the input size

# (The attributes of a timm model that the card reads. nn.Module's typing sees any attribute as a Tensor or a
# Module; these are set by every timm ViT-family model, mLiT's and Mobile V-MoE's included.)

def input_size(model: torch.nn.Module) -> Tuple[int, int, int]:
    """(C, H, W) of the images the model was built for (timm's PatchEmbed records the size)."""
    in_chans: int = getattr(model, 'in_chans')
    img_size: Tuple[int, int] = getattr(model, 'patch_embed').img_size
    return (in_chans, *img_size)


def _num_classes(model: torch.nn.Module) -> int:
    """The classes of the model's head (0: none)."""
    num_classes: int = getattr(model, 'num_classes')
    return num_classes


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
    size = f'({input_size(model)[2]}, {input_size(model)[1]})'  # PIL: (width, height)
    return (
        "import timm\n"
        "import torch\n"
        "from PIL import Image\n"
        "\n"
        "import timm_mlit  # noqa: F401  registers the timm-mlit package's models with timm\n"
        "\n"
        f"img = Image.new('{mode}', {size}, {grey})  # stands in for your image: "
        f"Image.open('image.png').convert('{mode}')\n"
        "\n"
    )


def _head_snippet(model: torch.nn.Module, model_id: str, head: str, has_label_names: bool) -> Tuple[str, str]:
    """Image Classification for a model with a head, Fine-tuning for an encoder."""
    if _num_classes(model) <= 0:
        return (
            'Fine-tuning',
            head + f"model = timm.create_model('{model_id}', pretrained=True, num_classes=10)  # a new 10-class head\n"
            "output = model(torch.rand(2, *model.pretrained_cfg['input_size']))  # train it as any timm model\n")
    k = min(5, _num_classes(model))
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
    remove_head = "    num_classes=0,  # remove classifier nn.Linear\n" if _num_classes(model) > 0 else ''
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
    x = torch.rand(1, *input_size(model))
    forward_features: Callable[[torch.Tensor], torch.Tensor] = getattr(model, 'forward_features')
    forward_intermediates: Callable[..., List[torch.Tensor]] = getattr(model, 'forward_intermediates')
    depth = len(getattr(model, 'blocks'))
    with torch.no_grad():
        tokens = tuple(forward_features(x).shape)
        maps = [tuple(t.shape) for t in forward_intermediates(
            x, indices=min(3, depth), intermediates_only=True)]  # features_only's default
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
               metrics: Optional[Dict[str, float]], base_model: str, family_tag: str):
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
        tags=[task, 'timm', 'timm-mlit', family_tag, 'vision-transformer', 'mixture-of-experts'],
        datasets=datasets or None, base_model=base_model or None, eval_results=eval_results,
    )


def _intro(family: Tuple[Any, ...], classifier: bool, mae_pretrained: bool, dataset: str, pretrain_dataset: str,
           base_model: str) -> str:
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
    return (f'{family[0]} {what}: {family[1]}'
            + (f', {", then ".join(origin)}' if origin else '') + '.')


def _details(model: torch.nn.Module, papers: List[Tuple[str, str]], dataset: str, pretrain_dataset: str,
             base_model: str, training_args_file: str, metrics: Optional[Dict[str, float]]) -> List[str]:
    """The Model Details list, as in timm's cards."""
    stats = model_stats(model, input_size(model))
    classifier = _num_classes(model) > 0
    details = [
        f'- **Model Type:** {"Image classification / feature backbone" if classifier else "Feature backbone"}',
        '- **Model Stats:**',
        f'  - Params (M): {stats["params"] / 1e6:.3f}',
        f'  - GMACs: {stats["macs"] / 1e9:.3f}',
        f'  - Activations (M): {stats["activations"] / 1e6:.3f}',
        f'  - Image size: {input_size(model)[1]} x {input_size(model)[2]}',
        '- **Papers:**',
        *[f'  - {name}: {url}' for name, url in papers],
    ]
    if dataset:
        details.append(f'- **Dataset:** {dataset}')
    if pretrain_dataset:
        details.append(f'- **Pretrain Dataset:** {pretrain_dataset}')
    if base_model:
        details.append(f'- **Base Model:** [{base_model}](https://huggingface.co/{base_model})')
    details.append(f'- **Original:** {_code_url() or papers[0][1]} (timm-mlit, a timm plugin: import timm_mlit '
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
    classifier = _num_classes(model) > 0
    task = 'image-classification' if classifier else 'image-feature-extraction'
    family = _FAMILIES[type(model).__module__]
    card_data = _card_data(title, task, license, dataset, pretrain_dataset, metrics, base_model, family[3])
    mae_pretrained = mae_pretrained or bool(pretrain_dataset)
    papers = [family[2]] + ([_MAE_PAPER] if mae_pretrained else [])
    details = _details(model, papers, dataset, pretrain_dataset, base_model, training_args_file, metrics)
    body = (
        f'# Model card for {title}\n\n'
        + (f'{description}\n\n' if description else '')
        + f'{_intro(family, classifier, mae_pretrained, dataset, pretrain_dataset, base_model)}\n\n'
        + '## Model Details\n' + '\n'.join(details) + '\n\n'
        + '## Model Usage\n' + _usage_snippets(model, model_id, has_label_names)
        + (_training_section(commands) if commands else '')
        + '## Citation\n' + ''.join(f'```bibtex\n{_CITATIONS[p]}\n```\n' for p in papers)
    )
    Path(path).write_text(f'---\n{card_data.to_yaml()}\n---\n{body}', encoding='utf-8')


# ---------------------------------------------------------------------------------------- the training arguments

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
    cfg: Dict[str, Any] = getattr(model, 'pretrained_cfg')
    setattr(model, 'pretrained_cfg', dict(cfg, tag=tag or None, input_size=input_size(model)))
    if label_names is None and dataset in LABEL_NAMES and len(LABEL_NAMES[dataset]) == _num_classes(model):
        label_names = LABEL_NAMES[dataset]
    if label_names is None:
        return {}
    if len(label_names) != _num_classes(model):
        raise PublishError(f'{len(label_names)} label names for a head of {_num_classes(model)} classes')
    return dict(label_names=list(label_names))


def cfg_entry(model: str, tag: str, num_classes: int, dataset: str) -> str:
    """Which pretrained cfg entry the published weights need, in `default_cfgs` of the model's module."""
    arch = split_model_name_tag(model)[0]
    name = f'{arch}.{tag or "<tag>"}'
    labels = f", label_names=LABEL_NAMES['{dataset}']" if dataset in LABEL_NAMES else ''
    return (f"pretrained cfg entry for {model_entrypoint(arch).__module__.replace('.', '/')}.py: "
            f"'{name}': _cfg(**weights_source('{name}'), num_classes={num_classes}{labels}),")
