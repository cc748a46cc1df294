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
import json
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
from dco import (add_noise, alphas_cumprod, dco_loss, diffusion_loss, prior_preservation_loss, sample_noise,
                 sample_timesteps)
from files import DTYPES, save_image, write_json
from lora import UNET_ATTN, inject_lora, lora_modules, lora_parameters, lora_scale
from sample import generate
from sdxl import SDXL_BASE, load_sdxl, native_resolution
from text_encoder import init_token
from vae import latent_dist_sample

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def parse_args(argv=None):
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
    g = p.add_argument_group("model and output")
    g.add_argument("--model", default=SDXL_BASE, help="hub id, diffusers folder, single-file .safetensors, or tiny "
                                                      "(the tiny SDXL of tinyworld/: a real run on a CPU)")
    g.add_argument("--output", help="output folder (default: output/<images folder or config name>)")
    g.add_argument("--device", help="default: cuda if available, else cpu")
    g = p.add_argument_group("the loss")
    g.add_argument("--loss", default="dco", choices=["dco", "db", "db-prior"])
    g.add_argument("--beta", type=float, default=1000.0, help="DCO's beta (1000-2000 work in the paper)")
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
    g = p.add_argument_group("speed and memory")
    g.add_argument("--mixed-precision", choices=["bf16", "fp16", "no"], help="default: bf16 on GPU, no on CPU")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet (GPU: faster steps after a "
                                                          "minute or two of compiling)")
    g = p.add_argument_group("checkpoints and samples")
    g.add_argument("--checkpoint-every", type=int, default=500, help="0: no checkpoints")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output folder")
    g.add_argument("--sample-prompt", action="append", help="prompt of the sample images (repeatable)")
    g.add_argument("--sample-steps", type=int, default=25, help="sampler steps of the sample images; 0: no samples")
    g = p.add_argument_group("db-prior (DreamBooth with prior preservation)")
    g.add_argument("--class-prompt", help='prompt of the class images (default "a photo of a <init word>")')
    g.add_argument("--num-class-images", type=int, default=100)
    g.add_argument("--prior-weight", type=float, default=1.0)
    g.add_argument("--class-dir", help="cache of generated class images (default: <output>/class_images)")
    args = p.parse_args(argv)
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
    if args.seed < 0 or args.checkpoint_every < 0 or args.sample_steps < 0 or args.lr_warmup < 0:
        raise ValueError("--seed, --checkpoint-every, --sample-steps and --lr-warmup must be >= 0")
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


def encode_prompts(sd, prompts, amp):
    """(context [n,77,2048], pooled [n,1280]), one prompt at a time and under autocast as the per-step encoding of
    theta's prompts: then at step 0 theta's conditioning (<dog>) equals phi's (dog) bit for bit, and the first DCO
    loss is exactly log 2."""
    with torch.no_grad(), amp():
        cond = [sd.encode_prompt([prompt]) for prompt in prompts]
    return torch.cat([c for c, _ in cond]), torch.cat([p for _, p in cond])


@dataclass
class Batch:
    """One step's inputs: noisy latents x_t, the noise eps in them, timesteps t, SDXL's micro-conditioning, and the
    (context, pooled) conditioning of theta's prompts c and of phi's base prompts c_base (None: no phi, DreamBooth)."""
    xt: torch.Tensor
    eps: torch.Tensor
    t: torch.Tensor
    time_ids: torch.Tensor
    cond: tuple
    base_cond: tuple | None


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
    x0 = latent_dist_sample(data.means[idx], data.logvars[idx], g) * sd.vae.scaling_factor
    eps = sample_noise(x0, args.offset_noise, g)
    t = sample_timesteps(len(idx), len(data.alphas_cumprod), generator=g)
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
            yield Batch(xt[part].to(data.device), eps[part].to(data.device), t[part].to(data.device),
                        data.time_ids[idx[part]], cond, base_cond if args.loss == "dco" else None)

    return t[:G], micro_batches()


# ----------------------------------------------------------------------------------------------------------
# The losses train() can use: loss_fn(eps_theta, eps_phi, eps, beta) -> (loss, implicit reward per sample or None)

def db_loss(eps_theta, eps_phi, eps, beta=None):
    """DreamBooth-LoRA: the plain diffusion loss (phi and beta unused)."""
    return diffusion_loss(eps_theta, eps), None


def db_prior_loss(eps_theta, eps_phi, eps, beta=None, prior_weight=1.0):
    """DreamBooth with prior preservation: the batch is [instance images; as many class images]."""
    B = len(eps) // 2
    return prior_preservation_loss(eps_theta[:B], eps[:B], eps_theta[B:], eps[B:], prior_weight), None


LOSSES = {"dco": dco_loss, "db": db_loss, "db-prior": db_prior_loss}


def prior_class(sd, args, out, images, name, inits, master=True):
    """db-prior: add the class images to `images` and return the class prompt (None for the other losses). They are
    made by the base model, so before any LoRA or new token exists. Under torchrun rank 0 makes them while the others
    wait, then every process reads them."""
    if args.loss != "db-prior":
        return None
    prompt = args.class_prompt or f"a photo of a {inits[0] if inits else name}"
    if master:
        class_images(sd, args, out, prompt)
    barrier()
    images += [load_image(p, args.resolution) for p in class_images(sd, args, out, prompt, generate=False)]
    return prompt


def class_images(sd, args, out, prompt, generate=True):
    """db-prior: the base model's own images of the class, generated once and cached as PNGs (-> their paths)."""
    folder = args.class_dir or os.path.join(out, "class_images")
    paths = [os.path.join(folder, f"{i:04d}.png") for i in range(args.num_class_images)]
    if not generate:
        return paths
    os.makedirs(folder, exist_ok=True)
    info, info_path = {"prompt": prompt, "model": args.model, "resolution": args.resolution}, Path(folder, "info.json")
    if info_path.is_file() and json.loads(info_path.read_text()) != info:
        raise ValueError(f"{folder} holds class images of another prompt/model/resolution; pass another --class-dir")
    write_json(info_path, info)
    for i in tqdm([i for i, p in enumerate(paths) if not os.path.exists(p)], desc="class images"):
        save_image(generate_images(sd, [prompt], args, seed=args.seed + i)[0], paths[i])
    return paths


def generate_images(sd, prompts, args, seed):
    """Images from the model as it is now (sample.py: Euler, CFG 5), with the VAE brought back for decoding."""
    vae_device = next(sd.vae.parameters()).device
    sd.vae.to(next(sd.unet.parameters()).device)
    with torch.no_grad():
        images = generate(sd, prompts, height=args.resolution, width=args.resolution, steps=args.sample_steps,
                          seed=seed, progress=False)
    sd.vae.to(vae_device)
    return images


def save_samples(sd, args, out, step, captions, tokens):
    prompts = args.sample_prompt or [captions[0]] + [f"a {t} playing saxophone in sticker style" for t in tokens[:1]]
    for i, image in enumerate(generate_images(sd, prompts, args, seed=args.seed)):
        save_image(image, os.path.join(out, "samples", f"step{step:06d}-{i}.png"))


# ----------------------------------------------------------------------------------------------------------
# The step and the loop

def train_step(unet, opt, scaler, batches, loss_fn, grad_clip=1.0, amp=nullcontext, accum=1):
    """One optimisation step on this process's `accum` micro-batches (an iterable of Batch) -> (loss, implicit
    reward per sample or None), both over these micro-batches. bench.py times exactly this.

    loss_fn(eps_theta, eps_phi, eps) -> (loss, reward). The gradients reach every parameter of `opt` (the LoRA, and
    the new token rows through batch.cond). Each micro-batch's loss is divided by their number K = accum, so the K
    backward passes add up to the gradient of the mean over all of them; under torchrun average_gradients then makes
    it the mean over the global batch. That is exact because the loss is a mean over samples (DCO's log-sigmoid is
    taken per sample, then averaged), and it happens before clipping, so the clipped gradient is the global batch's."""
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
        loss, reward = loss_fn(eps_theta, eps_phi, batch.eps)
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


def train(args, loss_fn=None):
    """Train a LoRA (+ new token rows) as `args` say. loss_fn(eps_theta, eps_phi, eps, beta) -> (loss, reward)
    replaces the loss of --loss (the default, DCO, is dco.dco_loss); phi is computed for every loss but db/db-prior."""
    # --- data: images, captions, and phi's base prompts ("<dog>" -> "dog")
    name, paths, captions, base_prompts, tokens, inits = read_data(args)
    images = [load_image(p, args.resolution) for p in paths]  # every image is read now: bad files fail early
    out = args.output or os.path.join("output", name)
    rank, world_size, device = init_distributed(args.device)  # under torchrun: this process's rank and GPU
    master = rank == 0  # writes every file and prints; the other processes only train
    mp = args.mixed_precision or ("bf16" if device.type == "cuda" else "no")
    dtype = DTYPES["fp32" if mp == "no" else mp]
    amp = functools.partial(torch.autocast, device.type, dtype=dtype, enabled=mp != "no")
    loss_fn = functools.partial(loss_fn or LOSSES[args.loss], beta=args.beta,
                                **({"prior_weight": args.prior_weight} if args.loss == "db-prior" else {}))

    # --- the model: UNet and text encoders in the training dtype, the VAE in fp32 (see sdxl.py)
    sd = load_sdxl(args.model, device=device, dtype=dtype)
    captions, base_prompts, tokens, inits = prepare_captions(name, captions, base_prompts, tokens, inits, sd.tokenizer)
    check_model_fits(sd, args, paths, captions, tokens)
    config = {**vars(args), "name": name, "output": out, "device": str(device), "mixed_precision": mp,
              "alpha": args.alpha or float(args.rank), "tokens": tokens, "init_words": inits,
              "images": paths, "captions": captions, "base_prompts": base_prompts, "world_size": world_size,
              "global_batch_size": world_size * args.batch_size * args.grad_accum}
    resume_from = checkpoint.check_run_folder(out, config, args.resume, args.steps)  # before anything is written
    barrier()  # every process has checked the folder before rank 0 writes to it
    if master:
        os.makedirs(out, exist_ok=True)
        write_json(os.path.join(out, checkpoint.CONFIG_FILE), config)
    meta = lora_metadata(args, config)
    class_prompt = prior_class(sd, args, out, images, name, inits, master)  # db-prior: class images, + images

    # --- LoRA on the UNet's attention projections: peft's gaussian init, alpha = rank (official: customize.py:503)
    torch.manual_seed(args.seed)
    inject_lora(sd.unet, rank=args.rank, alpha=args.alpha, targets=UNET_ATTN)
    for m in lora_modules(sd.unet).values():  # trainable weights in fp32 (AdamW steps of 5e-5 vanish in bf16) ...
        m.lora_down.float(), m.lora_up.float()  # ... not m.float(): the frozen base weight must stay bf16
    sd.unet.gradient_checkpointing = args.gradient_checkpointing
    sd.unet.train()
    if args.compile:  # in place: lora_scale() and the checkpoint code still see the same module objects
        sd.unet.compile()
    embeds = add_new_tokens(sd, tokens, inits)  # textual inversion: trainable rows in both text encoders

    # --- caches: each image through the VAE once, the fixed prompts through the text encoders once
    # (under torchrun every process builds the same caches itself: they are small next to the model every GPU holds
    # anyway, and each process has its own copy of the encoders to build them with)
    means, logvars = encode_images(sd.vae, [x for x, _ in images])
    sd.vae.to("cpu")  # not needed again until sampling
    base_ctx, base_pooled = encode_prompts(sd, base_prompts or captions, amp)
    prior = None
    if class_prompt:  # one batch of B copies: the class half of every db-prior batch
        with torch.no_grad(), amp():
            prior = sd.encode_prompt([class_prompt] * args.batch_size)
    data = TrainData(n=len(paths), means=means, logvars=logvars, captions=captions, base_ctx=base_ctx,
                     base_pooled=base_pooled, prior=prior, embeds=embeds, alphas_cumprod=alphas_cumprod(sd.scheduler),
                     time_ids=torch.stack([t for _, t in images]).float().to(device), device=device)

    # --- AdamW on the LoRA (lr) and the new token rows (ti-lr); constant learning rates unless --lr-schedule
    lora_params, ti_params = lora_parameters(sd.unet), [e.rows for e in embeds]
    groups = [{"params": lora_params, "lr": args.lr}] + ([{"params": ti_params, "lr": args.ti_lr}] if embeds else [])
    # On CUDA the fused kernel updates all ~1,100 LoRA tensors at once instead of a dozen kernels per tensor.
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=mp == "fp16")  # fp16 gradients underflow without it
    start = 0
    if resume_from:
        start = checkpoint.load_checkpoint(resume_from, sd.unet, embeds, opt, scaler)
        if master:
            checkpoint.truncate_log(out, start)
            print(f"resuming from {resume_from}")
    broadcast_parameters(lora_params + ti_params)  # under torchrun: every process starts from rank 0's weights
    base_lrs = [group["lr"] for group in opt.param_groups]

    # --- the loop
    if master:
        print(f"{len(paths)} images, new tokens {tokens}, {sum(p.numel() for p in lora_params + ti_params):,} "
              f"trainable parameters, loss {args.loss}, {mp} on {device} x {world_size} -> {out}/")
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train", disable=not master)
    times = []
    for step in bar:
        t0 = time.perf_counter()
        for group, lr in zip(opt.param_groups, base_lrs):
            group["lr"] = lr * lr_factor(step, args)
        t, batches = get_batch(step, data, sd, args, amp, rank, world_size)
        loss, reward = train_step(sd.unet, opt, scaler, batches, loss_fn, grad_clip=args.grad_clip, amp=amp,
                                  accum=args.grad_accum)
        for e in embeds:
            e.rescale()
        times.append(time.perf_counter() - t0)
        # the global batch's loss and rewards (every process joins these collectives; rank 0 logs them)
        loss, reward = average(loss), (None if reward is None else gather(reward))
        if not master:
            continue
        record = log_record(step, loss, reward, t, opt, times[-1])
        checkpoint.append_log(out, record)
        bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "implicit_reward") if k in record})
        done = step + 1
        if done == args.steps or (args.checkpoint_every and done % args.checkpoint_every == 0):
            if args.checkpoint_every:
                checkpoint.save_checkpoint(os.path.join(out, f"checkpoint-{done}"), sd.unet, embeds, opt, scaler,
                                           done, meta)
            if args.sample_steps:
                save_samples(sd, args, out, done, captions, tokens)

    # --- the LoRA in both formats, the new token rows
    if master:
        checkpoint.save_final(out, sd.unet, embeds, meta)
        print_resources(times, device)
    return {"sd": sd, "out": out, "embeds": embeds}


def lora_metadata(args, config):
    """The safetensors metadata of every LoRA file written: the recipe, and the learned tokens for sample.py."""
    return {"base_model": args.model, "rank": str(args.rank), "alpha": str(config["alpha"]), "loss": args.loss,
            "beta": str(args.beta), "steps": str(args.steps), "resolution": str(args.resolution),
            "token": ",".join(config["tokens"]), "init_word": ",".join(config["init_words"])}


def check_model_fits(sd, args, paths, captions, tokens):
    factor = 2 ** (len(sd.vae.config["block_out_channels"]) - 1) * 2 ** (len(sd.unet.down_blocks) - 1)
    if args.resolution % factor:
        raise ValueError(f"--resolution {args.resolution}: must be a multiple of {factor} for this model "
                         "(VAE and UNet downsampling)")
    for p, c in zip(paths, captions):
        if tokens and not any(t in c for t in tokens):
            print(f"warning: the caption of {p} has no {' or '.join(tokens)}: {c!r}", file=sys.stderr)


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


def main(argv=None):
    rank = int(os.environ.get("RANK", 0))  # under torchrun only rank 0 prints the error; every rank exits 1
    try:
        train(parse_args(argv))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}" if rank == 0 else 1)
    except RuntimeError as e:  # under torchrun, a collective that failed: another process died (or hung)
        if not (isinstance(e, dist.DistBackendError) or "gloo/transport" in str(e)):  # NCCL's class; gloo's words
            raise
        sys.exit(f"error: rank {rank}: another process stopped ({str(e).splitlines()[0]}); run again with --resume "
                 "to continue from the last checkpoint")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
