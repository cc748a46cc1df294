"""Benchmarks, side by side in one run on whatever device is here:  python -m benchmarks.bench [--quick] [--compile]

    (a) UNet forward and forward+backward: ours vs diffusers' UNet2DConditionModel, same config, weights, inputs.
    (b) a DCO training step vs a DreamBooth-LoRA step: train.py's own `train_step`, same everything.
    (c) one consistency-guided sampling step: sample.py's single batch-3 UNet call vs the official two calls (2 + 1).
    (d) our training step (cached latents, cached text) vs one that VAE-encodes in fp32 and text-encodes every step.
    (e) CUDA only: the real-size SDXL DCO step at 1024^2 in bf16 (time, peak memory with and without gradient
        checkpointing, achieved TFLOP/s) and a 30-step consistency-guided 1024^2 sample.

`--real-size` runs benchmarks/real_size.py instead: the whole main job at SDXL's real size on any device.
Prints a table; a full run writes docs/benchmarks.md (a --quick or --size run only prints, unless --output is given). Models are built with random weights (speed does not depend on the
values): the real SDXL configs on CUDA, a "medium" SDXL-shaped family on CPU (see SIZES), a tiny one for --quick.
Timing: the variants of a row run interleaved (A B, B A, ...) after warm-up; medians and the min-max spread are
reported, and the ratio is the median of the per-round ratios. On a CPU running one thread (the default: per-core
comparisons, steadier on a shared machine) the times are CPU time, see clock(). Peak memory: CUDA's
max_memory_allocated; on CPU the peak resident set (VmHWM, reset after warm-up) of a fresh process per variant.
diffusers is imported here only as the reference to beat; the core never imports it.
"""
import argparse
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/bench.py` as well as `python -m benchmarks.bench`
    sys.path.insert(0, str(ROOT))
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from dco import add_noise, alphas_cumprod, dco_loss, diffusion_loss, sample_noise, sample_timesteps  # noqa: E402
from lora import inject_lora, lora_modules, lora_parameters, lora_scale  # noqa: E402
from product import errors  # noqa: E402
from sample import euler_schedule, guided_eps, sample_euler  # noqa: E402
from text_encoder import CLIPTextModel, encode_prompt  # noqa: E402
from train import Batch, db_loss, train_step  # noqa: E402
from unet_loader import UNet  # noqa: E402
from vae import AutoencoderKL, latent_dist_sample  # noqa: E402

GiB = 2 ** 30
PHI = "phi forward (inference mode, LoRA off)"

# ----------------------------------------------------------------------------------------------------------
# Model sizes. SDXL-base's real configs (stabilityai/stable-diffusion-xl-base-1.0, the keys our modules read;
# test_bench checks them against tests/data/sdxl) are written out here so the benchmark needs no download.


def sdxl_configs():
    unet = dict(
        in_channels=4, out_channels=4, sample_size=128, block_out_channels=[320, 640, 1280], layers_per_block=2,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048,
        norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
               layers_per_block=2, norm_num_groups=32, scaling_factor=0.13025,
               down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    clip = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5)
    te = dict(clip, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu")
    te2 = dict(clip, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
               hidden_act="gelu", projection_dim=1280)
    return dict(unet=unet, vae=vae, text_encoder=te, text_encoder_2=te2, resolution=1024, rank=32)


def small_configs(channels, heads, depth, groups, te, te2, vae, vae_groups, resolution, rank):
    """SDXL's architecture at other widths: te/te2 = (width, layers, heads)."""
    cfg = sdxl_configs()
    pooled = te2[0]
    cfg["unet"].update(block_out_channels=channels, attention_head_dim=heads, transformer_layers_per_block=depth,
                       norm_num_groups=groups, cross_attention_dim=te[0] + te2[0], addition_time_embed_dim=64,
                       projection_class_embeddings_input_dim=pooled + 6 * 64, sample_size=resolution // 8)
    cfg["vae"].update(block_out_channels=vae, norm_num_groups=vae_groups)
    for key, (width, layers, n_heads) in (("text_encoder", te), ("text_encoder_2", te2)):
        cfg[key].update(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                        num_attention_heads=n_heads)
    cfg["text_encoder_2"]["projection_dim"] = pooled
    return dict(cfg, resolution=resolution, rank=rank)


SIZES = {
    "sdxl": sdxl_configs,
    # CPU: 256^2 images (32^2 latents), the UNet's widths / 5 (heads of 64 channels as in SDXL), its 10-block level
    # cut to 2, LoRA rank / 4. VAE and text encoders cut so their cost keeps SDXL's proportion to the UNet forward
    # (at 1024^2: VAE encoder 4.88 TFLOP = 0.72 UNet forwards, both text encoders 0.11 TFLOP = 0.016).
    "medium": lambda: small_configs([64, 128, 256], [1, 2, 4], [1, 2, 2], 32, (192, 1, 3), (320, 1, 5),
                                    [20, 40, 80, 80], 4, 256, 8),
    "tiny": lambda: small_configs([32, 64, 64], [1, 2, 2], [1, 1, 1], 8, (32, 1, 2), (32, 1, 2),
                                  [8, 8, 16, 16], 4, 64, 4),
}


def randomize(model, seed=0):
    """Random weights (speed does not depend on them): fan-in scaled so activations stay of order 1 in bf16, norm
    gains near 1."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5)
            else:
                p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.1)
    return model


def random_model(cls, config, device, dtype, **kwargs):
    """Built on the meta device (no 2.6 B-parameter CPU init), materialised on `device`, randomized."""
    with torch.device("meta"):
        model = cls(config, **kwargs)
    return randomize(model.to_empty(device=device)).to(dtype).eval().requires_grad_(False)


def unet_inputs(cfg, batch, resolution, device, dtype, seed=1):
    """(x_t, t, context, pooled, time_ids) for `batch` images of `resolution`^2 pixels."""
    u, g = cfg["unet"], torch.Generator().manual_seed(seed)
    pooled = u["projection_class_embeddings_input_dim"] - 6 * u["addition_time_embed_dim"]
    x = torch.randn(batch, u["in_channels"], resolution // 8, resolution // 8, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ctx = torch.randn(batch, 77, u["cross_attention_dim"], generator=g)
    pool = torch.randn(batch, pooled, generator=g)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, dtype=torch.float32)
    return x.to(device, dtype), t.to(device), ctx.to(device, dtype), pool.to(device, dtype), time_ids.to(device)


# ----------------------------------------------------------------------------------------------------------
# Measuring


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def clock(device):
    """Wall time, except on a CPU running one thread: there the process's CPU time, which leaves out the time other
    processes hold the core (a shared machine) and otherwise equals the wall time, as nothing here waits for I/O."""
    return time.process_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter


def timed(variants: dict, device, repeats, warmup):
    """{name: [seconds per call]}: every round runs each variant once, the order reversed every other round
    (A B, B A, ...) so a slow drift of the machine hits all variants alike."""
    times, now = {name: [] for name in variants}, clock(device)
    items = list(variants.items())
    for i in range(warmup + repeats):
        for name, fn in items if i % 2 == 0 else items[::-1]:
            sync(device)
            t0 = now()
            fn()
            sync(device)
            if i >= warmup:
                times[name].append(now() - t0)
    return times


# FlopCounterMode knows CUDA's attention kernels but not the CPU one; count it with the same formula.
_CPU_SDPA = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(g, q, k, v),
}


def count_flops(fn) -> int:
    with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
        fn()
    return counter.get_total_flops()


def _proc_status(key) -> int:
    """A /proc/self/status memory line (kB) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def peak_memory(fn, device, variant, args):
    """Peak memory of repeated `fn` calls after one warm-up call: CUDA's allocator peak in this process; on CPU the
    peak resident set of a fresh `python -m benchmarks.bench --peak-of VARIANT` process (torch has no CPU allocator stats).
    Returns (peak bytes, bytes held just before the measured calls)."""
    if device.type == "cuda":
        fn()
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(), fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), base
    # A fixed mmap threshold makes glibc hand every large freed tensor back to the OS at once, so the resident set
    # follows the live tensors instead of the allocator's cache.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, os.path.abspath(__file__), "--peak-of", variant, "--size", args.size,
           "--threads", str(args.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.abspath(__file__)))
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    return out["peak"], out["base"]


def peak_child(variant, args):
    """The other side of peak_memory on CPU: build the row-(b) setup, warm up, reset VmHWM, step twice, report."""
    torch.set_num_threads(args.threads)
    cfg = SIZES[args.size]()
    steps = training_setup(cfg, torch.device("cpu"), torch.float32)
    steps[variant]()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set (Linux)
    base = _proc_status("VmRSS")
    steps[variant]()
    steps[variant]()
    print(json.dumps({"peak": _proc_status("VmHWM"), "base": base}))


# ----------------------------------------------------------------------------------------------------------
# What is measured


def training_setup(cfg, device, dtype, unet=None):
    """A LoRA'd UNet set up as train.py sets it up (fp32 LoRA, AdamW, autocast when the base is bf16), one batch of
    cached latents and text, and {"dco": step, "db": step}: each one call of train.train_step."""
    if unet is None:
        unet = random_model(UNet, cfg["unet"], device, dtype)
    inject_lora(unet, rank=cfg["rank"])
    for m in lora_modules(unet).values():
        m.lora_down.float(), m.lora_up.float()
    unet.train()
    opt = torch.optim.AdamW(lora_parameters(unet), lr=5e-5, weight_decay=1e-4, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    amp = functools.partial(torch.autocast, device.type, dtype=dtype) if dtype != torch.float32 else nullcontext
    x0, _, ctx, pooled, time_ids = unet_inputs(cfg, 1, cfg["resolution"], device, torch.float32)
    eps = torch.randn_like(x0)
    t = torch.tensor([500], device=device)
    xt = add_noise(x0, eps, t, alphas_cumprod().to(device))
    cond = (ctx.to(dtype), pooled.to(dtype))
    dco, db = functools.partial(dco_loss, beta=1000.0), db_loss
    steps = {"dco": lambda: train_step(unet, opt, scaler, [Batch(xt, eps, t, time_ids, cond, cond)], dco, amp=amp),
             "db": lambda: train_step(unet, opt, scaler, [Batch(xt, eps, t, time_ids, cond, None)], db, amp=amp)}
    return steps | {"unet": unet, "opt": opt, "scaler": scaler, "amp": amp, "batch": (xt, eps, t, time_ids, cond)}


class FixedTokens:
    """Stands in for a CLIPTokenizer: the ids of a 12-token prompt. Tokenising is string work on the CPU, the same
    for both sides of row (d); what is timed is the text encoders."""

    def __call__(self, prompts):
        ids = [49406] + [320 + i for i in range(10)] + [49407] * 66
        return torch.tensor([ids] * len(prompts))


def row_a(cfg, device, dtype, args, res):
    """Ours vs diffusers, the same weights (diffusers' state dict loaded strictly into ours) and inputs. Backward
    as in LoRA training: frozen weights, gradients of the activations only (here: w.r.t. the input latents)."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        ref = randomize(UNet2DConditionModel(**cfg["unet"]))
    with torch.device("meta"):
        ours = UNet(cfg["unet"])
    ours.to_empty(device=device).load_state_dict(ref.state_dict(), strict=True)  # the same keys, the same weights
    ours, ref = ((m if dtype == torch.float32 else m.to(dtype)).eval().requires_grad_(False) for m in (ours, ref))
    if args.compile:
        ours.compile(), ref.compile()
    x, t, ctx, pooled, time_ids = unet_inputs(cfg, 1, cfg["resolution"], device, dtype)
    xg = x.clone().requires_grad_(True)
    added = {"text_embeds": pooled, "time_ids": time_ids}
    run = {"ours": lambda x: ours(x, t, ctx, pooled, time_ids),
           "diffusers": lambda x: ref(x, t, ctx, added_cond_kwargs=added).sample}

    def backward(name):
        xg.grad = None
        run[name](xg).float().square().mean().backward()

    with torch.no_grad():
        diff = (run["ours"](x).float() - run["diffusers"](x).float()).abs().max().item()
        flops = count_flops(lambda: run["ours"](x))
        # Twice the rounds: the two differ by a few percent, less than this machine's noise in one round.
        fwd = timed({k: functools.partial(f, x) for k, f in run.items()}, device, 2 * args.repeats, args.warmup)
    bwd = timed({k: functools.partial(backward, k) for k in run}, device, 2 * args.repeats, args.warmup)
    res.add("a", "UNet forward", fwd["ours"], fwd["diffusers"], "diffusers", 1.00, flops,
            f"max abs diff ours vs diffusers {diff:.2g}")
    res.add("a", "UNet forward + backward", bwd["ours"], bwd["diffusers"], "diffusers", 1.00,
            count_flops(lambda: backward("ours")), "backward to the input only (weights frozen, as under LoRA)")
    if res.missed("a"):
        res.sections.append("### Where the time of row (a) goes\n\nForward + backward, three calls each under "
                            "torch.profiler, operators by self time:\n\n" +
                            op_profile({k: functools.partial(backward, k) for k in run}, device))
    return ours, flops


def op_profile(fns: dict, device, calls=3, rows=12):
    """The top operators by self time over `calls` calls of each fn, as markdown tables."""
    from torch.profiler import ProfilerActivity, profile

    out = []
    for name, fn in fns.items():
        fn()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as p:
            for _ in range(calls):
                fn()
            sync(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        out.append(f"{name}:\n\n```\n{p.key_averages().table(sort_by=key, row_limit=rows)}\n```\n")
    return "\n".join(out)


def row_b(cfg, device, dtype, args, res, unet):
    steps = training_setup(cfg, device, dtype, unet)
    flops = {k: count_flops(steps[k]) for k in ("dco", "db")}
    t = timed({k: steps[k] for k in ("dco", "db")}, device, args.repeats, args.warmup)
    res.add("b", "training step: DCO vs DreamBooth-LoRA", t["dco"], t["db"], "DreamBooth", 1.35, flops["dco"],
            f"FLOP ratio {flops['dco'] / flops['db']:.2f}")
    ratio = res.rows[-1]["ratio"]
    mem = {k: peak_memory(steps[k], device, k, args) for k in ("dco", "db")}
    res.add_memory("b", "training step peak memory: DCO vs DreamBooth", mem["dco"], mem["db"], "DreamBooth", 1.05)
    res.sections.append(step_phases(steps, device, args, ratio))
    return steps


def step_phases(steps, device, args, ratio):
    """Where the time of row (b) goes: train_step taken apart into its four phases, each timed on its own."""
    unet, opt, amp = steps["unet"], steps["opt"], steps["amp"]
    xt, eps, t, time_ids, cond = steps["batch"]
    state = {}

    def phi():
        with torch.inference_mode(), lora_scale(unet, 0.0), amp():
            unet(xt, t, *cond, time_ids)

    def theta():
        with amp():
            state["loss"] = diffusion_loss(unet(xt, t, *cond, time_ids), eps)

    def update():
        torch.nn.utils.clip_grad_norm_(lora_parameters(unet), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    phases = {PHI: phi, "theta forward (grad, LoRA on)": theta,
              "backward": lambda: state.pop("loss").backward(), "clip + AdamW": update}
    flops = {name: count_flops(fn) for name, fn in phases.items()}
    times, now = {name: [] for name in phases}, clock(device)
    for i in range(args.warmup + args.repeats):
        for name, fn in phases.items():  # in train_step's order: each phase needs the one before
            sync(device)
            t0 = now()
            fn()
            sync(device)
            if i >= args.warmup:
                times[name].append(now() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    base = sum(med.values()) - med[PHI]
    # phi's share of a DreamBooth step round by round, like the ratios of the table: load changes cancel out.
    phi_share = statistics.median([p / sum(rest) for p, *rest in zip(*times.values())])
    lines = ["| phase of the DCO step | median | share of a DreamBooth step | GFLOP | GFLOP/s |",
             "|---|---|---|---|---|"]
    for name in phases:
        lines.append(f"| {name} | {med[name] * 1e3:.4g} ms | {med[name] / base:.2f} | {flops[name] / 1e9:.3g} | "
                     f"{flops[name] / med[name] / 1e9:.3g} |")
    share = flops[PHI] / (sum(flops.values()) - flops[PHI])
    speed = share / phi_share
    return f"""### Where the time of row (b) goes

DCO's step is DreamBooth's step plus one forward of phi without autograd (whole steps: ratio {ratio:.2f} in the
table). The phases of `train_step`, timed one by one ({args.repeats} rounds, medians):

{chr(10).join(lines)}

With the UNet's weights frozen the backward computes activation gradients only, about one forward's FLOPs, so a
DreamBooth-LoRA step is about two forwards plus AdamW. Phi's forward adds {share:.2f} of it in FLOPs and {phi_share:.2f}
in time (median over the rounds): per FLOP it runs {speed:.2f}x as fast as the rest of the step. A ratio of 1.35
needs it to cost at most 0.35 of a DreamBooth step, i.e. to run {share / 0.35:.2f}x as fast per FLOP. Nothing in
the step is spent twice: phi reuses the UNet's weights, skips the LoRA branch, runs under inference_mode and keeps
no activations, and the step reads its latents and text from the caches.
"""


def row_c(cfg, device, dtype, args, res, unet):
    """One consistency-guided step (w_cfg 5, w_con 3): rows [empty (phi), c_base (phi), c (theta)] in one call
    (sample.guided_eps) vs the official code's two calls, phi's two rows with the LoRA off, then theta's."""
    for m in lora_modules(unet).values():  # sampling runs the LoRA in the UNet's dtype (as sample.py loads it)
        m.lora_down.to(dtype), m.lora_up.to(dtype)
    unet.eval()
    x, t, ctx, pooled, time_ids = unet_inputs(cfg, 3, cfg["resolution"], device, dtype)
    x, t = x[:1], t[0]
    scale = [0.0, 0.0, 1.0]  # per-row LoRA scales, as sample.conditioning makes them
    cfg_w, wcon = 5.0, 3.0
    ours = guided_eps(unet, (ctx, pooled, time_ids, scale), cfg_w, wcon)

    def official(x, t):
        with lora_scale(unet, 0.0):
            e_empty, e_base = unet(x.repeat(2, 1, 1, 1), t, ctx[:2], pooled[:2], time_ids[:2]).float().chunk(2)
        with lora_scale(unet, 1.0):
            e_c = unet(x, t, ctx[2:], pooled[2:], time_ids[2:]).float()
        return e_empty + cfg_w * (e_base - e_empty) + wcon * (e_c - e_base)

    with torch.inference_mode():  # as sample.generate_latents runs
        diff = (ours(x, t) - official(x, t)).abs().max().item()
        flops = count_flops(lambda: ours(x, t))
        times = timed({"ours": lambda: ours(x, t), "official": lambda: official(x, t)}, device, args.repeats,
                      args.warmup)
        res.add("c", "consistency-guided step: 1 call (batch 3) vs 2 calls (2 + 1)", times["ours"],
                times["official"], "two calls", 0.90, flops, f"max abs diff {diff:.2g}")
        calls = {b: functools.partial(unet, x.repeat(b, 1, 1, 1), t, ctx[:b], pooled[:b], time_ids[:b])
                 for b in (1, 2, 3)}
        with lora_scale(unet, 0.0):
            by_batch = {b: statistics.median(v) for b, v in timed(calls, device, args.repeats, args.warmup).items()}
    per_row, ours_med = (by_batch[3] - by_batch[1]) / 2, statistics.median(times["ours"])
    b1, b2, b3 = (f"{by_batch[b] * 1e3:.4g} ms" for b in (1, 2, 3))
    res.sections.append(" ".join([
        "### Where the time of row (c) goes\n\n"
        f"One UNet call with the LoRA off, by batch size ({args.repeats} rounds, medians): batch 1 {b1}, batch 2 {b2},",
        f"batch 3 {b3}. Each row adds about {per_row * 1e3:.3g} ms; the remaining {(by_batch[1] - per_row) * 1e3:.3g}",
        "ms are paid once per call whatever its batch (every weight read once, Python and dispatch overhead, small",
        "matrices that use the hardware poorly). One batch-3 call pays them once, the official form twice, which",
        f"bounds the ratio at batch 3 / (batch 2 + batch 1) = {by_batch[3] / (by_batch[2] + by_batch[1]):.2f} here.",
        f"The guided step itself takes {ours_med * 1e3:.4g} ms against {b3} for the plain batch-3 call",
        "(measured in other rounds): on top of it come the LoRA branch, run on theta's row only (the per-row scales",
        "are host-side floats, so each LoRA layer slices the batch without a device sync), and the guidance",
        "arithmetic. The two-call baseline",
        "skips the branch in its batch-2 call too, as our LoRA layers do at scale 0; the official code's peft layers",
        "compute it and multiply it by 0, so this baseline is, if anything, faster than the official code.\n"]))
    return ours, x


def row_d(cfg, device, dtype, args, res, steps, unet_flops):
    """Our step (latents drawn from the cached VAE Gaussian, cached text conditioning) vs the official form: the
    VAE (fp32) encodes the image and both text encoders encode the prompt and the base prompt at every step.
    LoRA only: with a new token, theta's prompt is re-encoded every step in both."""
    vae = random_model(AutoencoderKL, cfg["vae"], device, torch.float32)  # SDXL's VAE overflows in half precision
    te = random_model(CLIPTextModel, cfg["text_encoder"], device, dtype, with_projection=False)
    te2 = random_model(CLIPTextModel, cfg["text_encoder_2"], device, dtype, with_projection=True)
    tok = FixedTokens()
    R = cfg["resolution"]
    image = torch.rand(1, 3, R, R, device=device) * 2 - 1
    unet, opt, scaler, amp = steps["unet"], steps["opt"], steps["scaler"], steps["amp"]
    acp = alphas_cumprod().to(device)
    with torch.no_grad():
        mean, logvar = vae.encode(image)  # the cache: once per image, before training
        cond = encode_prompt(["a photo of a dog"], tok, tok, te, te2)
    time_ids = torch.tensor([[R, R, 0, 0, R, R]], dtype=torch.float32, device=device)

    def step(x0, cond, base_cond):
        eps = sample_noise(x0)
        t = sample_timesteps(1, device=device)
        batch = Batch(add_noise(x0, eps, t, acp), eps, t, time_ids, cond, base_cond)
        train_step(unet, opt, scaler, [batch], functools.partial(dco_loss, beta=1000.0), amp=amp)

    def ours():
        step(latent_dist_sample(mean, logvar) * vae.scaling_factor, cond, cond)

    def official():
        with torch.no_grad():
            x0 = latent_dist_sample(*vae.encode(image)) * vae.scaling_factor
            with amp():
                c = encode_prompt(["a photo of a sks dog"], tok, tok, te, te2)
                base = encode_prompt(["a photo of a dog"], tok, tok, te, te2)
        step(x0, c, base)

    with torch.no_grad():
        enc = count_flops(lambda: vae.encode(image)) + 2 * count_flops(lambda: encode_prompt(["a"], tok, tok, te, te2))
    times = timed({"ours": ours, "official": official}, device, args.repeats, args.warmup)
    res.add("d", "DCO training step: cached latents + text vs encoding every step", times["ours"], times["official"],
            "encode every step", None, None, f"encoding adds {enc / 1e9:.3g} GFLOP = {enc / unet_flops:.2f} UNet "
                                             "forwards per step (SDXL at 1024^2: 0.74), the VAE in fp32")


def gpu_bf16_peak(name):
    """Dense bf16 tensor-core peak FLOP/s of the GPUs we know (vendor datasheets), else None."""
    if "H100" in name or "H200" in name or "GH200" in name:
        return 756e12 if "PCIe" in name else 989e12
    return 312e12 if "A100" in name else None


def rows_e(cfg, device, args, res, steps, cg):
    """The real-size numbers on CUDA, reusing rows (b) and (c)'s SDXL-size UNet, step and sampler."""
    name, unet = torch.cuda.get_device_name(), steps["unet"]
    peak = gpu_bf16_peak(name)
    for m in lora_modules(unet).values():  # back to training after row (c): fp32 LoRA, one scale for the batch
        m.lora_down.float(), m.lora_up.float()
        m.scale = 1.0
    unet.train()
    flops = count_flops(steps["dco"])
    for checkpointing in (False, True):
        unet.gradient_checkpointing = checkpointing
        t = timed({"dco": steps["dco"]}, device, args.repeats, args.warmup)["dco"]
        mem, _ = peak_memory(steps["dco"], device, "dco", args)
        rate = flops / statistics.median(t)
        util = f"{rate / 1e12:.0f} TFLOP/s" + (f" = {100 * rate / peak:.0f}% of {name}'s bf16 peak" if peak else "")
        res.add("e", f"SDXL DCO step, 1024^2 bf16, batch 1, gradient checkpointing {'on' if checkpointing else 'off'}",
                t, flops=flops, note=f"peak {mem / GiB:.2f} GiB; {util}; targets <= 110 ms and "
                                     f"<= {8 if checkpointing else 14} GiB on an H100")
    unet.gradient_checkpointing = False
    eps_fn, x = cg
    for m in lora_modules(unet).values():
        m.lora_down.to(torch.bfloat16), m.lora_up.to(torch.bfloat16)
    unet.eval()
    sigmas, ts = euler_schedule(alphas_cumprod(), 30)
    noise, ts = torch.randn_like(x), ts.to(x.device)
    with torch.inference_mode():
        t = timed({"cg": lambda: sample_euler(eps_fn, noise, sigmas, ts)}, device, max(3, args.repeats // 3), 1)["cg"]
    res.add("e", "SDXL 30-step consistency-guided sample, 1024^2 bf16 (the 30 UNet calls)", t,
            note="target <= 3 s on an H100; VAE decode not included")


# ----------------------------------------------------------------------------------------------------------
# The report


class Results:
    """The rows of the table, and the sections of markdown that explain them."""

    def __init__(self):
        self.rows, self.sections = [], []

    def add(self, row, what, ours, ref=None, ref_name="", target=None, flops=None, note=""):
        """ours/ref: seconds per call, one per round of `timed`. The ratio is the median of the per-round ratios:
        the two runs of a round are neighbours in time, so a load change on the machine cancels out of it."""
        ratios = [a / b for a, b in zip(ours, ref)] if ref else None
        self._append(row, what, _t(ours), _t(ref) if ref else "", ref_name, ratios, target, flops, note)

    def add_memory(self, row, what, ours, ref, ref_name, target):
        """ours/ref: (peak bytes, bytes held before the measured steps)."""
        note = f"above the model and optimizer state: {_m(ours[0] - ours[1])} vs {_m(ref[0] - ref[1])}"
        self._append(row, what, _m(ours[0]), _m(ref[0]), ref_name, [ours[0] / ref[0]], target, None, note)

    def _append(self, row, what, ours, ref, ref_name, ratios, target, flops, note):
        r = dict(row=row, what=what, ours=ours, ref=ref, ref_name=ref_name, target=target, flops=flops, note=note,
                 ratio=statistics.median(ratios) if ratios else None,
                 iqr=statistics.quantiles(ratios, n=4)[::2] if ratios and len(ratios) > 1 else None)
        self.rows.append(r)
        print(f"  ({row}) {what}: {ours}" + (f" vs {ref_name} {ref} -> {r['ratio']:.2f}" if ratios else ""), flush=True)

    def pending(self, row, what, why):
        self.rows.append(dict(row=row, what=what, ours=why, ref="", ref_name="", target=None, flops=None, note="",
                              ratio=None, iqr=None))

    def missed(self, row):
        return any(r["row"] == row and r["target"] is not None and r["ratio"] > r["target"] for r in self.rows)

    def table(self):
        lines = ["| row | measurement | ours | reference | ratio (IQR) | target | met | GFLOP | notes |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(self.rows, key=lambda r: r["row"]):
            ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}" + (
                f" ({r['iqr'][0]:.2f}-{r['iqr'][1]:.2f})" if r["iqr"] else "")
            cells = [f"({r['row']})", r["what"], r["ours"], f"{r['ref_name']}: {r['ref']}" if r["ref"] else "", ratio,
                     "" if r["target"] is None else f"<= {r['target']:.2f}",
                     "" if r["target"] is None else ("yes" if r["ratio"] <= r["target"] else "**no**"),
                     "" if r["flops"] is None else f"{r['flops'] / 1e9:.3g}", r["note"]]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _t(times):
    """median (min-max) in ms or s."""
    med, lo, hi = statistics.median(times), min(times), max(times)
    unit, f = ("s", 1) if med >= 10 else ("ms", 1e3)
    return f"{med * f:.4g} {unit} ({lo * f:.3g}-{hi * f:.3g})"


def _m(n):
    return f"{n / GiB:.3f} GiB" if n >= GiB / 4 else f"{n / 2 ** 20:.1f} MiB"


def machine(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} cores"


def write_report(path, res, args, device, elapsed):
    import diffusers

    cfg = SIZES[args.size]()
    u = cfg["unet"]
    missed = sorted({r["row"] for r in res.rows if r["target"] is not None and r["ratio"] > r["target"]})
    timer = ("the process's CPU time (one thread: that is the wall time of the same run on an idle core, without the "
             "time other processes held it; they still share caches and memory bandwidth)"
             if clock(device) is time.process_time else "wall time, the device synchronised around each call")
    memory = ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
              "the peak resident set size (VmHWM, reset after a warm-up step) of a fresh process per variant, with "
              "glibc's mmap threshold fixed so that freed tensors leave the resident set at once")
    verdict = ("All the targets of rows (a)-(c) are met." if not missed else
               f"Not met here: row{'s' if len(missed) > 1 else ''} {', '.join(f'({m})' for m in missed)}; the "
               "sections below show where the time goes.")
    doc = f"""# Benchmarks

Written by `benchmarks/bench.py` on {datetime.date.today().isoformat()}: {machine(device)}, torch {torch.__version__}, diffusers \
{diffusers.__version__}, {args.threads} CPU thread(s){", torch.compile" if args.compile else ""}; the run took \
{elapsed:.0f} s.

    {" ".join(["python -m benchmarks.bench"] + sys.argv[1:])}

Models: size "{args.size}" with random weights (speed does not depend on their values): UNet widths \
{u["block_out_channels"]}, transformer depths {u["transformer_layers_per_block"]}, {cfg["resolution"]}^2 images \
({cfg["resolution"] // 8}^2 latents), LoRA rank {cfg["rank"]} on the attention projections, batch 1, \
{"bf16" if device.type == "cuda" else "fp32"}. Times: median (min-max) of {args.repeats} rounds ({2 * args.repeats} \
for row a) after {args.warmup} warm-up rounds, the variants of a row interleaved (A B, B A, ...), {timer}; the ratio \
(ours / reference) is the median of the per-round ratios, with their interquartile range. Peak memory: {memory}.

{res.table()}

{verdict}

What each row measures:
- (a) `unet_loader.UNet` vs diffusers' `UNet2DConditionModel` built from the same config, diffusers' weights loaded
  strictly into ours, the same inputs. Forward under no_grad; forward + backward with frozen weights, the gradient
  taken to the input latents (what LoRA training back-propagates through).
- (b) `train.train_step` with loss "dco" vs "db": the same UNet, LoRA, AdamW, batch, cached latents and text. DCO
  adds phi's no-grad forward (the same UNet with the LoRA off).
- (c) `sample.guided_eps`: the three predictions of a consistency-guided step in one batch-3 UNet call (LoRA scale
  [0, 0, 1] per row) vs the official code's two calls, phi's empty and base rows (batch 2, LoRA off) then theta's
  row (batch 1).
- (d) The DCO step of (b) fed from the caches train.py builds (a latent drawn from each image's cached VAE Gaussian,
  the prompt encoded once) vs the official code's per-step work: VAE-encode the image in fp32 and run both text
  encoders on the prompt and the base prompt, then the same step. The medium VAE and text encoders are cut down
  so that their cost relative to the UNet is close to SDXL's (counted with torch.utils.flop_counter on the meta
  device at 1024^2: UNet forward 6.76 TFLOP, VAE encoder 4.88 TFLOP, both text encoders 0.11 TFLOP).
- (e) CUDA only, the real SDXL UNet: the DCO step at 1024^2 in bf16 with the LoRA in fp32 (as train.py trains),
  with and without gradient checkpointing, FLOPs counted by torch.utils.flop_counter on the same step; and a 30-step
  Euler consistency-guided sample (w_cfg 5, w_con 3). Known figures for context: an SDXL UNet forward at 1024^2 is
  ~6.8 TFLOP, a LoRA step ~14.8 and a DCO step ~21.6 TFLOP; the fastest public SDXL LoRA trainer runs ~0.6 s/step
  on an H100 at 13 GiB.

What the code does to earn these numbers (each explained in a comment where it lives):
- attention through `F.scaled_dot_product_attention` (flash / memory-efficient kernels) on strided q/k/v views, no
  `.contiguous()` copies; the residual added first so the Transformer2D output needs no layout copy
  (`unet_loader.py`);
- LoRA as two thin matmuls added to the frozen layer's output, the scale folded into the small up weight, never a
  materialised Delta W; no cast of the activations under autocast (it used to keep one extra copy per q/k/v layer
  for the backward); per-row scales as host-side floats, so a batched guidance call runs the branch on theta's rows
  only (`lora.py`);
- phi is the same UNet with the LoRA off, run first under inference_mode: no second model, no activations kept
  (`train.train_step`); the three predictions of a guided step in one batched call (`sample.guided_eps`), sampling
  under inference_mode;
- each image VAE-encoded once (its Gaussian cached, a fresh latent drawn every step) and fixed prompts encoded once
  (`train.py`); fused AdamW on CUDA; optional `--compile` (torch.compile) and `--gradient-checkpointing`.
Tried and left out because it measured slower here: channels-last memory format (forward about the same, backward
about 10% slower on this CPU); torch.compile on CPU (minutes of compiling for the tiny model).

{chr(10).join(res.sections)}"""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    old = Path(path).read_text() if Path(path).exists() else ""
    real = old[old.find("\n## Real size\n"):] if "\n## Real size\n" in old else ""  # real_size.py's section: kept
    Path(path).write_text(doc.rstrip("\n") + "\n" + real if real else doc)


def main(argv=None):
    p = argparse.ArgumentParser(description="Benchmark dco against diffusers and the official DCO code's forms.")
    p.add_argument("--quick", action="store_true", help="tiny models, few repeats: checks that everything runs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", choices=list(SIZES), help="default: sdxl on CUDA, medium on CPU, tiny with --quick")
    p.add_argument("--repeats", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: stable on a shared machine)")
    p.add_argument("--compile", action="store_true", help="torch.compile our UNet (and diffusers' in row a)")
    p.add_argument("--output", help="markdown report (default: docs/benchmarks.md for a full run; a --quick or --size "
                                 "run only prints, so it never overwrites the committed numbers)")
    p.add_argument("--peak-of", choices=["dco", "db"], help=argparse.SUPPRESS)  # internal: a CPU memory probe
    p.add_argument("--real-size", action="store_true", help="the main job at SDXL's real size (sdxl-random): runs "
                                                            "benchmarks/real_size.py with the other arguments")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--real-size" in argv:
        from benchmarks import real_size
        return real_size.main([a for a in argv if a != "--real-size"])
    args = errors.parse_flags(p, argv, {"repeats": ">= 1", "warmup": ">= 0", "threads": ">= 1"})
    device = torch.device(args.device)
    partial = args.quick or args.size is not None
    args.size = args.size or ("tiny" if args.quick else "sdxl" if device.type == "cuda" else "medium")
    args.repeats = args.repeats or (3 if args.quick else 9)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.peak_of:
        return peak_child(args.peak_of, args)
    torch.set_num_threads(args.threads)
    cfg = SIZES[args.size]()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    start = time.perf_counter()
    res = Results()
    print(f"{machine(device)}, torch {torch.__version__}, size {args.size}, {args.threads} thread(s)", flush=True)
    unet, unet_flops = row_a(cfg, device, dtype, args, res)
    steps = row_b(cfg, device, dtype, args, res, unet)
    row_d(cfg, device, dtype, args, res, steps, unet_flops)
    cg = row_c(cfg, device, dtype, args, res, unet)
    if device.type == "cuda" and args.size == "sdxl":
        rows_e(cfg, device, args, res, steps, cg)
    else:
        res.pending("e", "SDXL DCO step and 30-step consistency-guided sample, 1024^2 bf16",
                    "not yet measured on GPU" if device.type != "cuda" else "run on CUDA without --quick/--size")
    elapsed = time.perf_counter() - start
    print(res.table())
    out = args.output or (None if partial else ROOT / "docs" / "benchmarks.md")
    if out:
        write_report(out, res, args, device, elapsed)
        print(f"wrote {out} ({elapsed:.0f} s)")
    else:
        print(f"done in {elapsed:.0f} s (not written: pass --output FILE to keep a quick or partial run's report)")


if __name__ == "__main__":
    main()
