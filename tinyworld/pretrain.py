"""Pretrain the tiny SDXL on the tiny world, from scratch, on a CPU:  python -m tinyworld.pretrain

Two stages, as latent diffusion was trained (Rombach et al. 2022): first the autoencoder, then the diffusion model
in its latent space.

1. VAE: plain reconstruction (MSE) plus a very small KL term, on world scenes mixed half-and-half with "clutter":
   random shapes in random colours with random checks, stripes and outlines. The clutter makes it a generic codec,
   as SDXL's VAE is one for natural images: it must represent the new concepts (a checkered ball, a pastel
   palette, outlines) that the diffusion model has never seen, without ever having seen those concepts either.
   The scaling factor is 1 / std of the latents of world images, as SD's 0.18215 was chosen.
2. UNet + both text encoders, jointly, with the plain diffusion loss (eps-prediction, SDXL's schedule, Min-SNR-5
   weights, Hang et al. 2023, which converge several times faster at this budget). Joint rather than frozen random
   text encoders: the pooled vector and the token states then carry the attributes cleanly, prompt control is
   learned in fewer steps, and a new token's embedding (textual inversion) lives in a trained space, as in SDXL.
   10% of captions are dropped to SDXL's "no prompt" (all-zero context and pooled vector, force_zeros_for_empty_
   prompt), which is what classifier-free guidance in sample.py subtracts. Weights: the EMA of the trained ones.

Every random draw is a function of (seed, stage, step), so a run killed and restarted with the same command
resumes from its last checkpoint (in --work) and ends with the same weights. Writes fp32 safetensors atomically
into --output (tinyworld/model) in the diffusers layout, and prints the command that made them.
"""
import argparse
import hashlib
import json
import math
import os
import shlex
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from dco import add_noise, alphas_cumprod, diffusion_loss, min_snr_weights
from product import errors
from product.files import save_tensors
from text_encoder import CLIPTokenizer, encode_prompt

from . import model as M
from . import world

# ----------------------------------------------------------------------------------------------------------
# Randomness and files


def rng(*key):
    """A generator seeded by a key like (seed, "unet", step): every draw of a step is a pure function of it."""
    return np.random.default_rng(int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little"))


def torch_rng(*key):
    return torch.Generator().manual_seed(int(rng(*key).integers(2 ** 62)))


def save_atomic(tensors, path, metadata=None):
    save_tensors(path, tensors, metadata)  # files.save_tensors: atomic, usual permissions


def state_of(prefix, module):
    return {f"{prefix}.{k}": v.detach().clone().contiguous() for k, v in module.state_dict().items()}


def load_into(module, tensors, prefix):
    module.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})


def optimizer_state(opt):
    return {f"opt.{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).contiguous()
            for i, s in opt.state_dict()["state"].items() for k, v in s.items()}


def load_optimizer(opt, tensors):
    state = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def to_tensor(images):
    """uint8 [B,H,W,3] -> float [B,3,H,W] in [-1, 1], the VAE's input range."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def lr_at(step, steps, lr, warmup):
    """Linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


# ----------------------------------------------------------------------------------------------------------
# Stage 1: the VAE


def clutter(r: np.random.Generator, size=world.SIZE):
    """A random image of 1-4 shapes in random colours, each solid, checkered, striped (any angle) or outlined,
    on a random background: generic structure, none of it the world's concepts."""
    n = size * world.SUPERSAMPLE
    u = (np.arange(n) + 0.5) / n
    X, Y = np.meshgrid(u, u)
    img = np.empty((n, n, 3))
    img[:] = r.integers(0, 256, 3)
    for _ in range(r.integers(1, 5)):
        cx, cy = r.uniform(0.1, 0.9, 2)
        half = r.uniform(0.08, 0.35)
        lx, ly = (X - cx) / half, (Y - cy) / half
        mask = world.shape_mask(world.KINDS[r.integers(len(world.KINDS))], lx, ly)
        a, b = r.integers(0, 256, (2, 3)).astype(float)
        texture = r.integers(4)
        if texture == 1:  # checker, 2-7 cells across
            k = r.uniform(2, 7)
            idx = (np.floor((lx + 1) * k / 2) + np.floor((ly + 1) * k / 2)).astype(int) % 2
        elif texture == 2:  # stripes at any angle, 2-7 across
            theta, k = r.uniform(0, np.pi), r.uniform(2, 7)
            idx = np.floor((lx * np.cos(theta) + ly * np.sin(theta) + 2) * k / 2).astype(int) % 2
        else:
            idx = np.zeros(mask.shape, dtype=int)
        img[mask] = np.stack([a, b])[idx][mask]
        if texture == 3:  # an outline 0.75-2 pixels wide
            img[world.dilate(mask, r.uniform(0.75, 2) * world.SUPERSAMPLE) & ~mask] = b
    img = img.reshape(size, world.SUPERSAMPLE, size, world.SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.round(img).astype(np.uint8)


def vae_batch(seed, step, batch_size, crop):
    """Half world scenes, half clutter, each cut to a random crop x crop window: the autoencoder is convolutional
    and local (its one attention layer is a residual), so crops teach it at a quarter of the cost. Its GroupNorms
    see statistics of the whole image, though, so the last steps are on whole images (without them, full-size
    reconstructions show faint bands)."""
    r = rng(seed, "vae", step)
    out = []
    for i in range(batch_size):
        img = world.render(world.random_scene(r)) if i % 2 else clutter(r)
        y, x = r.integers(0, world.SIZE - crop + 1, 2)
        out.append(img[y : y + crop, x : x + crop])
    return to_tensor(np.stack(out))


def train_vae(args, work):
    path, ckpt = os.path.join(work, "vae.safetensors"), os.path.join(work, "vae_checkpoint.safetensors")
    vae = M.new_vae(args.seed)
    with torch.no_grad():  # start nearly deterministic (std 0.02): with std 1 the decoder first learns from noise
        vae.quant_conv.bias[vae.config["latent_channels"]:] = -8.0
    if os.path.exists(path):
        vae.load_state_dict(load_file(path))
        with safe_open(path, "pt") as f:
            vae.config["scaling_factor"] = float(f.metadata()["scaling_factor"])
        return vae.eval().requires_grad_(False)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    start = 0
    if os.path.exists(ckpt):
        tensors = load_file(ckpt)
        load_into(vae, tensors, "vae")
        load_optimizer(opt, tensors)
        start = int(tensors["step"])
        print(f"vae: resuming at step {start}")
    t0 = time.time()
    for step in range(start, args.vae_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vae_steps, args.vae_lr, 20)
        full = step >= args.vae_steps - args.vae_full_steps  # GroupNorm statistics of whole images, at the end
        x = vae_batch(args.seed, step, args.vae_batch_size // 2 if full else args.vae_batch_size,
                      world.SIZE if full else args.vae_crop)
        mean, logvar = vae.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=torch_rng(args.seed, "vae-z", step))
        rec = F.mse_loss(vae.decode(z), x)
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
        loss = rec + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if (step + 1) % 25 == 0:
            psnr = 10 * math.log10(4 / rec.item())
            print(f"vae step {step + 1}/{args.vae_steps}  mse {rec.item():.5f} (PSNR {psnr:.1f} dB)  kl {kl.item():.2f}"
                  f"  {(time.time() - t0) / (step + 1 - start):.2f} s/step", flush=True)
        if (step + 1) % args.checkpoint_every == 0:
            save_atomic({**state_of("vae", vae), **optimizer_state(opt), "step": torch.tensor(step + 1)}, ckpt)
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # scaling factor: unit-variance latents for the diffusion model
        images, _, _ = world.dataset(512, seed=args.seed + 1)
        std = vae.encode(to_tensor(images))[0].std().item()
    vae.config["scaling_factor"] = round(1 / std, 5)
    save_atomic(vae.state_dict(), path, metadata={"scaling_factor": str(vae.config["scaling_factor"])})
    return vae


# ----------------------------------------------------------------------------------------------------------
# Stage 2: UNet + text encoders


@torch.no_grad()
def encode_dataset(vae, args, work):
    """The training set, rendered and encoded once: (latent means, logvars, captions)."""
    path = os.path.join(work, "latents.safetensors")
    if os.path.exists(path):
        t = load_file(path)
        captions = json.loads(open(os.path.join(work, "captions.json")).read())
        return t["mean"], t["logvar"], captions
    images, captions, _ = world.dataset(args.images, seed=args.seed)
    means, logvars = zip(*(vae.encode(to_tensor(chunk)) for chunk in np.array_split(images, max(1, len(images) // 256))))
    with open(os.path.join(work, "captions.json"), "w") as f:
        json.dump(captions, f)
    means, logvars = torch.cat(means).contiguous(), torch.cat(logvars).contiguous()
    save_atomic({"mean": means, "logvar": logvars}, path)
    return means, logvars, captions


def train_unet(args, work, vae):
    means, logvars, captions = encode_dataset(vae, args, work)
    tok, tok2 = (CLIPTokenizer.from_folder(M.write_tokenizer(os.path.join(work, name), pad))
                 for name, pad in (("tokenizer", M.EOS), ("tokenizer_2", "!")))
    te, te2 = M.build_text_encoders(args.seed)
    unet = M.new_unet(args.seed)
    modules = {"unet": unet, "text_encoder": te, "text_encoder_2": te2}
    params = [p for m in modules.values() for p in m.parameters()]
    ema = {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in modules.items()}
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    acp = alphas_cumprod(M.SCHEDULER_CONFIG)
    scale = vae.config["scaling_factor"]
    time_ids = torch.tensor([M.MICRO_CONDITIONING], dtype=torch.float32)
    ckpt, start = os.path.join(work, "unet_checkpoint.safetensors"), 0
    if os.path.exists(ckpt):
        tensors = load_file(ckpt)
        for name, m in modules.items():
            load_into(m, tensors, name)
            ema[name] = {k[len(name) + 5:]: v for k, v in tensors.items() if k.startswith(f"ema.{name}.")}
        load_optimizer(opt, tensors)
        start = int(tensors["step"])
        print(f"unet: resuming at step {start}")
    n, B = len(captions), args.batch_size
    t0 = time.time()
    for step in range(start, args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        r, g = rng(args.seed, "unet", step), torch_rng(args.seed, "unet", step)
        idx = torch.from_numpy(r.integers(0, n, B))
        x0 = (means[idx] + torch.exp(0.5 * logvars[idx]) * torch.randn(means[idx].shape, generator=g)) * scale
        eps = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, len(acp), (B,), generator=g)
        keep = torch.from_numpy(r.random(B) >= args.caption_dropout).float()
        ctx, pooled = encode_prompt([captions[i] for i in idx], tok, tok2, te, te2)
        ctx, pooled = ctx * keep[:, None, None], pooled * keep[:, None]  # dropped = SDXL's zero "no prompt"
        eps_pred = unet(add_noise(x0, eps, t, acp), t, ctx, pooled, time_ids.expand(B, -1))
        loss = diffusion_loss(eps_pred, eps, min_snr_weights(t, acp, 5.0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for name, m in modules.items():
                for k, v in m.state_dict().items():
                    ema[name][k].lerp_(v, 1 - decay) if v.is_floating_point() else ema[name][k].copy_(v)
        if (step + 1) % 25 == 0:
            rate = (time.time() - t0) / (step + 1 - start)
            print(f"unet step {step + 1}/{args.steps}  loss {loss.item():.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"{rate:.2f} s/step, ~{rate * (args.steps - step - 1) / 60:.0f} min left", flush=True)
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
            tensors = {**{k: v for name, m in modules.items() for k, v in state_of(name, m).items()},
                       **{f"ema.{name}.{k}": v.clone() for name, sd in ema.items() for k, v in sd.items()},
                       **optimizer_state(opt), "step": torch.tensor(step + 1)}
            save_atomic(tensors, ckpt)
    for name, m in modules.items():
        m.load_state_dict(ema[name])
    return unet, te, te2


# ----------------------------------------------------------------------------------------------------------


VAE_ARGS = ("seed", "vae_steps", "vae_batch_size", "vae_lr", "vae_crop", "vae_full_steps", "kl_weight")
UNET_ARGS = ("images", "steps", "batch_size", "lr", "warmup", "ema", "caption_dropout")


def reuse_work_dir(args):
    """Resume what the work folder holds for these settings: a run with other VAE settings is refused, one with
    other UNet settings keeps its VAE (and its encoded data set if --images is the same) and restarts the UNet."""
    path, config = os.path.join(args.work, "args.json"), {k: getattr(args, k) for k in VAE_ARGS + UNET_ARGS}
    old = json.load(open(path)) if os.path.exists(path) else config
    if any(old.get(k) != config[k] for k in VAE_ARGS):
        sys.exit(f"error: {args.work} holds a run with other VAE settings ({path}); pass another --work or delete it")
    stale = ["unet_checkpoint.safetensors"] if any(old.get(k) != config[k] for k in UNET_ARGS) else []
    stale += ["latents.safetensors", "captions.json"] if old.get("images") != config["images"] else []
    for name in stale:
        if os.path.exists(os.path.join(args.work, name)):
            os.remove(os.path.join(args.work, name))
            print(f"other settings than the last run in {args.work}: removed {name}")
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Pretrain the tiny SDXL on the tiny world (CPU, ~30 min on 2 cores).")
    p.add_argument("--output", default=M.MODEL_DIR, help="model folder to write (diffusers layout)")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "tinyworld_pretrain"),
                   help="checkpoints and cached latents; rerun the same command to resume")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared machine: with 2 threads and "
                   "another busy process, OpenMP's spinning barriers made steps 10x slower here")
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-batch-size", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=3e-3)
    p.add_argument("--vae-crop", type=int, default=16, help="the VAE trains on random crops this big ...")
    p.add_argument("--vae-full-steps", type=int, default=300, help="... except in its last steps (whole images)")
    p.add_argument("--kl-weight", type=float, default=1e-5)
    p.add_argument("--images", type=int, default=10000, help="size of the rendered training set")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--checkpoint-every", type=int, default=100)
    return errors.parse_flags(p, argv, {
        "seed": "seed", "threads": ">= 1", "vae_steps": ">= 1", "vae_batch_size": ">= 1", "vae_lr": "> 0",
        "vae_crop": ">= 8", "vae_full_steps": ">= 0", "kl_weight": ">= 0", "images": ">= 1", "steps": ">= 1",
        "batch_size": ">= 1", "lr": "> 0", "warmup": ">= 0", "ema": "0 .. 1", "caption_dropout": "0 .. 1",
        "checkpoint_every": ">= 1"})


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = " ".join(["python -m tinyworld.pretrain", *map(shlex.quote, argv if argv is not None else sys.argv[1:])])
    os.makedirs(args.work, exist_ok=True)
    reuse_work_dir(args)
    t0 = time.time()
    vae = train_vae(args, args.work)
    print(f"vae done ({(time.time() - t0) / 60:.1f} min), scaling factor {vae.config['scaling_factor']}", flush=True)
    unet, te, te2 = train_unet(args, args.work, vae)
    minutes = (time.time() - t0) / 60
    meta = {"command": command, "seed": str(args.seed),
            "pretrain_args": json.dumps({k: getattr(args, k) for k in VAE_ARGS + UNET_ARGS})}
    M.save_model(args.output, unet, vae, te, te2, metadata=meta)
    print(f"wrote {args.output} after {minutes:.1f} min (this process) with:\n  {command}")


if __name__ == "__main__":
    main()
