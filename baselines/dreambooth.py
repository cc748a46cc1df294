"""DreamBooth with prior preservation's class images (Ruiz et al. 2023, Sec. 4.2), for `train.py --loss db-prior`.

The baseline DCO is compared with: besides the instance images, it trains on images of the class ("a photo of a
dog") that the *base* model generated, so the class word keeps its meaning (dco.prior_preservation_loss). They are
made once, before any LoRA or new token exists, and cached as PNGs with the settings that made them.
"""
import os
from pathlib import Path

from tqdm import tqdm

from product import distributed
from product.files import read_json, save_image, write_json
from sample import generate_while_training


def check_class_dir(folder, prompt, model, resolution, sizes=None):
    """`folder` holds no class images made with other settings -> (its info.json path, the info to write there).
    Called again before anything is written, when the bucket sizes are not known yet (sizes None: not compared)."""
    info, info_path = {"prompt": prompt, "model": model, "resolution": resolution}, Path(folder, "info.json")
    if any(tuple(s) != (resolution, resolution) for s in sizes or ()):  # --buckets; square folders keep their info
        info["sizes"] = [list(s) for s in sizes]
    old = read_json(info_path) if info_path.is_file() else info
    if sizes is None:
        old = {k: v for k, v in old.items() if k != "sizes"}
    if old != info:
        raise ValueError(f"--class-dir {folder}: holds class images of another prompt/model/resolution (or bucket "
                         "sizes); pass another --class-dir")
    return info_path, info


def class_images(sd, prompt, folder, sizes, model, resolution, seed=0, steps=25, master=True):
    """The base model's own images of the class, one per (h, w) of `sizes` -> their paths in `folder`, generated
    where missing. R x R each, or with train.py --buckets at the buckets' sizes (product/buckets.py: training_sizes):
    the model composes each class image for its shape rather than having a square one cropped. Under torchrun
    rank 0 makes them while the others wait, then every process reads them."""
    paths = [os.path.join(folder, f"{i:04d}.png") for i in range(len(sizes))]
    if master:
        os.makedirs(folder, exist_ok=True)
        write_json(*check_class_dir(folder, prompt, model, resolution, sizes))
        for i in tqdm([i for i, p in enumerate(paths) if not os.path.exists(p)], desc="class images"):
            (image,) = generate_while_training(sd, [prompt], resolution, steps, seed=seed + i, size=sizes[i])
            save_image(image, paths[i])
    distributed.barrier()
    return paths
