"""The Stable Diffusion XL UNet (Podell et al. 2023, "SDXL", arXiv:2307.01952) in plain PyTorch.

The epsilon-prediction network of SDXL-base: a 3-level latent UNet (Ronneberger et al. 2015; Rombach et al. 2022,
"High-Resolution Image Synthesis with Latent Diffusion Models") whose deeper levels carry Transformer blocks that
cross-attend to the 2048-wide concatenated CLIP text features, conditioned on the timestep plus SDXL's "micro-
conditioning" (pooled text embedding + original size, crop offset, target size).

Every attribute name equals the diffusers `UNet2DConditionModel` checkpoint key, so the hub's
`unet/diffusion_pytorch_model.safetensors` loads with one `load_state_dict(sd, strict=True)`. Only the config
features SDXL uses are implemented; `UNet(config)` raises ValueError for anything else.
"""
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from product.files import read_json


def load_unet_config(path) -> dict:
    """Read a diffusers unet/config.json (a directory holding one also works)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"UNet config not found: {path} (pass the unet/config.json of an SDXL checkpoint)")
    return read_json(path)  # malformed: a ValueError naming the file


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, shift: float) -> torch.Tensor:
    """Sinusoidal embedding of a 1-D tensor of (possibly fractional) numbers: [N] -> [N, dim], always fp32.

    Frequencies run geometrically from 1 to 1/10000 (Vaswani et al. 2017). fp32 because t reaches ~1000 and the
    phase t*freq would lose whole radians in bf16/fp16; callers cast the result to the weight dtype.
    """
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift)
    args = t.float()[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)], -1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    """Two-layer MLP lifting a sinusoidal (or concatenated) embedding to the 4*C0-wide conditioning vector."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, with the conditioning vector added as a per-channel bias in between."""

    def __init__(self, cin: int, cout: int, temb_dim: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb_act):
        # temb_act is SiLU(emb), computed once per UNet call rather than once in each of the ~20 resnets.
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(temb_act)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Multi-head attention on [B, N, C]; self-attention when context is None, else cross-attention to context.

    q/k/v stay separate plain nn.Linear layers on batch-first tensors so LoRA can wrap each one in place.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # a list only so the key reads `to_out.0` (1 was dropout)

    def forward(self, x, context=None):
        context = x if context is None else context
        # [B, N, C] -> [B, heads, N, C/heads] as views: SDPA takes strided inputs, so no .contiguous() copies.
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        # Fused flash/memory-efficient kernel; its default scale is 1/sqrt(head_dim), as the paper's attention.
        out = F.scaled_dot_product_attention(q, k, v)
        # Flash attention already returns [B, N, heads, d] memory, so this reshape is usually a free view.
        return self.to_out[0](out.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one Linear to 2*inner, half of it gating the other half."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)  # chunk gives views: no copy of the 8C-wide activation
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # Index 1 (dropout p=0 in the reference) is kept as Identity so the Linear's key stays `net.2`.
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention to the text, GEGLU MLP; each residual."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """Feature map -> token sequence -> `depth` transformer blocks -> feature map, added to the input."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)  # use_linear_projection: Linear on tokens, not a 1x1 conv
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C))
        for block in self.transformer_blocks:
            h = block(h, context)
        h = self.proj_out(h).view(B, H, W, C).permute(0, 3, 1, 2)
        # The residual goes first so the sum is laid out like x (contiguous NCHW): no separate .contiguous() copy.
        return x + h


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _run(module, use_checkpoint: bool, *args):
    # Gradient checkpointing: keep only the block inputs, recompute the insides during backward.
    return checkpoint(module, *args, use_reentrant=False) if use_checkpoint else module(*args)


class DownBlock(nn.Module):
    """One encoder level: `layers` resnets (each followed by a Transformer2D if cross_attn), then maybe a stride-2
    conv. Returns every intermediate output: they are the skip connections of the decoder."""

    def __init__(self, cin, cout, layers, temb_dim, groups, eps, cross_attn, heads, depth, context_dim, downsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(cin if i == 0 else cout, cout, temb_dim, groups, eps) for i in range(layers)])
        self.attentions = nn.ModuleList(
            [Transformer2D(cout, heads, depth, context_dim, groups) for _ in range(layers)]) if cross_attn else None
        self.downsamplers = nn.ModuleList([Downsample2D(cout)]) if downsample else None

    def forward(self, h, temb_act, context, use_checkpoint):
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = _run(resnet, use_checkpoint, h, temb_act)
            if self.attentions is not None:
                h = _run(self.attentions[i], use_checkpoint, h, context)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """Bottleneck: resnet, Transformer2D, resnet."""

    def __init__(self, channels, temb_dim, groups, eps, heads, depth, context_dim):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, temb_dim, groups, eps) for _ in range(2)])
        self.attentions = nn.ModuleList([Transformer2D(channels, heads, depth, context_dim, groups)])

    def forward(self, h, temb_act, context, use_checkpoint):
        h = _run(self.resnets[0], use_checkpoint, h, temb_act)
        h = _run(self.attentions[0], use_checkpoint, h, context)
        return _run(self.resnets[1], use_checkpoint, h, temb_act)


class UpBlock(nn.Module):
    """One decoder level: each resnet eats the running features concatenated with one encoder skip (the latest
    first); `layers + 1` resnets so every encoder output, the downsampled ones included, is consumed once."""

    def __init__(self, prev_out, cout, skip_channels, layers, temb_dim, groups, eps,
                 cross_attn, heads, depth, context_dim, upsample):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D((prev_out if i == 0 else cout) + skip_channels[i], cout, temb_dim, groups, eps)
            for i in range(layers + 1)])
        self.attentions = nn.ModuleList([Transformer2D(cout, heads, depth, context_dim, groups)
                                         for _ in range(layers + 1)]) if cross_attn else None
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if upsample else None

    def forward(self, h, skips, temb_act, context, use_checkpoint):
        for i, resnet in enumerate(self.resnets):
            h = _run(resnet, use_checkpoint, torch.cat([h, skips.pop()], dim=1), temb_act)
            if self.attentions is not None:
                h = _run(self.attentions[i], use_checkpoint, h, context)
        return h if self.upsamplers is None else self.upsamplers[0](h)


# diffusers switches SDXL leaves at their default (first value; also what a missing key means). Any other value
# selects code this file does not have, so the config is refused.
_FIXED = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",), "act_fn": ("silu",), "time_embedding_type": ("positional",),
    "resnet_time_scale_shift": ("default",), "attention_type": ("default",), "class_embed_type": (None,),
    "num_class_embeds": (None,), "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,),
    "time_cond_proj_dim": (None,), "time_embedding_dim": (None,), "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,), "num_attention_heads": (None,), "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,), "center_input_sample": (False,),
    "dual_cross_attention": (False,), "only_cross_attention": (False,), "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False), "resnet_skip_time_act": (False,),
    "mid_block_scale_factor": (1,), "resnet_out_scale_factor": (1,), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "downsample_padding": (1,), "dropout": (0,),
}
# These must be present with exactly this value (their diffusers defaults are the non-SDXL choice).
_REQUIRED = {"addition_embed_type": "text_time", "use_linear_projection": True}


def _per_level(value, levels: int, key: str) -> list:
    if isinstance(value, int):
        return [value] * levels
    if isinstance(value, (list, tuple)) and len(value) == levels and all(isinstance(v, int) for v in value):
        return list(value)
    raise ValueError(f"UNet config: {key}={value!r} must be an int or a list of {levels} ints")


class UNet(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        cfg = {k: v for k, v in config.items() if not k.startswith("_")}
        for key, allowed in _FIXED.items():
            value = cfg.get(key, allowed[0])
            values = value if isinstance(value, (list, tuple)) else [value]  # per-level lists: each entry
            if any(v not in allowed for v in values):
                raise ValueError(f"UNet config: {key}={value!r} is not supported (SDXL uses {allowed[0]!r})")
        for key, want in _REQUIRED.items():
            if cfg.get(key) != want:
                raise ValueError(f"UNet config: {key}={cfg.get(key)!r} is not supported (SDXL uses {want!r})")
        try:
            channels = list(cfg["block_out_channels"])
            down_types, up_types = list(cfg["down_block_types"]), list(cfg["up_block_types"])
            layers, context_dim = cfg["layers_per_block"], cfg["cross_attention_dim"]
            groups, eps = cfg["norm_num_groups"], cfg["norm_eps"]
            self.flip_sin_to_cos, self.freq_shift = cfg["flip_sin_to_cos"], cfg["freq_shift"]
            self.addition_time_embed_dim = cfg["addition_time_embed_dim"]
            add_in_dim = cfg["projection_class_embeddings_input_dim"]
            in_channels, out_channels = cfg["in_channels"], cfg["out_channels"]
            # diffusers quirk: with num_attention_heads null, "attention_head_dim" is the number of HEADS per level.
            heads = _per_level(cfg["attention_head_dim"], len(channels), "attention_head_dim")
        except KeyError as e:
            raise ValueError(f"UNet config is missing the key {e} (pass a diffusers SDXL unet/config.json)") from None
        levels = len(channels)
        depths = _per_level(cfg.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block")
        if not isinstance(layers, int) or not isinstance(context_dim, int):
            raise ValueError("UNet config: layers_per_block and cross_attention_dim must be single ints")
        if any(t not in ("DownBlock2D", "CrossAttnDownBlock2D") for t in down_types) or len(down_types) != levels:
            raise ValueError(f"UNet config: down_block_types={down_types} unsupported: need {levels} of "
                             "DownBlock2D/CrossAttnDownBlock2D")
        if any(t not in ("UpBlock2D", "CrossAttnUpBlock2D") for t in up_types) or len(up_types) != levels:
            raise ValueError(f"UNet config: up_block_types={up_types} unsupported: need {levels} of "
                             "UpBlock2D/CrossAttnUpBlock2D")
        if any(c % h for c, h in zip(channels, heads)):
            raise ValueError(f"UNet config: block_out_channels {channels} not divisible by heads {heads}")
        temb_dim = 4 * channels[0]

        self.gradient_checkpointing = False
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb_dim)
        self.add_embedding = TimestepEmbedding(add_in_dim, temb_dim)
        self.down_blocks = nn.ModuleList([
            DownBlock(channels[max(i - 1, 0)], channels[i], layers, temb_dim, groups, eps,
                      down_types[i] == "CrossAttnDownBlock2D", heads[i], depths[i], context_dim, i < levels - 1)
            for i in range(levels)])
        self.mid_block = MidBlock(channels[-1], temb_dim, groups, eps, heads[-1], depths[-1], context_dim)
        # Skip channels in the order the decoder pops them: conv_in, then each level's resnets and downsampler.
        skip_channels = [channels[0]] + [c for i, c in enumerate(channels) for _ in range(layers + (i < levels - 1))]
        up_blocks, prev = [], channels[-1]
        for i, level in enumerate(reversed(range(levels))):
            skips = [skip_channels.pop() for _ in range(layers + 1)]
            up_blocks.append(UpBlock(prev, channels[level], skips, layers, temb_dim, groups, eps,
                                     up_types[i] == "CrossAttnUpBlock2D", heads[level], depths[level], context_dim,
                                     level > 0))
            prev = channels[level]
        self.up_blocks = nn.ModuleList(up_blocks)
        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=eps)
        self.conv_out = nn.Conv2d(channels[0], out_channels, 3, padding=1)

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        B, _, H, W = sample.shape
        factor = 2 ** (len(self.down_blocks) - 1)
        if H % factor or W % factor:
            raise ValueError(f"UNet: latent size {H}x{W} must be divisible by {factor}")
        dtype = self.conv_in.bias.dtype  # the compute dtype: weights may be stored in fp8 (product/float8.py)
        # `.to(dtype)` is a no-op when inputs already match the weights; it only saves callers a manual cast.
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(B)
        emb = self.time_embedding(timestep_embedding(t, self.conv_in.out_channels, self.flip_sin_to_cos,
                                                     self.freq_shift).to(dtype))
        # SDXL micro-conditioning: each of the time_ids numbers (orig h,w, crop top,left, target h,w) is Fourier-
        # embedded like a timestep and appended to the pooled text embedding.
        micro = timestep_embedding(time_ids.flatten(), self.addition_time_embed_dim, self.flip_sin_to_cos,
                                   self.freq_shift).reshape(B, -1).to(dtype)
        emb = emb + self.add_embedding(torch.cat([text_embeds.to(dtype), micro], dim=-1))
        temb_act = F.silu(emb)
        context = encoder_hidden_states.to(dtype)
        # Only when gradients are being recorded: the no-grad phi pass of DCO and sampling keep nothing anyway.
        use_checkpoint = self.gradient_checkpointing and torch.is_grad_enabled()

        h = self.conv_in(sample.to(dtype))
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb_act, context, use_checkpoint)
            skips += block_skips
        h = self.mid_block(h, temb_act, context, use_checkpoint)
        for block in self.up_blocks:
            h = block(h, skips, temb_act, context, use_checkpoint)  # pops len(block.resnets) skips
        return self.conv_out(F.silu(self.conv_norm_out(h)))
