"""Convert between the single-file SDXL checkpoint and the diffusers hub layout.

Most users have SDXL as one file, `sd_xl_base_1.0.safetensors` (what ComfyUI and A1111 load). It stores all four
models under the names of Stability's original code ("SGM", github.com/Stability-AI/generative-models). Our
models use the names of the diffusers hub folders (`unet/`, `vae/`, `text_encoder/`, `text_encoder_2/`).

| component       | SGM prefix in the single file            | SGM naming                       | hub naming (ours)                 |
|-----------------|------------------------------------------|----------------------------------|-----------------------------------|
| UNet            | `model.diffusion_model.`                 | `input_blocks.4.1.proj_in`       | `down_blocks.1.attentions.0.proj_in` |
|                 |                                          | `input_blocks.4.0.in_layers.2`   | `down_blocks.1.resnets.0.conv1`   |
| VAE             | `first_stage_model.`                     | `decoder.up.3.block.0`           | `decoder.up_blocks.0.resnets.0`   |
|                 |                                          | `encoder.mid.attn_1.q` (1x1 conv)| `encoder.mid_block.attentions.0.to_q` (Linear) |
| CLIP ViT-L/14   | `conditioner.embedders.0.transformer.`   | `text_model.…` (HF names)        | `text_model.…` (same)             |
| OpenCLIP bigG   | `conditioner.embedders.1.model.`         | `transformer.resblocks.3.attn.in_proj_weight` = cat(q,k,v) | `text_model.encoder.layers.3.self_attn.{q,k,v}_proj.weight` |
|                 |                                          | `text_projection` P (x @ P)      | `text_projection.weight` = P.T (Linear) |

The UNet and VAE names are not listed but derived from the configs by rules, so they also hold for tiny test models:
* UNet: SGM numbers the blocks flat. `input_blocks.0` is conv_in; then each down level has `layers_per_block`
  blocks (resnet `.0`, attention `.1`) plus one block holding the downsampler. `output_blocks` do the same with
  `layers_per_block + 1` blocks per level, the upsampler sitting after the resnet (and attention) of the last one.
  Inside a resnet, SGM names the layers by their index in its Sequentials (`in_layers.2` is conv1, etc.).
* VAE: the decoder's up levels are numbered in reverse (diffusers `up_blocks.0` is SGM `up.3`).
"""

import json
import math
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TE_PREFIX = "conditioner.embedders.0.transformer."  # CLIP ViT-L/14, HF names inside
TE2_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP ViT-bigG/14

# (hub name, SGM name) of a resnet's layers: SGM keeps them in Sequentials in_layers=[GN, SiLU, conv],
# emb_layers=[SiLU, Linear], out_layers=[GN, SiLU, Dropout, conv], hence the odd indices.
UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
               ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
VAE_RESNET = (("conv_shortcut", "nin_shortcut"),)
VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
# Per-layer bigG names that are a plain rename; q/k/v (fused in SGM) are handled separately.
BIGG_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
              ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))
# OpenCLIP's learned temperature for image-text matching. SDXL never uses it; we write it only so a converted file has
# the same keys as the original. The value is a placeholder (ln 100, where OpenCLIP clamps it), not the trained one.
LOGIT_SCALE_PLACEHOLDER = math.log(100.0)


# ---------------------------------------------------------------------------------------------------------------
# Name rules: a list of (hub prefix, SGM prefix, renames of the first sub-name inside that block)


def _swap_prefix(name: str, pairs, reverse: bool):
    """Replace the leading dotted prefix `a` of `name` by `b` for the first matching (a, b) pair; None if none match."""
    for a, b in pairs:
        src, dst = (b, a) if reverse else (a, b)
        if name == src or name.startswith(src + "."):
            return dst + name[len(src):]
    return None


def _rename(name: str, rules, reverse: bool) -> str:
    for hub, sgm, inner in rules:
        src, dst = (sgm, hub) if reverse else (hub, sgm)
        if name == src or name.startswith(src + "."):
            rest = name[len(src) + 1:]
            if not rest:
                return dst
            return dst + "." + (_swap_prefix(rest, inner, reverse) or rest)
    raise ValueError(f"'{name}' matches no {'SGM' if reverse else 'diffusers'} block of this config")


def _unet_rules(cfg: dict) -> list:
    per_level = cfg["layers_per_block"]
    n_levels = len(cfg["block_out_channels"])
    rules = [("conv_in", "input_blocks.0.0", ()), ("time_embedding.linear_1", "time_embed.0", ()),
             ("time_embedding.linear_2", "time_embed.2", ()), ("add_embedding.linear_1", "label_emb.0.0", ()),
             ("add_embedding.linear_2", "label_emb.0.2", ()), ("conv_norm_out", "out.0", ()), ("conv_out", "out.2", ())]
    for i, kind in enumerate(cfg["down_block_types"]):
        first = 1 + i * (per_level + 1)  # input_blocks.0 is conv_in
        for j in range(per_level):
            rules.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{first + j}.0", UNET_RESNET))
            if "CrossAttn" in kind:
                rules.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{first + j}.1", ()))
        if i < n_levels - 1:  # the last level does not downsample
            rules.append((f"down_blocks.{i}.downsamplers.0", f"input_blocks.{first + per_level}.0", (("conv", "op"),)))
    rules += [("mid_block.resnets.0", "middle_block.0", UNET_RESNET), ("mid_block.attentions.0", "middle_block.1", ()),
              ("mid_block.resnets.1", "middle_block.2", UNET_RESNET)]
    for i, kind in enumerate(cfg["up_block_types"]):
        first = i * (per_level + 1)
        has_attention = "CrossAttn" in kind
        for j in range(per_level + 1):
            rules.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{first + j}.0", UNET_RESNET))
            if has_attention:
                rules.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{first + j}.1", ()))
        if i < n_levels - 1:  # the upsampler is the next module of the level's last block
            rules.append((f"up_blocks.{i}.upsamplers.0", f"output_blocks.{first + per_level}.{2 if has_attention else 1}", ()))
    return rules


def _vae_rules(cfg: dict) -> list:
    per_level = cfg["layers_per_block"]
    n_levels = len(cfg["block_out_channels"])
    rules = [("quant_conv", "quant_conv", ()), ("post_quant_conv", "post_quant_conv", ())]
    for side in ("encoder", "decoder"):
        rules += [(f"{side}.conv_in", f"{side}.conv_in", ()), (f"{side}.conv_out", f"{side}.conv_out", ()),
                  (f"{side}.conv_norm_out", f"{side}.norm_out", ()),
                  (f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", VAE_RESNET),
                  (f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", VAE_RESNET),
                  (f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", VAE_ATTENTION)]
    for i in range(n_levels):
        rules += [(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", VAE_RESNET)
                  for j in range(per_level)]
        up = n_levels - 1 - i  # SGM numbers decoder levels by resolution (0 = full size), diffusers in run order
        rules += [(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{up}.block.{j}", VAE_RESNET)
                  for j in range(per_level + 1)]
        if i < n_levels - 1:
            rules.append((f"encoder.down_blocks.{i}.downsamplers.0", f"encoder.down.{i}.downsample", ()))
            rules.append((f"decoder.up_blocks.{i}.upsamplers.0", f"decoder.up.{up}.upsample", ()))
    return rules


def sgm_unet_name(diffusers_name: str, unet_config: dict) -> str:
    """Hub UNet key or module path -> SGM path without the 'model.diffusion_model.' prefix."""
    return _rename(diffusers_name, _unet_rules(unet_config), reverse=False)


def diffusers_unet_name(sgm_name: str, unet_config: dict) -> str:
    """SGM UNet key or module path (no 'model.diffusion_model.' prefix) -> hub name."""
    return _rename(sgm_name, _unet_rules(unet_config), reverse=True)


def sgm_vae_name(diffusers_name: str, vae_config: dict) -> str:
    return _rename(diffusers_name, _vae_rules(vae_config), reverse=False)


def diffusers_vae_name(sgm_name: str, vae_config: dict) -> str:
    return _rename(sgm_name, _vae_rules(vae_config), reverse=True)


# ---------------------------------------------------------------------------------------------------------------
# Recognising the file


def read_header(path) -> dict[str, dict]:
    """Tensor entries of a .safetensors header ({name: {"dtype", "shape", ...}}) without reading the tensors.

    The format is an 8-byte little-endian header length, then that many bytes of JSON, then the raw data.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n)) if 0 < n < 2**28 else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a .safetensors file (only .safetensors checkpoints can be loaded)")
    header.pop("__metadata__", None)
    return header


def _shape(v):
    if v is None:
        return None
    if isinstance(v, dict):  # a read_header entry
        return tuple(v["shape"])
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def _what_is_wrong(shapes: dict, adm_in_channels: int = 2816):
    """None if this looks like SDXL base, else a short description of what it looks like instead.
    Shapes may be None (names only); then only the names are checked."""
    keys = list(shapes)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if any("lora_" in k or k.endswith(".alpha") for k in keys):
        return "looks like a LoRA file, not a full model checkpoint"
    if not has(UNET_PREFIX):
        if has("down_blocks.") or has("text_model.") or has("encoder.down_blocks."):
            return "looks like a single component in diffusers layout, not a single-file checkpoint"
        return f"has no '{UNET_PREFIX}' keys, so it is not a Stable Diffusion single-file checkpoint"
    if has("cond_stage_model.model."):
        return "looks like Stable Diffusion 2.x (one OpenCLIP text encoder under cond_stage_model.)"
    if has("cond_stage_model.transformer."):
        return "looks like Stable Diffusion 1.x (one CLIP text encoder under cond_stage_model.)"
    if has("conditioner.embedders.0.model.") and not has("conditioner.embedders.1."):
        return "looks like the SDXL refiner (only the OpenCLIP bigG text encoder)"
    for prefix, what in ((VAE_PREFIX, "VAE"), (TE_PREFIX, "CLIP-L text encoder"), (TE2_PREFIX, "bigG text encoder")):
        if not has(prefix):
            return f"has no {what} ('{prefix}' keys); expected UNet, VAE and both text encoders in one file"
    label_emb = _shape(shapes.get(UNET_PREFIX + "label_emb.0.0.weight"))
    if label_emb is not None and adm_in_channels is not None and label_emb[1] != adm_in_channels:
        return f"has a UNet add-embedding input of {label_emb[1]} (the refiner has 2560, SDXL base {adm_in_channels})"
    conv_in = _shape(shapes.get(UNET_PREFIX + "input_blocks.0.0.weight"))
    if conv_in is not None and conv_in[1] != 4:
        return f"has a UNet with {conv_in[1]} input channels (an inpainting model?); SDXL base has 4"
    return None


def is_sdxl_checkpoint(keys) -> bool:
    """True if these key names look like an SDXL base single-file checkpoint."""
    return _what_is_wrong({k: None for k in keys}) is None


def check_sdxl_checkpoint(state_dict_or_header_shapes: dict, path, adm_in_channels: int = 2816) -> None:
    """Raise a one-line ValueError unless this is an SDXL base single file.
    Values may be tensors, shapes or read_header() entries; adm_in_channels is the UNet config's
    projection_class_embeddings_input_dim (2816 for SDXL base; tests pass their tiny model's)."""
    problem = _what_is_wrong(state_dict_or_header_shapes, adm_in_channels)
    if problem:
        raise ValueError(f"{path}: {problem}; expected the SDXL base 1.0 single file (sd_xl_base_1.0.safetensors)")


# ---------------------------------------------------------------------------------------------------------------
# Whole state dicts


def _under(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _is_vae_attention_weight(hub_name: str) -> bool:
    # q/k/v/proj_out are 1x1 convs in SGM and Linears in diffusers; the GroupNorm weight there is 1-d either way.
    return ".attentions." in hub_name and hub_name.endswith(".weight") and "group_norm" not in hub_name


def _bigg_renames(n_layers: int) -> list:
    pairs = [("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
             ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
             ("text_model.final_layer_norm.weight", "ln_final.weight"),
             ("text_model.final_layer_norm.bias", "ln_final.bias")]
    for i in range(n_layers):
        for hub, sgm in BIGG_LAYER:
            for p in ("weight", "bias"):
                pairs.append((f"text_model.encoder.layers.{i}.{hub}.{p}", f"transformer.resblocks.{i}.{sgm}.{p}"))
    return pairs


def _take(state_dict: dict, key: str, where: str):
    try:
        return state_dict.pop(key)
    except KeyError:
        raise ValueError(f"{where}: missing tensor '{key}'") from None


def _check_consumed(state_dict: dict, where: str):
    if state_dict:
        raise ValueError(f"{where}: {len(state_dict)} unexpected tensors, e.g. '{next(iter(state_dict))}'")


def _bigg_to_hub(sgm: dict, n_layers: int) -> dict:
    sgm, out = dict(sgm), {}
    for hub, name in _bigg_renames(n_layers):
        out[hub] = _take(sgm, name, TE2_PREFIX)
    for i in range(n_layers):
        for p in ("weight", "bias"):
            # OpenCLIP uses nn.MultiheadAttention: one in_proj = cat(q, k, v) along the output axis.
            # clone: views into one storage could not be saved to .safetensors as separate tensors.
            q, k, v = _take(sgm, f"transformer.resblocks.{i}.attn.in_proj_{p}", TE2_PREFIX).chunk(3)
            for qkv, t in zip("qkv", (q, k, v)):
                out[f"text_model.encoder.layers.{i}.self_attn.{qkv}_proj.{p}"] = t.clone()
    # OpenCLIP computes x @ P; a Linear computes x @ W.T, so W = P.T.
    out["text_projection.weight"] = _take(sgm, "text_projection", TE2_PREFIX).T.contiguous()
    sgm.pop("logit_scale", None)
    _check_consumed(sgm, TE2_PREFIX)
    return out


def _bigg_to_sgm(hub: dict, n_layers: int) -> dict:
    hub, out = dict(hub), {}
    for name, sgm in _bigg_renames(n_layers):
        out[sgm] = _take(hub, name, "text_encoder_2")
    for i in range(n_layers):
        for p in ("weight", "bias"):
            qkv = [_take(hub, f"text_model.encoder.layers.{i}.self_attn.{x}_proj.{p}", "text_encoder_2") for x in "qkv"]
            out[f"transformer.resblocks.{i}.attn.in_proj_{p}"] = torch.cat(qkv)
    projection = _take(hub, "text_projection.weight", "text_encoder_2")
    out["text_projection"] = projection.T.contiguous()
    out["logit_scale"] = torch.tensor(LOGIT_SCALE_PLACEHOLDER, dtype=projection.dtype, device=projection.device)
    _check_consumed(hub, "text_encoder_2")
    return out


def sgm_to_diffusers(state_dict: dict, unet_config: dict, vae_config: dict, te_config: dict, te2_config: dict) -> dict:
    """Single-file SGM state dict -> {"unet", "vae", "text_encoder", "text_encoder_2"} state dicts in hub on-disk names.

    Tensors keep their dtype. `te_config` is accepted for symmetry: CLIP-L keeps its HF names in the single file.
    Keys outside the four model prefixes (none in sd_xl_base_1.0) are ignored.
    """
    unet_rules, vae_rules = _unet_rules(unet_config), _vae_rules(vae_config)
    unet = {_rename(k, unet_rules, reverse=True): v for k, v in _under(state_dict, UNET_PREFIX).items()}
    vae = {}
    for k, v in _under(state_dict, VAE_PREFIX).items():
        name = _rename(k, vae_rules, reverse=True)
        vae[name] = v.flatten(1) if _is_vae_attention_weight(name) else v  # [C, C, 1, 1] -> [C, C]
    # position_ids is a constant buffer (arange), not a weight; hub files and our model do without it.
    te = {k: v for k, v in _under(state_dict, TE_PREFIX).items() if not k.endswith("position_ids")}
    te2 = _bigg_to_hub(_under(state_dict, TE2_PREFIX), te2_config["num_hidden_layers"])
    return {"unet": unet, "vae": vae, "text_encoder": te, "text_encoder_2": te2}


def diffusers_to_sgm(components: dict, unet_config: dict, vae_config: dict, te_config: dict, te2_config: dict) -> dict:
    """Exact inverse of sgm_to_diffusers: hub-layout component state dicts -> one SGM state dict.

    Like the original file it also holds CLIP-L's `position_ids` and bigG's (unused) `logit_scale`. Missing or empty
    components are skipped, so e.g. a UNet alone can be converted.
    """
    out = {}
    unet_rules, vae_rules = _unet_rules(unet_config), _vae_rules(vae_config)
    for k, v in components.get("unet", {}).items():
        out[UNET_PREFIX + _rename(k, unet_rules, reverse=False)] = v
    for k, v in components.get("vae", {}).items():
        out[VAE_PREFIX + _rename(k, vae_rules, reverse=False)] = v[:, :, None, None] if _is_vae_attention_weight(k) else v
    te = components.get("text_encoder", {})
    for k, v in te.items():
        out[TE_PREFIX + k] = v
    if te and "text_model.embeddings.position_ids" not in te:
        positions = torch.arange(te_config["max_position_embeddings"]).unsqueeze(0)
        out[TE_PREFIX + "text_model.embeddings.position_ids"] = positions
    if components.get("text_encoder_2"):
        for k, v in _bigg_to_sgm(components["text_encoder_2"], te2_config["num_hidden_layers"]).items():
            out[TE2_PREFIX + k] = v
    return out
