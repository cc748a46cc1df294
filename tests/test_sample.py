"""sample.py: same seed, same latents and images as diffusers' StableDiffusionXLPipeline (Euler and DDIM, with and
without a negative prompt); consistency guidance in one batched call equals the official two-call form; LoRA and
learned-token loading; the CLI's files and messages. Tiny random SDXL (tests/tiny_sdxl.py), CPU, fp32."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import save_file

import sample
from dco import alphas_cumprod
from lora import UNET_ATTN, lora_scale, save_lora_kohya, save_lora_peft
from sdxl import load_sdxl

H, W = 64, 96  # non-square: 8 x 12 latents



@pytest.fixture(scope="module")
def pipe(tiny_sdxl):
    pipe = tiny_sdxl[1]
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base(tiny_sdxl):
    """Our loaded model, never modified (tests that add LoRAs load their own)."""
    return load_sdxl(str(tiny_sdxl[0]))


@pytest.fixture
def fresh(tiny_sdxl):
    return load_sdxl(str(tiny_sdxl[0]))


def _random_layers(model, targets, rank, alpha, seed):
    """A LoRA {module: (down, up, alpha)} on every Linear of `model` ending with one of `targets`."""
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(rank, m.in_features, generator=g) / m.in_features ** 0.5,
                torch.randn(m.out_features, rank, generator=g) * 0.5, alpha)
            for n, m in model.named_modules() if type(m) is nn.Linear and n.endswith(targets)}


def _save_embeds(folder, token, init_word, seed):
    g = torch.Generator().manual_seed(seed)
    embeds = {"clip_l": torch.randn(1, 32, generator=g), "clip_g": torch.randn(1, 32, generator=g)}
    save_file(embeds, str(folder / "learned_embeds.safetensors"), metadata={"token": token, "init_word": init_word})
    return embeds


@pytest.fixture(scope="module")
def loras(tmp_path_factory, base):
    """Two trainer-like output folders: 'dog' (PEFT file, UNet + CLIP-L LoRA, token <dog>) and 'cat' (kohya file,
    UNet LoRA, token <cat>); returns {name: (folder, {component: layers}, embeds)}."""
    root = tmp_path_factory.mktemp("loras")
    dog = {"unet": _random_layers(base.unet, UNET_ATTN, 4, 2.0, 1),  # alpha != rank
           "text_encoder": _random_layers(base.text_encoder, ("q_proj", "v_proj"), 2, 2.0, 2)}
    cat = {"unet": _random_layers(base.unet, ("to_k", "to_v"), 3, 3.0, 3)}
    save_lora_peft(root / "dog", dog)
    save_lora_kohya(root / "cat", cat, base.unet.config)
    return {"dog": (root / "dog", dog, _save_embeds(root / "dog", "<dog>", "dog", 4)),
            "cat": (root / "cat", cat, _save_embeds(root / "cat", "<cat>", "cat", 5))}


def _merged(model, layers, weight=1.0, strip=""):
    """A copy of `model` with W += weight * alpha/r * up @ down: the LoRA baked into the weights, by hand."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, (down, up, alpha) in layers.items():
            model.get_submodule(name.removeprefix(strip)).weight += weight * alpha / down.shape[0] * up @ down
    return model


def _diffusers(pipe, prompt, seed=0, steps=4, h=H, w=W, **kw):
    return pipe(prompt, num_inference_steps=steps, guidance_scale=kw.pop("cfg", 5.0), height=h, width=w,
                generator=torch.Generator("cpu").manual_seed(seed), output_type=kw.pop("output_type", "latent"),
                **kw).images


# ----------------------------------------------------------------------------------------------------------
# Schedules and samplers against diffusers


@pytest.mark.parametrize("steps", [1, 4, 30, 50])
def test_schedules_match_diffusers(pipe, steps):
    from diffusers import DDIMScheduler

    abar = alphas_cumprod(pipe.scheduler.config)
    sigmas, t = sample.euler_schedule(abar, steps)
    euler = copy.deepcopy(pipe.scheduler)
    euler.set_timesteps(steps)
    assert torch.equal(t.float(), euler.timesteps)
    assert (sigmas - euler.sigmas).abs().max() <= 1e-5 and sigmas[-1] == 0
    assert abs((sigmas[0] ** 2 + 1) ** 0.5 - euler.init_noise_sigma) <= 1e-5
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    ddim.set_timesteps(steps)
    alphas, t2 = sample.ddim_schedule(abar, steps)
    assert torch.equal(t2, ddim.timesteps) and torch.equal(t2, t)
    assert (alphas[:-1] - ddim.alphas_cumprod[t2]).abs().max() <= 1e-6
    assert abs(alphas[-1] - ddim.final_alpha_cumprod) <= 1e-6  # set_alpha_to_one false: abar_0, not 1
    if steps == 30:
        assert t[:3].tolist() == [958, 925, 892] and t[-1] == 1


def test_bad_steps():
    for steps in (0, 1000):
        with pytest.raises(ValueError, match="--steps"):
            sample.leading_timesteps(steps)


@pytest.mark.parametrize("h,w,n", [(64, 64, 2), (H, W, 1)])
def test_same_seed_same_latents_as_diffusers(pipe, base, h, w, n):
    prompts = ["a photo of a dog on the beach", "an oil painting of a cat"]
    want = _diffusers(pipe, prompts, seed=7, h=h, w=w, num_images_per_prompt=n)
    got = sample.generate_latents(base, prompts, height=h, width=w, steps=4, cfg=5.0, seed=7, n=n, progress=False)
    diff = (got - want).abs().max().item()
    print(f"Euler + CFG {h}x{w}, n={n}: latents max abs diff {diff:.3g} (|latents| up to {want.abs().max():.3g})")
    assert got.shape == want.shape == (2 * n, 4, h // 8, w // 8) and diff <= 1e-4
    other = sample.generate_latents(base, prompts, height=h, width=w, steps=4, cfg=5.0, seed=8, n=n, progress=False)
    assert (other - want).abs().max() > 1.0  # the seed matters


def test_negative_prompt_matches_diffusers(pipe, base):
    prompt = "a photo of a dog on the beach"
    want = _diffusers(pipe, prompt, seed=1, negative_prompt="blurry, low quality")
    got = sample.generate_latents(base, prompt, negative_prompt="blurry, low quality", height=H, width=W, steps=4,
                                  seed=1, progress=False)
    zeros = sample.generate_latents(base, prompt, height=H, width=W, steps=4, seed=1, progress=False)
    empty = sample.generate_latents(base, prompt, negative_prompt="", height=H, width=W, steps=4, seed=1, progress=False)
    diff = (got - want).abs().max().item()
    print(f"Euler + CFG with a negative prompt: latents max abs diff {diff:.3g}")
    assert diff <= 1e-4
    assert (empty - zeros).abs().max() > 1e-2  # negative_prompt="" is encoded; None means zero embeddings


def test_decoded_images_match_diffusers(pipe, base):
    prompt = "a photo of a dog on the beach"
    want = _diffusers(pipe, prompt, seed=2, output_type="np")  # [1, H, W, 3] in [0, 1]
    latents = sample.generate_latents(base, prompt, height=H, width=W, steps=4, seed=2, progress=False)
    got = sample.decode(base, latents).permute(0, 2, 3, 1).numpy()
    diff = np.abs(got - want).max()
    print(f"decoded image max abs diff {diff:.3g} (of [0, 1])")
    assert got.shape == want.shape and diff <= 1e-4
    (image,) = sample.generate(base, prompt, height=H, width=W, steps=4, seed=2, progress=False)
    assert image.size == (W, H)
    assert np.abs(np.asarray(image, dtype=np.int16) - (want[0] * 255).round()).max() <= 1


def test_ddim_matches_diffusers(pipe, base):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    ddim = StableDiffusionXLPipeline(**{**pipe.components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)})
    ddim.set_progress_bar_config(disable=True)
    want = _diffusers(ddim, "a photo of a dog on the beach", seed=3)
    got = sample.generate_latents(base, "a photo of a dog on the beach", height=H, width=W, steps=4, seed=3,
                                  sampler="ddim", progress=False)
    euler = sample.generate_latents(base, "a photo of a dog on the beach", height=H, width=W, steps=4, seed=3,
                                    progress=False)
    diff = (got - want).abs().max().item()
    print(f"DDIM + CFG: latents max abs diff {diff:.3g}")
    assert diff <= 1e-4 and (got - euler).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------
# Consistency guidance


def test_consistency_guidance_one_call_equals_official_two_calls(fresh, loras):
    tokens = sample.load_lora(fresh, str(loras["dog"][0]))
    prompts = ["a <dog> on the beach", "a <DOG> in the snow"]
    base = [sample.replace_tokens(p, tokens) for p in prompts]
    assert base == ["a dog on the beach", "a dog in the snow"]
    n, cfg, wcon, m = 2, 5.0, 3.0, 0.8
    cond = sample.conditioning(fresh, prompts, base_prompts=base, height=H, width=W, n=n, cfg=cfg, wcon=wcon,
                               lora_multiplier=m)
    eps_fn = sample.guided_eps(fresh.unet, cond, cfg, wcon)

    # The official pipeline's form: one call for [empty, c_base] with the LoRA off, one for [c] with it on.
    tes = (fresh.text_encoder, fresh.text_encoder_2)
    with lora_scale(tes[0], 0.0), lora_scale(tes[1], 0.0):
        base_ctx, base_pool = (e.repeat_interleave(n, 0) for e in fresh.encode_prompt(base))
    with lora_scale(tes[0], m), lora_scale(tes[1], m):
        c_ctx, c_pool = (e.repeat_interleave(n, 0) for e in fresh.encode_prompt(prompts))
    ids = torch.tensor([[H, W, 0, 0, H, W]] * 2 * n, dtype=torch.float32)

    def two_calls(x, t):
        with lora_scale(fresh.unet, 0.0):
            e_empty, e_base = fresh.unet(torch.cat([x, x]), t, torch.cat([torch.zeros_like(base_ctx), base_ctx]),
                                         torch.cat([torch.zeros_like(base_pool), base_pool]), ids.repeat(2, 1)).chunk(2)
        with lora_scale(fresh.unet, m):
            e_c = fresh.unet(x, t, c_ctx, c_pool, ids)
        return e_empty + cfg * (e_base - e_empty) + wcon * (e_c - e_base), (e_c - e_base).abs().max()

    diffs, terms = [], []

    def both(x, t):
        got = eps_fn(x, t)
        want, term = two_calls(x, t)
        diffs.append((got - want).abs().max().item())
        terms.append(term.item())
        return got

    sigmas, t = sample.euler_schedule(alphas_cumprod(fresh.scheduler), 4)
    with torch.no_grad():
        sample.sample_euler(both, torch.randn(2 * n, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(0)),
                            sigmas, t)
    print(f"consistency guidance, one batch-3 call vs two calls, per step max abs diff: "
          f"{', '.join(f'{d:.3g}' for d in diffs)}")
    assert len(diffs) == 4 and max(diffs) <= 1e-5
    assert min(terms) > 1e-2  # the LoRA term is far from zero, so a wrong row or scale would show


def test_consistency_guidance_equals_three_separate_unbatched_calls(fresh, loras):
    """The paper's formula from first principles: for every image of a batch of 4 (2 prompts x 2, 64x96), three
    separate batch-1 calls -- phi(empty), phi(c_base), theta(c) -- each prompt encoded alone with the text-encoder
    LoRA off (phi) or on (theta), combined by hand; against our one batched call.

    In float64: in float32 a batch-12 and a batch-1 UNet call already differ by ~2.6e-6 (CPU kernels block by batch
    size), and the guidance formula, -4 e_empty + 2 e_base + 3 e_c here, multiplies that by up to 9."""
    tokens = sample.load_lora(fresh, str(loras["dog"][0]))
    for model in (fresh.unet, fresh.text_encoder, fresh.text_encoder_2):
        model.double()
    prompts = ["a <dog> on the beach", "a <dog> in the snow"]
    base = [sample.replace_tokens(p, tokens) for p in prompts]
    n, cfg, wcon, m = 2, 5.0, 3.0, 0.8
    cond = sample.conditioning(fresh, prompts, base_prompts=base, height=H, width=W, n=n, cfg=cfg, wcon=wcon,
                               lora_multiplier=m)
    eps_fn = sample.guided_eps(fresh.unet, cond, cfg, wcon)
    ids = torch.tensor([[H, W, 0, 0, H, W]], dtype=torch.float32)

    def encode(prompt, scale):
        with lora_scale(fresh.text_encoder, scale), lora_scale(fresh.text_encoder_2, scale):
            return fresh.encode_prompt([prompt])

    def unet(x, t, cond, scale):
        with lora_scale(fresh.unet, scale):
            return fresh.unet(x, t, *cond, ids)

    x = torch.randn(len(prompts) * n, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    diffs, terms = [], []
    with torch.no_grad():
        for t in sample.leading_timesteps(4)[[0, -1]]:  # a noisy and an almost clean step
            got = eps_fn(x, t)
            for k in range(len(x)):  # image k shows prompt k // n (diffusers' order)
                c, c_base = encode(prompts[k // n], m), encode(base[k // n], 0.0)
                empty = tuple(torch.zeros_like(e) for e in c_base)  # SDXL's zero embeddings, no negative prompt
                e_empty, e_base, e_c = unet(x[k:k + 1], t, empty, 0.0), unet(x[k:k + 1], t, c_base, 0.0), \
                    unet(x[k:k + 1], t, c, m)
                want = e_empty + cfg * (e_base - e_empty) + wcon * (e_c - e_base)
                diffs.append((got[k:k + 1] - want).abs().max().item())
                terms.append((e_c - e_base).abs().max().item())
    print(f"consistency guidance, one batched call vs 3 separate batch-1 calls per image: max abs diff "
          f"{max(diffs):.3g} over {len(diffs)} (image, step) pairs; smallest LoRA term {min(terms):.3g}")
    assert max(diffs) <= 1e-5 and min(terms) > 1e-2

def test_wcon_zero_is_plain_sampling_with_the_lora_on(pipe, fresh, loras):
    """Oracle: diffusers' pipeline with the same LoRA merged into its UNet and text encoder weights by hand."""
    from diffusers import StableDiffusionXLPipeline

    folder, layers, _ = loras["dog"]
    sample.load_lora(fresh, str(folder))
    merged = StableDiffusionXLPipeline(**{**pipe.components, "unet": _merged(pipe.unet, layers["unet"]),
                                          "text_encoder": _merged(pipe.text_encoder, layers["text_encoder"],
                                                                  strip="text_model.")})
    merged.set_progress_bar_config(disable=True)
    prompt = "a photo of a dog on the beach"
    want = _diffusers(merged, prompt, seed=4)
    got = sample.generate_latents(fresh, prompt, height=H, width=W, steps=4, seed=4, wcon=0.0, progress=False)
    diff = (got - want).abs().max().item()
    print(f"w_con = 0 with the LoRA vs diffusers with the LoRA merged: latents max abs diff {diff:.3g}")
    assert diff <= 1e-4 and (want - _diffusers(pipe, prompt, seed=4)).abs().max() > 1e-2


def test_zero_lora_scale_and_same_prompt_is_base_model_cfg(pipe, base, fresh, loras):
    sample.load_lora(fresh, str(loras["dog"][0]))
    prompt = "a photo of a dog on the beach"
    got = sample.generate_latents(fresh, prompt, base_prompts=prompt, height=H, width=W, steps=4, seed=5, wcon=3.0,
                                  lora_multiplier=0.0, progress=False)
    want = _diffusers(pipe, prompt, seed=5)
    ours = sample.generate_latents(base, prompt, height=H, width=W, steps=4, seed=5, progress=False)
    print(f"CG with LoRA scale 0 and c = c_base vs base-model CFG: diffusers {(got - want).abs().max():.3g}, "
          f"ours {(got - ours).abs().max():.3g}")
    assert (got - want).abs().max() <= 1e-4 and (got - ours).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def pipe_with_dog(pipe, loras):
    """diffusers' pipeline with OUR 'dog' PEFT file (UNet + CLIP-L layers, alpha != rank) loaded by its own
    load_lora_weights (peft): the oracle for sampling with a LoRA."""
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (not installed)")
    lora_pipe = copy.deepcopy(pipe)
    lora_pipe.load_lora_weights(str(loras["dog"][0]))
    return lora_pipe


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_lora_latents_match_diffusers_loading_our_file(pipe, pipe_with_dog, fresh, loras, sampler):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    ref = pipe_with_dog
    if sampler == "ddim":
        ddim = DDIMScheduler.from_config(ref.scheduler.config)
        ref = StableDiffusionXLPipeline(**{**ref.components, "scheduler": ddim})
        ref.set_progress_bar_config(disable=True)
    prompt = "a photo of a dog on the beach"
    want = _diffusers(ref, prompt, seed=9)
    sample.load_lora(fresh, str(loras["dog"][0]))
    got = sample.generate_latents(fresh, prompt, height=H, width=W, steps=4, seed=9, sampler=sampler, progress=False)
    without = sample.generate_latents(fresh, prompt, height=H, width=W, steps=4, seed=9, sampler=sampler,
                                      lora_multiplier=0.0, progress=False)  # LoRA scale 0: the base model
    diff = (got - want).abs().max().item()
    print(f"{sampler} + CFG with our LoRA file, ours vs diffusers' load_lora_weights: latents max abs diff {diff:.3g}; "
          f"LoRA effect {(want - without).abs().max():.3g}")
    assert diff <= 1e-4 and (want - without).abs().max() > 1e-2


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("with_lora", [False, True])
def test_cli_png_equals_diffusers_png(tiny_sdxl, pipe, tmp_path, loras, with_lora, request):
    """The PNG file `sample.py` writes vs diffusers' image saved as PNG: same model folder, prompt, seed, size, steps,
    CFG; with_lora: our LoRA file in both (--lora, and diffusers' load_lora_weights)."""
    prompt, lora = "a photo of a dog on the beach", ["--lora", str(loras["dog"][0]), "--wcon", "0"]
    _cli(tiny_sdxl, tmp_path / "ours.png", "--prompt", prompt, "--n", "1", "--cfg", "5", "--seed", "6",
         "--height", str(H), "--width", str(W), *(lora if with_lora else []))
    ref = request.getfixturevalue("pipe_with_dog") if with_lora else pipe
    _diffusers(ref, prompt, seed=6, steps=2, output_type="pil")[0].save(tmp_path / "diffusers.png")
    ours, theirs = _pixels(tmp_path / "ours.png"), _pixels(tmp_path / "diffusers.png")
    diff = np.abs(ours - theirs).max()
    print(f"{'with' if with_lora else 'without'} LoRA: sample.py PNG vs diffusers PNG, max pixel diff {diff}/255")
    assert ours.shape == theirs.shape == (H, W, 3) and diff <= 2 and ours.std() > 5  # a real picture, not flat
    if with_lora:  # and the LoRA shows in the pixels
        _diffusers(pipe, prompt, seed=6, steps=2, output_type="pil")[0].save(tmp_path / "base.png")
        assert np.abs(ours - _pixels(tmp_path / "base.png")).max() > 2

# ----------------------------------------------------------------------------------------------------------
# LoRA and learned-token loading


def test_two_loras_add_up(tiny_sdxl, fresh, loras):
    dog, cat = loras["dog"], loras["cat"]
    tokens = {}
    for arg in (str(dog[0]), f"{cat[0] / 'lora_kohya.safetensors'}:0.5"):  # --lora a --lora b:0.5
        tokens.update(sample.load_lora(fresh, *sample.parse_lora_arg(arg)))
    assert tokens == {"<dog>": "dog", "<cat>": "cat"}

    ref = load_sdxl(str(tiny_sdxl[0]))
    unet = _merged(_merged(ref.unet, dog[1]["unet"]), cat[1]["unet"], 0.5)
    g = torch.Generator().manual_seed(0)
    x, ctx, pooled = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 77, 64, generator=g), torch.randn(2, 32, generator=g)
    ids = torch.tensor([[H, W, 0, 0, H, W]] * 2, dtype=torch.float32)
    with torch.no_grad():
        got, want = fresh.unet(x, 500, ctx, pooled, ids), unet(x, 500, ctx, pooled, ids)
        diff = (got - want).abs().max().item()
        assert diff <= 1e-5 and (want - ref.unet(x, 500, ctx, pooled, ids)).abs().max() > 1e-2
        te = _merged(ref.text_encoder, dog[1]["text_encoder"])
        ids_l = ref.tokenizer("a photo of a dog")
        assert (fresh.text_encoder(ids_l)[0][-2] - te(ids_l)[0][-2]).abs().max() <= 1e-5
    print(f"--lora a --lora b:0.5 vs both merged by hand: UNet max abs diff {diff:.3g}")

    # the learned tokens: new ids in both tokenizers, their rows written into both embedding tables
    for key, tok, enc in (("clip_l", fresh.tokenizer, fresh.text_encoder), ("clip_g", fresh.tokenizer_2, fresh.text_encoder_2)):
        ids_dog, ids_cat = tok.encode("<dog>"), tok.encode("a <cat>")
        assert ids_dog == [49408] and ids_cat[-1] == 49409
        table = enc.text_model.embeddings.token_embedding.weight
        assert table.shape[0] == 49410
        assert torch.equal(table[49408], dog[2][key][0]) and torch.equal(table[49409], cat[2][key][0])


def test_lora_errors(tmp_path, fresh, loras):
    with pytest.raises(FileNotFoundError, match="--lora .*nowhere: no such file or folder"):
        sample.load_lora(fresh, str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no pytorch_lora_weights"):
        sample.load_lora(fresh, str(tmp_path / "empty"))

    # a LoRA for another base: one layer's input width does not fit
    layers = dict(loras["dog"][1]["unet"])
    bad = sorted(layers)[0]
    down, up, alpha = layers[bad]
    layers[bad] = (torch.zeros(down.shape[0], down.shape[1] + 8), up, alpha)
    save_lora_peft(tmp_path / "other", {"unet": layers})
    with pytest.raises(ValueError) as e:
        sample.load_lora(fresh, str(tmp_path / "other"))
    msg = str(e.value)
    print(msg)
    assert "\n" not in msg and f"'{bad}'" in msg and "another base" in msg

    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)},
              str(tmp_path / "other" / "learned_embeds.safetensors"), metadata={"token": "<x>", "init_word": "x"})
    layers[bad] = loras["dog"][1]["unet"][bad]
    save_lora_peft(tmp_path / "other", {"unet": layers})
    with pytest.raises(ValueError, match="'clip_l' rows are 768 wide .* another base"):
        sample.load_lora(fresh, str(tmp_path / "other"))

    assert sample.parse_lora_arg("out/dog:0.5") == ("out/dog", 0.5)
    assert sample.parse_lora_arg("C:/loras/dog") == ("C:/loras/dog", 1.0)
    with pytest.raises(ValueError, match="--base-prompt"):
        sample.replace_tokens("a <x> dog", {"<x>": None})


# ----------------------------------------------------------------------------------------------------------
# The command line


def _cli(tiny_sdxl, out, *args):
    sample.main(["--model", str(tiny_sdxl[0]), "--device", "cpu", "--steps", "2", "--height", "64", "--width", "64",
                 "--output", str(out), *args])


def test_cli_one_image_with_metadata(tiny_sdxl, tmp_path, fresh, loras):
    folder = str(loras["dog"][0])
    _cli(tiny_sdxl, tmp_path / "x.png", "--lora", folder, "--prompt", "a <dog> on the beach", "--wcon", "2", "--n", "1")
    image = Image.open(tmp_path / "x.png")
    meta = image.text
    assert meta["prompt"] == "a <dog> on the beach" and meta["base_prompt"] == "a dog on the beach"
    assert (meta["seed"], meta["wcon"], meta["cfg"], meta["steps"], meta["sampler"]) == ("0", "2", "7.5", "2", "euler")
    assert meta["model"] == str(tiny_sdxl[0]) and meta["lora"] == f"{folder}:1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
    sample.load_lora(fresh, folder)  # the same image through the Python API
    (want,) = sample.generate(fresh, ["a <dog> on the beach"], base_prompts="a dog on the beach", height=64, width=64,
                              steps=2, cfg=7.5, wcon=2.0, progress=False)
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(want))


def test_cli_grid_and_images_beside_it(tiny_sdxl, tmp_path):
    _cli(tiny_sdxl, tmp_path / "g.png", "--prompt", "a photo of a dog", "--n", "2", "--seed", "3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "g_0.png", "g_1.png"]
    grid, first = Image.open(tmp_path / "g.png"), Image.open(tmp_path / "g_1.png")
    assert grid.size == (128, 64) and grid.text["n"] == "2" and grid.text["wcon"] == "0" and "lora" not in grid.text
    assert first.text["index"] == "1" and first.text["seed"] == "3"
    assert np.array_equal(np.asarray(grid.convert("RGB"))[:, 64:], np.asarray(first.convert("RGB")))


def test_cli_wcon_sweep_grid_and_token_warning(tiny_sdxl, tmp_path, loras, capsys):
    _cli(tiny_sdxl, tmp_path / "s.png", "--lora", str(loras["dog"][0]), "--prompt", "a photo of a dog",
         "--wcon", "0,2", "--n", "1")
    err = capsys.readouterr().err
    assert "warning" in err and "<dog>" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.png", "s_wcon0_0.png", "s_wcon2_0.png"]
    grid = Image.open(tmp_path / "s.png")
    assert grid.text["wcon"] == "0,2" and grid.size[1] == 128 and grid.size[0] > 64  # two rows + a label strip
    rows = [np.asarray(Image.open(tmp_path / f"s_wcon{w}_0.png").convert("RGB")) for w in (0, 2)]
    pixels = np.asarray(grid.convert("RGB"))[:, -64:]
    assert np.array_equal(pixels[:64], rows[0]) and np.array_equal(pixels[64:], rows[1])
    assert not np.array_equal(rows[0], rows[1])


def test_cli_errors_are_one_line(tiny_sdxl, tmp_path, loras):
    for args, want in ((["--lora", str(tmp_path / "missing")], "no such file or folder"),
                       (["--wcon", "2"], "needs a --lora")):
        with pytest.raises(SystemExit) as e:
            _cli(tiny_sdxl, tmp_path / "e.png", "--prompt", "a dog", *args)
        msg = str(e.value.code)
        assert msg.startswith("error: ") and want in msg and "\n" not in msg


def test_cli_sweep_grid_has_one_tile_per_image(tiny_sdxl, tmp_path, loras):
    """--wcon 0,1,3 --n 2: a 3 x 2 grid (plus the label strip) and the 6 images beside it, each tile its image."""
    _cli(tiny_sdxl, tmp_path / "sweep.png", "--lora", str(loras["dog"][0]), "--prompt", "a <dog> on the beach",
         "--wcon", "0,1,3", "--n", "2")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["sweep.png"] + [f"sweep_wcon{w}_{i}.png" for w in (0, 1, 3) for i in (0, 1)]
    grid = Image.open(tmp_path / "sweep.png")
    pad = grid.size[0] - 2 * 64
    assert grid.size[1] == 3 * 64 and pad > 0 and grid.text["wcon"] == "0,1,3" and grid.text["n"] == "2"
    pixels = np.asarray(grid.convert("RGB"))
    tiles = {}
    for r, w in enumerate((0, 1, 3)):
        for i in (0, 1):
            image = Image.open(tmp_path / f"sweep_wcon{w}_{i}.png")
            assert image.size == (64, 64) and image.text["wcon"] == str(w) and image.text["index"] == str(i)
            tiles[w, i] = np.asarray(image.convert("RGB"))
            assert np.array_equal(pixels[r * 64:(r + 1) * 64, pad + i * 64:pad + (i + 1) * 64], tiles[w, i])
    assert not np.array_equal(tiles[0, 0], tiles[3, 0]) and not np.array_equal(tiles[1, 0], tiles[1, 1])


@pytest.mark.parametrize("case", ["missing-lora", "wcon-without-lora", "missing-model", "lora-for-another-base",
                                  "steps-0", "size-not-multiple", "n-0"])
def test_cli_bad_input_is_one_line_and_writes_nothing(tiny_sdxl, tmp_path, loras, case):
    out = tmp_path / "new" / "e.png"  # a folder that does not exist yet: not even it may appear
    args = {"missing-lora": ["--lora", str(tmp_path / "missing")], "wcon-without-lora": ["--wcon", "2"],
            "missing-model": ["--model", str(tmp_path / "no_model")], "steps-0": ["--steps", "0"],
            "size-not-multiple": ["--height", "48"], "n-0": ["--n", "0"]}.get(case, [])
    want = {"missing-lora": "--lora", "wcon-without-lora": "--wcon", "missing-model": "--model", "steps-0": "--steps",
            "size-not-multiple": "--height", "n-0": "--n"}.get(case)
    if case == "lora-for-another-base":
        layers = dict(loras["dog"][1]["unet"])
        name = sorted(layers)[0]
        down, up, alpha = layers[name]
        layers[name] = (torch.zeros(down.shape[0], down.shape[1] + 8), up, alpha)
        save_lora_peft(tmp_path / "other", {"unet": layers})
        args, want = ["--lora", str(tmp_path / "other")], str(tmp_path / "other")
    with pytest.raises(SystemExit) as e:
        _cli(tiny_sdxl, out, "--prompt", "a dog", *args)
    msg = e.value.code
    print(case, "->", msg)
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg  # a str exit code: status 1
    assert want in msg
    assert not (tmp_path / "new").exists()


def test_grid_labels_and_tiny_images_enlarged():
    assert [sample.wcon_label(w) for w in (0.0, 1.0, 2.5)] == ["plain", "w_con = 1", "w_con = 2.5"]
    tile = Image.new("RGB", (32, 32), (255, 0, 0))
    tile.putpixel((0, 0), (0, 0, 255))
    grid = sample.make_grid([[tile, tile]])  # 32 px (the tiny model's): x8, nearest neighbour
    assert grid.size == (512, 256) and grid.getpixel((7, 7)) == (0, 0, 255) and grid.getpixel((8, 8)) == (255, 0, 0)
    assert sample.make_grid([[Image.new("RGB", (64, 64))]]).size == (64, 64)  # real sizes are left alone
