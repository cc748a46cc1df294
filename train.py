"""Train a DCO LoRA on Stable Diffusion XL:  python train.py --images ./dog

Direct Consistency Optimization (Lee, Kwak, Sohn, Shin, NeurIPS 2024, arXiv 2402.12004) fine-tunes SDXL's UNet
with LoRA -- and, for a subject, a new token "<dog>" in both text encoders (textual inversion) -- to beat the
pretrained model on your images while staying consistent with it (dco.py):
    L_DCO = -log sigmoid(-beta * (||eps_theta(x_t,c,t) - eps||^2 - ||eps_phi(x_t,c_base,t) - eps||^2))
theta = UNet + LoRA with the prompt c ("a photo of <dog>"), phi = the same UNet with its LoRA switched off, with
c_base ("a photo of dog"). `--loss db` is plain DreamBooth-LoRA and `--loss db-prior` DreamBooth with prior
preservation, for comparison. Defaults are the official repo's (kyungmnlee/dco, customize.py): beta 1000,
lr 5e-5, rank 32, alpha = rank, AdamW (weight decay 1e-4), grad clip 1.0, constant LR, 1024^2, batch 1.

Read top to bottom: arguments -> data -> load model -> LoRA -> new tokens -> cache latents and text -> loop ->
save. Everything lands in output/<name>/: pytorch_lora_weights.safetensors (diffusers), lora_kohya.safetensors
(ComfyUI/A1111), learned_embeds.safetensors (new token rows: clip_l, clip_g), train_config.json, log.jsonl,
samples/, checkpoint-<step>/ (what --resume continues from).
"""
import argparse
import functools
import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from dco import (add_noise, alphas_cumprod, dco_loss, diffusion_loss, prior_preservation_loss, sample_noise,
                 sample_timesteps)
from lora import (UNET_ATTN, inject_lora, load_lora_file, lora_modules, lora_parameters, lora_scale,
                  save_lora_kohya, save_lora_peft)
from sample import generate
from sdxl import SDXL_BASE, load_sdxl, native_resolution
from text_encoder import init_token
from vae import latent_dist_sample

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a DCO LoRA (+ a new token) on SDXL.")
    p.add_argument("--images", help="folder of training images; a caption per image in NAME.txt beside NAME.jpg")
    p.add_argument("--config", help="the official repo's data config.json (images, prompts, base_prompts, ...)")
    p.add_argument("--config-name", help="which entry of --config to train on")
    p.add_argument("--model", default=SDXL_BASE, help="hub id, diffusers folder, single-file .safetensors, or tiny "
                                                      "(the tiny SDXL of tinyworld/: a real run on a CPU)")
    p.add_argument("--output", help="output folder (default: output/<images folder or config name>)")
    p.add_argument("--loss", default="dco", choices=["dco", "db", "db-prior"])
    p.add_argument("--beta", type=float, default=1000.0, help="DCO's beta (1000-2000 work in the paper)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: = rank, LoRA scale 1)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--ti-lr", type=float, default=5e-6, help="learning rate of the new token rows")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--resolution", type=int, help="default: the model's own, 1024 for SDXL (32 for tiny)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--token", help='new token to learn, e.g. "<dog>" (default: <folder name> if that is a word)')
    p.add_argument("--init-word", help="existing one-token word the new token starts from, e.g. dog")
    p.add_argument("--offset-noise", type=float, default=0.0, help="0.1 helps learn solid colours (styles)")
    p.add_argument("--mixed-precision", choices=["bf16", "fp16", "no"], help="default: bf16 on GPU, no on CPU")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (GPU: faster steps after a "
                                                          "minute or two of compiling)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=500, help="0: no checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output folder")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--class-prompt", help='db-prior: prompt of the class images (default "a photo of a <init word>")')
    p.add_argument("--num-class-images", type=int, default=100)
    p.add_argument("--prior-weight", type=float, default=1.0)
    p.add_argument("--class-dir", help="db-prior: cache of generated class images (default: <output>/class_images)")
    p.add_argument("--sample-prompt", action="append", help="prompt of the sample images (repeatable)")
    p.add_argument("--sample-steps", type=int, default=25, help="sampler steps of the sample images; 0: no samples")
    args = p.parse_args(argv)
    if not (args.images or args.config):
        raise ValueError("pass --images DIR (or --config FILE --config-name NAME)")
    if bool(args.config) != bool(args.config_name):
        raise ValueError("--config and --config-name go together")
    if bool(args.token) != bool(args.init_word):
        raise ValueError("--token and --init-word go together, e.g. --token '<dog>' --init-word dog")
    if args.resolution is None:
        args.resolution = native_resolution(args.model)
    for flag in ("steps", "rank", "batch_size", "resolution", "num_class_images"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.resolution % 8:
        raise ValueError(f"--resolution {args.resolution}: must be a multiple of 8 (the VAE's downsampling)")
    if args.seed < 0 or args.checkpoint_every < 0 or args.sample_steps < 0:
        raise ValueError("--seed, --checkpoint-every and --sample-steps must be >= 0")
    return args


# ----------------------------------------------------------------------------------------------------------
# Data: images, captions, SDXL's micro-conditioning, the new tokens

def load_image(path, resolution):
    """-> (uint8 [3,R,R], time_ids [6]): shorter side resized to R, center crop. time_ids is SDXL's micro-
    conditioning (original h, w before resizing, crop top, left, target h, w): the model is told the crop."""
    try:
        img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read this image ({e}); fix or remove it")
    w, h = img.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    img = img.resize((nw, nh), Image.LANCZOS).crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1), torch.tensor([h, w, top, left, resolution, resolution])


def read_data(args):
    """-> (name, image paths, captions (None where none), base prompts or None, tokens, init words)."""
    if args.config:  # the official format: {name: {images, prompts, base_prompts, inserting_tokens, ...}}
        if not os.path.isfile(args.config):
            raise FileNotFoundError(f"--config {args.config}: no such file")
        configs = json.loads(Path(args.config).read_text())
        if args.config_name not in configs:
            raise ValueError(f"--config-name {args.config_name}: not in {args.config} (it has {', '.join(configs)})")
        cfg, here = configs[args.config_name], os.path.dirname(os.path.abspath(args.config))
        # Official paths are relative to the repo root (the working directory); else try the config's folder.
        paths = [p if os.path.exists(p) else os.path.join(here, p) for p in cfg["images"]]
        for p in paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{args.config}: image {p} not found")
        captions, base = list(cfg["prompts"]), cfg.get("base_prompts")
        if len(captions) != len(paths) or (base is not None and len(base) != len(paths)):
            raise ValueError(f"{args.config}: '{args.config_name}' needs one prompt (and base prompt) per image")
        tokens, inits, name = cfg.get("inserting_tokens", []), cfg.get("initializer_tokens", []), args.config_name
        if len(tokens) != len(inits) or not all(inits):
            raise ValueError(f"{args.config}: give one non-empty initializer_token per inserting_token")
    else:
        if not os.path.isdir(args.images):
            raise FileNotFoundError(f"--images {args.images}: no such folder")
        paths = sorted(os.path.join(args.images, f) for f in os.listdir(args.images) if f.lower().endswith(IMAGE_EXTS))
        if not paths:
            raise ValueError(f"--images {args.images}: no images ({', '.join(IMAGE_EXTS)}) in this folder")
        sidecars = [Path(p).with_suffix(".txt") for p in paths]  # kohya's convention: dog1.txt describes dog1.jpg
        captions = [s.read_text(encoding="utf-8").strip() if s.is_file() else None for s in sidecars]
        base, tokens, inits = None, [], []
        name = os.path.basename(os.path.normpath(args.images))
    if args.token:
        tokens, inits = [args.token], [args.init_word]
        for p, c in zip(paths, captions):  # a caption that never says the token would teach the token nothing
            if c is not None and args.token not in c:
                raise ValueError(f"{args.config or Path(p).with_suffix('.txt')}: the caption {c!r} has no "
                                 f"{args.token}; write it where the subject is named, e.g. 'a photo of {args.token}'")
    return name, paths, captions, base, tokens, inits


def prepare_captions(name, captions, base, tokens, inits, tokenizer):
    """Decide the new tokens, fill in missing captions, derive phi's base prompts -> (captions, base, tokens, inits).

    The bare `--images ./dog`: learn "<dog>" from "dog" when the folder name is one CLIP word and some image has no
    caption (or a caption says "<dog>"); with full captions and no token, the LoRA is trained alone (e.g. a style)."""
    word = name.lower()
    if not tokens and (None in captions or any(f"<{word}>" in c for c in captions if c)):
        if not (word.isalpha() and len(tokenizer.encode(word)) == 1):
            raise ValueError(f"images without captions need a token, and the folder name '{name}' is not one CLIP "
                             f"word: pass --token '<x>' --init-word WORD, or a NAME.txt caption per image")
        tokens, inits = [f"<{word}>"], [word]
    for w in inits:
        if len(tokenizer.encode(w)) != 1:
            raise ValueError(f"--init-word {w!r} is {len(tokenizer.encode(w))} CLIP tokens; pick a word that is one "
                             "token (e.g. dog, cat, toy, person)")
    captions = [c if c is not None else f"a photo of {' '.join(tokens)}" for c in captions]
    if tokens and base is None:  # phi reads the caption in words it knows, <dog> -> dog (paper, official code)
        base = list(captions)
        for tok, w in zip(tokens, inits):
            base = [b.replace(tok, w) for b in base]
    return captions, base, tokens, inits


class NewTokens(nn.Module):
    """Textual inversion's trainable rows, spliced into a frozen token table.

    Only the new rows are a Parameter (fp32, for AdamW), so no other row can change -- not even by weight decay --
    and no gradient or optimizer state exists for the other 49,408 rows. (The official code trains the whole
    table and copies the old rows back after every step.)"""

    def __init__(self, table: nn.Embedding, ids: list[int]):
        super().__init__()
        self.table, self.first = table.requires_grad_(False), ids[0]  # new ids: the table's last rows, in order
        rows = table.weight[ids].detach().float()
        self.rows = nn.Parameter(rows.clone())
        self.register_buffer("norms", rows.norm(dim=-1))

    @property
    def weight(self):  # the frozen table (its new rows keep their init value), for code that asks its device
        return self.table.weight

    def forward(self, ids):
        new = ids >= self.first
        out = self.table(ids)
        return torch.where(new[..., None], self.rows[(ids - self.first).clamp(min=0)].to(out.dtype), out)

    @torch.no_grad()
    def rescale(self):
        """Back to the init word's norm after every step, as the official code: the row may only turn."""
        self.rows.copy_(F.normalize(self.rows, dim=-1) * self.norms[:, None])


# ----------------------------------------------------------------------------------------------------------
# Randomness, files, checkpoints

def rng(*key):
    """A CPU generator seeded by a key like (seed, "step", 12): every draw of a step is a pure function of
    (seed, step), the same on any device, and a resumed run draws exactly what an uninterrupted one would."""
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little"))


def batch_indices(step, batch_size, n, seed):
    """The images of a step: consecutive slices of a fresh random permutation per epoch (a shuffling loader)."""
    ks = range(step * batch_size, (step + 1) * batch_size)
    return torch.stack([torch.randperm(n, generator=rng(seed, "epoch", k // n))[k % n] for k in ks])


@contextmanager
def atomic(path):
    """Yield a temp name beside `path`, renamed to `path` when the block succeeds: never a half-written file."""
    tmp = f"{path}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path, obj):
    with atomic(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


def save_lora(folder, unet, embeds, meta):
    """pytorch_lora_weights.safetensors (+ learned_embeds.safetensors, as the official repo: {"clip_l": [k,768],
    "clip_g": [k,1280]}, which diffusers' load_textual_inversion takes one encoder at a time)."""
    save_lora_peft(folder, {"unet": unet}, meta)
    if embeds:
        with atomic(os.path.join(folder, "learned_embeds.safetensors")) as tmp:
            save_file({"clip_l": embeds[0].rows.detach().cpu(), "clip_g": embeds[1].rows.detach().cpu()}, tmp, meta)


def save_checkpoint(path, unet, embeds, opt, scaler, step, meta):
    """LoRA + token rows + AdamW state: tensors in safetensors, scalars in json (no pickle anywhere)."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_lora(tmp, unet, embeds, meta)
    state = opt.state_dict()["state"]
    tensors = {f"{i}.{k}": v.cpu() for i, s in state.items() for k, v in s.items()}  # "3.exp_avg", "3.step", ...
    save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
    write_json(os.path.join(tmp, "trainer_state.json"), {"step": step, "scaler": scaler.state_dict()})
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)  # the checkpoint appears whole or not at all


@torch.no_grad()
def load_checkpoint(path, unet, embeds, opt, scaler):
    layers = load_lora_file(os.path.join(path, "pytorch_lora_weights.safetensors"))[0]["unet"]
    for name, m in lora_modules(unet).items():
        m.lora_down.weight.copy_(layers[name][0])
        m.lora_up.weight.copy_(layers[name][1])
    if embeds:
        rows = load_file(os.path.join(path, "learned_embeds.safetensors"))
        embeds[0].rows.copy_(rows["clip_l"])
        embeds[1].rows.copy_(rows["clip_g"])
    state = {}
    for key, v in load_file(os.path.join(path, "optimizer.safetensors")).items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})  # lr etc. from args
    trainer = json.loads(Path(path, "trainer_state.json").read_text())
    scaler.load_state_dict(trainer["scaler"])
    return trainer["step"]


def generate_images(sd, prompts, args, seed):
    """Images from the model as it is now (sample.py: Euler, CFG 5), with the VAE brought back for decoding."""
    vae_device = next(sd.vae.parameters()).device
    sd.vae.to(next(sd.unet.parameters()).device)
    with torch.no_grad():
        images = generate(sd, prompts, height=args.resolution, width=args.resolution, steps=args.sample_steps,
                          seed=seed, progress=False)
    sd.vae.to(vae_device)
    return images


def class_images(sd, args, out, prompt):
    """db-prior: the base model's own images of the class, generated once and cached as PNGs."""
    folder = args.class_dir or os.path.join(out, "class_images")
    os.makedirs(folder, exist_ok=True)
    info, info_path = {"prompt": prompt, "model": args.model, "resolution": args.resolution}, Path(folder, "info.json")
    if info_path.is_file() and json.loads(info_path.read_text()) != info:
        raise ValueError(f"{folder} holds class images of another prompt/model/resolution; pass another --class-dir")
    write_json(info_path, info)
    paths = [os.path.join(folder, f"{i:04d}.png") for i in range(args.num_class_images)]
    for i in tqdm([i for i, p in enumerate(paths) if not os.path.exists(p)], desc="class images"):
        (img,) = generate_images(sd, [prompt], args, seed=args.seed + i)
        with atomic(paths[i]) as tmp:
            img.save(tmp, format="PNG")
    return paths


# ----------------------------------------------------------------------------------------------------------

def train_step(unet, opt, scaler, xt, eps, t, time_ids, cond, base_cond=None, loss="dco", beta=1000.0,
               prior_weight=1.0, grad_clip=1.0, amp=nullcontext):
    """One optimisation step -> (loss, implicit reward per sample or None). bench.py times exactly this.

    xt, eps, t, time_ids: noisy latents, the noise in them, their timesteps and micro-conditioning; cond =
    (context, pooled) of theta's prompts, base_cond = phi's (DCO only). For db-prior the second half of the batch is
    the class images. The gradients reach every parameter of `opt` (LoRA, new token rows through `cond`)."""
    if loss == "dco":
        # phi = the pretrained model = this same UNet with its LoRA switched off (bit-identical to the base):
        # no second copy of SDXL. Without autograd it keeps no activations, so DCO costs one more forward but about
        # DreamBooth's peak memory. It runs first, so its temporaries are freed before theta's pile up.
        # inference_mode rather than no_grad: no version counters or view tracking, ~3% off this forward on CPU.
        with torch.inference_mode(), lora_scale(unet, 0.0), amp():
            eps_phi = unet(xt, t, *base_cond, time_ids)
    with amp():
        eps_theta = unet(xt, t, *cond, time_ids)
    reward = None
    if loss == "dco":
        value, reward = dco_loss(eps_theta, eps_phi, eps, beta)
    elif loss == "db":
        value = diffusion_loss(eps_theta, eps)
    else:
        B = len(xt) // 2
        value = prior_preservation_loss(eps_theta[:B], eps[:B], eps_theta[B:], eps[B:], prior_weight)

    scaler.scale(value).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], grad_clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return value, reward


def train(args):
    name, paths, captions, base_prompts, tokens, inits = read_data(args)
    images = [load_image(p, args.resolution) for p in paths]  # every image is read now: bad files fail early
    out = args.output or os.path.join("output", name)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mp = args.mixed_precision or ("bf16" if device.type == "cuda" else "no")
    dtype = DTYPES[mp]

    # --- the model: UNet and text encoders in the training dtype, the VAE in fp32 (see sdxl.py)
    sd = load_sdxl(args.model, device=device, dtype=dtype)
    unet = sd.unet
    captions, base_prompts, tokens, inits = prepare_captions(name, captions, base_prompts, tokens, inits, sd.tokenizer)
    factor = 2 ** (len(sd.vae.config["block_out_channels"]) - 1) * 2 ** (len(unet.down_blocks) - 1)
    if args.resolution % factor:
        raise ValueError(f"--resolution {args.resolution}: must be a multiple of {factor} for this model "
                         "(VAE and UNet downsampling)")
    for p, c in zip(paths, captions):
        if tokens and not any(t in c for t in tokens):
            print(f"warning: the caption of {p} has no {' or '.join(tokens)}: {c!r}", file=sys.stderr)
    config = {**vars(args), "name": name, "output": out, "device": str(device), "mixed_precision": mp,
              "alpha": args.alpha or float(args.rank), "tokens": tokens, "init_words": inits,
              "images": paths, "captions": captions, "base_prompts": base_prompts}
    ckpts = sorted((int(d[11:]), d) for d in os.listdir(out) if d.startswith("checkpoint-") and d[11:].isdigit()) \
        if os.path.isdir(out) else []
    config_path = Path(out, "train_config.json")
    if not args.resume and config_path.exists():
        raise ValueError(f"{out} already holds a training run: pass --resume to continue it, or another --output "
                         "(or delete it)")
    if args.resume:  # everything is checked before anything is written
        if not ckpts:
            raise ValueError(f"--resume: no checkpoint-<step> folder in {out}")
        if ckpts[-1][0] >= args.steps:
            raise ValueError(f"--resume: {out}/{ckpts[-1][1]} already has {ckpts[-1][0]} steps; raise --steps")
        old = json.loads(config_path.read_text()) if config_path.exists() else config
        for k in ("model", "loss", "rank", "alpha", "resolution", "batch_size", "seed", "tokens", "captions"):
            if old.get(k) != config[k]:
                raise ValueError(f"--resume: {k} was {old.get(k)!r} in {out}, now {config[k]!r}; it must not change")
    os.makedirs(out, exist_ok=True)
    write_json(config_path, config)
    meta = {"base_model": args.model, "rank": str(args.rank), "alpha": str(config["alpha"]), "loss": args.loss,
            "beta": str(args.beta), "steps": str(args.steps), "resolution": str(args.resolution),
            "token": ",".join(tokens), "init_word": ",".join(inits)}  # sample.py reads these two

    if args.loss == "db-prior":  # made by the base model, so before any LoRA or new token exists
        class_prompt = args.class_prompt or f"a photo of a {inits[0] if inits else name}"
        images += [load_image(p, args.resolution) for p in class_images(sd, args, out, class_prompt)]

    # --- LoRA on the UNet's attention projections, as the official code (peft, gaussian init, alpha = rank)
    torch.manual_seed(args.seed)
    inject_lora(unet, rank=args.rank, alpha=args.alpha, targets=UNET_ATTN)
    for m in lora_modules(unet).values():  # trainable weights in fp32 (AdamW steps of 5e-5 vanish in bf16) ...
        m.lora_down.float(), m.lora_up.float()  # ... not m.float(): the frozen base weight must stay bf16
    unet.gradient_checkpointing = args.gradient_checkpointing
    unet.train()
    if args.compile:  # in place: lora_scale() and the checkpoint code still see the same module objects
        unet.compile()

    # --- textual inversion: the same new token in both encoders, starting as a copy of the init word's row
    embeds = []
    for tok, te in ((sd.tokenizer, sd.text_encoder), (sd.tokenizer_2, sd.text_encoder_2)):
        ids = [init_token(tok, te, t, w) for t, w in zip(tokens, inits)]
        if ids:
            emb = te.text_model.embeddings
            emb.token_embedding = NewTokens(emb.token_embedding, ids)
            embeds.append(emb.token_embedding)

    # --- cache. Each image goes through the VAE once; we keep its Gaussian (mean, logvar) and draw a fresh latent
    # from it every step: the same distribution as encoding every step (the official code), at none of the cost.
    amp = functools.partial(torch.autocast, device.type, dtype=dtype, enabled=mp != "no")
    means, logvars = [], []
    with torch.no_grad():
        for x, _ in images:  # one at a time: the VAE's activations at 1024^2 take GBs
            mean, logvar = sd.vae.encode((x[None].float() / 127.5 - 1).to(device, next(sd.vae.parameters()).dtype))
            means.append(mean.float().cpu())
            logvars.append(logvar.float().cpu())
    means, logvars = torch.cat(means), torch.cat(logvars)
    time_ids = torch.stack([t for _, t in images]).float().to(device)
    sd.vae.to("cpu")  # not needed again until sampling
    # Fixed prompts are encoded once. With new tokens, theta's prompts are re-encoded every step (the gradient
    # reaches the new rows through the text encoders); phi's base prompts never change.
    n, B = len(paths), args.batch_size
    with torch.no_grad(), amp():
        # One prompt at a time and under autocast, as the per-step encoding (batch size 1): then at step 0 theta's
        # conditioning (<dog>) equals phi's (dog) bit for bit and the first DCO loss is exactly log 2.
        cond = [sd.encode_prompt([prompt]) for prompt in base_prompts or captions]
        base_ctx, base_pooled = torch.cat([c for c, _ in cond]), torch.cat([p for _, p in cond])
        if args.loss == "db-prior":
            class_ctx, class_pooled = sd.encode_prompt([class_prompt] * B)

    # --- AdamW on the LoRA (lr) and the new token rows (ti-lr), constant learning rate
    lora_params, ti_params = lora_parameters(unet), [e.rows for e in embeds]
    params = lora_params + ti_params
    groups = [{"params": lora_params, "lr": args.lr}] + ([{"params": ti_params, "lr": args.ti_lr}] if embeds else [])
    # On CUDA the fused kernel updates all ~1,100 LoRA tensors at once instead of a dozen kernels per tensor.
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=mp == "fp16")  # fp16 gradients underflow without it
    acp = alphas_cumprod(sd.scheduler)
    log_path = os.path.join(out, "log.jsonl")
    start = 0
    if args.resume:
        start = load_checkpoint(os.path.join(out, ckpts[-1][1]), unet, embeds, opt, scaler)
        lines = Path(log_path).read_text().splitlines() if os.path.exists(log_path) else []
        with atomic(log_path) as tmp, open(tmp, "w") as f:  # drop steps logged after the checkpoint
            f.writelines(line + "\n" for line in lines if json.loads(line)["step"] < start)
        print(f"resuming from {out}/{ckpts[-1][1]}")

    def samples(step):
        if args.sample_steps:
            os.makedirs(os.path.join(out, "samples"), exist_ok=True)
            prompts = args.sample_prompt or [captions[0]] + [f"a {t} playing saxophone in sticker style"
                                                             for t in tokens[:1]]
            for i, img in enumerate(generate_images(sd, prompts, args, seed=args.seed)):
                with atomic(os.path.join(out, "samples", f"step{step:06d}-{i}.png")) as tmp:
                    img.save(tmp, format="PNG")

    print(f"{n} images, new tokens {tokens}, {sum(p.numel() for p in params):,} trainable parameters, loss "
          f"{args.loss}, {mp} on {device} -> {out}/")
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train")
    for step in bar:
        t0 = time.perf_counter()
        g = rng(args.seed, "step", step)
        idx = batch_indices(step, B, n, args.seed)
        if args.loss == "db-prior":  # + B class images, in the same forward
            idx = torch.cat([idx, n + torch.randint(len(images) - n, (B,), generator=g)])
        x0 = latent_dist_sample(means[idx], logvars[idx], g) * sd.vae.scaling_factor
        eps = sample_noise(x0, args.offset_noise, g)
        t = sample_timesteps(len(idx), len(acp), generator=g)
        xt, eps, t = add_noise(x0, eps, t, acp).to(device), eps.to(device), t.to(device)
        inst = idx[:B]
        ctx, pooled = base_ctx[inst], base_pooled[inst]
        if embeds:
            with amp():
                ctx, pooled = sd.encode_prompt([captions[i] for i in inst])
        if args.loss == "db-prior":
            ctx, pooled = torch.cat([ctx, class_ctx]), torch.cat([pooled, class_pooled])

        loss, reward = train_step(unet, opt, scaler, xt, eps, t, time_ids[idx], (ctx, pooled),
                                  (base_ctx[inst], base_pooled[inst]), args.loss, args.beta, args.prior_weight,
                                  args.grad_clip, amp)
        for e in embeds:
            e.rescale()

        rec = {"step": step, "loss": loss.item(), "lr": opt.param_groups[0]["lr"], "t": t[:B].tolist()}
        if reward is not None:  # per sample too: DCO's gradient weight 2 sigmoid(-beta r) depends on t (see README)
            rec["implicit_reward"] = reward.mean().item()
            rec["implicit_rewards"] = reward.tolist()
        rec["time"] = time.perf_counter() - t0
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        bar.set_postfix({k: f"{rec[k]:.4g}" for k in ("loss", "implicit_reward") if k in rec})
        done = step + 1
        if done == args.steps or (args.checkpoint_every and done % args.checkpoint_every == 0):
            if args.checkpoint_every:
                save_checkpoint(os.path.join(out, f"checkpoint-{done}"), unet, embeds, opt, scaler, done, meta)
            samples(done)

    # --- the LoRA in both formats, the new token rows
    save_lora(out, unet, embeds, meta)
    save_lora_kohya(out, {"unet": unet}, unet.config, meta)
    return {"sd": sd, "out": out, "embeds": embeds}


def main(argv=None):
    try:
        train(parse_args(argv))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    # Once DCO's loss saturates (beta 1000: the first steps at real size), its gradients are denormal floats, which
    # x86 CPUs compute many times slower. Flushing them to zero changes nothing else. (Process-wide, so set here and
    # not in main(), which tests call in-process.)
    torch.set_flush_denormal(True)
    main()
