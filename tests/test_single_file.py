"""Tests for product/single_file.py: SGM single-file <-> diffusers hub layout.

The real key map is checked name by name against tests/data/sdxl/unet_layout.json and vae_keys.tsv and against the
SHA-256 digests of key lists recorded in KEYS.md; the tensor conversion is checked by round trips on tiny random
diffusers/transformers models and by what the fused bigG attention and the transposed projection must compute.
"""

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from product import single_file as sf

DATA = Path(__file__).parent / "data" / "sdxl"


def config(name: str) -> dict:
    return json.loads((DATA / name / "config.json").read_text())


def digest(lines) -> str:
    # Recipe of unet_layout.json "verification_sha256": sorted lines, '\n'-joined, trailing '\n'.
    return hashlib.sha256(("\n".join(sorted(lines)) + "\n").encode()).hexdigest()


def unet_layout() -> list[tuple[str, tuple, str]]:
    """Every UNet tensor as (diffusers key, shape, SGM key), expanded as unet_layout.json's `_about` says."""
    layout = json.loads((DATA / "unet_layout.json").read_text())

    def shape(formula: str, **dims) -> tuple:
        terms = re.sub(r"(\d)([A-Za-z])", r"\1*\2", formula.strip("[]")).split(",")
        return tuple(eval(t, {}, dims) for t in terms)  # formulas like "8C" or "Cout"

    rows = [(d, tuple(s), g) for d, s, g in layout["top_level"]]
    for d, g, cin, cout, has_shortcut in layout["resnets"]["rows"]:
        for key, formula, sgm_key in layout["resnet_template"]["keys"]:
            if has_shortcut or not key.startswith("conv_shortcut"):
                rows.append((f"{d}.{key}", shape(formula, Cin=cin, Cout=cout), f"{g}.{sgm_key}"))
    for d, g, c, depth in layout["attentions"]["rows"]:
        template = layout["attention_template"]
        suffixes = list(template["wrapper_keys"])
        suffixes += [(f"transformer_blocks.{i}.{k}", f) for i in range(depth) for k, f in template["block_keys"]]
        rows += [(f"{d}.{k}", shape(f, C=c), f"{g}.{k}") for k, f in suffixes]
    for d, g, c, kind in layout["samplers"]["rows"]:
        conv = "op" if kind == "stride2" else "conv"
        rows += [(f"{d}.conv.weight", (c, c, 3, 3), f"{g}.{conv}.weight"), (f"{d}.conv.bias", (c,), f"{g}.{conv}.bias")]
    return rows


def vae_table() -> list[tuple[str, tuple, str, tuple]]:
    """(diffusers key, shape, SGM key, SGM shape) for all VAE tensors in vae_keys.tsv."""
    rows = []
    for line in (DATA / "vae_keys.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        d, s, g, *sgm_shape = line.split("\t")
        shape = tuple(int(x) for x in s.split(","))
        rows.append((d, shape, g, tuple(int(x) for x in sgm_shape[0].split(",")) if sgm_shape else shape))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# The real SDXL key map


def test_unet_names_match_layout():
    cfg = config("unet")
    rows = unet_layout()
    assert len(rows) == 1680
    layout = json.loads((DATA / "unet_layout.json").read_text())["verification_sha256"]
    assert digest(d for d, _, _ in rows) == layout["diffusers_keys"]  # the expansion above is right
    assert digest(f"{d}\t{','.join(map(str, s))}" for d, s, _ in rows) == layout["diffusers_key_TAB_shape"]
    for d, _, g in rows:
        assert sf.sgm_unet_name(d, cfg) == g
        assert sf.diffusers_unet_name(g, cfg) == d
    assert digest(sf.UNET_PREFIX + sf.sgm_unet_name(d, cfg) for d, _, _ in rows) == \
        layout["sgm_keys_with_model.diffusion_model._prefix"]


def test_unet_module_paths_and_kohya_names():
    """The 722 Linears inside Transformer2D blocks, as module paths, give kohya's LoRA names (digests in KEYS.md)."""
    cfg = config("unet")
    layout = json.loads((DATA / "unet_layout.json").read_text())
    linears = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
               "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"]
    modules = []
    for d, _, _, depth in layout["attentions"]["rows"]:
        modules += [f"{d}.proj_in", f"{d}.proj_out"]
        modules += [f"{d}.transformer_blocks.{i}.{x}" for i in range(depth) for x in linears]
    assert len(modules) == 722
    assert digest(modules) == "c160683cde09c2127ad4573cb6afb27041e454a9734380f019aa691c84829c9f"
    kohya = ["lora_unet_" + sf.sgm_unet_name(m, cfg).replace(".", "_") for m in modules]
    assert digest(kohya) == "b5a147c01a66b153ee2f8bbdd1a37474eb54e0bde3b5a17f03d3ba4c8bd536e2"
    assert all(sf.diffusers_unet_name(sf.sgm_unet_name(m, cfg), cfg) == m for m in modules)
    # Resnet layers and block-level paths (kohya LoCon names), from lora_block_map.tsv examples.
    assert sf.sgm_unet_name("down_blocks.1.resnets.0.time_emb_proj", cfg) == "input_blocks.4.0.emb_layers.1"
    assert sf.sgm_unet_name("up_blocks.2.resnets.2.conv_shortcut", cfg) == "output_blocks.8.0.skip_connection"
    assert sf.sgm_unet_name("down_blocks.1.downsamplers.0.conv", cfg) == "input_blocks.6.0.op"
    assert sf.sgm_unet_name("up_blocks.1.upsamplers.0.conv", cfg) == "output_blocks.5.2.conv"
    assert sf.sgm_unet_name("mid_block.attentions.0", cfg) == "middle_block.1"
    with pytest.raises(ValueError):
        sf.sgm_unet_name("down_blocks.3.resnets.0.conv1", cfg)  # SDXL has 3 levels


def test_lora_block_map_agrees():
    cfg = config("unet")
    for line in (DATA / "lora_block_map.tsv").read_text().splitlines():
        if line.startswith(("#", "kind")):
            continue
        _, d, g, kohya, *_ = line.split("\t")
        assert sf.sgm_unet_name(d, cfg) == g and sf.diffusers_unet_name(g, cfg) == d
        assert kohya == "lora_unet_" + g.replace(".", "_")


def test_vae_names_and_shapes_match_tsv():
    cfg = config("vae")
    rows = vae_table()
    assert len(rows) == 248
    for d, _, g, _ in rows:
        assert sf.sgm_vae_name(d, cfg) == g
        assert sf.diffusers_vae_name(g, cfg) == d
    vae = {d: torch.empty(s, device="meta") for d, s, _, _ in rows}
    sgm = sf.diffusers_to_sgm({"vae": vae}, config("unet"), cfg, config("text_encoder"), config("text_encoder_2"))
    assert {k: tuple(v.shape) for k, v in sgm.items()} == {sf.VAE_PREFIX + g: gs for _, _, g, gs in rows}
    assert sum(s != gs for _, s, _, gs in rows) == 8  # the mid-block attention q/k/v/proj_out of both halves


def real_components() -> dict:
    """All four SDXL state dicts in hub on-disk names and real shapes, as meta tensors (no memory)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(DATA / "text_encoder"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(DATA / "text_encoder_2"))
    return {
        "unet": {d: torch.empty(s, device="meta") for d, s, _ in unet_layout()},
        "vae": {d: torch.empty(s, device="meta") for d, s, _, _ in vae_table()},
        # transformers 5 drops the 'text_model.' prefix of CLIPTextModel in memory; hub files have it.
        "text_encoder": {"text_model." + k: v for k, v in te.state_dict().items()},
        "text_encoder_2": dict(te2.state_dict()),
    }


@pytest.fixture(scope="module")
def real():
    configs = [config(n) for n in ("unet", "vae", "text_encoder", "text_encoder_2")]
    components = real_components()
    return components, configs, sf.diffusers_to_sgm(components, *configs)


def test_real_text_encoder_key_digests(real):
    components, _, sgm = real
    assert digest(components["text_encoder"]) == "74df78093eadc0fd7e151404bcfd480f806b59eb79c741e7601e11e0ff2120d9"
    assert digest(components["text_encoder_2"]) == "f1bee32c3fa8a8ce5acc43625e7653c195c103d5e5adb619094e3adcb5f2345a"
    bigg = [k for k in sgm if k.startswith(sf.TE2_PREFIX)]
    assert len(bigg) == 390
    assert digest(bigg) == "b730ab13ccf8f320323a8eedd14c3fe4adc081f10b8f2b014d8cea196535a8f5"


def test_real_single_file_layout(real):
    components, configs, sgm = real
    assert len(sgm) == 1680 + 248 + 197 + 390  # = 2,515, as computed in KEYS.md
    sf.check_sdxl_checkpoint(sgm, "real.safetensors")
    p = sf.TE2_PREFIX
    assert sgm[p + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    assert sgm[p + "positional_embedding"].shape == (77, 1280)
    assert sgm[sf.TE_PREFIX + "text_model.embeddings.position_ids"].shape == (1, 77)
    back = sf.sgm_to_diffusers(sgm, *configs)
    for name, sd in components.items():
        assert {k: v.shape for k, v in back[name].items()} == {k: v.shape for k, v in sd.items()}, name


# ---------------------------------------------------------------------------------------------------------------
# Tensor conversion on tiny random models


def tiny_text_config(projection_dim: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          vocab_size=100, max_position_embeddings=12, projection_dim=projection_dim,
                          bos_token_id=98, eos_token_id=99, pad_token_id=1, hidden_act="gelu")


@pytest.fixture(scope="module")
def tiny():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16, 32), layers_per_block=2, norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(1, 2, 4), transformer_layers_per_block=(1, 2, 2), cross_attention_dim=24,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 24)
    # layers_per_block=1 here (SDXL has 2) so the rules are exercised on a second value.
    vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    te_cfg, te2_cfg = tiny_text_config(16), tiny_text_config(24)  # non-square projection makes a transpose bug loud
    te, te2 = CLIPTextModel(te_cfg), CLIPTextModelWithProjection(te2_cfg)
    components = {"unet": dict(unet.state_dict()), "vae": dict(vae.state_dict()),
                  "text_encoder": {"text_model." + k: v for k, v in te.state_dict().items()},
                  "text_encoder_2": dict(te2.state_dict())}
    configs = (dict(unet.config), dict(vae.config), te_cfg.to_dict(), te2_cfg.to_dict())
    return components, configs, te2.eval()


def test_tiny_round_trip_is_identity(tiny):
    components, configs, _ = tiny
    sgm = sf.diffusers_to_sgm(components, *configs)
    # + position_ids and logit_scale; 6 q/k/v tensors per bigG layer become 2 in_proj tensors
    assert len(sgm) == sum(map(len, components.values())) + 2 - 4 * configs[3]["num_hidden_layers"]
    assert sf.is_sdxl_checkpoint(sgm)
    back = sf.sgm_to_diffusers(sgm, *configs)
    assert back.keys() == components.keys()
    for name, sd in components.items():
        assert back[name].keys() == sd.keys(), name
        for k, v in sd.items():
            assert back[name][k].dtype == v.dtype and torch.equal(back[name][k], v), f"{name} {k}"


def test_tiny_sgm_file_saves_and_reloads(tiny, tmp_path):
    # safetensors refuses tensors sharing storage, so the split q/k/v and reshaped VAE weights must be separate.
    components, configs, _ = tiny
    sgm = sf.diffusers_to_sgm(components, *configs)
    save_file({k: v.contiguous() for k, v in sgm.items()}, tmp_path / "tiny.safetensors")
    header = sf.read_header(tmp_path / "tiny.safetensors")
    assert {k: tuple(h["shape"]) for k, h in header.items()} == {k: tuple(v.shape) for k, v in sgm.items()}
    save_file(sf.sgm_to_diffusers(sgm, *configs)["text_encoder_2"], tmp_path / "te2.safetensors")


def test_bigg_fused_attention_and_projection(tiny):
    """OpenCLIP semantics: in_proj = cat(q, k, v) for nn.MultiheadAttention, and pooled = x @ P."""
    components, configs, te2 = tiny
    hub = components["text_encoder_2"]
    sgm = sf.diffusers_to_sgm({"text_encoder_2": hub}, *configs)
    p, d = sf.TE2_PREFIX + "transformer.resblocks.0.attn.", 16
    in_proj = sgm[p + "in_proj_weight"]
    assert torch.equal(in_proj[:d], hub["text_model.encoder.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(in_proj[d:2 * d], hub["text_model.encoder.layers.0.self_attn.k_proj.weight"])
    assert torch.equal(sgm[p + "in_proj_bias"][2 * d:], hub["text_model.encoder.layers.0.self_attn.v_proj.bias"])

    torch.manual_seed(1)
    x = torch.randn(3, 16)
    P = sgm[sf.TE2_PREFIX + "text_projection"]
    assert P.shape == (16, 24)  # OpenCLIP [width, embed_dim]
    with torch.no_grad():
        assert (x @ P - te2.text_projection(x)).abs().max() <= 1e-5

        # The layer as OpenCLIP runs it (nn.MultiheadAttention) equals the HF attention it came from.
        mha = torch.nn.MultiheadAttention(16, num_heads=2, batch_first=True)
        mha.load_state_dict({"in_proj_weight": in_proj, "in_proj_bias": sgm[p + "in_proj_bias"],
                             "out_proj.weight": sgm[p + "out_proj.weight"], "out_proj.bias": sgm[p + "out_proj.bias"]})
        h = torch.randn(2, 5, 16)
        ours = mha(h, h, h, need_weights=False)[0]
        reference = te2.text_model.encoder.layers[0].self_attn(h)[0]
        assert (ours - reference).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Recognising SDXL base


SD15 = ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
SD2 = ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight",
       "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
REFINER = ["model.diffusion_model.label_emb.0.0.weight", "first_stage_model.encoder.conv_in.weight",
           "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight"]
LORA = ["lora_unet_input_blocks_4_1_proj_in.lora_down.weight", "lora_unet_input_blocks_4_1_proj_in.lora_up.weight",
        "lora_unet_input_blocks_4_1_proj_in.alpha"]
DIFFUSERS_UNET = ["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"]
SDXL = ["model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.input_blocks.0.0.weight",
        "first_stage_model.encoder.conv_in.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]


@pytest.mark.parametrize("keys, says", [(SD15, "Stable Diffusion 1.x"), (SD2, "Stable Diffusion 2.x"),
                                        (REFINER, "refiner"), (LORA, "LoRA"), (DIFFUSERS_UNET, "diffusers layout"),
                                        (SDXL[:2] + SDXL[3:], "no VAE")])
def test_rejects_other_files(keys, says):
    assert not sf.is_sdxl_checkpoint(keys)
    with pytest.raises(ValueError, match=says) as err:
        sf.check_sdxl_checkpoint({k: None for k in keys}, "x.safetensors")
    assert "\n" not in str(err.value) and str(err.value).startswith("x.safetensors: ")


def test_shape_checks_and_header(tmp_path):
    assert sf.is_sdxl_checkpoint(SDXL)
    real = {SDXL[0]: (1280, 2816), SDXL[1]: (320, 4, 3, 3)}
    sf.check_sdxl_checkpoint({k: real.get(k, (1,)) for k in SDXL}, "base.safetensors")
    # A refiner whose embedder names were made SDXL-base-like still betrays itself by its add-embedding width.
    path = tmp_path / "odd.safetensors"
    save_file({k: torch.zeros(real.get(k, (1,))) for k in SDXL} | {SDXL[0]: torch.zeros(8, 2560)}, path)
    with pytest.raises(ValueError, match="2560"):
        sf.check_sdxl_checkpoint(sf.read_header(path), path)
    inpaint = {k: real.get(k, (1,)) for k in SDXL} | {SDXL[1]: (320, 9, 3, 3)}
    with pytest.raises(ValueError, match="9 input channels"):
        sf.check_sdxl_checkpoint(inpaint, "inpaint.safetensors")
    (tmp_path / "model.ckpt").write_bytes(b"PK\x03\x04 pickle zip")
    with pytest.raises(ValueError, match="not a .safetensors file"):
        sf.read_header(tmp_path / "model.ckpt")
    with pytest.raises(FileNotFoundError):
        sf.read_header(tmp_path / "missing.safetensors")
