"""Test helper: a tiny random SDXL pipeline saved in the real hub layout by the *reference* libraries.

diffusers' `StableDiffusionXLPipeline` with tiny random components (transformers CLIP text models, diffusers UNet
and VAE in SDXL form) is saved with `save_pretrained`, then its tokenizer folders are replaced by the real hub
layout (`vocab.json` + `merges.txt` with the real 49,408-token vocabulary; transformers 5 would write only a
`tokenizer.json`, which the real SDXL repo does not have). Our loader must read this folder and reproduce the
reference outputs: that is the offline proof that the real download loads the same way.
"""
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from clip_vocab import write_clip_tokenizer_folder

DATA = Path(__file__).parent / "data" / "sdxl"

TE_DIM, TE2_DIM, PROJ_DIM, TIME_DIM = 32, 32, 32, 8
UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4, 4),  # diffusers' name; SDXL uses it as the number of heads
    transformer_layers_per_block=(1, 1, 2), cross_attention_dim=TE_DIM + TE2_DIM, norm_num_groups=8,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=PROJ_DIM + 6 * TIME_DIM,
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
    norm_num_groups=4, sample_size=64, scaling_factor=0.13025, force_upcast=True,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)


def text_config(hidden, act, projection):
    return dict(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=77, hidden_act=act, projection_dim=projection,
                bos_token_id=0, eos_token_id=2, pad_token_id=1)  # SDXL's legacy ids: eos 2 => argmax pooling


def randomize(module, seed=0):
    """Re-draw every parameter (fan-in scaled, norm gains near 1) so zero- or one-initialised layers cannot hide
    a bug in a comparison, while activations stay of order 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.1 * noise)
    return module


def build_pipeline(seed=0):
    """The reference pipeline object (diffusers + transformers), tiny and random."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    unet = randomize(UNet2DConditionModel(**UNET_CONFIG), seed + 1)
    vae = randomize(AutoencoderKL(**VAE_CONFIG), seed + 2)
    te = randomize(CLIPTextModel(CLIPTextConfig(**text_config(TE_DIM, "quick_gelu", 768))), seed + 3)
    te2 = randomize(CLIPTextModelWithProjection(CLIPTextConfig(**text_config(TE2_DIM, "gelu", PROJ_DIM))), seed + 4)
    with open(DATA / "scheduler" / "scheduler_config.json") as f:
        scheduler = EulerDiscreteScheduler.from_config(json.load(f))
    tmp = Path(__import__("tempfile").mkdtemp())
    toks = [CLIPTokenizer.from_pretrained(str(write_clip_tokenizer_folder(tmp / name, pad)))
            for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!"))]
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=toks[0],
                                     tokenizer_2=toks[1], unet=unet, scheduler=scheduler)
    shutil.rmtree(tmp)
    return pipe.to(torch.float32)


def save_tiny_sdxl(path, seed=0, variant=None):
    """Save the tiny reference pipeline at `path` in the real hub layout; return (path, pipeline)."""
    path = Path(path)
    pipe = build_pipeline(seed)
    pipe.save_pretrained(path, variant=variant)
    # The hub's text_encoder/ was saved by transformers 4 with `text_model.`-prefixed keys; transformers 5 drops
    # the prefix for CLIPTextModel. Rewrite it as the real file is (the loader accepts both; see test_loader).
    name = f"model.{variant}.safetensors" if variant else "model.safetensors"
    te_file = path / "text_encoder" / name
    sd = load_file(str(te_file))
    save_file({k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}, str(te_file))
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        shutil.rmtree(path / name)
        write_clip_tokenizer_folder(path / name, pad)
    return path, pipe


def unet_pair(folder, config):
    """(diffusers UNet2DConditionModel with random weights, our UNet loaded strictly from its saved files, config):
    the reference saved with save_pretrained into `folder` and read back as a user's checkpoint would be."""
    from diffusers import UNet2DConditionModel

    from unet_loader import UNet, load_unet_config

    torch.manual_seed(0)
    theirs = randomize(UNet2DConditionModel(**config)).eval()
    theirs.save_pretrained(folder)
    cfg = load_unet_config(folder)
    ours = UNet(cfg)
    ours.load_state_dict(load_file(str(folder / "diffusion_pytorch_model.safetensors")), strict=True)
    return theirs, ours.eval(), cfg
