"""The user's main job at SDXL's real size, end to end, on this CPU: `--model sdxl-random` (sdxl.py) is SDXL base's
every real config with random weights, so train.py, sample.py and merge.py run the true shapes -- the 2.6 B-parameter
UNet, both text encoders with their 49,408-row tables and a learned token, the VAE, the 560 LoRA layers -- with no
download. Each tool runs as a subprocess, as a user runs it; we check every file it writes has the real size, and
measure each process's peak resident set (os.wait4's rusage) and the model's build time (sdxl.py prints it).

Images are 256^2 (32^2 latents; 128^2 in fp32 on a CPU without bf16, see PRECISION) so the whole module takes
minutes on 2 cores; the memory figures at 512^2 and 1024^2 are in docs/benchmarks.md (python -m benchmarks.real_size).
"""
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from lora import UNET_KOHYA, inject_lora, kohya_name, lora_modules, save_lora_kohya, save_lora_peft
from unet_loader import UNet

pytestmark = pytest.mark.real_size

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "sdxl-base-1.0"
GiB = 2 ** 30
MAX_RSS, MAX_BUILD = 16 * GiB, 60.0  # the targets for these tests
# bf16 where the CPU computes it (AVX512-BF16/AMX); elsewhere (an AVX2-only CPU such as this AMD EPYC) a bf16 matmul
# falls back to reference loops ~90x slower than fp32, and the module would take hours: fp32, within the same 16 GiB.
# There the images are 128^2 (16^2 latents, still every level of the UNet): the same files, a quarter of the compute.
PRECISION = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
RES = 256 if PRECISION == "bf16" else 128
RUNS = {}  # tool run -> (peak RSS bytes, build seconds, wall seconds), printed at the end of the module


def cli(name, script, *args):
    """Run `python script args` like a user; -> stderr. Records the child's own peak RSS (ru_maxrss of exactly
    this pid, from wait4) and the build time sdxl.py reports."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        # Files, not pipes: nothing to read while it runs, so we can reap the child ourselves with wait4.
        p = subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env,
                             stdout=out, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        out, err = out.read(), err.read()
    assert p.returncode == 0, f"{script} failed:\n{out[-3000:]}\n{err[-3000:]}"
    builds = [float(s) for s in re.findall(r"RANDOM weights, built in ([\d.]+) s", err)]
    RUNS[name] = (usage.ru_maxrss * 1024, max(builds, default=None), time.perf_counter() - t0)
    print(f"{name}: peak RSS {usage.ru_maxrss / 2 ** 20:.2f} GiB, build {builds} s, "
          f"wall {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return err


def make_images(folder, captions=None, seed=0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate([(300, 256), (256, 320), (280, 280)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        if captions:
            (folder / f"{i}.txt").write_text(captions)
    return folder


def train_args(images, out, *extra):
    return ["--images", images, "--model", "sdxl-random", "--output", out, "--resolution", RES, "--device", "cpu",
            "--precision", PRECISION, *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Subject (DCO + the token <x>, 2 steps, a checkpoint, samples), --resume for a 3rd step, a consistency-guided
    sample, and the merge of the subject with a style LoRA: 3 model builds."""
    root = tmp_path_factory.mktemp("real_size")
    subject, style = root / "subject", root / "style"
    cli("train", "train.py", *train_args(make_images(root / "x"), subject, "--token", "<x>", "--init-word", "x",
                                         "--steps", 2, "--checkpoint-every", 2, "--sample-steps", 2))
    cli("train --resume", "train.py", *train_args(root / "x", subject, "--token", "<x>", "--init-word", "x",
                                                  "--steps", 3, "--checkpoint-every", 2, "--sample-steps", 0,
                                                  "--resume"))
    write_style_lora(style)
    # fp8 frozen weights (product/float8.py) at real size: the consistency-guided sample, and the README's dry run
    # on a folder named dog (3 tokens in the byte-level tokenizer: the token <dog> must still be made)
    cli("sample", "sample.py", "--model", "sdxl-random", "--lora", subject, "--wcon", "0,3", "--prompt",
        "a photo of <x>", "--height", RES, "--steps", 2, "--n", 1, "--precision", "fp8", "--device", "cpu",
        "--output", root / "grid.png")
    cli("train dry run fp8", "train.py", "--images", make_images(root / "dog"), "--model", "sdxl-random",
        "--gradient-checkpointing", "--steps", 1, "--sample-steps", 0, "--checkpoint-every", 0, "--precision", "fp8",
        "--resolution", RES, "--output", root / "dry-run")
    cli("merge", "merge.py", subject, style, "--output", root / "merged")
    cli("merge --analyze", "merge.py", "--analyze", subject, style, "--csv", root / "interference.csv")
    yield root
    for name, (rss, build, wall) in RUNS.items():
        print(f"{name:16s} peak RSS {rss / GiB:5.2f} GiB  build {build or 0:4.1f} s  wall {wall:5.0f} s")


def write_style_lora(folder):
    """A style LoRA as train.py writes one without a token (both files, no learned_embeds), rank 4 on the real
    UNet's 560 attention projections. Written directly rather than trained: merge.py reads only files, and a
    training run (model build + a step) would add a minute to CI for nothing merge.py can see."""
    config = json.loads((CONFIGS / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet(config)
    inject_lora(unet, rank=4)
    g = torch.Generator().manual_seed(1)
    layers = {n: (torch.randn(m.lora_down.weight.shape, generator=g) * 0.01,
                  torch.randn(m.lora_up.weight.shape, generator=g) * 0.01, 4.0) for n, m in lora_modules(unet).items()}
    meta = {"base_model": "sdxl-random", "rank": "4", "alpha": "4.0", "loss": "dco", "token": "", "init_word": ""}
    folder.mkdir()
    save_lora_peft(folder, {"unet": layers}, meta)
    save_lora_kohya(folder, {"unet": layers}, config, meta)


def keys_and_meta(path):
    with safe_open(path, "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata()


def diffusers_linears():
    """{name: (out, in)} of every Linear of diffusers' own real-size UNet2DConditionModel, built on the meta device."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        ref = UNet2DConditionModel.from_config(json.loads((CONFIGS / "unet" / "config.json").read_text()))
    return {n: tuple(m.weight.shape) for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear)}


def kohya_reference_names():
    """The 722 kohya names of every Linear in SDXL's transformer blocks, pinned by the digest test_lora.py checks."""
    config = json.loads((CONFIGS / "unet" / "config.json").read_text())
    with torch.device("meta"):
        names = inject_lora(UNet(config), rank=1, targets=UNET_KOHYA)
    kohya = {kohya_name("unet", n, config): n for n in names}
    digest = hashlib.sha256(("\n".join(sorted(kohya)) + "\n").encode()).hexdigest()
    assert digest == "b5a147c01a66b153ee2f8bbdd1a37474eb54e0bde3b5a17f03d3ba4c8bd536e2"
    return kohya


def check_peft(path, rank):
    """560 layers, each naming a Linear of diffusers' real UNet with the LoRA's shapes matching it."""
    keys, meta = keys_and_meta(path)
    linears = diffusers_linears()
    modules = {k.removeprefix("unet.").rsplit(".lora_", 1)[0] for k in keys}
    assert len(keys) == 2 * 560 and len(modules) == 560
    for m in modules:
        out_f, in_f = linears[m]  # KeyError: not a Linear of diffusers' UNet
        assert keys[f"unet.{m}.lora_A.weight"] == (rank, in_f)
        assert keys[f"unet.{m}.lora_B.weight"] == (out_f, rank)
    return meta


def test_build_time_and_peak_memory(runs):
    for name, (rss, build, _) in RUNS.items():
        assert rss <= MAX_RSS, f"{name}: peak RSS {rss / GiB:.2f} GiB"
        if name.startswith(("train", "sample")):
            assert build is not None, f"{name}: no build time reported"
            if build > MAX_BUILD:  # a target of the benchmark, not a timed test (the issue): say it, do not fail
                warnings.warn(f"{name}: the random real-size model built in {build:.0f} s "
                              f"(target <= {MAX_BUILD:.0f} s)")


def test_train_writes_real_size_files(runs):
    out = runs / "subject"
    meta = check_peft(out / "pytorch_lora_weights.safetensors", rank=32)
    assert meta["base_model"] == "sdxl-random" and meta["token"] == '["<x>"]' and meta["init_word"] == '["x"]'
    kohya, _ = keys_and_meta(out / "lora_kohya.safetensors")
    names = {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in kohya}
    reference = kohya_reference_names()
    assert names <= reference.keys() and len(names) == 560 and len(kohya) == 3 * 560
    assert {reference[n].rsplit(".", 1)[-1] if not reference[n].endswith("to_out.0") else "to_out.0"
            for n in names} == {"to_q", "to_k", "to_v", "to_out.0"}  # exactly the attention projections
    embeds, _ = keys_and_meta(out / "learned_embeds.safetensors")
    assert embeds == {"clip_l": (1, 768), "clip_g": (1, 1280)}
    for step in (2, 3):
        ckpt = out / f"checkpoint-{step}"
        check_peft(ckpt / "pytorch_lora_weights.safetensors", rank=32)
        opt, _ = keys_and_meta(ckpt / "optimizer.safetensors")
        assert len(opt) > 2 * 2 * 560  # exp_avg and exp_avg_sq of every LoRA tensor (+ the token rows, steps)
        assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == step
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [0, 1, 2]
    samples = sorted((out / "samples").glob("step*.png"))
    assert [s.name for s in samples] == ["step000002-0.png", "step000002-1.png"]
    assert (out / "report.png").is_file() and (out / "samples" / "progress.png").is_file()
    assert all(Image.open(s).size == (RES, RES) for s in samples)
    config = json.loads((out / "train_config.json").read_text())
    assert config["tokens"] == ["<x>"] and config["resolution"] == RES


def test_dry_run_on_a_folder_named_dog_with_fp8(runs):
    config = json.loads((runs / "dry-run" / "train_config.json").read_text())
    assert config["tokens"] == ["<dog>"] and config["precision"] == "fp8"
    assert (runs / "dry-run" / "learned_embeds.safetensors").is_file()


def test_sample_consistency_guided(runs):
    grid = Image.open(runs / "grid.png")
    images = [Image.open(runs / f"grid_wcon{w}_0.png") for w in (0, 3)]
    assert all(im.size == (RES, RES) for im in images) and grid.size[0] >= RES and grid.size[1] >= 2 * RES
    a, b = (np.asarray(im, dtype=np.float32) for im in images)
    assert np.abs(a - b).mean() > 0  # w_con 3 changed the image: the LoRA and the token were used


def test_merge_and_analyze(runs):
    merged = runs / "merged"
    meta = check_peft(merged / "pytorch_lora_weights.safetensors", rank=32 + 4)  # ranks stacked, exact
    assert meta["token"] == '["<x>"]'
    embeds, _ = keys_and_meta(merged / "learned_embeds.safetensors")
    assert embeds == {"clip_l": (1, 768), "clip_g": (1, 1280)}
    kohya, _ = keys_and_meta(merged / "lora_kohya.safetensors")
    assert len(kohya) == 3 * 560
    rows = (runs / "interference.csv").read_text().splitlines()
    assert len(rows) >= 1 + 560  # a header and (at least) one row per shared layer
