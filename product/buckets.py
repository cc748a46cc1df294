"""Aspect-ratio buckets (train.py --buckets): train each image at the size nearest its own shape, by kohya sd-scripts'
rule, instead of cropping every image to a square.

A bucket is a training size (h, w) with h * w <= R^2 (R = --resolution) and both sides multiples of a step. The sizes
are kohya's (library/model_util.py make_bucket_resolutions): the square sqrt(R^2) rounded down to the step, and for
every width from the smallest side to the largest the tallest height that keeps the area (and its transpose).
    step: the smallest multiple of the model's downsampling (32 for SDXL: VAE 8 x UNet 4) that is >= min(64, R/8):
          kohya's default 64 at SDXL's sizes (R >= 512); 32 for the tiny models at R = 64..256
    sides: from R/4 to 2R, rounded to the step (256..2048 at 1024, as SDXL LoRAs are bucketed in kohya)
An image goes to the bucket whose aspect ratio w/h is nearest its own (|w_b/h_b - w/h| smallest, the first of equals
in kohya's order), is resized to cover the bucket and cropped to it (product/images.py, as --crop says).

Each step's batch comes from one bucket (tensors of one size), drawn as a pure function of (seed, step) so --resume
and torchrun's global batch (train.get_batch) work as without buckets: step_bucket says which bucket and how many
batches it gave before, and train.batch_indices draws that bucket's next slice of its own shuffled images.
"""
import math

import torch


def bucket_step(resolution, factor):
    """The multiple the bucket sides are of (see the top of this file)."""
    return factor * max(1, math.ceil(min(64, resolution / 8) / factor))


def bucket_sizes(resolution, step):
    """Every bucket (h, w) for --resolution R, in kohya's order (by width, then height)."""
    smallest = max(step, resolution // 4 // step * step)  # kohya rounds min down and max up to the step
    largest = math.ceil(2 * resolution / step) * step
    area = resolution * resolution
    side = math.isqrt(area) // step * step
    sizes = {(side, side)}
    for w in range(smallest, largest + 1, step):
        h = min(largest, area // w // step * step)
        if h >= smallest:
            sizes |= {(h, w), (w, h)}
    return sorted(sizes, key=lambda hw: (hw[1], hw[0]))


def nearest_bucket(size, buckets):
    """The bucket nearest an image's (h, w) in aspect ratio w/h (kohya's BucketManager.select_bucket)."""
    h, w = size
    return min(buckets, key=lambda b: abs(b[1] / b[0] - w / h))


def training_sizes(originals, resolution, factor, bucketed, num_class_images=0):
    """-> (the size (h, w) each image trains at, the size of each db-prior class image): R x R without --buckets;
    with them each image's bucket, and class image j the bucket of image j % n, so the class images spread over the
    buckets as the images do (each batch is [its bucket's images; class images of the same size])."""
    if not bucketed:
        return [(resolution, resolution)] * len(originals), [(resolution, resolution)] * num_class_images
    buckets = bucket_sizes(resolution, bucket_step(resolution, factor))
    sizes = [nearest_bucket(s, buckets) for s in originals]
    class_sizes = [sizes[j % len(sizes)] for j in range(num_class_images)]
    missing = set(sizes) - set(class_sizes) if num_class_images else set()  # db-prior: class images for each bucket
    for bucket in sorted(missing, key=sizes.index):
        first = sizes.index(bucket)
        raise ValueError(f"--num-class-images {num_class_images}: the bucket {bucket[1]}x{bucket[0]} (w x h) gets no "
                         f"class image (its first image is number {first + 1}); pass at least {first + 1}")
    return sizes, class_sizes


def groups(sizes):
    """The images of each bucket: [[indices of one size], ...], the buckets in kohya's order."""
    members = {}
    for i, size in enumerate(sizes):
        members.setdefault(size, []).append(i)
    return [members[s] for s in sorted(members, key=lambda hw: (hw[1], hw[0]))]


def step_bucket(step, batch_size, counts, rng):
    """Which bucket a step's batch of `batch_size` comes from -> (bucket b, how many batches b gave before this step).

    An epoch holds ceil(n_b / batch_size) batches of each bucket b (n_b = counts[b]: about one look at every image)
    in an order shuffled per epoch by rng("buckets", epoch): a pure function of the step, so a resumed run draws the
    same buckets as one that never stopped. A bucket with fewer images than the batch repeats some of them."""
    per_epoch = [math.ceil(n / batch_size) for n in counts]
    epoch, position = divmod(step, sum(per_epoch))
    order = torch.cat([torch.full((k,), b) for b, k in enumerate(per_epoch)])
    order = order[torch.randperm(len(order), generator=rng("buckets", epoch))]
    b = int(order[position])
    return b, epoch * per_epoch[b] + int((order[:position] == b).sum())


def describe(sizes):
    """'32x96: 1, 64x64: 2' -- the buckets in use (width x height, as kohya prints them) and their images' count."""
    return ", ".join(f"{sizes[m[0]][1]}x{sizes[m[0]][0]}: {len(m)}" for m in groups(sizes))
