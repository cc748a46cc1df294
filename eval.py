"""Score samples as the DCO paper does: image similarity (DINOv2) and image-text similarity (SigLIP), and draw the
Pareto plot of the w_con sweep.

    python sample.py --lora output/dog --prompt "a <dog> playing saxophone in sticker style" --wcon 0,1,2,3,4 --n 8 \
        --output samples/dco/sax.png
    python eval.py samples/dco samples/db --reference ./dog --output scores.csv --plot pareto.png

Definitions (Lee et al. 2024, §5; the DreamBooth benchmark's DINO score, Ruiz et al. 2023, arXiv:2208.12242):
  image_similarity  the mean, over the reference photos, of the cosine between the sample's and the photo's DINOv2
                    embedding (the CLS state after the final LayerNorm): subject (or style) fidelity.
  text_similarity   the cosine between SigLIP's embeddings of the sample and of its prompt: prompt fidelity. The
                    prompt is the *base* prompt, the learned token written as its class word ("a dog playing ..."):
                    SigLIP has never seen "<dog>". sample.py stores it in the PNG as `base_prompt`; else the PNG's
                    `prompt` is used (SigLIP's canonicalization strips the "<>" of "<dog>" anyway), else a sidecar
                    .txt next to the image.
  reference level   each reference photo's mean cosine to the OTHER photos (leave-one-out), averaged: how similar
                    real photos of the subject are to each other. Samples that copy a reference score above it.

Each preprocessing follows the checkpoint's preprocessor_config.json, as transformers' image processors do: convert to
RGB, resize (shortest edge, or to a fixed size) with its resampling filter, center crop, rescale to [0, 1], normalize.
The models are evaluation/dinov2.py and evaluation/siglip.py; checkpoints come from the hub (cached like SDXL's) or a local folder.
"""
import argparse
import csv
import json
import os
from collections import defaultdict

import numpy as np
import torch
from PIL import Image

from evaluation.dinov2 import load_dinov2
from evaluation.siglip import load_siglip
from product import errors
from product.files import DTYPES, atomic, check_writable, image_format, save_image

# Defaults: the paper names DINOv2 and SigLIP; these are the largest public checkpoints of each that a 24 GB GPU runs
# easily (see docs/sampling_and_merging.md, "Measuring your LoRA as the paper does").
DINO = "facebook/dinov2-large"
SIGLIP = "google/siglip-so400m-patch14-384"
HUB_FILES = ["config.json", "preprocessor_config.json", "model.safetensors", "spiece.model", "tokenizer_config.json",
             "special_tokens_map.json"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# ----------------------------------------------------------------------------------------------------------------
# Preprocessing


class Preprocess:
    """PIL image -> [3, H, W] float tensor, the steps and order of a hub preprocessor_config.json (transformers'
    BitImageProcessor for DINOv2, SiglipImageProcessor for SigLIP):

      RGB          transparency composited onto white, as transformers does (a transparent PNG is seen on white).
      resize       size {"shortest_edge": s}: the short side to s, the long side to int(s * long / short);
                   size {"height", "width"}: to exactly that. With PIL's filter number `resample` (3 = bicubic),
                   on the 8-bit image.
      center crop  crop_size, top-left corner at ((H - h) // 2, (W - w) // 2).
      rescale      * rescale_factor (1/255), then normalize: (x - image_mean) / image_std per channel."""

    def __init__(self, config: dict):
        self.c = config
        if config.get("do_center_crop") and (config.get("crop_size") or {}).keys() != {"height", "width"}:
            raise ValueError(f"preprocessor_config.json: crop_size {config.get('crop_size')} needs height and width")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        c = self.c
        if c.get("do_convert_rgb", True):
            if "A" in image.getbands() or image.info.get("transparency") is not None:
                white = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(white, image.convert("RGBA"))
            image = image.convert("RGB")
        if c.get("do_resize", True):
            size, (W, H) = c["size"], image.size
            if "shortest_edge" in size:
                s = size["shortest_edge"]
                short, long = min(W, H), max(W, H)
                new_long = int(s * long / short)
                W, H = (s, new_long) if W <= H else (new_long, s)
            else:
                W, H = size["width"], size["height"]
            image = image.resize((W, H), resample=c.get("resample", 2))
        x = np.asarray(image, dtype=np.float32)
        if c.get("do_center_crop"):
            h, w = c["crop_size"]["height"], c["crop_size"]["width"]
            if h > x.shape[0] or w > x.shape[1]:
                raise ValueError(f"image {x.shape[1]}x{x.shape[0]} after resizing is smaller than the crop {w}x{h}")
            top, left = (x.shape[0] - h) // 2, (x.shape[1] - w) // 2
            x = x[top:top + h, left:left + w]
        if c.get("do_rescale", True):
            x = x * np.float32(c.get("rescale_factor", 1 / 255))
        if c.get("do_normalize", True):
            x = (x - np.float32(c["image_mean"])) / np.float32(c["image_std"])
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def read_preprocessor(folder, what):
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: {what} needs the checkpoint's preprocessor_config.json")
    with open(path) as f:
        return Preprocess(json.load(f))


# ----------------------------------------------------------------------------------------------------------------
# Scorers


def resolve(model, arg):
    """A local folder, or a hub id downloaded once into the HF cache (configs, tokenizer, safetensors only)."""
    if os.path.isdir(model):
        return model
    if os.path.exists(model) or model.startswith((".", "/")):
        raise FileNotFoundError(f"{arg} {model}: not a folder; pass a hub id or a folder in the hub layout")
    from product.hub import download
    return download(model, patterns=HUB_FILES)


def check_model_type(folder, expected, arg):
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{arg}: {path} is missing: pass a {expected} checkpoint in the hub layout")
    with open(path) as f:
        found = json.load(f).get("model_type")
    if found != expected:
        raise ValueError(f"{arg} {folder}: config.json says model_type {found!r}, not {expected!r}; "
                         f"pass a {'DINOv2' if expected == 'dinov2' else 'SigLIP'} checkpoint")


class Scorer:
    """Embeddings of images (DINOv2, SigLIP) and prompts (SigLIP), unit length, in batches."""

    def __init__(self, dino=DINO, siglip=SIGLIP, text=True, device="cpu", batch_size=16, dtype=torch.float32):
        self.device, self.batch_size, self.dtype = device, batch_size, dtype
        folder = resolve(dino, "--dino")
        check_model_type(folder, "dinov2", "--dino")
        self.dino, self.dino_pre = load_dinov2(folder, device, dtype), read_preprocessor(folder, "--dino")
        self.siglip = None
        if text:
            folder = resolve(siglip, "--siglip")
            check_model_type(folder, "siglip", "--siglip")
            self.siglip, self.tokenizer = load_siglip(folder, device, dtype)
            self.siglip_pre = read_preprocessor(folder, "--siglip")

    @torch.no_grad()
    def _embed(self, model, pre, paths):
        """Unit embeddings of image files, read a batch at a time (a sweep of 1024^2 PNGs does not fit in memory)."""
        out = []
        for i in range(0, len(paths), self.batch_size):
            pixels = torch.stack([pre(load_image(p)) for p in paths[i:i + self.batch_size]]).to(self.device, self.dtype)
            out.append(torch.nn.functional.normalize(model(pixels).float(), dim=-1).cpu())
        return torch.cat(out)

    def dino_embed(self, paths):
        return self._embed(self.dino, self.dino_pre, paths)

    def siglip_image_embed(self, paths):
        return self._embed(self.siglip.vision_model, self.siglip_pre, paths)

    @torch.no_grad()
    def siglip_text_embed(self, prompts):
        out = [self.siglip.text_model(self.tokenizer(prompts[i:i + self.batch_size]).to(self.device)).float().cpu()
               for i in range(0, len(prompts), self.batch_size)]
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)


def reference_level(ref_emb):
    """Leave-one-out: each reference's mean cosine to the others, averaged over the references. None for one photo."""
    n = len(ref_emb)
    if n < 2:
        return None
    sim = ref_emb @ ref_emb.T
    return ((sim.sum(1) - sim.diagonal()) / (n - 1)).mean().item()


# ----------------------------------------------------------------------------------------------------------------
# Reading samples


def list_images(folder):
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))


def sample_info(path, folder):
    """{'prompt', 'method', 'wcon'} of one sample: from sample.py's PNG text chunks, else a sidecar .txt.
    The method is the LoRA's training loss (dco / db / db-prior) as sample.py records it, else the folder's name."""
    meta = dict(getattr(load_image(path), "text", None) or {})
    prompt = meta.get("base_prompt") or meta.get("prompt")
    txt = os.path.splitext(path)[0] + ".txt"
    if prompt is None and os.path.isfile(txt):
        with open(txt, encoding="utf-8") as f:
            prompt = f.read().strip()
    method = meta.get("method") or os.path.basename(os.path.normpath(folder))
    return dict(prompt=prompt, method=method, wcon=meta.get("wcon", ""), grid="n" in meta)


def collect_samples(folders):
    """[(path, info)] of every sample image in the folders; sample.py's grid images (metadata 'n') are skipped."""
    samples = []
    for folder in folders:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"SAMPLES_DIR {folder}: no such folder")
        for path in list_images(folder):
            info = sample_info(path, folder)
            if not info["grid"]:
                samples.append((path, info))
    if not samples:
        raise FileNotFoundError(f"SAMPLES_DIR {' '.join(folders)}: no images ({', '.join(IMAGE_SUFFIXES)}) found; "
                                "point it at the folder sample.py wrote its images to")
    return samples


def load_image(path):
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except OSError as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise ValueError(f"{path}: not a readable image ({e}); remove or replace it") from None


# ----------------------------------------------------------------------------------------------------------------
# Scoring, grouping, output


def check_inputs(samples, reference_dir, text=True):
    """The reference photos' paths, after the checks that need no model: photos exist, every sample has a prompt."""
    if not os.path.isdir(reference_dir):
        raise FileNotFoundError(f"--reference {reference_dir}: no such folder")
    refs = list_images(reference_dir)
    if not refs:
        raise FileNotFoundError(f"--reference {reference_dir}: no images ({', '.join(IMAGE_SUFFIXES)}); pass the "
                                "folder of the subject's (or style's) training photos")
    missing = [p for p, info in samples if not info["prompt"]] if text else []
    if missing:
        raise ValueError(f"{missing[0]}: no prompt (no PNG metadata from sample.py, no sidecar .txt), and "
                         f"{len(missing)} image(s) like it; add a .txt with the prompt, or pass --no-text")
    return refs


def score(scorer, samples, reference_dir, text=True):
    """(rows, reference level): one row per sample with image_similarity and (if text) text_similarity."""
    refs = check_inputs(samples, reference_dir, text)
    paths = [p for p, _ in samples]
    ref_emb = scorer.dino_embed(refs)
    img_sim = (scorer.dino_embed(paths) @ ref_emb.T).mean(1)
    if text:
        prompts = [info["prompt"] for _, info in samples]
        txt_sim = (scorer.siglip_image_embed(paths) * scorer.siglip_text_embed(prompts)).sum(1)
    rows = []
    for k, (path, info) in enumerate(samples):
        rows.append(dict(file=path, image_similarity=img_sim[k].item(),
                         text_similarity=txt_sim[k].item() if text else None,
                         method=info["method"], wcon=info["wcon"], prompt=info["prompt"] or ""))
    return rows, reference_level(ref_emb)


def _wcon_key(w):
    try:
        return (0, float(w))
    except ValueError:
        return (1, w)


def group_means(rows):
    """{(method, wcon): (n, mean image_similarity, mean text_similarity or None)}, sorted by method then w_con."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["wcon"])].append(r)
    out = {}
    for key in sorted(groups, key=lambda k: (k[0], _wcon_key(k[1]))):
        g = groups[key]
        texts = [r["text_similarity"] for r in g if r["text_similarity"] is not None]
        out[key] = (len(g), sum(r["image_similarity"] for r in g) / len(g), sum(texts) / len(texts) if texts else None)
    return out


def _atomic(path, write):
    """write(tmp_path), then rename (files.atomic): a crash never leaves half a file; usual permissions."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic(path) as tmp:
        write(tmp)


def write_csv(rows, path):
    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["file", "image_similarity", "text_similarity", "method", "wcon", "prompt"])
            for r in rows:
                t = "" if r["text_similarity"] is None else f"{r['text_similarity']:.6f}"
                w.writerow([r["file"], f"{r['image_similarity']:.6f}", t, r["method"], r["wcon"], r["prompt"]])
    _atomic(path, write)


def pareto_plot(means, level, path, title=""):
    """x = text similarity, y = image similarity, one line per method through its w_con points (labelled), and the
    reference photos' leave-one-out level as a dashed horizontal line."""
    from product import plot

    methods = defaultdict(list)
    for (method, wcon), (_, img, txt) in means.items():
        methods[method].append((txt, img, wcon))
    series = [plot.Series(m, [(x, y) for x, y, _ in pts], labels=[f"{w}" if w != "" else "" for _, _, w in pts])
              for m, pts in methods.items()]
    if level is not None:
        xs = [x for s in series for x, _ in s.points]
        series.append(plot.Series("reference photos (leave-one-out)", [(min(xs), level), (max(xs), level)],
                                  color=(127, 127, 127), dashed=True))
    img = plot.lines(series, xlabel="image-text similarity (SigLIP)", ylabel="image similarity (DINOv2)",
                     title=title or "mean per method and w_con (points labelled by w_con)")
    save_image(img, path)  # in the format --plot's extension names


def report(means, level, text):
    lines = [f"{'method':<12} {'w_con':>6} {'n':>4} {'image sim':>10}" + (f" {'text sim':>9}" if text else "")]
    for (method, wcon), (n, img, txt) in means.items():
        lines.append(f"{method:<12} {wcon:>6} {n:>4} {img:>10.4f}" + (f" {txt:>9.4f}" if text else ""))
    ref = "n/a (one reference photo)" if level is None else f"{level:.4f}"
    lines.append(f"reference photos to each other (leave-one-out DINOv2 similarity): {ref}")
    return "\n".join(lines)


NUMBERS = {"batch_size": ">= 1"}  # the range of every numeric flag (errors.check_flags)


def parser():
    p = argparse.ArgumentParser(description="DINOv2 image similarity and SigLIP image-text similarity of samples, "
                                            "as the DCO paper measures them.")
    p.add_argument("samples", nargs="+", metavar="SAMPLES_DIR", help="folder(s) of sample images (sample.py's PNGs)")
    p.add_argument("--reference", required=True, metavar="REF_DIR", help="the subject's / style's reference photos")
    p.add_argument("--dino", default=DINO, help="DINOv2 hub id or local folder")
    p.add_argument("--siglip", default=SIGLIP, help="SigLIP hub id or local folder")
    p.add_argument("--no-text", action="store_true", help="image similarity only (no prompts needed)")
    p.add_argument("--output", default="scores.csv", help="the per-image CSV")
    p.add_argument("--plot", metavar="PNG", help="also draw the Pareto plot (text vs image similarity per w_con): "
                                                 ".png, .jpg or .webp")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precision", default="fp32", choices=list(DTYPES), help="DINOv2 and SigLIP weights (default "
                                                                                "fp32, as the paper's scores)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    errors.cli(lambda: run(args), memory_hint="lower --batch-size")


def run(args):
    text = not args.no_text
    errors.check_flags(vars(args), NUMBERS)
    if args.plot and not text:
        raise ValueError("--plot needs the text similarity for its x axis: drop --no-text")
    errors.check_device(args.device)
    check_writable(args.output, "--output")
    if args.plot:
        image_format(args.plot, "--plot")
        check_writable(args.plot, "--plot")
    samples = collect_samples(args.samples)  # cheap checks before loading models
    check_inputs(samples, args.reference, text)
    scorer = Scorer(args.dino, args.siglip, text, args.device, args.batch_size, DTYPES[args.precision])
    rows, level = score(scorer, samples, args.reference, text)
    write_csv(rows, args.output)
    means = group_means(rows)
    print(report(means, level, text))
    print(f"wrote {args.output} ({len(rows)} images)")
    if args.plot:
        pareto_plot(means, level, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
