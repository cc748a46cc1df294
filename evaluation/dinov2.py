"""DINOv2, the image encoder of the paper's image-similarity metric, in plain PyTorch.

DINOv2 (Oquab et al. 2023, arXiv:2304.07193) is a ViT trained by self-distillation without labels; its CLS embedding
puts two photos of the same object close together whatever the background or pose, which is why DreamBooth-style
papers (and DCO, §5) score subject and style fidelity as the cosine of DINO embeddings of a sample and a reference.

    model = load_dinov2(folder)     # a hub-layout folder (eval.py fetches hub ids such as facebook/dinov2-large)
    emb = model(pixels)                                # [B, C]: the CLS state after the final LayerNorm

The ViT: 14x14 patches (a strided conv), a learned CLS token, learned position embeddings for the pretraining grid
(37x37 at 518 px) resized bicubically to the input's grid, then pre-LayerNorm blocks whose two residual branches are
each scaled by a learned per-channel "layer scale" (Touvron et al. 2021, CaiT, arXiv:2103.17239), which lets deep ViTs
train. ViT-g uses a SwiGLU MLP (Shazeer 2020, arXiv:2002.05202) instead of GELU.

Module names equal the hub's `model.safetensors` keys (`encoder.layer.0.attention.attention.query.weight`, ...), so a
hub folder loads with one `load_state_dict(strict=True)`.
"""
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from text_encoder import ACTIVATIONS, CLIPMLP  # the same fc1 -> activation -> fc2 MLP as CLIP's, same key names


class Attention(nn.Module):
    """Multi-head self-attention, no mask: every patch sees every patch. Names as in the hub files."""

    def __init__(self, dim, n_heads, qkv_bias=True):
        super().__init__()
        self.n_heads = n_heads
        self.attention = nn.ModuleDict({k: nn.Linear(dim, dim, bias=qkv_bias) for k in ("query", "key", "value")})
        self.output = nn.ModuleDict(dict(dense=nn.Linear(dim, dim)))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (self.attention[n](x).view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
                   for n in ("query", "key", "value"))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.output.dense(y.transpose(1, 2).reshape(B, T, C))


class LayerScale(nn.Module):
    """y = lambda1 * x, one learned gain per channel (CaiT)."""

    def __init__(self, dim):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.lambda1


class SwiGLU(nn.Module):
    """ViT-g's MLP: silu(x W_gate) * (x W_up), then W_out. The hub stores W_gate and W_up stacked as `weights_in`
    (gate first), as the original DINOv2 code computes both with one matmul. Hidden width: 2/3 of mlp_ratio * dim
    (same parameter count as a GELU MLP), rounded up to a multiple of 8."""

    def __init__(self, dim, mlp_ratio):
        super().__init__()
        hidden = (int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8
        self.weights_in, self.weights_out = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        gate, up = self.weights_in(x).chunk(2, dim=-1)
        return self.weights_out(F.silu(gate) * up)


class Layer(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, eps = config["hidden_size"], config["layer_norm_eps"]
        self.norm1 = nn.LayerNorm(C, eps=eps)
        self.attention = Attention(C, config["num_attention_heads"], config.get("qkv_bias", True))
        self.layer_scale1 = LayerScale(C)
        self.norm2 = nn.LayerNorm(C, eps=eps)
        ratio = config.get("mlp_ratio", 4)
        swiglu = config.get("use_swiglu_ffn")
        self.mlp = SwiGLU(C, ratio) if swiglu else CLIPMLP(C, int(C * ratio), config["hidden_act"])
        self.layer_scale2 = LayerScale(C)

    def forward(self, x):
        x = x + self.layer_scale1(self.attention(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class Dinov2(nn.Module):
    """DINOv2 ViT from a hub config.json dict. forward(pixels [B,3,H,W], H and W multiples of the patch size)
    -> [B, hidden_size], the CLS token's final state after the last LayerNorm (the hub model's `pooler_output`)."""

    def __init__(self, config: dict):
        super().__init__()
        if config.get("model_type") != "dinov2":
            raise ValueError(f"config.json: model_type {config.get('model_type')!r}, not 'dinov2': pass a DINOv2 "
                             "checkpoint such as facebook/dinov2-large")
        if not config.get("use_swiglu_ffn") and config.get("hidden_act") not in ACTIVATIONS:
            raise ValueError(f"config.json: hidden_act {config.get('hidden_act')!r} is not one of {list(ACTIVATIONS)}")
        C, p = config["hidden_size"], config["patch_size"]
        self.patch_size = p
        grid = config["image_size"] // p  # the pretraining grid the position embeddings were learned on
        embeddings = dict(
            cls_token=nn.Parameter(torch.zeros(1, 1, C)),
            position_embeddings=nn.Parameter(torch.zeros(1, grid * grid + 1, C)),
        )
        if config.get("use_mask_token", True):  # iBOT's masked-patch token: used in training only, but in the file
            embeddings["mask_token"] = nn.Parameter(torch.zeros(1, C))
        self.embeddings = nn.Module()
        for name, param in embeddings.items():
            self.embeddings.register_parameter(name, param)
        self.embeddings.patch_embeddings = nn.Module()
        self.embeddings.patch_embeddings.projection = nn.Conv2d(config.get("num_channels", 3), C, p, stride=p)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(Layer(config) for _ in range(config["num_hidden_layers"]))
        self.layernorm = nn.LayerNorm(C, eps=config["layer_norm_eps"])

    def position_embeddings(self, h, w):
        """[1, 1 + h*w, C]: the CLS position, then the learned grid resized to h x w patches.

        Bicubic, align_corners=False, computed in float32, to the exact target size: what transformers' Dinov2Model
        does, our parity oracle. (The original DINOv2 code passes a scale factor (h + 0.1) / grid instead of the size,
        which samples at very slightly different points.) The learned grid is used as is when it fits already."""
        pos = self.embeddings.position_embeddings
        grid = int((pos.shape[1] - 1) ** 0.5)
        if (h, w) == (grid, grid):
            return pos
        patch_pos = pos[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos.float(), size=(h, w), mode="bicubic", align_corners=False).to(pos.dtype)
        return torch.cat([pos[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)

    def forward(self, pixels):
        B, _, H, W = pixels.shape
        x = self.embeddings.patch_embeddings.projection(pixels)  # [B, C, H/p, W/p]
        h, w = x.shape[2:]
        x = torch.cat([self.embeddings.cls_token.expand(B, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        x = x + self.position_embeddings(h, w)
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x)[:, 0]


def load_dinov2(folder, device="cpu", dtype=torch.float32) -> Dinov2:
    """A DINOv2 from a local folder in the hub layout (config.json + model.safetensors)."""
    from safetensors.torch import load_file

    config_path, weights = os.path.join(folder, "config.json"), os.path.join(folder, "model.safetensors")
    for path in (config_path, weights):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: a DINOv2 folder needs config.json and model.safetensors")
    with open(config_path) as f:
        model = Dinov2(json.load(f))
    model.load_state_dict(load_file(weights), strict=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
