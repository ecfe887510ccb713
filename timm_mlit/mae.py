""" mmLiT: mLiT pre-trained as a masked autoencoder

"How Lightweight Can a Vision Transformer Be", J. H. Tan, arXiv 2407.17783, §2.2, Tables 2-3; after "Masked
Autoencoders Are Scalable Vision Learners", He et al., arXiv 2111.06377.

Any registered mLiT is the encoder; it sees the dummy patch and the 25% of the patches that are kept. The decoder
(Table 2, the same for every encoder size) is 4 mLiT blocks of width 108 fed by a bias-free projection of the
encoder tokens, a mask token in place of each dropped patch and a fixed 2-D sin-cos positional embedding (§2.2:
"we did not incorporate a separable learnable positional embeddings at the decoder's input"; MAE's fixed ones).
A bias-free head predicts the pixels of every patch.

Loss (eq. 16): MSE over the masked patches + α·MSE over the kept patches + β·Σ MoE balance losses (eq. 12) of the
encoder and decoder layers. The MoE layers are built without their own autograd hook (moe_loss_weight = 0), so
that the balance losses enter the gradients exactly once, through this explicit β term.
"""
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

from .layers import clear_moe_stats, moe_stats, named_moe_layers
from .mlit import MLiT, MLiTBlock

__all__ = ['MaskedAutoencoderMLiT', 'MAEOutput', 'MLiTDecoder', 'random_masking', 'patchify', 'unpatchify']


class MAEOutput(NamedTuple):
    """What `MaskedAutoencoderMLiT.forward` returns: the loss to back-propagate, its terms, and what to plot."""
    loss: torch.Tensor  # eq. 16, a scalar
    loss_masked: torch.Tensor  # MSE over the masked patches
    loss_unmasked: torch.Tensor  # MSE over the kept patches
    loss_moe: torch.Tensor  # Σ MoE balance losses of encoder and decoder (unweighted by β; 0 in eval mode)
    pred: torch.Tensor  # [B, L, p·p·C] predicted pixels of every patch
    mask: torch.Tensor  # [B, L], 1 where the patch was masked


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, p·p·C], patches in the row-major order of timm's PatchEmbed, pixels (p, q, c)."""
    B, C, H, W = imgs.shape
    p = patch_size
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    x = torch.einsum('nchpwq->nhwpqc', x)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, patch_size: int, grid_size: Tuple[int, int], in_chans: int) -> torch.Tensor:
    """[B, L, p·p·C] -> [B, C, H, W], the inverse of `patchify`."""
    B = x.shape[0]
    p = patch_size
    h, w = grid_size
    x = x.reshape(B, h, w, p, p, in_chans)
    x = torch.einsum('nhwpqc->nchpwq', x)
    return x.reshape(B, in_chans, h * p, w * p)


def random_masking(
        x: torch.Tensor,
        mask_ratio: float,
        noise: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random subset of the tokens of each sample: those with the smallest noise.

    Args:
        x: patch tokens (no prefix tokens), [B, L, C].
        mask_ratio: fraction of the L tokens to drop; int(L·(1 - mask_ratio)) are kept.
        noise: uniform noise [B, L] deciding which tokens are kept; drawn from the global RNG when None.

    Returns:
        x_kept: [B, L_keep, C].
        mask: [B, L], 0 for kept, 1 for masked, in the original token order.
        ids_restore: [B, L], the permutation that puts (kept + masked) back in the original order.
    """
    B, L, C = x.shape
    len_keep = int(L * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(B, L, device=x.device)
    elif noise.shape != (B, L):
        raise ValueError(f'masking noise must have shape {(B, L)}, got {tuple(noise.shape)}')
    ids_shuffle = noise.to(x.device).argsort(dim=1)  # [B, L], ascending: kept first
    ids_restore = ids_shuffle.argsort(dim=1)  # [B, L]
    ids_keep = ids_shuffle[:, :len_keep]  # [B, L_keep]
    x_kept = x.gather(1, ids_keep[:, :, None].expand(-1, -1, C))  # [B, L_keep, C]
    mask = torch.ones(B, L, device=x.device)
    mask[:, :len_keep] = 0
    mask = mask.gather(1, ids_restore)  # [B, L], back in the original order
    return x_kept, mask, ids_restore


class MLiTDecoder(nn.Module):
    """The mmLiT decoder (Table 2): projection, mask token, fixed sin-cos positions, mLiT blocks, norm, pixel head."""
    pos_embed: torch.Tensor  # a buffer

    def __init__(
            self,
            encoder_dim: int,
            grid_size: Tuple[int, int],
            patch_size: int,
            in_chans: int,
            embed_dim: int = 108,
            depth: int = 4,
            num_heads: int = 6,
            num_kv_heads: int = 3,
            hidden_dim: int = 72,
            num_experts: int = 3,
            top_k: int = 2,
            moe_drop_rate: float = 0.1,
            moe_loss_coef: float = 1e-2,
            noisy_gating: bool = True,
            moe_impl: str = 'auto',
    ):
        super().__init__()
        self.embed = nn.Linear(encoder_dim, embed_dim, bias=False)  # paper §3: no bias outside the MoE layers
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # fixed 2-D sin-cos embedding of the patch grid; the dummy patch (first token) gets zeros, as MAE's cls token
        pos = build_sincos2d_pos_embed(list(grid_size), dim=embed_dim)  # [L, D]
        self.register_buffer('pos_embed', torch.cat([pos.new_zeros(1, embed_dim), pos])[None], persistent=False)
        self.blocks = nn.Sequential(*[
            MLiTBlock(
                embed_dim, num_heads, num_kv_heads, hidden_dim, num_experts, top_k=top_k, moe_impl=moe_impl,
                moe_drop_rate=moe_drop_rate, moe_loss_coef=moe_loss_coef, moe_loss_weight=0.,
                noisy_gating=noisy_gating,
            )
            for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, patch_size ** 2 * in_chans, bias=False)
        nn.init.normal_(self.mask_token, std=.02)

    def forward(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Args: encoder tokens [B, 1 + L_keep, C_enc] (dummy first), ids_restore [B, L]. Returns [B, L, p·p·C]."""
        x = self.embed(x)  # [B, 1 + L_keep, D]
        B, L = ids_restore.shape
        D = x.shape[-1]
        patches = torch.cat([x[:, 1:], self.mask_token.expand(B, L + 1 - x.shape[1], D)], dim=1)  # [B, L, D]
        patches = patches.gather(1, ids_restore[:, :, None].expand(-1, -1, D))  # [B, L, D], original order
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed  # [B, 1 + L, D]
        x = self.norm(self.blocks(x))
        return self.head(x[:, 1:])  # [B, L, p·p·C], the dummy patch predicts nothing


class MaskedAutoencoderMLiT(nn.Module):
    """mmLiT: a masked autoencoder with an mLiT encoder and the mLiT decoder of Table 2."""

    def __init__(
            self,
            encoder: Union[str, nn.Module] = 'mlit_xxs',
            mask_ratio: float = 0.75,
            alpha: float = 0.1,
            beta: float = 0.5,
            norm_pix_loss: bool = False,
            decoder_embed_dim: int = 108,
            decoder_depth: int = 4,
            decoder_num_heads: int = 6,
            decoder_num_kv_heads: int = 3,
            decoder_hidden_dim: int = 72,
            decoder_num_experts: int = 3,
            decoder_top_k: int = 2,
            decoder_moe_drop_rate: float = 0.1,
            decoder_noisy_gating: bool = True,
            **encoder_kwargs,
    ):
        """
        Args:
            encoder: a registered mLiT model name (created head-less) or an MLiT instance.
            mask_ratio: fraction of the patches hidden from the encoder.
            alpha: weight α of the MSE over the kept patches (eq. 16).
            beta: weight β of the MoE balance losses (eq. 16).
            norm_pix_loss: regress per-patch normalised pixels (MAE's option) instead of the input pixels.
            decoder_*: the decoder of Table 2.
            **encoder_kwargs: passed to timm.create_model when `encoder` is a name (e.g. depth=3).
        """
        super().__init__()
        if not 0 < mask_ratio < 1:
            raise ValueError(f'mask_ratio must be in (0, 1), got {mask_ratio}')
        if isinstance(encoder, str):
            if not timm.is_model(encoder):
                raise ValueError(f'unknown model {encoder!r}; the mLiT models are {timm.list_models("mlit*")}')
            if encoder_kwargs.get('moe_loss_weight', 0.) != 0.:
                raise ValueError(f'moe_loss_weight={encoder_kwargs["moe_loss_weight"]}: the masked autoencoder adds '
                                 'beta x the MoE balance losses itself (eq. 16); leave moe_loss_weight out')
            encoder = timm.create_model(encoder, num_classes=0, **dict(encoder_kwargs, moe_loss_weight=0.))
        elif encoder_kwargs:
            raise ValueError(f'encoder kwargs {sorted(encoder_kwargs)} given with an encoder instance: they would be '
                             'ignored; pass a model name, or build the encoder with them')
        if not isinstance(encoder, MLiT):
            raise ValueError(f'the mmLiT encoder must be an mLiT model, got {type(encoder).__name__}')
        hooked = {name: m.loss_weight for name, m in named_moe_layers(encoder) if m.loss_weight != 0.}
        if hooked:  # the β term of eq. 16 must be the only way the balance losses reach the gradients
            name, weight = next(iter(hooked.items()))
            raise ValueError(
                f'the encoder\'s MoE layers add their balance loss to the gradients themselves ({name}: '
                f'moe_loss_weight={weight}), and the masked autoencoder adds beta x the same losses (eq. 16); build '
                'the encoder with moe_loss_weight=0, or pass its name')
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.alpha = alpha
        self.beta = beta
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.grid_size = encoder.patch_embed.grid_size
        self.in_chans = encoder.in_chans
        self.num_patches = encoder.patch_embed.num_patches
        self.decoder = MLiTDecoder(
            encoder.embed_dim, self.grid_size, self.patch_size, self.in_chans, embed_dim=decoder_embed_dim,
            depth=decoder_depth, num_heads=decoder_num_heads, num_kv_heads=decoder_num_kv_heads,
            hidden_dim=decoder_hidden_dim, num_experts=decoder_num_experts, top_k=decoder_top_k,
            moe_drop_rate=decoder_moe_drop_rate, noisy_gating=decoder_noisy_gating,
        )


    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'encoder.' + k for k in self.encoder.no_weight_decay()} | {'decoder.mask_token'}

    def forward_encoder(
            self,
            imgs: torch.Tensor,
            noise: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the dummy patch and the kept patches. Returns (latent [B, 1 + L_keep, C], mask, ids_restore)."""
        x = self.encoder.forward_embed(imgs)  # [B, 1 + L, C], positions added, the dummy patch first
        patches, mask, ids_restore = random_masking(x[:, 1:], self.mask_ratio, noise)  # [B, L_keep, C]
        x = torch.cat([x[:, :1], patches], dim=1)  # [B, 1 + L_keep, C], the dummy patch always kept
        x = self.encoder.norm(self.encoder.blocks(x))
        return x, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predict the pixels of every patch, [B, L, p·p·C]."""
        return self.decoder(latent, ids_restore)

    def forward_loss(
            self,
            imgs: torch.Tensor,
            pred: torch.Tensor,
            mask: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """eq. 16. Returns (loss, mse_masked, mse_unmasked, moe_loss)."""
        target = patchify(imgs, self.patch_size).float()  # [B, L, p·p·C]
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.e-6) ** .5
        per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # [B, L]
        mse_masked = (per_patch * mask).sum() / mask.sum()
        kept = 1 - mask
        mse_unmasked = (per_patch * kept).sum() / kept.sum().clamp_min(1)
        stats = moe_stats(self)
        moe_loss = per_patch.new_zeros(()) if stats is None else stats.loss
        loss = mse_masked + self.alpha * mse_unmasked + self.beta * moe_loss
        return loss, mse_masked, mse_unmasked, moe_loss

    def forward(self, imgs: torch.Tensor, noise: Optional[torch.Tensor] = None) -> MAEOutput:
        """Args: images [B, C, H, W]; optional masking noise [B, L] (see `random_masking`)."""
        clear_moe_stats(self)  # only this forward's balance losses count (eval forwards record none)
        latent, mask, ids_restore = self.forward_encoder(imgs, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss, mse_masked, mse_unmasked, moe_loss = self.forward_loss(imgs, pred, mask)
        return MAEOutput(loss, mse_masked, mse_unmasked, moe_loss, pred, mask)

    @torch.no_grad()
    def pred_to_images(
            self,
            pred: torch.Tensor,
            imgs: Optional[torch.Tensor] = None,
            mask: Optional[torch.Tensor] = None,
            mean: Union[float, Sequence[float]] = 0.5,
            std: Union[float, Sequence[float]] = 0.5,
    ) -> torch.Tensor:
        """Turn a prediction back into viewable images in [0, 1], [B, C, H, W].

        Args:
            pred: `MAEOutput.pred`, [B, L, p·p·C].
            imgs: the (normalised) input images; needed to undo `norm_pix_loss`, and to paste in the kept patches.
            mask: `MAEOutput.mask`; with `imgs`, the kept patches show the input and only masked ones the prediction.
            mean, std: the input normalisation to undo.
        """
        pred = pred.float()
        if imgs is not None:
            target = patchify(imgs, self.patch_size).float()
            if self.norm_pix_loss:
                pred = pred * (target.var(dim=-1, keepdim=True) + 1.e-6) ** .5 + target.mean(dim=-1, keepdim=True)
            if mask is not None:
                pred = torch.where(mask[:, :, None].bool(), pred, target)
        out = unpatchify(pred, self.patch_size, self.grid_size, self.in_chans)
        shift = torch.as_tensor(mean, dtype=out.dtype, device=out.device).reshape(1, -1, 1, 1)
        scale = torch.as_tensor(std, dtype=out.dtype, device=out.device).reshape(1, -1, 1, 1)
        return (out * scale + shift).clamp(0, 1)

