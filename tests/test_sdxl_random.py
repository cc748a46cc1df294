"""`--model sdxl-random` without building it (cheap; tests/test_real_size.py runs it at full size): its configs are
the reference's, its tokenizer has CLIP's real id space, its random init is seeded and stays in the target dtype."""
import filecmp
from pathlib import Path

import torch

import sdxl
from clip_vocab import clip_vocab_and_merges
from text_encoder import CLIPTokenizer, byte_level_vocab

DATA = Path(__file__).parent / "data" / "sdxl"
FOLDERS = ("scheduler", "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def test_shipped_configs_are_the_reference_files():
    folder = Path(sdxl.model_path("sdxl-random"))
    assert folder == Path(sdxl.RANDOM_CONFIGS)
    assert filecmp.cmp(folder / "model_index.json", DATA / "model_index.json", shallow=False)
    for sub in FOLDERS:
        names = sorted(p.name for p in (folder / sub).iterdir())
        assert names == sorted(p.name for p in (DATA / sub).iterdir())
        assert all(filecmp.cmp(folder / sub / n, DATA / sub / n, shallow=False) for n in names)
    assert sdxl.native_resolution("sdxl-random") == 1024


def test_byte_level_vocab_is_clips_id_space():
    vocab, real = byte_level_vocab(), clip_vocab_and_merges()[0]
    assert len(vocab) == len(real) == 49408
    first = {t: i for t, i in real.items() if i < 512}
    assert {t: i for t, i in vocab.items() if i < 512} == first  # the 512 byte-level tokens, same ids
    assert vocab["<|startoftext|>"] == real["<|startoftext|>"] == 49406
    assert vocab["<|endoftext|>"] == real["<|endoftext|>"] == 49407


def test_byte_level_tokenizers_as_sdxl_uses_them():
    tok, tok2 = (CLIPTokenizer.from_folder(Path(sdxl.RANDOM_CONFIGS) / t, byte_level_vocab(), [])
                 for t in ("tokenizer", "tokenizer_2"))
    ids = tok("Hi x")[0]
    assert ids.shape == (77,) and ids[:5].tolist() == [49406, 71, 328, 343, 49407]  # h, i</w>, x</w>: as the real
    assert ids[5:].eq(49407).all() and tok2("x")[0, 3:].eq(0).all()  # pads: <|endoftext|>, "!" (id 0)
    assert len(tok.encode("x")) == 1  # --init-word x is one token
    assert tok.add_tokens(["<x>"]) == [49408]  # a learned token takes the next row, as with the real vocabulary


def test_randomize_in_place_keeps_dtype_and_is_seeded():
    def model(seed):
        with torch.device("meta"):
            m = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32)).to(torch.bfloat16)
        return sdxl.randomize_(m.to_empty(device="cpu"), torch.Generator().manual_seed(seed))

    a, b, c = model(0), model(0), model(1)
    assert all(p.dtype == torch.bfloat16 for p in a.parameters())
    assert torch.equal(a[0].weight, b[0].weight) and not torch.equal(a[0].weight, c[0].weight)
    assert abs(a[0].weight.float().std().item() - 64 ** -0.5) < 0.02  # fan-in scaled
    assert torch.equal(a[1].weight, torch.ones(32, dtype=torch.bfloat16))  # norm gains 1
