"""Input that would train or draw in the wrong direction, and what we write reading back what we were given.

* Every numeric flag of every CLI has a range (errors.check_flags), and a value outside it is refused in one line
  naming the flag, before any file is written: the output folder is left as it was found.
* Every string we store comes back equal: token names, captions and prompts with commas, quotes, newlines and any
  Unicode, through safetensors metadata, train_config.json and PNG text; caption files with a byte-order mark.
* An image is written in the format its extension names, or the extension is refused.
* Files of the images folder that are not used are named, with why."""
import importlib
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

import eval as evaluate
import merge
import sample
import train
from product import errors, files, train_cli
from test_train import argv, make_images, read_log, run

# ----------------------------------------------------------------------------------------------------------
# Numbers: a range per flag, refused in one line naming it, before anything is written

CLIS = {"train": (train_cli.parser, train_cli.NUMBERS), "sample": (sample.parser, sample.NUMBERS),
        "merge": (merge.parser, merge.NUMBERS), "eval": (evaluate.parser, evaluate.NUMBERS)}
RESEARCH = ["tinyworld.evaluate", "tinyworld.experiments", "tinyworld.pretrain", "benchmarks.bench", "benchmarks.ddp",
            "benchmarks.real_size"]
NUMERIC = (int, float, sample.wcon_list)


def numeric_flags(p):
    return {a.dest for a in p._actions if a.type in NUMERIC or getattr(a.type, "__name__", "") == "floats"}


def research_rules(module_name):
    """(parser, rules) that a research CLI hands to errors.parse_flags (caught there, before anything runs)."""
    module = importlib.import_module(module_name)
    seen = []

    def capture(parser, argv, rules):
        seen.append((parser, rules))
        raise KeyboardInterrupt  # stop before the script does anything
    real = errors.parse_flags
    errors.parse_flags = capture
    try:
        with pytest.raises(KeyboardInterrupt):
            module.main([]) if module_name != "benchmarks.bench" else module.main(["--quick"])
    finally:
        errors.parse_flags = real
    return seen[0]


@pytest.mark.parametrize("cli", [*CLIS, *RESEARCH])
def test_every_numeric_flag_has_a_range(cli):
    p, rules = (CLIS[cli][0](), CLIS[cli][1]) if cli in CLIS else research_rules(cli)
    assert numeric_flags(p) <= set(rules), numeric_flags(p) - set(rules)
    for rule in rules.values():  # and every range is one check_flags knows
        errors.in_range(1, rule)


def bad_values(rule):
    """Values outside a range, and the non-finite ones."""
    out = {">= 1": ["0", "-1"], "> 0": ["0", "-1e-05"], ">= 0": ["-1"], ">= 8": ["0", "-8"], "0 .. 1": ["-0.1", "1.5"],
           "seed": ["-1", str(2 ** 63)], ">= 3": ["2"], "finite": []}[rule]
    return out


def cases(cli):
    rules = CLIS[cli][1]
    parser = CLIS[cli][0]()
    floats = {a.dest for a in parser._actions if a.type is float or a.type is sample.wcon_list}
    return [(cli, flag, v) for flag, rule in rules.items() if flag != "lora"
            for v in bad_values(rule) + (["nan", "inf"] if flag in floats else [])]


@pytest.fixture(scope="module")
def lora_dir(tiny_sdxl, tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    run(*argv(make_images(root / "dog"), tiny_sdxl[0], root / "lora", "--steps", "1", "--checkpoint-every", "0"))
    return root / "lora"


def command(cli, flag, value, tiny_sdxl, lora_dir, out):
    """The CLI's main and an argv that would run, with --flag value added."""
    option = [f"--{flag.replace('_', '-')}={value}"]  # with "=": argparse takes -1e-05 for an option otherwise
    if cli == "train":
        return train.main, argv(lora_dir.parent / "dog", tiny_sdxl[0], out / "run") + option
    if cli == "sample":
        return sample.main, ["--model", str(tiny_sdxl[0]), "--prompt", "a <dog>", "--lora", str(lora_dir),
                             "--device", "cpu", "--output", str(out / "x.png"), *option]
    if cli == "merge":
        if flag == "weights":
            option = ["--weights", "1", value]
        return merge.main, [str(lora_dir), str(lora_dir), "--output", str(out / "merged"), *option]
    return evaluate.main, [str(lora_dir), "--reference", str(lora_dir), "--output", str(out / "s.csv"), *option]


@pytest.mark.parametrize("cli,flag,value", [c for cli in CLIS for c in cases(cli)])
def test_a_number_outside_its_meaning_is_one_line_and_writes_nothing(cli, flag, value, tiny_sdxl, lora_dir,
                                                                      tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    main, args = command(cli, flag, value, tiny_sdxl, lora_dir, out)
    with pytest.raises(SystemExit) as e:
        main(args)
    msg = str(e.value.code)
    assert msg.startswith(f"error: --{flag.replace('_', '-')} ") and "\n" not in msg, msg
    assert "finite" in msg if value in ("nan", "inf") else "must be" in msg
    assert sorted(p.name for p in out.rglob("*")) == ["keep.txt"]  # as it was found


def test_the_examples_of_the_issue(tiny_sdxl, lora_dir, tmp_path, capsys):
    for args, words in ((["--lr=-5e-5"], "--lr -5e-05: must be > 0"), (["--beta", "-1000"], "--beta -1000.0"),
                        (["--grad-clip", "-1"], "--grad-clip -1.0: must be > 0"),
                        (["--seed", str(2 ** 64)], "--seed 18446744073709551616: must be a whole number from 0")):
        with pytest.raises(SystemExit) as e:
            train.main(argv(lora_dir.parent / "dog", tiny_sdxl[0], tmp_path / "run") + args)
        assert words in str(e.value.code)
    with pytest.raises(SystemExit) as e:  # not the default size: 0 is no size
        sample.main(["--model", str(tiny_sdxl[0]), "--prompt", "a", "--height", "0", "--output", str(tmp_path / "x.png"),
                     "--device", "cpu"])
    assert str(e.value.code) == "error: --height 0: must be >= 8"
    assert not list(tmp_path.iterdir())


def test_refusals_found_once_the_model_is_loaded_write_nothing(tiny_sdxl, lora_dir, tmp_path):
    """--sample-steps past the schedule, a --token that is already a CLIP word, a db-prior --class-dir of other
    settings: refused before train_config.json and the lock exist."""
    images = lora_dir.parent / "dog"
    classes = tmp_path / "classes"
    classes.mkdir()
    (classes / "info.json").write_text(json.dumps({"prompt": "a photo of a cat", "model": "x", "resolution": 64}))
    for extra, words in ((["--sample-steps", "1000"], "--sample-steps 1000: must be below the model's 1000"),
                         (["--token", "dog", "--init-word", "dog"], "--token 'dog': already a word of CLIP's"),
                         (["--loss", "db-prior", "--class-dir", str(classes)], f"--class-dir {classes}: holds")):
        with pytest.raises(SystemExit) as e:
            train.main(argv(images, tiny_sdxl[0], tmp_path / "run") + extra)
        assert words in str(e.value.code) and "\n" not in str(e.value.code)
        assert not (tmp_path / "run").exists()


def test_zero_is_in_the_range_only_where_the_help_says_what_it_means():
    for parser, rules in [(p(), r) for p, r in CLIS.values()]:
        for action in parser._actions:
            rule = rules.get(action.dest)
            if rule and rule not in ("finite", "seed") and errors.in_range(0, rule):
                assert "0:" in (action.help or ""), action.dest


# ----------------------------------------------------------------------------------------------------------
# Strings: every writer gives back what it was given

AWKWARD = '<d,o"g\'s é 日本 🐕; a=b:c\\x>'


def test_awkward_token_and_captions_round_trip_through_every_file(tiny_sdxl, tmp_path):
    """A token holding the old separator (a comma), quotes, Unicode, ';', '=' and ':'; captions with a byte-order
    mark, newlines and tabs: the LoRA trains, sample.py loads it (the token found by its metadata), merge.py carries
    it, and safetensors metadata, train_config.json and PNG text all give back the very strings."""
    images = make_images(tmp_path / "dog")
    captions = [f"a photo of {AWKWARD},\nin the \"park\"", f"{AWKWARD}\ton a beach", f"a {AWKWARD} — «toy»"]
    for i, c in enumerate(captions):
        (images / f"{i}.txt").write_bytes(("\ufeff" if i == 0 else "").encode() + c.encode("utf-8"))
    out = tmp_path / "out"
    run(*argv(images, tiny_sdxl[0], out, "--steps", "1", "--checkpoint-every", "0", "--token", AWKWARD,
              "--init-word", "dog", "--bundle-token"))
    folded = [" ".join(c.split()) for c in captions]  # no BOM, white space folded (docs/training.md)
    config = json.loads((out / "train_config.json").read_text(encoding="utf-8"))
    assert config["tokens"] == [AWKWARD] and config["captions"] == folded
    assert config["base_prompts"] == [c.replace(AWKWARD, "dog") for c in folded]
    for name in (files.PEFT_FILE, files.KOHYA_FILE, files.EMBEDS_FILE):
        with safe_open(str(out / name), "pt") as f:
            meta = f.metadata()
        assert files.read_metadata_list(meta, "token") == [AWKWARD], name
        assert files.read_metadata_list(meta, "init_word") == ["dog"], name
    for name in (files.EMBEDS_FILE, files.KOHYA_FILE):  # the token rows, and the kohya file with them bundled
        assert files.read_learned_tokens(str(out / name))[1] == [AWKWARD], name
    prompt = f"a {AWKWARD} on the moon,\n\"quoted\" — 犬"
    png = tmp_path / "x.png"
    sample.main(["--model", str(tiny_sdxl[0]), "--lora", str(out), "--prompt", prompt, "--negative-prompt", "a, b",
                 "--device", "cpu", "--steps", "1", "--height", "64", "--n", "1", "--wcon", "2", "--output", str(png)])
    text = Image.open(png).text
    assert text["prompt"] == prompt and text["negative_prompt"] == "a, b"
    assert text["base_prompt"] == prompt.replace(AWKWARD, "dog")
    other = tmp_path / "style"
    shutil.copytree(out, other, ignore=shutil.ignore_patterns(files.EMBEDS_FILE, files.KOHYA_FILE))
    merge.main([str(out), str(other), "--output", str(tmp_path / "merged")])
    with safe_open(str(tmp_path / "merged" / files.EMBEDS_FILE), "pt") as f:
        assert files.read_metadata_list(f.metadata(), "token") == [AWKWARD]
    sample.main(["--model", str(tiny_sdxl[0]), "--lora", str(tmp_path / "merged"), "--prompt", prompt, "--device",
                 "cpu", "--steps", "1", "--height", "64", "--n", "1", "--output", str(tmp_path / "m.png")])


def test_metadata_lists_written_before_the_json_lists_are_read():
    assert files.read_metadata_list({"token": "<a>,<b>", "init_word": "dog,"}, "token") == ["<a>", "<b>"]
    assert files.read_metadata_list({"init_word": "dog,"}, "init_word") == ["dog", ""]
    assert files.read_metadata_list({"token": ""}, "token") == [] == files.read_metadata_list({}, "token")
    for values in ([], ["<a,b>"], ['"', "[", "é"], ["1"]):
        assert files.read_metadata_list({"k": files.metadata_list(values)}, "k") == values


def test_a_token_that_is_a_word_is_refused_from_a_config_too(tiny_sdxl, tmp_path):
    images = make_images(tmp_path / "toy", sizes=((64, 64),))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"toy": {"images": [str(images / "0.png")], "prompts": ["a photo of cat"],
                                          "inserting_tokens": ["cat"], "initializer_tokens": ["dog"]}}))
    with pytest.raises(SystemExit) as e:
        train.main(["--config", str(config), "--config-name", "toy", "--model", str(tiny_sdxl[0]), "--output",
                    str(tmp_path / "out"), "--resolution", "64", "--device", "cpu"])
    assert "--config inserting_tokens 'cat': already a word" in str(e.value.code)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# Image files: the format the name says; nothing in the images folder skipped without a word

@pytest.mark.parametrize("name,fmt", [("x.png", "PNG"), ("x.jpg", "JPEG"), ("x.JPEG", "JPEG"), ("x.webp", "WEBP")])
def test_an_image_is_written_in_the_format_its_extension_names(name, fmt, tiny_sdxl, tmp_path):
    path = tmp_path / name
    sample.main(["--model", str(tiny_sdxl[0]), "--prompt", "a dog", "--device", "cpu", "--steps", "1", "--height",
                 "64", "--n", "1", "--output", str(path)])
    image = Image.open(path)
    assert image.format == fmt
    assert getattr(image, "text", {}).get("prompt") == ("a dog" if fmt == "PNG" else None)  # PNG text in PNG only
    if fmt == "WEBP":  # lossless: the pixels of the PNG
        sample.main(["--model", str(tiny_sdxl[0]), "--prompt", "a dog", "--device", "cpu", "--steps", "1",
                     "--height", "64", "--n", "1", "--output", str(tmp_path / "same.png")])
        assert np.array_equal(np.array(image.convert("RGB")), np.array(Image.open(tmp_path / "same.png")))


@pytest.mark.parametrize("name", ["x.gif", "x.tiff", "x.png.bak"])
def test_an_image_extension_we_do_not_write_is_refused(name, tiny_sdxl, tmp_path):
    with pytest.raises(SystemExit) as e:
        sample.main(["--model", str(tiny_sdxl[0]), "--prompt", "a", "--device", "cpu", "--output", str(tmp_path / name)])
    assert str(e.value.code).startswith(f"error: --output {tmp_path / name}: ") and ".png" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(tmp_path), "--reference", str(tmp_path), "--plot", str(tmp_path / name), "--output",
                       str(tmp_path / "s.csv")])
    assert str(e.value.code).startswith(f"error: --plot {tmp_path / name}: ")
    assert not list(tmp_path.iterdir())


def test_files_of_the_images_folder_that_are_not_used_are_named(tiny_sdxl, tmp_path, capsys):
    images = make_images(tmp_path / "dog", sizes=((64, 64), (64, 64)))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "anim.gif", save_all=True,
                                                        append_images=[Image.new("RGB", (8, 8), "red")])
    (images / "layers.psd").write_bytes(b"8BPS")
    (images / "0.txt").write_text("a photo of <dog>")  # a caption: used
    (images / "lost.txt").write_text("a photo of <dog>")  # a caption of no image
    (images / "raw").mkdir()
    (images / ".DS_Store").write_bytes(b"")  # hidden: not listed
    _, err = run(*argv(images, tiny_sdxl[0], tmp_path / "out", "--steps", "1", "--checkpoint-every", "0"))
    notices = [line for line in err.splitlines() if "not used" in line]
    assert notices == [f"notice: --images {images}: 2 images; not used: anim.gif (not one of .jpg .jpeg .png .webp "
                       ".bmp), layers.psd (not one of .jpg .jpeg .png .webp .bmp), lost.txt (a caption of no image), "
                       "raw (a folder: not searched)"]
    assert "2 images" in capsys.readouterr().out  # the run's own count
    assert len(read_log(tmp_path / "out")) == 1
