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


def class_images(sd, prompt, folder, sizes, model, resolution, seed=0, steps=25, master=True):
    """The base model's own images of the class, one per (h, w) of `sizes` -> their paths in `folder`, generated
    where missing. R x R each, or with train.py --buckets at the buckets' sizes (product/buckets.py: training_sizes):
    the model composes each class image for its shape rather than having a square one cropped. Under torchrun
    rank 0 makes them while the others wait, then every process reads them."""
    paths = [os.path.join(folder, f"{i:04d}.png") for i in range(len(sizes))]
    if master:
        os.makedirs(folder, exist_ok=True)
        info, info_path = {"prompt": prompt, "model": model, "resolution": resolution}, Path(folder, "info.json")
        if any(tuple(s) != (resolution, resolution) for s in sizes):  # --buckets; square folders keep their info
            info["sizes"] = [list(s) for s in sizes]
        if info_path.is_file() and read_json(info_path) != info:
            raise ValueError(f"{folder} holds class images of another prompt/model/resolution (or bucket sizes); "
                             "pass another --class-dir")
        write_json(info_path, info)
        for i in tqdm([i for i, p in enumerate(paths) if not os.path.exists(p)], desc="class images"):
            (image,) = generate_while_training(sd, [prompt], resolution, steps, seed=seed + i, size=sizes[i])
            save_image(image, paths[i])
    distributed.barrier()
    return paths
