"""Sample SDXL in plain PyTorch: Euler and DDIM, classifier-free guidance, and DCO's consistency guidance.

    python sample.py --lora output/dog --prompt "a <dog> playing saxophone in sticker style" --wcon 3
    python sample.py --lora output/dog --prompt "a <dog> playing saxophone in sticker style" --wcon 0,1,2,3,4

Paper: Lee, Kwak, Sohn, Shin, "Direct Consistency Optimization for Robust Customization of Text-to-Image Diffusion
Models", NeurIPS 2024 (arXiv 2402.12004), "consistency guidance". eps_theta is the UNet with the LoRA on, eps_phi the
pretrained UNet (LoRA scale 0), c the prompt with the learned token ("a <dog> ..."), c_base the same prompt with the
token replaced by its init word ("a dog ..."), and the empty condition (zero embeddings, see below):

    classifier-free guidance (Ho & Salimans 2022), LoRA on in both branches:
        eps = eps_theta(x_t, empty) + w_cfg * (eps_theta(x_t, c) - eps_theta(x_t, empty))
    consistency guidance (w_con > 0):
        eps = eps_phi(x_t, empty) + w_cfg * (eps_phi(x_t, c_base) - eps_phi(x_t, empty))
                                  + w_con * (eps_theta(x_t, c) - eps_phi(x_t, c_base))

i.e. the pretrained model's CFG image of the plain prompt, pushed by w_con along what the LoRA adds for the concept.
Small w_con keeps the prompt's style and composition, large w_con the subject's identity (the paper's trade-off
figure: `--wcon 0,1,2,3,4`). All the predictions of a step come from ONE batched UNet call whose rows carry their
own LoRA scale ([0, 0, 1] for [empty, c_base, c]); the official code makes two calls for one 1024x1024 image
(kyungmnlee/dco@164ae17 reward_guidance.py:485-510).

Same seed, same picture as diffusers: the starting noise is drawn exactly as StableDiffusionXLPipeline draws it with
generator=torch.Generator("cpu").manual_seed(seed), and every default (schedule, micro-conditioning, empty negative
prompt) is diffusers' for SDXL, so `tests/test_sample.py` can compare latents with the pipeline. A fine-tune's
scheduler_config.json is honoured the same way (timestep spacing, zero terminal SNR, v-prediction:
`tests/test_schedulers.py`), and what is not written here is refused (check_sampler_config).
"""
import argparse
import os
import re
import sys

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from dco import alphas_cumprod
from lora import apply_lora, load_lora_file, lora_modules, lora_scale
from product import errors, float8
from product.files import (BUNDLE, COMPONENTS, DTYPES, EMBEDS_FILE, KOHYA_FILE, PEFT_FILE, check_writable,
                           find_lora_files, image_format, official_tokens, open_safetensors, parse_token,
                           read_learned_tokens, save_image)
from product.hub import SDXL_BASE
from text_encoder import check_prompt_length, resize_token_embeddings
from vae import check_tile

# ----------------------------------------------------------------------------------------------------------
# Samplers: pure functions of model_fn(x_t, t) -> the guided model output (eps, or v for a v-prediction base). The
# schedule comes from the model's scheduler_config.json; SDXL's is "leading" timestep spacing with steps_offset 1.

SPACINGS = ("leading", "trailing", "linspace")


def spaced_timesteps(steps, num_train_timesteps=1000, spacing="leading", offset=1):
    """The N = `steps` timesteps a sampler visits, high to low (Lin et al. 2023, Table 2); for T = 1000, N = 4:
        leading:  (0, r, 2r, ...)[::-1] + offset, r = T // N  -> 751, 501, 251, 1   (SDXL's; never starts at 999)
        trailing: round(T, T - T/N, ..., T/N) - 1             -> 999, 749, 499, 249
        linspace: linspace(0, T - 1, N)[::-1]                 -> 999, 666, 333, 0   (N = 5: 749.25, ...: fractional)
    Lin et al. argue for trailing: sampling should start at the noisiest x_t training has seen. steps_offset shifts
    only leading, as in diffusers. Euler takes a fractional t as it is, DDIM rounds it."""
    T = num_train_timesteps
    if not 1 <= steps < T:
        raise ValueError(f"--steps {steps}: must be between 1 and {T - 1}")
    if spacing == "leading":
        return (torch.arange(steps) * (T // steps)).flip(0) + offset
    if spacing == "trailing":
        return (T - torch.arange(steps, dtype=torch.float64) * (T / steps)).round().long() - 1
    if spacing == "linspace":
        return torch.linspace(0, T - 1, steps, dtype=torch.float64).flip(0).float()  # float32, as diffusers' Euler
    raise ValueError(f"scheduler config: timestep_spacing {spacing!r} is not supported; use one of "
                     f"{', '.join(SPACINGS)}")


def leading_timesteps(steps, num_train_timesteps=1000, offset=1):
    """SDXL's default spacing: 30 steps -> 958, 925, ..., 34, 1."""
    return spaced_timesteps(steps, num_train_timesteps, "leading", offset)


def x0_and_eps(out, x_t, abar, prediction_type="epsilon"):
    """The model output at x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps, as the (x_0, eps) pair it predicts.

    epsilon: eps = out, and x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) -- undefined at abar = 0.
    v_prediction (Salimans & Ho 2022, Sec. 4): v = sqrt(abar) eps - sqrt(1 - abar) x_0. With cos(phi) = sqrt(abar),
    (x_t, v) is (x_0, eps) rotated by phi, so rotating back gives
        x_0 = sqrt(abar) x_t - sqrt(1 - abar) v,      eps = sqrt(1 - abar) x_t + sqrt(abar) v
    (check: sqrt(1 - abar) x_t + sqrt(abar) v = (1 - abar) eps + abar eps + 0 * x_0 = eps). Both stay finite at
    abar = 0 (zero terminal SNR), where x_0 = -v and eps = x_t."""
    if prediction_type == "v_prediction":
        return abar ** 0.5 * x_t - (1 - abar) ** 0.5 * out, (1 - abar) ** 0.5 * x_t + abar ** 0.5 * out
    return (x_t - (1 - abar) ** 0.5 * out) / abar ** 0.5, out


def euler_schedule(alphas_cumprod, steps, offset=1, spacing="leading"):
    """(sigmas [N+1], timesteps [N]): sigma_t = sqrt((1 - abar_t) / abar_t) at each step, then a final 0.

    sigma is the noise level of x_t / sqrt(abar_t) = x_0 + sigma * eps, the "variance exploding" view of the same
    process (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"). A fractional t
    (linspace) gets sigma linearly interpolated between its two neighbours, and is given to the UNet as it is (its
    sinusoidal embedding takes any real t). With zero terminal SNR abar_999 = 0 and sigma_999 would be infinite: like
    diffusers we let abar be no smaller than 2^-24 (fp16's smallest subnormal; sigma_max = 4096), so x_999 is
    noise plus 2^-12 of the image -- far below anything visible."""
    t = spaced_timesteps(steps, len(alphas_cumprod), spacing, offset)
    a = alphas_cumprod.clamp(min=2 ** -24)
    sigma = ((1 - a) / a).sqrt().double()
    lo = t.floor().long()
    frac = t - lo
    sigmas = (sigma[lo] * (1 - frac) + sigma[(lo + 1).clamp(max=len(a) - 1)] * frac).float()
    return torch.cat([sigmas, sigmas.new_zeros(1)]), t


def sample_euler(model_fn, noise, sigmas, timesteps, progress=False, *, prediction_type="epsilon", start_sigma=None):
    """Euler's method on the probability-flow ODE dx/dsigma = eps in x = x_0 + sigma * eps (Karras et al. 2022,
    Alg. 1 without churn). The start is pure noise of variance sigma_max^2 + 1 (diffusers' init_noise_sigma: noise on
    top of a unit-variance latent), and the UNet, trained on x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps, gets
    x_t = x / sqrt(sigma^2 + 1) since abar = 1 / (sigma^2 + 1). model_fn's output is turned into eps by x0_and_eps.
    start_sigma: the start's standard deviation instead of sqrt(sigma_max^2 + 1); diffusers starts "trailing" and
    "linspace" schedules at sigma_max (generate_latents follows it, for the same picture)."""
    s = sigmas.tolist()  # Python floats: nothing in the loop waits for the device
    x = noise * (start_sigma if start_sigma is not None else (s[0] ** 2 + 1) ** 0.5)
    for i in tqdm(range(len(timesteps)), disable=not progress):
        x_t = x / (s[i] ** 2 + 1) ** 0.5
        _, eps = x0_and_eps(model_fn(x_t, timesteps[i]), x_t, 1 / (s[i] ** 2 + 1), prediction_type)
        x = x + (s[i + 1] - s[i]) * eps
    return x


def ddim_schedule(alphas_cumprod, steps, offset=1, spacing="leading", set_alpha_to_one=False):
    """(alphas [N+1], timesteps [N]): abar at each step, then the abar the last step goes to. Timesteps are whole
    numbers (linspace rounded). After the last step "t - T/N" does not exist: SDXL's `set_alpha_to_one: false` goes
    to abar_0 there (DDIM then ends at sigma_0 = 0.029, not at a clean x_0), `true` to abar = 1."""
    t = spaced_timesteps(steps, len(alphas_cumprod), spacing, offset).round().long()
    last = alphas_cumprod.new_ones(1) if set_alpha_to_one else alphas_cumprod[:1]
    return torch.cat([alphas_cumprod[t], last]), t


def sample_ddim(model_fn, noise, alphas, timesteps, progress=False, *, prediction_type="epsilon"):
    """Deterministic DDIM, eta = 0 (Song et al. 2021, Eq. 12): estimate x_0 from the model output, then put the
    same noise back at the next (lower) level of the sequence -- the next timestep of the list, whatever the spacing
    (diffusers' DDIM steps to t - T // N instead, right only for "leading": huggingface/diffusers#12633). In
    x / sqrt(abar) an epsilon-model's step is exactly the Euler step above: with SDXL's schedule the two samplers
    differ only in where the last step lands. The start is noise of unit variance (abar_T is about 0)."""
    a = alphas.tolist()
    x = noise
    for i in tqdm(range(len(timesteps)), disable=not progress):
        x0, eps = x0_and_eps(model_fn(x, timesteps[i]), x, a[i], prediction_type)
        x = a[i + 1] ** 0.5 * x0 + (1 - a[i + 1]) ** 0.5 * eps
    return x


def check_sampler_config(cfg, sampler):
    """Refuse, in one line naming the field, scheduler settings that change sampling in ways not written here
    (dco.check_scheduler_config refuses the ones that change the schedule itself)."""
    if cfg.get("timestep_spacing", "leading") not in SPACINGS:
        raise ValueError(f"scheduler config: timestep_spacing {cfg['timestep_spacing']!r} is not supported; use one "
                         f"of {', '.join(SPACINGS)}")
    defaults = {"interpolation_type": "linear", "use_karras_sigmas": False, "use_exponential_sigmas": False,
                "use_beta_sigmas": False, "timestep_type": "discrete", "final_sigmas_type": "zero"}
    if sampler == "ddim":  # fields of diffusers' DDIMScheduler; its Euler ignores them
        defaults.update(clip_sample=False, thresholding=False)
    for field, default in defaults.items():
        if cfg.get(field) not in (None, default):
            raise ValueError(f"scheduler config: {field} {cfg[field]!r} is not supported (only {default!r}); edit the "
                             "model's scheduler/scheduler_config.json to sample without it")


# ----------------------------------------------------------------------------------------------------------
# Guidance: the conditioning of the one batched UNet call, built once before the loop


def _as_list(texts, n, what):
    texts = [texts] * n if isinstance(texts, str) else list(texts)
    if len(texts) != n:
        raise ValueError(f"{what}: {len(texts)} given for {n} prompts")
    return texts


def conditioning(sd, prompts, *, negative_prompt=None, base_prompts=None, height=1024, width=1024, n=1, cfg=5.0,
                 wcon=0.0, lora_multiplier=1.0):
    """UNet inputs for every row of the step's batch: (context [G*B,77,2048], pooled [G*B,1280], time_ids [G*B,6],
    LoRA scale: a float, or a list of G*B floats when rows differ). B = len(prompts) * n images (prompt i's images
    next to each other, as diffusers orders them), G row groups stacked like diffusers' [uncond, cond]:
        w_con > 0:   [empty (phi), c_base (phi), c (theta)]
        w_cfg > 1:   [empty (theta), c (theta)]
        otherwise:   [c (theta)]        (diffusers too skips the unconditional branch when w_cfg <= 1)
    A LoRA on the text encoders follows its row: on for theta rows, off for phi rows."""
    unet_param = next(sd.unet.parameters())

    def encode(texts, scale):
        with lora_scale(sd.text_encoder, scale), lora_scale(sd.text_encoder_2, scale):
            return sd.encode_prompt(texts)

    c = encode(prompts, lora_multiplier)

    def empty(scale):
        # SDXL's convention (model_index.json force_zeros_for_empty_prompt, from Stability's force_uc_zero_embeddings):
        # NO negative prompt means all-zero text embeddings and pooled vector, not the encoded "".
        if negative_prompt is None and sd.force_zeros_for_empty_prompt:
            return torch.zeros_like(c[0]), torch.zeros_like(c[1])
        return encode(_as_list(negative_prompt or "", len(prompts), "negative_prompt"), scale)

    if wcon:
        base = encode(_as_list(base_prompts if base_prompts is not None else prompts, len(prompts), "base_prompts"), 0.0)
        groups, scales = [empty(0.0), base, c], [0.0, 0.0, lora_multiplier]
    elif cfg > 1:
        groups, scales = [empty(lora_multiplier), c], [lora_multiplier] * 2
    else:
        groups, scales = [c], [lora_multiplier]
    context = torch.cat([e.repeat_interleave(n, dim=0) for e, _ in groups])
    pooled = torch.cat([p.repeat_interleave(n, dim=0) for _, p in groups])
    # SDXL micro-conditioning (Podell et al. 2023, Sec. 2.2) with diffusers' inference defaults: original size =
    # target size = the requested (height, width), crop top-left (0, 0); the same for every row.
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32, device=unet_param.device)
    time_ids = time_ids.repeat(len(context), 1)
    if len(set(scales)) == 1:
        return context, pooled, time_ids, scales[0]
    # One scale per row as Python floats, not a device tensor: each LoRA layer sees on the host which rows use it and
    # runs its branch on theta's rows only, instead of on all of them times 0.
    return context, pooled, time_ids, [s for s in scales for _ in range(len(prompts) * n)]


def rescale_guidance(guided, cond, phi):
    """Guidance rescale (Lin et al. 2023, Sec. 3.4, Eq. 15-16): a large guidance weight inflates the prediction's
    standard deviation beyond anything the model predicts on its own (over-exposed, over-saturated images). Rescale
    it, per image, to the std of the conditional prediction, and mix by phi to avoid plain-looking images:
        x_rescaled = x_cfg * std(x_pos) / std(x_cfg),    x = phi * x_rescaled + (1 - phi) * x_cfg."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def guided_eps(unet, cond, cfg=5.0, wcon=0.0, guidance_rescale=0.0):
    """model_fn(x_t, t) -> guided model output (eps, or v for a v-prediction base; guidance is affine with weights
    summing to 1, so it means the same in either): x_t stacked once per row group, ONE UNet call, then the guidance
    formula of the module docstring. Each call sets the LoRA scale of every row (see `conditioning`).

    guidance_rescale phi > 0 rescales the guided output towards the std of a conditional prediction
    (rescale_guidance): under CFG theta's eps_theta(x_t, c), as diffusers; under consistency guidance phi's
    eps_phi(x_t, c_base), the conditional prediction of the CFG part that w_con then pushes, as the official pipeline
    (kyungmnlee/dco@164ae17 reward_guidance.py:505-515)."""
    context, pooled, time_ids, scale = cond
    loras = list(lora_modules(unet).values())

    def model_fn(x, t):
        for m in loras:
            m.scale = scale
        out = unet(x.repeat(len(context) // len(x), 1, 1, 1), t, context, pooled, time_ids).float()
        if wcon:
            e_empty, e_base, e_c = out.chunk(3)
            guided, cond_pred = e_empty + cfg * (e_base - e_empty) + wcon * (e_c - e_base), e_base
        elif cfg > 1:
            e_empty, e_c = out.chunk(2)
            guided, cond_pred = e_empty + cfg * (e_c - e_empty), e_c
        else:
            return out  # no guidance: nothing to rescale
        return rescale_guidance(guided, cond_pred, guidance_rescale) if guidance_rescale else guided

    return model_fn


# ----------------------------------------------------------------------------------------------------------
# Generation


# inference_mode, not just no_grad: no version counters or view tracking on the ~2,000 ops of each UNet call.
@torch.inference_mode()
def generate_latents(sd, prompts, *, negative_prompt=None, base_prompts=None, height=1024, width=1024, steps=30,
                     cfg=5.0, wcon=0.0, guidance_rescale=0.0, sampler="euler", seed=0, n=1, lora_multiplier=1.0,
                     device=None, progress=True):
    """Final latents [len(prompts) * n, 4, height/8, width/8] (float32, before the VAE).

    cfg: classifier-free guidance weight (diffusers' default 5.0). wcon: consistency guidance weight; 0 = plain
    sampling with the LoRA on. guidance_rescale: phi of Lin et al. 2023 (0 = off; 0.7 in the paper).
    base_prompts: c_base for wcon > 0 (default: the prompts themselves). negative_prompt: None = SDXL's zero
    embeddings. lora_multiplier: the LoRA scale of theta. seed: as diffusers' generator=torch.Generator("cpu").
    manual_seed(seed). The model's scheduler config decides the timesteps (timestep_spacing, steps_offset), the
    schedule (rescale_betas_zero_snr) and what the UNet predicts (prediction_type epsilon or v_prediction)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if sampler not in ("euler", "ddim"):
        raise ValueError(f"--sampler {sampler}: choose euler or ddim")
    if not 0 <= guidance_rescale <= 1:
        raise ValueError(f"--guidance-rescale {guidance_rescale:g}: must be between 0 and 1 (0.7 in Lin et al. 2023)")
    sched = sd.scheduler
    check_sampler_config(sched, sampler)
    abar = alphas_cumprod(sched)  # refuses unsupported schedules and prediction types
    spacing, offset = sched.get("timestep_spacing", "leading"), sched.get("steps_offset", 1)
    prediction = sched.get("prediction_type", "epsilon")
    f = sd.vae.factor  # the VAE's downsampling, 8
    multiple = f * 2 ** (len(sd.unet.down_blocks) - 1)  # the UNet halves the latent (levels - 1) times
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        raise ValueError(f"--height/--width {height}x{width}: must be positive multiples of {multiple}")
    device = torch.device(device) if device is not None else next(sd.unet.parameters()).device
    cond = conditioning(sd, prompts, negative_prompt=negative_prompt, base_prompts=base_prompts, height=height,
                        width=width, n=n, cfg=cfg, wcon=wcon, lora_multiplier=lora_multiplier)
    model_fn = guided_eps(sd.unet, cond, cfg, wcon, guidance_rescale)
    # diffusers' prepare_latents with a CPU generator: one float32 draw for the whole batch, then to the device.
    shape = (len(prompts) * n, sd.unet.conv_in.in_channels, height // f, width // f)
    noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32).to(device)
    with lora_scale(sd.unet, cond[3]):  # the caller's LoRA scales come back afterwards
        if sampler == "euler":
            sigmas, t = euler_schedule(abar, steps, offset, spacing)
            start = None if spacing == "leading" else sigmas[0].item()  # diffusers' init_noise_sigma, see sample_euler
            return sample_euler(model_fn, noise, sigmas, t.to(device), progress, prediction_type=prediction,
                                start_sigma=start)
        alphas, t = ddim_schedule(abar, steps, offset, spacing, sched.get("set_alpha_to_one", False))
        return sample_ddim(model_fn, noise, alphas, t.to(device), progress, prediction_type=prediction)


@torch.no_grad()
def decode(sd, latents):
    """Latents -> images [B,3,H,W] in [0,1]. In the VAE's own dtype: fp32 for SDXL's VAE, which overflows in fp16
    (load_sdxl keeps it fp32 unless it is the fp16-fix VAE). One image at a time: a 1024^2 decode needs GBs."""
    dtype = next(sd.vae.parameters()).dtype
    images = [sd.vae.decode(z.to(dtype) / sd.vae.scaling_factor).float() for z in latents.split(1)]
    return (torch.cat(images) / 2 + 0.5).clamp(0, 1)


def to_pil(images):
    arrays = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def generate(sd, prompts, **options):
    """len(prompts) * n PIL images (prompt i's n images together); the options are generate_latents'."""
    return to_pil(decode(sd, generate_latents(sd, prompts, **options)))


def generate_while_training(sd, prompts, resolution, steps, seed, size=None):
    """Images from the model as it is now (Euler, CFG 5), R x R or size (h, w), for train.py's checkpoint samples
    and db-prior's class images. For decoding the VAE comes back to the device and the UNet steps aside: a 1024^2
    decode takes GBs (no-ops on a CPU)."""
    device, vae_device = next(sd.unet.parameters()).device, next(sd.vae.parameters()).device
    with torch.no_grad():
        height, width = size or (resolution, resolution)
        latents = generate_latents(sd, prompts, height=height, width=width, steps=steps, seed=seed, progress=False)
        sd.unet.to("cpu"), sd.vae.to(device)
        images = to_pil(decode(sd, latents))
    sd.vae.to(vae_device), sd.unet.to(device)
    return images


# ----------------------------------------------------------------------------------------------------------
# LoRAs and their learned tokens (textual inversion)


def add_learned_tokens(sd, path, names=None) -> dict:
    """Add the tokens of a learned_embeds.safetensors to both tokenizers and both embedding tables ('clip_l' rows
    [n, 768] for text_encoder, 'clip_g' [n, 1280] for text_encoder_2). Metadata 'token' and 'init_word' name them
    (comma-separated when several); files without them (the official DCO code's) take theirs from `names`, a list of
    (token, init word). Returns {token: init word or None}."""
    rows, tokens, words = read_learned_tokens(path, names)
    pairs = {"clip_l": (sd.tokenizer, sd.text_encoder), "clip_g": (sd.tokenizer_2, sd.text_encoder_2)}
    for key, (tok, te) in pairs.items():  # check everything before changing anything
        width = te.text_model.embeddings.token_embedding.embedding_dim
        if rows[key].shape[1] != width:
            raise ValueError(f"{path}: '{key}' rows are {rows[key].shape[1]} wide but the text encoder's are "
                             f"{width}: embeddings trained for another base model?")
        if any(t in tok.vocab for t in tokens):
            raise ValueError(f"{path}: token(s) {tokens} already in the vocabulary (the same LoRA given twice?)")
    for key, (tok, te) in pairs.items():
        ids = tok.add_tokens(tokens)
        table = resize_token_embeddings(te, len(tok.vocab))
        with torch.no_grad():
            table.weight[ids] = rows[key].to(table.weight)
    return {t: w or None for t, w in zip(tokens, words)}


def load_lora(sd, path, weight=1.0, names=None) -> dict:
    """Apply a LoRA to `sd`: a trainer output folder (pytorch_lora_weights.safetensors or lora_kohya.safetensors,
    plus learned_embeds.safetensors) or a LoRA .safetensors file, its update scaled by `weight`. Several LoRAs add up
    exactly (lora.apply_lora stacks their ranks). `names`: [(token, init word)] for token rows that carry no names
    (the official DCO code's files). Returns {learned token: init word}."""
    try:
        lora, embeds = find_lora_files(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--lora {e}") from None
    if lora is None and embeds is None:
        raise FileNotFoundError(f"--lora {path}: the folder has no {PEFT_FILE}, {KOHYA_FILE} or {EMBEDS_FILE}")
    modules = {c: getattr(sd, c) for c in COMPONENTS}
    states = [load_lora_file(lora, modules, sd.unet.config)[0]] if lora else []
    for state in states:  # NaN/inf weights (a diverged run) would draw black images without a word
        bad = [n for layers in state.values() for n, (d, u, _) in layers.items()
               if not (torch.isfinite(d).all() and torch.isfinite(u).all())]
        if bad:
            raise ValueError(f"--lora {lora}: {len(bad)} layer(s) hold NaN/inf weights (e.g. {bad[0]}): its training "
                             "diverged; use an earlier checkpoint")
    try:
        for state in states:
            for comp, layers in state.items():
                apply_lora(getattr(sd, comp), layers, weight)
        if embeds is None and lora is not None and has_bundled_tokens(lora):  # one-file sharing: the kohya file
            embeds = lora
        return add_learned_tokens(sd, embeds, names) if embeds else {}
    except ValueError as e:
        raise ValueError(f"--lora {path}: {e}") from None


def has_bundled_tokens(path):
    with open_safetensors(path) as f:
        return any(k.startswith(BUNDLE) for k in f.keys())


def read_lora_metadata(path) -> dict:
    """The safetensors metadata of a LoRA (folder or file): train.py records its recipe there, e.g. 'loss' (dco,
    db, db-prior; written into the PNGs as 'method', so eval.py can group a sweep) and 'pool' (argmax only)."""
    path = find_lora_files(path)[0]
    if path is None or not path.endswith(".safetensors"):
        return {}
    with open_safetensors(path) as f:
        return f.metadata() or {}


def lora_pooling(meta):
    """The text-encoder pooling a LoRA was trained with: 'argmax', 'eos' (train.py writes 'pool' only for argmax),
    or None when unknown (then EOS, SDXL's own)."""
    return meta.get("pool") or ("eos" if "loss" in meta else None)


def parse_lora_arg(text):
    """'DIR_OR_FILE[:weight]' -> (path, weight); a colon not followed by a number belongs to the path."""
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def replace_tokens(prompt, tokens):
    """c_base: each learned token replaced by its init word ('a <dog> on the beach' -> 'a dog on the beach').
    Case-insensitive, as the tokenizer matches added tokens."""
    for token, word in tokens.items():
        if re.search(re.escape(token), prompt, re.IGNORECASE):
            if word is None:
                raise ValueError(f"learned token {token} has no init word in its learned_embeds metadata: pass "
                                 "--base-prompt (the prompt with the token written as a plain word)")
            prompt = re.sub(re.escape(token), lambda _: word, prompt, flags=re.IGNORECASE)
    return prompt


# ----------------------------------------------------------------------------------------------------------
# Output files


def save_sample(image, path, meta):
    """The image in its extension's format (files.save_image), atomically; a PNG gets its settings as PNG text
    (prompt, w_con, seed, ...: every value as str). The folder is made only now, so a failed run leaves none."""
    save_image(image, path, {key: str(value) for key, value in meta.items()})


def make_grid(rows, labels=None):
    """A list of rows of equal-size images -> one image; with labels, each row gets its label in a strip on the left.
    Images under 64 px (the tiny model's 32x32) are enlarged to ~256 px, nearest neighbour: pixels stay pixels."""
    side = max(rows[0][0].size)
    k = 256 // side if side < 64 else 1
    if k > 1:
        rows = [[image.resize((image.width * k, image.height * k), Image.NEAREST) for image in row] for row in rows]
    w, h = rows[0][0].size
    font = ImageFont.load_default(size=max(10, h // 16))
    pad = 7 * font.size if labels else 0
    grid = Image.new("RGB", (pad + w * max(map(len, rows)), h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image, (pad + c * w, r * h))
        if labels:
            draw.text((font.size // 2, r * h + h // 2), labels[r], fill="black", font=font, anchor="lm")
    return grid


def wcon_label(wcon):
    """A grid row's label. --wcon 0 samples with the LoRA on and plain CFG: "plain", not "w_con = 0" (in the paper's
    formula, w_con = 0 would be the pretrained model alone)."""
    return f"w_con = {wcon:g}" if wcon else "plain"


def wcon_list(text):
    """'3' -> [3.0]; '0,1,2,3,4' -> a sweep."""
    return [float(w) for w in text.split(",")]


# The range of every numeric flag's meaning (errors.check_flags); "lora" is the weight of each --lora DIR:weight.
NUMBERS = {"wcon": ">= 0", "cfg": ">= 0", "guidance_rescale": "0 .. 1", "steps": ">= 1", "seed": "seed", "n": ">= 1",
           "height": ">= 8", "width": ">= 8", "lora": "finite", "vae_tile": ">= 0"}


def parser():
    p = argparse.ArgumentParser(description="Sample SDXL, with DCO LoRAs and consistency guidance.")
    p.add_argument("--lora", action="append", default=[], metavar="DIR_OR_FILE[:weight]",
                   help="trainer output folder or LoRA file; repeat to combine several (their updates add up); a "
                        "weight of any sign (default 1; negative subtracts the LoRA's update)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--token", action="append", type=parse_token, default=[], metavar="TOKEN[=INIT_WORD]",
                   help="names of learned token rows saved without them (the official DCO code's learned_embeds), in "
                        "order, e.g. --token '<dog>=dog'; repeatable")
    p.add_argument("--config", help="the official DCO data config.json: its inserting/initializer_tokens name the rows")
    p.add_argument("--config-name", help="which entry of --config")
    p.add_argument("--pool", choices=["eos", "argmax"], help="text_encoder_2 pooling: eos (SDXL's training; default) "
                   "or argmax (transformers/diffusers, the official DCO code); default: what the LoRA was trained with")
    p.add_argument("--base-prompt", help="c_base of consistency guidance (default: the prompt with each learned token "
                                         "replaced by its init word)")
    p.add_argument("--negative-prompt", help="default: none, i.e. SDXL's zero embeddings")
    p.add_argument("--wcon", type=wcon_list, help="consistency guidance weight(s), e.g. 3 or 0,1,2,3,4 for a sweep grid "
                                  "(default 3 with --lora, 0 without; 0: plain sampling with the LoRA on)")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance weight (0: unconditional, 1: "
                                                            "the prompt without guidance)")
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="phi of Lin et al. 2023 (0.7 there): pulls "
                   "the guided prediction's std back to the conditional one's (against over-exposure); 0: off")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--sampler", default="euler", choices=["euler", "ddim"])
    p.add_argument("--seed", type=int, default=0, help="0 .. 2^63-1")
    p.add_argument("--n", type=int, default=4, help="images per prompt (and w_con)")
    p.add_argument("--height", type=int, help="default: the model's own resolution, 1024 for SDXL (32 for tiny)")
    p.add_argument("--width", type=int, help="default: as --height")
    p.add_argument("--model", default=SDXL_BASE,
                   help="hub repo id, local diffusers folder, single-file .safetensors, tiny, or sdxl-random "
                        "(the real shapes, random weights: a dry run)")
    p.add_argument("--vae", help="another VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix")
    p.add_argument("--vae-tile", type=int, default=0, metavar="PX", help="decode images larger than PX x PX in "
                   "overlapping tiles (a tile's memory, close to the whole-image decode); 0: whole images (default)")
    p.add_argument("--output", default="out.png", help="the image (--n 1), else the grid, with the images beside "
                   "it; .png (with the settings as PNG text), .jpg/.jpeg (quality 95) or .webp (lossless), which "
                   "have no settings in them")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=[*DTYPES, "fp8"], help="UNet and text encoders (default: fp16 on cuda, "
                   "else fp32); fp8: their weights in float8 with a scale per channel, computed in bf16")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    errors.cli(lambda: run(args), memory_hint="lower --height/--width or --n, or on a GPU use --precision fp16")


def run(args):
    from sdxl import load_sdxl, native_resolution  # here, so the sampling functions above import without the loader

    loras = [parse_lora_arg(a) for a in args.lora]
    errors.check_flags({**vars(args), "lora": [w for _, w in loras]}, NUMBERS)  # before the defaults: 0 is no default
    check_tile(args.vae_tile)
    args.height = args.height if args.height is not None else native_resolution(args.model)
    args.width = args.width if args.width is not None else args.height
    for path, _ in loras:  # before loading gigabytes
        if not os.path.exists(path):
            raise FileNotFoundError(f"--lora {path}: no such file or folder")
    wcons = args.wcon or [3.0 if loras else 0.0]
    errors.check_device(args.device)
    for flag in ("height", "width"):
        if getattr(args, flag) % 8:
            raise ValueError(f"--{flag} {getattr(args, flag)}: must be a positive multiple of 8")
    stem, ext = os.path.splitext(args.output)
    ext = ext or ".png"  # a name without an extension gets .png
    image_format(stem + ext)  # .png, .jpg or .webp, or one line
    check_writable(args.output, "--output")  # before loading the model: a read-only or full disk, a folder in the way
    if any(wcons) and not loras:
        raise ValueError("--wcon > 0 needs a --lora: consistency guidance compares a LoRA model with the base model")
    precision = args.precision or ("fp16" if torch.device(args.device).type == "cuda" else "fp32")
    dtype = float8.compute_dtype_of(args.device) if precision == "fp8" else DTYPES[precision]
    names = list(args.token)
    if args.config or args.config_name:
        if not (args.config and args.config_name):
            raise ValueError("--config and --config-name go together")
        names += official_tokens(args.config, args.config_name)
    sd = load_sdxl(args.model, device=args.device, dtype=dtype, variant=None if precision == "fp32" else "fp16",
                   vae=args.vae, fp8=precision == "fp8")
    sd.vae.tile = args.vae_tile
    metas = [read_lora_metadata(path) for path, _ in loras]
    pools = {p for p in map(lora_pooling, metas) if p}
    sd.text_encoder.pool = sd.text_encoder_2.pool = args.pool or (pools.pop() if len(pools) == 1 else "eos")
    tokens = {}
    for path, weight in loras:
        added = load_lora(sd, path, weight, names)
        names = [n for n in names if n[0] not in added]  # the next official file takes the next names
        tokens.update(added)
    for flag, text in (("--prompt", args.prompt), ("--base-prompt", args.base_prompt),
                       ("--negative-prompt", args.negative_prompt)):
        if text:
            check_prompt_length((sd.tokenizer,), text, flag)

    base_prompt = None
    if any(wcons):
        if tokens and not any(t.lower() in args.prompt.lower() for t in tokens):
            print(f"warning: --wcon > 0 but the prompt has none of the learned tokens ({', '.join(tokens)}). "
                  "Consistency guidance adds w_con * (LoRA model on the prompt with the token - base model on the "
                  "prompt with its init word); without the token both see the same words and the learned subject is "
                  f"never asked for. Write it in the prompt, e.g. 'a {next(iter(tokens))} ...'", file=sys.stderr)
        base_prompt = args.base_prompt or replace_tokens(args.prompt, tokens)
    elif tokens or args.base_prompt:  # not used by w_con = 0, but eval.py scores prompt fidelity on the plain words
        try:
            base_prompt = args.base_prompt or replace_tokens(args.prompt, tokens)
        except ValueError:
            pass
    method = ",".join(sorted({m.get("loss") for m in metas if m.get("loss")})) or None

    meta = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "base_prompt": base_prompt,
            "model": args.model, "lora": "; ".join(f"{p}:{w:g}" for p, w in loras) or None, "sampler": args.sampler,
            "steps": args.steps, "cfg": args.cfg, "guidance_rescale": args.guidance_rescale or None, "seed": args.seed,
            "height": args.height, "width": args.width, "software": "dco sample.py", "method": method,
            "pool": sd.text_encoder_2.pool}
    meta = {k: v for k, v in meta.items() if v is not None}
    rows = []
    for wcon in wcons:
        images = generate(sd, [args.prompt], negative_prompt=args.negative_prompt, base_prompts=base_prompt,
                          height=args.height, width=args.width, steps=args.steps, cfg=args.cfg, wcon=wcon,
                          guidance_rescale=args.guidance_rescale, sampler=args.sampler, seed=args.seed, n=args.n)
        rows.append(images)
        if len(wcons) == 1 and args.n == 1:
            save_sample(images[0], stem + ext, {**meta, "wcon": f"{wcon:g}"})
            print(f"wrote {stem + ext}")
            return
        for i, image in enumerate(images):
            name = f"{stem}_wcon{wcon:g}_{i}{ext}" if len(wcons) > 1 else f"{stem}_{i}{ext}"
            save_sample(image, name, {**meta, "wcon": f"{wcon:g}", "index": i})
    labels = [wcon_label(w) for w in wcons] if len(wcons) > 1 else None
    save_sample(make_grid(rows, labels), stem + ext, {**meta, "wcon": ",".join(f"{w:g}" for w in wcons), "n": args.n})
    print(f"wrote {stem + ext} (grid) and {len(wcons) * args.n} images beside it")


if __name__ == "__main__":
    main()
