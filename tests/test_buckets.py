"""--buckets (product/buckets.py): kohya's bucket sizes and nearest-aspect rule, each step's batch from one bucket as a
pure function of (seed, step), and train.py end to end on a folder of portrait, landscape and square images (tiny
SDXL, CPU, --resolution 64: buckets 32x96, 32x128, 64x64, 96x32, 128x32): the latents the cache holds have the
buckets' shapes, the UNet is told each image's true original size, crop and bucket, --resume is bit-identical, and
db-prior's class images come at the buckets' sizes (--grad-accum 2 == --batch-size 2 there too)."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import train
from product import buckets
from test_train import argv, make_images, read_log, run

# (w, h) of the files -> (bucket w, h; crop top, left in the image resized to cover the bucket), worked out by hand:
# 130x40 (w/h 3.25) -> 96x32 (3; not 128x32, 4), covered at scale 0.8 = 104x32, centre crop left (104 - 96) // 2 = 4
# 40x150 (0.267)    -> 32x128 (0.25; not 32x96, 0.333), scale 128/150 -> 34x128, left 1
# 70x70             -> 64x64, scale 64/70 -> 64x64, no crop
# 120x44 (2.73)     -> 96x32, scale 0.8 -> 96x35, top 1
FILES = ((130, 40), (40, 150), (70, 70), (120, 44))
WANT = {(40, 130): ((32, 96), (0, 4)), (150, 40): ((128, 32), (0, 1)), (70, 70): ((64, 64), (0, 0)),
        (44, 120): ((32, 96), (1, 0))}  # original (h, w) -> (bucket (h, w), crop (top, left))
PIXELS_PER_LATENT = 8  # the tiny SDXL's VAE, as SDXL's


def test_bucket_sizes_are_kohyas_for_sdxl():
    """At 1024 (step 64, sides 256..2048): every bucket has area <= 1024^2, sides multiples of 64, each width has
    the tallest height that fits (kohya's loop), and the sizes SDXL was fine-tuned on are among them."""
    assert buckets.bucket_step(1024, 32) == 64 and buckets.bucket_step(64, 32) == 32 and buckets.bucket_step(512, 32) == 64
    sizes = buckets.bucket_sizes(1024, 64)
    for h, w in sizes:
        assert h * w <= 1024 ** 2 and h % 64 == 0 and w % 64 == 0 and 256 <= min(h, w) and max(h, w) <= 2048
        assert (h + 64) * w > 1024 ** 2 or h + 64 > 2048 or (h, w) == (1024, 1024) or (w, h + 64) in sizes
    for w, h in ((1024, 1024), (1152, 896), (1216, 832), (1344, 768), (1536, 640), (896, 1152), (768, 1344)):
        assert (h, w) in sizes
    assert sizes == sorted(sizes, key=lambda hw: (hw[1], hw[0])) and len(set(sizes)) == len(sizes)
    assert buckets.bucket_sizes(64, 32) == [(96, 32), (128, 32), (64, 64), (32, 96), (32, 128)]


def test_each_image_goes_to_the_bucket_nearest_its_aspect_ratio():
    sizes, _ = buckets.training_sizes(list(WANT), 64, 32, True)
    assert sizes == [bucket for bucket, _ in WANT.values()]
    assert buckets.nearest_bucket((1000, 1500), buckets.bucket_sizes(1024, 64)) == (832, 1216)  # 3:2 photo
    assert buckets.training_sizes(list(WANT), 64, 32, False) == ([(64, 64)] * 4, [])  # off: squares
    with pytest.raises(ValueError, match=r"^--num-class-images 1: the bucket 32x128 \(w x h\) gets no class image"):
        buckets.training_sizes(list(WANT), 64, 32, True, num_class_images=1)


def test_every_step_draws_one_bucket_and_every_image_once_an_epoch():
    """3 buckets of 2, 1 and 4 images, batch 2: an epoch is 1 + 1 + 2 = 4 batches, each of one bucket; over an epoch
    every image is drawn (the 1-image bucket twice in its batch); the same (seed, step) draws the same batch."""
    groups = [[0, 5], [3], [1, 2, 4, 6]]
    steps = [train.batch_indices(s, 2, 7, 0, groups).tolist() for s in range(40)]
    assert all(any(set(b) <= set(g) for g in groups) for b in steps)
    for epoch in range(10):
        batches = steps[4 * epoch:4 * epoch + 4]
        assert sorted(sum(batches, [])) == [0, 1, 2, 3, 3, 4, 5, 6]
    assert steps == [train.batch_indices(s, 2, 7, 0, groups).tolist() for s in range(40)]
    assert steps != [train.batch_indices(s, 2, 7, 1, groups).tolist() for s in range(40)]  # the seed matters
    assert len({tuple(map(tuple, steps[i:i + 4])) for i in range(0, 40, 4)}) > 1  # the order changes per epoch


def spy_on_steps(monkeypatch):
    """Record what the UNet is given each step: [(x_t shape, time_ids rows)] per micro-batch."""
    seen, step = [], train.train_step

    def spy(unet, opt, scaler, batches, *args, **kwargs):
        batches = list(batches)
        seen.append([(tuple(b.xt.shape), b.time_ids.tolist()) for b in batches])
        return step(unet, opt, scaler, iter(batches), *args, **kwargs)
    monkeypatch.setattr(train, "train_step", spy)
    return seen


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("buckets") / "dog", sizes=FILES)


def test_mixed_folder_trains_at_its_buckets(tiny_sdxl, mixed, tmp_path, monkeypatch):
    """Centre crops: each image VAE-encoded once, at its bucket's shape; every batch is of one bucket, and each
    image's time ids are its true original size, its crop and its bucket: (h, w, top, left, bucket h, w)."""
    seen = spy_on_steps(monkeypatch)
    result, _ = run(*argv(mixed, tiny_sdxl[0], tmp_path / "out", "--buckets", "--batch-size", "2", "--steps", "6",
                          "--checkpoint-every", "0"))
    cache = result["data"].crops.cache
    assert sorted(k[0] for k in cache) == [0, 1, 2, 3]  # once each: nothing is random
    for (i, top, left, flip), (mean, _, time_ids) in cache.items():
        original = tuple(time_ids[:2].int().tolist())
        (bh, bw), crop = WANT[original]
        assert mean.shape == (1, 4, bh // PIXELS_PER_LATENT, bw // PIXELS_PER_LATENT) and not flip
        assert time_ids.tolist() == [*original, *crop, bh, bw] and (top, left) == crop
    assert len(seen) == 6 and {len(ids) for (_, ids), in seen} == {2}
    for (shape, ids), in seen:
        (bh, bw), crop = WANT[tuple(int(x) for x in ids[0][:2])]
        assert shape == (2, 4, bh // 8, bw // 8)  # one bucket per batch
        assert all(row == [*row[:2], *WANT[tuple(int(x) for x in row[:2])][1], bh, bw] for row in ids)
    assert {shape for (shape, _), in seen} > {(2, 4, 4, 12)}  # more than one bucket was trained
    log = read_log(tmp_path / "out")
    assert len(log) == 6 and all(math.isfinite(r["loss"]) for r in log)
    assert json.loads((tmp_path / "out" / "train_config.json").read_text())["buckets"] is True


def test_random_crops_and_flips_stay_in_their_bucket(tiny_sdxl, mixed, tmp_path):
    """--crop random --random-flip: crops anywhere inside the image resized to cover its bucket, the time ids say
    where (in the flipped image when flipped), and every cached latent has its bucket's shape."""
    result, _ = run(*argv(mixed, tiny_sdxl[0], tmp_path / "out", "--buckets", "--crop", "random", "--random-flip",
                          "--batch-size", "2", "--steps", "10", "--checkpoint-every", "0"))
    cache = result["data"].crops.cache
    resized = {(40, 130): (32, 104), (150, 40): (128, 34), (70, 70): (64, 64), (44, 120): (35, 96)}  # as WANT's notes
    for (i, top, left, flip), (mean, _, ids) in cache.items():
        original = tuple(ids[:2].int().tolist())
        (bh, bw), (rh, rw) = WANT[original][0], resized[original]
        assert mean.shape == (1, 4, bh // 8, bw // 8) and ids.tolist() == [*original, top, left, bh, bw]
        assert 0 <= top <= rh - bh and 0 <= left <= rw - bw
    assert {k[3] for k in cache} == {True, False} and len({k[1:3] for k in cache if k[0] == 0}) > 1


def test_resume_with_buckets_is_bit_identical(tiny_sdxl, mixed, tmp_path):
    """--buckets with random crops and flips, batch 2: 2 steps, --resume to 4 == 4 steps straight, bit for bit."""
    extra = ("--buckets", "--crop", "random", "--random-flip", "--batch-size", "2", "--checkpoint-every", "2")
    run(*argv(mixed, tiny_sdxl[0], tmp_path / "straight", *extra))
    run(*argv(mixed, tiny_sdxl[0], tmp_path / "resumed", *extra), "--steps", "2")
    run(*argv(mixed, tiny_sdxl[0], tmp_path / "resumed", *extra), "--resume")
    for name in ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors", "checkpoint-4/optimizer.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert read_log(tmp_path / "straight") == [{**r, "time": s["time"]} for r, s in
                                              zip(read_log(tmp_path / "resumed"), read_log(tmp_path / "straight"))]


def test_a_run_from_before_buckets_resumes_square(tiny_sdxl, mixed, tmp_path):
    """A train_config.json without the 'buckets' key (written before --buckets existed) trained square crops:
    --resume --buckets is refused in one line, --resume alone continues it."""
    out = tmp_path / "out"
    run(*argv(mixed, tiny_sdxl[0], out, "--checkpoint-every", "2", "--steps", "2"))
    config = json.loads((out / "train_config.json").read_text())
    del config["buckets"]
    (out / "train_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as e:
        train.main(argv(mixed, tiny_sdxl[0], out, "--checkpoint-every", "2", "--resume", "--buckets"))
    assert str(e.value.code).startswith("error: --resume: buckets was False") and "\n" not in str(e.value.code)
    result, _ = run(*argv(mixed, tiny_sdxl[0], out, "--checkpoint-every", "2", "--resume"))
    assert {mean.shape for mean, _, _ in result["data"].crops.cache.values()} == {(1, 4, 8, 8)}
    assert len(read_log(out)) == 4


def test_db_prior_class_images_come_at_the_buckets_sizes(tiny_sdxl, mixed, tmp_path, monkeypatch):
    """db-prior --buckets: class image j is generated at the bucket of image j % n; each batch is [instance; class]
    of one size; --grad-accum 2 trains as --batch-size 2 (the same draws, the LoRA within 1e-5)."""
    seen = spy_on_steps(monkeypatch)
    for out, extra in (("accum", ["--grad-accum", "2"]), ("batch", ["--batch-size", "2"])):
        run(*argv(mixed, tiny_sdxl[0], tmp_path / out, "--buckets", "--loss", "db-prior", "--num-class-images", "5",
                  "--steps", "3", "--sample-steps", "2", "--checkpoint-every", "0", "--class-dir", str(tmp_path / "cls"),
                  *extra))
    from PIL import Image
    bucket_of = [WANT[o][0] for o in ((40, 130), (150, 40), (70, 70), (44, 120))]
    for j in range(5):
        assert Image.open(tmp_path / "cls" / f"{j:04d}.png").size[::-1] == bucket_of[j % 4]
    assert json.loads((tmp_path / "cls" / "info.json").read_text())["sizes"] == [list(bucket_of[j % 4]) for j in range(5)]
    for micro in seen:
        for shape, ids in micro:
            assert len({tuple(row[4:]) for row in ids}) == 1 and shape[2:] == (ids[0][4] // 8, ids[0][5] // 8)
    a, b = read_log(tmp_path / "accum"), read_log(tmp_path / "batch")
    assert [r["t"] for r in a] == [r["t"] for r in b] and len(a[0]["t"]) == 2
    a, b = load_file(tmp_path / "accum" / train.run_folder.PEFT_FILE), load_file(tmp_path / "batch" / train.run_folder.PEFT_FILE)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"db-prior --buckets, grad-accum 2 vs batch 2: LoRA max abs diff {diff:.3g}")
    assert diff <= 1e-5
