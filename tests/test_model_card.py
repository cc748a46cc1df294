"""The run as other tools see it (product/model_card.py): README.md's front matter parsed by a YAML parser (PyYAML, a
test-only oracle) names the base model, the tags and the token, whatever characters they hold; the card is part of
the final set (staged and switched with the LoRA files); lora_kohya.safetensors' ss_* / modelspec.* metadata read
the way A1111 reads a safetensors header (values starting with "{" are JSON), and sample.py and merge.py still read
the file."""
import json
import os
import random
import struct
from datetime import datetime

import pytest
import yaml
from safetensors.torch import load_file

import merge
import sample
import train
from product import files, model_card
from test_train import argv, make_images, run

TAGS = {"lora", "stable-diffusion-xl", "text-to-image", "dco"}


def front_matter(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def a1111_metadata(path):
    """The header's __metadata__ as A1111 reads it (modules/sd_models.py read_metadata_from_safetensors): the JSON
    header after its 8-byte length, each value that starts with '{' parsed as JSON."""
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    meta = {}
    for k, v in header["__metadata__"].items():
        meta[k] = json.loads(v) if v[:1] == "{" else v
    return meta


@pytest.fixture(scope="module")
def finished(tiny_sdxl, tmp_path_factory):
    """A finished run with sample images and --bundle-token (the kohya file carries <dog>)."""
    root = tmp_path_factory.mktemp("card")
    out = root / "out"
    run(*argv(make_images(root / "dog"), tiny_sdxl[0], out, "--checkpoint-every", "2", "--sample-steps", "2",
              "--bundle-token"))
    return out


def test_card_front_matter_names_base_model_tags_and_token(finished, tiny_sdxl):
    text = (finished / "README.md").read_text()
    meta = front_matter(text)
    assert meta["base_model"] == str(tiny_sdxl[0]) and TAGS <= set(meta["tags"])
    assert "<dog>" in meta["instance_prompt"] and "license" not in meta  # the tiny model's files name no license
    for needed in ("dco, β = 1000", "| steps | 4", "| rank, alpha | 32, 32", "64²", "`<dog>` (from `dog`)",
                   "load_lora_weights", "load_textual_inversion", "ComfyUI", "A1111", "argmax", "hf upload USER/dog"):
        assert needed in text, needed
    links = [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert links == ["samples/step000004-0.png", "samples/step000004-1.png"]  # the last checkpoint's, relative
    assert all((finished / link).is_file() for link in links)


@pytest.mark.parametrize("text", ['a "quoted" <dog>', "it's: a #tag, [list] {map} & *star | >fold", "--- \n...",
                                  "back\\slash \t tab \r\n newline", "ü ß 日本 😀 \u2028 \u0085 \x7f \x00 \ufeff",
                                  "yes", "null", "1e3", "~", "", " leading and trailing ", "\ud800 lone"])
def test_yaml_strings_read_back_as_written(text):
    assert yaml.safe_load(f"key: {model_card.yaml_string(text)}")["key"] == text


def test_random_strings_read_back_as_written():
    rng = random.Random(0)
    alphabet = [chr(c) for c in [*range(0, 0x250), 0x2028, 0x2029, 0xfeff, 0xfffe, 0xffff, 0x1f600, 0xd83d]]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert yaml.safe_load(f"key: {model_card.yaml_string(text)}")["key"] == text, repr(text)


def test_card_copies_the_base_license_and_keeps_any_token(tmp_path):
    """The license comes from the base folder's README front matter, or is left out; a token with YAML's and
    Markdown's special characters reads back from the front matter and shows in the body as code."""
    base = tmp_path / "base"
    base.mkdir()
    assert model_card.base_license(str(base)) is None
    (base / "README.md").write_text("---\nlicense: openrail++\ntags:\n- x\n---\n# a model\n")
    assert model_card.base_license(str(base)) == "openrail++"
    token = '<a: "b" #c `d`>'
    config = {"tokens": [token], "init_words": ["dog"], "name": "x", "model": str(base), "captions": [f"a {token}"],
              "loss": "dco", "beta": 1000.0, "steps": 3, "global_batch_size": 1, "lr": 5e-5, "rank": 4, "alpha": 4.0,
              "resolution": 1024, "images": ["a.png"], "output": str(tmp_path / "out")}
    meta = front_matter(model_card.model_card(config, str(tmp_path / "out"), [], "openrail++"))
    assert meta["license"] == "openrail++" and meta["instance_prompt"] == f"a {token}"
    assert f"``{token}``" in model_card.model_card(config, str(tmp_path / "out"), [])


def test_kohya_metadata_reads_as_a1111_and_kohya_read_it(finished):
    """A1111: SDXL (ss_base_model_version starts with 'sdxl_'), named by ss_output_name, the trigger token among
    ss_tag_frequency's tags (JSON); ModelSpec's MUST keys, an SDXL LoRA, the trigger phrase = the token, an ISO date;
    and our own keys (token, loss, ...) still there."""
    meta = a1111_metadata(finished / files.KOHYA_FILE)
    assert meta["ss_base_model_version"].startswith("sdxl_") and meta["ss_output_name"] == "dog"
    tags = {tag for folder in meta["ss_tag_frequency"].values() for tag in folder}
    assert "<dog>" in tags and meta["ss_tag_frequency"]["dog"]["<dog>"] == 3
    assert meta["ss_dataset_dirs"] == {"dog": {"n_repeats": 1, "img_count": 3}}
    assert {k: meta[k] for k in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_resolution",
                                 "ss_num_train_images", "ss_max_train_steps", "ss_steps", "ss_learning_rate")} == \
        {"ss_network_module": "networks.lora", "ss_network_dim": "32", "ss_network_alpha": "32.0",
         "ss_resolution": "(64, 64)", "ss_num_train_images": "3", "ss_max_train_steps": "4", "ss_steps": "4",
         "ss_learning_rate": "5e-05"}
    assert meta["modelspec.sai_model_spec"] == "1.0.1" and meta["modelspec.architecture"] == \
        "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.title"] == "dog" and meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.trigger_phrase"] == "<dog>" and datetime.fromisoformat(meta["modelspec.date"])
    assert json.loads(meta["token"]) == ["<dog>"] and meta["loss"] == "dco" and "lora_adapter_metadata" not in meta


def test_bucket_info_as_a1111_shows_it(tiny_sdxl, tmp_path):
    from test_buckets import FILES
    run(*argv(make_images(tmp_path / "dog", sizes=FILES), tiny_sdxl[0], tmp_path / "out", "--buckets",
              "--steps", "1", "--checkpoint-every", "0"))
    meta = a1111_metadata(tmp_path / "out" / files.KOHYA_FILE)
    assert meta["ss_enable_bucket"] == "True"
    assert sorted((tuple(b["resolution"]), b["count"]) for b in meta["ss_bucket_info"]["buckets"].values()) == \
        [((32, 128), 1), ((64, 64), 1), ((96, 32), 2)]  # (w, h), as kohya writes them


def test_sample_and_merge_still_read_the_kohya_file(finished, tiny_sdxl, tmp_path):
    kohya = str(finished / files.KOHYA_FILE)
    assert sample.read_lora_metadata(kohya)["loss"] == "dco"
    rows, tokens, words = files.read_learned_tokens(kohya)
    assert tokens == ["<dog>"] and words == ["dog"] and rows["clip_l"].shape[0] == 1
    style = make_images(tmp_path / "style")  # a second LoRA, with captions and no token
    for i in range(3):
        (style / f"{i}.txt").write_text("a striped pattern")
    run(*argv(style, tiny_sdxl[0], tmp_path / "style_out", "--steps", "1", "--checkpoint-every", "0"))
    merge.main([kohya, str(tmp_path / "style_out"), "--output", str(tmp_path / "m"), "--model", str(tiny_sdxl[0])])
    merged = load_file(tmp_path / "m" / files.PEFT_FILE)
    assert set(load_file(finished / files.PEFT_FILE)) == set(merged)
    assert files.read_learned_tokens(str(tmp_path / "m" / files.EMBEDS_FILE))[1] == ["<dog>"]


def test_the_card_is_part_of_the_final_set(tiny_sdxl, tmp_path, monkeypatch):
    """A failure while the set is staged leaves no README.md; one while it is switched leaves the
    .final-incomplete marker (sample.py refuses the folder) until --resume writes the whole set with its card."""
    images = make_images(tmp_path / "dog")
    args = argv(images, tiny_sdxl[0], tmp_path / "out", "--checkpoint-every", "4")
    real_save, real_replace = train.run_folder.save_lora_kohya, os.replace

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(train.run_folder, "save_lora_kohya", disk_full)
    with pytest.raises(OSError):
        run(*args)
    assert not (tmp_path / "out" / "README.md").exists() and not (tmp_path / "out" / ".final").exists()
    monkeypatch.setattr(train.run_folder, "save_lora_kohya", real_save)

    def cut(src, dst):
        if os.path.basename(os.path.dirname(src)) == ".final" and dst.endswith(files.KOHYA_FILE):
            raise KeyboardInterrupt
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", cut)
    with pytest.raises(KeyboardInterrupt):
        run(*args, "--resume")
    monkeypatch.setattr(os, "replace", real_replace)
    assert (tmp_path / "out" / "README.md").exists() and (tmp_path / "out" / files.FINAL_INCOMPLETE).exists()
    with pytest.raises(ValueError, match="interrupted"):
        sample.read_lora_metadata(str(tmp_path / "out"))
    run(*args, "--resume")
    assert not (tmp_path / "out" / files.FINAL_INCOMPLETE).exists()
    assert front_matter((tmp_path / "out" / "README.md").read_text())["base_model"] == str(tiny_sdxl[0])
