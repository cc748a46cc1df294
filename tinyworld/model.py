"""The tiny SDXL: SDXL's architecture in miniature, for the tiny world, saved in the exact diffusers layout.

Same classes as the real model (unet_loader.UNet, vae.AutoencoderKL, text_encoder.CLIPTextModel/CLIPTokenizer),
same conditioning (two CLIP text towers, penultimate states concatenated, pooled vector + micro-conditioning through
"text_time"), same noise schedule (SDXL's scheduler_config), same files -- so `load_sdxl("tinyworld/model")`,
train.py and sample.py run on it unchanged. Only the sizes differ:

  image 32x32x3 -> VAE widths 8/16 (2 levels: downsampling factor 2**(2-1) = 2, NOT SDXL's 8) -> latent 16x16x4
  UNet: 3 levels like SDXL (16x16 plain resnets, 8x8 and 4x4 with cross-attention), widths 32/64/96, 1 resnet and
        1 transformer block per level (SDXL: 2 resnets, 1/2/10 blocks), 2.8 M parameters
  text: a CLIP-L-like (quick_gelu) and a CLIP-G-like (gelu, projection 64) tower, 64 wide, 2 layers each, so the
        context is 64 + 64 = 128 wide; 32 tokens instead of 77 (the world's longest prompts are 18 tokens)
  tokenizer: a real CLIP BPE (byte tokens, </w> tokens, merges) learned on the world's 25 words: 596 tokens

Why a VAE and not pixel space: train.py and sample.py go through `sd.vae` and `scaling_factor` as for SDXL; a
tiny VAE keeps that path identical (latents, scaling, decoding), so the experiments test our real code.
Factor 2 rather than 4: a 5x5 checker on a 10-pixel circle, or a 1.5-pixel outline, must survive the autoencoder;
2x2x3 pixel values -> 4 latent numbers keeps them, 4x4x3 -> 4 would not.
"""
import json
import os
from collections import Counter

import torch
from safetensors.torch import save_file

from product.files import atomic
from text_encoder import CLIPTextModel, bytes_to_unicode
from unet_loader import UNet
from vae import AutoencoderKL

from .world import SIZE, world_words

MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 32  # SDXL: 77. The world's longest prompts are 18 tokens; 32 costs the text encoders 2.4x less

# ----------------------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE learned on the world's words


def train_bpe(words):
    """OpenAI CLIP's BPE, learned here on a word list: start from each word's bytes (the last one marked
    `</w>`), repeatedly merge the most frequent adjacent pair (ties: the smallest pair), until every word is one
    symbol. Returns (vocab, merges) in CLIP's layout: 256 byte symbols, the same 256 with `</w>`, one symbol per
    merge, then <|startoftext|> and <|endoftext|>."""
    byte = bytes_to_unicode()
    seqs = []
    for w in words:
        chars = [byte[b] for b in w.encode("utf-8")]
        seqs.append(chars[:-1] + [chars[-1] + "</w>"])
    merges = []
    while any(len(s) > 1 for s in seqs):
        counts = Counter(p for s in seqs for p in zip(s, s[1:]))
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for s in seqs:
            i = 0
            while i < len(s) - 1:
                if (s[i], s[i + 1]) == best:
                    s[i : i + 2] = [s[i] + s[i + 1]]
                i += 1
    tokens = list(byte.values()) + [c + "</w>" for c in byte.values()] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


VOCAB, MERGES = train_bpe(world_words())


def _special(content):
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_tokenizer(folder, pad_token=EOS):
    """vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json as in SDXL's tokenizer folders.
    pad "<|endoftext|>" makes tokenizer/, "!" (a byte token, id 0, as in SDXL) tokenizer_2/."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(VOCAB, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    specials = {"bos_token": _special(BOS), "eos_token": _special(EOS), "pad_token": pad_token, "unk_token": _special(EOS)}
    config = {"add_prefix_space": False, **{k: {"__type": "AddedToken", **v} if isinstance(v, dict) else v
                                            for k, v in specials.items()},
              "clean_up_tokenization_spaces": True, "do_lower_case": True, "errors": "replace",
              "model_max_length": MAX_LENGTH, "tokenizer_class": "CLIPTokenizer"}
    for name, obj in (("special_tokens_map.json", specials), ("tokenizer_config.json", config)):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
    return folder


# ----------------------------------------------------------------------------------------------------------
# Configs, in the keys of the hub's config.json files

TE_DIM, TE2_DIM, PROJ_DIM, TIME_DIM = 64, 64, 64, 8


def text_encoder_config(hidden, act, with_projection):
    return {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "attention_dropout": 0.0, "bos_token_id": VOCAB[BOS], "dropout": 0.0, "eos_token_id": VOCAB[EOS],
        "hidden_act": act, "hidden_size": hidden, "initializer_factor": 1.0, "initializer_range": 0.02,
        "intermediate_size": 4 * hidden, "layer_norm_eps": 1e-05, "max_position_embeddings": MAX_LENGTH,
        "model_type": "clip_text_model", "num_attention_heads": 4, "num_hidden_layers": 2,
        "pad_token_id": VOCAB[EOS], "projection_dim": PROJ_DIM, "torch_dtype": "float32", "vocab_size": len(VOCAB),
    }


TEXT_ENCODER_CONFIG = text_encoder_config(TE_DIM, "quick_gelu", False)  # CLIP ViT-L's role
TEXT_ENCODER_2_CONFIG = text_encoder_config(TE2_DIM, "gelu", True)      # OpenCLIP bigG's role

VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [8, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
    "force_upcast": True, "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
    "norm_num_groups": 4, "sample_size": SIZE,
    "scaling_factor": 1.0,  # set by pretrain.py to 1 / std of the latents, as SD's 0.18215 / SDXL's 0.13025 were
}
VAE_FACTOR = 2 ** (len(VAE_CONFIG["block_out_channels"]) - 1)
LATENT = SIZE // VAE_FACTOR

UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_time_embed_dim": TIME_DIM,
    "attention_head_dim": [1, 2, 3],  # diffusers' name for the number of heads per level (head width 32)
    "block_out_channels": [32, 64, 96], "center_input_sample": False, "cross_attention_dim": TE_DIM + TE2_DIM,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 8, "out_channels": 4,
    # pooled text (64) + 6 micro-conditioning numbers (orig h, w, crop top, left, target h, w), 8 each
    "projection_class_embeddings_input_dim": PROJ_DIM + 6 * TIME_DIM,
    "sample_size": LATENT, "transformer_layers_per_block": [1, 1, 1],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}

SCHEDULER_CONFIG = {  # SDXL's, unchanged: the same schedule and sampler defaults as the real model
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}

MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
MICRO_CONDITIONING = [SIZE, SIZE, 0, 0, SIZE, SIZE]  # time_ids: original size = target size, no crop


def build_text_encoders(seed=0):
    """Fresh text encoders. Token and position tables start at N(0, 0.02) as CLIP's (PyTorch's N(0, 1) default
    for nn.Embedding would swamp the pre-LayerNorm residual stream)."""
    torch.manual_seed(seed)
    tes = (CLIPTextModel(TEXT_ENCODER_CONFIG, eos_token_id=VOCAB[EOS]),
           CLIPTextModel(TEXT_ENCODER_2_CONFIG, eos_token_id=VOCAB[EOS]))
    with torch.no_grad():
        for te in tes:
            for emb in te.text_model.embeddings.values():
                emb.weight.normal_(0, 0.02)
    return tes


# ----------------------------------------------------------------------------------------------------------
# The folder

WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def save_model(folder, unet, vae, text_encoder, text_encoder_2, metadata=None):
    """Write the four models in the diffusers SDXL layout, atomically (files.atomic: a crash never leaves a
    half-written model). fp32 safetensors."""
    folder = os.path.abspath(folder)
    with atomic(folder) as tmp:
        _write_model(tmp, unet, vae, text_encoder, text_encoder_2, metadata)
    return folder


def _write_model(tmp, unet, vae, text_encoder, text_encoder_2, metadata):
    modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    configs = {"unet": unet.config, "vae": vae.config, "text_encoder": TEXT_ENCODER_CONFIG,
               "text_encoder_2": TEXT_ENCODER_2_CONFIG}
    for comp, module in modules.items():
        os.makedirs(os.path.join(tmp, comp))
        _write_json(os.path.join(tmp, comp, "config.json"), configs[comp])
        state = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(state, os.path.join(tmp, comp, WEIGHT_FILES[comp]), metadata=metadata)
    write_tokenizer(os.path.join(tmp, "tokenizer"), EOS)
    write_tokenizer(os.path.join(tmp, "tokenizer_2"), "!")
    os.makedirs(os.path.join(tmp, "scheduler"))
    _write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"), SCHEDULER_CONFIG)
    _write_json(os.path.join(tmp, "model_index.json"), MODEL_INDEX)


def load(folder=MODEL_DIR, device="cpu", dtype=torch.float32):
    """The shipped tiny SDXL (an sdxl.SDXL, like load_sdxl of the real one)."""
    from sdxl import load_sdxl

    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise FileNotFoundError(f"{folder}: no tiny model here; train it with `python -m tinyworld.pretrain`")
    return load_sdxl(folder, device=device, dtype=dtype)


def new_vae(seed=0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(dict(VAE_CONFIG))


def new_unet(seed=0) -> UNet:
    torch.manual_seed(seed)
    return UNet(dict(UNET_CONFIG))
