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

Read top to bottom, in the paper's order: data -> new tokens -> LoRA -> caches -> a batch -> train_step -> train().
The product around it lives in product/: the flags and their checks (train_cli.py), image files and crops
(images.py), the run folder with its log, checkpoints and --resume (run_folder.py), and torchrun (distributed.py).
"""
import functools
import hashlib
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines import dreambooth
from dco import (add_noise, alphas_cumprod, check_scheduler_config, dco_loss, diffusion_loss, min_snr_weights,
                 prior_preservation_loss, relative_dco_loss, sample_noise, sample_timesteps, training_target)
from lora import UNET_ATTN, inject_lora, lora_modules, lora_parameters, lora_scale
from product import buckets, distributed, run_folder, train_cli
from product.files import read_official_config
from product.images import CropCache, image_size, list_images
from sample import generate_while_training
from sdxl import load_sdxl
from text_encoder import init_token
from vae import latent_dist_sample

parse_args = train_cli.parse_args  # argv -> args, for train(args) (the notebook's seam)

# ----------------------------------------------------------------------------------------------------------
# Data: images and their captions; phi's base prompts

def read_data(images=None, config=None, config_name=None, token=None, init_word=None):
    """-> (name, image paths, captions (None where none), base prompts or None, tokens, init words), from a folder
    of images (a NAME.txt caption beside each, kohya's convention) or an entry of the official data config."""
    if config:  # {name: {images, prompts, base_prompts, inserting_tokens, initializer_tokens}}
        name, (paths, captions, base, tokens, inits) = config_name, read_official_config(config, config_name)
    else:
        (paths, captions), base, tokens, inits = list_images(images), None, [], []
        name = os.path.basename(os.path.normpath(images))
    if token:
        tokens, inits = [token], [init_word]
        for p, c in zip(paths, captions):  # a caption that never says the token would teach the token nothing
            if c is not None and token not in c:
                where = config or os.path.splitext(p)[0] + ".txt"
                raise ValueError(f"{where}: the caption {c!r} has no {token}; write it where the subject is named, "
                                 f"e.g. 'a photo of {token}'")
    return name, paths, captions, base, tokens, inits


def prepare_captions(name, captions, base, tokens, inits, tokenizer, any_word=False):
    """Decide the new tokens, fill in missing captions, derive phi's base prompts -> (captions, base, tokens, inits).

    The bare `--images ./dog`: learn "<dog>" from "dog" when the folder name is one CLIP word and some image has no
    caption (or a caption says "<dog>"); with full captions and no token, the LoRA is trained alone (e.g. a style).
    any_word (--model sdxl-random, whose byte-level tokenizer splits every word): any folder name and init word
    will do, since for random weights the ids mean nothing and only the shapes count."""
    word = "-".join(name.lower().split())
    one_token = lambda w: any_word or len(tokenizer.encode(w)) == 1  # noqa: E731
    if not tokens and (None in captions or any(f"<{word}>" in c for c in captions if c)):
        if not (any_word or word.isalpha() and one_token(word)):
            raise ValueError(f"images without captions need a token, and the folder name '{name}' is not one CLIP "
                             f"word: pass --token '<x>' --init-word WORD, or a NAME.txt caption per image")
        tokens, inits = [f"<{word}>"], [word]
    for w in inits:
        if not one_token(w):
            raise ValueError(f"--init-word {w!r} is {len(tokenizer.encode(w))} CLIP tokens; pick a word that is one "
                             "token (e.g. dog, cat, toy, person)")
    captions = [c if c is not None else f"a photo of {' '.join(tokens)}" for c in captions]
    if tokens and base is None:  # phi reads the caption in words it knows, <dog> -> dog (official: customize.py:255)
        base = list(captions)
        for tok, w in zip(tokens, inits):
            base = [b.replace(tok, w) for b in base]
    return captions, base, tokens, inits


# ----------------------------------------------------------------------------------------------------------
# New tokens (textual inversion) and the LoRA: the trainable part of theta

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


def add_new_tokens(sd, tokens, inits):
    """The same new tokens in both text encoders, each starting as a copy of its init word's row -> [NewTokens]."""
    new_tokens = []
    for tok, te in ((sd.tokenizer, sd.text_encoder), (sd.tokenizer_2, sd.text_encoder_2)):
        ids = [init_token(tok, te, t, w, any_word=sd.source == "sdxl-random") for t, w in zip(tokens, inits)]
        if ids:
            emb = te.text_model.embeddings
            emb.token_embedding = NewTokens(emb.token_embedding, ids)
            new_tokens.append(emb.token_embedding)
    return new_tokens


def add_lora(unet, rank, alpha=None, seed=0, gradient_checkpointing=False, compile=False):
    """LoRA on the UNet's attention projections: peft's gaussian init, alpha = rank (official: customize.py:503)."""
    torch.manual_seed(seed)
    inject_lora(unet, rank=rank, alpha=alpha, targets=UNET_ATTN)
    for m in lora_modules(unet).values():  # trainable weights in fp32 (AdamW steps of 5e-5 vanish in bf16) ...
        m.lora_down.float(), m.lora_up.float()  # ... not m.float(): the frozen base weight must stay bf16
    unet.gradient_checkpointing = gradient_checkpointing
    unet.train()
    if compile:  # in place: lora_scale() and the checkpoint code still see the same module objects
        unet.compile()


# ----------------------------------------------------------------------------------------------------------
# Caches: each image through the VAE once, phi's fixed prompts through the text encoders once

@dataclass
class TrainData:
    """What the steps draw from: the latent cache of the n images (+ class images: crops), theta's captions, phi's
    encoded base prompts, for db-prior the encoded class prompt (class_cond) and the class images each image may be
    paired with (class_pools: those of its size), the new tokens (theta's captions are encoded again each step when
    there are any), the noise schedule, and with --buckets the images of each bucket."""
    n: int
    crops: CropCache
    class_pools: list
    captions: list
    base_ctx: torch.Tensor
    base_pooled: torch.Tensor
    class_cond: tuple | None
    new_tokens: list
    alphas_cumprod: torch.Tensor
    device: torch.device
    buckets: list | None = None


def encode_prompts(sd, prompts, amp):
    """(context [n,77,2048], pooled [n,1280]), one prompt at a time and under autocast as the per-step encoding of
    theta's prompts: then at step 0 theta's conditioning (<dog>) equals phi's (dog) bit for bit, and the first DCO
    loss is exactly log 2."""
    with torch.no_grad(), amp():
        cond = [sd.encode_prompt([prompt]) for prompt in prompts]
    return torch.cat([c for c, _ in cond]), torch.cat([p for _, p in cond])


def make_caches(sd, crops, captions, base_prompts, new_tokens, amp, device, class_prompt=None, batch_size=1,
                bucketed=False, sample_prompts=()):
    """-> TrainData. crops: the CropCache of the n = len(captions) images (+ db-prior's class images after them);
    with no random crop or flip every image is encoded now and the VAE leaves the GPU. Under torchrun every process
    builds the same caches itself: small next to the model every GPU holds anyway. Without new tokens every prompt
    of the run is fixed (these, and the checkpoints' sample_prompts): they are encoded now and the text encoders
    are dropped (1.5 GiB in bf16). With new tokens they stay, for theta's."""
    device_of_unet, n, sizes = next(sd.unet.parameters()).device, len(captions), crops.sizes
    base_ctx, base_pooled = encode_prompts(sd, base_prompts or captions, amp)  # the prompts first: then, without
    class_cond = None                                                         # new tokens, no encoder is left
    if class_prompt:  # one batch of B copies: the class half of every db-prior batch
        with torch.no_grad(), amp():
            class_cond = sd.encode_prompt([class_prompt] * batch_size)
    if not new_tokens:  # while the VAE encodes
        sd.release_text_encoders(list(sample_prompts) + ([""] if not sd.force_zeros_for_empty_prompt else []), amp)
    if not crops.random:
        sd.unet.to("cpu")  # off the GPU while the VAE encodes at full resolution (GBs of activations); no-op on a CPU
        crops.encode_all()
        sd.vae.to("cpu"), sd.unet.to(device_of_unet)  # the VAE is not needed again until sampling
    pools = [torch.tensor([j for j in range(n, len(sizes)) if sizes[j] == sizes[i]]) for i in range(n)]
    return TrainData(n=n, crops=crops, class_pools=pools, captions=captions, base_ctx=base_ctx,
                     base_pooled=base_pooled, class_cond=class_cond, new_tokens=new_tokens,
                     alphas_cumprod=alphas_cumprod(sd.scheduler), device=device,
                     buckets=buckets.groups(sizes[:n]) if bucketed else None)


# ----------------------------------------------------------------------------------------------------------
# A batch: x_0 from the cache, fresh noise eps and timesteps t, x_t = the forward process

def rng(*key):
    """A CPU generator seeded by a key like (seed, "step", 12): every draw of a step is a pure function of
    (seed, step), the same on any device, and a resumed run draws exactly what an uninterrupted one would."""
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little"))


def batch_indices(step, batch_size, n, seed, groups=None):
    """The images of a step: consecutive slices of a fresh random permutation per epoch (a shuffling loader).
    --buckets (groups: the images of each bucket): all from one bucket, its next slice of its own permutations."""
    if groups:  # which bucket, and how many batches it gave before this step: product/buckets.py
        b, j = buckets.step_bucket(step, batch_size, [len(m) for m in groups], functools.partial(rng, seed))
        return torch.tensor(groups[b])[batch_indices(j, batch_size, len(groups[b]), (seed, "bucket", b))]
    ks = range(step * batch_size, (step + 1) * batch_size)
    return torch.stack([torch.randperm(n, generator=rng(seed, "epoch", k // n))[k % n] for k in ks])


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


def get_batch(step, data, sd, amp, *, seed=0, batch_size=1, grad_accum=1, offset_noise=0.0, snr_gamma=None,
              with_phi=True, rank=0, world_size=1):
    """A step's batch, a pure function of (seed, step): x_0 drawn from the cached latent Gaussians, eps and t fresh.
    -> (the timesteps of its images, for the log; this process's grad_accum micro-batches, an iterator of Batch).

    The step's global batch is the batch of G = processes x batch_size x grad_accum that one process with
    batch_size G draws (the same rng keys, the same draws in the same order); process r's k-th micro-batch is
    its slice number r*K + k. So N processes x B x K train exactly as one process x N*B*K would, up to the order
    of floating-point sums. With new tokens theta's captions are encoded again for each micro-batch as it is made,
    so the gradient reaches the token rows and only one micro-batch's text-encoder graph exists at a time."""
    B, K = batch_size, grad_accum
    G = world_size * B * K
    g = rng(seed, "step", step)
    idx = batch_indices(step, G, data.n, seed, data.buckets)
    if data.class_cond is not None:  # db-prior: + G class images (of the batch's size) in the same forward
        pool = data.class_pools[idx[0]]
        idx = torch.cat([idx, pool[torch.randint(len(pool), (G,), generator=g)]])
    # the latents of this step's crops and flips (random or not), each VAE-encoded once (CropCache)
    means, logvars, time_ids = data.crops.get(idx, rng(seed, "crop", step))
    x0 = latent_dist_sample(means, logvars, g) * sd.vae.scaling_factor
    eps = sample_noise(x0, offset_noise, g)
    t = sample_timesteps(len(idx), len(data.alphas_cumprod), generator=g)
    prediction = sd.scheduler.get("prediction_type", "epsilon")  # epsilon, or v_prediction for a v-model
    target = training_target(x0, eps, t, data.alphas_cumprod, prediction)
    weights = min_snr_weights(t, data.alphas_cumprod, snr_gamma, prediction) if snr_gamma else None
    xt = add_noise(x0, eps, t, data.alphas_cumprod)  # DDPM's forward process q(x_t | x_0)

    def micro_batches():
        for k in range(K):
            first = (rank * K + k) * B
            part = torch.arange(first, first + B)  # positions in the global batch
            if data.class_cond is not None:  # and their class images, so the micro-batch is [instance; class] too
                part = torch.cat([part, G + part])
            inst = idx[first:first + B]
            base_cond = data.base_ctx[inst], data.base_pooled[inst]
            cond = base_cond
            if data.new_tokens:
                with amp():
                    cond = sd.encode_prompt([data.captions[i] for i in inst])
            if data.class_cond is not None:
                cond = torch.cat([cond[0], data.class_cond[0]]), torch.cat([cond[1], data.class_cond[1]])
            dev = data.device
            yield Batch(xt[part].to(dev), target[part].to(dev), t[part].to(dev), time_ids[part].to(dev), cond,
                        base_cond if with_phi else None, None if weights is None else weights[part].to(dev))

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


# ----------------------------------------------------------------------------------------------------------
# The step and the loop

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
    distributed.average_gradients(params)  # under torchrun: the global batch's gradient
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return sum(losses) / len(losses), (None if rewards[0] is None else torch.cat(rewards))


def adamw(unet, new_tokens, lr, ti_lr, weight_decay, device):
    """-> (AdamW, its parameters): the LoRA at lr, the new token rows at ti_lr, the official betas and eps."""
    lora_params, ti_params = lora_parameters(unet), [e.rows for e in new_tokens]
    groups = [{"params": lora_params, "lr": lr, "base_lr": lr}] + (
        [{"params": ti_params, "lr": ti_lr, "base_lr": ti_lr}] if new_tokens else [])  # base_lr: before lr_factor
    # On CUDA the fused kernel updates all ~1,100 LoRA tensors at once instead of a dozen kernels per tensor.
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
                            fused=device.type == "cuda")
    return opt, lora_params + ti_params


def lr_factor(step, warmup=0, schedule="constant", steps=1):
    """The learning rates' multiplier at a step: `warmup` steps of linear warm-up (step 0 already trains, at
    1/warmup), then constant, or a cosine / linear decay towards 0 at `steps`. A pure function of the step, so a
    resumed run needs no scheduler state."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress


def load_model(args, device, dtype, precision_name):
    """SDXL as train() needs it; a scheduler this code cannot train fails here, before any file is written."""
    sd = load_sdxl(args.model, device=device, dtype=dtype, variant=None if precision_name == "fp32" else "fp16",
                   vae=args.vae, fp8=precision_name == "fp8")
    sd.text_encoder.pool = sd.text_encoder_2.pool = args.pool
    sd.vae.tile = args.vae_tile
    check_scheduler_config(sd.scheduler)
    return sd


def train(args, loss_fn=None):
    """Train a LoRA (+ new token rows) as `args` say (train_cli.parse_args). loss_fn(eps_theta, eps_phi, eps, beta)
    -> (loss, reward) replaces --loss's (DCO: dco.dco_loss); phi is computed for every loss but db/db-prior. With
    --snr-gamma it also gets weights= (per sample); for a v-prediction base "eps" is the target v."""
    # --- data: images, captions, and phi's base prompts ("<dog>" -> "dog")
    name, paths, captions, base_prompts, tokens, inits = read_data(args.images, args.config, args.config_name,
                                                                   args.token, args.init_word)
    originals = [image_size(p) for p in paths]  # every image is read now: bad files fail early
    rank, world_size, device = distributed.init(args.device)  # under torchrun: this process's rank and GPU
    class_dir = args.class_dir if args.loss == "db-prior" else None
    run = run_folder.Run(args.output, rank == 0, args.checkpoint_every, class_dir, not args.no_report)  # checks output
    mp, dtype, amp = train_cli.precision(args.precision, device, random_weights=args.model == "sdxl-random")
    loss_fn = functools.partial(loss_fn or LOSSES["dco-relative" if args.relative_reward else args.loss],
                                beta=args.beta, **({"prior_weight": args.prior_weight} if class_dir else {}))
    sd = load_model(args, device, dtype, mp)  # the UNet and text encoders in the training dtype, the VAE in fp32
    captions, base_prompts, tokens, inits = prepare_captions(name, captions, base_prompts, tokens, inits, sd.tokenizer,
                                                             any_word=sd.source == "sdxl-random")
    class_prompt = (args.class_prompt or f"a photo of a {inits[0] if inits else name}") if class_dir else None
    factor = train_cli.check_model_fits(sd, args, paths, captions, tokens, class_prompt)  # the last checks: then files
    sizes, class_sizes = buckets.training_sizes(originals, args.resolution, factor, args.buckets,
                                                args.num_class_images if class_dir else 0)  # R x R, or --buckets
    run.start(train_cli.run_config(args, device, world_size, mp, name, paths, captions, base_prompts, tokens, inits,
                                   sizes), args.resume, args.steps, train_cli.lora_file_metadata(args, tokens, inits))
    class_paths = dreambooth.class_images(sd, class_prompt, class_dir, class_sizes, args.model, args.resolution,
                                          args.seed, args.sample_steps or 25, run.master) if class_dir else []
    # --- theta's trainable part: LoRA on the UNet's attention (phi = the same UNet at scale 0), the token rows
    add_lora(sd.unet, args.rank, args.alpha, args.seed, args.gradient_checkpointing, args.compile)
    new_tokens = add_new_tokens(sd, tokens, inits)
    # --- caches: each image through the VAE once, the fixed prompts through the text encoders once
    crops = CropCache(sd.vae, paths + class_paths, args.resolution, args.resample, args.crop == "random",
                      args.random_flip, args.time_ids == "fixed", sizes + class_sizes)
    prompts = train_cli.sample_prompts(args.sample_prompt, captions, tokens)
    data = make_caches(sd, crops, captions, base_prompts, new_tokens, amp, device, class_prompt, args.batch_size,
                       args.buckets, prompts if args.sample_steps else [])
    draw = functools.partial(get_batch, data=data, sd=sd, amp=amp, seed=args.seed, batch_size=args.batch_size,
                             grad_accum=args.grad_accum, offset_noise=args.offset_noise, snr_gamma=args.snr_gamma,
                             with_phi=args.loss == "dco", rank=rank, world_size=world_size)
    # --- AdamW on the LoRA (lr) and the new token rows (ti-lr); constant learning rates unless --lr-schedule
    opt, params = adamw(sd.unet, new_tokens, args.lr, args.ti_lr, args.weight_decay, device)
    scaler = torch.amp.GradScaler(device.type, enabled=mp == "fp16")  # fp16 gradients underflow without it
    start = run.restore(sd.unet, new_tokens, opt, scaler, args.steps)  # --resume: the last checkpoint's step
    distributed.broadcast_parameters(params)  # under torchrun: every process starts from rank 0's weights
    # --- the loop
    run.say(f"{len(paths)} images ({buckets.describe(sizes)}), tokens {tokens}, {sum(p.numel() for p in params):,} "
            f"trainable parameters, loss {args.loss}, {mp} on {device} x {world_size} -> {run.out}/")
    for step in run.steps(start, args.steps):  # a progress bar, and the time of each step
        for group in opt.param_groups:  # --lr-warmup, --lr-schedule
            group["lr"] = group["base_lr"] * lr_factor(step, args.lr_warmup, args.lr_schedule, args.steps)
        t, batches = draw(step)
        loss, reward = train_step(sd.unet, opt, scaler, batches, loss_fn, args.grad_clip, amp, args.grad_accum)
        for e in new_tokens:
            e.rescale()
        run.log(step, loss, reward, t, opt.param_groups[0]["lr"])
        if run.checkpoint_due(step + 1, args.steps):  # rank 0: the LoRA, token rows and AdamW; sample images
            run.checkpoint(step + 1, sd.unet, new_tokens, opt, scaler, params, samples=args.sample_steps and (
                lambda: generate_while_training(sd, prompts, args.resolution, args.sample_steps, args.seed)))
    run.finish(sd.unet, new_tokens, bundle=args.bundle_token, device=device, sample_prompts=prompts)
    return {"sd": sd, "out": run.out, "new_tokens": new_tokens, "data": data}


def main(argv=None):
    train_cli.main(train, argv)


if __name__ == "__main__":
    main()
