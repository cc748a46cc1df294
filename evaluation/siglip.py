"""SigLIP, the image-text encoder of the paper's prompt-fidelity metric: both towers and the SentencePiece tokenizer.

SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training", arXiv:2303.15343) is a CLIP-style pair of
transformers trained with a per-pair sigmoid loss instead of CLIP's batch softmax. DCO (§5) scores how well a sample
follows its prompt as the cosine of SigLIP's image and text embeddings.

    model, tokenizer = load_siglip(folder)      # a hub-layout folder (eval.py fetches hub ids into the HF cache)
    text = model.text_model(tokenizer(["a dog on the beach"]))          # [B, D]
    image = model.vision_model(pixels)                                  # [B, D]

Differences from CLIP that matter here: the text tower is NOT causal and has no special start token; every prompt is
padded to the fixed length it was trained with (64) and the *last* position, usually padding, is the pooled state
(big_vision's "last token" pooling). The vision tower pools with a learned query ("probe") attending to all patches,
the multi-head attention pooling of Lee et al. 2019 (Set Transformer, arXiv:1810.00825), instead of a CLS token.
No attention mask anywhere: big_vision trains without one, so the pads take part in attention.

Module names equal the hub's `model.safetensors` keys (`text_model.encoder.layers.0.self_attn.q_proj.weight`,
`vision_model.head.attention.in_proj_weight`, ...): a hub folder loads with one `load_state_dict(strict=True)`.

The tokenizer (SentencePiece unigram, Kudo 2018, arXiv:1804.10959) is read from the hub's `spiece.model` with a
small protobuf reader below, and reproduces transformers' SiglipTokenizer id for id.
"""
import json
import os
import re
import string
import struct

import torch
import torch.nn as nn
import torch.nn.functional as F

from text_encoder import ACTIVATIONS, CLIPAttention, CLIPMLP  # SigLIP's towers are CLIP's blocks without the mask
# ----------------------------------------------------------------------------------------------------------------
# spiece.model: a serialized sentencepiece ModelProto (sentencepiece/src/sentencepiece_model.proto). We need the
# pieces (string, score, type), the model type and byte_fallback from the trainer spec, and the normalizer spec.

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece.Type
UNIGRAM = 1  # TrainerSpec.ModelType


def _varint(buf, i):
    value = shift = 0
    while True:
        b = buf[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return value, i


def protobuf_fields(buf):
    """The (field number, value) pairs of one serialized protobuf message, in order. Values: int for varints,
    bytes for length-delimited fields (strings, nested messages), raw 4/8 bytes for fixed-width ones."""
    i, out = 0, []
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        else:
            raise ValueError(f"protobuf: wire type {wire} is not supported")
        out.append((field, value))
    return out


def read_spiece_model(path) -> dict:
    """{'pieces': [(piece, score, type)], 'model_type', 'byte_fallback', 'normalizer': {...}} from a spiece.model.
    Absent fields take the proto's defaults (type NORMAL, unigram, the three whitespace flags true)."""
    with open(path, "rb") as f:
        buf = f.read()
    model = dict(pieces=[], model_type=UNIGRAM, byte_fallback=False, treat_whitespace_as_suffix=False,
                 normalizer=dict(name="", charsmap=b"", add_dummy_prefix=True, remove_extra_whitespaces=True,
                                 escape_whitespaces=True))
    for field, value in protobuf_fields(buf):
        if field == 1:  # repeated SentencePiece {1: piece, 2: score (float), 3: type}
            piece, score, kind = "", 0.0, NORMAL
            for f, v in protobuf_fields(value):
                if f == 1:
                    piece = v.decode("utf-8")
                elif f == 2:
                    score = struct.unpack("<f", v)[0]
                elif f == 3:
                    kind = v
            model["pieces"].append((piece, score, kind))
        elif field == 2:  # TrainerSpec {3: model_type, 24: treat_whitespace_as_suffix, 35: byte_fallback}
            for f, v in protobuf_fields(value):
                if f == 3:
                    model["model_type"] = v
                elif f == 24:
                    model["treat_whitespace_as_suffix"] = bool(v)
                elif f == 35:
                    model["byte_fallback"] = bool(v)
        elif field == 3:  # NormalizerSpec {1: name, 2: precompiled_charsmap, 3, 4, 5: the whitespace flags}
            keys = {1: "name", 2: "charsmap", 3: "add_dummy_prefix", 4: "remove_extra_whitespaces",
                    5: "escape_whitespaces"}
            for f, v in protobuf_fields(value):
                if f in keys:
                    model["normalizer"][keys[f]] = v.decode("utf-8") if f == 1 else bytes(v) if f == 2 else bool(v)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Normalization: the model's own rules (for SigLIP, "nmt_nfkc": NFKC plus a few NMT clean-ups) are compiled into the
# file as a Darts-clone double-array trie mapping byte strings to replacement strings.


class CharsMap:
    """The precompiled charsmap: uint32 trie size, the double-array trie (uint32 units), then the replacement
    strings, each NUL-terminated. A trie leaf's value is the offset of its replacement."""

    def __init__(self, blob: bytes):
        self.units, self.strings = [], b""
        if blob:
            (size,) = struct.unpack_from("<I", blob)
            self.units = list(struct.unpack_from(f"<{size // 4}I", blob, 4))
            self.strings = blob[4 + size:]

    def longest_match(self, data: bytes, start: int):
        """(length, replacement) of the longest rule matching data[start:], or None. The double array walks one
        byte per step: child = node ^ offset ^ byte, valid if the child's label is that byte (Darts-clone's unit:
        bit 8 has-leaf, bits 0-7 and 31 label, bits 10-30 offset, shifted by 8 if bit 9)."""
        if not self.units:
            return None
        offset = lambda u: (u >> 10) << ((u & (1 << 9)) >> 6)  # noqa: E731
        node, best = offset(self.units[0]), None
        for i in range(start, len(data)):
            node ^= data[i]
            unit = self.units[node]
            if unit & ((1 << 31) | 0xFF) != data[i]:
                break
            node ^= offset(unit)
            if (unit >> 8) & 1:  # a rule ends here; its value sits in the unit at the new node
                value = self.units[node] & ((1 << 31) - 1)
                best = (i + 1 - start, self.strings[value:self.strings.index(b"\0", value)])
        return best


def _utf8_length(first_byte):
    return 1 if first_byte < 0x80 else 2 if first_byte < 0xE0 else 3 if first_byte < 0xF0 else 4


def sp_normalize(text: str, spec: dict, charsmap: CharsMap, continuation=False) -> str:
    """SentencePiece's Normalizer::Normalize: apply the charsmap rule by rule (longest match, else copy one UTF-8
    character), drop leading spaces, collapse runs of spaces, drop trailing ones (remove_extra_whitespaces), write
    spaces as U+2581 '▁' (escape_whitespaces), and put one '▁' in front (add_dummy_prefix).

    continuation=True normalizes text as the tail of a longer string whose head was not whitespace: no dummy prefix
    and no leading spaces dropped (a leading run still collapses to one)."""
    data, out, i = text.encode("utf-8"), b"", 0
    remove_extra = spec["remove_extra_whitespaces"]
    chunks = []
    while i < len(data):
        match = charsmap.longest_match(data, i)
        n, piece = match if match else (_utf8_length(data[i]), data[i:i + _utf8_length(data[i])])
        chunks.append(piece)
        i += n
    if remove_extra and not continuation:
        while chunks and chunks[0] == b" ":
            chunks.pop(0)
    if not chunks:
        return ""
    space = "▁".encode() if spec["escape_whitespaces"] else b" "
    out = space if spec["add_dummy_prefix"] and not continuation else b""
    prev_space = remove_extra and not continuation
    for piece in chunks:
        if prev_space:
            piece = piece.lstrip(b" ")
        if piece:
            out += piece.replace(b" ", space)
            prev_space = piece.endswith(b" ")
    if remove_extra:
        while out.endswith(space):
            out = out[:-len(space)]
    return out.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


class SiglipTokenizer:
    """SentencePiece unigram segmentation + SigLIP's text canonicalization, matching transformers' SiglipTokenizer
    with padding="max_length", truncation=True: [B, model_max_length] ids, the prompt's pieces, one EOS, then pads."""

    def __init__(self, model: dict, eos_token="</s>", pad_token="</s>", unk_token="<unk>", model_max_length=64,
                 do_lower_case=True):
        if model["model_type"] != UNIGRAM:
            raise ValueError("spiece.model: not a unigram model; SigLIP's tokenizer is unigram")
        if model["byte_fallback"] or model["treat_whitespace_as_suffix"]:
            raise ValueError("spiece.model: byte_fallback / treat_whitespace_as_suffix are not supported "
                             "(SigLIP's tokenizer uses neither)")
        self.spec, self.charsmap = model["normalizer"], CharsMap(model["normalizer"]["charsmap"])
        ids = {piece: i for i, (piece, _, _) in enumerate(model["pieces"])}
        for token in (eos_token, pad_token, unk_token):
            if token not in ids:
                raise ValueError(f"spiece.model: special token {token!r} is not a piece of the model")
        self.eos_id, self.pad_id, self.unk_id = ids[eos_token], ids[pad_token], ids[unk_token]
        self.model_max_length, self.do_lower_case = model_max_length, do_lower_case
        # What Viterbi may use: normal pieces with their log-probability, user-defined pieces with a bonus that
        # always wins (sentencepiece: length_in_bytes * max_score - 0.1). Control, unknown and unused pieces are
        # never matched in text.
        normal = [s for _, s, t in model["pieces"] if t == NORMAL]
        max_score, min_score = max(normal), min(normal)
        self.scores = {}
        for i, (piece, score, kind) in enumerate(model["pieces"]):
            if kind == NORMAL:
                self.scores[piece] = (i, score)
            elif kind == USER_DEFINED:
                self.scores[piece] = (i, len(piece.encode()) * max_score - 0.1)
        self.max_len = max(map(len, self.scores))
        self.unk_score = min_score - 10.0  # sentencepiece's kUnkPenalty

    @classmethod
    def from_folder(cls, path) -> "SiglipTokenizer":
        """spiece.model + tokenizer_config.json (special tokens, model_max_length, do_lower_case) of a hub folder."""
        if not os.path.isfile(os.path.join(path, "spiece.model")):
            raise FileNotFoundError(f"{os.path.join(path, 'spiece.model')} is missing: a SigLIP folder needs its "
                                    "SentencePiece model")
        config = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if os.path.isfile(os.path.join(path, name)):
                with open(os.path.join(path, name)) as f:
                    config.update(json.load(f))
        def token(key, default):  # a plain string, or an AddedToken dict {"content": ...}
            value = config.get(key, default)
            return value["content"] if isinstance(value, dict) else value

        return cls(read_spiece_model(os.path.join(path, "spiece.model")), token("eos_token", "</s>"),
                   token("pad_token", "</s>"), token("unk_token", "<unk>"), config.get("model_max_length", 64),
                   config.get("do_lower_case", True))

    def canonicalize(self, text: str) -> str:
        """big_vision's prompt canonicalization (as transformers' SiglipTokenizer.canonicalize_text): lower case,
        drop ASCII punctuation, every whitespace run -> one space, strip."""
        if self.do_lower_case:
            text = text.lower()
        text = text.translate(str.maketrans("", "", string.punctuation))
        return re.sub(r"\s+", " ", text).strip()

    def viterbi(self, text: str) -> list[int]:
        """The most probable segmentation of normalized text into pieces (unigram LM: the sum of the pieces'
        log-probabilities), by dynamic programming over end positions, as sentencepiece's EncodeOptimized: start
        positions in order, lengths in order, a candidate replaces the best path only when strictly better. A
        character no single piece covers becomes <unk> (score min - 10); runs of <unk> merge into one."""
        n = len(text)
        best = [None] * (n + 1)  # best[end] = (score, start, id)
        best[0] = (0.0, -1, -1)
        for start in range(n):
            if best[start] is None:
                continue
            base, single = best[start][0], False
            for end in range(start + 1, min(n, start + self.max_len) + 1):
                hit = self.scores.get(text[start:end])
                if hit is None:
                    continue
                single |= end == start + 1
                if best[end] is None or base + hit[1] > best[end][0]:
                    best[end] = (base + hit[1], start, hit[0])
            if not single and (best[start + 1] is None or base + self.unk_score > best[start + 1][0]):
                best[start + 1] = (base + self.unk_score, start, self.unk_id)
        ids, end = [], n
        while end > 0:
            _, start, i = best[end]
            ids.append(i)
            end = start
        ids.reverse()
        return [i for k, i in enumerate(ids) if not (i == self.unk_id and k and ids[k - 1] == self.unk_id)]

    def encode(self, text: str) -> list[int]:
        """Piece ids of one prompt, no EOS, not truncated.

        As transformers' SiglipTokenizer: '▁' + text (any '▁' in the text made a space first), canonicalized (which
        keeps that '▁'), then segmented as the tail of "<unk>" + it. (transformers encodes "<unk>" + text and drops
        the pieces of "<unk>", to get around the model's dummy prefix; normalizing the text as a continuation is the
        same thing.) The model's nmt_nfkc rules map '▁' to a space, so the text starts with one word boundary."""
        text = self.canonicalize("▁" + text.replace("▁", " "))
        return self.viterbi(sp_normalize(text, self.spec, self.charsmap, continuation=True))

    def __call__(self, prompts) -> torch.LongTensor:
        prompts = [prompts] if isinstance(prompts, str) else prompts
        rows = []
        for prompt in prompts:
            ids = self.encode(prompt)[: self.model_max_length - 1] + [self.eos_id]
            rows.append(ids + [self.pad_id] * (self.model_max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


# ----------------------------------------------------------------------------------------------------------------
# The two towers: pre-LayerNorm transformer blocks, the same for text and image.

# CLIP's attention (here without the causal mask: no mask at all) and CLIP's two-layer MLP, with the same key names.
def SelfAttention(dim, n_heads):
    return CLIPAttention(dim, n_heads, causal=False)


class EncoderLayer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        C, eps = c["hidden_size"], c["layer_norm_eps"]
        self.layer_norm1, self.self_attn = nn.LayerNorm(C, eps=eps), SelfAttention(C, c["num_attention_heads"])
        self.layer_norm2, self.mlp = nn.LayerNorm(C, eps=eps), CLIPMLP(C, c["intermediate_size"], c["hidden_act"])

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


def _encoder(c: dict) -> nn.Module:
    encoder = nn.Module()
    encoder.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c["num_hidden_layers"]))
    return encoder


class TextTransformer(nn.Module):
    """forward(ids [B, T]) -> [B, projection_size]: final LayerNorm of the LAST position, then `head`."""

    def __init__(self, c: dict):
        super().__init__()
        C = c["hidden_size"]
        self.embeddings = nn.ModuleDict(dict(token_embedding=nn.Embedding(c["vocab_size"], C),
                                             position_embedding=nn.Embedding(c["max_position_embeddings"], C)))
        self.encoder = _encoder(c)
        self.final_layer_norm = nn.LayerNorm(C, eps=c["layer_norm_eps"])
        self.head = nn.Linear(C, c.get("projection_size", C))

    def forward(self, ids):
        x = self.embeddings.token_embedding(ids) + self.embeddings.position_embedding.weight[: ids.shape[1]]
        for layer in self.encoder.layers:
            x = layer(x)
        return self.head(self.final_layer_norm(x[:, -1]))  # LayerNorm is per position: normalizing one is enough


class MultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention's parameters and math (q, k, v projections stacked in in_proj_*), written out."""

    def __init__(self, dim, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query, x):
        (B, S, C), T = query.shape, x.shape[1]
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        heads = lambda t, n: t.view(B, n, self.n_heads, C // self.n_heads).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(heads(F.linear(query, wq, bq), S), heads(F.linear(x, wk, bk), T),
                                           heads(F.linear(x, wv, bv), T))
        return self.out_proj(y.transpose(1, 2).reshape(B, S, C))


class AttentionPoolingHead(nn.Module):
    """One learned query ("probe") attends to all patch states; then a residual MLP block on that one token."""

    def __init__(self, c: dict):
        super().__init__()
        C = c["hidden_size"]
        self.probe = nn.Parameter(torch.zeros(1, 1, C))
        self.attention = MultiheadAttention(C, c["num_attention_heads"])
        self.layernorm = nn.LayerNorm(C, eps=c["layer_norm_eps"])
        self.mlp = CLIPMLP(C, c["intermediate_size"], c["hidden_act"])

    def forward(self, x):
        y = self.attention(self.probe.expand(len(x), -1, -1), x)
        return (y + self.mlp(self.layernorm(y)))[:, 0]


class VisionTransformer(nn.Module):
    """forward(pixels [B, 3, image_size, image_size]) -> [B, hidden_size]: patches (strided conv) + learned
    positions, the encoder, post_layernorm, then the attention-pooling head."""

    def __init__(self, c: dict):
        super().__init__()
        C, p = c["hidden_size"], c["patch_size"]
        self.image_size = c["image_size"]
        self.embeddings = nn.ModuleDict(dict(
            patch_embedding=nn.Conv2d(c.get("num_channels", 3), C, p, stride=p),
            position_embedding=nn.Embedding((c["image_size"] // p) ** 2, C),
        ))
        self.encoder = _encoder(c)
        self.post_layernorm = nn.LayerNorm(C, eps=c["layer_norm_eps"])
        if not c.get("vision_use_head", True):
            raise ValueError("config.json: vision_use_head is false; SigLIP's image embedding is the pooling head's")
        self.head = AttentionPoolingHead(c)

    def forward(self, pixels):
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"SigLIP expects {self.image_size}x{self.image_size} images, got "
                             f"{tuple(pixels.shape[-2:])}: preprocess them with the model's preprocessor_config.json")
        x = self.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)
        x = x + self.embeddings.position_embedding.weight
        for layer in self.encoder.layers:
            x = layer(x)
        return self.head(self.post_layernorm(x))


# Defaults of transformers' SiglipTextConfig / SiglipVisionConfig: a hub config.json may leave these out.
TEXT_DEFAULTS = dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vocab_size=32000, max_position_embeddings=64,
                     hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
VISION_DEFAULTS = dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, hidden_size=768, intermediate_size=3072,
                       num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=16)


class Siglip(nn.Module):
    """Both towers (`text_model`, `vision_model`) and the learned logit scale and bias of the sigmoid loss."""

    def __init__(self, config: dict):
        super().__init__()
        if config.get("model_type") != "siglip":
            raise ValueError(f"config.json: model_type {config.get('model_type')!r}, not 'siglip': pass a SigLIP "
                             "checkpoint such as google/siglip-so400m-patch14-384")
        text, vision = ({**d, **config.get(k, {})} for d, k in ((TEXT_DEFAULTS, "text_config"),
                                                                 (VISION_DEFAULTS, "vision_config")))
        for c in (text, vision):
            if c["hidden_act"] not in ACTIVATIONS:
                raise ValueError(f"config.json: hidden_act {c['hidden_act']!r} is not one of {list(ACTIVATIONS)}")
        self.text_model, self.vision_model = TextTransformer(text), VisionTransformer(vision)
        self.logit_scale, self.logit_bias = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))


def load_siglip(folder, device="cpu", dtype=torch.float32) -> tuple[Siglip, SiglipTokenizer]:
    """(model, tokenizer) from a local folder in the hub layout: config.json, model.safetensors, spiece.model,
    tokenizer_config.json."""
    from safetensors.torch import load_file

    config_path, weights = os.path.join(folder, "config.json"), os.path.join(folder, "model.safetensors")
    for path in (config_path, weights):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: a SigLIP folder needs config.json and model.safetensors")
    with open(config_path) as f:
        model = Siglip(json.load(f))
    # position_ids: a constant arange buffer some older files carry; not a weight, our model has none.
    state = {k: v for k, v in load_file(weights).items() if not k.endswith("position_ids")}
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False), SiglipTokenizer.from_folder(folder)
