"""sdxl.load_sdxl end to end: a tiny SDXL saved by diffusers/transformers in the real hub layout is loaded by our
code and must give the reference outputs; the fp16 variant, the single-file checkpoint and the user errors."""
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from product import single_file
from sdxl import load_sdxl

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a photo of a dog on the beach", "an oil painting of a cat, highly detailed!"]


@pytest.fixture(scope="module")
def ours(tiny_sdxl):
    folder, _ = tiny_sdxl
    return load_sdxl(str(folder))


def _unet_inputs(h, w, pipe):
    g = torch.Generator().manual_seed(0)
    ctx = pipe.unet.config.cross_attention_dim
    pooled = pipe.text_encoder_2.config.projection_dim
    return (torch.randn(2, 4, h, w, generator=g), torch.tensor([999, 10]), torch.randn(2, 77, ctx, generator=g),
            torch.randn(2, pooled, generator=g), torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8], [512, 256, 16, 8, 256, 512]]).float())


@pytest.mark.parametrize("h,w", [(16, 16), (8, 24)])
def test_unet_from_folder_matches_diffusers(tiny_sdxl, ours, h, w):
    _, pipe = tiny_sdxl
    x, t, ctx, pooled, time_ids = _unet_inputs(h, w, pipe)
    with torch.no_grad():
        ref = pipe.unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        out = ours.unet(x, t, ctx, pooled, time_ids)
    assert (out - ref).abs().max().item() <= 1e-5


def test_encode_prompt_matches_diffusers_pipeline(tiny_sdxl, ours):
    _, pipe = tiny_sdxl
    with torch.no_grad():
        ref_embeds, _, ref_pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
        embeds, pooled = ours.encode_prompt(PROMPTS)
    assert embeds.shape == ref_embeds.shape and pooled.shape == ref_pooled.shape
    assert (embeds - ref_embeds).abs().max().item() <= 1e-5
    assert (pooled - ref_pooled).abs().max().item() <= 1e-5


def test_vae_from_folder_matches_diffusers(tiny_sdxl, ours):
    _, pipe = tiny_sdxl
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        dist = pipe.vae.encode(x).latent_dist
        mean, logvar = ours.vae.encode(x)
        assert (mean - dist.mean).abs().max() <= 1e-4 and (logvar - dist.logvar).abs().max() <= 1e-4
        assert (ours.vae.decode(mean) - pipe.vae.decode(dist.mean).sample).abs().max() <= 1e-4
    assert ours.vae.scaling_factor == pipe.vae.config.scaling_factor
    assert ours.scheduler["timestep_spacing"] == "leading" and ours.force_zeros_for_empty_prompt is True


def test_dtype_and_frozen(tiny_sdxl):
    folder, _ = tiny_sdxl
    sd = load_sdxl(str(folder), dtype=torch.bfloat16)
    assert next(sd.unet.parameters()).dtype == torch.bfloat16
    assert next(sd.text_encoder_2.parameters()).dtype == torch.bfloat16
    assert next(sd.vae.parameters()).dtype == torch.float32  # force_upcast: the SDXL VAE overflows in fp16
    assert not any(p.requires_grad for p in sd.unet.parameters())
    assert not any(p.is_meta for m in (sd.unet, sd.vae, sd.text_encoder, sd.text_encoder_2) for p in m.state_dict().values())


def test_fp16_variant_is_preferred(tiny_sdxl, tmp_path):
    """A folder with both weight sets (as the hub has): the .fp16 files are read."""
    folder, pipe = tiny_sdxl
    both = tmp_path / "both"
    shutil.copytree(folder, both)
    copy.deepcopy(pipe.unet).to(torch.float16).save_pretrained(both / "unet", variant="fp16")  # the shared pipe stays fp32
    x, t, ctx, pooled, time_ids = _unet_inputs(16, 16, pipe)
    sd = load_sdxl(str(both))
    ref = load_sdxl(str(folder))
    with torch.no_grad():
        diff = (sd.unet(x, t, ctx, pooled, time_ids) - ref.unet(x, t, ctx, pooled, time_ids)).abs().max().item()
    assert 0 < diff < 0.05  # fp16-rounded weights: close to, but not bit-equal to, the fp32 ones
    sd32 = load_sdxl(str(both), variant=None)
    assert torch.equal(sd32.unet.conv_in.weight, ref.unet.conv_in.weight)


def test_text_encoder_saved_by_transformers5_loads(tiny_sdxl, ours, tmp_path):
    """A text encoder saved by transformers 5 lacks the `text_model.` prefix of the hub files: accepted too."""
    folder, pipe = tiny_sdxl
    t5 = tmp_path / "t5"
    shutil.copytree(folder, t5)
    pipe.text_encoder.save_pretrained(t5 / "text_encoder")
    assert not any(k.startswith("text_model.") for k in load_file(str(t5 / "text_encoder" / "model.safetensors")))
    sd = load_sdxl(str(t5))
    with torch.no_grad():
        assert torch.equal(sd.encode_prompt(PROMPTS)[0], ours.encode_prompt(PROMPTS)[0])


def test_single_file_checkpoint_loads_like_the_folder(tiny_sdxl, ours, tmp_path):
    folder, _ = tiny_sdxl
    from product.hub import MODEL_COMPONENTS
    import json
    comps = {c: load_file(str(folder / c / f"{stem}.safetensors")) for c, stem in MODEL_COMPONENTS.items()}
    cfgs = [json.load(open(folder / c / "config.json")) for c in ("unet", "vae", "text_encoder", "text_encoder_2")]
    ckpt = tmp_path / "tiny_sd_xl.safetensors"
    save_file({k: v.contiguous() for k, v in single_file.diffusers_to_sgm(comps, *cfgs).items()}, str(ckpt))
    sd = load_sdxl(str(ckpt), config_from=str(folder))
    for name in MODEL_COMPONENTS:
        a, b = getattr(sd, name).state_dict(), getattr(ours, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    with torch.no_grad():
        assert torch.equal(sd.encode_prompt(PROMPTS)[1], ours.encode_prompt(PROMPTS)[1])


def _cli(*args, env=None):
    e = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, "sdxl.py", *args], cwd=ROOT, capture_output=True, text=True, env=e, timeout=120)


def _one_line_error(r, *words):
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_cli_loads_folder(tiny_sdxl):
    r = _cli("--model", str(tiny_sdxl[0]), "--precision", "fp32")
    assert r.returncode == 0, r.stderr
    assert "unet" in r.stdout and "49,408" in r.stdout


def test_errors_are_one_line(tiny_sdxl, tmp_path):
    folder, _ = tiny_sdxl
    (tmp_path / "empty").mkdir()
    _one_line_error(_cli("--model", str(tmp_path / "empty")), "model_index.json")

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "vae")
    _one_line_error(_cli("--model", str(broken)), "vae")

    noweights = tmp_path / "noweights"
    shutil.copytree(folder, noweights)
    os.remove(noweights / "unet" / "diffusion_pytorch_model.safetensors")
    (noweights / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    _one_line_error(_cli("--model", str(noweights)), "pickle")

    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04 never unpickled")
    _one_line_error(_cli("--model", str(pickle)), "model.ckpt", ".safetensors")

    sd15 = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
               "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(8, 768)}, str(sd15))
    _one_line_error(_cli("--model", str(sd15)), "sd15.safetensors")

    _one_line_error(_cli("--model", str(tmp_path / "missing")), "missing")


def test_no_network_and_no_cache_is_one_line(tmp_path):
    r = _cli("--model", "someone/sdxl-finetune", env={"HF_HUB_CACHE": str(tmp_path / "cache")})
    _one_line_error(r, "someone/sdxl-finetune", "cache")
