"""The run as other tools see it: the model card README.md (the Hugging Face Hub) and the ss_* / modelspec.* metadata
of lora_kohya.safetensors (A1111 / Forge, Civitai, kohya sd-scripts, ComfyUI's model browsers).

Both are written with the final set (run_folder.save_final), from train_config.json's settings: nothing here is the
method. Key names and value formats follow the projects that read them:
  * kohya sd-scripts train_network.py: ss_* values are strings (str() of the Python value); ss_tag_frequency,
    ss_dataset_dirs and ss_bucket_info are JSON; SDXL's ss_base_model_version is "sdxl_base_v1-0".
    A1111 (extensions-builtin/Lora) parses every value that starts with "{" as JSON, names the LoRA by
    ss_output_name, calls it SDXL when ss_base_model_version starts with "sdxl_", and lists the tags of
    ss_tag_frequency ({folder: {tag: count}}) for the prompt.
  * Stability AI's ModelSpec 1.0.1 (github.com/Stability-AI/ModelSpec): modelspec.sai_model_spec, .architecture
    ("stable-diffusion-xl-v1-base/lora"), .implementation (the SGM codebase, whose names kohya files use), .title,
    .resolution ("WxH"), .date (ISO-8601), .trigger_phrase.
  * The Hub reads the card's YAML front matter (base_model, tags, instance_prompt, license, library_name). Every
    string there is a JSON string, which is also a YAML double-quoted scalar, so any token or prompt reads back as
    written (yaml_string).
"""
import html
import json
import os
import re
import shlex
import time
from datetime import datetime, timezone

SDXL_VERSION = "sdxl_base_v1-0"  # kohya's MODEL_VERSION_SDXL_BASE_V1_0
ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"
IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"  # kohya's IMPL_STABILITY_AI for an SDXL LoRA
TAGS = ("lora", "stable-diffusion-xl", "text-to-image", "dco", "diffusers")


def kohya_metadata(config):
    """The ss_* and modelspec.* keys for lora_kohya.safetensors (str -> str), from the run's train_config.json."""
    n, R, tokens = len(config["images"]), config["resolution"], config["tokens"]
    prior = config["loss"] == "db-prior"
    meta = {
        "ss_network_module": "networks.lora", "ss_network_dim": config["rank"], "ss_network_alpha": config["alpha"],
        "ss_base_model_version": SDXL_VERSION, "ss_v2": False, "ss_sd_model_name": model_name(config["model"]),
        "ss_resolution": (R, R), "ss_num_train_images": n, "ss_num_reg_images": config["num_class_images"] * prior,
        "ss_max_train_steps": config["steps"], "ss_steps": config["steps"], "ss_learning_rate": config["lr"],
        "ss_output_name": config["name"], "ss_seed": config["seed"], "ss_batch_size_per_device": config["batch_size"],
        "ss_total_batch_size": config["global_batch_size"], "ss_gradient_accumulation_steps": config["grad_accum"],
        "ss_lr_scheduler": config["lr_schedule"], "ss_lr_warmup_steps": config["lr_warmup"],
        "ss_optimizer": f"torch.optim.adamw.AdamW(weight_decay={config['weight_decay']},betas=(0.9, 0.999))",
        "ss_max_grad_norm": config["grad_clip"], "ss_noise_offset": config["offset_noise"],
        "ss_min_snr_gamma": config["snr_gamma"], "ss_mixed_precision": {"fp32": "no"}.get(config["precision"],
                                                                                      config["precision"]),
        "ss_flip_aug": config["random_flip"], "ss_random_crop": config["crop"] == "random",
        "ss_enable_bucket": bool(config.get("buckets")), "ss_training_finished_at": time.time(),
        "ss_tag_frequency": json.dumps({config["name"]: tag_frequency(config["captions"], tokens)}),
        "ss_dataset_dirs": json.dumps({config["name"]: {"n_repeats": 1, "img_count": n}}),
        "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": ARCHITECTURE,
        "modelspec.implementation": IMPLEMENTATION, "modelspec.title": config["name"],
        "modelspec.resolution": f"{R}x{R}", "modelspec.date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "modelspec.description": f"{LOSS_NAMES[config['loss']]} LoRA for SDXL, trained with dco (train.py)",
    }
    if prior:
        meta["ss_prior_loss_weight"] = config["prior_weight"]
    if tokens:
        meta["modelspec.trigger_phrase"] = ", ".join(tokens)
    if config.get("buckets"):  # kohya's bucket_info: {"buckets": {i: {"resolution": [w, h], "count": n}}}
        sizes = [tuple(s) for s in config["train_sizes"]]
        used = sorted(set(sizes), key=lambda hw: (hw[1], hw[0]))
        meta["ss_bucket_info"] = json.dumps({"buckets": {str(i): {"resolution": [w, h], "count": sizes.count((h, w))}
                                                         for i, (h, w) in enumerate(used)}})
    return {k: str(v) for k, v in meta.items()}


LOSS_NAMES = {"dco": "DCO (Direct Consistency Optimization)", "db": "DreamBooth", "db-prior": "DreamBooth (+ prior)"}


def model_name(model):
    """The base model as kohya records it: a local file or folder by its name, a hub id as it is."""
    return os.path.basename(os.path.normpath(model)) if os.path.exists(model) else model


def tag_frequency(captions, tokens):
    """{tag: count} as kohya counts a folder's captions (comma-separated tags, stripped, lower-cased), and each
    learned token as a tag of its own (as written: CLIP matches it case-insensitively), counted per caption."""
    counts = {}
    for caption in captions:
        for tag in caption.split(","):
            if tag.strip():
                counts[tag.strip().lower()] = counts.get(tag.strip().lower(), 0) + 1
    for token in tokens:
        counts[token] = sum(token.lower() in c.lower() for c in captions)
    return counts


# ----------------------------------------------------------------------------------------------------------
# The model card

def yaml_string(text):
    """A YAML double-quoted scalar that reads back as `text`: JSON's escapes (a JSON string is a YAML double-quoted
    scalar), plus \\u escapes for what YAML may not hold raw (C1 controls, U+FFFE/F, lone surrogates) or reads as a
    line break (U+0085, U+2028, U+2029)."""
    return re.sub("[\x7f-\x9f\u2028\u2029\ud800-\udfff\ufffe\uffff]", lambda m: f"\\u{ord(m[0]):04x}",
                  json.dumps(text, ensure_ascii=False))


def front_matter(text):
    """The YAML front matter of a Markdown file (between its first two '---' lines), or ''."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return ""
    end = next((i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"), None)
    return "\n".join(lines[1:end]) if end else ""


def hub_id(model):
    """Whether `model` reads as a hub id (owner/name) rather than a local file or folder."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", model)) and not os.path.exists(model)


def base_license(model):
    """The base model's license when its files name one: `license:` in the front matter of its README.md (a local
    folder, or a hub id whose README is in the local Hugging Face cache: the downloader fetches none), else None."""
    readme = os.path.join(model, "README.md") if os.path.isdir(model) else None
    if readme is None and hub_id(model):
        try:
            from huggingface_hub import try_to_load_from_cache
            cached = try_to_load_from_cache(model, "README.md")
            readme = cached if isinstance(cached, str) else None
        except (ImportError, ValueError):
            readme = None
    if not readme or not os.path.isfile(readme):
        return None
    with open(readme, encoding="utf-8", errors="replace") as f:
        found = re.search(r"^license:[ \t]*(\S[^\n]*)$", front_matter(f.read()), re.MULTILINE)
    return found[1].strip().strip("'\"") if found else None


def code(text):
    """Markdown inline code that shows `text` as it is (no HTML: a token like <dog> stays visible)."""
    ticks = "`" * (max((len(r) for r in re.findall("`+", text)), default=0) + 1)
    return f"{ticks} {text} {ticks}" if text.startswith("`") or text.endswith("`") else f"{ticks}{text}{ticks}"


def last_samples(out):
    """The sample images of the run's last checkpoint: (relative paths, sorted by index), or []."""
    folder = os.path.join(out, "samples")
    found = [re.fullmatch(r"step(\d+)-(\d+)\.png", f) for f in (os.listdir(folder) if os.path.isdir(folder) else [])]
    found = [(int(m[1]), int(m[2]), m[0]) for m in found if m]
    last = max((s for s, _, _ in found), default=None)
    return [f"samples/{name}" for s, _, name in sorted(found) if s == last]


def model_card(config, out, sample_prompts, license=None):
    """README.md for the output folder: YAML front matter the Hub reads, the settings, the last checkpoint's
    samples, how to load the files in diffusers, ComfyUI and A1111, and the upload command."""
    tokens, words, name = config["tokens"], config["init_words"], config["name"]
    prompt = next((c for c in config["captions"] if any(t in c for t in tokens)), config["captions"][0])
    yaml = [f"base_model: {yaml_string(config['model'])}"] + ([f"license: {yaml_string(license)}"] if license else [])
    yaml += ["library_name: \"diffusers\"", "tags:", *[f"- {yaml_string(t)}" for t in TAGS],
             f"instance_prompt: {yaml_string(prompt)}"]
    token_text = ", ".join(f"{code(t)} (from {code(w)})" for t, w in zip(tokens, words)) or "none (the LoRA alone)"
    buckets = " with aspect-ratio buckets (`--buckets`)" if config.get("buckets") else " (square crops)"
    beta = f", β = {config['beta']:g}" if config["loss"] == "dco" else ""
    lines = ["---", *yaml, "---", "", f"# {name}: a {LOSS_NAMES[config['loss']]} LoRA for SDXL", "",
             f"A LoRA on the UNet's attention of {code(config['model'])}, trained with "
             "[dco](https://arxiv.org/abs/2402.12004)'s `train.py`." + ("" if hub_id(config["model"]) else
                                                                      " `base_model` is a local path: put the base "
                                                                      "model's hub id there before uploading."), "",
             "| setting | value |", "|---|---|",
             f"| loss | {config['loss']}{beta}{' (relative reward)' if config.get('relative_reward') else ''} |",
             f"| steps | {config['steps']} (global batch {config['global_batch_size']}, lr {config['lr']:g}) |",
             f"| rank, alpha | {config['rank']}, {config['alpha']:g} |",
             f"| resolution | {config['resolution']}²{buckets} |",
             f"| learned tokens | {token_text} |",
             f"| training images | {len(config['images'])} |",
             f"| text_encoder_2 pooling | {config.get('pool', 'eos')} |", ""]
    samples = last_samples(out)
    if samples:
        lines += ["## Samples (the last checkpoint)", ""]
        alt = [html.escape(p).replace("[", "&#91;").replace("]", "&#93;") for p in sample_prompts]
        lines += [f"![{a}]({s})" for s, a in zip(samples, alt + [""] * len(samples))] + [""]
    lines += loading_text(config, prompt) + uploading_text(config)
    return "\n".join(lines) + "\n"


def fence(text):
    """A fenced code block longer than any run of backticks inside it."""
    ticks = "`" * max(3, max((len(r) for r in re.findall("`+", text)), default=0) + 1)
    return [f"{ticks}python", text, ticks]


def loading_text(config, prompt):
    """How to load the files in diffusers, ComfyUI and A1111 / Forge, and the pooling note (docs/compatibility.md)."""
    tokens, name, out = config["tokens"], config["name"], config["output"]
    diffusers = ["import torch", "from diffusers import StableDiffusionXLPipeline",
                 "from safetensors.torch import load_file", "",
                 f"pipe = StableDiffusionXLPipeline.from_pretrained({config['model']!r}, "
                 "torch_dtype=torch.float16).to(\"cuda\")",
                 f"pipe.load_lora_weights({out!r})  # this folder, or the repo id once uploaded"]
    if tokens:
        diffusers += [f"rows = load_file({os.path.join(out, 'learned_embeds.safetensors')!r})",
                      f"pipe.load_textual_inversion(rows[\"clip_l\"], token={tokens!r}, "
                      "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)",
                      f"pipe.load_textual_inversion(rows[\"clip_g\"], token={tokens!r}, "
                      "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)"]
    diffusers += [f"image = pipe({prompt!r}).images[0]"]
    comfy = "**ComfyUI**: put `lora_kohya.safetensors` in `models/loras` (LoraLoader node)"
    a1111 = (f"**A1111 / Forge**: put `lora_kohya.safetensors` in `models/Lora`; it is listed as {code(name)} (its "
             f"`ss_output_name`): {code(f'<lora:{name}:1>')} in the prompt")
    if tokens:
        comfy += (", and `learned_embeds.safetensors` in `models/embeddings` as `NAME.safetensors`; write "
                  "`embedding:NAME` where the prompt has the token")
        a1111 += ("; the token: `learned_embeds.safetensors` in `embeddings/` (its file name is the word to write), or "
                  "a file trained with `--bundle-token`, which carries it")
    where = (f"The learned token {', '.join(code(t) for t in tokens)} is in `learned_embeds.safetensors` (keys "
             "`clip_l`, `clip_g`). " if tokens else "")
    trained = ("argmax too, so they match it" if config.get("pool") == "argmax" else "the EOS token (as SDXL was "
               "trained), so images there differ a little from dco's sample.py; train with --pool argmax to match")
    return ["## Use", "", "**diffusers**:", "", *fence("\n".join(diffusers)), "", comfy + ".", "", a1111 + ".", "",
            f"{where}**Pooling**: these tools pool text_encoder_2 at argmax(ids) (transformers' rule), the new token's "
            f"position when the prompt holds it; this LoRA was trained pooling at {trained}.", ""]


def upload_command(config):
    """`hf upload USER/NAME OUTPUT_DIR . --exclude "checkpoint-*"`: the folder without its checkpoints (AdamW state)."""
    repo = re.sub(r"[^\w.-]+", "-", config["name"]).strip("-.") or "dco-lora"
    return f"hf upload USER/{repo} {shlex.quote(config['output'])} . --exclude 'checkpoint-*'"


def uploading_text(config):
    return ["## Upload", "", "With the `huggingface_hub` CLI (installed with dco's requirements) after "
            "`hf auth login`, from where train.py ran (USER: your Hub name):", "",
            "```bash", upload_command(config), "```", "",
            "(`huggingface-cli upload` takes the same arguments in older huggingface_hub.) The front matter above is "
            "what the Hub reads: base model, tags, instance prompt.", ""]
