"""CLIPTextModel parity with transformers 5.24 (tiny random models, fp32), pooling at EOS, new tokens, encode_prompt."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTextConfig
from transformers import CLIPTextModel as HFCLIPTextModel
from transformers import CLIPTextModelWithProjection as HFCLIPTextModelWithProjection

from clip_vocab import write_clip_tokenizer_folder
from text_encoder import CLIPTextModel, CLIPTokenizer, encode_prompt, init_token, resize_token_embeddings

TOL = 1e-5
PROMPTS = ["a photo of a dog", "", "an oil painting of a cat in a bucket, dramatic lighting!!", "sks dog " * 50]
# Tiny stand-ins for SDXL's CLIP-L (quick_gelu, no projection) and bigG (gelu, projection); the real 49,408-token
# vocabulary so real tokenizer ids (EOS 49407) fit. Both keep SDXL's legacy eos_token_id 2 (argmax pooling).
TINY = dict(vocab_size=49408, max_position_embeddings=77, num_attention_heads=4, layer_norm_eps=1e-5,
            eos_token_id=2, bos_token_id=0, pad_token_id=1)
CONFIG_1 = dict(TINY, hidden_size=32, intermediate_size=64, num_hidden_layers=3, hidden_act="quick_gelu", projection_dim=32)
CONFIG_2 = dict(TINY, hidden_size=48, intermediate_size=96, num_hidden_layers=4, hidden_act="gelu", projection_dim=40)


def hub_layout(state_dict):
    # transformers 5 saves CLIPTextModel without the `text_model.` prefix; hub files (transformers 4) have it.
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in state_dict.items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{1: (hf, ours, tokenizer), 2: ...}: transformers models saved with save_pretrained, ours loaded from the files."""
    root = tmp_path_factory.mktemp("clip_text")
    out = {}
    for i, (hf_cls, config, pad) in {1: (HFCLIPTextModel, CONFIG_1, "<|endoftext|>"),
                                     2: (HFCLIPTextModelWithProjection, CONFIG_2, "!")}.items():
        torch.manual_seed(i)
        hf = hf_cls(CLIPTextConfig(**config, attn_implementation="eager")).eval()
        hf.save_pretrained(root / f"text_encoder_{i}")
        on_disk = load_file(root / f"text_encoder_{i}" / "model.safetensors")
        # the facts the mapping above relies on (KEYS.md (b), NOTES.md fact 7)
        has_prefix = all(k.startswith(("text_model.", "text_projection.")) for k in on_disk)
        assert has_prefix == (i == 2) and ("text_projection.weight" in on_disk) == (i == 2)
        on_disk.pop("text_model.embeddings.position_ids", None)
        ours = CLIPTextModel(json.loads((root / f"text_encoder_{i}" / "config.json").read_text())).eval()
        ours.load_state_dict(hub_layout(on_disk), strict=True)
        tok = CLIPTokenizer.from_folder(write_clip_tokenizer_folder(root / f"tokenizer_{i}", pad))
        out[i] = hf, ours, tok
    return out


@pytest.mark.parametrize("i", [1, 2])
@torch.no_grad()
def test_parity_with_transformers(models, i):
    hf, ours, tok = models[i]
    ids = tok(PROMPTS)
    assert (ours.text_projection is not None) == (i == 2)
    ref = hf(ids, output_hidden_states=True)
    hidden, pooled = ours(ids)
    assert len(hidden) == len(ref.hidden_states) == hf.config.num_hidden_layers + 1
    diffs = [(a - b).abs().max().item() for a, b in zip(hidden, ref.hidden_states)]
    ref_pooled = ref.text_embeds if i == 2 else ref.pooler_output
    diffs.append((pooled - ref_pooled).abs().max().item())
    print(f"encoder {i}: max abs diff hidden states {max(diffs[:-1]):.2e}, pooled {diffs[-1]:.2e}")
    assert max(diffs) <= TOL
    # sanity: the model isn't trivially constant, and final LN is not applied to hidden states
    assert (hidden[-1][0] - hidden[-1][1]).abs().max() > 1e-2
    assert (ours.text_model.final_layer_norm(hidden[-1]) - ref.last_hidden_state).abs().max() <= TOL


@torch.no_grad()
def test_eos_pooling_vs_transformers_argmax_with_new_token(models):
    hf, ours, tok = copy.deepcopy(models[2])  # grown below; other tests keep the originals
    # (a) ordinary prompts: the first EOS is the argmax, so both poolings agree (checked in the parity test too)
    ids = tok(PROMPTS)
    assert torch.equal(ids.argmax(-1), (ids == 49407).int().argmax(-1))
    # (b) a textual-inversion token (id 49408 > 49407) makes transformers' argmax pooling pick the new token
    hf.resize_token_embeddings(49409, mean_resizing=False)
    resize_token_embeddings(ours, 49409)
    with torch.no_grad():
        ours.text_model.embeddings.token_embedding.weight[49408] = hf.get_input_embeddings().weight[49408]
    (new_id,) = tok.add_tokens(["<dog>"])
    ids = tok(["a photo of <dog>", "a <dog> dog"])
    assert new_id == 49408 and ids[0, :6].tolist() == [49406, 320, 1125, 539, 49408, 49407]
    ref = hf(ids, output_hidden_states=True)
    hidden, pooled = ours(ids)
    assert max((a - b).abs().max().item() for a, b in zip(hidden, ref.hidden_states)) <= TOL
    eos_pos = torch.tensor([5, 4])
    at_eos = hf.text_projection(ref.last_hidden_state[torch.arange(2), eos_pos])
    at_new = hf.text_projection(ref.last_hidden_state[torch.arange(2), torch.tensor([4, 2])])
    assert (pooled - at_eos).abs().max() <= TOL
    assert (ref.text_embeds - at_new).abs().max() <= TOL  # transformers pools the new token
    assert (pooled - ref.text_embeds).abs().max() > 1e-2


def test_encode_prompt_concat_order_and_shapes(models):
    (hf_1, ours_1, tok_1), (hf_2, ours_2, tok_2) = models[1], models[2]
    prompts = ["a photo of a dog!", "! !! !!!"]  # "!" is 0 in tokenizer_2 only, so mixing up the tokenizers shows
    embeds, pooled = encode_prompt(prompts, tok_1, tok_2, ours_1, ours_2)
    assert embeds.requires_grad  # no hidden no_grad: textual inversion trains through it
    with torch.no_grad():
        ref_1 = hf_1(tok_1(prompts), output_hidden_states=True)
        ref_2 = hf_2(tok_2(prompts), output_hidden_states=True)
    assert embeds.shape == (2, 77, 32 + 48) and pooled.shape == (2, 40)
    ref = torch.cat([ref_1.hidden_states[-2], ref_2.hidden_states[-2]], dim=-1)  # diffusers' SDXL recipe
    diff = max((embeds.detach() - ref).abs().max().item(), (pooled.detach() - ref_2.text_embeds).abs().max().item())
    print(f"encode_prompt: max abs diff {diff:.2e}")
    assert diff <= TOL


def test_init_token(tmp_path):
    torch.manual_seed(0)
    tok = CLIPTokenizer.from_folder(write_clip_tokenizer_folder(tmp_path / "tokenizer"))
    model = CLIPTextModel(dict(CONFIG_1, architectures=["CLIPTextModel"]))
    old = model.text_model.embeddings.token_embedding.weight.detach().clone()
    with pytest.raises(ValueError, match="single CLIP token"):
        init_token(tok, model, "<thing>", "antidisestablishmentarianism")
    assert len(tok.vocab) == 49408 and model.text_model.embeddings.token_embedding.num_embeddings == 49408
    new_id = init_token(tok, model, "<dog>", "dog")
    table = model.text_model.embeddings.token_embedding.weight
    assert new_id == 49408 and table.shape == (49409, 32) and table.requires_grad
    assert torch.equal(table[:49408], old) and torch.equal(table[49408], old[1929])  # 1929 = "dog</w>"
    with pytest.raises(ValueError, match="already in the vocabulary"):
        init_token(tok, model, "<dog>", "cat")
    _, pooled = model(tok("a photo of <dog>"))
    assert pooled.shape == (1, 32)


def test_config_errors():
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextModel(dict(CONFIG_1, hidden_act="relu"))
    model = CLIPTextModel(dict(CONFIG_1, vocab_size=100, architectures=["CLIPTextModelWithProjection"]), eos_token_id=99)
    assert model.text_projection is not None
    with pytest.raises(ValueError, match="end-of-text"):
        model(torch.zeros(1, 5, dtype=torch.long))
