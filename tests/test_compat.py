"""What SDXL users already have: the official DCO code's LoRA + learned_embeds files, diffusers' argmax pooling of a
learned token, another VAE, full-precision weights, the official recipe's data flags (random crop, flip, bilinear
resize, fixed micro-conditioning). Tiny random SDXL (tests/tiny_sdxl.py), CPU, fp32."""
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import train
from sdxl import load_sdxl
from test_train import argv, make_images, read_log, run

ROOT = Path(__file__).resolve().parent.parent
H = W = 64
PROMPT = "a <dog> playing saxophone in sticker style"


@pytest.fixture(scope="module")
def official(tiny_sdxl, tmp_path_factory):
    """A LoRA folder written exactly as the official code writes it (kyungmnlee/dco@164ae17 customize.py:554-588):
    peft's LoRA state dict converted to diffusers' names and saved by StableDiffusionXLPipeline.save_lora_weights,
    and learned_embeds.safetensors = {"clip_l": [1, d], "clip_g": [1, d]} saved with no metadata."""
    peft = pytest.importorskip("peft")
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    folder = tmp_path_factory.mktemp("official") / "output"
    unet = copy.deepcopy(tiny_sdxl[1].unet)
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:  # B starts at 0: give it values, as training would
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    layers = convert_state_dict_to_diffusers(peft.get_peft_model_state_dict(unet))
    StableDiffusionXLPipeline.save_lora_weights(str(folder), unet_lora_layers=layers)
    rows = {"clip_l": torch.randn(1, 32, generator=g), "clip_g": torch.randn(1, 32, generator=g)}
    save_file(rows, str(folder / "learned_embeds.safetensors"))  # the official save_embeddings: no metadata
    return folder, rows


def _sample(tiny_sdxl, out, *args):
    cmd = [sys.executable, str(ROOT / "sample.py"), "--model", str(tiny_sdxl[0]), "--device", "cpu", "--steps", "3",
           "--height", str(H), "--width", str(W), "--n", "1", "--seed", "3", "--cfg", "5", "--output", str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_official_files_sample_with_token_and_argmax_pooling_equals_diffusers(tiny_sdxl, official, tmp_path):
    """The official files sample here with --token (their rows carry no names), and with --pool argmax the image is
    diffusers' own: StableDiffusionXLPipeline + load_lora_weights + load_textual_inversion, same seed."""
    folder, rows = official
    p = _sample(tiny_sdxl, tmp_path / "ours.png", "--lora", str(folder), "--token", "<dog>=dog", "--wcon", "0",
                "--pool", "argmax", "--prompt", PROMPT)
    assert p.returncode == 0, p.stderr
    pipe = copy.deepcopy(tiny_sdxl[1])
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(folder))
    pipe.load_textual_inversion(rows["clip_l"], token="<dog>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(rows["clip_g"], token="<dog>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    pipe(PROMPT, num_inference_steps=3, guidance_scale=5.0, height=H, width=W,
         generator=torch.Generator("cpu").manual_seed(3)).images[0].save(tmp_path / "diffusers.png")
    ours, theirs = _pixels(tmp_path / "ours.png"), _pixels(tmp_path / "diffusers.png")
    diff = np.abs(ours - theirs).max()
    print(f"official files, --pool argmax vs diffusers: max pixel diff {diff}/255")
    assert diff <= 2 and ours.std() > 5

    # EOS pooling (the default) is a different conditioning when the new token is in the prompt
    p = _sample(tiny_sdxl, tmp_path / "eos.png", "--lora", str(folder), "--token", "<dog>=dog", "--wcon", "0",
                "--prompt", PROMPT)
    assert p.returncode == 0, p.stderr
    assert np.abs(_pixels(tmp_path / "eos.png") - theirs).max() > 2
    assert Image.open(tmp_path / "eos.png").text["pool"] == "eos"


def test_official_tokens_from_config_and_missing_names(tiny_sdxl, official, tmp_path):
    folder, _ = official
    config = tmp_path / "config.json"  # the official data config format
    config.write_text(json.dumps({"full_ti": {"images": [], "prompts": [], "inserting_tokens": ["<dog>"],
                                              "initializer_tokens": ["dog"]}}))
    p = _sample(tiny_sdxl, tmp_path / "cg.png", "--lora", str(folder), "--config", str(config), "--config-name",
                "full_ti", "--wcon", "2", "--prompt", PROMPT)
    assert p.returncode == 0, p.stderr
    assert Image.open(tmp_path / "cg.png").text["base_prompt"] == "a dog playing saxophone in sticker style"
    p = _sample(tiny_sdxl, tmp_path / "no.png", "--lora", str(folder), "--prompt", PROMPT)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "--token" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "no.png").exists()


def test_merge_takes_official_tokens(tiny_sdxl, official, tmp_path):
    import merge

    folder, rows = official
    other = tmp_path / "style"
    shutil.copytree(folder, other)
    os.remove(other / "learned_embeds.safetensors")
    merge.merge([str(folder), str(other)], output=str(tmp_path / "m"), model=str(tiny_sdxl[0]),
                names=[("<dog>", "dog")])
    with __import__("safetensors").safe_open(str(tmp_path / "m" / "learned_embeds.safetensors"), "pt") as f:
        assert f.metadata()["token"] == '["<dog>"]' and torch.equal(f.get_tensor("clip_l"), rows["clip_l"])


def test_pool_flag_trains_and_is_recorded(tiny_sdxl, tmp_path):
    result, _ = run(*argv(make_images(tmp_path / "dog"), tiny_sdxl[0], tmp_path / "out"), "--steps", "1",
                    "--checkpoint-every", "0", "--pool", "argmax")
    assert result["sd"].text_encoder_2.pool == "argmax"
    with __import__("safetensors").safe_open(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert f.metadata()["pool"] == "argmax"


def test_random_crop_and_flip_cache_is_exact(tiny_sdxl):
    """CropCache: each drawn (image, crop, flip) is encoded as itself -- the cached Gaussian equals the VAE's
    encoding of exactly that crop -- and its time ids say where the crop is."""
    sd = load_sdxl(str(tiny_sdxl[0]))
    folder = make_images(Path(__import__("tempfile").mkdtemp()) / "imgs", sizes=((96, 64), (64, 80)))
    paths = sorted(str(p) for p in folder.iterdir())
    cache = train.CropCache(sd.vae, paths, 64, "bilinear", random_crop=True, flip=True, fixed_time_ids=False)
    seen = set()
    for step in range(12):
        means, logvars, time_ids = cache.get(torch.tensor([0, 1]), train.rng(0, "crop", step))
        for i in range(2):
            image, size = cache.images[i]
            top, left = int(time_ids[i, 2]), int(time_ids[i, 3])
            assert time_ids[i].tolist() == [*size, top, left, 64, 64]
            (key,) = [k for k in cache.cache if k[:3] == (i, top, left) and torch.equal(cache.cache[k][0], means[i:i + 1])]
            x = (image.flip(-1) if key[3] else image)[:, top:top + 64, left:left + 64]
            with torch.no_grad():
                mean, _ = sd.vae.encode((x[None].float() / 127.5 - 1))
            assert torch.equal(mean, means[i:i + 1])
            seen.add(key)
    assert len({k[1:3] for k in seen if k[0] == 0}) > 1 and {k[3] for k in seen} == {True, False}  # crops vary
    fixed = train.CropCache(sd.vae, paths, 64, "lanczos", random_crop=True, flip=False, fixed_time_ids=True)
    assert fixed.get(torch.tensor([0]), train.rng(0, "crop", 0))[2].tolist() == [[64, 64, 0, 0, 64, 64]]


def test_official_recipe_flags_train(tiny_sdxl, tmp_path):
    images = make_images(tmp_path / "dog", sizes=((96, 64), (64, 80), (64, 64)))
    run(*argv(images, tiny_sdxl[0], tmp_path / "out"), "--steps", "3", "--checkpoint-every", "0", "--crop", "random",
        "--random-flip", "--resample", "bilinear", "--time-ids", "fixed", "--vae", str(tiny_sdxl[0]))
    log = read_log(tmp_path / "out")
    assert len(log) == 3 and log[0]["loss"] == torch.tensor(np.log(2.0), dtype=torch.float32).item()
    with pytest.raises(ValueError, match="--alpha 0.0: must be > 0"):
        train.parse_args(argv(images, tiny_sdxl[0], tmp_path / "o2") + ["--alpha", "0"])


def test_vae_flag_and_full_precision_weights(tiny_sdxl, tmp_path):
    """--vae takes another VAE (a diffusers VAE folder); --precision fp32 loads the full-precision files where
    the folder also has the fp16 variant (which is preferred otherwise, half the download)."""
    folder = tmp_path / "sdxl"
    shutil.copytree(tiny_sdxl[0], folder)
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    full = load_file(str(unet_file))
    save_file({k: v.half() for k, v in full.items()}, str(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    assert all(torch.equal(p, full[k]) for k, p in load_sdxl(str(folder), variant=None).unet.state_dict().items())
    assert not all(torch.equal(p, full[k]) for k, p in load_sdxl(str(folder)).unet.state_dict().items())
    result, _ = run(*argv(make_images(tmp_path / "dog"), folder, tmp_path / "out"), "--steps", "1",
                    "--checkpoint-every", "0", "--precision", "fp32")
    base = {k: v for k, v in result["sd"].unet.state_dict().items() if "lora" not in k}
    assert all(torch.equal(v, full[k]) for k, v in base.items())

    vae = tmp_path / "vae"  # a VAE repo's layout: config.json + weights at the root, force_upcast false (fp16-fix)
    vae.mkdir()
    config = json.loads((folder / "vae" / "config.json").read_text())
    (vae / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    weights = {k: v * 1.01 for k, v in load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors")).items()}
    save_file(weights, str(vae / "diffusion_pytorch_model.safetensors"))
    sd = load_sdxl(str(folder), dtype=torch.bfloat16, vae=str(vae))
    assert next(sd.vae.parameters()).dtype == torch.bfloat16  # force_upcast false: the training dtype
    assert torch.equal(sd.vae.state_dict()["decoder.conv_out.weight"], weights["decoder.conv_out.weight"].bfloat16())


def test_bundle_token_one_file_sharing(tiny_sdxl, tmp_path):
    """--bundle-token: lora_kohya.safetensors also carries the learned token under A1111's keys
    (bundle_emb.<token>.clip_l / .clip_g), so that file alone samples the concept -- the same image as the folder."""
    images = make_images(tmp_path / "dog")
    run(*argv(images, tiny_sdxl[0], tmp_path / "out"), "--steps", "2", "--checkpoint-every", "0", "--bundle-token")
    kohya, rows = load_file(str(tmp_path / "out" / "lora_kohya.safetensors")), load_file(
        str(tmp_path / "out" / "learned_embeds.safetensors"))
    assert torch.equal(kohya["bundle_emb.<dog>.clip_l"], rows["clip_l"])
    assert torch.equal(kohya["bundle_emb.<dog>.clip_g"], rows["clip_g"])
    alone = tmp_path / "shared" / "dog.safetensors"  # the one file, copied away from its folder
    alone.parent.mkdir()
    shutil.copy(tmp_path / "out" / "lora_kohya.safetensors", alone)
    prompt = "a <dog> on the grass"
    for name, lora in (("folder", tmp_path / "out"), ("file", alone)):
        p = _sample(tiny_sdxl, tmp_path / f"{name}.png", "--lora", str(lora), "--wcon", "2", "--prompt", prompt)
        assert p.returncode == 0, p.stderr
    assert Image.open(tmp_path / "file.png").text["base_prompt"] == "a dog on the grass"  # the init word came along
    assert np.array_equal(_pixels(tmp_path / "file.png"), _pixels(tmp_path / "folder.png"))
