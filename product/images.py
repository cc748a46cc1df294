"""Training images: reading, resizing, cropping, SDXL's micro-conditioning, and their latents (VAE-encoded once).

train.py's data, as files and pixels: which files of a folder are images, the caption beside each one, the crop a
step trains on, and the caches that send every image (or every random crop of one) through the VAE only once.
"""
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from product.files import read_text

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
RESAMPLE = {"lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR}


def list_images(folder):
    """A folder of training images -> (their paths, sorted; their captions, None where no NAME.txt is beside). The
    files that are not used are named in one line, with why (hidden files and captions beside their image are not
    listed)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--images {folder}: no such folder")
    names = sorted(os.listdir(folder))
    paths = [os.path.join(folder, f) for f in names if f.lower().endswith(IMAGE_EXTS)]
    if not paths:
        raise ValueError(f"--images {folder}: no images ({', '.join(IMAGE_EXTS)}) in this folder")
    sidecars = [Path(p).with_suffix(".txt") for p in paths]  # kohya's convention: dog1.txt describes dog1.jpg
    unused = [f"{f} ({why})" for f in names if (why := unused_because(folder, f, {s.name for s in sidecars}))]
    if unused and os.environ.get("RANK", "0") == "0":  # under torchrun: said once, by rank 0
        print(f"notice: --images {folder}: {len(paths)} images; not used: {', '.join(unused)}", file=sys.stderr)
    return paths, [caption_text(read_text(s)) if s.is_file() else None for s in sidecars]


def unused_because(folder, name, captions):
    """Why the file `name` of an images folder is not used (None: it is, or it is hidden)."""
    if name.startswith(".") or name.lower().endswith(IMAGE_EXTS) or name in captions:
        return None
    if os.path.isdir(os.path.join(folder, name)):
        return "a folder: not searched"
    if name.lower().endswith(".txt"):
        return "a caption of no image"
    return f"not one of {' '.join(IMAGE_EXTS)}"


def caption_text(text):
    """A caption file's text as the prompt it is: every run of white space (newlines, tabs) folded into one space,
    none at the ends (read_text already dropped a byte-order mark). CLIP's tokenizer folds white space too, so the
    tokens stay the same; what changes is that train_config.json, the log and the sample prompts hold one line."""
    return " ".join(text.split())


def read_image(path):
    """An image file as an RGB PIL image, upright (EXIF orientation applied); a bad file is a ValueError naming it."""
    try:
        return ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read this image ({e}); fix or remove it")


def image_size(path):
    """(h, w) of an image as it trains (upright), read whole so that a truncated file fails now."""
    w, h = read_image(path).size
    return h, w


def load_resized(path, size, resample="lanczos"):
    """-> (uint8 [3,h,w] resized to cover `size` (h, w), or R x R for an int R: the shorter side to R; (original h,
    w)). Covering: the scale that makes both sides at least the target's, so a crop of the target size fits."""
    th, tw = (size, size) if isinstance(size, int) else size
    img = read_image(path)
    w, h = img.size
    s = max(th / h, tw / w)
    nw, nh = max(tw, round(w * s)), max(th, round(h * s))
    img = img.resize((nw, nh), RESAMPLE[resample])
    return torch.from_numpy(np.array(img)).permute(2, 0, 1), (h, w)


def crop(image, size, target, top, left, fixed_time_ids=False):
    """-> (uint8 [3,th,tw] crop at (top, left), time_ids [6]); target: (th, tw), or R for R x R. time_ids is SDXL's
    micro-conditioning (original h, w before resizing, crop top, left, target h, w): the model is told the crop. The
    official code always tells it (R, R, 0, 0, R, R) instead (customize.py:700-705): fixed_time_ids=True."""
    th, tw = (target, target) if isinstance(target, int) else target
    ids = [th, tw, 0, 0, th, tw] if fixed_time_ids else [*size, top, left, th, tw]
    return image[:, top:top + th, left:left + tw], torch.tensor(ids)


def load_image(path, resolution, resample="lanczos", fixed_time_ids=False):
    """-> (uint8 [3,R,R], time_ids [6]): shorter side resized to R, centre crop."""
    image, size = load_resized(path, resolution, resample)
    top, left = (image.shape[1] - resolution) // 2, (image.shape[2] - resolution) // 2
    return crop(image, size, resolution, top, left, fixed_time_ids)


@torch.no_grad()
def encode_images(vae, images):
    """Each image through the VAE once -> (means, logvars) of its latent Gaussian, fp32 on the CPU. A fresh latent
    is drawn from it every step: the same distribution as encoding every step (the official code,
    customize.py:844), at none of the cost. One image at a time: the VAE's activations at 1024^2 take GBs."""
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    stats = [vae.encode((x[None].float() / 127.5 - 1).to(device, dtype)) for x in images]
    return torch.cat([m.float().cpu() for m, _ in stats]), torch.cat([v.float().cpu() for _, v in stats])


class CropCache:
    """Every (image, crop, flip) that a step draws goes through the VAE once, the first time it is drawn, and its
    latent Gaussian is kept. Exact -- each crop is encoded as itself, not cut out of a bigger latent -- and as cheap
    as encoding each image once when nothing is random (then encode_all() encodes them up front).

    sizes: the (h, w) each image trains at (--buckets: its bucket, product/buckets.py); default R x R. Each image is
    resized to cover its size and cropped to it: in the centre, or with random_crop anywhere (--crop random), and with
    flip mirrored with probability 1/2 (--random-flip)."""

    def __init__(self, vae, paths, resolution, resample, random_crop, flip, fixed_time_ids, sizes=None):
        self.vae, self.random_crop, self.flip, self.fixed = vae, random_crop, flip, fixed_time_ids
        self.sizes = list(sizes or [(resolution, resolution)] * len(paths))
        self.images = [load_resized(p, size, resample) for p, size in zip(paths, self.sizes)]
        self.cache = {}

    def get(self, idx, generator=None):
        """(means, logvars, time_ids) of the images idx (all of one size), each with a crop and flip drawn from
        `generator` (unused when neither is random)."""
        out = []
        for i in idx.tolist():
            (image, size), (th, tw) = self.images[i], self.sizes[i]
            h, w = image.shape[1] - th, image.shape[2] - tw
            if self.random_crop:
                top, left = (int(torch.randint(d + 1, (1,), generator=generator)) for d in (h, w))
            else:
                top, left = h // 2, w // 2
            flip = self.flip and bool(torch.rand(1, generator=generator) < 0.5)
            key = (i, top, left, flip)
            if key not in self.cache:  # flip first, then crop in the flipped image, as diffusers' SDXL scripts
                x, time_ids = crop(image.flip(-1) if flip else image, size, (th, tw), top, left, self.fixed)
                mean, logvar = encode_images(self.vae, [x])
                self.cache[key] = mean, logvar, time_ids.float()
            out.append(self.cache[key])
        return (torch.cat([m for m, _, _ in out]), torch.cat([v for _, v, _ in out]),
                torch.stack([t for _, _, t in out]))

    @property
    def random(self):
        return self.random_crop or self.flip

    def encode_all(self):
        """Each image's one crop through the VAE now (nothing is random): the VAE is not needed again."""
        for i in range(len(self.images)):
            self.get(torch.tensor([i]))
