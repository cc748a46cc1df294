"""Our SentencePiece unigram tokenizer (evaluation/siglip.py) against transformers' SiglipTokenizer (slow, sentencepiece-backed),
on a model trained here with SigLIP's settings (tests/siglip_spm.py)."""
import random

import pytest
from transformers import SiglipTokenizer as HFSiglipTokenizer

from evaluation.siglip import SiglipTokenizer, read_spiece_model
from siglip_spm import WORDS, captions, write_siglip_tokenizer_folder

# Prompts the captions above do not cover: NFKC folding (full-width letters, ligatures, circled digits, decomposed
# accents), characters the vocabulary lacks (-> <unk>, runs merged), punctuation, odd whitespace, truncation.
EDGE_CASES = [
    "", " ", "▁", "a ▁ dog", "  A   PHOTO\tof\na Dog  ", "ｆｕｌｌ－ｗｉｄｔｈ ｄｏｇ", "ﬁne ﬂuffy cat",
    "① ② ③ dogs", "cafe\u0301 nai\u0308ve", "a 🐶 on the 🏖️ beach", "一只狗 in the snow", "dog!!!??? ...",
    "a <dog> in style", "«quoted» “curly” ‘single’ — dash", "x" * 80, "dog " * 100, "ÀÉÎÕÜ ÿ ß",
    "\u00a0non\u2003breaking\u2009spaces", "tab\tsep", "Zürich Straße", "sks dog", "α β γ δ", "a photo of a dog.",
    "A PHOTO OF A DOG", "3.14 2,000 50%",
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = write_siglip_tokenizer_folder(tmp_path_factory.mktemp("siglip") / "tokenizer")
    return SiglipTokenizer.from_folder(folder), HFSiglipTokenizer.from_pretrained(folder), folder


def prompts(n=300, seed=1):
    rng = random.Random(seed)
    extra = WORDS + ["Dog", "CAT", "zebra", "quokka", "xylophone", "ⅷ", "½", "™", "ǅ", "İstanbul", "🙂"]
    out = []
    for _ in range(n):
        words = [rng.choice(extra) for _ in range(rng.randint(1, 20))]
        seps = [rng.choice([" ", " ", " ", "  ", ", ", "-", "\t", ". "]) for _ in words]
        out.append("".join(w + s for w, s in zip(words, seps)).strip(rng.choice(["", " "])))
    return out + captions(50, seed=7) + EDGE_CASES


def test_reads_the_model_file(tokenizers):
    import sentencepiece as spm

    ours, _, folder = tokenizers
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    model = read_spiece_model(folder / "spiece.model")
    assert len(model["pieces"]) == sp.get_piece_size() == 150
    for i in range(150):
        piece, score, kind = model["pieces"][i]
        assert piece == sp.id_to_piece(i) and abs(score - sp.get_score(i)) < 1e-6
        assert (kind == 3) == sp.is_control(i) and (kind == 2) == sp.is_unknown(i)
    assert model["normalizer"]["name"] == "nmt_nfkc" and len(model["normalizer"]["charsmap"]) > 1000
    assert (ours.eos_id, ours.pad_id, ours.unk_id) == (1, 1, 2)


def test_matches_transformers(tokenizers):
    ours, hf, _ = tokenizers
    texts = prompts()
    ref = hf(texts, padding="max_length", truncation=True, max_length=64)["input_ids"]
    got = ours(texts).tolist()
    bad = [(t, g, r) for t, g, r in zip(texts, got, ref) if g != r]
    print(f"SigLIP tokenizer: {len(texts) - len(bad)}/{len(texts)} prompts equal to transformers'")
    assert not bad, bad[:3]
    assert len(texts) >= 300
    # the prompts really exercise what they are meant to: unknown characters, truncation, padding
    assert sum(ours.unk_id in row for row in got) >= 10
    assert sum(row[-1] == ours.eos_id and row[-2] != ours.pad_id for row in got) >= 2  # truncated to 63 + EOS
    assert all(len(row) == 64 for row in got)


def test_normalization_rules_are_the_models(tokenizers):
    ours, _, _ = tokenizers
    # NFKC from the file's charsmap: full-width letters and the 'fi' ligature fold to ASCII
    assert ours.encode("ｆｉｎｅ ｄｏｇ") == ours.encode("fine dog") == ours.encode("ﬁne dog")
    assert ours.encode("A  Dog!") == ours.encode("a dog")  # canonicalization: lower case, no punctuation
    assert ours.encode("") == [] and ours("").tolist()[0] == [1] * 64
