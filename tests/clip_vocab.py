"""Test helper: rebuild the real 49,408-token CLIP BPE vocabulary in the hub tokenizer layout.

The hub folders `tokenizer/` and `tokenizer_2/` of SDXL hold `vocab.json` + `merges.txt` (the standard OpenAI
CLIP BPE files), which are too big for tests/data. The same data ships inside the installed `open_clip` package as
`bpe_simple_vocab_16e6.txt.gz`; we locate it without importing open_clip (its ftfy/regex deps are missing) and
rebuild the files the way OpenAI's CLIP tokenizer builds its vocabulary:
256 byte symbols, the same 256 with `</w>`, 48,894 merges, then `<|startoftext|>` and `<|endoftext|>`.
The two json files copy the structure of tests/data/sdxl/tokenizer*/.
"""

import gzip
import importlib.util
import json
import shutil
from functools import lru_cache
from pathlib import Path

DATA = Path(__file__).parent / "data" / "sdxl"
N_MERGES = 49152 - 256 - 2  # 48,894


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP printable stand-ins for the 256 byte values (ids 0..255 follow this order).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe_data_file() -> Path:
    spec = importlib.util.find_spec("open_clip")  # finds the package without executing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip is not installed; it provides bpe_simple_vocab_16e6.txt.gz")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    return path


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[str, ...]]:
    lines = gzip.open(_bpe_data_file()).read().decode("utf-8").split("\n")
    merges = tuple(lines[1 : 1 + N_MERGES])  # line 0 is a header
    tokens = list(_bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == 49408, len(vocab)
    return vocab, merges


def write_clip_tokenizer_folder(path, pad_token: str = "<|endoftext|>") -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into `path`.

    pad_token "<|endoftext|>" gives SDXL's tokenizer/, "!" gives tokenizer_2/."""
    if pad_token not in ("<|endoftext|>", "!"):
        raise ValueError(f"pad_token must be '<|endoftext|>' or '!', got {pad_token!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    src = DATA / ("tokenizer" if pad_token == "<|endoftext|>" else "tokenizer_2")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, path / name)
        assert json.loads((path / name).read_text())["pad_token"] == pad_token
    return path
