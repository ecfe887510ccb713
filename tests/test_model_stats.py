"""Tests of timm_mlit.model_stats: the one counter of parameters, touched parameters, FLOPs and activations, and that
counting leaves the model counted as it was."""
import pytest
import timm
import torch

import timm_mlit  # noqa: F401
from timm_mlit.layers import MoE, moe_stats
from timm_mlit.model_stats import count_activations, count_flops, count_params, model_stats, touched_params

VMOE = 'mobile_vmoe_vit_xxs_patch3_36'


def _images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 36, 36, generator=torch.Generator().manual_seed(seed))


def _mlit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model('mlit_xxs', num_classes=10, depth=3, **kwargs)


def _moe_impls(model):
    return [m.impl for m in model.modules() if isinstance(m, MoE)]


def test_count_flops_counts_a_multiply_add_as_two_per_image():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    images = torch.rand(3, 3, 4, 4)
    assert count_flops(model, images) == 2 * 48 * 5
    # backward: the weight's gradient, one more product of the same size (the images need none)
    assert count_flops(model, images, train=True) == 2 * 2 * 48 * 5
    assert count_activations(model, images) == 5


@pytest.mark.parametrize('name', ['mlit_xxs', VMOE])
def test_counting_leaves_the_model_as_it_was(name):
    """Mode, MoE implementation, gradients and recorded balance losses of the live model are those it had, and it
    gives the same outputs after counting as before."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **({'depth': 3} if name == 'mlit_xxs' else {}))
    x = _images(seed=1)
    for training in (False, True):
        model.train(training)
        impls = _moe_impls(model)
        with torch.no_grad():
            before = model.eval()(x)
        model.train(training)
        count_flops(model, _images(), train=True, moe_impl='dense')
        count_flops(model, _images(), moe_impl='sparse')
        count_activations(model, _images(), moe_impl='loop')
        model_stats(model, (3, 36, 36))
        assert model.training == training and _moe_impls(model) == impls
        assert all(p.grad is None for p in model.parameters()) and moe_stats(model) is None
        with torch.no_grad():
            assert torch.equal(model.eval()(x), before)


def test_the_moe_implementation_counted_is_the_one_asked_for():
    model = _mlit()
    dense, sparse = (count_flops(model, _images(), moe_impl=impl) for impl in ('dense', 'sparse'))
    assert sparse < dense  # the sparse path runs each token's chosen experts' private matrix only
    assert count_flops(model, _images()) in (dense, sparse)  # the model's own ('auto') is one of them


def test_the_same_images_give_the_same_count():
    model = _mlit()
    assert count_flops(model, _images(), moe_impl='sparse') == count_flops(model, _images(), moe_impl='sparse')
    assert model_stats(model, (3, 36, 36)) == model_stats(model, (3, 36, 36))


def test_model_stats_are_the_counters_at_one_image():
    model = _mlit()
    image = torch.rand(1, 3, 36, 36, generator=torch.Generator().manual_seed(0))
    assert model_stats(model, (3, 36, 36)) == dict(
        params=count_params(model), macs=int(count_flops(model, image, moe_impl='sparse')) // 2,
        activations=int(count_activations(model, image, moe_impl='sparse')))


@pytest.mark.parametrize('num_experts, top_k, moe_layers', [(4, 2, 2), (4, 1, 3), (4, 4, 2), (10, 1, 0)])
def test_an_image_touches_all_but_its_unchosen_experts_in_each_moe_layer(num_experts, top_k, moe_layers):
    model = timm.create_model(VMOE, num_experts=num_experts, top_k=top_k, moe_layers=moe_layers)
    blocks = list(model.blocks)[len(model.blocks) - moe_layers:]
    per_expert = sum(count_params(b.mlp) for b in blocks) // (num_experts * max(moe_layers, 1))
    assert touched_params(model) == count_params(model) - moe_layers * (num_experts - top_k) * per_expert


def test_an_image_touches_every_parameter_of_a_model_routing_tokens():
    model = _mlit()
    assert touched_params(model) == count_params(model)


def test_vit_tiny_touches_the_papers_parameters_per_image():
    """arXiv 2309.04354 §3: the ViT-Tiny MoE (11.05M parameters) activates 6.31M per image."""
    model = timm.create_model('mobile_vmoe_vit_tiny_patch16_224', num_classes=1000)
    assert (round(count_params(model) / 1e6, 2), round(touched_params(model) / 1e6, 2)) == (11.05, 6.31)
