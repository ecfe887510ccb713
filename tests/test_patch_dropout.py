"""`patch_drop_rate` (timm's PatchDropout) on mLiT and Mobile V-MoE: training sees the requested share of the patch
tokens and always the dummy/class token; evaluation sees every token and is unchanged by the rate."""
import pytest
import timm
import torch

import timm_mlit  # noqa: F401  (registers the models)

MODELS = ['mlit_xxs', 'mobile_vmoe_vit_xxs_patch3_36']
PATCHES = 144  # 36x36 images, 3x3 patches


def _pair(name, rate):
    torch.manual_seed(0)
    ref = timm.create_model(name, num_classes=10)
    dropped = timm.create_model(name, num_classes=10, patch_drop_rate=rate)
    dropped.load_state_dict(ref.state_dict())
    return ref, dropped


def _block_inputs(model, x):
    """The tokens the first block receives, in a training forward."""
    seen = []
    handle = model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        model.train()(x)
    finally:
        handle.remove()
    return seen[0]


def _prefix_token(model):
    if hasattr(model, 'cls_token'):
        return (model.cls_token + model.pos_embed[:, :1]).detach()[0, 0]
    return model.pos_embed.detach()[0, 0]  # mLiT's dummy patch embeds to 0: its token is its positional embedding


@pytest.mark.parametrize('name', MODELS)
def test_evaluation_is_unchanged_by_the_rate(name):
    ref, dropped = _pair(name, 0.5)
    x = torch.randn(3, 3, 36, 36)
    with torch.no_grad():
        torch.testing.assert_close(dropped.eval()(x), ref.eval()(x), rtol=0, atol=0)
        assert dropped.forward_features(x).shape[1] == 1 + PATCHES


@pytest.mark.parametrize('name', MODELS)
@pytest.mark.parametrize('rate', [0.25, 0.5, 0.75])
def test_training_sees_the_requested_share_and_always_the_prefix_token(name, rate):
    _, model = _pair(name, rate)
    x = torch.randn(4, 3, 36, 36)
    tokens = _block_inputs(model, x)
    assert tokens.shape[1] == 1 + int(PATCHES * (1 - rate))
    torch.testing.assert_close(tokens[:, 0], _prefix_token(model).expand(4, -1))
    # the kept patch tokens are some of the image's own embedded patch tokens, a different subset per image
    with torch.no_grad():
        full = _block_inputs(_pair(name, 0.)[1], x)[:, 1:]
    for b in range(4):
        match = (tokens[b, 1:, None, :] - full[b, None, :, :]).abs().amax(-1) < 1e-6  # [kept, all]
        assert match.any(-1).all()
    assert not torch.equal(tokens[0, 1:], tokens[1, 1:])


@pytest.mark.parametrize('name', MODELS)
def test_training_with_dropped_patches_trains(name):
    _, model = _pair(name, 0.5)
    model.train()
    model(torch.randn(4, 3, 36, 36)).logsumexp(-1).mean().backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('name', MODELS)
def test_forward_intermediates_and_features_only_with_a_rate(name):
    _, model = _pair(name, 0.5)
    model.eval()
    x = torch.randn(2, 3, 36, 36)
    final, inter = model.forward_intermediates(x, indices=2)
    assert final.shape == (2, 1 + PATCHES, model.embed_dim) and [t.shape[-2:] for t in inter] == [(12, 12)] * 2
    feats = timm.create_model(name, features_only=True, out_indices=(-1,), patch_drop_rate=0.5).eval()(x)
    assert feats[0].shape[-2:] == (12, 12)
    # in training the tokens that stay are a set, not a grid: the token format works
    nlc = model.train().forward_intermediates(x, indices=1, output_fmt='NLC', intermediates_only=True)
    assert nlc[0].shape[1] == int(PATCHES * 0.5)


def test_mlit_refuses_a_grid_of_dropped_patches_by_name():
    _, model = _pair('mlit_xxs', 0.5)
    with pytest.raises(ValueError, match='patch dropout kept 72 of 144'):
        model.train().forward_intermediates(torch.randn(2, 3, 36, 36), indices=1)


@pytest.mark.parametrize('rate', [1.0, -0.1, 'half'])
def test_mlit_refuses_a_bad_rate_by_name(rate):
    with pytest.raises((ValueError, TypeError), match='patch_drop_rate'):
        timm.create_model('mlit_xxs', patch_drop_rate=rate)
