"""baselines/ziplora.py and merge.py --method ziplora: at its initial coefficients (all ones) ZipLoRA is the plain sum, bit for
bit in the written files; the optimisation lowers its loss on held-out batches; the result is an ordinary LoRA in
both formats whose update is a column scaling of each LoRA's, which diffusers loads and which keeps both concepts'
tokens; bad input is one line. Tiny random SDXL (tests/tiny_sdxl.py), CPU, fp32."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file, save_file

import merge
import sample
from baselines import ziplora
from lora import KOHYA_FILE, PEFT_FILE, UNET_ATTN, apply_lora, load_lora_file, save_lora_peft
from sdxl import load_sdxl

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def base(tiny_sdxl):
    return load_sdxl(str(tiny_sdxl[0]))


def _layers(unet, targets, rank, alpha, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(rank, m.in_features, generator=g) / m.in_features ** 0.5,
                torch.randn(m.out_features, rank, generator=g) * scale, alpha)
            for n, m in unet.named_modules() if type(m) is nn.Linear and n.endswith(targets)}


def _trainer_folder(root, name, token, layers, seed):
    """What train.py leaves: the LoRA, the token rows, and train_config.json naming the images and captions."""
    folder = root / name
    folder.mkdir()
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(3):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    captions = [f"a photo of {token}, picture {i}" for i in range(3)]
    (folder / "train_config.json").write_text(json.dumps({"images": paths, "captions": captions, "resolution": 64}))
    save_lora_peft(folder, {"unet": layers}, {"base_model": "tiny"})
    g = torch.Generator().manual_seed(seed)
    save_file({"clip_l": torch.randn(1, 32, generator=g), "clip_g": torch.randn(1, 32, generator=g)},
              str(folder / "learned_embeds.safetensors"), metadata={"token": token, "init_word": "dog"})
    return folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory, base):
    """A subject (all attention projections, rank 4, alpha 2) and a style (to_k, to_v, to_out.0, rank 3, alpha 5):
    three of four projections shared, so the mergers have something to zip; a layer (to_q) only the subject has."""
    root = tmp_path_factory.mktemp("ziploras")
    a = _layers(base.unet, UNET_ATTN, 4, 2.0, 1)
    b = _layers(base.unet, ("to_k", "to_v", "to_out.0"), 3, 5.0, 2)
    return (_trainer_folder(root, "dog", "<dog>", a, 3), a), (_trainer_folder(root, "style", "<sty>", b, 4), b)


def _unet_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700, 30]), torch.randn(2, 7, 64, generator=g),
            torch.randn(2, 32, generator=g), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))


def test_initial_coefficients_are_the_plain_sum(base, pair):
    """Mergers at 1: the zipped UNet is the UNet with both LoRAs applied (lora.apply_lora, the exact sum); modes "a"
    and "b" are each LoRA alone (ZipLoRA's targets). The UNets run in float64, so what is left is the float32 rounding
    of the scaled up-projections, done in different places by the two (~4e-7; in float32 throughout ~2.5e-6)."""
    (_, a), (_, b) = pair
    zipped_unet = copy.deepcopy(base.unet).double()
    zipped = ziplora.zip_unet(zipped_unet, a, b, weights=(0.7, 1.3))
    zipped_unet.double()
    assert len(ziplora.mergers(zipped)) == len([n for n in a if n in b]) > 0
    x = [v.double() if v.is_floating_point() else v for v in _unet_inputs()]
    with torch.no_grad():
        got = zipped_unet(*x)
        with ziplora.mode(zipped, "a"):
            got_a = zipped_unet(*x)
        with ziplora.mode(zipped, "b"):
            got_b = zipped_unet(*x)
    for layers, w, out in (([a, b], [0.7, 1.3], got), ([a], [0.7], got_a), ([b], [1.3], got_b)):
        ref = copy.deepcopy(base.unet).double()
        for lay, ww in zip(layers, w):
            apply_lora(ref, lay, ww)
        ref.double()
        with torch.no_grad():
            want = ref(*x)
        diff = (out - want).abs().max().item()
        print(f"zipped UNet at m = 1 vs apply_lora of {len(layers)} LoRA(s), float64: {diff:.3g}")
        assert diff <= 1e-6
    assert (got - got_a).abs().max() > 1e-2 and (got - got_b).abs().max() > 1e-2  # the modes really differ


def test_zero_steps_writes_the_sum_bit_for_bit(tiny_sdxl, tmp_path, pair):
    """merge.py --method ziplora with 0 steps (coefficients left at 1) writes the same tensors as --method sum."""
    (fa, _), (fb, _) = pair
    common = [str(fa), str(fb), "--model", str(tiny_sdxl[0]), "--weights", "0.7", "1.3"]
    merge.main(common + ["--output", str(tmp_path / "sum")])
    merge.main(common + ["--output", str(tmp_path / "zip0"), "--method", "ziplora", "--ziplora-steps", "0"])
    for f in (PEFT_FILE, KOHYA_FILE, "learned_embeds.safetensors"):
        s, z = load_file(str(tmp_path / "sum" / f)), load_file(str(tmp_path / "zip0" / f))
        assert s.keys() == z.keys() and all(torch.equal(s[k], z[k]) for k in s), f


def test_optimisation_lowers_the_loss(tiny_sdxl, pair):
    """ZipLoRA's merger loss on fixed held-out batches (other image draws, noise and t than the fit's) is
    lower after 40 steps than at the start, in both reconstruction terms' sum and in the cosine term."""
    (fa, a), (fb, b) = pair
    sd = load_sdxl(str(tiny_sdxl[0]))
    for f in (fa, fb):
        sample.add_learned_tokens(sd, str(f / "learned_embeds.safetensors"))
    zipped = ziplora.zip_unet(sd.unet, a, b)
    data = [ziplora.concept_data(sd, f, "cpu") for f in (fa, fb)]
    acp = ziplora.alphas_cumprod(sd.scheduler)
    g = torch.Generator().manual_seed(123)
    held = [[ziplora.draw(d, acp, g, sd.vae.scaling_factor, torch.float32) for d in data] for _ in range(8)]

    def loss():
        with torch.no_grad():
            parts = [ziplora.ziplora_loss(sd.unet, zipped, xa, xb)[1] for xa, xb in held]
        return np.mean([p["a"] + p["b"] for p in parts]), parts[0]["cos"]

    fit0, cos0 = loss()
    # optimise() wraps the UNet itself: hand it a fresh copy, then copy the fitted mergers into ours
    sd2 = load_sdxl(str(tiny_sdxl[0]))
    for f in (fa, fb):
        sample.add_learned_tokens(sd2, str(f / "learned_embeds.safetensors"))
    coefficients, history = ziplora.optimise(sd2, a, b, [fa, fb], steps=40, lr=3e-2, progress=False)
    with torch.no_grad():
        for n, m in zipped.items():
            if coefficients[n] is not None:
                m.m_a.copy_(coefficients[n][0])
                m.m_b.copy_(coefficients[n][1])
    fit1, cos1 = loss()
    print(f"held-out reconstruction loss {fit0:.4g} -> {fit1:.4g}, mean |cos(m_a, m_b)| {cos0:.3f} -> {cos1:.3f}; "
          f"training loss {history[0][1]:.4g} -> {history[-1][1]:.4g}")
    assert cos0 == pytest.approx(1.0) and cos1 < 0.99
    assert fit1 < 0.9 * fit0


@pytest.fixture(scope="module")
def zipped_out(tiny_sdxl, tmp_path_factory, pair):
    (fa, _), (fb, _) = pair
    out = tmp_path_factory.mktemp("zipmerged") / "dog_in_style"
    merge.main([str(fa), str(fb), "--model", str(tiny_sdxl[0]), "--method", "ziplora", "--ziplora-steps", "20",
                "--ziplora-lr", "3e-2", "--output", str(out)])
    return out


def test_output_is_a_column_scaled_lora_in_both_formats(base, pair, zipped_out):
    """Both files hold the same update; each shared layer's is dW_a diag(m_a) + dW_b diag(m_b) with m_a, m_b read
    off the stacked down-projection (every row of A_a diag(m_a) / A_a gives the same m_a): an ordinary rank-(r_a+r_b)
    LoRA. The mergers moved away from 1, and the metadata says how the merge was made."""
    (_, a), (_, b) = pair
    modules = {"unet": base.unet, "text_encoder": base.text_encoder, "text_encoder_2": base.text_encoder_2}
    peft, meta = load_lora_file(str(zipped_out / PEFT_FILE))
    kohya, _ = load_lora_file(str(zipped_out / KOHYA_FILE), modules, base.unet.config)
    moved = 0.0
    for name, (down, up, alpha) in peft["unet"].items():
        kd, ku, ka = kohya["unet"][name]
        delta = alpha / down.shape[0] * up.double() @ down.double()
        assert torch.allclose(delta, ka / kd.shape[0] * ku.double() @ kd.double(), atol=1e-6)
        if name not in b:  # only the subject has it: unchanged
            da, ua, aa = a[name]
            assert torch.allclose(delta, aa / da.shape[0] * ua.double() @ da.double(), atol=1e-6)
            continue
        (da, ua, aa), (db, ub, ab) = a[name], b[name]
        ra = da.shape[0]
        m_a, m_b = down[:ra] / da, down[ra:] / db
        assert torch.allclose(m_a, m_a[:1].expand_as(m_a), atol=1e-4) and torch.allclose(m_b, m_b[:1].expand_as(m_b),
                                                                                          atol=1e-4)
        want = (aa / ra * ua.double() @ (da.double() * m_a[0].double())
                + ab / db.shape[0] * ub.double() @ (db.double() * m_b[0].double()))
        assert torch.allclose(delta, want, atol=1e-5)
        moved = max(moved, (m_a[0] - 1).abs().max().item(), (m_b[0] - 1).abs().max().item())
    info = json.loads(meta["ziplora"])
    print(f"largest merger change from 1: {moved:.3f}; {info}")
    assert moved > 0.05 and meta["merge_method"] == "ziplora" and info["steps"] == 20
    assert json.loads((zipped_out / "merge_config.json").read_text())["merge_method"] == "ziplora"


def test_diffusers_and_sample_load_it_with_both_tokens(tiny_sdxl, base, zipped_out):
    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (not installed)")
    pipe = copy.deepcopy(tiny_sdxl[1])
    pipe.load_lora_weights(str(zipped_out))
    fresh = load_sdxl(str(tiny_sdxl[0]))
    tokens = sample.load_lora(fresh, str(zipped_out))  # what `sample.py --lora` does
    assert tokens == {"<dog>": "dog", "<sty>": "dog"}
    x, t, ctx, pooled, ids = _unet_inputs(1)
    with torch.no_grad():
        want = pipe.unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        got, plain = fresh.unet(x, t, ctx, pooled, ids), base.unet(x, t, ctx, pooled, ids)
    diff = (got - want).abs().max().item()
    print(f"ZipLoRA merge in diffusers (load_lora_weights) vs sample.load_lora: max abs diff {diff:.3g}")
    assert diff <= 1e-5 and (want - plain).abs().max() > 1e-2


def test_cli_errors_are_one_line(tiny_sdxl, tmp_path, pair):
    (fa, _), (fb, _) = pair
    cases = [([str(fa), str(fb), "--method", "ziplora", "--output", str(tmp_path / "o1")], "needs --model"),
             ([str(fa), str(fb), str(fa), "--method", "ziplora", "--model", str(tiny_sdxl[0]), "--output",
               str(tmp_path / "o2")], "exactly two LoRAs"),
             ([str(fa / PEFT_FILE), str(fb), "--method", "ziplora", "--model", str(tiny_sdxl[0]), "--output",
               str(tmp_path / "o3")], "train.py output folder")]
    for argv, words in cases:
        r = subprocess.run([sys.executable, "merge.py", *argv], cwd=REPO, capture_output=True, text=True)
        assert r.returncode != 0 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not any(p.name.startswith("o") for p in tmp_path.iterdir())  # nothing written
