"""Tests for lora.py: exact identity at init and at scale 0 (also per sample), merge/unmerge, what trains, the
SDXL trainable-parameter counts and kohya names, file round trips in every layout, error messages, concatenating
LoRAs, and diffusers as the oracle for our files (tiny random SDXL-form UNet)."""
import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora import (TEXT_ALL, UNET_ATTN, UNET_KOHYA, LoRALinear, apply_lora, concat_loras, inject_lora,
                  kohya_name, load_lora_file, lora_layers, lora_modules, lora_parameters, lora_scale,
                  lora_state_dict, save_lora_kohya, save_lora_peft, set_lora_scale)
from text_encoder import CLIPTextModel
from unet_loader import UNet, load_unet_config
from tiny_sdxl import randomize, unet_pair

DATA = Path(__file__).parent / "data" / "sdxl"
POOLED, CTX = 16, 32

TINY = dict(  # SDXL form in miniature (text_time conditioning, linear projections, depth > 1)
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 2, 3), cross_attention_dim=CTX,
    norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=POOLED + 6 * 8,
)
TINY_CLIP = dict(hidden_act="quick_gelu", hidden_size=32, layer_norm_eps=1e-5, vocab_size=100,
                 max_position_embeddings=8, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2,
                 projection_dim=32, bos_token_id=98, eos_token_id=99, pad_token_id=0)




def _train_like(model, seed=1):
    """Give every LoRA branch random weights, as after some training (up starts at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model



def _inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, 4, 8, 8, generator=g), timestep=torch.tensor([999, 37, 500][:batch]),
                encoder_hidden_states=torch.randn(batch, 7, CTX, generator=g),
                text_embeds=torch.randn(batch, POOLED, generator=g),
                time_ids=torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * batch))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(diffusers UNet2DConditionModel, our UNet with the same weights loaded strict, config)."""
    return unet_pair(tmp_path_factory.mktemp("tiny_unet"), TINY)


@pytest.fixture
def unet(pair):
    return copy.deepcopy(pair[1])


def _clip(seed=0):
    torch.manual_seed(seed)
    return randomize(CLIPTextModel(TINY_CLIP), seed).eval()


# ---------------------------------------------------------------------------------------------------------
# The layer

def test_layer_shares_base_and_keeps_names():
    base = nn.Linear(8, 6)
    layer = LoRALinear(base, rank=3, alpha=1.5)
    assert layer.weight is base.weight and layer.bias is base.bias  # shared, not copied
    assert set(layer.state_dict()) == {"weight", "bias", "lora_down.weight", "lora_up.weight"}
    assert not layer.weight.requires_grad and torch.count_nonzero(layer.lora_up.weight) == 0
    assert layer.lora_down.weight.std() > 0
    with torch.device("meta"):
        meta = LoRALinear(nn.Linear(1280, 1280, dtype=torch.float16), rank=32)
    assert meta.lora_down.weight.is_meta and meta.lora_up.weight.dtype == torch.float16


def test_fp32_lora_on_bf16_base():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 6, dtype=torch.bfloat16), rank=2)
    for p in (layer.lora_down.weight, layer.lora_up.weight):  # trainers keep the trained weights in fp32
        p.data = torch.randn(p.shape)
    y = layer(torch.randn(3, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and layer.lora_up.weight.dtype == torch.float32


def test_per_sample_scale_on_2d_input_and_bad_shape():
    torch.manual_seed(0)
    layer = _train_like(nn.Sequential(LoRALinear(nn.Linear(8, 6), rank=2)))[0]
    x = torch.randn(3, 8)
    layer.scale = [0.0, 1.0, 0.5]
    got = layer(x)
    assert torch.equal(got[0], nn.functional.linear(x, layer.weight, layer.bias)[0])
    layer.scale = 1.0
    torch.testing.assert_close(got[1], layer(x)[1], atol=1e-6, rtol=0)
    layer.scale = [1.0, 1.0]
    with pytest.raises(ValueError, match="scale list"):
        layer(x)


# ---------------------------------------------------------------------------------------------------------
# Injected into the UNet: exactness at init / scale 0, per-sample scale, merge, training

def test_init_and_scale_zero_are_bit_identical(pair, unet):
    x = _inputs()
    with torch.no_grad():
        base = pair[1](**x)
        names = inject_lora(unet, rank=4)
        assert torch.equal(unet(**x), base)  # up = 0: training starts exactly at the pretrained model
        _train_like(unet)
        on = unet(**x)
        with lora_scale(unet, 0.0):
            off = unet(**x)
        assert torch.equal(unet(**x), on)  # the context manager restored scale 1
    assert len(names) == 4 * 2 * (2 * 2 + 2 * 3 + 3 + 3 * 3 + 3 * 2)  # 4 projections x attn1/attn2 x 28 blocks
    assert all(n.endswith(UNET_ATTN) for n in names)
    assert torch.equal(off, base)
    assert (on - base).abs().max() > 1e-3  # the LoRA does change the output


def test_per_sample_scale_mixes_theta_and_phi_in_one_batch(pair, unet):
    x = _inputs(batch=3)
    inject_lora(unet, rank=4)
    _train_like(unet)
    with torch.no_grad():
        base = pair[1](**x)
        on = unet(**x)
        set_lora_scale(unet, [1.0, 0.0, 1.0])
        mixed = unet(**x)
    assert torch.equal(mixed[1], base[1])  # "LoRA off" rows are exactly the base model
    diff = (mixed[[0, 2]] - on[[0, 2]]).abs().max().item()
    print(f"per-sample scale, LoRA-on rows vs scale 1.0: max abs diff {diff:.3g}")
    assert diff <= 1e-6


def test_per_sample_scale_equals_separate_calls(pair, unet):
    """scale [1, 0, 0.5] in one batch of 3 = three batch-1 calls with float scales 1, 0 and 0.5."""
    x = _inputs(batch=3)
    inject_lora(unet, rank=4)
    _train_like(unet)
    rows = [{k: v[i:i + 1] for k, v in x.items()} for i in range(3)]
    with torch.no_grad():
        set_lora_scale(unet, [1.0, 0.0, 0.5])
        mixed = unet(**x)
        alone = []
        for row, s in zip(rows, (1.0, 0.0, 0.5)):
            set_lora_scale(unet, s)
            alone.append(unet(**row))
        base, base2 = pair[1](**rows[1]), pair[1](**rows[2])
    diff = max((mixed[i:i + 1] - alone[i]).abs().max().item() for i in range(3))
    print(f"per-sample scale in one batch vs three separate calls: max abs diff {diff:.3g}")
    assert diff <= 1e-5
    assert torch.equal(alone[1], base)  # float 0 skips the branch: the base model bit for bit
    assert (alone[2] - base2).abs().max() > 1e-3  # scale 0.5 really adds the LoRA

def test_merge_unmerge(unet):
    x = _inputs()
    inject_lora(unet, rank=4, alpha=2.0, targets=UNET_KOHYA)
    _train_like(unet)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        want = unet(**x)
        for m in lora_modules(unet).values():
            m.merge()
        got = unet(**x)
        for m in lora_modules(unet).values():
            m.unmerge()
    d_out = (got - want).abs().max().item()
    after = unet.state_dict()
    d_w = max((after[k] - v).abs().max().item() for k, v in before.items())
    print(f"merged vs unmerged output: {d_out:.3g}; weights after unmerge: {d_w:.3g}")
    assert d_out <= 1e-5 and d_w <= 1e-6


def test_only_lora_trains_and_gradients_reach_it(unet):
    inject_lora(unet, rank=4)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_down.weight", ".lora_up.weight")) for n in trainable)
    assert sorted(trainable) == sorted(lora_state_dict(unet))
    unet(**_inputs()).square().mean().backward()
    ups = [m.lora_up.weight.grad for m in lora_modules(unet).values()]
    downs = [m.lora_down.weight.grad for m in lora_modules(unet).values()]
    assert all(g is not None for g in ups + downs)
    assert all(g.abs().max() > 0 for g in ups)  # random down -> up learns from step 1
    assert all(torch.count_nonzero(g) == 0 for g in downs)  # up = 0 -> no signal to down yet
    assert all(p.grad is None for n, p in unet.named_parameters() if not p.requires_grad)


def test_text_encoder_targets():
    te = _clip()
    names = inject_lora(te, rank=2, targets=TEXT_ALL)
    assert len(names) == 2 * 6 and "text_model.encoder.layers.1.mlp.fc2" in names
    assert "text_projection" not in " ".join(names)


# ---------------------------------------------------------------------------------------------------------
# Real SDXL sizes on the meta device

def _meta_sdxl_unet():
    with torch.device("meta"):
        return UNet(load_unet_config(DATA / "unet" / "config.json"))


def test_sdxl_trainable_parameter_counts():
    model = _meta_sdxl_unet()
    assert len(inject_lora(model, rank=4)) == 560
    assert sum(p.numel() for p in lora_parameters(model)) == 5_806_080
    model = _meta_sdxl_unet()
    inject_lora(model, rank=32)
    assert sum(p.numel() for p in lora_parameters(model)) == 46_448_640
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 46_448_640


def _digest(names):
    return hashlib.sha256(("\n".join(sorted(names)) + "\n").encode()).hexdigest()


def test_sdxl_kohya_default_targets_diffusers_names():
    model = _meta_sdxl_unet()
    names = inject_lora(model, rank=1, targets=UNET_KOHYA)
    assert len(names) == 722
    assert _digest(names) == "c160683cde09c2127ad4573cb6afb27041e454a9734380f019aa691c84829c9f"


def test_sdxl_kohya_names():
    config = load_unet_config(DATA / "unet" / "config.json")
    names = inject_lora(_meta_sdxl_unet(), rank=1, targets=UNET_KOHYA)
    kohya = [kohya_name("unet", n, config) for n in names]
    assert _digest(kohya) == "b5a147c01a66b153ee2f8bbdd1a37474eb54e0bde3b5a17f03d3ba4c8bd536e2"


# ---------------------------------------------------------------------------------------------------------
# Files

def _trained_components(unet, rank=4, alpha=2.5):
    inject_lora(unet, rank=rank, alpha=alpha)
    te = _clip()
    inject_lora(te, rank=2, alpha=8.0, targets=TEXT_ALL)
    _train_like(unet), _train_like(te, seed=2)
    layers = {"unet": lora_layers(unet), "text_encoder": lora_layers(te)}
    name = next(iter(layers["unet"]))
    layers["unet"][name] = (*layers["unet"][name][:2], 7.0)  # one module with its own alpha
    return layers, te


def _assert_same(got, want):
    assert got.keys() == want.keys()
    for comp in want:
        assert got[comp].keys() == want[comp].keys()
        for name, (d, u, a) in want[comp].items():
            gd, gu, ga = got[comp][name]
            assert torch.equal(gd, d) and torch.equal(gu, u) and ga == a, (comp, name)


def test_peft_round_trip(tmp_path, unet):
    layers, _ = _trained_components(unet)
    meta = {"base_model": "stabilityai/stable-diffusion-xl-base-1.0", "token": "<sks>", "loss": "dco", "beta": "1000"}
    path = save_lora_peft(tmp_path, layers, meta)
    assert Path(path).name == "pytorch_lora_weights.safetensors" and not list(tmp_path.glob("*.tmp"))
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in keys
    state, got_meta = load_lora_file(path)
    _assert_same(state, layers)
    assert {k: got_meta[k] for k in meta} == meta
    config = json.loads(got_meta["lora_adapter_metadata"])
    assert config["unet.r"] == 4 and config["unet.lora_alpha"] == 2.5 and config["text_encoder.lora_alpha"] == 8.0


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_saved_file_applied_to_fresh_model_gives_same_output(tmp_path, pair, unet, fmt):
    x = _inputs()
    inject_lora(unet, rank=4, alpha=2.5, targets=UNET_KOHYA)
    _train_like(unet)
    if fmt == "peft":
        state, _ = load_lora_file(save_lora_peft(tmp_path, {"unet": unet}))
    else:
        path = save_lora_kohya(tmp_path, {"unet": unet}, pair[2])
        state, _ = load_lora_file(path, {"unet": pair[1]}, pair[2])
    fresh = copy.deepcopy(pair[1])
    assert sorted(apply_lora(fresh, state["unet"])) == sorted(lora_layers(unet))
    with torch.no_grad():
        assert torch.equal(fresh(**x), unet(**x))


@pytest.mark.parametrize("spelling", ["lora.down", "lora_linear_layer"])
def test_loads_diffusers_saved_spellings(tmp_path, unet, spelling):
    layers, _ = _trained_components(unet, alpha=None)
    layers["unet"] = {n: (d, u, 4.0) for n, (d, u, _) in layers["unet"].items()}  # these files carry no alpha
    layers["text_encoder"] = {n: (d, u, 2.0) for n, (d, u, _) in layers["text_encoder"].items()}
    path = save_lora_peft(tmp_path, layers)
    down, up = {"lora.down": (".lora.down.", ".lora.up."), "lora_linear_layer": (".lora_linear_layer.down.",
                                                                              ".lora_linear_layer.up.")}[spelling]
    renamed = {k.replace(".lora_A.", down).replace(".lora_B.", up): v for k, v in load_file(path).items()}
    save_file(renamed, tmp_path / "old.safetensors")
    _assert_same(load_lora_file(tmp_path / "old.safetensors")[0], layers)


def test_kohya_round_trip_sgm_names(tmp_path, pair, unet):
    layers, te = _trained_components(unet)
    path = save_lora_kohya(tmp_path, layers, pair[2], {"rank": "4"})
    assert Path(path).name == "lora_kohya.safetensors"
    with safe_open(path, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha" in keys and meta["rank"] == "4"
    state, _ = load_lora_file(path, {"unet": unet, "text_encoder": te}, pair[2])
    _assert_same(state, layers)


def test_kohya_round_trip_diffusers_block_names(tmp_path, unet):
    layers, te = _trained_components(unet)
    tensors = {}
    for comp, ls in layers.items():
        for name, (d, u, a) in ls.items():
            k = kohya_name(comp, name, sgm=False)
            tensors.update({f"{k}.lora_down.weight": d, f"{k}.lora_up.weight": u, f"{k}.alpha": torch.tensor(a)})
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in tensors
    save_file(tensors, tmp_path / "kohya_diffusers.safetensors")
    state, _ = load_lora_file(tmp_path / "kohya_diffusers.safetensors", {"unet": list(lora_layers(unet)),
                                                                         "text_encoder": te})
    _assert_same(state, layers)


@pytest.mark.parametrize("prefix", ["lora_te1_", "lora_te_"])
def test_kohya_missing_alpha_means_rank(tmp_path, prefix):
    stem = prefix + "text_model_encoder_layers_0_self_attn_q_proj"
    save_file({stem + ".lora_down.weight": torch.randn(3, 32), stem + ".lora_up.weight": torch.randn(32, 3)},
              tmp_path / "a.safetensors")
    state, _ = load_lora_file(tmp_path / "a.safetensors", {"text_encoder": _clip()})
    assert state["text_encoder"]["text_model.encoder.layers.0.self_attn.q_proj"][2] == 3.0


def test_clear_errors(tmp_path, unet):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_lora_file(tmp_path / "nope.safetensors")
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    with pytest.raises(ValueError, match=r"attn2\.to_k.*\(4, 99\).*\(64, 32\).*another base"):
        apply_lora(unet, {name: (torch.zeros(4, 99), torch.zeros(64, 4), 4.0)})
    with pytest.raises(ValueError, match="'mid_block.nothing'.*another model"):
        apply_lora(unet, {"mid_block.nothing": (torch.zeros(4, 32), torch.zeros(64, 4), 4.0)})
    assert not lora_modules(unet)  # nothing was half-applied
    save_file({"lora_unet_input_blocks_99_1_proj_in.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_input_blocks_99_1_proj_in.lora_up.weight": torch.zeros(4, 2)}, tmp_path / "k.safetensors")
    with pytest.raises(ValueError, match="matches no module"):
        load_lora_file(tmp_path / "k.safetensors", {"unet": unet})
    save_file({"unet.conv_in.lora_A.weight": torch.zeros(2, 4, 3, 3),
               "unet.conv_in.lora_B.weight": torch.zeros(32, 2, 1, 1)}, tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="conv LoRA"):
        load_lora_file(tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="str -> str"):
        save_lora_peft(tmp_path, {"unet": {}}, {"rank": 4})
    with pytest.raises(ValueError, match="nothing to save"):
        save_lora_peft(tmp_path, {"unet": unet})


# ---------------------------------------------------------------------------------------------------------
# Several LoRAs at once

def _random_state(names, shapes, rank, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g), alpha)
            for n, (o, i) in zip(names, shapes)}


def _delta(down, up, alpha):
    return up.double() @ down.double() * (alpha / down.shape[0])


def test_concat_loras_sums_deltas_exactly():
    names, shapes = ["a", "b", "c"], [(6, 5), (4, 7), (3, 3)]
    s1 = _random_state(names, shapes, 2, 1.0, seed=0)
    s2 = _random_state(names[1:], shapes[1:], 5, 16.0, seed=1)
    merged = concat_loras([s1, s2], [1.0, 0.8])
    for n in names:
        want = _delta(*s1[n]) + (0.8 * _delta(*s2[n]) if n in s2 else 0)
        diff = (_delta(*merged[n]) - want).abs().max().item()
        assert diff <= 1e-6, (n, diff)
    assert merged["b"][0].shape == (7, 7) and merged["b"][2] == 7.0
    assert merged["a"][0] is s1["a"][0] and merged["a"][2] == 1.0  # a lone LoRA keeps its own alpha


def test_apply_two_loras_equals_sum(unet):
    modules = dict(unet.named_modules())
    names = inject_lora(copy.deepcopy(unet), rank=1)[:6]
    shapes = [tuple(modules[n].weight.shape) for n in names]
    s1, s2 = _random_state(names, shapes, 4, 2.0, 0), _random_state(names[:3], shapes[:3], 8, 8.0, 1)
    weights = {n: modules[n].weight.detach().clone() for n in names}
    apply_lora(unet, s1, multiplier=1.0)
    apply_lora(unet, s2, multiplier=0.8)
    for n in names:
        want = _delta(*s1[n]) + (0.8 * _delta(*s2[n]) if n in s2 else 0)
        m = unet.get_submodule(n)
        assert m.weight is modules[n].weight and torch.equal(m.weight, weights[n])  # base untouched
        assert (m.delta_weight().double() - want).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------------------
# diffusers as the oracle

def _diffusers_merged(theirs, state_dict, alphas):
    """Apply a diffusers-converted kohya LoRA to a copy of the diffusers UNet by hand: W += alpha/r B A."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    (alpha,) = set(alphas.values())  # one alpha for all: what diffusers then passes to peft as lora_alpha
    state_dict = convert_unet_state_dict_to_peft(state_dict)  # diffusers' own legacy -> module-path renaming
    model = copy.deepcopy(theirs)
    with torch.no_grad():
        for key, down in state_dict.items():
            if key.endswith(".lora_A.weight"):
                stem = key.removesuffix(".lora_A.weight")
                up = state_dict[stem + ".lora_B.weight"]
                model.get_submodule(stem.removeprefix("unet.")).weight += up @ down * (alpha / down.shape[0])
    return model


def _diffusers_out(model, x):
    with torch.no_grad():
        return model(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
                     added_cond_kwargs={"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}).sample


def test_diffusers_reads_our_kohya_file(tmp_path, pair, unet):
    from diffusers import StableDiffusionXLPipeline

    theirs, _, config = pair
    x = _inputs()
    inject_lora(unet, rank=4, alpha=1.0, targets=UNET_KOHYA)  # alpha != rank
    _train_like(unet)
    path = save_lora_kohya(tmp_path, {"unet": unet}, config)
    sd, alphas = StableDiffusionXLPipeline.lora_state_dict(str(tmp_path), weight_name=Path(path).name,
                                                           unet_config=theirs.config)
    assert len(sd) == 2 * len(lora_layers(unet)) and len(alphas) == len(lora_layers(unet))
    want = _diffusers_out(_diffusers_merged(theirs, sd, alphas), x)
    with torch.no_grad():
        got = unet(**x)
    diff = (got - want).abs().max().item()
    print(f"kohya file through diffusers' converter vs ours: max abs diff {diff:.3g}")
    assert diff <= 1e-5 and (want - _diffusers_out(theirs, x)).abs().max() > 1e-3


def test_diffusers_loads_our_peft_file(tmp_path, pair, unet):
    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (not installed)")
    theirs = copy.deepcopy(pair[0])
    x = _inputs()
    inject_lora(unet, rank=4, alpha=1.0)  # alpha != rank: only right if diffusers reads our metadata
    _train_like(unet)
    unet.get_submodule("mid_block.attentions.0.transformer_blocks.1.attn2.to_v").alpha = 3.0  # -> alpha_pattern
    save_lora_peft(tmp_path, {"unet": unet})
    theirs.load_lora_adapter(str(tmp_path), prefix="unet", weight_name="pytorch_lora_weights.safetensors")
    want = _diffusers_out(theirs, x)
    with torch.no_grad():
        got = unet(**x)
    diff = (got - want).abs().max().item()
    print(f"PEFT file loaded by diffusers (peft) vs ours: max abs diff {diff:.3g}")
    assert diff <= 1e-5 and (want - _diffusers_out(pair[0], x)).abs().max() > 1e-3


def test_diffusers_loads_our_kohya_file_with_peft(tmp_path, pair, unet):
    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (not installed)")
    from diffusers import StableDiffusionXLPipeline

    theirs, _, config = copy.deepcopy(pair[0]), None, pair[2]
    x = _inputs()
    inject_lora(unet, rank=4, alpha=1.0, targets=UNET_KOHYA)
    _train_like(unet)
    path = save_lora_kohya(tmp_path, {"unet": unet}, config)
    sd, alphas = StableDiffusionXLPipeline.lora_state_dict(path, unet_config=theirs.config)
    theirs.load_lora_adapter(sd, prefix="unet", network_alphas=alphas)
    want = _diffusers_out(theirs, x)
    with torch.no_grad():
        got = unet(**x)
    diff = (got - want).abs().max().item()
    print(f"kohya file loaded by diffusers (peft) vs ours: max abs diff {diff:.3g}")
    assert diff <= 1e-5 and (want - _diffusers_out(pair[0], x)).abs().max() > 1e-3


def test_diffusers_loads_our_text_encoder_lora(tmp_path):
    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (not installed)")
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModel as HFCLIPTextModel

    torch.manual_seed(0)
    theirs = randomize(HFCLIPTextModel(CLIPTextConfig(**TINY_CLIP))).eval()
    ours = CLIPTextModel(TINY_CLIP, with_projection=False, eos_token_id=99).eval()
    sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in theirs.state_dict().items()}
    ours.load_state_dict({k: v for k, v in sd.items() if "position_ids" not in k}, strict=True)
    inject_lora(ours, rank=2, alpha=5.0, targets=TEXT_ALL)
    _train_like(ours)
    save_lora_peft(tmp_path, {"text_encoder": ours})
    state, alphas, meta = StableDiffusionXLPipeline.lora_state_dict(str(tmp_path), return_lora_metadata=True)
    ids = torch.tensor([[5, 17, 42, 99, 0, 0, 0, 0], [7, 99, 3, 3, 3, 3, 3, 3]])
    with torch.no_grad():
        base = theirs(ids, output_hidden_states=True).hidden_states[-1]
    StableDiffusionXLPipeline.load_lora_into_text_encoder(state, alphas, theirs, prefix="text_encoder", metadata=meta)
    with torch.no_grad():
        want = theirs(ids, output_hidden_states=True).hidden_states[-1]
        got = ours(ids)[0][-1]
    diff = (got - want).abs().max().item()
    print(f"text-encoder PEFT file loaded by diffusers (peft) vs ours: max abs diff {diff:.3g}")
    assert diff <= 1e-5 and (want - base).abs().max() > 1e-3
