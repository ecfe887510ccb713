"""Tests of the mmLiT masked autoencoder (timm_mlit.mae)."""
import pytest
import timm
import torch

import timm_mlit  # noqa: F401  (registers the models)
from timm_mlit.layers import named_moe_layers
from timm_mlit.mae import MaskedAutoencoderMLiT, patchify, random_masking, unpatchify


def _small_mae(**kwargs) -> MaskedAutoencoderMLiT:
    return MaskedAutoencoderMLiT('mlit_xxs', depth=3, **kwargs)


@pytest.mark.parametrize('name', ['mlit_s', 'mlit_xs', 'mlit_xxs'])
def test_decoder_has_the_size_of_table_2(name):
    mae = MaskedAutoencoderMLiT(name)
    n = sum(p.numel() for p in mae.decoder.parameters())
    assert abs(n - 0.34e6) / 0.34e6 < 0.08, n
    assert not any(p.requires_grad for p in mae.decoder.buffers())  # sin-cos positions are fixed
    assert mae.decoder.embed.bias is None and mae.decoder.head.bias is None
    assert mae.decoder.head.out_features == 27


def test_moe_hook_is_off_so_the_balance_loss_counts_once():
    """With β = 0 no balance-loss gradient reaches the gates: the MoE layers' own autograd hook adds none."""
    torch.manual_seed(0)
    mae = _small_mae(beta=0.).train()
    out = mae(torch.randn(4, 3, 36, 36))
    assert out.loss_moe > 0
    (out.pred * 0).sum().backward()  # nothing depends on the gates except through a hook
    gates = [m.gate.weight.grad for _, m in named_moe_layers(mae)]
    assert all(g is None or g.abs().sum() == 0 for g in gates)


def test_masking_keeps_dummy_and_masks_108_of_144_patches():
    torch.manual_seed(0)
    mae = _small_mae().eval()
    imgs = torch.randn(5, 3, 36, 36)
    latent, mask, ids_restore = mae.forward_encoder(imgs)
    assert latent.shape == (5, 1 + 36, mae.encoder.embed_dim)  # the encoder ran on the kept tokens only
    assert mask.shape == (5, 144)
    assert (mask.sum(1) == 108).all()
    assert not torch.equal(mask[0], mask[1])  # random per image
    # the first token is the dummy patch: it equals an encoder run on the dummy + the same kept patches
    x = mae.encoder.forward_embed(imgs)
    ids_keep = ids_restore.argsort(1)[:, :36]  # kept patches, in the order the encoder saw them
    assert (mask.gather(1, ids_keep) == 0).all()
    kept = x[:, 1:].gather(1, ids_keep[:, :, None].expand(-1, -1, x.shape[-1]))
    ref = mae.encoder.norm(mae.encoder.blocks(torch.cat([x[:, :1], kept], 1)))
    torch.testing.assert_close(latent, ref)


def test_random_masking_restores_order():
    x = torch.arange(2 * 144, dtype=torch.float).reshape(2, 144, 1)
    noise = torch.rand(2, 144)
    kept, mask, ids_restore = random_masking(x, 0.75, noise)
    full = torch.cat([kept, torch.full((2, 108, 1), -1.)], 1).gather(1, ids_restore[:, :, None])
    assert torch.equal(full[mask == 0], x[mask == 0])
    assert (full[mask == 1] == -1).all()
    assert torch.equal(kept[:, :, 0], x[:, :, 0].gather(1, noise.argsort(1)[:, :36]))  # smallest noise is kept


def test_patchify_matches_patch_embed_order_and_inverts():
    imgs = torch.randn(2, 3, 36, 36)
    p = patchify(imgs, 3)
    assert p.shape == (2, 144, 27)
    # patch 13 = row 1, column 1 of the 12x12 grid, pixels in (p, q, c) order
    torch.testing.assert_close(p[0, 13].reshape(3, 3, 3).permute(2, 0, 1), imgs[0, :, 3:6, 3:6])
    assert torch.equal(unpatchify(p, 3, (12, 12), 3), imgs)


@pytest.mark.parametrize('norm_pix', [False, True])
def test_loss_terms_match_a_direct_computation(norm_pix):
    torch.manual_seed(0)
    mae = _small_mae(alpha=0.3, beta=0.7, norm_pix_loss=norm_pix).train()
    imgs = torch.randn(4, 3, 36, 36)
    out = mae(imgs)
    target = patchify(imgs, 3)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** .5
    err = (out.pred - target) ** 2  # [B, 144, 27]
    m = out.mask.bool()
    masked = err[m].mean()
    unmasked = err[~m].mean()
    moe = sum(layer.last_loss for _, layer in named_moe_layers(mae))
    assert len(named_moe_layers(mae)) == 3 + 4
    torch.testing.assert_close(out.loss_masked, masked)
    torch.testing.assert_close(out.loss_unmasked, unmasked)
    torch.testing.assert_close(out.loss_moe, moe)
    torch.testing.assert_close(out.loss, masked + 0.3 * unmasked + 0.7 * moe)
    assert out.loss_moe > 0


def test_eval_forward_has_no_stale_moe_loss():
    mae = _small_mae()
    mae.train()(torch.randn(2, 3, 36, 36))
    out = mae.eval()(torch.randn(2, 3, 36, 36))
    assert out.loss_moe == 0
    torch.testing.assert_close(out.loss, out.loss_masked + 0.1 * out.loss_unmasked)


def test_moe_loss_reaches_gradients_only_through_beta():
    torch.manual_seed(0)
    mae = _small_mae(beta=0.).train()
    gate = mae.encoder.blocks[0].mlp.gate.weight
    imgs, noise = torch.randn(4, 3, 36, 36), torch.rand(4, 144)
    torch.manual_seed(1)
    mae(imgs, noise).loss.backward()
    g0 = gate.grad.clone()
    mae.zero_grad()
    mae.beta = 1.
    torch.manual_seed(1)
    out = mae(imgs, noise)
    (out.loss_masked + 0.1 * out.loss_unmasked).backward()
    torch.testing.assert_close(gate.grad, g0)  # β = 0 means no balance-loss gradient at all (hook is off)


def test_fixed_noise_gives_a_fixed_mask():
    mae = _small_mae().eval()
    imgs, noise = torch.randn(2, 3, 36, 36), torch.rand(2, 144)
    assert torch.equal(mae(imgs, noise).mask, mae(imgs, noise).mask)


def test_pred_to_images_pastes_kept_patches_and_inverts_normalisation():
    mae = _small_mae().eval()
    imgs = torch.rand(2, 3, 36, 36) * 2 - 1  # normalised with mean = std = 0.5
    out = mae(imgs)
    rec = mae.pred_to_images(out.pred, imgs, out.mask)
    assert rec.shape == imgs.shape and rec.min() >= 0 and rec.max() <= 1
    kept = (1 - out.mask).reshape(2, 12, 12).repeat_interleave(3, 1).repeat_interleave(3, 2).bool()
    torch.testing.assert_close(rec.permute(0, 2, 3, 1)[kept], (imgs * 0.5 + 0.5).permute(0, 2, 3, 1)[kept])
    perfect = mae.pred_to_images(patchify(imgs, 3))
    torch.testing.assert_close(perfect, imgs * 0.5 + 0.5)


def test_unknown_or_non_mlit_encoder_is_rejected():
    with pytest.raises(ValueError, match='unknown model'):
        MaskedAutoencoderMLiT('mlit_nonexistent')
    with pytest.raises(ValueError, match='mLiT'):
        MaskedAutoencoderMLiT(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_training_on_a_fixed_batch_drives_the_loss_down():
    torch.manual_seed(0)
    mae = _small_mae(decoder_moe_drop_rate=0.).train()
    # smooth images (what reconstruction can learn): low-frequency patterns
    yy, xx = torch.meshgrid(torch.linspace(0, 3.14, 36), torch.linspace(0, 3.14, 36), indexing='ij')
    imgs = torch.stack([torch.stack([torch.sin(xx * (i + 1) + c) * torch.cos(yy * (c + 1)) for c in range(3)])
                        for i in range(8)])
    noise = torch.rand(8, 144)
    opt = torch.optim.AdamW(mae.parameters(), lr=2e-3)
    first = None
    for _ in range(40):
        out = mae(imgs, noise)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else out.loss.item()
    assert out.loss.item() < 0.5 * first, (first, out.loss.item())


def test_an_encoder_whose_moe_layers_add_their_own_loss_is_refused():
    """eq. 16 weighs the balance losses by β once: an encoder built with the MoE hook on would count them twice."""
    with pytest.raises(ValueError, match='moe_loss_weight=0'):
        MaskedAutoencoderMLiT(timm.create_model('mlit_xxs', depth=3, num_classes=0))
    with pytest.raises(ValueError, match='leave moe_loss_weight out'):
        MaskedAutoencoderMLiT('mlit_xxs', depth=3, moe_loss_weight=1.)
    mae = MaskedAutoencoderMLiT(timm.create_model('mlit_xxs', depth=3, num_classes=0, moe_loss_weight=0.))
    assert all(m.loss_weight == 0. for _, m in named_moe_layers(mae))
