"""eval.py, evaluation/dinov2.py, evaluation/siglip.py against transformers 5.24 on tiny random models saved in the hub layout (fp32).

The tiny models are transformers' Dinov2Model / SiglipModel with every parameter re-drawn (tiny_sdxl.randomize),
saved with save_pretrained next to a preprocessor_config.json of the real checkpoints' form and, for SigLIP, a real
format spiece.model (siglip_spm.py). Samples are tiny-world images written with sample.py's PNG metadata."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Dinov2Config, Dinov2Model, SiglipConfig, SiglipModel
from transformers import SiglipTokenizer as HFSiglipTokenizer
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

import eval as ev
from evaluation.dinov2 import Dinov2, load_dinov2
from sample import save_sample
from evaluation.siglip import load_siglip
from siglip_spm import write_siglip_tokenizer_folder
from tiny_sdxl import randomize
from tinyworld import world

TOL = 1e-5
# The form of facebook/dinov2-*'s and google/siglip-*'s preprocessor_config.json, sizes shrunk for tiny models:
# the real ones resize the short side to 256, crop 224 (DINOv2; its position grid is 37x37 = 518 px, so the tiny
# one also interpolates: 5x5 -> 3x3), and resize to 384x384 (SigLIP so400m).
DINO_PRE = {"crop_size": {"height": 42, "width": 42}, "do_center_crop": True, "do_convert_rgb": True,
            "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
            "image_processor_type": "BitImageProcessor", "image_std": [0.229, 0.224, 0.225], "resample": 3,
            "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 48}}
SIGLIP_PRE = {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
              "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
              "processor_class": "SiglipProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
              "size": {"height": 32, "width": 32}}
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def save_dino(folder, seed=0, **kw):
    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=70,
                          patch_size=14, **kw)
    hf = randomize(Dinov2Model(config).eval(), seed)
    hf.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(DINO_PRE, indent=2))
    return hf


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    """{'dino': (folder, hf model), 'siglip': (folder, hf model, hf tokenizer)}."""
    root = tmp_path_factory.mktemp("scorers")
    dino = save_dino(root / "dino")
    torch.manual_seed(1)
    config = SiglipConfig(text_config=dict(TOWER, vocab_size=150, max_position_embeddings=64),
                          vision_config=dict(TOWER, image_size=32, patch_size=8))
    siglip = randomize(SiglipModel(config).eval(), 1)
    siglip.save_pretrained(root / "siglip")
    (root / "siglip" / "preprocessor_config.json").write_text(json.dumps(SIGLIP_PRE, indent=2))
    write_siglip_tokenizer_folder(root / "siglip")
    tokenizer = HFSiglipTokenizer.from_pretrained(root / "siglip")
    return dict(dino=(root / "dino", dino), siglip=(root / "siglip", siglip, tokenizer))


@torch.no_grad()
def test_dinov2_parity(scorers, tmp_path):
    folder, hf = scorers["dino"]
    ours = load_dinov2(folder)
    diffs = []
    for H, W in [(70, 70), (42, 42), (56, 42)]:  # the learned 5x5 grid as is, bicubic to 3x3, to 4x3
        x = torch.randn(2, 3, H, W)
        diffs.append((ours(x) - hf(pixel_values=x).pooler_output).abs().max().item())
    swiglu = save_dino(tmp_path / "g", seed=2, use_swiglu_ffn=True)  # ViT-g's MLP
    x = torch.randn(2, 3, 42, 42)
    diffs.append((load_dinov2(tmp_path / "g")(x) - swiglu(pixel_values=x).pooler_output).abs().max().item())
    print(f"DINOv2: max abs diff {max(diffs):.2e} (sizes 70, 42, 56x42, SwiGLU)")
    assert max(diffs) <= TOL
    assert (ours(x)[0] - ours(x)[1]).abs().max() > 1e-2  # not a constant
    assert not torch.equal(ours.position_embeddings(3, 3), ours.position_embeddings(5, 5)[:, :10])


@torch.no_grad()
def test_siglip_parity(scorers):
    folder, hf, hf_tok = scorers["siglip"]
    ours, tok = load_siglip(folder)
    prompts = ["a big yellow circle on a blue background", "", "a photo of a <dog>!", "dog " * 80]
    ids = tok(prompts)
    assert torch.equal(ids, torch.tensor(hf_tok(prompts, padding="max_length", truncation=True)["input_ids"]))
    text = (ours.text_model(ids) - hf.text_model(input_ids=ids).pooler_output).abs().max().item()
    pixels = torch.randn(3, 3, 32, 32)
    image = (ours.vision_model(pixels) - hf.vision_model(pixel_values=pixels).pooler_output).abs().max().item()
    print(f"SigLIP: max abs diff text {text:.2e}, image {image:.2e}")
    assert max(text, image) <= TOL
    emb = ours.text_model(ids)
    assert (emb[0] - emb[1]).abs().max() > 1e-2  # the pooled last position does depend on the prompt
    with pytest.raises(ValueError, match="32x32"):
        ours.vision_model(torch.randn(1, 3, 48, 48))


def test_preprocessing_matches_transformers(scorers, tmp_path):
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (50, 77), (91, 60)]  # square, wide, tall: resize rounding and crop offsets
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    images.append(Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8), "RGBA"))  # onto white
    for folder, hf_cls in [(scorers["dino"][0], BitImageProcessorPil), (scorers["siglip"][0], SiglipImageProcessorPil)]:
        hf, ours = hf_cls.from_pretrained(folder), ev.read_preprocessor(folder, "test")
        for im in images:
            ref = torch.as_tensor(np.asarray(hf(im, return_tensors="np")["pixel_values"][0]))
            got = ours(im)
            assert got.shape == ref.shape and (got - ref).abs().max() <= 1e-5


def write_samples(folder, n_per=2):
    """Tiny-world images as sample.py writes them: per-image PNGs with metadata, a grid (skipped), and an image with
    only a sidecar .txt prompt."""
    rng = np.random.default_rng(0)
    for method in ("dco", "db"):
        for wcon in ("0", "2"):
            for i in range(n_per):
                scene = world.concept_scene("checker", rng)
                meta = {"prompt": world.caption(scene), "base_prompt": world.base_caption(scene), "wcon": wcon,
                        "index": i, "method": method}
                save_sample(world.render_pil(scene), str(folder / f"{method}_wcon{wcon}_{i}.png"), meta)
    save_sample(Image.new("RGB", (64, 64)), str(folder / "grid.png"), {"prompt": "a grid", "wcon": "0,2", "n": 2})
    scene = world.random_scene(rng)
    world.render_pil(scene).save(folder / "plain.png")
    (folder / "plain.txt").write_text(world.caption(scene) + "\n")


@torch.no_grad()
def transformers_scores(scorers, paths, prompts, refs):
    """The same definitions computed with transformers: processors, models, tokenizer."""
    (dfolder, dino), (sfolder, siglip, tok) = scorers["dino"], scorers["siglip"]
    dpre, spre = BitImageProcessorPil.from_pretrained(dfolder), SiglipImageProcessorPil.from_pretrained(sfolder)
    unit = lambda t: t / t.norm(dim=-1, keepdim=True)  # noqa: E731
    open_all = lambda ps: [Image.open(p) for p in ps]  # noqa: E731
    dino_emb = lambda ps: unit(dino(**dpre(open_all(ps), return_tensors="pt")).pooler_output)  # noqa: E731
    img = (dino_emb(paths) @ dino_emb(refs).T).mean(1)
    ids = torch.tensor(tok(prompts, padding="max_length", truncation=True)["input_ids"])
    image = unit(siglip.vision_model(**spre(open_all(paths), return_tensors="pt")).pooler_output)
    txt = (image * unit(siglip.text_model(input_ids=ids).pooler_output)).sum(1)
    return img, txt


def test_eval_cli_matches_transformers(scorers, tmp_path, capsys):
    samples, out, plot = tmp_path / "samples", tmp_path / "out" / "scores.csv", tmp_path / "out" / "pareto.png"
    samples.mkdir()
    write_samples(samples)
    ref = world.CONCEPTS_DIR + "/checker"
    ev.main([str(samples), "--reference", ref, "--dino", str(scorers["dino"][0]), "--siglip",
             str(scorers["siglip"][0]), "--output", str(out), "--plot", str(plot), "--batch-size", "3"])
    printed = capsys.readouterr().out
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"].rsplit("/", 1)[1] for r in rows] == sorted(
        [f"{m}_wcon{w}_{i}.png" for m in ("dco", "db") for w in ("0", "2") for i in range(2)] + ["plain.png"])
    assert list(rows[0])[:3] == ["file", "image_similarity", "text_similarity"]
    by_name = {r["file"].rsplit("/", 1)[1]: r for r in rows}
    assert all("<checker>" not in r["prompt"] and r["prompt"] for r in rows)  # base prompts: what SigLIP scores
    assert by_name["plain.png"]["prompt"] == (samples / "plain.txt").read_text().strip()
    assert by_name["plain.png"]["method"] == "samples" and by_name["db_wcon0_0.png"]["method"] == "db"

    refs = sorted(str(p) for p in Path(ref).glob("*.png"))
    img, txt = transformers_scores(scorers, [r["file"] for r in rows], [r["prompt"] for r in rows], refs)
    d_img = max(abs(float(r["image_similarity"]) - v) for r, v in zip(rows, img.tolist()))
    d_txt = max(abs(float(r["text_similarity"]) - v) for r, v in zip(rows, txt.tolist()))
    print(f"eval.py CSV vs transformers: max abs diff image {d_img:.2e}, text {d_txt:.2e}")
    assert max(d_img, d_txt) <= 2e-3
    assert np.std([float(r["image_similarity"]) for r in rows]) > 1e-3  # the scores do tell images apart

    # grouped means and the reference level, printed; the plot is a PNG
    assert "dco" in printed and "leave-one-out" in printed
    means = ev.group_means([dict(r, image_similarity=float(r["image_similarity"]),
                                 text_similarity=float(r["text_similarity"])) for r in rows])
    assert list(means)[:2] == [("db", "0"), ("db", "2")] and means[("dco", "2")][0] == 2
    with Image.open(plot) as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert sorted(p.name for p in out.parent.iterdir()) == ["pareto.png", "scores.csv"]  # no temp files left


def test_reference_level():
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]), dim=-1)
    c = 2 ** -0.5  # cos 45 degrees; the first and last are orthogonal
    assert ev.reference_level(e) == pytest.approx(((c + 0) / 2 + (c + c) / 2 + (0 + c) / 2) / 3)
    assert ev.reference_level(e[:1]) is None


def test_bad_inputs_one_line(scorers, tmp_path):
    dino, siglip = str(scorers["dino"][0]), str(scorers["siglip"][0])
    samples, empty, ref = tmp_path / "samples", tmp_path / "empty", world.CONCEPTS_DIR + "/checker"
    samples.mkdir(), empty.mkdir()
    write_samples(samples, n_per=1)

    def error(*argv):
        with pytest.raises(SystemExit) as e:
            ev.main(["--dino", dino, "--siglip", siglip, "--output", str(tmp_path / "s.csv"), *argv])
        message = str(e.value.code)
        assert message.startswith("error: ") and "\n" not in message
        return message

    assert "no images" in error(str(empty), "--reference", ref)
    assert "--reference" in error(str(samples), "--reference", str(empty))
    assert "--reference" in error(str(samples), "--reference", str(tmp_path / "nope"))
    assert "DINOv2" in error(str(samples), "--reference", ref, "--dino", siglip)
    assert "SigLIP" in error(str(samples), "--reference", ref, "--siglip", dino)
    assert "--no-text" in error(str(samples), "--reference", ref, "--plot", "p.png", "--no-text")
    (empty / "broken.png").write_bytes(b"not a png")
    assert "broken.png: not a readable image" in error(str(empty), "--reference", ref)
    (empty / "broken.png").unlink()
    (samples / "plain.txt").unlink()  # an image with neither metadata nor sidecar: fine without text scoring only
    assert "plain.png: no prompt" in error(str(samples), "--reference", ref)
    ev.main([str(samples), "--reference", ref, "--dino", dino, "--no-text", "--output", str(tmp_path / "s.csv")])
    with open(tmp_path / "s.csv") as f:
        assert all(r["text_similarity"] == "" for r in csv.DictReader(f))


def test_config_errors():
    with pytest.raises(ValueError, match="not 'dinov2'"):
        Dinov2(dict(model_type="dinov2_with_registers"))


def test_sample_py_records_method_and_base_prompt(tiny_sdxl, tmp_path):
    """eval.py's inputs: sample.py writes the LoRA's training loss as 'method', and the base prompt also at w_con 0."""
    import sample
    from lora import save_lora_peft
    from safetensors.torch import save_file
    from sdxl import load_sdxl

    unet = load_sdxl(str(tiny_sdxl[0])).unet
    name, linear = next((n, m) for n, m in unet.named_modules() if n.endswith("attn1.to_k"))
    layers = {name: (torch.zeros(1, linear.in_features), torch.zeros(linear.out_features, 1), 1.0)}
    save_lora_peft(tmp_path / "lora", {"unet": layers}, {"loss": "db-prior"})
    embeds = {"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 32)}
    save_file(embeds, str(tmp_path / "lora" / "learned_embeds.safetensors"), {"token": "<dog>", "init_word": "dog"})
    assert sample.read_lora_metadata(str(tmp_path / "lora")).get("loss") == "db-prior"
    assert sample.read_lora_metadata(str(tmp_path / "lora" / "learned_embeds.safetensors")).get("loss") is None
    sample.main(["--model", str(tiny_sdxl[0]), "--device", "cpu", "--steps", "1", "--height", "64", "--width", "64",
                 "--lora", str(tmp_path / "lora"), "--prompt", "a <dog> on the beach", "--wcon", "0", "--n", "1",
                 "--output", str(tmp_path / "x.png")])
    with Image.open(tmp_path / "x.png") as im:
        meta = im.text
    assert (meta["method"], meta["base_prompt"], meta["wcon"]) == ("db-prior", "a dog on the beach", "0")
    assert ev.sample_info(str(tmp_path / "x.png"), str(tmp_path))["prompt"] == "a dog on the beach"


def test_hub_ids_download_only_what_is_needed(monkeypatch, tmp_path):
    """A hub id goes through hub.download (the HF cache, as for SDXL) with the scorer's files only; a folder is used
    as is; a path that is not a folder is one clear error, never a hub lookup."""
    from product import hub

    calls = []
    monkeypatch.setattr(hub, "download", lambda repo, patterns=None: calls.append((repo, patterns)) or str(tmp_path))
    assert ev.resolve("facebook/dinov2-large", "--dino") == str(tmp_path)
    assert calls == [("facebook/dinov2-large", ev.HUB_FILES)]
    assert all(not f.endswith((".bin", ".pt", ".pth", ".msgpack", ".h5")) for f in ev.HUB_FILES)
    assert ev.resolve(str(tmp_path), "--dino") == str(tmp_path) and len(calls) == 1
    with pytest.raises(FileNotFoundError, match="--siglip ./nope: not a folder"):
        ev.resolve("./nope", "--siglip")


def test_scorers_need_no_reference_library():
    """eval.py, evaluation/dinov2.py and evaluation/siglip.py run on torch/numpy/pillow/safetensors alone: no transformers, sentencepiece
    or protobuf is imported (they are test-only oracles)."""
    code = ("import sys, eval, evaluation.dinov2, evaluation.siglip; bad = [m for m in ('transformers', 'diffusers', 'sentencepiece', "
            "'google.protobuf', 'peft') if m in sys.modules]; assert not bad, bad")
    root = Path(__file__).parent.parent
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
