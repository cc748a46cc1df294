"""CLIPTokenizer parity with transformers 5.24's CLIPTokenizer on the real 49,408-token CLIP vocabulary.

transformers 5 has only the tokenizers-backed CLIPTokenizer: NFC, whitespace runs -> " ", lower case, the CLIP
split pattern, byte-level BPE. There is no ftfy path any more (ftfy isn't installed here either), so neither
side fixes mojibake or unescapes HTML ("&amp;" stays "&amp;"), unlike OpenAI's / OpenCLIP's original tokenizer.
"""

import random

import pytest
import torch
from transformers import CLIPTokenizer as HFCLIPTokenizer

from clip_vocab import clip_vocab_and_merges, write_clip_tokenizer_folder
from text_encoder import CLIPTokenizer, normalize, pre_tokenize

PADS = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}

HANDWRITTEN = [
    "", " ", "\n\t ", "!", "! !! !!!", "!!!!!!!!", "a photo of a dog", "A PHOTO OF A DOG", "a Photo Of <sks> Dog",
    "it's", "It'S", "they're here", "we've won", "I'm", "you'll", "he'd", "don't", "can't won't shouldn't've",
    "'s 't 're 've 'm 'll 'd", "''s", "rock'n'roll", "the dog's toy's", "’s curly quote", "a 'quoted' word",
    "2024", "3.14159", "1,000,000 dollars", "room 101b", "x2 2x 22x", "version 1.2.3-rc4", "٣٤٥ arabic digits",
    "½ ¼ Ⅻ ² ③", "café", "cafe\u0301 (decomposed)", "naïve über straße", "ÆØÅ æøå", "Ελληνικά ΟΔΟΣ", "İstanbul",
    "москва ПРИВЕТ мир", "中文字符 漢字", "日本語のテキスト、カタカナ", "한국어 텍스트", "مرحبا بالعالم", "שלום עולם",
    "हिन्दी भाषा", "ภาษาไทย", "emoji 🐶🐱 🎉🎉 👍🏽 👨‍👩‍👧", "♥♦♣♠ ★☆", "math ∑∫√∞ ≠ ≤", "a\u200bb zero width",
    "tabs\tand\nnewlines\r\nand  many   spaces", "\u3000ideographic\u3000space", "nbsp\xa0here", "line\u2028sep",
    "ctrl\x1cchars\x1f\x7f", "next\x85line", "&amp; &lt;b&gt; html", "mojibake: cafÃ© â€œquotesâ€\x9d",
    "<|startoftext|>", "<|endoftext|>", "a <|endoftext|> b", "<|ENDOFTEXT|>", "<|StartOfText|> x", "<|endoftext",
    "email@example.com http://x.org/a?b=c#d", "snake_case CamelCase kebab-case", "C++ C# F# .NET", "$100 €50 £20 ¥",
    "(parentheses) [brackets] {braces} <angles>", "~`@#%^&*_=+|\\/", "...", "?!?!", "a,b;c:d", "\"double quotes\"",
    "masterpiece, best quality, 8k, ultra-detailed, (dramatic lighting:1.2)", "portrait of a woman, oil painting",
    "hello!world", "wow!!! amazing!!", "sks dog in a bucket", "photo of zwx person!", "trailing space ",
]

WORDS = ["a", "photo", "of", "the", "dog", "cat", "sks", "in", "bucket", "dramatically", "lit", "cyberpunk",
         "city", "at", "night", "Golden", "RETRIEVER", "watercolor", "unreal", "engine", "highly", "detailed",
         "photorealistic", "antidisestablishmentarianism", "pneumonoultramicroscopic", "xyzzy", "qwertyuiop"]
PUNCT = ["!", ",", ".", "?", "!!", "...", "-", ":", ";", "'s", "'t", "'re", "(", ")", "'", "\"", "/", "#", "@"]
EXTRA = ["é", "ü", "ß", "中文", "Привет", "عربي", "🐶", "😀", "12", "7", "2048", "1.5", "\t", "\n", "  ", "ñ", "Ω"]
CHAR_POOL = ("abcxyzABCXYZ0123456789 !!!'''\",.;:?-_()[]{}<>|/\\@#$%^&*~`+="
             "éüßñçÆøΩπЖжщ中文日本한국مرحباשלוםहिंदी٣½²Ⅻ🐶😀👍🏽\u200b\u200d\xa0\u3000\t\n\r\x1c\x85\u0301")


def generated_prompts(n_mixed=150, n_soup=100, seed=0):
    rng = random.Random(seed)
    prompts = []
    for i in range(n_mixed):
        n = rng.randint(1, 120 if i % 10 == 0 else 20)  # every 10th is far longer than 77 tokens
        parts = [rng.choice(WORDS if r < 0.6 else PUNCT if r < 0.8 else EXTRA) for r in (rng.random() for _ in range(n))]
        prompts.append("".join(p + rng.choice(["", " ", " ", "  "]) for p in parts))
    for _ in range(n_soup):
        prompts.append("".join(rng.choice(CHAR_POOL) for _ in range(rng.randint(1, 60))))
    return prompts


PROMPTS = HANDWRITTEN + generated_prompts()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_tokenizers")
    return {name: write_clip_tokenizer_folder(root / name, pad) for name, pad in PADS.items()}


def hf_ids(tok, prompts):
    return tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_rebuilt_vocab_is_clip():
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["dog</w>"] == 1929 and vocab["a</w>"] == 320


def test_pre_tokenize_and_normalize():
    assert normalize("  A\t\nB\u3000C\x1cÉ") == " a b c\x1cé"  # \x1c is not whitespace for the tokenizers regex
    assert pre_tokenize("it's 2024!! café's 中文 <|endoftext|>") == [
        "it", "'s", "2", "0", "2", "4", "!!", "café", "'s", "中文", "<|", "endoftext", "|>"]


@pytest.mark.parametrize("name", PADS)
def test_parity_with_transformers(folders, name):
    assert len(PROMPTS) >= 300
    ours = CLIPTokenizer.from_folder(folders[name])
    ref = HFCLIPTokenizer.from_pretrained(folders[name])
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert ours.model_max_length == ref.model_max_length == 77 and ours.vocab == ref.get_vocab()
    got, want = ours(PROMPTS), hf_ids(ref, PROMPTS)
    assert got.dtype == torch.long and got.shape == want.shape == (len(PROMPTS), 77)
    bad = [(p, got[i].tolist(), want[i].tolist()) for i, p in enumerate(PROMPTS) if not torch.equal(got[i], want[i])]
    assert not bad, bad[:3]
    # the test prompts really exercise truncation and padding
    assert (want[:, -1] == ref.eos_token_id).any() and (want[:, -1] == ref.pad_token_id).any()
    for p in HANDWRITTEN:  # untruncated ids too
        assert ours.encode(p) == ref(p, add_special_tokens=False).input_ids, p


def test_pad_conventions(folders):
    tok, tok_2 = (CLIPTokenizer.from_folder(folders[name]) for name in PADS)
    assert tok.pad_token_id == 49407 and tok_2.pad_token_id == 0
    assert tok("").tolist() == [[49406] + [49407] * 76]
    assert tok_2("").tolist() == [[49406, 49407] + [0] * 75]
    # diffusers issue #4153: tokenizer_2's registered pad token "!" eats every literal "!" (OpenCLIP: 256, 748, 995)
    assert tok.encode("! !! !!!") == [256, 748, 995]
    assert tok_2.encode("! !! !!!") == [0] * 6
    long = tok(["dog " * 100])[0]
    assert long[0] == 49406 and (long[1:76] == 1929).all() and long[76] == 49407


@pytest.mark.parametrize("name", PADS)
def test_added_tokens_match_transformers(folders, name):
    ours = CLIPTokenizer.from_folder(folders[name])
    ref = HFCLIPTokenizer.from_pretrained(folders[name])
    new = ["<dog>", "<sks-style>"]
    assert ours.add_tokens(new) == [49408, 49409]
    assert ref.add_tokens(new) == 2 and ref.convert_tokens_to_ids(new) == [49408, 49409]
    prompts = ["a photo of <dog>", "<dog> in <sks-style>!", "my<dog>s", "<DOG> <Sks-Style>", "< dog >", "<dog><dog>",
               "<sks-style>, masterpiece", "a <dog> " * 40, "<sks-", "dog", ""]
    assert torch.equal(ours(prompts), hf_ids(ref, prompts))
    assert ours.encode("a <dog>") == [320, 49408]
    with pytest.raises(ValueError, match="already in the vocabulary"):
        ours.add_tokens(["dog</w>"])
    with pytest.raises(ValueError, match="already in the vocabulary"):
        ours.add_tokens(["<dog>"])


def test_missing_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_folder(tmp_path)
