"""Where published mLiT weights live: inside the package (timm_mlit/weights/) and on the Hugging Face Hub.

A pretrained cfg in mlit.py names its weights with `weights_source('arch.tag')`, which gives the cfg both sources:

- `hf_hub_id`: the Hub repository the weights are (or will be) published to, `HF_HUB_ORG/arch.tag`;
- `file`: the embedded copy, `timm_mlit/weights/arch.tag/model.safetensors`, only when that file is really there.

An embedded weight is a whole published folder (what `timm-mlit-publish --output-dir timm_mlit/weights/arch.tag`
writes: model.safetensors, timm's config.json, the model card): the copy in the wheel is the folder that goes to the
Hub, and `timm.create_model('local-dir:<that folder>')` reads it too.

timm 1.0.31 (`timm.models._builder._resolve_pretrained_source`) prefers a cfg's `file` to its `hf_hub_id` and its
`hf_hub_id` to its `url`, so a tag with an embedded file loads offline, from the installed package, with no cache;
on an install without the file (a stripped wheel, an old sdist) the same tag falls back to the Hub.
"""
from pathlib import Path
from typing import Any, Dict

__all__ = ['HF_HUB_ORG', 'LABEL_NAMES', 'WEIGHTS_DIR', 'embedded_weights', 'weights_source']

HF_HUB_ORG = 'timm-mlit'
WEIGHTS_DIR = Path(__file__).resolve().parent / 'weights'


def embedded_weights(model_name_tag: str) -> Path:
    """Path of the embedded weights of `arch.tag` (whether or not the file exists)."""
    if '.' not in model_name_tag:
        raise ValueError(f"expected 'arch.tag', got {model_name_tag!r}")
    return WEIGHTS_DIR / model_name_tag / 'model.safetensors'


def weights_source(model_name_tag: str, hf_hub_id: str = '') -> Dict[str, Any]:
    """The source keys of a pretrained cfg for `arch.tag`: its Hub id and, if the package holds it, its file.

    Args:
        model_name_tag: 'arch.tag', e.g. 'mlit_xxs.mae_ft_cifar100'.
        hf_hub_id: Hub repository, default `HF_HUB_ORG/arch.tag`.
    """
    source = dict(hf_hub_id=hf_hub_id or f'{HF_HUB_ORG}/{model_name_tag}')
    path = embedded_weights(model_name_tag)
    if path.is_file():
        source['file'] = str(path)
    return source


# Class names of the datasets mLiT is trained on, index = class id (torchvision's order).
LABEL_NAMES = {
    'cifar10': ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck'),
    'cifar100': (
        'apple', 'aquarium_fish', 'baby', 'bear', 'beaver', 'bed', 'bee', 'beetle', 'bicycle', 'bottle', 'bowl', 'boy',
        'bridge', 'bus', 'butterfly', 'camel', 'can', 'castle', 'caterpillar', 'cattle', 'chair', 'chimpanzee',
        'clock', 'cloud', 'cockroach', 'couch', 'crab', 'crocodile', 'cup', 'dinosaur', 'dolphin', 'elephant',
        'flatfish', 'forest', 'fox', 'girl', 'hamster', 'house', 'kangaroo', 'keyboard', 'lamp', 'lawn_mower',
        'leopard', 'lion', 'lizard', 'lobster', 'man', 'maple_tree', 'motorcycle', 'mountain', 'mouse', 'mushroom',
        'oak_tree', 'orange', 'orchid', 'otter', 'palm_tree', 'pear', 'pickup_truck', 'pine_tree', 'plain', 'plate',
        'poppy', 'porcupine', 'possum', 'rabbit', 'raccoon', 'ray', 'road', 'rocket', 'rose', 'sea', 'seal', 'shark',
        'shrew', 'skunk', 'skyscraper', 'snail', 'snake', 'spider', 'squirrel', 'streetcar', 'sunflower',
        'sweet_pepper', 'table', 'tank', 'telephone', 'television', 'tiger', 'tractor', 'train', 'trout', 'tulip',
        'turtle', 'wardrobe', 'whale', 'willow_tree', 'wolf', 'woman', 'worm'),
    'svhn': tuple(str(i) for i in range(10)),
    'mnist': tuple(str(i) for i in range(10)),
    'fashion_mnist': (
        'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot'),
}
