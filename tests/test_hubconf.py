"""torch.hub's entry points (hubconf.py): our models only, with kwargs passed through, the tags its docstring
names, and the docs' torch.hub snippet, with no network."""
import re

import timm
import torch
from hub_helpers import REPO_ROOT, _out, _x
from readme import snippet

import timm_mlit  # noqa: F401

# The snippet, read from docs/ and executed verbatim below (test_readme_snippet_torch_hub).
SNIPPET_TORCH_HUB = snippet('hub-torch-hub')


def test_torch_hub_local_loads_our_models_only_with_kwargs_passed_through(embedded, published, offline_hf):
    hubconf = torch.hub._import_module('hubconf', str(REPO_ROOT / 'hubconf.py'))
    assert sorted(f for f in dir(hubconf) if callable(getattr(hubconf, f)) and not f.startswith('_')) == [
        'mlit_s', 'mlit_xs', 'mlit_xxs', 'mobile_vmoe_vit_tiny_patch16_224', 'mobile_vmoe_vit_xxs_patch3_36']
    moe = torch.hub.load(str(REPO_ROOT), 'mobile_vmoe_vit_xxs_patch3_36', source='local', num_experts=4)
    assert moe.num_experts == 4
    model = torch.hub.load(str(REPO_ROOT), 'mlit_xxs', source='local', pretrained=True)
    assert torch.equal(_out(model, _x()), published['expected'])
    model = torch.hub.load(str(REPO_ROOT), 'mlit_xxs', source='local', pretrained=True, num_classes=7, img_size=48)
    assert model.num_classes == 7 and _out(model, _x(3, 48)).shape == (2, 7)
    assert torch.equal(model.blocks[0].norm1.weight, published['model'].blocks[0].norm1.weight)


def test_readme_snippet_torch_hub(embedded, published, offline_hf, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    namespace = {}
    exec(SNIPPET_TORCH_HUB, namespace)
    assert torch.equal(_out(namespace['model'], _x()), published['expected'])


def test_hubconf_docstring_names_tags_that_exist(embedded, offline_hf):
    hubconf = torch.hub._import_module('hubconf', str(REPO_ROOT / 'hubconf.py'))
    tags = re.findall(r"pretrained_cfg='(\w+)'", hubconf.__doc__)
    assert tags
    for tag in tags:
        assert f'mlit_xxs.{tag}' in timm.list_pretrained('mlit_xxs.*'), tag
        model = torch.hub.load(str(REPO_ROOT), 'mlit_xxs', source='local', pretrained=True, pretrained_cfg=tag)
        assert model.pretrained_cfg['tag'] == tag
