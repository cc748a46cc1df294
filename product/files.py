"""File plumbing shared by train.py, sample.py and merge.py: the product layer, not the paper.

One atomic writer for every output (a crash, Ctrl-C or a full disk never leaves half a file where a good one was),
the names of a trainer's output files, finding the LoRA files of a trainer folder, and reading learned tokens.
"""
import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from product.signals import pause_for_test

PEFT_FILE = "pytorch_lora_weights.safetensors"  # diffusers / PEFT names (load_lora_weights)
KOHYA_FILE = "lora_kohya.safetensors"  # kohya names (ComfyUI, A1111, sd-scripts)
EMBEDS_FILE = "learned_embeds.safetensors"  # the learned token rows: {"clip_l": [n, 768], "clip_g": [n, 1280]}
FINAL_INCOMPLETE = ".final-incomplete"  # present while a run's final files are being switched (run_folder.py)
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # the parts of SDXL a LoRA can touch
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic(path):
    """Yield a temporary name beside `path` (a file or a folder); when the block succeeds it replaces `path` in one
    rename, so readers see the old output or the new one, never half of one. On any failure (including Ctrl-C) the
    temporary is removed and `path` is untouched. Files get the usual permissions (0666 minus the umask)."""
    path = os.path.normpath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    _remove(tmp)
    try:
        try:
            yield tmp
        except OSError as e:  # name the output, not its temporary
            if isinstance(e.filename, str) and e.filename.startswith(tmp):
                e.filename = path + e.filename[len(tmp):]
            raise
        pause_for_test(f"write {os.path.basename(path)}")  # the test hook (product/signals.py): nothing otherwise
        if os.path.isfile(tmp):
            os.chmod(tmp, 0o666 & ~_umask())  # some writers create 0600 files; others must be able to read them
        if os.path.isdir(path) and os.path.isdir(tmp):  # a folder cannot be renamed over a non-empty one: swap
            os.replace(path, tmp + ".old")
            os.replace(tmp, path)
            shutil.rmtree(tmp + ".old", ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def remove_temporaries(folder):
    """Remove what atomic() left in `folder` (NAME.tmp-PID, NAME.tmp-PID.old) when its process was killed mid-write.
    Only for a folder whose lock the caller holds: then no other process is writing there."""
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if re.search(r"\.tmp-\d+(\.old)?$", name):
            _remove(os.path.join(folder, name))


def _remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def write_json(path, obj):
    with atomic(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


def save_tensors(path, tensors, metadata=None):
    """A .safetensors file, atomically; tensors are moved to the CPU and made contiguous first."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic(path) as tmp:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as e:  # safetensors reports a full disk as its own error: make it the OSError it is
            code = re.search(r"os error (\d+)", str(e))
            if code:
                raise OSError(int(code[1]), os.strerror(int(code[1])), path) from None
            raise
    return path


# An image is written in the format its name says. Only PNG carries text (the settings of sample.py's images, which
# eval.py reads back): JPEG and WebP files are the pixels alone.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def image_format(path, flag="--output"):
    """The format an image file's extension names (PNG, JPEG, WEBP), or a ValueError naming the flag."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in IMAGE_FORMATS:
        raise ValueError(f"{flag} {path}: {f'{ext!r} is not' if ext else 'no extension names'} an image format "
                         f"written here; end it in {', '.join(IMAGE_FORMATS)}")
    return IMAGE_FORMATS[ext]


def save_image(image, path, text=None):
    """A PIL image in the format of its extension (image_format), atomically (a full disk leaves the previous file,
    not a truncated one). text: {key: str} stored as PNG text chunks (Latin-1 as tEXt, anything else as UTF-8 iTXt:
    every string reads back equal); ignored for JPEG (saved at quality 95) and WebP (lossless)."""
    fmt = image_format(path, "image file")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    options = {"PNG": {}, "JPEG": {"quality": 95}, "WEBP": {"lossless": True}}[fmt]
    if fmt == "PNG" and text:
        options["pnginfo"] = PngInfo()
        for key, value in text.items():
            options["pnginfo"].add_text(key, value)
    with atomic(path) as tmp:
        (image if fmt == "PNG" else image.convert("RGB")).save(tmp, format=fmt, **options)
    return path


# ----------------------------------------------------------------------------------------------------------
# Readers that name their file: a decoding error alone does not know which file it came from.

def read_text(path):
    """A UTF-8 text file, without the byte-order mark some editors put first (Windows Notepad); a file in another
    encoding is a ValueError naming it."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}): save it "
                         "as UTF-8") from None


def read_json(path):
    """A JSON file; malformed JSON is a ValueError naming the file, line and column."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno} ({e.msg}): fix or replace "
                         "the file") from None


def _bad_safetensors(path, error):
    return ValueError(f"{path}: not a readable .safetensors file ({error}): it is truncated, corrupted or in another "
                      "format (dco loads no pickles); write or download it again")


@contextmanager
def open_safetensors(path):
    """safe_open(path) whose errors name the file (a truncated file, a pickle, random bytes)."""
    try:
        f = safe_open(path, framework="pt")
    except SafetensorError as e:
        raise _bad_safetensors(path, e) from None
    with f:
        yield f


def load_tensors(path):
    """safetensors' load_file(path) whose errors name the file."""
    try:
        return load_file(path)
    except SafetensorError as e:
        raise _bad_safetensors(path, e) from None


def sha256(path):
    """The hex digest of a file's bytes (what --resume compares to see that the training images are the same)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_writable(path, what):
    """Before any expensive work: `path` (an output file or folder, made later) can be written. The nearest existing
    folder on the way is tried with a real temporary file, since permission bits say nothing for root, read-only
    mounts or a full disk's inodes."""
    path = os.path.abspath(path)
    if os.path.exists(path) and what.endswith("folder") and not os.path.isdir(path):
        raise ValueError(f"{what} {path}: exists and is not a folder; choose another path")
    if os.path.isdir(path) and not what.endswith("folder"):
        raise ValueError(f"{what} {path}: is a folder; give a file name")
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"{what} {path}: {folder} is a file, not a folder; choose another path")
    try:
        with open(os.path.join(folder, f".write-test-{os.getpid()}"), "w") as f:
            f.write("x")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot write in {folder} ({e.strerror}); choose a writable place") from None
    finally:
        if os.path.exists(os.path.join(folder, f".write-test-{os.getpid()}")):
            os.unlink(os.path.join(folder, f".write-test-{os.getpid()}"))


def find_lora_files(path):
    """A trainer output folder or a LoRA file -> (LoRA file or None, learned_embeds file or None).

    A folder gives its diffusers file (else its kohya file) and its learned tokens; a trainer's own file gives the
    learned tokens beside it; any other .safetensors is a LoRA alone."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    if os.path.exists(os.path.join(folder, FINAL_INCOMPLETE)):
        raise ValueError(f"{folder}: its final save was interrupted, so its files may be a mix of two steps: run "
                         f"train.py --resume --output {folder} (with the run's other arguments) to finish it")
    if os.path.isdir(path):
        found = [os.path.join(path, f) for f in (PEFT_FILE, KOHYA_FILE) if os.path.isfile(os.path.join(path, f))]
        lora, folder = (found[0] if found else None), path
    else:
        lora = path
        folder = os.path.dirname(path) if os.path.basename(path) in (PEFT_FILE, KOHYA_FILE) else None
    embeds = os.path.join(folder, EMBEDS_FILE) if folder else None
    return lora, (embeds if embeds and os.path.isfile(embeds) else None)


def metadata_list(values):
    """A list of strings as a safetensors metadata value (str -> str): JSON, so that any character survives (a token
    may hold a comma)."""
    return json.dumps(list(values), ensure_ascii=False)


def read_metadata_list(meta, key):
    """The list metadata_list wrote under `key` ([] if absent). Files written before it held a comma-separated list:
    those are read too (their tokens could hold no comma)."""
    text = meta.get(key, "")
    try:
        values = json.loads(text)
        if isinstance(values, list) and all(isinstance(v, str) for v in values):
            return values
    except ValueError:
        pass
    return [v.strip() for v in text.split(",")] if text.strip() else []


def read_learned_tokens(path, names=None):
    """learned_embeds.safetensors -> (rows {"clip_l": [n, 768], "clip_g": [n, 1280]}, tokens, init words).

    The 'token' and 'init_word' metadata are lists (read_metadata_list), as train.py and merge.py write them; an init
    word is "" where unknown. The official DCO code writes the same rows with no metadata: then `names`, a list of
    (token, init word) from --token or the official config.json, says which tokens the rows are, in order."""
    with open_safetensors(path) as f:
        meta, rows = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys() if "lora" not in k and "alpha" not in k}
    tokens = [t for t in read_metadata_list(meta, "token") if t]
    words = read_metadata_list(meta, "init_word")
    if any(k.startswith(BUNDLE) for k in rows):  # a kohya LoRA that carries its tokens (train.py --bundle-token)
        rows, tokens, words = bundled_rows(rows, tokens, words)
    if not tokens and names:  # the first n names, n = the number of rows
        n = rows["clip_l"].shape[0] if "clip_l" in rows and rows["clip_l"].dim() == 2 else 0
        if n > len(names):
            raise ValueError(f"{path}: {n} token rows but only {len(names)} token name(s) left to give them: pass "
                             "one --token per row, in the order they were trained")
        tokens, words = [t for t, _ in names[:n]], [w or "" for _, w in names[:n]]
    elif not tokens and "clip_l" in rows:
        raise ValueError(f"{path}: token rows without token names (the official DCO code's format): pass --token "
                         "'<dog>=dog' (token=init word, one per row), or --config CONFIG.json --config-name NAME")
    for key in ("clip_l", "clip_g"):
        if key not in rows or rows[key].dim() != 2 or rows[key].shape[0] != len(tokens):
            raise ValueError(f"{path}: expected a '{key}' tensor with one row per token of the 'token' metadata "
                             f"{tokens}, got {tuple(rows[key].shape) if key in rows else 'none'}")
    return rows, tokens, (words if len(words) == len(tokens) else [""] * len(tokens))


BUNDLE = "bundle_emb."  # A1111's keys for embeddings bundled in a LoRA: bundle_emb.<token>.clip_l / .clip_g


def bundled_rows(tensors, tokens, words):
    """{bundle_emb.<token>.clip_l: [1, 768], ...} -> ({"clip_l": [n, 768], "clip_g": [n, 1280]}, tokens, init
    words), the tokens in the order of the 'token' metadata (else sorted), their init words from 'init_word'."""
    names = sorted({k[len(BUNDLE):].rsplit(".", 1)[0] for k in tensors if k.startswith(BUNDLE)})
    order = [t for t in tokens if t in names] + [t for t in names if t not in tokens]
    init = dict(zip(tokens, words)) if len(words) == len(tokens) else {}
    rows = {key: torch.cat([tensors[f"{BUNDLE}{t}.{key}"] for t in order]) for key in ("clip_l", "clip_g")}
    return rows, order, [init.get(t, "") for t in order]


def parse_token(text):
    """--token '<dog>=dog' -> ('<dog>', 'dog'); '<dog>' -> ('<dog>', None): a learned token and its init word."""
    token, _, word = text.partition("=")
    if not token.strip():
        raise ValueError(f"--token {text!r}: expected TOKEN or TOKEN=INIT_WORD, e.g. '<dog>=dog'")
    return token.strip(), (word.strip() or None)


def official_entry(config, name):
    """The entry `name` of the official DCO data config.json (kyungmnlee/dco@164ae17 README, "Data Preparation"):
    {name: {images, prompts, base_prompts, inserting_tokens, initializer_tokens}}."""
    if not os.path.isfile(config):
        raise FileNotFoundError(f"--config {config}: no such file")
    configs = read_json(config)
    if not isinstance(configs, dict) or not all(isinstance(c, dict) for c in configs.values()):
        raise ValueError(f"--config {config}: expected the official format, {{name: {{images, prompts, ...}}}}")
    if name not in configs:
        raise ValueError(f"--config-name {name}: not in {config} (it has {', '.join(configs)})")
    return configs[name]


def official_tokens(config, name):
    """The learned tokens of an entry of the official data config -> [(token, init word or None)]."""
    cfg = official_entry(config, name)
    tokens, words = cfg.get("inserting_tokens", []), cfg.get("initializer_tokens", [])
    return [(t, words[i] if i < len(words) else None) for i, t in enumerate(tokens)]


def read_official_config(config, name):
    """train.py --config: an entry's training data -> (image paths, captions, base prompts or None, tokens, init
    words). Image paths are relative to the official repo's root (the working directory), else to the config's
    folder."""
    cfg, here = official_entry(config, name), os.path.dirname(os.path.abspath(config))
    missing = [k for k in ("images", "prompts") if not isinstance(cfg.get(k), list)]
    if missing:
        raise ValueError(f"--config {config}: '{name}' needs the list(s) {', '.join(missing)}")
    paths = [p if os.path.exists(p) else os.path.join(here, p) for p in cfg["images"]]
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{config}: image {p} not found")
    captions, base = list(cfg["prompts"]), cfg.get("base_prompts")
    if len(captions) != len(paths) or (base is not None and len(base) != len(paths)):
        raise ValueError(f"{config}: '{name}' needs one prompt (and base prompt) per image")
    tokens, inits = cfg.get("inserting_tokens", []), cfg.get("initializer_tokens", [])
    if len(tokens) != len(inits) or not all(inits):
        raise ValueError(f"{config}: give one non-empty initializer_token per inserting_token")
    return paths, captions, base, tokens, inits
