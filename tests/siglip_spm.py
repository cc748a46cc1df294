"""Test helper: a small real-format SigLIP tokenizer folder, trained here with the `sentencepiece` package.

SigLIP's hub `spiece.model` is big_vision's "c4_en" vocabulary (T5's): a unigram model with the default "nmt_nfkc"
normalizer (compiled into the file as a charsmap), a dummy prefix, extra whitespace removed, ids pad 0, eos 1, unk 2
and no BOS. We train a few-hundred-piece model with those settings on generated captions, so the file has every
part our reader must handle (pieces with scores and types, the trainer spec, the charsmap), and write the hub's
tokenizer_config.json beside it (pad = eos = "</s>", 64 tokens, lower case).
"""
import json
import random

WORDS = ("a photo of the dog cat teddy bear backpack vase sneaker robot toy sticker in on at with under wearing "
         "playing saxophone guitar beach forest city street snow mountain painting watercolor oil sketch cartoon style "
         "flat illustration red blue green yellow purple black white golden tiny big fluffy cute old new shiny macro "
         "close-up low-angle side-view sitting standing running jumping sleeping riding bicycle surfboard chef hat "
         "sunglasses crown lighthouse castle garden kitchen table cup pizza night sunset rainbow bucket sunflower "
         "café naïve über résumé 2024 1990s 3d 4k").split()


def captions(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.3:
            words[rng.randrange(len(words))] += rng.choice([",", ".", "!", "?", ":", ";", "'s", "-like"])
        out.append(" ".join(words))
    return out


def write_siglip_tokenizer_folder(folder, vocab_size=150):
    """spiece.model + tokenizer_config.json + special_tokens_map.json in `folder` (created)."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    text = captions(600) + ["<unk> </s> <pad> ( ) [ ] { } < > / \\ | @ # $ % ^ & * + = ~ ` \" ' _"]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=str(folder / "spiece"), vocab_size=vocab_size,
        model_type="unigram", normalization_rule_name="nmt_nfkc", character_coverage=1.0,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        add_dummy_prefix=True, remove_extra_whitespaces=True, num_threads=1, minloglevel=2)
    (folder / "spiece.vocab").unlink()
    special = {"eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}
    config = dict(special, model_max_length=64, do_lower_case=True, model_input_names=["input_ids"],
                  tokenizer_class="SiglipTokenizer", processor_class="SiglipProcessor", sp_model_kwargs={})
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return folder
