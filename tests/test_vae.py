"""vae.py against diffusers' AutoencoderKL (a numerical oracle only) and the real SDXL VAE key list."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vae import AutoencoderKL, convert_legacy_vae_keys, latent_dist_sample

DATA = Path(__file__).parent / "data" / "sdxl"
TOL = 1e-4

TINY = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16), layers_per_block=2,
    norm_num_groups=4, act_fn="silu", scaling_factor=0.13025, force_upcast=True,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny random diffusers VAE saved to disk the way the hub stores it."""
    from diffusers import AutoencoderKL as RefVAE

    torch.manual_seed(0)
    ref = RefVAE(**TINY).eval()
    with torch.no_grad():  # perturb everything so no weight, bias or norm parameter is 0 or 1
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(path, safe_serialization=True)
    return ref, path


def load_ours(path, sd=None):
    ours = AutoencoderKL(json.loads((path / "config.json").read_text())).eval()
    ours.load_state_dict(sd if sd is not None else load_file(path / "diffusion_pytorch_model.safetensors"), strict=True)
    return ours


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("hw", [(32, 32), (24, 40)])
@torch.no_grad()
def test_parity_with_diffusers(reference, hw):
    ref, path = reference
    ours = load_ours(path)
    torch.manual_seed(1)
    x = torch.rand(2, 3, *hw) * 2 - 1
    dist = ref.encode(x).latent_dist
    mean, logvar = ours.encode(x)
    assert mean.shape == (2, 4, hw[0] // 8, hw[1] // 8)
    d_mean, d_logvar = max_diff(mean, dist.mean), max_diff(logvar, dist.logvar)
    z = torch.randn(2, 4, hw[0] // 8, hw[1] // 8)
    img, ref_img = ours.decode(z), ref.decode(z).sample
    assert img.shape == (2, 3, *hw)
    d_img = max_diff(img, ref_img)
    sample = latent_dist_sample(mean, logvar, generator=torch.Generator().manual_seed(3))
    d_sample = max_diff(sample, dist.sample(generator=torch.Generator().manual_seed(3)))
    print(f"{hw}: mean {d_mean:.2e} logvar {d_logvar:.2e} decode {d_img:.2e} sample {d_sample:.2e}")
    assert max(d_mean, d_logvar, d_img, d_sample) <= TOL
    assert ref_img.abs().mean() > 0.1 and dist.mean.abs().mean() > 0.1  # outputs are not trivially small


def test_logvar_is_clamped(reference):
    ours = load_ours(reference[1])
    with torch.no_grad():
        ours.quant_conv.bias[4:] = 100.0  # the logvar half
        _, logvar = ours.encode(torch.zeros(1, 3, 16, 16))
    assert logvar.max().item() == 20.0


@torch.no_grad()
def test_legacy_attention_keys(reference):
    ref, path = reference
    sd = load_file(path / "diffusion_pytorch_model.safetensors")
    new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in sd.items():
        for new, old in new_to_old.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                if value.ndim == 2 and key.startswith("encoder."):
                    value = value[:, :, None, None]  # some old files store these as 1x1 convs
        legacy[key] = value
    assert any(k.endswith("attentions.0.proj_attn.weight") for k in legacy)
    assert any(v.ndim == 4 and "query" in k for k, v in legacy.items())
    with pytest.raises(RuntimeError):
        AutoencoderKL(json.loads((path / "config.json").read_text())).load_state_dict(legacy, strict=True)
    ours = load_ours(path, convert_legacy_vae_keys(legacy))
    assert convert_legacy_vae_keys(sd).keys() == sd.keys()  # current names pass through
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    z = torch.randn(2, 4, 2, 3)
    d = max(max_diff(ours.encode(x)[0], ref.encode(x).latent_dist.mean), max_diff(ours.decode(z), ref.decode(z).sample))
    print(f"legacy keys: max abs diff {d:.2e}")
    assert d <= TOL


def test_real_sdxl_layout_on_meta():
    expected = {}
    for line in (DATA / "vae_keys.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split("\t")[:2]
            expected[name] = tuple(int(s) for s in shape.split(","))
    config = json.loads((DATA / "vae" / "config.json").read_text())
    with torch.device("meta"):
        vae = AutoencoderKL(config)
    got = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert got == expected
    assert len(got) == 248
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert vae.scaling_factor == 0.13025 and vae.force_upcast is True

    fix = json.loads((DATA / "sdxl-vae-fp16-fix" / "config.json").read_text())
    with torch.device("meta"):
        vae16 = AutoencoderKL(fix)
    assert {k: tuple(v.shape) for k, v in vae16.state_dict().items()} == expected
    assert vae16.force_upcast is False


def test_unsupported_block_type():
    config = dict(TINY, down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",))
    with pytest.raises(ValueError, match="down_block_types"):
        AutoencoderKL(config)
    with pytest.raises(ValueError, match="up_block_types"):
        AutoencoderKL(dict(TINY, up_block_types=("UpDecoderBlock2D", "AttnUpDecoderBlock2D")))


def test_tiles_blend_to_the_whole_image_for_a_pointwise_map_and_stay_close_for_the_vae():
    """vae.tiled: for a map that sees each pixel alone the blend weights sum to 1 everywhere, so the tiled result is
    the whole one (an identity of the ramps); for the tiny VAE (GroupNorm sees a tile, not the image) it is close."""
    from sdxl import load_sdxl
    from vae import check_tile, tiled

    x = torch.randn(1, 4, 20, 28)
    up = lambda z: (z * 2 + 1).repeat_interleave(8, -1).repeat_interleave(8, -2)  # noqa: E731  a pointwise "decoder"
    torch.testing.assert_close(tiled(up, x, 8, 2, 8), up(x), rtol=1e-6, atol=1e-6)
    down = lambda im: (im[..., ::8, ::8] * 3, im[..., ::8, ::8] - 1)  # noqa: E731  a tuple, as encode returns
    mean, logvar = tiled(down, up(x), 64, 16, 1 / 8)
    torch.testing.assert_close(mean, down(up(x))[0])
    torch.testing.assert_close(logvar, down(up(x))[1])
    vae = load_sdxl("tiny").vae
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        whole = vae.decode(z)
        vae.tile = 16  # pixels; the tiny VAE downsamples by 2: 8 x 8 latent tiles over 16 x 16, 9 tiles
        tiles = vae.decode(z)
        image = whole.clamp(-1, 1)
        m_tiles, _ = vae.encode(image)
        vae.tile = 0
        m_whole, _ = vae.encode(image)
    assert whole.shape == tiles.shape and 0 < ((tiles - whole).norm() / whole.norm()).item() < 0.5
    assert m_tiles.shape == m_whole.shape and 0 < ((m_tiles - m_whole).norm() / m_whole.norm()).item() < 0.5
    for bad in (-1, 16, 100):
        with pytest.raises(ValueError, match="--vae-tile"):
            check_tile(bad)
