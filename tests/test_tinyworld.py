"""The tiny world: rendering, captions, concepts, tokenizer, pixel metrics (on hand-drawn images), and the shipped
tiny SDXL folder (loads with load_sdxl; its files are the diffusers layout, checked against diffusers/transformers)."""
import json
import os
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sdxl import load_sdxl
from text_encoder import CLIPTokenizer, pre_tokenize
from tinyworld import metrics, model, world

# ----------------------------------------------------------------------------------------------------------
# World


def test_render_is_deterministic_and_scenes_differ():
    a = world.dataset(8, seed=3)
    b = world.dataset(8, seed=3)
    c = world.dataset(8, seed=4)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (8, world.SIZE, world.SIZE, 3) and a[0].dtype == np.uint8
    s = a[2][0]
    assert np.array_equal(world.render(s), world.render(replace(s))) and not np.array_equal(
        world.render(s), world.render(replace(s, dx=s.dx + 0.1)))


def test_captions_state_every_attribute():
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = world.random_scene(rng)
        c = world.caption(s)
        assert c.startswith(f"a {s.size} {s.color} {s.kind} at the {s.position} on a {s.bg} background"), c
        assert c.endswith(", flat style") and s.color != s.bg
        assert world.base_caption(s) == c
    s = world.random_scene(rng, subject="checker")
    assert world.caption(s).startswith(f"a {s.size} <checker> circle at") and "yellow" not in world.caption(s)
    assert world.base_caption(s) == world.caption(s).replace("<checker>", "yellow")
    s = world.random_scene(rng, style="pastel")
    assert world.caption(s).endswith(", <pastel> style")
    assert world.base_caption(s) == world.caption(s).replace("<pastel>", "flat")


def test_concept_folders_are_shipped_and_reproducible(tmp_path):
    for name in [*world.SUBJECTS, *world.STYLES]:
        c = world.concept(name)
        shipped = os.path.join(world.CONCEPTS_DIR, name)
        fresh = world.write_concept(name, str(tmp_path / name))
        pngs = sorted(f for f in os.listdir(shipped) if f.endswith(".png"))
        assert 3 <= len(pngs) <= 5
        for png in pngs:
            stem = os.path.splitext(png)[0]
            text = open(os.path.join(shipped, stem + ".txt")).read().strip()
            assert c.token in text and text == open(os.path.join(fresh, stem + ".txt")).read().strip()
            assert np.array_equal(np.array(Image.open(os.path.join(shipped, png))),
                                  np.array(Image.open(os.path.join(fresh, png))))
        bgs = [s.bg for s in world.reference_scenes(name)]
        assert len(set(bgs)) == len(bgs)  # the concept is the one thing its references share


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return (CLIPTokenizer.from_folder(model.write_tokenizer(str(d / "tokenizer"), model.EOS)),
            CLIPTokenizer.from_folder(model.write_tokenizer(str(d / "tokenizer_2"), "!")))


def test_tokenizer_encodes_world_words_whole(tokenizers):
    tok, tok2 = tokenizers
    assert len(tok.vocab) == len(model.VOCAB) < 700 and tok.vocab["!"] == 0
    assert tok.pad_token_id == tok.eos_token_id == len(model.VOCAB) - 1 and tok2.pad_token_id == 0
    rng = np.random.default_rng(0)
    scenes = [world.random_scene(rng, style=st) for st in ("flat", "pastel") for _ in range(20)]
    for s in scenes:
        c = world.caption(s).replace("<pastel>", "flat")
        ids = tok.encode(c)
        assert len(ids) == len(pre_tokenize(c)) <= model.MAX_LENGTH - 2, c  # one token per word
        assert ids == tok2.encode(c)
    for name in [*world.SUBJECTS, *world.STYLES]:
        assert len(tok.encode(world.concept(name).init_word)) == 1
        assert world.concept(name).token not in tok.vocab
    row = tok2(["a red circle"])[0].tolist()
    assert row[:5] == [tok2.bos_token_id, *tok2.encode("a red circle"), tok2.eos_token_id] and set(row[5:]) == {0}


def test_tokenizer_matches_transformers(tmp_path):
    from transformers import CLIPTokenizer as Reference

    rng = np.random.default_rng(1)
    prompts = [world.caption(world.random_scene(rng)) for _ in range(10)] + ["a big <checker> circle!", "Top, LEFT"]
    for pad in (model.EOS, "!"):
        folder = model.write_tokenizer(str(tmp_path / pad.strip("<|>")), pad)
        ours, ref = CLIPTokenizer.from_folder(folder), Reference.from_pretrained(folder)
        want = ref(prompts, padding="max_length", max_length=model.MAX_LENGTH, truncation=True).input_ids
        assert ours(prompts).tolist() == want


# ----------------------------------------------------------------------------------------------------------
# Metrics, on images drawn by hand with PIL (not with world.render)

RGB = {**world.COLORS, **world.EXTRA_COLORS}


def canvas(bg):
    img = Image.new("RGB", (32, 32), RGB[bg])
    return img, ImageDraw.Draw(img)


def test_parse_hand_drawn_shapes():
    img, d = canvas("blue")
    d.rectangle([2, 2, 17, 17], fill=RGB["red"])  # 16 px square, centre (10, 10): big, top left
    s = world.make_scene("blue", "top left", "big", "red", "square")
    assert metrics.prompt_fidelity(img, s) == {"bg": 1, "color": 1, "kind": 1, "position": 1, "size": 1,
                                               "overall": 1, "all": 1}
    wrong_bg = metrics.prompt_fidelity(img, replace(s, bg="green"))
    assert wrong_bg["bg"] == 0 and wrong_bg["kind"] == 1 and wrong_bg["overall"] == pytest.approx(0.8)
    assert wrong_bg["all"] == 0

    img, d = canvas("white")
    d.ellipse([11, 11, 20, 20], fill=RGB["green"])  # 10 px circle in the centre: small
    p = metrics.parse(img)
    assert (p.bg, p.color, p.kind, p.position, p.size) == ("white", "green", "circle", "center", "small")

    img, d = canvas("purple")
    d.polygon([(22.5, 14), (14, 31), (31, 31)], fill=RGB["yellow"])  # triangle, bottom right, big
    d.point([(0, 0), (31, 0)], fill=RGB["white"])  # a little noise on the border changes nothing
    p = metrics.parse(img)
    assert (p.bg, p.color, p.kind, p.position, p.size) == ("purple", "yellow", "triangle", "bottom right", "big")

    img, d = canvas("yellow")
    d.rectangle([19, 3, 21, 12], fill=RGB["blue"])
    d.rectangle([16, 6, 24, 9], fill=RGB["blue"])  # a plus sign: cross, top right, small
    p = metrics.parse(img)
    assert (p.color, p.kind, p.position, p.size) == ("blue", "cross", "top right", "small")

    empty, _ = canvas("green")
    r = metrics.prompt_fidelity(empty, world.make_scene("green", "center", "big", "red", "circle"))
    assert r["bg"] == 1 and r["kind"] == r["color"] == r["position"] == r["size"] == 0


def checker_circle(bg, colors=("yellow", "cyan"), box=(8, 8, 24, 24), cells=5, stripes=False):
    """A subject drawn by hand: squares (or diagonal bands) of two colours, cut to a circle (or kept square)."""
    img, d = canvas(bg)
    x0, y0, x1, y1 = box
    pattern = Image.new("RGB", (32, 32))
    pd = ImageDraw.Draw(pattern)
    step = (x1 - x0) / cells
    for i in range(-cells, 2 * cells):
        for j in range(cells):
            if stripes:  # "\"-diagonal bands
                pd.polygon([(x0 + i * step, y0), (x0 + (i + 1) * step, y0), (x1 + (i + 1) * step, y1),
                            (x1 + i * step, y1)], fill=RGB[colors[i % 2]])
            elif 0 <= i < cells:
                pd.rectangle([x0 + i * step, y0 + j * step, x0 + (i + 1) * step - 1, y0 + (j + 1) * step - 1],
                             fill=RGB[colors[(i + j) % 2]])
    mask = Image.new("L", (32, 32), 0)
    md = ImageDraw.Draw(mask)
    (md.rectangle if stripes else md.ellipse)([x0, y0, x1 - 1, y1 - 1], fill=255)
    img.paste(pattern, (0, 0), mask)
    return img


def test_subject_fidelity_hand_drawn():
    checker = checker_circle("red")
    score = metrics.subject_fidelity(checker, "checker")
    assert score["shape"] == 1 and score["overall"] > 0.75, score
    stripes = checker_circle("green", ("blue", "pink"), cells=3, stripes=True)  # 3 bands across, as the subject
    assert metrics.subject_fidelity(stripes, "striped")["overall"] > 0.9
    finer = checker_circle("green", ("blue", "pink"), cells=6, stripes=True)  # the same, twice as fine
    assert metrics.subject_fidelity(finer, "striped")["texture"] < 0.3
    assert metrics.subject_fidelity(stripes, "checker")["overall"] < 0.25
    assert metrics.subject_fidelity(checker, "striped")["overall"] < 0.25
    img, d = canvas("red")
    d.ellipse([8, 8, 23, 23], fill=RGB["yellow"])  # a plain yellow circle: the right class, not the subject
    plain = metrics.subject_fidelity(img, "checker")
    assert plain["shape"] == 1 and plain["texture"] == 0 and 0.35 < plain["overall"] < 0.65
    img, d = canvas("white")
    d.rectangle([4, 4, 14, 14], fill=RGB["green"])
    assert metrics.subject_fidelity(img, "checker")["overall"] < 0.1
    # the subject in the pastel style, judged as such; the prompt's context attributes still read right
    soft = Image.fromarray(world.pastel(np.asarray(checker, dtype=float)).round().astype(np.uint8))
    assert metrics.subject_fidelity(soft, "checker", style="pastel")["overall"] > 0.75
    assert metrics.prompt_fidelity(soft, world.make_scene("red", "center", "big", subject="checker"))["all"] == 1


def test_style_fidelity_hand_drawn():
    img, d = canvas("blue")
    d.polygon([(16, 3), (5, 22), (27, 22)], fill=RGB["yellow"])
    plain = np.asarray(img, dtype=float)
    soft = Image.fromarray(world.pastel(plain).round().astype(np.uint8))
    assert metrics.style_fidelity(soft, "pastel") > 0.95 and metrics.style_fidelity(img, "pastel") < 0.05
    s = world.make_scene("blue", "center", "big", "yellow", "triangle")
    assert metrics.prompt_fidelity(soft, s)["all"] == 1  # pastel colours still read as their names

    img, d = canvas("green")
    d.ellipse([6, 6, 25, 25], fill=RGB["white"], outline=(0, 0, 0), width=2)
    assert metrics.style_fidelity(img, "outline") > 0.9 and metrics.style_fidelity(img, "pastel") < 0.05
    p = metrics.parse(img)
    assert (p.color, p.kind, p.position) == ("white", "circle", "center")  # the black ring is not the object
    img, d = canvas("green")
    d.ellipse([6, 6, 25, 25], fill=RGB["white"])
    assert metrics.style_fidelity(img, "outline") == 0


def test_metrics_are_exact_on_the_worlds_own_drawings():
    rng = np.random.default_rng(7)
    scenes = [world.random_scene(rng, style=st) for st in ("flat", "pastel", "outline") for _ in range(20)]
    assert metrics.mean_scores([metrics.prompt_fidelity(world.render(s), s) for s in scenes])["all"] >= 0.95
    for name in world.SUBJECTS:
        refs = world.reference_scenes(name)
        assert np.mean([metrics.subject_fidelity(world.render(s), name)["overall"] for s in refs]) > 0.75
    for name in world.STYLES:
        refs = world.reference_scenes(name)
        assert np.mean([metrics.style_fidelity(world.render(s), name) for s in refs]) > 0.9
        assert np.mean([metrics.style_fidelity(world.render(replace(s, style="flat")), name) for s in refs]) < 0.1


# ----------------------------------------------------------------------------------------------------------
# The model folder


def test_save_model_is_the_diffusers_layout(tmp_path):
    """A random tiny SDXL written by save_model loads in diffusers/transformers and gives our outputs."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    te, te2 = model.build_text_encoders(0)
    folder = model.save_model(str(tmp_path / "m"), model.new_unet(0), model.new_vae(0), te, te2)
    sd = load_sdxl(folder)
    ids = sd.tokenizer_2(["a small red cross at the center on a blue background, flat style"])
    ref_te2 = CLIPTextModelWithProjection.from_pretrained(os.path.join(folder, "text_encoder_2")).eval()
    ref_te = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder")).eval()
    with torch.no_grad():
        hidden, pooled = sd.text_encoder_2(ids)
        out = ref_te2(ids, output_hidden_states=True)
        assert (out.text_embeds - pooled).abs().max() < 1e-5
        assert (out.hidden_states[-2] - hidden[-2]).abs().max() < 1e-5
        ids1 = sd.tokenizer(["a big white circle"])
        assert (ref_te(ids1, output_hidden_states=True).hidden_states[-2] - sd.text_encoder(ids1)[0][-2]).abs().max() < 1e-5
        ref_unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).eval()
        x = torch.randn(2, 4, model.LATENT, model.LATENT)
        ctx, pooled = torch.randn(2, model.MAX_LENGTH, 128), torch.randn(2, model.PROJ_DIM)
        time_ids = torch.tensor([model.MICRO_CONDITIONING] * 2, dtype=torch.float32)
        want = ref_unet(x, 500, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        assert (sd.unet(x, 500, ctx, pooled, time_ids) - want).abs().max() < 1e-5


SHIPPED = os.path.join(model.MODEL_DIR, "model_index.json")


@pytest.mark.skipif(not os.path.exists(SHIPPED), reason="no shipped tiny model (python -m tinyworld.pretrain)")
def test_shipped_model_loads_fast_and_samples():
    from sample import decode, generate_latents

    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(model.MODEL_DIR) for f in fs)
    assert size <= 20 * 2 ** 20
    t0 = time.time()
    sd = load_sdxl(model.MODEL_DIR)
    assert time.time() - t0 < 10
    assert sd.unet.config["block_out_channels"] == model.UNET_CONFIG["block_out_channels"]
    assert sd.unet.config["cross_attention_dim"] == 128 and sd.vae.config["latent_channels"] == 4
    assert 2 ** (len(sd.vae.config["block_out_channels"]) - 1) == model.VAE_FACTOR == 2
    assert sd.text_encoder.text_model.embeddings.token_embedding.num_embeddings == len(model.VOCAB)
    assert sd.text_encoder_2.text_projection.out_features == model.PROJ_DIM
    with open(os.path.join(model.MODEL_DIR, "unet", "config.json")) as f:
        assert json.load(f)["addition_embed_type"] == "text_time"
    ctx, pooled = sd.encode_prompt(["a big red circle at the center on a white background, flat style"])
    assert ctx.shape == (1, model.MAX_LENGTH, 128) and pooled.shape == (1, model.PROJ_DIM)
    with torch.no_grad():
        img = decode(sd, generate_latents(sd, ["a big red circle at the center on a white background, flat style"],
                                          height=32, width=32, steps=4, progress=False))
    assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()
