"""Load Stable Diffusion XL into our plain-PyTorch modules, in one call.

    sd = load_sdxl("stabilityai/stable-diffusion-xl-base-1.0", device="cuda", dtype=torch.bfloat16)
    sd.unet, sd.vae, sd.text_encoder, sd.text_encoder_2, sd.tokenizer, sd.tokenizer_2, sd.scheduler

The fields are named like the folders of the hub repo, so a reader moves between the hub, the paper and this
code without a dictionary. `model` may be
  * a hub repo id: only the files we need are downloaded (the fp16 variant where the repo has one) into the
    standard Hugging Face cache, so a second run downloads nothing and works offline;
  * a local folder in the same (diffusers) layout: `model_index.json`, `unet/`, `vae/`, `text_encoder/`, ...;
  * a single-file checkpoint from ComfyUI/A1111 (`sd_xl_base_1.0.safetensors`, Stability's original "SGM"
    names): converted by `product/single_file.py`; its configs and tokenizers come from `config_from` (the base hub
    repo by default: a few small files);
  * "tiny": the tiny SDXL of tinyworld/ (same architecture, 32x32 images), which runs everything on a CPU;
  * "sdxl-random": the real SDXL base (its configs ship in configs/sdxl-base-1.0) with random weights and a
    byte-level tokenizer, no download: a dry run of the real shapes ("will this fit my GPU, how fast?").
Only `.safetensors` is ever read -- never a pickle, which could run arbitrary code.

Run `python sdxl.py --model ID_OR_PATH` to download (or find) a model and print what was loaded.
"""
import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass

import torch

from product import errors, files, float8, single_file
from product.hub import CONFIG_FILES, MODEL_COMPONENTS, SDXL_BASE, component_weight_files, download
from text_encoder import CLIPTextModel, CLIPTokenizer, byte_level_vocab, encode_prompt
from unet_loader import UNet
from vae import AutoencoderKL, convert_legacy_vae_keys

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "tinyworld", "model")  # --model tiny: CPU, 32x32
RANDOM, RANDOM_CONFIGS = "sdxl-random", os.path.join(HERE, "configs", "sdxl-base-1.0")  # the real configs, no weights
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


@dataclass
class SDXL:
    unet: UNet
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModel
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    scheduler: dict  # the noise-schedule config (scheduler/scheduler_config.json)
    force_zeros_for_empty_prompt: bool = True  # model_index.json: "no negative prompt" means zero embeddings
    source: str = ""

    prompt_cache: dict | None = None  # after release_text_encoders: prompt -> (context [77,2048], pooled [1280])

    def encode_prompt(self, prompts):
        """SDXL text conditioning: ([B,77,2048] penultimate states of both encoders, [B,1280] pooled)."""
        if self.prompt_cache is None:
            return encode_prompt(prompts, self.tokenizer, self.tokenizer_2, self.text_encoder, self.text_encoder_2)
        missing = [p for p in prompts if p not in self.prompt_cache]
        if missing:
            raise ValueError(f"the text encoders were dropped after encoding the run's fixed prompts, and {missing[0]!r} "
                             "is not one of them")
        return tuple(torch.stack([self.prompt_cache[p][i] for p in prompts]) for i in (0, 1))

    def release_text_encoders(self, prompts, amp=contextlib.nullcontext):
        """Encode `prompts` now (one at a time, under `amp`), keep the results, and drop both text encoders (1.5 GiB
        in bf16): a run that learns no token needs the encoders only for prompts it knows from the start."""
        with torch.no_grad(), amp():
            cache = {p: tuple(x[0] for x in self.encode_prompt([p])) for p in dict.fromkeys(prompts)}
        self.prompt_cache, self.text_encoder, self.text_encoder_2 = cache, None, None


def model_path(model):
    """`tiny` is the tiny SDXL shipped in tinyworld/model (same architecture, trained on the tiny world);
    `sdxl-random` is the folder of SDXL base's configs (all that code reading configs needs)."""
    return {"tiny": TINY, RANDOM: RANDOM_CONFIGS}.get(str(model), str(model))


def native_resolution(model):
    """The image size a model was trained at: UNet sample_size x the VAE's downsampling, read from a local
    folder's configs (1024 for SDXL, 32 for tiny); 1024 for a hub id or single file, which are SDXL."""
    folder = model_path(model)
    try:
        unet = read_config(os.path.join(folder, "unet", "config.json"), "")
        vae = read_config(os.path.join(folder, "vae", "config.json"), "")
    except FileNotFoundError:
        return 1024
    return unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)


def resolve_model(model, variant="fp16"):
    """A hub id or local folder -> local folder in the diffusers layout."""
    if os.path.isdir(model):
        return model
    if os.path.exists(model) or model.endswith(".safetensors") or model.endswith(PICKLE_SUFFIXES) or model.startswith((".", "/")):
        raise FileNotFoundError(f"--model {model}: no such folder or .safetensors file")
    return download(model, variant=variant)


def weight_files(folder, comp, variant="fp16"):
    """The safetensors file(s) of one component in a local diffusers folder (variant first, sharded or not)."""
    d = os.path.join(folder, comp)
    names = os.listdir(d) if os.path.isdir(d) else []
    files = component_weight_files(comp, {f"{comp}/{n}" for n in names}, variant)
    if files:
        return [os.path.join(folder, f) for f in files if f.endswith(".safetensors")]
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(f"{d}/{pickles[0]} is a pickle file; dco loads only .safetensors (download the "
                         f"safetensors weights, or convert them)")
    raise FileNotFoundError(f"{d}: no {MODEL_COMPONENTS[comp]}.safetensors: the folder is missing the {comp} weights")


def read_config(path, what):
    """A model folder's JSON config; a missing one is a FileNotFoundError saying `what` that means."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: {what}")
    return files.read_json(path)  # malformed JSON: a ValueError naming the file


# ----------------------------------------------------------------------------------------------------------
# Building the modules

def build(cls, config, state_dict, device, dtype, what="", fp8=False, **kwargs):
    """Construct on the meta device (no memory, no random init: SDXL's UNet is 2.6 B parameters), adopt the
    loaded tensors as the parameters with `assign=True`, then cast (fp8: quantize) tensor by tensor. `state_dict`
    is consumed (emptied), so each source tensor is freed once its cast copy exists: never two full copies."""
    with torch.device("meta"):
        model = cls(config, **kwargs)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:  # weights of another model: one line, not one per tensor
        problems = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        raise ValueError(f"{what}: the weights do not fit its config.json ({len(problems)} problem(s), first: "
                         f"{problems[0][:150] if problems else e}); they belong to another model") from None
    state_dict.clear()
    return float8.materialize_(model, device, dtype, fp8).eval().requires_grad_(False)


def load_component(folder, comp, variant="fp16"):
    sd = {}
    for path in weight_files(folder, comp, variant):
        sd.update(files.load_tensors(path))
    return sd


def load_sdxl(model=SDXL_BASE, device="cpu", dtype=torch.float32, vae_dtype=None, variant="fp16",
              config_from=SDXL_BASE, vae=None, fp8=False):
    """Load SDXL from a hub id, a local diffusers folder, a single-file `.safetensors` checkpoint, or "tiny".

    dtype is used for the UNet and text encoders. The VAE stays in fp32 unless its config says it is safe in
    half precision (`force_upcast: false`, e.g. madebyollin/sdxl-vae-fp16-fix) or `vae_dtype` is given: the
    original SDXL VAE overflows in fp16. `vae`: another VAE instead of the model's own (see load_vae). `variant`:
    the weight files to prefer ("fp16", half the download; None: the full-precision files). `fp8`: the UNet's and
    text encoders' Linear and Conv2d weights stored in float8 with a scale per output channel, dequantised to
    `dtype` in each layer's forward (product/float8.py); converted as they load, one tensor at a time.
    """
    sd = _load_sdxl(model, device, dtype, vae_dtype, variant, config_from, fp8)
    if vae is not None:
        sd.vae = load_vae(vae, device, dtype, vae_dtype)
    return sd


def load_vae(source, device="cpu", dtype=torch.float32, vae_dtype=None):
    """A VAE alone: a hub id or folder holding config.json + diffusion_pytorch_model.safetensors (e.g.
    madebyollin/sdxl-vae-fp16-fix), or an SDXL folder whose vae/ holds them. Its dtype follows its config as above."""
    if os.path.isdir(source):
        folder = source if os.path.isfile(os.path.join(source, "config.json")) else os.path.join(source, "vae")
    else:
        if source.startswith((".", "/")) or source.endswith(PICKLE_SUFFIXES + (".safetensors",)):
            raise FileNotFoundError(f"--vae {source}: expected a folder or a hub id of a diffusers VAE")
        folder = download(source, patterns=["config.json", "diffusion_pytorch_model.safetensors"])
    config = read_config(os.path.join(folder, "config.json"), f"--vae {source} is not a diffusers VAE folder")
    weights = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"--vae {source}: no diffusion_pytorch_model.safetensors in {folder}")
    if vae_dtype is None:
        vae_dtype = torch.float32 if config.get("force_upcast", True) else dtype
    return build(AutoencoderKL, config, convert_legacy_vae_keys(files.load_tensors(weights)), device, vae_dtype)


def _load_sdxl(model, device, dtype, vae_dtype, variant, config_from, fp8=False):
    if str(model) == RANDOM:
        return random_sdxl(device, dtype, vae_dtype, fp8=fp8)
    model = model_path(model)
    if model.endswith(PICKLE_SUFFIXES):
        raise ValueError(f"--model {model}: pickle checkpoints can run arbitrary code when loaded; dco reads only "
                         f".safetensors (most models are published as .safetensors too)")
    if os.path.isfile(model):
        if not model.endswith(".safetensors"):
            raise ValueError(f"--model {model}: not a .safetensors file or a diffusers folder")
        return load_single_file(model, device, dtype, vae_dtype, config_from, fp8)
    folder = resolve_model(model, variant)
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise FileNotFoundError(f"{folder} has no model_index.json: expected a diffusers SDXL folder "
                                f"(model_index.json, unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/)")
    index = read_config(os.path.join(folder, "model_index.json"), "")
    configs = {c: read_config(os.path.join(folder, c, "config.json"), f"the folder has no {c} component")
               for c in MODEL_COMPONENTS}
    weights = {c: load_component(folder, c, variant) for c in MODEL_COMPONENTS}
    return assemble(folder, configs, weights, index, device, dtype, vae_dtype, source=model, fp8=fp8)


def load_single_file(path, device, dtype, vae_dtype, config_from=SDXL_BASE, fp8=False):
    """A ComfyUI/A1111 checkpoint: check its header is SDXL base before reading gigabytes, then rename the keys.
    The file holds weights only; configs and tokenizers come from `config_from` (a few small files)."""
    with files.open_safetensors(path) as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    single_file.check_sdxl_checkpoint(shapes, path, adm_in_channels=None)  # names only, before any download
    folder = config_from if os.path.isdir(config_from) else download(config_from, patterns=CONFIG_FILES)
    configs = {c: read_config(os.path.join(folder, c, "config.json"), f"{config_from} has no {c} config")
               for c in MODEL_COMPONENTS}
    single_file.check_sdxl_checkpoint(shapes, path, configs["unet"]["projection_class_embeddings_input_dim"])
    index = read_config(os.path.join(folder, "model_index.json"), f"{config_from} is not a diffusers SDXL folder")
    weights = single_file.sgm_to_diffusers(files.load_tensors(path), configs["unet"], configs["vae"],
                                           configs["text_encoder"], configs["text_encoder_2"])
    return assemble(folder, configs, weights, index, device, dtype, vae_dtype, source=path, fp8=fp8)


def hub_text_encoder_keys(sd):
    """Text-encoder keys as the hub stores them. Files saved by transformers 4 (the SDXL repo) name everything
    `text_model.…`; transformers 5 drops that prefix for CLIPTextModel, so a fine-tune saved today lacks it.
    Some older files also carry a `position_ids` buffer, which we do not need."""
    sd = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v for k, v in sd.items()}
    sd.pop("text_model.embeddings.position_ids", None)
    return sd


def assemble(folder, configs, weights, index, device, dtype, vae_dtype, source, fp8=False):
    def what(comp):  # where a component's weights came from, for errors
        return f"{source} ({comp})" if os.path.isfile(str(source)) else os.path.join(folder, comp)
    for comp in ("text_encoder", "text_encoder_2"):
        weights[comp] = hub_text_encoder_keys(weights[comp])
    weights["vae"] = convert_legacy_vae_keys(weights["vae"])
    if vae_dtype is None:
        vae_dtype = torch.float32 if configs["vae"].get("force_upcast", True) else dtype
    scheduler = read_config(os.path.join(folder, "scheduler", "scheduler_config.json"), "the folder has no scheduler config")
    tokenizer = CLIPTokenizer.from_folder(os.path.join(folder, "tokenizer"))
    tokenizer_2 = CLIPTokenizer.from_folder(os.path.join(folder, "tokenizer_2"))
    return SDXL(
        unet=build(UNet, configs["unet"], weights["unet"], device, dtype, what=what("unet"), fp8=fp8),
        vae=build(AutoencoderKL, configs["vae"], weights["vae"], device, vae_dtype, what=what("vae")),
        # Pool at the tokenizer's real end-of-text id (the configs' eos_token_id is a legacy 2).
        text_encoder=build(CLIPTextModel, configs["text_encoder"], weights["text_encoder"], device, dtype,
                           what=what("text_encoder"), fp8=fp8, eos_token_id=tokenizer.eos_token_id),
        text_encoder_2=build(CLIPTextModel, configs["text_encoder_2"], weights["text_encoder_2"], device, dtype,
                             what=what("text_encoder_2"), fp8=fp8, eos_token_id=tokenizer_2.eos_token_id),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
        source=source,
    )


# ----------------------------------------------------------------------------------------------------------
# "sdxl-random": the real shapes with random weights

@torch.no_grad()
def randomize_(model, generator, recurse=True):
    """Random weights in place, in the model's own dtype (no fp32 copy of a 2.6 B-parameter model): matrices and
    conv kernels uniform with variance 1/fan_in, so activations stay of order 1 through the deep stacks (uniform,
    as PyTorch's own default init: a third faster to draw than a normal, which matters for 3.4 B numbers); norm
    gains 1, biases and other vectors small noise."""
    for module in model.modules() if recurse else [model]:
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and name == "weight":
                p.fill_(1.0)
            elif p.ndim >= 2:
                bound = (3 / p[0].numel()) ** 0.5  # U(-b, b) has variance b^2 / 3
                p.uniform_(-bound, bound, generator=generator)
            else:
                p.uniform_(-0.03, 0.03, generator=generator)
    return model


def build_random(cls, config, device, dtype, generator, fp8=False, **kwargs):
    """Constructed on the meta device and cast there (free), then given memory on `device` and filled in place
    module by module (fp8: each Linear / Conv2d quantized as soon as it is drawn): the peak is the model's own size."""
    with torch.device("meta"):
        model = cls(config, **kwargs).to(dtype)
    for module in model.modules():  # (a module without tensors of its own: nothing happens)
        module.to_empty(device=device, recurse=False)
        randomize_(module, generator, recurse=False)
        if fp8 and float8.quantizable(module):
            float8.quantize_module_(module)
    return model.eval().requires_grad_(False)


def random_sdxl(device="cpu", dtype=torch.float32, vae_dtype=None, seed=0, fp8=False):
    """SDXL base with random weights: every real config (configs/sdxl-base-1.0, the hub repo's files), the real
    49,408-row token tables, and a byte-level tokenizer with CLIP's ids (text_encoder.byte_level_vocab)."""
    start, folder = time.perf_counter(), RANDOM_CONFIGS
    configs = {c: read_config(os.path.join(folder, c, "config.json"), "") for c in MODEL_COMPONENTS}
    index = read_config(os.path.join(folder, "model_index.json"), "")
    if vae_dtype is None:
        vae_dtype = torch.float32 if configs["vae"].get("force_upcast", True) else dtype
    g = torch.Generator(device).manual_seed(seed)
    tokenizer, tokenizer_2 = (CLIPTokenizer.from_folder(os.path.join(folder, t), byte_level_vocab(), [])
                              for t in ("tokenizer", "tokenizer_2"))
    sd = SDXL(
        unet=build_random(UNet, configs["unet"], device, dtype, g, fp8),
        vae=build_random(AutoencoderKL, configs["vae"], device, vae_dtype, g),
        text_encoder=build_random(CLIPTextModel, configs["text_encoder"], device, dtype, g, fp8,
                                  eos_token_id=tokenizer.eos_token_id),
        text_encoder_2=build_random(CLIPTextModel, configs["text_encoder_2"], device, dtype, g, fp8,
                                    eos_token_id=tokenizer_2.eos_token_id),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=read_config(os.path.join(folder, "scheduler", "scheduler_config.json"), ""),
        force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
        source=RANDOM,
    )
    # Said every time: a user must never mistake these images or LoRAs for a real model's.
    print(f"sdxl-random: SDXL base's real shapes with RANDOM weights, built in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)
    return sd


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Download (or find) an SDXL model and report what was loaded.")
    p.add_argument("--model", default=SDXL_BASE, help="hub repo id, local diffusers folder, single-file "
                                                      ".safetensors, tiny, or sdxl-random")
    p.add_argument("--precision", default="fp16", choices=list(files.DTYPES))
    args = p.parse_args()
    sd = errors.cli(lambda: load_sdxl(args.model, dtype=files.DTYPES[args.precision]),
                    memory_hint="try --precision fp16 on a machine with more memory")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        m = getattr(sd, name)
        print(f"{name:15s} {sum(p.numel() for p in m.parameters()):>14,d} parameters  {next(m.parameters()).dtype}")
    print(f"tokenizers      {len(sd.tokenizer.vocab):,d} / {len(sd.tokenizer_2.vocab):,d} tokens; loaded from {sd.source}")
