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
own LoRA scale ([0, 0, 1] for [empty, c_base, c]); the official code makes two calls for one 1024x1024 image.

Same seed, same picture as diffusers: the starting noise is drawn exactly as StableDiffusionXLPipeline draws it with
generator=torch.Generator("cpu").manual_seed(seed), and every default (schedule, micro-conditioning, empty negative
prompt) is diffusers' for SDXL, so `tests/test_sample.py` can compare latents with the pipeline.
"""
import argparse
import os
import re
import sys

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from safetensors import safe_open
from tqdm import tqdm

from dco import alphas_cumprod
from lora import KOHYA_FILE, PEFT_FILE, apply_lora, load_lora_file, lora_modules, lora_scale
from text_encoder import resize_token_embeddings

EMBEDS_FILE = "learned_embeds.safetensors"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# ----------------------------------------------------------------------------------------------------------
# Samplers: pure functions of eps_fn(x_t, t) -> guided noise prediction. SDXL's defaults (diffusers, see
# scheduler_config.json): "leading" timestep spacing with steps_offset 1.


def leading_timesteps(steps, num_train_timesteps=1000, offset=1):
    """t = (0, r, 2r, ...)[::-1] + offset with r = T // steps: 30 steps -> 958, 925, ..., 34, 1 (t=999 is never used)."""
    if not 1 <= steps < num_train_timesteps:
        raise ValueError(f"--steps {steps}: must be between 1 and {num_train_timesteps - 1}")
    return (torch.arange(steps) * (num_train_timesteps // steps)).flip(0) + offset


def euler_schedule(alphas_cumprod, steps, offset=1):
    """(sigmas [N+1], timesteps [N]): sigma_t = sqrt((1 - abar_t) / abar_t) at each step, then a final 0.

    sigma is the noise level of x_t / sqrt(abar_t) = x_0 + sigma * eps, the "variance exploding" view of the same
    process (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models")."""
    t = leading_timesteps(steps, len(alphas_cumprod), offset)
    a = alphas_cumprod[t]
    return torch.cat([((1 - a) / a).sqrt(), a.new_zeros(1)]), t


def sample_euler(eps_fn, noise, sigmas, timesteps, progress=False):
    """Euler's method on the probability-flow ODE dx/dsigma = eps in x = x_0 + sigma * eps (Karras et al. 2022,
    Alg. 1 without churn). The start is pure noise of variance sigma_max^2 + 1 (diffusers' init_noise_sigma: noise on
    top of a unit-variance latent), and the UNet, trained on x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps, gets
    x_t = x / sqrt(sigma^2 + 1) since abar = 1 / (sigma^2 + 1)."""
    s = sigmas.tolist()  # Python floats: nothing in the loop waits for the device
    x = noise * (s[0] ** 2 + 1) ** 0.5
    for i in tqdm(range(len(timesteps)), disable=not progress):
        eps = eps_fn(x / (s[i] ** 2 + 1) ** 0.5, timesteps[i])
        x = x + (s[i + 1] - s[i]) * eps
    return x


def ddim_schedule(alphas_cumprod, steps, offset=1):
    """(alphas [N+1], timesteps [N]): abar at each step, then the abar the last step goes to. The last step is t=1 and
    "t = 1 - T/N" does not exist: diffusers' DDIM with SDXL's `set_alpha_to_one: false` uses abar_0 there, so DDIM
    ends at sigma_0 = 0.029, not at a clean x_0."""
    t = leading_timesteps(steps, len(alphas_cumprod), offset)
    last = (t[-1:] - len(alphas_cumprod) // steps).clamp(min=0)
    return torch.cat([alphas_cumprod[t], alphas_cumprod[last]]), t


def sample_ddim(eps_fn, noise, alphas, timesteps, progress=False):
    """Deterministic DDIM, eta = 0 (Song et al. 2021, Eq. 12): estimate x_0 from the predicted noise, then put the
    same noise back at the next (lower) level. In x / sqrt(abar) this is exactly the Euler step above: with SDXL's
    schedule the two samplers differ only in where the last step lands."""
    a = alphas.tolist()
    x = noise
    for i in tqdm(range(len(timesteps)), disable=not progress):
        eps = eps_fn(x, timesteps[i])
        x0 = (x - (1 - a[i]) ** 0.5 * eps) / a[i] ** 0.5
        x = a[i + 1] ** 0.5 * x0 + (1 - a[i + 1]) ** 0.5 * eps
    return x


# ----------------------------------------------------------------------------------------------------------
# Guidance: the conditioning of the one batched UNet call, built once before the loop


def _as_list(texts, n, what):
    texts = [texts] * n if isinstance(texts, str) else list(texts)
    if len(texts) != n:
        raise ValueError(f"{what}: {len(texts)} given for {n} prompts")
    return texts


def conditioning(sd, prompts, negative_prompt=None, base_prompts=None, height=1024, width=1024, n=1, cfg=5.0,
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


def guided_eps(unet, cond, cfg=5.0, wcon=0.0):
    """eps_fn(x_t, t) -> guided noise prediction: x_t stacked once per row group, ONE UNet call, then the guidance
    formula of the module docstring. Each call sets the LoRA scale of every row (see `conditioning`)."""
    context, pooled, time_ids, scale = cond
    loras = list(lora_modules(unet).values())

    def eps_fn(x, t):
        for m in loras:
            m.scale = scale
        eps = unet(x.repeat(len(context) // len(x), 1, 1, 1), t, context, pooled, time_ids).float()
        if wcon:
            e_empty, e_base, e_c = eps.chunk(3)
            return e_empty + cfg * (e_base - e_empty) + wcon * (e_c - e_base)
        if cfg > 1:
            e_empty, e_c = eps.chunk(2)
            return e_empty + cfg * (e_c - e_empty)
        return eps

    return eps_fn


# ----------------------------------------------------------------------------------------------------------
# Generation


# inference_mode, not just no_grad: no version counters or view tracking on the ~2,000 ops of each UNet call.
@torch.inference_mode()
def generate_latents(sd, prompts, negative_prompt=None, base_prompts=None, height=1024, width=1024, steps=30, cfg=5.0,
                     wcon=0.0, sampler="euler", seed=0, n=1, lora_multiplier=1.0, device=None, progress=True):
    """Final latents [len(prompts) * n, 4, height/8, width/8] (float32, before the VAE). See `generate`."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if sd.scheduler.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"scheduler config: prediction_type {sd.scheduler['prediction_type']!r}; only epsilon "
                         "prediction (SDXL base) is supported")
    if sampler not in ("euler", "ddim"):
        raise ValueError(f"--sampler {sampler}: choose euler or ddim")
    f = 2 ** (len(sd.vae.config["block_out_channels"]) - 1)  # the VAE's downsampling factor, 8
    multiple = f * 2 ** (len(sd.unet.down_blocks) - 1)  # the UNet halves the latent (levels - 1) times
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        raise ValueError(f"--height/--width {height}x{width}: must be positive multiples of {multiple}")
    device = torch.device(device) if device is not None else next(sd.unet.parameters()).device
    cond = conditioning(sd, prompts, negative_prompt, base_prompts, height, width, n, cfg, wcon, lora_multiplier)
    eps_fn = guided_eps(sd.unet, cond, cfg, wcon)
    # diffusers' prepare_latents with a CPU generator: one float32 draw for the whole batch, then to the device.
    shape = (len(prompts) * n, sd.unet.conv_in.in_channels, height // f, width // f)
    noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32).to(device)
    abar, offset = alphas_cumprod(sd.scheduler), sd.scheduler.get("steps_offset", 1)
    with lora_scale(sd.unet, cond[3]):  # the caller's LoRA scales come back afterwards
        if sampler == "euler":
            sigmas, t = euler_schedule(abar, steps, offset)
            return sample_euler(eps_fn, noise, sigmas, t.to(device), progress)
        alphas, t = ddim_schedule(abar, steps, offset)
        return sample_ddim(eps_fn, noise, alphas, t.to(device), progress)


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


def generate(sd, prompts, negative_prompt=None, base_prompts=None, height=1024, width=1024, steps=30, cfg=5.0,
             wcon=0.0, sampler="euler", seed=0, n=1, lora_multiplier=1.0, device=None, progress=True):
    """len(prompts) * n PIL images (prompt i's n images together).

    cfg: classifier-free guidance weight (diffusers' default 5.0). wcon: consistency guidance weight; 0 = plain
    sampling with the LoRA on. base_prompts: c_base for wcon > 0 (default: the prompts themselves).
    negative_prompt: None = SDXL's zero embeddings. lora_multiplier: the LoRA scale of theta. seed: as diffusers'
    generator=torch.Generator("cpu").manual_seed(seed)."""
    latents = generate_latents(sd, prompts, negative_prompt, base_prompts, height, width, steps, cfg, wcon, sampler,
                               seed, n, lora_multiplier, device, progress)
    return to_pil(decode(sd, latents))


# ----------------------------------------------------------------------------------------------------------
# LoRAs and their learned tokens (textual inversion)


def add_learned_tokens(sd, path) -> dict:
    """Add the tokens of a learned_embeds.safetensors to both tokenizers and both embedding tables ('clip_l' rows
    [n, 768] for text_encoder, 'clip_g' [n, 1280] for text_encoder_2). Metadata 'token' and 'init_word' name them
    (comma-separated when several). Returns {token: init word or None}."""
    with safe_open(path, framework="pt") as f:
        meta, embeds = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    tokens = [t.strip() for t in meta.get("token", "").split(",") if t.strip()]
    words = [w.strip() for w in meta.get("init_word", "").split(",")]
    pairs = {"clip_l": (sd.tokenizer, sd.text_encoder), "clip_g": (sd.tokenizer_2, sd.text_encoder_2)}
    for key, (tok, te) in pairs.items():  # check everything before changing anything
        width = te.text_model.embeddings.token_embedding.embedding_dim
        if key not in embeds:
            raise ValueError(f"{path}: no '{key}' tensor (expected 'clip_l' and 'clip_g' rows)")
        if embeds[key].dim() != 2 or embeds[key].shape[0] != len(tokens):
            raise ValueError(f"{path}: '{key}' has shape {tuple(embeds[key].shape)} for {len(tokens)} token(s) "
                             f"{tokens} in the 'token' metadata")
        if embeds[key].shape[1] != width:
            raise ValueError(f"{path}: '{key}' rows are {embeds[key].shape[1]} wide but the text encoder's are "
                             f"{width}: embeddings trained for another base model?")
        if any(t in tok.vocab for t in tokens):
            raise ValueError(f"{path}: token(s) {tokens} already in the vocabulary (the same LoRA given twice?)")
    for key, (tok, te) in pairs.items():
        ids = tok.add_tokens(tokens)
        table = resize_token_embeddings(te, len(tok.vocab))
        with torch.no_grad():
            table.weight[ids] = embeds[key].to(table.weight)
    return {t: (words[i] or None) if len(words) == len(tokens) else None for i, t in enumerate(tokens)}


def load_lora(sd, path, weight=1.0) -> dict:
    """Apply a LoRA to `sd`: a trainer output folder (pytorch_lora_weights.safetensors or lora_kohya.safetensors,
    plus learned_embeds.safetensors) or a LoRA .safetensors file, its update scaled by `weight`. Several LoRAs add up
    exactly (lora.apply_lora stacks their ranks). Returns {learned token: init word}."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--lora {path}: no such file or folder")
    if os.path.isdir(path):
        files = [f for f in (os.path.join(path, PEFT_FILE), os.path.join(path, KOHYA_FILE)) if os.path.isfile(f)][:1]
        embeds = os.path.join(path, EMBEDS_FILE)
    else:  # a trainer's file keeps its learned tokens beside it; any other file is a LoRA alone
        files = [path]
        embeds = os.path.join(os.path.dirname(path), EMBEDS_FILE) if os.path.basename(path) in (PEFT_FILE, KOHYA_FILE) else ""
    embeds = embeds if os.path.isfile(embeds) else None
    if not files and embeds is None:
        raise FileNotFoundError(f"--lora {path}: the folder has no {PEFT_FILE}, {KOHYA_FILE} or {EMBEDS_FILE}")
    modules = {c: getattr(sd, c) for c in COMPONENTS}
    states = [load_lora_file(f, modules, sd.unet.config)[0] for f in files]
    try:
        for state in states:
            for comp, layers in state.items():
                apply_lora(getattr(sd, comp), layers, weight)
        return add_learned_tokens(sd, embeds) if embeds else {}
    except ValueError as e:
        raise ValueError(f"--lora {path}: {e}") from None


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


def save_png(image, path, meta):
    info = PngInfo()
    for key, value in meta.items():
        info.add_text(key, str(value))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # only now: a run that fails leaves no empty folder
    image.save(path, pnginfo=info)


def make_grid(rows, labels=None):
    """A list of rows of equal-size images -> one image; with labels, each row gets its label in a strip on the left."""
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


def wcon_list(text):
    """'3' -> [3.0]; '0,1,2,3,4' -> a sweep."""
    return [float(w) for w in text.split(",")]


def main(argv=None):
    p = argparse.ArgumentParser(description="Sample SDXL, with DCO LoRAs and consistency guidance.")
    p.add_argument("--lora", action="append", default=[], metavar="DIR_OR_FILE[:weight]",
                   help="trainer output folder or LoRA file; repeat to combine several (their updates add up)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--base-prompt", help="c_base of consistency guidance (default: the prompt with each learned token "
                                         "replaced by its init word)")
    p.add_argument("--negative-prompt", help="default: none, i.e. SDXL's zero embeddings")
    p.add_argument("--wcon", type=wcon_list, help="consistency guidance weight(s), e.g. 3 or 0,1,2,3,4 for a sweep grid "
                                  "(default 3 with --lora, 0 without)")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance weight")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--sampler", default="euler", choices=["euler", "ddim"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=4, help="images per prompt (and w_con)")
    p.add_argument("--height", type=int, help="default: the model's own resolution, 1024 for SDXL (32 for tiny)")
    p.add_argument("--width", type=int, help="default: as --height")
    p.add_argument("--model", default="stabilityai/stable-diffusion-xl-base-1.0",
                   help="hub repo id, local diffusers folder, single-file .safetensors, tiny, or sdxl-random "
                        "(the real shapes, random weights: a dry run)")
    p.add_argument("--out", default="out.png", help="the image (--n 1), else the grid, with the images beside it")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="UNet and text encoders (default: fp16 on "
                                                                       "cuda, else fp32)")
    args = p.parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


def run(args):
    from sdxl import load_sdxl, native_resolution  # here, so the sampling functions above import without the loader

    args.height = args.height or native_resolution(args.model)
    args.width = args.width or args.height

    loras = [parse_lora_arg(a) for a in args.lora]
    for path, _ in loras:  # before loading gigabytes
        if not os.path.exists(path):
            raise FileNotFoundError(f"--lora {path}: no such file or folder")
    wcons = args.wcon or [3.0 if loras else 0.0]
    if any(wcons) and not loras:
        raise ValueError("--wcon > 0 needs a --lora: consistency guidance compares a LoRA model with the base model")
    if args.n < 1:
        raise ValueError(f"--n {args.n}: must be at least 1")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("fp16" if torch.device(args.device).type == "cuda" else "fp32")]
    sd = load_sdxl(args.model, device=args.device, dtype=dtype)
    tokens = {}
    for path, weight in loras:
        tokens.update(load_lora(sd, path, weight))

    base_prompt = None
    if any(wcons):
        if tokens and not any(t.lower() in args.prompt.lower() for t in tokens):
            print(f"warning: --wcon > 0 but the prompt has none of the learned tokens ({', '.join(tokens)}). "
                  "Consistency guidance adds w_con * (LoRA model on the prompt with the token - base model on the "
                  "prompt with its init word); without the token both see the same words and the learned subject is "
                  f"never asked for. Write it in the prompt, e.g. 'a {next(iter(tokens))} ...'", file=sys.stderr)
        base_prompt = args.base_prompt or replace_tokens(args.prompt, tokens)

    meta = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "base_prompt": base_prompt,
            "model": args.model, "lora": "; ".join(f"{p}:{w:g}" for p, w in loras) or None, "sampler": args.sampler,
            "steps": args.steps, "cfg": args.cfg, "seed": args.seed, "height": args.height, "width": args.width,
            "software": "dco sample.py"}
    meta = {k: v for k, v in meta.items() if v is not None}
    stem, ext = os.path.splitext(args.out)
    ext = ext or ".png"
    rows = []
    for wcon in wcons:
        images = generate(sd, [args.prompt], args.negative_prompt, base_prompt, args.height, args.width, args.steps,
                          args.cfg, wcon, args.sampler, args.seed, args.n)
        rows.append(images)
        if len(wcons) == 1 and args.n == 1:
            save_png(images[0], stem + ext, {**meta, "wcon": f"{wcon:g}"})
            print(f"wrote {stem + ext}")
            return
        for i, image in enumerate(images):
            name = f"{stem}_wcon{wcon:g}_{i}{ext}" if len(wcons) > 1 else f"{stem}_{i}{ext}"
            save_png(image, name, {**meta, "wcon": f"{wcon:g}", "index": i})
    labels = [f"w_con = {w:g}" for w in wcons] if len(wcons) > 1 else None
    save_png(make_grid(rows, labels), stem + ext, {**meta, "wcon": ",".join(f"{w:g}" for w in wcons), "n": args.n})
    print(f"wrote {stem + ext} (grid) and {len(wcons) * args.n} images beside it")


if __name__ == "__main__":
    main()
