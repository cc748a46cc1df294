"""Train a DCO LoRA on Stable Diffusion XL:  python train.py --images ./dog

Direct Consistency Optimization (Lee, Kwak, Sohn, Shin, NeurIPS 2024, arXiv 2402.12004) fine-tunes SDXL's UNet
with LoRA -- and, for a subject, a new token "<dog>" in both text encoders (textual inversion) -- to beat the
pretrained model on your images while staying consistent with it (dco.py):
    L_DCO = -log sigmoid(-beta * (||eps_theta(x_t,c,t) - eps||^2 - ||eps_phi(x_t,c_base,t) - eps||^2))
theta = UNet + LoRA with the prompt c ("a photo of <dog>"), phi = the same UNet with its LoRA switched off, with
c_base ("a photo of dog"). `--loss db` is plain DreamBooth-LoRA and `--loss db-prior` DreamBooth with prior
preservation, for comparison; `train(args, loss_fn=my_loss)` trains with a loss of your own (tutorial.ipynb).
Defaults follow the official code, kyungmnlee/dco at commit 164ae17 ("customize.py:N" in comments = its file and
line; flags at customize.py:91-130, the LoRA at :503-505): beta 1000, lr 5e-5, rank 32, alpha = rank, AdamW
(weight decay 1e-4), grad clip 1.0, constant LR, 1024^2, batch 1.

`torchrun --nproc_per_node N train.py ...` trains the same LoRA data-parallel on N GPUs (README: "More than one GPU").

Read train() top to bottom, in the paper's order: data -> model + LoRA + new tokens -> caches -> optimizer -> loop
-> save. The run folder (config, log, checkpoints, --resume, the files written) is file plumbing, not the method:
it lives in checkpoint.py.
"""
import argparse
import functools
import hashlib
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

import checkpoint
import errors
from dco import (add_noise, alphas_cumprod, check_scheduler_config, dco_loss, diffusion_loss, min_snr_weights,
                 prior_preservation_loss, relative_dco_loss, sample_noise, sample_timesteps, training_target)
from files import DTYPES, read_json, read_text, save_image, sha256, write_json
from lora import UNET_ATTN, inject_lora, lora_modules, lora_parameters, lora_scale
from sample import decode, generate_latents, to_pil
from sdxl import SDXL_BASE, load_sdxl, native_resolution
from text_encoder import init_token
from vae import latent_dist_sample

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def parse_args(argv=None):
    """The command line -> checked arguments (every error is a ValueError naming the flag)."""
    return check_args(parser().parse_args(argv))


def parser():
    """The flags of the method: data, model, loss, LoRA and optimisation; then those of the run."""
    p = argparse.ArgumentParser(description="Train a DCO LoRA (+ a new token) on SDXL.")
    g = p.add_argument_group("data")
    g.add_argument("--images", help="folder of training images; a caption per image in NAME.txt beside NAME.jpg")
    g.add_argument("--config", help="the official repo's data config.json (images, prompts, base_prompts, ...)")
    g.add_argument("--config-name", help="which entry of --config to train on")
    g.add_argument("--token", help='new token to learn, e.g. "<dog>" (default: <folder name> if that is a word)')
    g.add_argument("--init-word", help="existing one-token word the new token starts from, e.g. dog")
    g.add_argument("--resolution", type=int, help="default: the model's own, 1024 for SDXL (32 for tiny)")
    g.add_argument("--batch-size", type=int, default=1, help="per process (under torchrun: the global batch is "
                                                             "processes x batch size x --grad-accum)")
    g.add_argument("--offset-noise", type=float, default=0.0, help="0.1 helps learn solid colours (styles)")
    g.add_argument("--crop", choices=["center", "random"], default="center", help="where the RxR crop of the resized "
                   "image is taken (random: a new crop each step, as the official code)")
    g.add_argument("--random-flip", action="store_true", help="mirror each image with probability 1/2 per step")
    g.add_argument("--resample", choices=list(RESAMPLE), default="lanczos", help="resize filter (the official code: "
                   "bilinear)")
    g.add_argument("--time-ids", choices=["crop", "fixed"], default="crop", help="micro-conditioning: the real size "
                   "and crop (SDXL's training), or always (R, R, 0, 0, R, R) (the official code)")
    g = p.add_argument_group("model and output")
    g.add_argument("--model", default=SDXL_BASE, help="hub id, diffusers folder, single-file .safetensors, sdxl-random "
                   "(the real shapes, random weights: a dry run of memory and speed), or tiny (the tiny SDXL of "
                   "tinyworld/: a real run on a CPU)")
    g.add_argument("--output", help="output folder (default: output/<images folder or config name>)")
    g.add_argument("--device", help="default: cuda if available, else cpu")
    g.add_argument("--vae", help="another VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix for fp16")
    g.add_argument("--pool", choices=["eos", "argmax"], default="eos", help="text_encoder_2 pooling: at the EOS "
                   "(SDXL's training) or at argmax(ids) (transformers/diffusers; the official code trained so)")
    g = p.add_argument_group("the loss")
    g.add_argument("--loss", default="dco", choices=["dco", "db", "db-prior"])
    g.add_argument("--beta", type=float, default=1000.0, help="DCO's beta (1000-2000 work in the paper)")
    g.add_argument("--relative-reward", action="store_true", help="DCO with the reward relative to phi's error, "
                   "(l_phi - l_theta) / l_phi (dco.relative_reward; not the paper's; beta ~ 1-3, not 1000)")
    g.add_argument("--snr-gamma", type=float, help="min-SNR-gamma loss weights (Hang et al. 2023), e.g. 5; in DCO on "
                                                   "both errors, as the official code")
    g = p.add_argument_group("LoRA and optimisation")
    g.add_argument("--steps", type=int, default=1000)
    g.add_argument("--rank", type=int, default=32)
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: = rank, LoRA scale 1)")
    g.add_argument("--lr", type=float, default=5e-5)
    g.add_argument("--ti-lr", type=float, default=5e-6, help="learning rate of the new token rows")
    g.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine", "linear"],
                   help="after the warm-up: constant (the official), or a cosine / linear decay to 0 at --steps")
    g.add_argument("--lr-warmup", type=int, default=0, help="steps of linear warm-up from 0 to the learning rates")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step: --batch-size B --grad-accum K "
                                                             "trains as --batch-size K*B in the memory of B")
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    add_run_flags(p)
    return p


def add_run_flags(p):
    """The flags of the run: speed and memory, checkpoints and samples, db-prior's class images."""
    g = p.add_argument_group("speed and memory")
    g.add_argument("--mixed-precision", choices=["bf16", "fp16", "no"], help="default: bf16 on GPU, no on CPU")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet (GPU: faster steps after a "
                                                          "minute or two of compiling)")
    g = p.add_argument_group("checkpoints and samples")
    g.add_argument("--checkpoint-every", type=int, default=500, help="0: no checkpoints")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output folder")
    g.add_argument("--bundle-token", action="store_true", help="also write the learned tokens into "
                   "lora_kohya.safetensors (A1111's bundle_emb keys): one file for A1111/Forge and sample.py")
    g.add_argument("--sample-prompt", action="append", help="prompt of the sample images (repeatable)")
    g.add_argument("--sample-steps", type=int, default=25, help="sampler steps of the sample images; 0: no samples")
    g = p.add_argument_group("db-prior (DreamBooth with prior preservation)")
    g.add_argument("--class-prompt", help='prompt of the class images (default "a photo of a <init word>")')
    g.add_argument("--num-class-images", type=int, default=100)
    g.add_argument("--prior-weight", type=float, default=1.0)
    g.add_argument("--class-dir", help="cache of generated class images (default: <output>/class_images)")


def check_args(args):
    """Refuse what cannot train, in one line naming the flag, before anything is loaded; fill in the resolution."""
    if not (args.images or args.config):
        raise ValueError("pass --images DIR (or --config FILE --config-name NAME)")
    if bool(args.config) != bool(args.config_name):
        raise ValueError("--config and --config-name go together")
    if bool(args.token) != bool(args.init_word):
        raise ValueError("--token and --init-word go together, e.g. --token '<dog>' --init-word dog")
    if args.resolution is None:
        args.resolution = native_resolution(args.model)
    for flag in ("steps", "rank", "batch_size", "grad_accum", "resolution", "num_class_images"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.resolution % 8:
        raise ValueError(f"--resolution {args.resolution}: must be a multiple of 8 (the VAE's downsampling)")
    if args.alpha is not None and not args.alpha > 0:
        raise ValueError(f"--alpha {args.alpha}: must be > 0 (the LoRA's scale is alpha / rank; leave it out for 1)")
    if args.relative_reward and args.loss != "dco":
        raise ValueError(f"--relative-reward is an option of DCO's loss, not of --loss {args.loss}")
    if args.relative_reward and args.snr_gamma:  # r / l_phi divides the weights out: they would change nothing
        raise ValueError("--snr-gamma has no effect with --relative-reward (the weights cancel in r / l_phi): "
                         "use one of them")
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        raise ValueError(f"--snr-gamma {args.snr_gamma:g}: must be > 0 (5 in Hang et al. 2023), or left out")
    if args.seed < 0 or args.checkpoint_every < 0 or args.sample_steps < 0 or args.lr_warmup < 0:
        raise ValueError("--seed, --checkpoint-every, --sample-steps and --lr-warmup must be >= 0")
    errors.check_finite(beta=args.beta, lr=args.lr, ti_lr=args.ti_lr, weight_decay=args.weight_decay, alpha=args.alpha,
                        grad_clip=args.grad_clip, offset_noise=args.offset_noise, prior_weight=args.prior_weight,
                        snr_gamma=args.snr_gamma)
    if args.device:
        errors.check_device(args.device)
    return args


# ----------------------------------------------------------------------------------------------------------
# Data: images, captions, SDXL's micro-conditioning, the new tokens

RESAMPLE = {"lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR}


def load_resized(path, resolution, resample="lanczos"):
    """-> (uint8 [3,h,w] with the shorter side resized to R, (original h, w))."""
    try:
        img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read this image ({e}); fix or remove it")
    w, h = img.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    img = img.resize((nw, nh), RESAMPLE[resample])
    return torch.from_numpy(np.array(img)).permute(2, 0, 1), (h, w)


def crop(image, size, resolution, top, left, fixed_time_ids=False):
    """-> (uint8 [3,R,R] crop at (top, left), time_ids [6]). time_ids is SDXL's micro-conditioning (original h, w
    before resizing, crop top, left, target h, w): the model is told the crop. The official code always tells it
    (R, R, 0, 0, R, R) instead (customize.py:700-705): fixed_time_ids=True."""
    R = resolution
    ids = [R, R, 0, 0, R, R] if fixed_time_ids else [*size, top, left, R, R]
    return image[:, top:top + R, left:left + R], torch.tensor(ids)


def load_image(path, resolution, resample="lanczos", fixed_time_ids=False):
    """-> (uint8 [3,R,R], time_ids [6]): shorter side resized to R, centre crop."""
    image, size = load_resized(path, resolution, resample)
    top, left = (image.shape[1] - resolution) // 2, (image.shape[2] - resolution) // 2
    return crop(image, size, resolution, top, left, fixed_time_ids)


def read_data(args):
    """-> (name, image paths, captions (None where none), base prompts or None, tokens, init words)."""
    if args.config:  # the official format: {name: {images, prompts, base_prompts, inserting_tokens, ...}}
        if not os.path.isfile(args.config):
            raise FileNotFoundError(f"--config {args.config}: no such file")
        configs = read_json(args.config)
        if not isinstance(configs, dict) or not all(isinstance(c, dict) for c in configs.values()):
            raise ValueError(f"--config {args.config}: expected the official format, "
                             "{name: {images, prompts, ...}}")
        if args.config_name not in configs:
            raise ValueError(f"--config-name {args.config_name}: not in {args.config} (it has {', '.join(configs)})")
        cfg, here = configs[args.config_name], os.path.dirname(os.path.abspath(args.config))
        missing = [k for k in ("images", "prompts") if not isinstance(cfg.get(k), list)]
        if missing:
            raise ValueError(f"--config {args.config}: '{args.config_name}' needs the list(s) {', '.join(missing)}")
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
        captions = [read_text(s).strip() if s.is_file() else None for s in sidecars]
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
    if tokens and base is None:  # phi reads the caption in words it knows, <dog> -> dog (official: customize.py:255)
        base = list(captions)
        for tok, w in zip(tokens, inits):
            base = [b.replace(tok, w) for b in base]
    return captions, base, tokens, inits


class NewTokens(nn.Module):
    """Textual inversion's trainable rows, spliced into a frozen token table.

    Only the new rows are a Parameter (fp32, for AdamW), so no other row can change -- not even by weight decay --
    and no gradient or optimizer state exists for the other 49,408 rows. (The official code trains the whole
    table and copies the old rows back after every step: customize.py:223-227.)"""

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
        """Back to the init word's norm after every step (official: customize.py:234): the row may only turn."""
        self.rows.copy_(F.normalize(self.rows, dim=-1) * self.norms[:, None])


# ----------------------------------------------------------------------------------------------------------
# Caches and batches

def rng(*key):
    """A CPU generator seeded by a key like (seed, "step", 12): every draw of a step is a pure function of
    (seed, step), the same on any device, and a resumed run draws exactly what an uninterrupted one would."""
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little"))


def batch_indices(step, batch_size, n, seed):
    """The images of a step: consecutive slices of a fresh random permutation per epoch (a shuffling loader)."""
    ks = range(step * batch_size, (step + 1) * batch_size)
    return torch.stack([torch.randperm(n, generator=rng(seed, "epoch", k // n))[k % n] for k in ks])


@torch.no_grad()
def encode_images(vae, images):
    """Each image through the VAE once -> (means, logvars) of its latent Gaussian, fp32 on the CPU. A fresh latent
    is drawn from it every step: the same distribution as encoding every step (the official code,
    customize.py:844), at none of the cost. One image at a time: the VAE's activations at 1024^2 take GBs."""
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    stats = [vae.encode((x[None].float() / 127.5 - 1).to(device, dtype)) for x in images]
    return torch.cat([m.float().cpu() for m, _ in stats]), torch.cat([v.float().cpu() for _, v in stats])


class CropCache:
    """--crop random / --random-flip: every (image, crop, flip) that a step draws goes through the VAE once, the first
    time it is drawn, and its latent Gaussian is kept. Exact -- each crop is encoded as itself, not cut out of a
    bigger latent -- and as cheap as the fixed-crop cache once the crops have been seen."""

    def __init__(self, vae, paths, resolution, resample, random_crop, flip, fixed_time_ids):
        self.vae, self.R, self.random_crop, self.flip, self.fixed = vae, resolution, random_crop, flip, fixed_time_ids
        self.images = [load_resized(p, resolution, resample) for p in paths]
        self.cache = {}

    def get(self, idx, generator):
        """(means, logvars, time_ids) of the images idx, each with a crop and flip drawn from `generator`."""
        out = []
        for i in idx.tolist():
            image, size = self.images[i]
            h, w = image.shape[1] - self.R, image.shape[2] - self.R
            if self.random_crop:
                top, left = (int(torch.randint(d + 1, (1,), generator=generator)) for d in (h, w))
            else:
                top, left = h // 2, w // 2
            flip = self.flip and bool(torch.rand(1, generator=generator) < 0.5)
            key = (i, top, left, flip)
            if key not in self.cache:  # flip first, then crop in the flipped image, as diffusers' SDXL scripts
                x, time_ids = crop(image.flip(-1) if flip else image, size, self.R, top, left, self.fixed)
                mean, logvar = encode_images(self.vae, [x])
                self.cache[key] = mean, logvar, time_ids.float()
            out.append(self.cache[key])
        return (torch.cat([m for m, _, _ in out]), torch.cat([v for _, v, _ in out]),
                torch.stack([t for _, _, t in out]))


def encode_prompts(sd, prompts, amp):
    """(context [n,77,2048], pooled [n,1280]), one prompt at a time and under autocast as the per-step encoding of
    theta's prompts: then at step 0 theta's conditioning (<dog>) equals phi's (dog) bit for bit, and the first DCO
    loss is exactly log 2."""
    with torch.no_grad(), amp():
        cond = [sd.encode_prompt([prompt]) for prompt in prompts]
    return torch.cat([c for c, _ in cond]), torch.cat([p for _, p in cond])


@dataclass
class Batch:
    """One step's inputs: noisy latents x_t, the target the UNet should predict (the noise eps in x_t, or v for a
    v-prediction base: dco.training_target), timesteps t, SDXL's micro-conditioning, the (context, pooled)
    conditioning of theta's prompts c and of phi's base prompts c_base (None: no phi, DreamBooth), and per-sample
    loss weights (--snr-gamma; None: unweighted)."""
    xt: torch.Tensor
    target: torch.Tensor
    t: torch.Tensor
    time_ids: torch.Tensor
    cond: tuple
    base_cond: tuple | None
    weights: torch.Tensor | None = None


def get_batch(step, data, sd, args, amp, rank=0, world_size=1):
    """A step's batch, a pure function of (seed, step): x_0 drawn from the cached latent Gaussians, eps and t fresh.
    -> (the timesteps of its images, for the log; this process's --grad-accum micro-batches, an iterator of Batch).

    The step's global batch is the batch of G = processes x --batch-size x --grad-accum that one process with
    --batch-size G draws (the same rng keys, the same draws in the same order); process r's k-th micro-batch is
    its slice number r*K + k. So N processes x B x K train exactly as one process x N*B*K would, up to the order
    of floating-point sums, and a single process draws what it drew before torchrun existed. With new tokens theta's
    captions are encoded again for each micro-batch as it is made, so the gradient reaches the token rows and only
    one micro-batch's text-encoder graph exists at a time."""
    B, K = args.batch_size, args.grad_accum
    G = world_size * B * K
    g = rng(args.seed, "step", step)
    idx = batch_indices(step, G, data.n, args.seed)
    if data.prior is not None:  # db-prior: + G class images in the same forward, [instance; class]
        idx = torch.cat([idx, data.n + torch.randint(len(data.means) - data.n, (G,), generator=g)])
    if data.crops is not None:  # this step's random crops / flips, each VAE-encoded once (CropCache)
        means, logvars, time_ids = data.crops.get(idx, rng(args.seed, "crop", step))
    else:
        means, logvars, time_ids = data.means[idx], data.logvars[idx], data.time_ids[idx]
    x0 = latent_dist_sample(means, logvars, g) * sd.vae.scaling_factor
    eps = sample_noise(x0, args.offset_noise, g)
    t = sample_timesteps(len(idx), len(data.alphas_cumprod), generator=g)
    prediction = sd.scheduler.get("prediction_type", "epsilon")  # epsilon, or v_prediction for a v-model
    target = training_target(x0, eps, t, data.alphas_cumprod, prediction)
    weights = min_snr_weights(t, data.alphas_cumprod, args.snr_gamma, prediction) if args.snr_gamma else None
    xt = add_noise(x0, eps, t, data.alphas_cumprod)

    def micro_batches():
        for k in range(K):
            first = (rank * K + k) * B
            part = torch.arange(first, first + B)  # positions in the global batch
            if data.prior is not None:  # and their class images, so the micro-batch is [instance; class] too
                part = torch.cat([part, G + part])
            inst = idx[first:first + B]
            base_cond = data.base_ctx[inst], data.base_pooled[inst]
            cond = base_cond
            if data.embeds:
                with amp():
                    cond = sd.encode_prompt([data.captions[i] for i in inst])
            if data.prior is not None:
                cond = torch.cat([cond[0], data.prior[0]]), torch.cat([cond[1], data.prior[1]])
            dev = data.device
            yield Batch(xt[part].to(dev), target[part].to(dev), t[part].to(dev), time_ids[part].to(dev), cond,
                        base_cond if args.loss == "dco" else None, None if weights is None else weights[part].to(dev))

    return t[:G], micro_batches()


# ----------------------------------------------------------------------------------------------------------
# The losses train() can use: loss_fn(eps_theta, eps_phi, target, beta) -> (loss, implicit reward per sample or None).
# target is eps (or v for a v-prediction base, and then eps_theta/eps_phi are v-predictions); with --snr-gamma the
# loss also gets weights= (one per sample).

def db_loss(eps_theta, eps_phi, eps, beta=None, weights=None):
    """DreamBooth-LoRA: the plain diffusion loss (phi and beta unused)."""
    return diffusion_loss(eps_theta, eps, weights), None


def db_prior_loss(eps_theta, eps_phi, eps, beta=None, prior_weight=1.0, weights=None):
    """DreamBooth with prior preservation: the batch is [instance images; as many class images]. Min-SNR weights
    apply to the instance loss (as diffusers' DreamBooth scripts)."""
    B = len(eps) // 2
    return prior_preservation_loss(eps_theta[:B], eps[:B], eps_theta[B:], eps[B:], prior_weight,
                                   None if weights is None else weights[:B]), None


LOSSES = {"dco": dco_loss, "db": db_loss, "db-prior": db_prior_loss, "dco-relative": relative_dco_loss}


def prior_class(sd, args, out, images, load, name, inits, master=True):
    """db-prior: add the class images to `images` -> (class prompt, their paths); (None, []) for the other losses.
    They are made by the base model, so before any LoRA or new token exists. Under torchrun rank 0 makes them while
    the others wait, then every process reads them."""
    if args.loss != "db-prior":
        return None, []
    prompt = args.class_prompt or f"a photo of a {inits[0] if inits else name}"
    if master:
        class_images(sd, args, out, prompt)
    barrier()
    paths = class_images(sd, args, out, prompt, generate=False)
    images += [load(p) for p in paths]
    return prompt, paths


def class_images(sd, args, out, prompt, generate=True):
    """db-prior: the base model's own images of the class, generated once and cached as PNGs (-> their paths)."""
    folder = args.class_dir or os.path.join(out, "class_images")
    paths = [os.path.join(folder, f"{i:04d}.png") for i in range(args.num_class_images)]
    if not generate:
        return paths
    os.makedirs(folder, exist_ok=True)
    info, info_path = {"prompt": prompt, "model": args.model, "resolution": args.resolution}, Path(folder, "info.json")
    if info_path.is_file() and read_json(info_path) != info:
        raise ValueError(f"{folder} holds class images of another prompt/model/resolution; pass another --class-dir")
    write_json(info_path, info)
    for i in tqdm([i for i, p in enumerate(paths) if not os.path.exists(p)], desc="class images"):
        (image,) = generate_images(sd, [prompt], args, seed=args.seed + i, steps=args.sample_steps or 25)
        save_image(image, paths[i])
    return paths


def generate_images(sd, prompts, args, seed, steps=None):
    """Images from the model as it is now (sample.py: Euler, CFG 5). For decoding the VAE comes back to the device
    and the UNet steps aside: a 1024^2 decode takes GBs (no-ops on a CPU)."""
    device, vae_device = next(sd.unet.parameters()).device, next(sd.vae.parameters()).device
    with torch.no_grad():
        latents = generate_latents(sd, prompts, height=args.resolution, width=args.resolution,
                                   steps=steps or args.sample_steps, seed=seed, progress=False)
        sd.unet.to("cpu"), sd.vae.to(device)
        images = to_pil(decode(sd, latents))
    sd.vae.to(vae_device), sd.unet.to(device)
    return images


def save_samples(sd, args, out, step, captions, tokens):
    prompts = args.sample_prompt or [captions[0]] + [f"a {t} playing saxophone in sticker style" for t in tokens[:1]]
    for i, image in enumerate(generate_images(sd, prompts, args, seed=args.seed)):
        save_image(image, os.path.join(out, "samples", f"step{step:06d}-{i}.png"))


# ----------------------------------------------------------------------------------------------------------
# The step and the loop

def make_caches(sd, args, *, images, paths, class_paths, captions, base_prompts, class_prompt, embeds, amp, device):
    """-> TrainData: the latent Gaussians of the images, phi's encoded base prompts, db-prior's class prompt. Under
    torchrun every process builds the same caches itself: they are small next to the model every GPU holds anyway."""
    device_of_unet = next(sd.unet.parameters()).device
    sd.unet.to("cpu")  # off the GPU while the VAE encodes at full resolution (GBs of activations); no-op on a CPU
    means, logvars = encode_images(sd.vae, [x for x, _ in images])
    sd.unet.to(device_of_unet)
    crops = None
    if args.crop == "random" or args.random_flip:  # then the VAE stays: each new crop is encoded when first drawn
        crops = CropCache(sd.vae, paths + class_paths, args.resolution, args.resample, args.crop == "random",
                          args.random_flip, args.time_ids == "fixed")
    else:
        sd.vae.to("cpu")  # not needed again until sampling
    base_ctx, base_pooled = encode_prompts(sd, base_prompts or captions, amp)
    prior = None
    if class_prompt:  # one batch of B copies: the class half of every db-prior batch
        with torch.no_grad(), amp():
            prior = sd.encode_prompt([class_prompt] * args.batch_size)
    return TrainData(n=len(paths), means=means, logvars=logvars, captions=captions, base_ctx=base_ctx,
                     base_pooled=base_pooled, prior=prior, embeds=embeds, alphas_cumprod=alphas_cumprod(sd.scheduler),
                     time_ids=torch.stack([t for _, t in images]).float().to(device), device=device, crops=crops)


def train_step(unet, opt, scaler, batches, loss_fn, grad_clip=1.0, amp=nullcontext, accum=1):
    """One optimisation step on this process's `accum` micro-batches (an iterable of Batch) -> (loss, implicit
    reward per sample or None), both over these micro-batches. bench.py times exactly this.

    loss_fn(eps_theta, eps_phi, target) -> (loss, reward), plus weights= with --snr-gamma. The gradients reach every
    parameter of `opt` (the LoRA, and the new token rows through batch.cond). Each micro-batch's loss is divided by
    their number K = accum, so the K backward passes add up to the gradient of the mean over all of them; under
    torchrun average_gradients then makes it the mean over the global batch. That is exact because the loss is a
    mean over samples (DCO's log-sigmoid is taken per sample, then averaged), and it happens before clipping, so
    the clipped gradient is the global batch's."""
    losses, rewards = [], []
    for batch in batches:
        eps_phi = None
        if batch.base_cond is not None:
            # phi = the pretrained model = this same UNet with its LoRA switched off (bit-identical to the base):
            # no second copy of SDXL. Without autograd it keeps no activations, so DCO costs one more forward but
            # about DreamBooth's peak memory. It runs first, so its temporaries are freed before theta's pile up.
            # inference_mode rather than no_grad: no version counters or view tracking (cheaper).
            with torch.inference_mode(), lora_scale(unet, 0.0), amp():
                eps_phi = unet(batch.xt, batch.t, *batch.base_cond, batch.time_ids)
        with amp():
            eps_theta = unet(batch.xt, batch.t, *batch.cond, batch.time_ids)
        weights = {} if batch.weights is None else {"weights": batch.weights}  # --snr-gamma
        loss, reward = loss_fn(eps_theta, eps_phi, batch.target, **weights)
        scaler.scale(loss / accum).backward()
        losses.append(loss.detach())
        rewards.append(reward)
    params = [p for group in opt.param_groups for p in group["params"]]
    if dist.is_initialized():
        average_gradients(params)
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return sum(losses) / len(losses), (None if rewards[0] is None else torch.cat(rewards))


def lr_factor(step, args):
    """The learning rates' multiplier at a step: --lr-warmup steps of linear warm-up (step 0 already trains, at
    1/warmup), then constant, or a cosine / linear decay towards 0 at --steps. A pure function of the step, so a
    resumed run needs no scheduler state."""
    if step < args.lr_warmup:
        return (step + 1) / args.lr_warmup
    if args.lr_schedule == "constant":
        return 1.0
    progress = (step - args.lr_warmup) / max(1, args.steps - args.lr_warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) if args.lr_schedule == "cosine" else 1 - progress


# ----------------------------------------------------------------------------------------------------------
# More than one GPU: `torchrun --nproc_per_node N train.py ...` (data parallel, one process per GPU)

def init_distributed(device):
    """-> (rank, world size, device). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without it: (0, 1, device)
    and no process group, so a plain run executes no collective of any kind."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1, device
    if device.type == "cuda":  # one GPU per process
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # A rank that dies is noticed by torchrun, which stops the others within seconds. The timeout only bounds a
        # rank that hangs: long enough for rank 0 to generate db-prior's class images while the others wait.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size(), device


def barrier():
    """Wait for every process (where rank 0 writes what the others then read); nothing without torchrun."""
    if dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def broadcast_parameters(params):
    """Every process starts from rank 0's trainable weights, as DistributedDataParallel does at construction: then
    identical averaged gradients keep them identical (the token rows' retraction included)."""
    if dist.is_initialized():
        for p in params:
            dist.broadcast(p, 0)


@torch.no_grad()
def average_gradients(params):
    """Data parallel by hand: one all_reduce of every gradient, flattened into one buffer, / world size. Chosen over
    wrapping the UNet in DistributedDataParallel because the trainable tensors are not all in the UNet (the token
    rows live in the text encoders), phi calls the same UNet without gradients, and gradient accumulation would need
    no_sync(): one call after the K backward passes says all of it. What it gives up is DDP's overlap of the
    reduction with the backward pass: small for a LoRA (~0.2 GB of fp32 gradients at rank 32 on SDXL)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]  # a rank where it got none
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)


def gather(x):
    """This process's per-sample values (its slice of the global batch) -> the global batch's, in order."""
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def average(x):
    """A scalar averaged over the processes (the global batch's loss, each process having the same share)."""
    if not dist.is_initialized():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


@dataclass
class TrainData:
    """What the loop draws from: the cached latent Gaussians and micro-conditioning of the n images (+ class
    images), theta's captions, phi's encoded base prompts, and for db-prior the encoded class prompt."""
    n: int
    means: torch.Tensor
    logvars: torch.Tensor
    time_ids: torch.Tensor
    captions: list
    base_ctx: torch.Tensor
    base_pooled: torch.Tensor
    prior: tuple | None
    embeds: list
    alphas_cumprod: torch.Tensor
    device: torch.device
    crops: CropCache | None = None


def train(args, loss_fn=None):
    """Train a LoRA (+ new token rows) as `args` say. loss_fn(eps_theta, eps_phi, eps, beta) -> (loss, reward)
    replaces the loss of --loss (the default, DCO, is dco.dco_loss); phi is computed for every loss but db/db-prior.
    With --snr-gamma loss_fn also gets weights= (per sample); for a v-prediction base "eps" is the target v."""
    # --- data: images, captions, and phi's base prompts ("<dog>" -> "dog")
    name, paths, captions, base_prompts, tokens, inits = read_data(args)
    load = functools.partial(load_image, resolution=args.resolution, resample=args.resample,
                             fixed_time_ids=args.time_ids == "fixed")
    images = [load(p) for p in paths]  # every image is read now: bad files fail early
    out = args.output or os.path.join("output", name)
    rank, world_size, device = init_distributed(args.device)  # under torchrun: this process's rank and GPU
    master = rank == 0  # writes every file and prints; the other processes only train
    class_dir = args.class_dir or os.path.join(out, "class_images")
    if master:
        checkpoint.preflight(out, class_dir if args.loss == "db-prior" else None)  # before loading the model
    mp, dtype, amp = precision(args, device)  # the training dtype, and autocast to it (or nothing in fp32)
    flush_denormals(args)
    prior = {"prior_weight": args.prior_weight} if args.loss == "db-prior" else {}
    loss_fn = functools.partial(loss_fn or LOSSES["dco-relative" if args.relative_reward else args.loss],
                                beta=args.beta, **prior)

    # --- the model: UNet and text encoders in the training dtype, the VAE in fp32 (see sdxl.py)
    sd = load_sdxl(args.model, device=device, dtype=dtype, variant=None if mp == "no" else "fp16", vae=args.vae)
    sd.text_encoder.pool = sd.text_encoder_2.pool = args.pool
    check_scheduler_config(sd.scheduler)  # a setting this code cannot train fails here, before any file is written
    captions, base_prompts, tokens, inits = prepare_captions(name, captions, base_prompts, tokens, inits, sd.tokenizer)
    check_model_fits(sd, args, paths, captions, tokens)
    config = {**vars(args), "name": name, "output": out, "device": str(device), "mixed_precision": mp,
              "alpha": args.alpha or float(args.rank), "tokens": tokens, "init_words": inits, "images": paths,
              "image_sha256": [sha256(p) for p in paths], "captions": captions, "base_prompts": base_prompts,
              "world_size": world_size, "global_batch_size": world_size * args.batch_size * args.grad_accum}
    resume_from = checkpoint.check_run_folder(out, config, args.resume, args.steps, master)  # before any write
    barrier()  # every process has checked the folder before rank 0 writes to it
    lock = checkpoint.start_run(out, config) if master else None  # the folder, its lock and train_config.json
    meta = lora_metadata(args, config)
    class_prompt, class_paths = prior_class(sd, args, out, images, load, name, inits, master)  # db-prior

    # --- LoRA on the UNet's attention projections (the trainable part of theta); phi = the same UNet at scale 0
    add_lora(sd.unet, args)
    embeds = add_new_tokens(sd, tokens, inits)  # textual inversion: trainable rows in both text encoders

    # --- caches: each image through the VAE once, the fixed prompts through the text encoders once
    data = make_caches(sd, args, images=images, paths=paths, class_paths=class_paths, captions=captions,
                       base_prompts=base_prompts, class_prompt=class_prompt, embeds=embeds, amp=amp, device=device)

    # --- AdamW on the LoRA (lr) and the new token rows (ti-lr); constant learning rates unless --lr-schedule
    opt, params = adamw(sd.unet, embeds, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=mp == "fp16")  # fp16 gradients underflow without it
    start = checkpoint.resume(resume_from, sd.unet, embeds, opt, scaler, args.steps, master) if resume_from else 0
    broadcast_parameters(params)  # under torchrun: every process starts from rank 0's weights
    base_lrs = [group["lr"] for group in opt.param_groups]

    # --- the loop
    if master:
        print(f"{len(paths)} images, new tokens {tokens}, {sum(p.numel() for p in params):,} trainable parameters, "
              f"loss {args.loss}, {mp} on {device} x {world_size} -> {out}/")
    bar, times = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train", disable=not master), []
    for step in bar:
        t0 = time.perf_counter()
        for group, lr in zip(opt.param_groups, base_lrs):  # --lr-warmup, --lr-schedule
            group["lr"] = lr * lr_factor(step, args)
        t, batches = get_batch(step, data, sd, args, amp, rank, world_size)
        loss, reward = train_step(sd.unet, opt, scaler, batches, loss_fn, grad_clip=args.grad_clip, amp=amp,
                                  accum=args.grad_accum)
        for e in embeds:
            e.rescale()
        times.append(time.perf_counter() - t0)
        # the global batch's loss and rewards (every process joins these collectives; rank 0 logs them)
        loss, reward = average(loss), (None if reward is None else gather(reward))
        record = log_record(step, loss, reward, t, opt, times[-1])
        checkpoint.check_finite(out, record, mp)  # a NaN/inf loss stops the run (on every process: they agree)
        if not master:
            continue
        checkpoint.append_log(out, record)
        bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "implicit_reward") if k in record})
        done = step + 1
        if done == args.steps or (args.checkpoint_every and done % args.checkpoint_every == 0):
            checkpoint.check_finite(out, record, mp, params)  # nothing NaN is ever saved
            if args.checkpoint_every:
                checkpoint.save_checkpoint(os.path.join(out, f"checkpoint-{done}"), sd.unet, embeds, opt, scaler,
                                           done, meta)
            if args.sample_steps:
                save_samples(sd, args, out, done, captions, tokens)

    # --- the LoRA in both formats, the new token rows
    if master:
        checkpoint.save_final(out, sd.unet, embeds, meta, bundle=args.bundle_token)
        lock.release()
        print_resources(times, device)
    return {"sd": sd, "out": out, "embeds": embeds}


def flush_denormals(args):
    """--model sdxl-random: random weights saturate DCO's loss in the first steps (beta 1000), and then every
    gradient is a denormal float, which x86 CPUs compute many times slower (9x in a microbenchmark): flush them to
    zero so the dry run times the real work. Process-wide and it changes the last bits, so only for the random model
    (a real run keeps the exact arithmetic that --resume and the tests reproduce bit for bit)."""
    if args.model == "sdxl-random":
        torch.set_flush_denormal(True)


def precision(args, device):
    """-> (mixed precision name, dtype of the frozen weights, autocast context for it): bf16 on a GPU, fp32 on a CPU
    unless --mixed-precision says otherwise."""
    mp = args.mixed_precision or ("bf16" if device.type == "cuda" else "no")
    dtype = DTYPES["fp32" if mp == "no" else mp]
    return mp, dtype, functools.partial(torch.autocast, device.type, dtype=dtype, enabled=mp != "no")


def add_lora(unet, args):
    """LoRA on the UNet's attention projections: peft's gaussian init, alpha = rank (official: customize.py:503)."""
    torch.manual_seed(args.seed)
    inject_lora(unet, rank=args.rank, alpha=args.alpha, targets=UNET_ATTN)
    for m in lora_modules(unet).values():  # trainable weights in fp32 (AdamW steps of 5e-5 vanish in bf16) ...
        m.lora_down.float(), m.lora_up.float()  # ... not m.float(): the frozen base weight must stay bf16
    unet.gradient_checkpointing = args.gradient_checkpointing
    unet.train()
    if args.compile:  # in place: lora_scale() and the checkpoint code still see the same module objects
        unet.compile()


def adamw(unet, embeds, args, device):
    """-> (AdamW, its parameters): the LoRA at --lr, the new token rows at --ti-lr, the official betas and eps."""
    lora_params, ti_params = lora_parameters(unet), [e.rows for e in embeds]
    groups = [{"params": lora_params, "lr": args.lr}] + ([{"params": ti_params, "lr": args.ti_lr}] if embeds else [])
    # On CUDA the fused kernel updates all ~1,100 LoRA tensors at once instead of a dozen kernels per tensor.
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    return opt, lora_params + ti_params


def lora_metadata(args, config):
    """The safetensors metadata of every LoRA file written: the recipe, and the learned tokens for sample.py."""
    return {"base_model": args.model, "rank": str(args.rank), "alpha": str(config["alpha"]), "loss": args.loss,
            "beta": str(args.beta), "steps": str(args.steps), "resolution": str(args.resolution),
            "token": ",".join(config["tokens"]), "init_word": ",".join(config["init_words"]),
            **({"pool": args.pool} if args.pool != "eos" else {})}  # sample.py samples with the same pooling


def check_model_fits(sd, args, paths, captions, tokens):
    factor = 2 ** (len(sd.vae.config["block_out_channels"]) - 1) * 2 ** (len(sd.unet.down_blocks) - 1)
    if args.resolution % factor:
        raise ValueError(f"--resolution {args.resolution}: must be a multiple of {factor} for this model "
                         "(VAE and UNet downsampling)")
    for p, c in zip(paths, captions):
        if tokens and not any(t in c for t in tokens):
            print(f"warning: the caption of {p} has no {' or '.join(tokens)}: {c!r}", file=sys.stderr)
        check_caption_window(sd, args, p, c, tokens)
    for prompt in args.sample_prompt or []:
        length = errors.token_positions(sd.tokenizer, prompt, tokens[0] if tokens else None)[1]
        if length > errors.prompt_window(sd.tokenizer):
            print(f"warning: --sample-prompt {prompt[:40]!r}... is {length} CLIP tokens; only the first "
                  f"{errors.prompt_window(sd.tokenizer)} are read", file=sys.stderr)


def check_caption_window(sd, args, path, caption, tokens):
    """CLIP reads 75 tokens of a caption: a learned token past them is never seen, and trains nothing."""
    where = args.config or Path(path).with_suffix(".txt")  # where the caption came from
    longest = 0
    for tokenizer in (sd.tokenizer, sd.tokenizer_2):
        window = errors.prompt_window(tokenizer)
        for t in tokens or [None]:
            at, length = errors.token_positions(tokenizer, caption, t)
            longest = max(longest, length)
            if at is not None and at > window:
                raise ValueError(f"{where}: the caption is {length} CLIP tokens and {t} is token {at}, past the "
                                 f"{window} CLIP reads, so it would learn nothing; name {t} earlier or shorten it")
    if longest > errors.prompt_window(sd.tokenizer):
        print(f"warning: {where}: the caption is {longest} CLIP tokens; only the first "
              f"{errors.prompt_window(sd.tokenizer)} are read", file=sys.stderr)


def add_new_tokens(sd, tokens, inits):
    """Textual inversion: the same new tokens in both encoders, each starting as a copy of its init word's row."""
    embeds = []
    for tok, te in ((sd.tokenizer, sd.text_encoder), (sd.tokenizer_2, sd.text_encoder_2)):
        ids = [init_token(tok, te, t, w) for t, w in zip(tokens, inits)]
        if ids:
            emb = te.text_model.embeddings
            emb.token_embedding = NewTokens(emb.token_embedding, ids)
            embeds.append(emb.token_embedding)
    return embeds


def log_record(step, loss, reward, t, opt, seconds):
    record = {"step": step, "loss": loss.item(), "lr": opt.param_groups[0]["lr"], "t": t.tolist()}
    if reward is not None:  # per sample too: DCO's gradient weight 2 sigmoid(-beta r) depends on t (see README)
        record["implicit_reward"] = reward.mean().item()
        record["implicit_rewards"] = reward.tolist()
    record["time"] = seconds
    return record


def peak_memory(device):
    """Peak memory of this process so far, in bytes: the CUDA allocator's peak on a GPU, the peak resident set on a
    CPU (Linux VmHWM; 0 where /proc is missing)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


def print_resources(times, device):
    if times:
        what = "max_memory_allocated" if device.type == "cuda" else "peak RSS"
        print(f"median {statistics.median(times):.3g} s/step over {len(times)} steps; peak memory "
              f"{peak_memory(device) / 2 ** 30:.2f} GiB ({what})")


MEMORY_HINT = ("lower --resolution or --batch-size, add --gradient-checkpointing, or on a GPU use --mixed-precision "
               "bf16; --resume continues from the last checkpoint")


def main(argv=None):
    parsed = []
    rank = int(os.environ.get("RANK", 0))  # under torchrun only rank 0 prints the error; every rank exits 1

    def run():
        parsed.append(parse_args(argv))
        try:
            train(parsed[0])
        except RuntimeError as e:  # under torchrun, a collective that failed: another process died (or hung)
            if not (isinstance(e, dist.DistBackendError) or "gloo/transport" in str(e)):  # NCCL's class; gloo's words
                raise
            raise ValueError(f"rank {rank}: another process stopped ({errors.first_line(e)}); run again with "
                             "--resume to continue from the last checkpoint") from None
        if dist.is_initialized():
            dist.destroy_process_group()
    errors.cli(run, memory_hint=MEMORY_HINT, next_command=lambda: resume_hint(parsed[0] if parsed else None),
               quiet=rank != 0)


def resume_hint(args):
    """After Ctrl-C or a full disk: what the next command continues from."""
    if args is None:
        return "run the same command again"
    out = args.output or os.path.join("output", args.config_name or os.path.basename(os.path.normpath(args.images)))
    found = checkpoint.checkpoints(out)
    return (f"the same command with --resume continues from {found[-1][1]}" if found else
            "no checkpoint was saved yet: run the same command again")


if __name__ == "__main__":
    main()
