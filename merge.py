"""Merge DCO LoRAs: "my subject in my style" without any post-optimisation.

    python merge.py output/dog output/style --weights 1 1 --output output/dog_in_style
    python sample.py --lora output/dog_in_style --prompt "a <dog> in <style> style"
    python merge.py --analyze output/dog output/style          # how much do the two LoRAs overlap?
    python merge.py output/dog output/style --method ziplora --model tiny --output output/dog_in_style_zip  # baseline

DCO (Lee, Kwak, Sohn, Shin, NeurIPS 2024, arXiv 2402.12004) trains a subject and a style separately and composes
them by simply adding the two updates, W + w1 dW_dog + w2 dW_style, where plain DreamBooth LoRAs need a merging
optimisation afterwards (ZipLoRA, Shah et al. 2023). The sum is EXACT in LoRA form: stack the ranks,
    [w1 s1 B1 | w2 s2 B2] @ [A1 ; A2] = w1 s1 B1 A1 + w2 s2 B2 A2      (s_i = alpha_i / r_i, see lora.concat_loras)
so the merged LoRA has rank r1 + r2 and no SVD truncation. The output folder looks like a trainer's: diffusers/PEFT
and kohya files, learned_embeds.safetensors with every concept's token rows, and merge_config.json. `--into-base`
bakes the sum into a full UNet file instead (or as well). `--method ziplora` is that post-optimisation, as the
baseline of the paper's merge table (baselines/ziplora.py): it fits ZipLoRA's per-column merger coefficients first, and writes
the same kind of LoRA (column-scaled down-projections, ranks stacked).

Why adding works (`--analyze`): per layer we compare the two updates dW_a, dW_b column by column, as ZipLoRA does
(Shah et al. 2023, "highly aligned LoRA weights merge poorly"): the mean over input features j of
|cos(dW_a[:, j], dW_b[:, j])|, how alike the output directions are that the two LoRAs send feature j to (and the same
over rows, the input directions each output feature reads). Identical LoRAs give 1; updates that barely interfere
give |cos| near 0, or near what random directions give, sqrt(2 / (pi d)) in dimension d: added, each hardly touches
what the other writes, so each concept survives the sum. The intuition for DCO: its loss keeps every LoRA close to
the pretrained model, so separately trained DCO LoRAs stay small, nearly orthogonal updates -- which is why they merge
well without any post-optimisation.
"""
import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines.ziplora import zip_sources
from lora import concat_loras, load_lora_file, save_lora_kohya, save_lora_peft
from product import errors
from product.files import (COMPONENTS, DTYPES, EMBEDS_FILE, KOHYA_FILE, PEFT_FILE, atomic, check_writable,
                           find_lora_files, metadata_list, official_tokens, open_safetensors, parse_token,
                           read_learned_tokens, read_metadata_list, save_tensors, write_json)
from product.hub import CONFIG_FILES, download
from sdxl import SDXL_BASE, load_sdxl, model_path, read_config
from text_encoder import CLIPTextModel, normalize
from unet_loader import UNet

MERGE_FILE = "merge_config.json"


@dataclass
class Source:
    """One LoRA to merge, as the trainer wrote it."""
    path: str
    layers: dict  # {component: {module: (down [r, in], up [out, r], alpha)}}
    metadata: dict  # the LoRA file's safetensors metadata
    token_rows: dict | None  # {"clip_l": [n, 768], "clip_g": [n, 1280]}: the learned token rows, or None
    tokens: list  # the n learned tokens, e.g. ["<dog>"]
    init_words: list  # their init words ("" where unknown)


# ---------------------------------------------------------------------------------------------------------
# Reading the LoRAs

def lora_files(path):
    """A trainer output folder or a LoRA file -> (LoRA file, learned_embeds file or None), found as sample.py does."""
    try:
        lora, embeds_file = find_lora_files(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"LoRA {e}") from None
    if lora is None:
        raise FileNotFoundError(f"LoRA {path}: the folder has no {PEFT_FILE} or {KOHYA_FILE}")
    return lora, embeds_file


def read_keys_and_metadata(path):
    """A safetensors file's tensor names and metadata, without reading a tensor."""
    with open_safetensors(path) as f:
        return list(f.keys()), dict(f.metadata() or {})


def base_from_metadata(paths):
    """The base model the trainer recorded ('base_model' metadata), when the LoRAs agree; else SDXL base."""
    bases = {}
    for p in paths:
        base = read_keys_and_metadata(lora_files(p)[0])[1].get("base_model")
        if base:
            bases.setdefault(base, p)
    if len(bases) > 1:
        (a, pa), (b, pb) = list(bases.items())[:2]
        raise ValueError(f"{pa} was trained on {a} but {pb} on {b}: pass --model to name the base they share")
    return next(iter(bases), SDXL_BASE)


def base_skeleton(model):
    """The base model's layers built from its config files on the meta device: names and shapes, no weights read.
    They check that the LoRAs fit the base and give the UNet config the kohya (SGM) layer names need."""
    model = model_path(model)
    if os.path.isfile(model):
        if not model.endswith(".safetensors"):
            raise ValueError(f"--model {model}: not a .safetensors file or a diffusers folder")
        folder = download(SDXL_BASE, patterns=CONFIG_FILES)  # a single file has no configs: load_sdxl's default
    elif os.path.isdir(model):
        folder = model
    elif model.startswith((".", "/")) or model.endswith(".safetensors"):
        raise FileNotFoundError(f"base model {model}: no such folder or .safetensors file")
    else:
        folder = download(model, patterns=CONFIG_FILES)
    configs = {c: read_config(os.path.join(folder, c, "config.json"), f"{model} is not a diffusers SDXL model")
               for c in COMPONENTS}
    with torch.device("meta"):
        return {"unet": UNet(configs["unet"]), "text_encoder": CLIPTextModel(configs["text_encoder"]),
                "text_encoder_2": CLIPTextModel(configs["text_encoder_2"])}


def read_source(path, skeleton=None, names=None, tokens=True) -> Source:
    """A LoRA as the trainer wrote it. `names`: [(token, init word)] for token rows saved without names (the official
    DCO code's learned_embeds.safetensors)."""
    lora, embeds_file = lora_files(path)
    keys, _ = read_keys_and_metadata(lora)
    kohya = any(k.startswith(("lora_unet_", "lora_te")) for k in keys)
    if kohya and skeleton is None:
        raise ValueError(f"{lora} is a kohya LoRA: its layer names need the base model's config, pass --model")
    modules = skeleton if kohya else None
    layers, metadata = load_lora_file(lora, modules, skeleton["unet"].config if modules else None)
    embeds_file = embeds_file if tokens else None  # --analyze compares the LoRA layers only
    token_rows, tokens, words = read_learned_tokens(embeds_file, names) if embeds_file else (None, [], [])
    token_rows = {k: v.float() for k, v in token_rows.items()} if token_rows else None
    return Source(path, layers, metadata, token_rows, tokens, words)


def check_shapes(sources, skeleton=None, base=""):
    """Same layer, same shape in every LoRA (and in the base, when known): else they were trained for different
    bases and their sum means nothing. Names the first layer that does not fit."""
    seen = {}
    base_modules = {c: dict(m.named_modules()) for c, m in (skeleton or {}).items()}
    for s in sources:
        for comp, layers in s.layers.items():
            for module, (down, up, _) in layers.items():
                name, shape = f"{comp}.{module}", (down.shape[1], up.shape[0])
                if up.shape[1] != down.shape[0]:
                    raise ValueError(f"{s.path}: layer '{name}' has down rank {down.shape[0]} but up rank "
                                     f"{up.shape[1]}: a broken LoRA file")
                (first_shape, first_path) = seen.setdefault(name, (shape, s.path))
                if shape != first_shape:
                    raise ValueError(f"{s.path}: layer '{name}' maps {shape[0]} -> {shape[1]} features but in "
                                     f"{first_path} {first_shape[0]} -> {first_shape[1]}: LoRAs trained for "
                                     f"different base models cannot be merged")
                m = base_modules.get(comp, {}).get(module) if skeleton else None
                if skeleton and (not isinstance(m, nn.Linear) or (m.in_features, m.out_features) != shape):
                    what = f"is {m.in_features} -> {m.out_features}" if isinstance(m, nn.Linear) else "is no Linear"
                    raise ValueError(f"{s.path}: layer '{name}' maps {shape[0]} -> {shape[1]} features but in the "
                                     f"base model {base} it {what}: LoRA trained for another base? (pass --model)")


# ---------------------------------------------------------------------------------------------------------
# Merging

def merge_loras(sources, weights) -> dict:
    """{component: {module: (down, up, alpha)}} whose update is exactly sum_i w_i dW_i (fp32, ranks stacked).
    A layer only one LoRA has keeps its rank, its up scaled by w. Every layer gets ONE alpha, the largest rank, with
    each layer's own alpha / alpha folded into its up: diffusers (0.42) reads a kohya file's per-layer alphas under
    names that match none of its modules and so applies the most common alpha to every layer."""
    comps = dict.fromkeys(c for s in sources for c in s.layers)
    merged = {c: concat_loras([{n: (d.float(), u.float(), a) for n, (d, u, a) in s.layers.get(c, {}).items()}
                               for s in sources], weights) for c in comps}
    alpha = float(max(d.shape[0] for layers in merged.values() for d, _, _ in layers.values()))
    return {c: {n: (d, u * (a / alpha) if a != alpha else u, alpha) for n, (d, u, a) in layers.items()}
            for c, layers in merged.items()}


def merge_embeddings(sources):
    """Every concept's token rows, concatenated in LoRA order -> ({"clip_l", "clip_g"} or None, tokens, init words).
    Two LoRAs that define the same token (CLIP matches tokens case-insensitively) cannot both have it."""
    owner = {}
    for s in sources:
        for t in s.tokens:
            if normalize(t) in owner:
                raise ValueError(f"token {t} is defined by both {owner[normalize(t)]} and {s.path}: one prompt word "
                                 "cannot mean two concepts; retrain one of them with another --token")
            owner[normalize(t)] = s.path
    have = [s for s in sources if s.token_rows is not None]
    if not have:
        return None, [], []
    for key in ("clip_l", "clip_g"):
        widths = {s.token_rows[key].shape[1] for s in have}
        if len(widths) > 1:
            raise ValueError(f"'{key}' token rows are {sorted(widths)} wide in different LoRAs "
                             f"({', '.join(s.path for s in have)}): embeddings trained for different base models")
    token_rows = {k: torch.cat([s.token_rows[k] for s in have]) for k in ("clip_l", "clip_g")}
    return token_rows, [t for s in have for t in s.tokens], [w for s in have for w in s.init_words]


def merge_metadata(sources, weights, base, tokens, init_words) -> dict:
    """str -> str safetensors metadata: 'token'/'init_word' (JSON lists) as the trainer writes them (sample.py reads them), and
    'merged_from': JSON list of {source, weight, tokens, metadata} (each source's own metadata, nested as is)."""
    record = [{"source": s.path, "weight": w, "tokens": s.tokens,
               "metadata": {k: v for k, v in s.metadata.items() if k != "lora_adapter_metadata"}}
              for s, w in zip(sources, weights)]
    return {"base_model": base, "token": metadata_list(tokens), "init_word": metadata_list(init_words),
            "merged_from": json.dumps(record)}


def bake_into_base(unet_weights: dict, layers: dict, dtype=torch.float16) -> dict:
    """The base UNet's weights with the merged update added: W + alpha/r * up @ down, summed in fp32."""
    out = {k: v.to(dtype) for k, v in unet_weights.items()}
    for module, (down, up, alpha) in layers.items():
        key = module + ".weight"
        if key not in unet_weights or unet_weights[key].shape != (up.shape[0], down.shape[1]):
            raise ValueError(f"--into-base: the base UNet has no weight '{key}' of shape "
                             f"{(up.shape[0], down.shape[1])}: LoRA trained for another base?")
        out[key] = (unet_weights[key].float() + (alpha / down.shape[0]) * (up.float() @ down.float())).to(dtype)
    return out


# ---------------------------------------------------------------------------------------------------------
# Writing

def check_output(out):
    """Refuse to overwrite anything but an earlier merge (a trainer's folder, say), before any work is done."""
    if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out)
                               and not os.path.isfile(os.path.join(out, MERGE_FILE))):
        raise ValueError(f"--output {out} exists and is not an earlier merge: pass a new folder")


def save_merged(out, layers, token_rows, metadata, unet_config):
    """Write the folder under a temporary name and rename it into place: it appears whole or not at all."""
    with atomic(out) as tmp:
        os.makedirs(tmp)
        save_lora_peft(tmp, layers, metadata)
        save_lora_kohya(tmp, layers, unet_config, metadata)
        if token_rows is not None:
            save_tensors(os.path.join(tmp, EMBEDS_FILE), token_rows, metadata)
        config = {k: v for k, v in metadata.items() if k != "merged_from"}
        write_json(os.path.join(tmp, MERGE_FILE), {**config, "merged_from": json.loads(metadata["merged_from"])})
    return out


def merge(paths, weights=None, output=None, model=None, into_base=None, precision="fp16", names=None, method="sum",
          ziplora=None):
    """Merge the LoRAs at `paths` (trainer folders or files) with `weights` into `output` (a LoRA folder) and/or
    `into_base` (a full UNet .safetensors, needs `model`). Everything is checked before anything is written.
    `names`: [(token, init word)] for the official code's nameless token rows, taken in LoRA order.
    method "ziplora": first fit ZipLoRA's column mergers (baselines/ziplora.py; needs `model`; `ziplora`: its keyword
    arguments, e.g. steps, lr, lam, device), then sum the column-scaled LoRAs exactly as "sum" does."""
    weights = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
    if len(paths) < 2:
        raise ValueError(f"merge needs at least two LoRAs, got {len(paths)}")
    if len(weights) != len(paths):
        raise ValueError(f"--weights: {len(weights)} weight(s) for {len(paths)} LoRAs; give one per LoRA")
    if not (output or into_base):
        raise ValueError("nothing to write: pass --output DIR (the merged LoRA) and/or --into-base FILE")
    if method not in ("sum", "ziplora"):
        raise ValueError(f"--method {method}: choose sum or ziplora")
    if method == "ziplora" and not model:
        raise ValueError("--method ziplora needs --model: it runs the base model with both LoRAs to fit the merge")
    if method == "ziplora" and len(paths) != 2:
        raise ValueError(f"--method ziplora merges exactly two LoRAs (a subject and a style), got {len(paths)}")
    if into_base and not model:
        raise ValueError("--into-base needs --model: the base model whose UNet the merged LoRA is baked into")
    if into_base and not into_base.endswith(".safetensors"):
        raise ValueError(f"--into-base {into_base}: must be a .safetensors file")
    errors.check_flags({"weights": weights}, {"weights": NUMBERS["weights"]})
    if output:
        check_output(output)
        check_writable(output, "--output folder")
    if into_base:
        check_writable(into_base, "--into-base")
    base = model or base_from_metadata(paths)
    try:
        skeleton = base_skeleton(base)
    except FileNotFoundError as e:
        if model:
            raise
        raise FileNotFoundError(f"{e} (the base model named in the LoRAs' metadata): pass --model") from None
    sources, names = [], list(names or [])
    for p in paths:
        sources.append(read_source(p, skeleton, names))
        names = [n for n in names if n[0] not in sources[-1].tokens]  # the next nameless file takes the next names
    check_shapes(sources, skeleton, base)
    token_rows, tokens, init_words = merge_embeddings(sources)
    metadata = merge_metadata(sources, weights, base, tokens, init_words)
    if method == "ziplora":
        sources, info = zip_sources(sources, weights, model, **(ziplora or {}))
        metadata.update(merge_method="ziplora", ziplora=json.dumps(info))
    layers = merge_loras(sources, weights)
    baked = None
    if into_base:
        if set(layers) - {"unet"}:
            print(f"warning: {into_base} holds the UNet only; the text-encoder LoRA layers are not baked in "
                  "(use the merged LoRA for them)", file=sys.stderr)
        baked = bake_into_base(load_sdxl(model).unet.state_dict(), layers.get("unet", {}), DTYPES[precision])
    if output:
        save_merged(output, layers, token_rows, metadata, skeleton["unet"].config)
    if baked is not None:
        os.makedirs(os.path.dirname(into_base) or ".", exist_ok=True)
        save_tensors(into_base, baked, {"format": "pt", **metadata})
    return layers, token_rows, metadata


# ---------------------------------------------------------------------------------------------------------
# Interference analysis

def mean_abs_cos_random(d):
    """E|cos| of two independent random directions in R^d, Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2)) ~ sqrt(2/(pi d)):
    the value 'unrelated' LoRAs reach, to read the table against."""
    return math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)


def interference(a: dict, b: dict) -> list[dict]:
    """Per layer both LoRAs have: col_cos, the mean over input features j of |cos(dW_a[:, j], dW_b[:, j])|, and
    row_cos, the mean over output features i of |cos(dW_a[i, :], dW_b[i, :])|, with dW = up @ down. Scale, alpha and
    sign do not matter; a zero column (an untrained up) counts as 0. Identical LoRAs give 1, updates on disjoint
    features 0, independent random LoRAs about sqrt(2 / (pi d)) (col_random: d = out features, row_random: d = in).
    Also up_cos / down_cos, the same measure on the factors themselves: |cos| between up column k of A and of B (and
    down row k), k < min(rank): the literal "columns of the up-matrices" reading. Identical LoRAs give 1 here too, but
    a LoRA's rank directions can be permuted without changing dW, so the dW columns above are the robust measure."""
    rows = []
    for comp, layers in a.items():
        for module, (da, ua, _) in layers.items():
            if module not in b.get(comp, {}):
                continue
            db, ub, _ = b[comp][module]
            if ua.shape[0] != ub.shape[0] or da.shape[1] != db.shape[1]:
                raise ValueError(f"layer '{comp}.{module}' has other shapes in the two LoRAs: trained for "
                                 "different base models")
            dw_a, dw_b = ua.float() @ da.float(), ub.float() @ db.float()  # [out, in]; alpha / r cancels in a cosine
            r = min(da.shape[0], db.shape[0])
            rows.append({"layer": f"{comp}.{module}", "rank_a": da.shape[0], "rank_b": db.shape[0],
                         "col_cos": F.cosine_similarity(dw_a, dw_b, dim=0).abs().mean().item(),
                         "row_cos": F.cosine_similarity(dw_a, dw_b, dim=1).abs().mean().item(),
                         "up_cos": F.cosine_similarity(ua[:, :r].float(), ub[:, :r].float(), dim=0).abs().mean().item(),
                         "down_cos": F.cosine_similarity(da[:r].float(), db[:r].float(), dim=1).abs().mean().item(),
                         "col_random": mean_abs_cos_random(ua.shape[0]),
                         "row_random": mean_abs_cos_random(da.shape[1])})
    return rows


def _name(path):
    """'output/dog' and 'output/dog/pytorch_lora_weights.safetensors' -> 'dog'; 'x/style.safetensors' -> 'style'."""
    path = os.path.normpath(path)
    if os.path.basename(path) in (PEFT_FILE, KOHYA_FILE):
        path = os.path.dirname(path)
    return os.path.splitext(os.path.basename(path))[0] if os.path.isfile(path) else os.path.basename(path)


def analyze(path_a, path_b, csv_path=None, model=None):
    """Print the interference table and its mean, write it as CSV (default: interference_<a>_<b>.csv beside A)."""
    if csv_path is None:
        csv_path = os.path.join(os.path.dirname(os.path.normpath(path_a)),
                                f"interference_{_name(path_a)}_{_name(path_b)}.csv")
    check_writable(csv_path, "--csv")
    skeleton = base_skeleton(model) if model else None
    a, b = read_source(path_a, skeleton, tokens=False), read_source(path_b, skeleton, tokens=False)
    check_shapes([a, b], skeleton, model)
    rows = interference(a.layers, b.layers)
    if not rows:
        raise ValueError(f"{path_a} and {path_b} share no layer: there is nothing to compare")
    w = max(len(r["layer"]) for r in rows)
    print(f"{'layer':<{w}}  r_a  r_b  {'|cos| cols':>10}  {'|cos| rows':>10}  {'|cos| up':>8}  {'|cos| down':>10}  "
          f"{'random cols':>11}  {'random rows':>11}")
    for r in rows:
        print(f"{r['layer']:<{w}}  {r['rank_a']:>3}  {r['rank_b']:>3}  {r['col_cos']:10.4f}  {r['row_cos']:10.4f}  "
              f"{r['up_cos']:8.4f}  {r['down_cos']:10.4f}  {r['col_random']:11.4f}  {r['row_random']:11.4f}")
    mean = {k: sum(r[k] for r in rows) / len(rows)
            for k in ("col_cos", "row_cos", "up_cos", "down_cos", "col_random", "row_random")}
    n_a, n_b = (sum(len(x) for x in s.layers.values()) for s in (a, b))
    print(f"mean over {len(rows)} shared layers: |cos| columns {mean['col_cos']:.4f}, rows {mean['row_cos']:.4f}, "
          f"up {mean['up_cos']:.4f}, down {mean['down_cos']:.4f} "
          f"(random directions: columns {mean['col_random']:.4f}, rows {mean['row_random']:.4f}); "
          f"{n_a + n_b - 2 * len(rows)} layer(s) in only one LoRA")
    with atomic(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {csv_path}")
    return rows, mean


# ---------------------------------------------------------------------------------------------------------

# The range of every numeric flag's meaning (errors.check_flags).
NUMBERS = {"weights": "finite", "ziplora_steps": ">= 0", "ziplora_lr": "> 0", "ziplora_lambda": ">= 0"}


def parser():
    p = argparse.ArgumentParser(description="Merge DCO LoRAs exactly (w1 dW1 + w2 dW2 + ...), or analyze how two "
                                            "LoRAs overlap (--analyze A B).")
    p.add_argument("loras", nargs="+", help="trainer output folders (or LoRA .safetensors files)")
    p.add_argument("--weights", nargs="+", type=float, help="one weight per LoRA (default: all 1), of "
                   "any sign: a negative one subtracts that LoRA's update")
    p.add_argument("--output", help="folder for the merged LoRA (diffusers + kohya files, learned tokens)")
    p.add_argument("--model", help="the base model (hub id, diffusers folder, single file, tiny, sdxl-random); "
                                   "default: the LoRAs' base_model metadata, else SDXL base. Only configs are read, "
                                   "unless --into-base")
    p.add_argument("--into-base", metavar="FILE", help="bake the merged LoRA into a full UNet .safetensors (diffusers "
                                                       "names, like unet/diffusion_pytorch_model.safetensors)")
    p.add_argument("--precision", default="fp16", choices=list(DTYPES), help="--into-base weights (default fp16, "
                                                                         "SDXL's own; fp32 keeps every bit of dW)")
    p.add_argument("--method", default="sum", choices=["sum", "ziplora"], help="sum: the exact sum (DCO's way, "
                   "default); ziplora: fit ZipLoRA's per-column mergers first (Shah et al. 2023; two LoRAs, needs "
                   "--model and the trainer folders' training images; see baselines/ziplora.py)")
    p.add_argument("--ziplora-steps", type=int, default=100, help="ZipLoRA optimisation steps (paper: 100; 0: "
                   "none, the mergers stay at their start)")
    p.add_argument("--ziplora-lr", type=float, default=1e-2, help="ZipLoRA's Adam learning rate")
    p.add_argument("--ziplora-lambda", type=float, default=0.01, help="weight of the |cos(m_a, m_b)| penalty "
                   "(0: none)")
    p.add_argument("--device", help="--method ziplora: default cuda if available, else cpu")
    p.add_argument("--token", action="append", type=parse_token, default=[], metavar="TOKEN[=INIT_WORD]",
                   help="names of learned token rows saved without them (the official DCO code), in order; repeatable")
    p.add_argument("--config", help="the official DCO data config.json: its inserting/initializer_tokens name the rows")
    p.add_argument("--config-name", help="which entry of --config")
    p.add_argument("--analyze", action="store_true", help="print the interference table of two LoRAs (no merge)")
    p.add_argument("--csv", help="--analyze: CSV path (default: interference_<A>_<B>.csv beside A)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    errors.cli(lambda: run(args), memory_hint="--into-base loads the base UNet, --method ziplora runs it: use a "
                                              "machine with more memory, or the plain sum without --into-base")


def run(args):
    errors.check_flags(vars(args), NUMBERS)
    if args.analyze:
        if len(args.loras) != 2 or args.weights or args.output or args.into_base:
            raise ValueError("--analyze compares exactly two LoRAs and writes only --csv")
        analyze(*args.loras, csv_path=args.csv, model=args.model)
        return
    names = list(args.token)
    if args.config or args.config_name:
        if not (args.config and args.config_name):
            raise ValueError("--config and --config-name go together")
        names += official_tokens(args.config, args.config_name)
    zl = dict(steps=args.ziplora_steps, lr=args.ziplora_lr, lam=args.ziplora_lambda, device=args.device)
    layers, token_rows, meta = merge(args.loras, args.weights, args.output, args.model, args.into_base, args.precision,
                                 names=names, method=args.method, ziplora=zl)
    ranks = [d.shape[0] for c in layers.values() for d, _, _ in c.values()]
    rank = f"{min(ranks)}" if min(ranks) == max(ranks) else f"{min(ranks)}-{max(ranks)}"
    print(f"merged {len(args.loras)} LoRAs ({len(ranks)} layers, rank {rank}, tokens "
          f"{', '.join(read_metadata_list(meta, 'token')) or 'none'}) -> {', '.join(x for x in (args.output, args.into_base) if x)}")


if __name__ == "__main__":
    main()
