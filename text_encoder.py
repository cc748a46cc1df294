"""SDXL's text side: the CLIP BPE tokenizer, the CLIP text transformer, and prompt encoding.

SDXL (Podell et al. 2023, arXiv:2307.01952, §2.1) conditions its UNet on two frozen CLIP text towers
(Radford et al. 2021, arXiv:2103.00020): OpenAI CLIP ViT-L/14 (width 768, quick_gelu) and OpenCLIP
ViT-bigG/14 (width 1280, gelu, with a text projection). Both see the same prompt through the same BPE
vocabulary; only the padding token differs. The UNet gets the penultimate hidden states of both towers
concatenated (768 + 1280 = 2048 channels per token) plus the projected pooled vector of the second one.

Module names equal the on-disk hub names (`text_model.encoder.layers.0.self_attn.q_proj.weight`, ...), so a hub
`text_encoder*/model.safetensors` loads with one `load_state_dict(strict=True)`.
The tokenizer reproduces transformers' (tokenizers-backed) CLIPTokenizer token for token, without the
`regex`/`ftfy` packages. Like transformers it does NOT run ftfy/html-unescape as OpenAI's original tokenizer does.
"""

import sys
import unicodedata
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from product.files import read_json, read_text

# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """Map each of the 256 byte values to a printable character, so BPE can work on strings of bytes.

    Printable latin-1 bytes map to themselves; the rest (space, control bytes, ...) to chr(256+n)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(moved)}}


def _is_space(c: str) -> bool:
    # `\s` of the Oniguruma regex engine used by `tokenizers`: not Python's str.isspace (which also takes \x1c-\x1f).
    return c in "\t\n\v\f\r\x85" or unicodedata.category(c) in ("Zs", "Zl", "Zp")


def _is_letter(c: str) -> bool:  # \p{L}
    return unicodedata.category(c)[0] == "L"


def _is_number(c: str) -> bool:  # \p{N}
    return unicodedata.category(c)[0] == "N"


def normalize(text: str) -> str:
    """NFC, every whitespace run -> one space, lower case (per character, as Rust's char::to_lowercase)."""
    out = []
    for c in unicodedata.normalize("NFC", text):
        if _is_space(c):
            if not out or out[-1] != " ":
                out.append(" ")
        else:
            out.append(c.lower())
    return "".join(out)


def pre_tokenize(text: str) -> list[str]:
    """Split normalized text into words, the CLIP pattern scanned by hand:

        's|'t|'re|'ve|'m|'ll|'d | [\\p{L}]+ | [\\p{N}] | [^\\s\\p{L}\\p{N}]+     (whitespace separates and is dropped)

    i.e. English contractions, runs of letters, single digits ("2024" is four words), and runs of anything else.
    CLIP's pattern also lists `<|startoftext|>|<|endoftext|>`, but transformers' ByteLevel step re-splits such a
    word GPT-2-style into "<|", "endoftext", "|>", which is what the classes below give anyway. (Real special
    tokens never get here: they are split off first, see CLIPTokenizer.encode.)"""
    words, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if _is_space(c):
            i += 1
            continue
        if c == "'" and text[i + 1 : i + 3] in ("re", "ve", "ll"):
            j = i + 3
        elif c == "'" and text[i + 1 : i + 2] in ("s", "t", "m", "d"):
            j = i + 2
        elif _is_letter(c):
            j = i + 1
            while j < n and _is_letter(text[j]):
                j += 1
        elif _is_number(c):
            j = i + 1
        else:
            j = i + 1
            while j < n and not (_is_space(text[j]) or _is_letter(text[j]) or _is_number(text[j])):
                j += 1
        words.append(text[i:j])
        i = j
    return words


def _split_on(text: str, tokens: dict[str, int]) -> list:
    """Cut whole-token matches out of text (leftmost, then longest), giving a list of str pieces and int ids."""
    out, start, i = [], 0, 0
    while i < len(text) and tokens:
        match = max((t for t in tokens if text.startswith(t, i)), key=len, default=None)
        if match is None:
            i += 1
            continue
        out += [text[start:i]] if start < i else []
        out.append(tokens[match])
        i = start = i + len(match)
    return out + ([text[start:]] if start < len(text) else [])


def byte_level_vocab(size=49408) -> dict[str, int]:
    """CLIP's id space with only its byte-level base: the first 512 ids are exactly the real vocabulary's (the 256
    byte symbols, then the same with `</w>`, in bytes_to_unicode order), the last two are <|startoftext|> 49406 and
    <|endoftext|> 49407, and the ids in between hold placeholders no text can produce. With no merges every
    character is one token. For models with random weights (sdxl.py's "sdxl-random"): the token table, the ids
    and the sequence length are the real ones; which ids a word maps to does not matter when no row means anything.
    """
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += [f"<|unused-{i}|>" for i in range(len(tokens), size - 2)] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


class CLIPTokenizer:
    """CLIP's byte-level BPE with `</w>` end-of-word marks, matching transformers' CLIPTokenizer."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], special_tokens: dict[str, bool],
                 bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                 model_max_length=77):
        self.vocab = dict(vocab)
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}  # earlier merge = applied first
        self.byte_encoder = bytes_to_unicode()
        self.bos_token_id, self.eos_token_id = self.vocab[bos_token], self.vocab[eos_token]
        self.pad_token_id = self.vocab[pad_token]
        self.model_max_length = model_max_length
        # Added tokens are matched as a unit before pre-tokenisation: "raw" ones on the text as typed, the others
        # on the normalized (lower-cased) text. In transformers 5 a special token from a plain string in the config
        # (SDXL's pad tokens) is raw, one from an AddedToken dict keeps its `normalized` flag. That is why
        # tokenizer_2 turns every literal "!" into the pad id 0 (diffusers issue #4153).
        self.raw_tokens = {t: self.vocab[t] for t, normalized in special_tokens.items() if not normalized}
        self.normalized_tokens = {normalize(t): self.vocab[t] for t, normalized in special_tokens.items() if normalized}
        self.cache: dict[str, list[int]] = {}

    @classmethod
    def from_folder(cls, path, vocab=None, merges=None) -> "CLIPTokenizer":
        """Read a hub tokenizer folder: vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json.
        `vocab` and `merges`, when given, stand in for the first two files (see byte_level_vocab)."""
        path = Path(path)
        if vocab is None:
            for name in ("vocab.json", "merges.txt"):
                if not (path / name).is_file():
                    raise FileNotFoundError(f"{path / name} not found: pass a hub tokenizer folder (tokenizer*/)")
            vocab = read_json(path / "vocab.json")  # malformed: a ValueError naming the file
            lines = read_text(path / "merges.txt").splitlines()
            merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        config = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the second one wins, as in transformers
            if (path / name).is_file():
                config.update(read_json(path / name))
        defaults = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                    "pad_token": "<|endoftext|>"}
        names, special_tokens = {}, {}
        for key, default in defaults.items():  # later keys override a shared content's flag (eos/unk/pad)
            value = config.get(key, default)
            content = value["content"] if isinstance(value, dict) else value
            special_tokens[content] = value.get("normalized", False) if isinstance(value, dict) else False
            names[key] = content
        return cls(vocab, merges, special_tokens, names["bos_token"], names["eos_token"], names["pad_token"],
                   config.get("model_max_length", 77))

    def bpe(self, word: str) -> list[int]:
        """Byte-pair encode one pre-tokenized word: start from its UTF-8 bytes (the last one marked `</w>`) and
        repeatedly merge the adjacent pair that was learned earliest, until no learned pair is left."""
        if word not in self.cache:
            chars = [self.byte_encoder[b] for b in word.encode("utf-8")]
            parts = chars[:-1] + [chars[-1] + "</w>"]
            while len(parts) > 1:
                pairs = list(zip(parts, parts[1:]))
                best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))  # leftmost among equals
                if best not in self.ranks:
                    break
                i = pairs.index(best)
                parts[i : i + 2] = [parts[i] + parts[i + 1]]
            self.cache[word] = [self.vocab[p] for p in parts]
        return self.cache[word]

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt, without BOS/EOS, not truncated."""
        ids = []
        for piece in _split_on(text, self.raw_tokens):
            for sub in [piece] if isinstance(piece, int) else _split_on(normalize(piece), self.normalized_tokens):
                if isinstance(sub, int):
                    ids.append(sub)
                else:
                    for word in pre_tokenize(sub):
                        ids += self.bpe(word)
        return ids

    def __call__(self, prompts: str | list[str]) -> torch.LongTensor:
        """[B, model_max_length] ids: BOS, at most 75 prompt tokens, EOS, then padding."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        rows = []
        for prompt in prompts:
            ids = [self.bos_token_id, *self.encode(prompt)[: self.model_max_length - 2], self.eos_token_id]
            rows.append(ids + [self.pad_token_id] * (self.model_max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def add_tokens(self, tokens: list[str]) -> list[int]:
        """Add new whole-word tokens (textual inversion, e.g. "<dog>"); ids continue after the vocabulary.

        Like transformers' non-special added tokens they match case-insensitively, even inside a word."""
        ids = []
        for token in tokens:
            if token in self.vocab or not token.strip():
                raise ValueError(f"add_tokens: {token!r} is empty or already in the vocabulary; "
                                 "pick a new string like '<my-token>'")
            self.vocab[token] = len(self.vocab)
            self.normalized_tokens[normalize(token)] = self.vocab[token]
            ids.append(self.vocab[token])
        return ids


def token_positions(tokenizer, text, token=None):
    """(the 1-based position of `token`'s first use in `text` or None, the text's length), in content tokens of
    `tokenizer` (CLIP's BPE, before the new token is added: a learned token counts as one)."""
    def count(s):
        return len(tokenizer.encode(s)) if s.strip() else 0
    if token is None or token not in text:
        return None, count(text)
    parts = text.split(token)
    return count(parts[0]) + 1, sum(count(p) for p in parts) + len(parts) - 1


def prompt_window(tokenizer):
    """How many content tokens CLIP reads: 77 minus the start and end tokens."""
    return tokenizer.model_max_length - 2


def check_prompt_length(tokenizers, text, what, tokens=(), strict=False):
    """CLIP reads the first 75 content tokens of a prompt: one warning line when `text` is longer. strict (a
    training caption): a learned token past the window is refused, since it would be trained on nothing."""
    longest = 0
    for tokenizer in tokenizers:
        window = prompt_window(tokenizer)
        for t in tokens or [None]:
            at, length = token_positions(tokenizer, text, t)
            longest = max(longest, length)
            if strict and at is not None and at > window:
                raise ValueError(f"{what} is {length} CLIP tokens and {t} is token {at}, past the {window} CLIP "
                                 f"reads, so it would learn nothing; name {t} earlier or shorten it")
    if longest > prompt_window(tokenizers[0]):
        print(f"warning: {what} is {longest} CLIP tokens; only the first {prompt_window(tokenizers[0])} are read",
              file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# Text transformer: pre-LayerNorm GPT-style blocks with a causal mask, learned absolute positions.

# The activations of the transformer towers here and in the scorers (evaluation/siglip.py, evaluation/dinov2.py), by their config names.
ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu,
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class CLIPAttention(nn.Module):
    """Multi-head self-attention with q/k/v/out projections. CLIP's text tower is causal; SigLIP's towers reuse this
    module with causal=False (every token sees every token)."""

    def __init__(self, dim: int, n_heads: int, causal: bool = True):
        super().__init__()
        self.n_heads, self.causal = n_heads, causal
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # causal: itself and earlier tokens only
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(dim, hidden), nn.Linear(hidden, dim), ACTIVATIONS[act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, dim: int, n_heads: int, hidden: int, act: str, eps: float):
        super().__init__()
        self.self_attn, self.layer_norm1 = CLIPAttention(dim, n_heads), nn.LayerNorm(dim, eps=eps)
        self.mlp, self.layer_norm2 = CLIPMLP(dim, hidden, act), nn.LayerNorm(dim, eps=eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(nn.Module):
    """CLIP text tower from a transformers text-encoder config.json dict.

    forward(input_ids) -> (hidden_states, pooled): hidden_states[0] is the embedding output and hidden_states[i]
    the output of layer i (num_layers + 1 tensors, none with the final LayerNorm); pooled is final_layer_norm of
    the last layer at each row's first end-of-text token, then text_projection if the model has one.

    Why pool at eos_token_id and not like transformers: SDXL's configs carry a legacy `eos_token_id: 2`, which
    makes transformers (and SGM) pool at argmax(input_ids). That is the EOS only while 49407 is the largest id in
    the row; a textual-inversion token (id 49408, ...) would be pooled instead. SDXL was trained on rows without
    such tokens, i.e. pooled at the EOS, so EOS pooling keeps a prompt with "<dog>" in the distribution the model
    knows. `pool = "argmax"` reproduces transformers/diffusers (and the official DCO code, which trained under it)."""

    def __init__(self, config: dict, with_projection: bool | None = None, eos_token_id: int = 49407):
        super().__init__()
        if config.get("hidden_act") not in ACTIVATIONS:
            raise ValueError(f"text encoder config: hidden_act {config.get('hidden_act')!r} "
                             f"is not one of {list(ACTIVATIONS)}")
        if with_projection is None:
            with_projection = "CLIPTextModelWithProjection" in config.get("architectures", [])
        C, eps = config["hidden_size"], config["layer_norm_eps"]
        self.eos_token_id = eos_token_id
        self.pool = "eos"  # or "argmax": see the docstring
        self.text_model = nn.ModuleDict(dict(
            embeddings=nn.ModuleDict(dict(
                token_embedding=nn.Embedding(config["vocab_size"], C),
                position_embedding=nn.Embedding(config["max_position_embeddings"], C),
            )),
            encoder=nn.ModuleDict(dict(layers=nn.ModuleList(
                CLIPEncoderLayer(C, config["num_attention_heads"], config["intermediate_size"],
                                 config["hidden_act"], eps)
                for _ in range(config["num_hidden_layers"])
            ))),
            final_layer_norm=nn.LayerNorm(C, eps=eps),
        ))
        self.text_projection = nn.Linear(C, config["projection_dim"], bias=False) if with_projection else None

    def forward(self, input_ids: torch.LongTensor):
        emb, T = self.text_model.embeddings, input_ids.shape[1]
        x = emb.token_embedding(input_ids) + emb.position_embedding.weight[:T]
        hidden_states = [x]
        for layer in self.text_model.encoder.layers:
            x = layer(x)
            hidden_states.append(x)
        is_eos = input_ids == self.eos_token_id
        if not is_eos.any(dim=1).all():
            raise ValueError(f"input_ids: every row needs an end-of-text token {self.eos_token_id}; "
                             "make them with CLIPTokenizer(...)")
        if self.pool == "argmax":  # the largest id of each row: the EOS, unless a new token (id > 49407) is there
            pos = input_ids.argmax(dim=1)
        else:
            pos = is_eos.int().argmax(dim=1)  # argmax of a 0/1 row = its first 1
        pooled = self.text_model.final_layer_norm(x[torch.arange(len(x), device=x.device), pos])
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return hidden_states, pooled


# ----------------------------------------------------------------------------------------------------------------
# New tokens for textual inversion, and SDXL's prompt conditioning


def resize_token_embeddings(text_model: CLIPTextModel, new_size: int) -> nn.Embedding:
    """Grow the token table to new_size rows, keeping the old rows; new rows start at the mean old row."""
    old = text_model.text_model.embeddings.token_embedding
    if new_size < old.num_embeddings:
        raise ValueError(f"resize_token_embeddings: new_size {new_size} < current {old.num_embeddings}; "
                         "only growing is supported")
    new = nn.Embedding(new_size, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight[: old.num_embeddings] = old.weight
        new.weight[old.num_embeddings :] = old.weight.mean(dim=0)
    text_model.text_model.embeddings.token_embedding = new
    return new


def init_token(tokenizer: CLIPTokenizer, text_model: CLIPTextModel, token: str, init_word: str,
               any_word=False) -> int:
    """Add `token` (e.g. "<dog>") to a tokenizer + encoder pair, embedding copied from `init_word`; return its id.

    For SDXL call it for both pairs: the two vocabularies are equal, so the token gets the same id in both.
    any_word: a word of several tokens starts from its first (random weights, where no row means anything)."""
    init_ids = tokenizer.encode(init_word)[:1] if any_word else tokenizer.encode(init_word)
    if len(init_ids) != 1:
        raise ValueError(f"init_token: init word {init_word!r} is {len(init_ids)} tokens {init_ids}; "
                         "pick a word that is a single CLIP token")
    (new_id,) = tokenizer.add_tokens([token])
    table = resize_token_embeddings(text_model, len(tokenizer.vocab))
    with torch.no_grad():
        table.weight[new_id] = table.weight[init_ids[0]]
    return new_id


def encode_prompt(prompts: str | list[str], tokenizer: CLIPTokenizer, tokenizer_2: CLIPTokenizer,
                  text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModel):
    """SDXL text conditioning: (prompt_embeds [B, 77, 768 + 1280], pooled [B, 1280]).

    prompt_embeds = penultimate hidden states of both encoders (no final LayerNorm), concatenated on channels,
    CLIP-L first. pooled = the projected pooled output of the second encoder only."""
    device = text_encoder.text_model.embeddings.token_embedding.weight.device
    hidden, _ = text_encoder(tokenizer(prompts).to(device))
    hidden_2, pooled = text_encoder_2(tokenizer_2(prompts).to(device))
    return torch.cat([hidden[-2], hidden_2[-2]], dim=-1), pooled
