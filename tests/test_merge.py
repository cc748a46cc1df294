"""merge.py: the merged LoRA's update is exactly sum_i w_i dW_i in both file formats (different ranks and alphas, layers
only some LoRAs have, text-encoder layers too); our UNet with it equals the UNet with the LoRAs applied one by one,
and diffusers loading our merged PEFT file agrees; learned tokens are concatenated; --into-base bakes the sum into a
UNet file our loader reads; --analyze measures known geometry; every user error is one line and writes nothing.
Tiny random SDXL (tests/tiny_sdxl.py), CPU, fp32."""
import copy
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import merge
import sample
from lora import KOHYA_FILE, PEFT_FILE, UNET_ATTN, apply_lora, load_lora_file, save_lora_kohya, save_lora_peft
from sdxl import load_sdxl

REPO = Path(__file__).resolve().parent.parent



@pytest.fixture(scope="module")
def base(tiny_sdxl):
    """Our loaded tiny SDXL, never modified."""
    return load_sdxl(str(tiny_sdxl[0]))


def _random_layers(model, targets, rank, alpha, seed):
    """A trained-looking LoRA {module: (down, up, alpha)} on every Linear of `model` ending with one of `targets`."""
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(rank, m.in_features, generator=g) / m.in_features ** 0.5,
                torch.randn(m.out_features, rank, generator=g) * 0.3, alpha)
            for n, m in model.named_modules() if type(m) is nn.Linear and n.endswith(targets)}


def _save_embeds(folder, tokens, init_words, width, seed):
    g = torch.Generator().manual_seed(seed)
    n = len(tokens.split(","))
    embeds = {"clip_l": torch.randn(n, width, generator=g), "clip_g": torch.randn(n, width, generator=g)}
    save_file(embeds, str(folder / "learned_embeds.safetensors"), metadata={"token": tokens, "init_word": init_words})
    return embeds


@pytest.fixture(scope="module")
def loras(tmp_path_factory, base):
    """Three trainer-like folders, {name: (folder, {component: layers}, embeds)}:
    dog   PEFT + kohya files, UNet attention rank 4 alpha 2 + CLIP-L q/v rank 2, token <dog> (init dog);
    style PEFT file, UNet to_k/to_v/ff.net.2 rank 3 alpha 5, tokens <s1>,<s2> (init words 'art' and none);
    toy   kohya file only, UNet to_q/proj_in rank 2 alpha 1, no tokens."""
    root = tmp_path_factory.mktemp("loras")
    unet, cfg = base.unet, base.unet.config
    dog = {"unet": _random_layers(unet, UNET_ATTN, 4, 2.0, 1),
           "text_encoder": _random_layers(base.text_encoder, ("q_proj", "v_proj"), 2, 2.0, 2)}
    style = {"unet": _random_layers(unet, ("to_k", "to_v", "ff.net.2"), 3, 5.0, 3)}
    toy = {"unet": _random_layers(unet, ("to_q", "proj_in"), 2, 1.0, 4)}
    meta = {"base_model": "tiny", "rank": "4"}
    save_lora_peft(root / "dog", dog, meta)
    save_lora_kohya(root / "dog", dog, cfg, meta)
    save_lora_peft(root / "style", style)
    save_lora_kohya(root / "toy", toy, cfg)
    return {"dog": (root / "dog", dog, _save_embeds(root / "dog", "<dog>", "dog", 32, 5)),
            "style": (root / "style", style, _save_embeds(root / "style", "<s1>,<s2>", "art,", 32, 6)),
            "toy": (root / "toy", toy, None)}


def _delta(down, up, alpha):
    return (alpha / down.shape[0]) * up.double() @ down.double()


def _modules(sd):
    return {"unet": sd.unet, "text_encoder": sd.text_encoder, "text_encoder_2": sd.text_encoder_2}


def _run(tiny_sdxl, *args):
    merge.main([str(a) for a in args] + ["--model", str(tiny_sdxl[0])])


def _unet_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700, 30]), torch.randn(2, 7, 64, generator=g),
            torch.randn(2, 32, generator=g), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))


# ----------------------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("names,weights", [(("dog", "style"), (0.7, 1.3)), (("dog", "style", "toy"), (1.0, -0.5, 2.0))])
def test_merged_delta_is_exact_in_both_formats(tiny_sdxl, tmp_path, base, loras, names, weights):
    out = tmp_path / "merged"
    _run(tiny_sdxl, *(loras[n][0] for n in names), "--weights", *weights, "--output", out)
    want = {}
    for n, w in zip(names, weights):
        for comp, layers in loras[n][1].items():
            for module, layer in layers.items():
                key = (comp, module)
                want[key] = want.get(key, 0) + w * _delta(*layer)
    for fmt in (PEFT_FILE, KOHYA_FILE):
        state, meta = load_lora_file(str(out / fmt), _modules(base), base.unet.config)
        got = {(c, m): _delta(*layer) for c, layers in state.items() for m, layer in layers.items()}
        assert set(got) == set(want)
        diff = max((got[k] - want[k]).abs().max().item() for k in want)
        ranks = sorted({d.shape[0] for layers in state.values() for d, _, _ in layers.values()})
        print(f"{'+'.join(names)} {fmt}: {len(got)} layers, ranks {ranks}, max |dW - sum w_i dW_i| {diff:.3g}")
        assert diff <= 1e-6
        record = json.loads(meta["merged_from"])
        assert [r["weight"] for r in record] == list(weights)
        assert [r["source"] for r in record] == [str(loras[n][0]) for n in names]
    assert record[0]["metadata"] == {"base_model": "tiny", "rank": "4"} and record[0]["tokens"] == ["<dog>"]
    assert json.loads((out / "merge_config.json").read_text())["merged_from"] == record
    # the layers only one LoRA has keep their rank; the shared ones stack ranks (dog 4 + style 3 on to_k/to_v)
    k = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"
    assert state["unet"][k][0].shape[0] == 7 and state["unet"][k.replace("to_k", "to_out.0")][0].shape[0] == 4


# ----------------------------------------------------------------------------------------------------------
# Behaviour: our UNet, sample.py, diffusers


@pytest.fixture(scope="module")
def dog_in_style(tiny_sdxl, tmp_path_factory, loras):
    out = tmp_path_factory.mktemp("merged") / "dog_in_style"
    _run(tiny_sdxl, loras["dog"][0], loras["style"][0], "--weights", 0.7, 1.3, "--output", out)
    return out


def _baked(model, layers_and_weights):
    """A copy of `model` with W += w * alpha/r * up @ down for every LoRA: the sum done by hand."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for layers, w in layers_and_weights:
            for name, (down, up, alpha) in layers.items():
                model.get_submodule(name).weight += w * alpha / down.shape[0] * up @ down
    return model


def test_merged_lora_behaves_like_both_applied(tiny_sdxl, base, loras, dog_in_style):
    two = copy.deepcopy(base.unet)
    apply_lora(two, loras["dog"][1]["unet"], 0.7)
    apply_lora(two, loras["style"][1]["unet"], 1.3)
    by_hand = _baked(base.unet, [(loras["dog"][1]["unet"], 0.7), (loras["style"][1]["unet"], 1.3)])
    one = copy.deepcopy(base.unet)
    apply_lora(one, load_lora_file(str(dog_in_style / PEFT_FILE))[0]["unet"])
    fresh = load_sdxl(str(tiny_sdxl[0]))  # what `sample.py --lora output/dog_in_style` does
    tokens = sample.load_lora(fresh, str(dog_in_style))
    assert tokens == {"<dog>": "dog", "<s1>": "art", "<s2>": None}
    x = _unet_inputs()
    with torch.no_grad():
        want, got, got_sample, hand, plain = two(*x), one(*x), fresh.unet(*x), by_hand(*x), base.unet(*x)
        te = _baked(base.text_encoder, [(loras["dog"][1]["text_encoder"], 0.7)])
        ids = base.tokenizer("a photo of a dog")
        te_diff = (fresh.text_encoder(ids)[0][-2] - te(ids)[0][-2]).abs().max().item()
    diff, diff_sample, diff_hand = ((a - want).abs().max().item() for a in (got, got_sample, hand))
    print(f"UNet with merged LoRA vs apply_lora x2: {diff:.3g}; via sample.load_lora: {diff_sample:.3g}; W + sum by "
          f"hand vs apply_lora x2: {diff_hand:.3g}; text encoder: {te_diff:.3g}; "
          f"LoRA effect {(want - plain).abs().max().item():.3g}")
    assert max(diff, diff_sample, diff_hand, te_diff) <= 1e-5 and (want - plain).abs().max() > 1e-2


def test_diffusers_loads_merged_peft_file(tiny_sdxl, base, dog_in_style):
    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (not installed)")
    pipe = copy.deepcopy(tiny_sdxl[1])
    pipe.load_lora_weights(str(dog_in_style))
    ours = copy.deepcopy(base.unet)
    apply_lora(ours, load_lora_file(str(dog_in_style / PEFT_FILE))[0]["unet"])
    x, t, ctx, pooled, ids = _unet_inputs(1)
    with torch.no_grad():
        want = pipe.unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        got, plain = ours(x, t, ctx, pooled, ids), base.unet(x, t, ctx, pooled, ids)
    diff = (got - want).abs().max().item()
    print(f"merged PEFT file in diffusers (load_lora_weights) vs ours: max abs diff {diff:.3g}")
    assert diff <= 1e-5 and (want - plain).abs().max() > 1e-2


def test_diffusers_loads_merged_kohya_file(tiny_sdxl, base, dog_in_style):
    """The merged kohya file (stacked ranks 7 and 4, one alpha per layer) read by diffusers' kohya converter and loaded
    into its UNet (peft): the same UNet output as ours with the merged PEFT file. (Not load_lora_weights: for the
    CLIP-L layers, q/v only here, diffusers 0.42 cannot infer the format unless out_proj layers are present.)"""
    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (not installed)")
    from diffusers import StableDiffusionXLPipeline

    pipe = copy.deepcopy(tiny_sdxl[1])
    state, alphas = StableDiffusionXLPipeline.lora_state_dict(str(dog_in_style / KOHYA_FILE),
                                                              unet_config=pipe.unet.config)
    pipe.unet.load_lora_adapter(state, prefix="unet", network_alphas=alphas)
    ours = copy.deepcopy(base.unet)
    apply_lora(ours, load_lora_file(str(dog_in_style / PEFT_FILE))[0]["unet"])
    x, t, ctx, pooled, ids = _unet_inputs(3)
    with torch.no_grad():
        want = pipe.unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        got, plain = ours(x, t, ctx, pooled, ids), base.unet(x, t, ctx, pooled, ids)
    diff = (got - want).abs().max().item()
    print(f"merged kohya file in diffusers (kohya converter, load_lora_adapter) vs ours: max abs diff {diff:.3g}")
    assert diff <= 1e-5 and (want - plain).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------------------
# Learned tokens


def test_learned_embeddings_are_concatenated(loras, dog_in_style):
    with safe_open(str(dog_in_style / "learned_embeds.safetensors"), "pt") as f:
        meta, rows = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    # the sources' metadata is the comma-separated form of files written before the JSON lists: still read
    assert json.loads(meta["token"]) == ["<dog>", "<s1>", "<s2>"] and json.loads(meta["init_word"]) == ["dog", "art", ""]
    for key in ("clip_l", "clip_g"):
        assert torch.equal(rows[key], torch.cat([loras["dog"][2][key], loras["style"][2][key]]))


def _no_output(out):
    assert not out.exists() and not list(out.parent.glob(out.name + ".tmp*"))


def _error(tiny_sdxl, *args):
    """Run merge.main in-process, expect the one-line `error: ...` exit; return the message."""
    with pytest.raises(SystemExit) as e:
        _run(tiny_sdxl, *args)
    msg = str(e.value.code)
    print(msg)
    assert msg.startswith("error: ") and "\n" not in msg
    return msg


def test_duplicate_token_is_an_error(tiny_sdxl, tmp_path, loras):
    other = tmp_path / "dog2"
    other.mkdir()
    shutil.copy(loras["style"][0] / PEFT_FILE, other / PEFT_FILE)
    _save_embeds(other, "<DOG>", "dog", 32, 7)  # CLIP matches added tokens case-insensitively
    out = tmp_path / "out"
    msg = _error(tiny_sdxl, loras["dog"][0], other, "--output", out)
    assert "<DOG>" in msg and str(loras["dog"][0]) in msg and str(other) in msg
    _no_output(out)


# ----------------------------------------------------------------------------------------------------------
# --into-base


def test_into_base_bakes_the_sum_into_a_unet_file(tiny_sdxl, tmp_path, base, loras):
    model = tmp_path / "baked_model"  # a copy of the base whose UNet file we overwrite with the baked one
    shutil.copytree(tiny_sdxl[0], model)
    target = model / "unet" / "diffusion_pytorch_model.safetensors"
    _run(tiny_sdxl, loras["dog"][0], loras["style"][0], loras["toy"][0], "--weights", 0.7, 1.3, 2,
         "--into-base", target, "--precision", "fp32")
    baked = load_sdxl(str(model)).unet
    want = copy.deepcopy(base.unet)
    for name, w in (("dog", 0.7), ("style", 1.3), ("toy", 2.0)):
        apply_lora(want, loras[name][1]["unet"], w)
    x = _unet_inputs(2)
    with torch.no_grad():
        got, want, plain = baked(*x), want(*x), base.unet(*x)
    diff = (got - want).abs().max().item()
    print(f"UNet loaded from the --into-base file vs base + LoRAs: max abs diff {diff:.3g}")
    assert diff <= 1e-5 and (want - plain).abs().max() > 1e-2
    with safe_open(str(target), "pt") as f:
        assert len(json.loads(f.metadata()["merged_from"])) == 3

    half = tmp_path / "half.safetensors"  # default dtype: fp16, SDXL's own
    _run(tiny_sdxl, loras["dog"][0], loras["toy"][0], "--into-base", half)
    sd = load_file(str(half))
    assert set(sd) == set(load_file(str(target))) and all(v.dtype == torch.float16 for v in sd.values())


# ----------------------------------------------------------------------------------------------------------
# --analyze


def test_analyze_known_geometry(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    e = torch.eye(8)
    v = torch.randn(1, 6, generator=g).abs() + 0.1  # a dense down: no column of dW is zero
    up4, down4 = torch.randn(4, 3, generator=g), torch.randn(3, 6, generator=g)
    a = {"orth": (down4, torch.cat([up4, torch.zeros(4, 3)]), 3.0),  # writes to outputs 0-3 ...
         "same": (down4.clone(), torch.randn(8, 3, generator=g), 3.0),
         "half": (v, e[:, [0]], 1.0), "only_a": (v.clone(), e[:, [0]], 1.0)}
    b = {"orth": (torch.randn(2, 6, generator=g), torch.cat([torch.zeros(4, 2), torch.randn(4, 2, generator=g)]), 9.0),
         "same": (3 * down4, -a["same"][1], 1.0),  # ... and outputs 4-7; scale, alpha and sign do not matter
         "half": (v.clone(), e[:, [0]] + e[:, [1]], 1.0)}  # columns at 45 degrees; rows: 0 equal, 1 in b only
    save_lora_peft(tmp_path / "a", {"unet": a})
    save_lora_peft(tmp_path / "b", {"unet": b})
    merge.main(["--analyze", str(tmp_path / "a"), str(tmp_path / "b")])
    printed = capsys.readouterr().out
    print(printed)
    with open(tmp_path / "interference_a_b.csv") as fh:  # default: beside A
        rows = {r["layer"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"unet.orth", "unet.same", "unet.half"}
    s = 0.5 ** 0.5
    want = {"unet.orth": (0.0, 0.0), "unet.same": (1.0, 1.0), "unet.half": (s, 1 / 8)}
    for layer, (col, row) in want.items():
        assert abs(float(rows[layer]["col_cos"]) - col) < 1e-6 and abs(float(rows[layer]["row_cos"]) - row) < 1e-6
    assert rows["unet.orth"]["rank_a"] == "3" and rows["unet.orth"]["rank_b"] == "2"
    assert abs(float(rows["unet.orth"]["col_random"]) - merge.mean_abs_cos_random(8)) < 1e-12
    assert abs(float(rows["unet.orth"]["row_random"]) - merge.mean_abs_cos_random(6)) < 1e-12
    assert f"|cos| columns {(1 + s) / 3:.4f}, rows {(1 + 1 / 8) / 3:.4f}" in printed
    assert "1 layer(s) in only one LoRA" in printed
    # E|cos| of random directions: 2/pi in the plane, 1/2 in space (Archimedes), ~sqrt(2/(pi d)) for large d
    assert abs(merge.mean_abs_cos_random(2) - 2 / torch.pi) < 1e-12 and abs(merge.mean_abs_cos_random(3) - 0.5) < 1e-12
    assert abs(merge.mean_abs_cos_random(2048) / (2 / (torch.pi * 2048)) ** 0.5 - 1) < 1e-3


def test_analyze_identical_loras_is_one(tmp_path, loras, capsys):
    """A LoRA against itself (every rank-4 layer, UNet and text encoder): 1.0 in every layer."""
    merge.main(["--analyze", str(loras["dog"][0]), str(loras["dog"][0]), "--csv", str(tmp_path / "same.csv")])
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "same.csv")))
    assert len(rows) == sum(len(layers) for layers in loras["dog"][1].values())
    worst = max(abs(float(r[k]) - 1) for r in rows for k in ("col_cos", "row_cos", "up_cos", "down_cos"))
    print(f"dog vs dog: {len(rows)} layers, max |mean |cos| - 1| {worst:.3g}")
    assert worst < 1e-6 and "|cos| columns 1.0000, rows 1.0000, up 1.0000, down 1.0000" in printed


def test_analyze_random_loras_look_like_random_directions(tmp_path, loras):
    """Independent random LoRAs: dW_a[:, j] = up_a @ down_a[:, j] is an isotropic Gaussian vector (up_a is iid
    Gaussian), independent of dW_b's, so E|cos| is exactly that of random directions in R^out,
    Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2)) ~ sqrt(2 / (pi d)); rows likewise in R^in."""
    path = tmp_path / "dog_style.csv"
    rows, mean = merge.analyze(str(loras["dog"][0]), str(loras["style"][0]), csv_path=str(path))
    shared = set(loras["dog"][1]["unet"]) & set(loras["style"][1]["unet"])  # to_k, to_v of every attention
    assert len(list(csv.DictReader(open(path)))) == len(rows) == len(shared) == 44
    approx = {k: sum((2 / (torch.pi * d)) ** 0.5 for d in ds) / len(rows) for k, ds in
              (("col", [loras["dog"][1]["unet"][r["layer"][5:]][1].shape[0] for r in rows]),
               ("row", [loras["dog"][1]["unet"][r["layer"][5:]][0].shape[1] for r in rows]))}
    print(f"dog vs style: mean |cos| columns {mean['col_cos']:.4f} (random {mean['col_random']:.4f}, "
          f"sqrt(2/(pi d)) {approx['col']:.4f}), rows {mean['row_cos']:.4f} (random {mean['row_random']:.4f}, "
          f"sqrt(2/(pi d)) {approx['row']:.4f})")
    for k in ("col", "row"):
        assert abs(mean[f"{k}_cos"] / mean[f"{k}_random"] - 1) < 0.1 and abs(mean[f"{k}_cos"] / approx[k] - 1) < 0.1
    assert mean["col_cos"] < 0.2 and mean["row_cos"] < 0.2  # near 0, far from the 1.0 of identical LoRAs
    # the factors themselves: random up columns live in R^out, random down rows in R^in
    assert abs(mean["up_cos"] / mean["col_random"] - 1) < 0.2 and abs(mean["down_cos"] / mean["row_random"] - 1) < 0.2


# ----------------------------------------------------------------------------------------------------------
# Errors: one line, non-zero exit, nothing written


def _bad_shape(loras, folder, module):
    layers = dict(loras["dog"][1]["unet"])
    down, up, alpha = layers[module]
    layers[module] = (torch.zeros(down.shape[0], down.shape[1] + 8), up, alpha)
    save_lora_peft(folder, {"unet": layers})
    return folder


def test_cli_errors(tiny_sdxl, tmp_path, loras):
    out = tmp_path / "out"
    dog, style = loras["dog"][0], loras["style"][0]
    assert "nowhere: no such file or folder" in _error(tiny_sdxl, dog, tmp_path / "nowhere", "--output", out)
    assert "2 LoRAs" in _error(tiny_sdxl, dog, style, "--weights", 1, "--output", out)
    assert "at least two" in _error(tiny_sdxl, dog, "--output", out)
    assert "--into-base needs --model" in str(pytest.raises(SystemExit, merge.main,
                                                            [str(dog), str(style), "--into-base", str(out)]).value.code)
    # a LoRA for another base: the same layer is wider than in the other LoRA ...
    module = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    other = _bad_shape(loras, tmp_path / "other", module)
    msg = _error(tiny_sdxl, dog, other, "--output", out)
    assert f"'unet.{module}'" in msg and "different base models" in msg
    # ... or than in the base (style has no to_out.0, so only the base can tell)
    other2 = _bad_shape(loras, tmp_path / "other2", module.replace("to_k", "to_out.0"))
    msg = _error(tiny_sdxl, style, other2, "--output", out)
    assert f"'unet.{module.replace('to_k', 'to_out.0')}'" in msg and "another base" in msg
    # a kohya file without a base to read its names against
    msg = str(pytest.raises(SystemExit, merge.main, ["--analyze", str(dog), str(loras["toy"][0])]).value.code)
    assert "kohya" in msg and "--model" in msg
    # an output folder that is not an earlier merge is never overwritten
    assert "not an earlier merge" in _error(tiny_sdxl, dog, style, "--output", loras["toy"][0])
    assert (loras["toy"][0] / KOHYA_FILE).exists() and not (loras["toy"][0] / "merge_config.json").exists()
    _no_output(out)
    assert not (tmp_path / "interference_dog_toy.csv").exists()


def test_cli_subprocess_error_is_one_line(tiny_sdxl, tmp_path, loras):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "merge.py", str(loras["dog"][0]), str(loras["style"][0]), "--weights", "1",
                        "--output", str(out), "--model", str(tiny_sdxl[0])], cwd=REPO, capture_output=True, text=True)
    print(r.stderr)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    assert "Traceback" not in r.stderr and r.stdout == ""
    _no_output(out)
