"""SDXL's VAE: the KL-regularised convolutional autoencoder that maps images to latents and back.

Architecture: the "first stage" autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", appendix G), as retrained for SDXL (Podell et al. 2023, section 2.4).
An encoder of ResNet blocks with three stride-2 downsamples and one single-head self-attention block at the
bottom turns a [B,3,H,W] image in [-1,1] into a diagonal Gaussian over a [B,4,H/8,W/8] latent; a mirrored decoder
maps a latent back to an image. Diffusion runs on `latent * scaling_factor` (0.13025 for SDXL), which gives the
latents roughly unit variance; callers apply and undo that factor, this module does not.

Module names equal the diffusers `AutoencoderKL` state-dict keys (`vae/diffusion_pytorch_model.safetensors`),
so a hub file loads with one `load_state_dict(strict=True)`. Older diffusers files name the attention weights
`query/key/value/proj_attn`; pass those through `convert_legacy_vae_keys` first.

Precision: run in fp32 by default. The original SDXL VAE overflows to inf/NaN in fp16 (its config says
`force_upcast: true`); madebyollin/sdxl-vae-fp16-fix was finetuned to keep activations small and runs in
fp16 (`force_upcast: false`).
"""

import functools
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

GN_EPS = 1e-6  # every GroupNorm in this VAE uses eps 1e-6 (the UNet uses 1e-5)


class ResnetBlock2D(nn.Module):
    """GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3, plus a (1x1-projected when widths differ) skip."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=GN_EPS)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=GN_EPS)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Attention(nn.Module):
    """Single-head self-attention over all H*W positions (only used at the lowest resolution)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=GN_EPS)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])  # a list only so the key reads `to_out.0`

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, H*W, C] tokens
        h = F.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))  # scale 1/sqrt(C)
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class MidBlock2D(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, groups), ResnetBlock2D(ch, ch, groups)])
        self.attentions = nn.ModuleList([Attention(ch, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample2D(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        # The LDM autoencoder pads only right and bottom, so output pixel i sees input pixels 2i..2i+2.
        # A symmetric padding=1 would shift the grid by one pixel and the pretrained weights would not match.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, n_layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(n_layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)]) if downsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, n_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(n_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nn.Module):
    def __init__(self, in_ch: int, z_ch: int, widths: list, n_layers: int, groups: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_ch, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock2D(widths[max(i - 1, 0)], w, n_layers, groups, downsample=i < len(widths) - 1)
            for i, w in enumerate(widths)])
        self.mid_block = MidBlock2D(widths[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=GN_EPS)
        self.conv_out = nn.Conv2d(widths[-1], 2 * z_ch, 3, padding=1)  # mean and log-variance

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, z_ch: int, out_ch: int, widths: list, n_layers: int, groups: int):
        super().__init__()
        rev = list(reversed(widths))
        self.conv_in = nn.Conv2d(z_ch, rev[0], 3, padding=1)
        self.mid_block = MidBlock2D(rev[0], groups)
        # One more resnet per level than the encoder, as in the LDM decoder.
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock2D(rev[max(i - 1, 0)], w, n_layers + 1, groups, upsample=i < len(rev) - 1)
            for i, w in enumerate(rev)])
        self.conv_norm_out = nn.GroupNorm(groups, rev[-1], eps=GN_EPS)
        self.conv_out = nn.Conv2d(rev[-1], out_ch, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """Built from the diffusers `vae/config.json` dict; fp32 unless the caller casts it."""

    def __init__(self, config: dict):
        super().__init__()
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if any(t != want for t in config[key]):
                raise ValueError(f"vae config: {key}={config[key]} is not supported; only {want} blocks are.")
        if config.get("act_fn", "silu") != "silu":
            raise ValueError(f"vae config: act_fn={config['act_fn']!r} is not supported; only 'silu' is.")
        self.config = dict(config)
        self.scaling_factor = float(config["scaling_factor"])
        self.force_upcast = bool(config.get("force_upcast", True))
        widths, n, groups = list(config["block_out_channels"]), config["layers_per_block"], config["norm_num_groups"]
        z = config["latent_channels"]
        self.encoder = Encoder(config["in_channels"], z, widths, n, groups)
        self.decoder = Decoder(z, config["out_channels"], widths, n, groups)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)

    tile = 0  # pixels: > 0 encodes and decodes images larger than tile x tile in overlapping tiles (tiled below)

    @property
    def factor(self):  # pixels per latent cell: 8 for SDXL
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    def encode(self, x):
        """Image [B,3,H,W] in [-1,1] -> (mean, logvar), each [B,latent,H/8,W/8] (unscaled latent space)."""
        if self.tile and max(x.shape[-2:]) > self.tile:
            return tiled(self._encode, x, self.tile, self.tile // 4, 1 / self.factor)
        return self._encode(x)

    def _encode(self, x):
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # keeps exp(logvar) finite

    def decode(self, z):
        """Unscaled latent (divide diffusion latents by `scaling_factor` first) -> image, roughly in [-1,1]."""
        tile = self.tile // self.factor
        if tile and max(z.shape[-2:]) > tile:
            return tiled(self._decode, z, tile, tile // 4, self.factor)
        return self._decode(z)

    def _decode(self, z):
        return self.decoder(self.post_quant_conv(z))


def check_tile(px, flag="--vae-tile"):
    if px != 0 and (px < 64 or px % 32):
        raise ValueError(f"{flag} {px}: must be 0 (whole images) or a multiple of 32 from 64 up (512: SDXL's tiles)")


def tiled(fn, x, tile, overlap, scale):
    """fn on overlapping tile x tile windows of x [B,C,H,W] (each tile `overlap` into the next), its outputs (a tensor
    or a tuple, sizes times `scale`) blended with linear ramps across the overlaps. The peak is one tile's activations
    instead of the whole image's (a 1024^2 SDXL decode: GBs). Not exact: each GroupNorm sees a tile's statistics,
    not the image's, which the blending hides; so only images larger than a tile are tiled, and 0 turns it off."""
    H, W = x.shape[-2:]

    def starts(n):
        return [0] if n <= tile else sorted({*range(0, n - tile, tile - overlap), n - tile})

    acc = norm = None
    length = max(1, round(overlap * scale))  # the ramp, in output pixels
    for top in starts(H):
        for left in starts(W):
            outs = fn(x[..., top:top + tile, left:left + tile])
            outs = outs if isinstance(outs, tuple) else (outs,)
            h, w = outs[0].shape[-2:]
            ramp = functools.partial(_ramp, length=length, device=outs[0].device, dtype=outs[0].dtype)
            weight = ramp(h, top > 0, top + tile < H)[:, None] * ramp(w, left > 0, left + tile < W)[None, :]
            if acc is None:
                size = round(H * scale), round(W * scale)
                acc, norm = [o.new_zeros(*o.shape[:2], *size) for o in outs], outs[0].new_zeros(size)
            t, l = round(top * scale), round(left * scale)
            for a, o in zip(acc, outs):
                a[..., t:t + h, l:l + w] += o * weight
            norm[t:t + h, l:l + w] += weight
    outs = tuple(a / norm for a in acc)
    return outs if len(outs) > 1 else outs[0]


def _ramp(n, rise, fall, length, device, dtype):
    """Blend weights along one side of a tile: rising over its first `length` pixels where a tile comes before,
    falling over its last where one follows, 1 elsewhere (and at the image's borders)."""
    w = torch.ones(n, device=device, dtype=dtype)
    r = (torch.arange(length, device=device, dtype=dtype) + 0.5) / length
    if rise:
        w[:length] = r
    if fall:
        w[n - length:] = torch.minimum(w[n - length:], r.flip(0))
    return w


def latent_dist_sample(mean, logvar, generator: torch.Generator | None = None):
    """One draw from the encoder's diagonal Gaussian: mean + std * noise."""
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * noise


LEGACY_ATTN_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_KEY = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")


def convert_legacy_vae_keys(state_dict: dict) -> dict:
    """Rename old diffusers attention keys (`...attentions.0.query.weight`) to the current ones (`to_q`).

    Attention weights stored as 1x1 convs [C,C,1,1] are flattened to the Linear shape [C,C]. Current keys pass
    through untouched, so this is safe to call on any diffusers VAE state dict.
    """
    out = {}
    for key, value in state_dict.items():
        key = _LEGACY_KEY.sub(lambda m: m.group(1) + LEGACY_ATTN_NAMES[m.group(2)] + ".", key)
        if ".attentions." in key and value.ndim == 4:
            value = value.flatten(1)
        out[key] = value
    return out
