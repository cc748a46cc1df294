"""Tests for unet_loader.py: parity with diffusers' UNet2DConditionModel (tiny random SDXL-form model), the exact
SDXL-base key/shape layout and parameter count, gradient checkpointing, bf16, and refusal of non-SDXL configs."""
import copy
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from unet_loader import UNet, load_unet_config
from tiny_sdxl import unet_pair

DATA = Path(__file__).parent / "data" / "sdxl"
POOLED, CTX = 16, 32

# SDXL form in miniature: text_time conditioning, linear projections, several heads, depth > 1, two cross-attn levels.
TINY = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 2, 3), cross_attention_dim=CTX,
    norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=POOLED + 6 * 8,
)




def _inputs(h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(2, 4, h, w, generator=g),
        timestep=torch.tensor([999, 37]),  # per-sample timesteps, including the largest one
        encoder_hidden_states=torch.randn(2, 77, CTX, generator=g),
        text_embeds=torch.randn(2, POOLED, generator=g),
        time_ids=torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 16, 32, 832, 1216]]),
    )


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(diffusers model, our model loaded from the diffusers checkpoint files)."""
    return unet_pair(tmp_path_factory.mktemp("tiny_unet"), TINY)[:2]


@pytest.mark.parametrize("hw", [(16, 16), (8, 12)])
def test_parity_with_diffusers(pair, hw):
    theirs, ours = pair
    x = _inputs(*hw)
    with torch.no_grad():
        want = theirs(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
                      added_cond_kwargs={"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}).sample
        got = ours(**x)
    diff = (got - want).abs().max().item()
    print(f"max abs diff {hw}: {diff:.3g} (output scale {want.abs().max().item():.3g})")
    assert got.shape == want.shape == x["sample"].shape
    assert want.abs().max() > 0.1  # the comparison is not vacuous
    assert diff <= 1e-5


def test_timestep_forms_agree(pair):
    _, ours = pair
    x = _inputs(8, 8)
    with torch.no_grad():
        ref = ours(**{**x, "timestep": torch.tensor([500, 500])})
        for t in (500, torch.tensor(500.0)):  # python int, 0-d float tensor
            assert torch.equal(ours(**{**x, "timestep": t}), ref)
        assert not torch.allclose(ours(**{**x, "timestep": 501}), ref)


def _expand_layout(layout):
    """Every (diffusers key, shape) of the SDXL UNet from unet_layout.json's templates and instance tables."""
    def dims(formula, **var):
        out = []
        for term in formula.strip("[]").split(","):
            coef, name = re.fullmatch(r"(\d*)([A-Za-z]*)", term).groups()
            out.append((int(coef) if coef else 1) * (var[name] if name else 1))
        return out

    keys = {k: shape for k, shape, _ in layout["top_level"]}
    for prefix, _, cin, cout, has_shortcut in layout["resnets"]["rows"]:
        for suffix, formula, _ in layout["resnet_template"]["keys"]:
            if has_shortcut or not suffix.startswith("conv_shortcut"):
                keys[f"{prefix}.{suffix}"] = dims(formula, Cin=cin, Cout=cout)
    template = layout["attention_template"]
    for prefix, _, c, depth in layout["attentions"]["rows"]:
        for suffix, formula in template["wrapper_keys"]:
            keys[f"{prefix}.{suffix}"] = dims(formula, C=c)
        for i in range(depth):
            for suffix, formula in template["block_keys"]:
                keys[f"{prefix}.transformer_blocks.{i}.{suffix}"] = dims(formula, C=c)
    for prefix, _, c, _ in layout["samplers"]["rows"]:
        keys[f"{prefix}.conv.weight"], keys[f"{prefix}.conv.bias"] = [c, c, 3, 3], [c]
    return keys


def _digest(lines):
    return hashlib.sha256(("\n".join(sorted(lines)) + "\n").encode()).hexdigest()


def test_sdxl_layout_and_parameter_count():
    layout = json.loads((DATA / "unet_layout.json").read_text())
    with torch.device("meta"):
        model = UNet(load_unet_config(DATA / "unet" / "config.json"))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = _expand_layout(layout)
    assert len(expected) == layout["counts"]["tensors"] == 1680
    assert sorted(set(ours) ^ set(expected)) == []
    assert {k: s for k, s in ours.items() if s != expected[k]} == {}
    sha = layout["verification_sha256"]
    assert _digest(ours) == sha["diffusers_keys"]
    assert _digest(f"{k}\t{','.join(map(str, s))}" for k, s in ours.items()) == sha["diffusers_key_TAB_shape"]
    assert sum(p.numel() for p in model.parameters()) == layout["counts"]["parameters"] == 2_567_463_684


def test_gradient_checkpointing_same_output_and_grads(pair):
    _, loaded = pair
    model = copy.deepcopy(loaded).train()
    x = _inputs(8, 8)
    calls = []
    model.down_blocks[1].attentions[0].register_forward_pre_hook(lambda *_: calls.append(1))

    def run():
        model.zero_grad()
        out = model(**x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out_plain, grads_plain = run()
    assert len(calls) == 1
    model.gradient_checkpointing = True
    calls.clear()
    out_ckpt, grads_ckpt = run()
    assert len(calls) == 2  # recomputed during backward: checkpointing really was on
    assert torch.allclose(out_ckpt, out_plain, atol=1e-6)
    assert len(grads_ckpt) == len(grads_plain)
    for name, g in grads_plain.items():
        assert torch.allclose(grads_ckpt[name], g, atol=1e-6, rtol=1e-5), name


def test_bf16_close_to_fp32(pair):
    _, ours = pair
    x = _inputs(8, 12)
    half = copy.deepcopy(ours).to(torch.bfloat16)
    with torch.no_grad():
        want = ours(**x)
        got = half(**x)  # fp32 inputs: the model casts them (and its fp32 sinusoids) to the weight dtype
    assert got.dtype == torch.bfloat16
    rel = ((got.float() - want).norm() / want.norm()).item()
    print(f"bf16 vs fp32 relative L2 error: {rel:.3g}")
    assert rel < 0.05


@pytest.mark.parametrize("change", [
    {"down_block_types": ["DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D"]},
    {"up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]},
    {"class_embed_type": "timestep"},
    {"use_linear_projection": False},
    {"addition_embed_type": "text"},
    {"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"},
    {"only_cross_attention": [False, True, False]},
    {"num_attention_heads": [5, 10, 20]},
    {"transformer_layers_per_block": [1, 2]},
])
def test_non_sdxl_config_raises(change):
    config = {**load_unet_config(DATA / "unet" / "config.json"), **change}
    with torch.device("meta"), pytest.raises(ValueError):
        UNet(config)


def test_missing_config_and_bad_latent_size(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_unet_config(tmp_path / "nope.json")
    config = load_unet_config(DATA / "unet" / "config.json")
    del config["addition_embed_type"]
    with torch.device("meta"), pytest.raises(ValueError):
        UNet(config)
