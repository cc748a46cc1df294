"""product/float8.py: frozen weights in float8 with a scale per output channel, dequantised inside each layer.

Identities for the format (the error bound of e4m3 with a per-channel scale; a per-tensor scale is worse when rows
differ in size), the layers against F.linear / F.conv2d on the dequantised weight (forward and the gradient of the
input, which the token needs), nothing but q and s kept for the backward, and the whole model: loaded as fp8 it
is the fp32 model quantized tensor by tensor, its LoRA trains in fp32, phi (scale 0) is the fp8 base bit for bit,
and train.py / sample.py / merge.py --analyze run with --precision fp8."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import inject_lora, lora_modules, lora_parameters, lora_scale
from product import float8
from sdxl import load_sdxl

E4M3_STEP = 2.0 ** -3  # 3 mantissa bits: a normal number is rounded to within half a step, 2^-4 of itself
SUBNORMAL = 2.0 ** -9  # e4m3's smallest subnormal (its absolute resolution near 0)


def test_quantize_error_is_bounded_per_channel():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 320, generator=g) * torch.logspace(-6, 0, 64)[:, None]  # rows of very different sizes
    q, s = float8.quantize(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (64,) and s.dtype == torch.float32
    back = float8.dequantize(q, s, torch.float32)
    bound = (E4M3_STEP / 2) * w.abs() + (SUBNORMAL / 2) * s[:, None]  # relative in the normals, absolute below
    assert ((back - w).abs() <= bound * (1 + 1e-6)).all()
    # every row's largest entry is exactly representable at the top of the range: the full range is used
    assert torch.allclose(back.abs().amax(1), w.abs().amax(1), rtol=1e-6)
    # a scale per tensor (the largest row sets it) loses the small rows: why we scale per channel
    qt, st = float8.quantize(w.flatten()[None])
    per_tensor = float8.dequantize(qt, st, torch.float32).view_as(w)
    rel = lambda x: ((x - w).norm(dim=1) / w.norm(dim=1))  # noqa: E731
    assert rel(back).max() < 0.04 and rel(per_tensor)[:8].min() > 0.5


def test_zero_rows_and_conv_shapes():
    w = torch.zeros(3, 4, 3, 3)
    w[1] = 0.5
    q, s = float8.quantize(w)
    assert s.shape == (3,) and torch.equal(float8.dequantize(q, s, torch.float32), w)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_layer_equals_the_dequantised_weight_forward_and_backward(kind):
    torch.manual_seed(0)
    layer = nn.Linear(48, 40) if kind == "linear" else nn.Conv2d(8, 12, 3, padding=1, stride=2)
    x = torch.randn(2, 5, 48) if kind == "linear" else torch.randn(2, 8, 9, 9)
    q, s = float8.quantize(layer.weight)
    w = float8.dequantize(q, s, torch.float32)
    ref = (lambda x: F.linear(x, w, layer.bias)) if kind == "linear" else (
        lambda x: F.conv2d(x, w, layer.bias, stride=2, padding=1))
    float8.quantize_module_(layer)
    assert isinstance(layer, nn.Linear if kind == "linear" else nn.Conv2d) and layer.weight.dtype == torch.float8_e4m3fn
    assert set(layer.state_dict()) == {"weight", "bias", "weight_scale"}  # checkpoint names unchanged, + the scale
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, expect = layer(x1), ref(x2)
    assert torch.equal(out, expect)
    g = torch.randn_like(out)
    out.backward(g)
    expect.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


def test_backward_keeps_only_the_fp8_weight():
    """Autograd would save the dequantised copy for the input's gradient; the layer saves q and s instead."""
    layer = float8.quantize_module_(nn.Linear(512, 512, bias=False))
    x = torch.randn(1, 512, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    assert sum(t.numel() * t.element_size() for t in saved) <= 512 * 512 + 4 * 512
    assert not any(t.dtype == torch.float32 and t.numel() == 512 * 512 for t in saved)


@pytest.fixture(scope="module")
def tiny_pair():
    return load_sdxl("tiny"), load_sdxl("tiny", fp8=True)


def test_fp8_model_is_the_fp32_model_quantized_tensor_by_tensor(tiny_pair):
    sd, sd8 = tiny_pair
    quantized = 0
    for (name, m), (name8, m8) in zip(sd.unet.named_modules(), sd8.unet.named_modules()):
        assert name == name8
        if type(m) in (nn.Linear, nn.Conv2d):
            q, s = float8.quantize(m.weight)
            assert torch.equal(m8.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(m8.weight_scale, s)
            quantized += 1
        for p, p8 in zip(m.parameters(recurse=False), m8.parameters(recurse=False)):
            if p8.dtype != torch.float8_e4m3fn:
                assert torch.equal(p, p8)  # norms, biases: as loaded
    assert quantized > 50
    assert float8.frozen_bytes(sd8.unet) < 0.3 * float8.frozen_bytes(sd.unet)
    for te in (sd8.text_encoder, sd8.text_encoder_2):
        assert te.text_model.encoder.layers[0].self_attn.q_proj.weight.dtype == torch.float8_e4m3fn


def test_fp8_eps_prediction_error_and_phi_is_the_fp8_base(tiny_pair):
    sd, sd8 = tiny_pair
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([500, 50])
    tid = torch.tensor([[32, 32, 0, 0, 32, 32]] * 2).float()
    with torch.no_grad():
        c, p = sd.encode_prompt(["a photo of a dog", "a red cube"])
        c8, p8 = sd8.encode_prompt(["a photo of a dog", "a red cube"])
        assert (c8 - c).norm() / c.norm() < 0.06
        e, e8 = sd.unet(x, t, c, p, tid), sd8.unet(x, t, c, p, tid)
        assert 0 < ((e8 - e).norm() / e.norm()).item() < 0.06
    unet = load_sdxl("tiny", fp8=True).unet
    inject_lora(unet, rank=4)
    assert all(q.dtype == torch.float32 for q in lora_parameters(unet))
    for m in lora_modules(unet).values():
        m.lora_up.weight.data.normal_()
    with torch.no_grad():
        with lora_scale(unet, 0.0):
            assert torch.equal(unet(x, t, c, p, tid), e8)  # phi: the same fp8 weights, LoRA off
        assert not torch.equal(unet(x, t, c, p, tid), e8)
    with pytest.raises(ValueError, match="fp8"):
        next(iter(lora_modules(unet).values())).merge()


def test_train_sample_merge_analyze_with_fp8(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    from PIL import Image

    root = Path(__file__).resolve().parent.parent
    folder = tmp_path / "red"  # one word of the tiny model's vocabulary: the token <red>
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=root, capture_output=True, text=True)  # noqa: E731
    for out, extra in (("a", []), ("b", ["--gradient-checkpointing"])):
        r = run("train.py", "--images", str(folder), "--model", "tiny", "--steps", "2", "--precision", "fp8",
                "--sample-steps", "0", "--output", str(tmp_path / out), "--seed", str(len(extra)), *extra)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "fp8 on cpu" in r.stderr + r.stdout
    r = run("sample.py", "--model", "tiny", "--lora", str(tmp_path / "a"), "--prompt", "a photo of <red>",
            "--steps", "2", "--precision", "fp8", "--wcon", "2", "--output", str(tmp_path / "x.png"))
    assert r.returncode == 0 and (tmp_path / "x.png").stat().st_size > 0, r.stderr[-2000:]
    r = run("merge.py", "--analyze", str(tmp_path / "a"), str(tmp_path / "b"), "--csv", str(tmp_path / "i.csv"))
    assert r.returncode == 0 and math.isfinite(float(r.stdout.split("|cos| columns ")[1].split(",")[0])), r.stderr


def test_without_a_token_the_text_encoders_are_dropped_after_the_fixed_prompts(tmp_path):
    """A style (captions, no token): every prompt of the run is fixed, so it is encoded once and both encoders leave;
    the checkpoint samples still come from the cached prompts. With a token they stay (theta's prompt changes)."""
    import contextlib
    import io

    import numpy as np
    from PIL import Image

    import train

    folder = tmp_path / "style"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a red circle, flat style")
    args = ["--images", str(folder), "--model", "tiny", "--steps", "2", "--checkpoint-every", "2", "--sample-steps",
            "2", "--output", str(tmp_path / "out")]
    with contextlib.redirect_stderr(io.StringIO()):
        result = train.train(train.parse_args(args))
    sd = result["sd"]
    assert sd.text_encoder is None and sd.text_encoder_2 is None and "a red circle, flat style" in sd.prompt_cache
    assert (tmp_path / "out" / "samples" / "step000002-0.png").is_file()
    with pytest.raises(ValueError, match="dropped"):
        sd.encode_prompt(["another prompt"])
    fresh = load_sdxl("tiny")
    with torch.no_grad():
        want = fresh.encode_prompt(["a red circle, flat style"])
    assert all(torch.equal(a[0], b) for a, b in zip(want, sd.prompt_cache["a red circle, flat style"]))
