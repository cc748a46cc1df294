"""The main job at SDXL's real size, measured here:  python -m benchmarks.real_size  (or benchmarks.bench --real-size)

`--model sdxl-random` (sdxl.py) is SDXL base with every real config and random weights (speed and memory do not
depend on the values), so this needs no download. Rows, each measured in a fresh process (its own peak memory):
    (r1) the main job with a learned token, bf16, as train.py runs it: build, VAE-encode the image (fp32), the new
         token in both text encoders, LoRA rank 32 + AdamW, then DCO steps that re-encode theta's prompt through
         both encoders -- at 512^2 and 1024^2, gradient checkpointing off and on. Time per step, FLOPs, and the peak
         memory split into weights, LoRA + optimizer state and activations.
    (r2) ours vs diffusers' UNet2DConditionModel, the same bf16 weights, 256^2: forward, forward + backward-to-input.
    (r3) a 1024^2 consistency-guided sampling step: one batch-3 call (sample.guided_eps) vs the official two calls.
The results replace the "Real size" section of docs/benchmarks.md (the other sections are kept).

Peak memory on this CPU is the peak resident set (VmHWM of /proc/self/status, reset with clear_refs before a phase),
with glibc's mmap threshold fixed so freed tensors leave the resident set at once; "above the process" subtracts the
resident set before any model existed (Python, torch's libraries), the closest CPU analogue of CUDA's
max_memory_allocated. CUDA differs (caching allocator, cuDNN/flash kernels with their own workspaces, no CPU
autocast copies) and is NOT measured here.
"""
import argparse
import datetime
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks.bench import _CPU_SDPA, machine  # noqa: E402
from dco import add_noise, alphas_cumprod, dco_loss, sample_noise, sample_timesteps  # noqa: E402
from lora import UNET_ATTN, inject_lora, lora_modules, lora_parameters, lora_scale  # noqa: E402
from product import errors  # noqa: E402
from sample import decode as sample_decode, guided_eps  # noqa: E402
from sdxl import RANDOM_CONFIGS, load_sdxl, randomize_  # noqa: E402
from text_encoder import init_token  # noqa: E402
from train import Batch, NewTokens, train_step  # noqa: E402
from unet_loader import UNet  # noqa: E402
from vae import latent_dist_sample  # noqa: E402

GiB = 2 ** 30
BF16 = torch.bfloat16
SECTION = "## Real size"


def proc_status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def reset_peak():
    """VmHWM := VmRSS (Linux); -> the current resident set."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return proc_status("VmRSS")


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def unet_config():
    return json.loads(Path(RANDOM_CONFIGS, "unet", "config.json").read_text())


# ----------------------------------------------------------------------------------------------------------
# (r1) the main job, in a child process per setting


def main_job(resolution, checkpointing, steps):
    """train.py's main job with a learned token, phase by phase, with the resident set after each phase."""
    mem = {"process": reset_peak()}
    t0 = time.perf_counter()
    sd = load_sdxl("sdxl-random", dtype=BF16)  # the VAE stays fp32, as load_sdxl keeps SDXL's VAE
    build = time.perf_counter() - t0
    mem["build peak"] = proc_status("VmHWM")
    weights = {k: nbytes(getattr(sd, k).parameters()) for k in ("unet", "text_encoder", "text_encoder_2", "vae")}
    mem["models"] = proc_status("VmRSS")

    # cache the image's latent Gaussian, as train.py (fp32 VAE, one image at a time)
    before = reset_peak()
    image = torch.rand(1, 3, resolution, resolution) * 2 - 1
    t0 = time.perf_counter()
    with torch.no_grad():
        mean, logvar = sd.vae.encode(image)
    vae_time = time.perf_counter() - t0
    mem["vae encode above models"] = proc_status("VmHWM") - before

    # the new token in both encoders, LoRA, AdamW: as train.train
    embeds = []
    for tok, te in ((sd.tokenizer, sd.text_encoder), (sd.tokenizer_2, sd.text_encoder_2)):
        ids = [init_token(tok, te, "<x>", "x")]
        emb = te.text_model.embeddings
        emb.token_embedding = NewTokens(emb.token_embedding, ids)
        embeds.append(emb.token_embedding)
    unet = sd.unet
    inject_lora(unet, rank=32, targets=UNET_ATTN)
    for m in lora_modules(unet).values():
        m.lora_down.float(), m.lora_up.float()
    unet.gradient_checkpointing = checkpointing
    unet.train()
    amp = functools.partial(torch.autocast, "cpu", dtype=BF16)
    lora_params, ti_params = lora_parameters(unet), [e.rows for e in embeds]
    opt = torch.optim.AdamW([{"params": lora_params, "lr": 5e-5}, {"params": ti_params, "lr": 5e-6}],
                            weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with torch.no_grad(), amp():
        base = sd.encode_prompt(["a photo of x"])
    acp = alphas_cumprod(sd.scheduler)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
    g = torch.Generator().manual_seed(0)

    def step():
        x0 = latent_dist_sample(mean, logvar, g) * sd.vae.scaling_factor
        eps = sample_noise(x0, 0.0, g)
        t = sample_timesteps(1, len(acp), generator=g)
        with amp():
            cond = sd.encode_prompt(["a photo of <x>"])  # theta's prompt, re-encoded: the gradient reaches <x>
        batch = Batch(add_noise(x0, eps, t, acp), eps, t, time_ids, cond, base)
        train_step(unet, opt, scaler, [batch], functools.partial(dco_loss, beta=1000.0), amp=amp)
        for e in embeds:
            e.rescale()

    step()  # warm-up: creates AdamW's state
    trained = lora_params + ti_params
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    lora_opt = nbytes(trained) * 2 + nbytes(state)  # parameters, their gradients (during the step), AdamW state
    before = reset_peak()
    times, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append((time.process_time() - c0) / torch.get_num_threads())  # less sensitive to other jobs

    step_peak = proc_status("VmHWM")
    decode_above = decode_s = decode_peak = None
    if not checkpointing:  # train.py's samples at each checkpoint: the fp32 VAE decodes beside everything else
        before_decode = reset_peak()
        t0 = time.perf_counter()
        with torch.no_grad():
            sample_decode(sd, mean)
        decode_s, decode_peak = time.perf_counter() - t0, proc_status("VmHWM")
        decode_above = decode_peak - before_decode
    return dict(cpu_times=cpu, decode_s=decode_s, decode_above=decode_above, resolution=resolution, checkpointing=checkpointing, build_s=build, vae_encode_s=vae_time,
                times=times, weights=weights, lora_opt=lora_opt, process=mem["process"], build_peak=mem["build peak"],
                models=mem["models"], vae_encode_above=mem["vae encode above models"], before_steps=before,
                step_peak=step_peak, activations=step_peak - before - nbytes(trained),  # less the LoRA gradients
                job_peak=max(mem["build peak"], step_peak, mem["models"] + mem["vae encode above models"],
                             decode_peak or 0))


def phases_job(resolution, precision, token, steps, vae_tile=512):
    """(r4) train.py's phases as it runs them now, with gradient checkpointing: build (fp8: each Linear / Conv2d
    quantized as it is drawn), VAE-encode (tiles above vae_tile px), the token in both encoders or, without one,
    every fixed prompt encoded once and both encoders dropped, LoRA + AdamW, DCO steps, a checkpoint's sample decode
    (tiled), the LoRA save. The frozen weights are `precision` (fp8 or fp32 here) and compute in
    float8.compute_dtype_of: fp32 on a CPU without bf16 kernels, bf16 elsewhere."""
    from product import float8

    fp8 = precision == "fp8"
    dtype = float8.compute_dtype_of("cpu") if fp8 else {"fp32": torch.float32, "bf16": BF16}[precision]
    amp = functools.partial(torch.autocast, "cpu", dtype=dtype, enabled=dtype != torch.float32)
    peaks, mem = {}, {"process": reset_peak()}
    t0 = time.perf_counter()
    sd = load_sdxl("sdxl-random", dtype=dtype, fp8=fp8)
    sd.vae.tile = vae_tile
    build = time.perf_counter() - t0
    peaks["load"] = proc_status("VmHWM")
    weights = {k: nbytes(list(getattr(sd, k).parameters()) + list(getattr(sd, k).buffers()))
               for k in ("unet", "text_encoder", "text_encoder_2", "vae")}
    reset_peak()
    embeds = []
    if token:
        for tok, te in ((sd.tokenizer, sd.text_encoder), (sd.tokenizer_2, sd.text_encoder_2)):
            ids = [init_token(tok, te, "<x>", "x")]
            emb = te.text_model.embeddings
            emb.token_embedding = NewTokens(emb.token_embedding, ids)
            embeds.append(emb.token_embedding)
    with torch.no_grad(), amp():
        base = sd.encode_prompt(["a photo of x"])
    if not token:  # train.make_caches: the fixed prompts once, then no text encoder
        sd.release_text_encoders(["a photo of x"], amp)
    peaks["prompts"] = proc_status("VmHWM")
    reset_peak()  # train.make_caches: the VAE encode after the prompts (and without a token, the encoders gone)
    image = torch.rand(1, 3, resolution, resolution) * 2 - 1
    t0 = time.perf_counter()
    with torch.no_grad():
        mean, logvar = sd.vae.encode(image)
    vae_time = time.perf_counter() - t0
    peaks["encode"] = proc_status("VmHWM")
    reset_peak()
    unet = sd.unet
    inject_lora(unet, rank=32, targets=UNET_ATTN)
    for m in lora_modules(unet).values():
        m.lora_down.float(), m.lora_up.float()
    unet.gradient_checkpointing = True
    unet.train()
    lora_params, ti_params = lora_parameters(unet), [e.rows for e in embeds]
    groups = [{"params": lora_params, "lr": 5e-5}] + ([{"params": ti_params, "lr": 5e-6}] if token else [])
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    acp = alphas_cumprod(sd.scheduler)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
    g = torch.Generator().manual_seed(0)

    def step():
        x0 = latent_dist_sample(mean, logvar, g) * sd.vae.scaling_factor
        eps = sample_noise(x0, 0.0, g)
        t = sample_timesteps(1, len(acp), generator=g)
        cond = base
        if token:
            with amp():
                cond = sd.encode_prompt(["a photo of <x>"])
        batch = Batch(add_noise(x0, eps, t, acp), eps, t, time_ids, cond, base)
        train_step(unet, opt, scaler, [batch], functools.partial(dco_loss, beta=1000.0), amp=amp)
        for e in embeds:
            e.rescale()

    times = []
    for _ in range(steps + 1):  # the first creates AdamW's state: not timed (unless it is the only one)
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times = times[1:] or times
    trained = lora_params + ti_params
    state = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    peaks["steps"] = proc_status("VmHWM")
    before = reset_peak()
    t0 = time.perf_counter()
    with torch.no_grad():  # a checkpoint's sample: the decode of its latent beside everything else
        sample_decode(sd, mean)
    decode_s = time.perf_counter() - t0
    peaks["sample decode"] = proc_status("VmHWM")
    return dict(resolution=resolution, precision=precision, token=token, compute=str(dtype).split(".")[-1],
                vae_tile=vae_tile, build_s=build, vae_encode_s=vae_time, decode_s=decode_s, times=times,
                weights=weights, lora_opt=nbytes(trained) * 2 + nbytes(state), process=mem["process"],
                peaks=peaks, before_decode=before, job_peak=max(peaks.values()))


def step_flops(resolution, checkpointing):
    """FLOPs of one DCO step with the learned token, counted on the meta device (no memory, no time): phi's forward,
    theta's forward + backward (with checkpointing: the recomputed forward too), and both text encoders forward +
    backward for theta's prompt. The AdamW update is elementwise and left out."""
    from text_encoder import CLIPTextModel

    with torch.device("meta"):
        unet = UNet(unet_config()).to(BF16)
        te = [CLIPTextModel(json.loads(Path(RANDOM_CONFIGS, c, "config.json").read_text())).to(BF16)
              for c in ("text_encoder", "text_encoder_2")]
        inject_lora(unet, rank=32)
        unet.gradient_checkpointing = checkpointing
        unet.train()
        L = resolution // 8
        x, t = torch.randn(1, 4, L, L, dtype=BF16), torch.tensor([500])
        ctx, pooled, ids = torch.randn(1, 77, 2048, dtype=BF16), torch.randn(1, 1280, dtype=BF16), torch.tensor([[49406] + [320] * 5 + [49407] * 71])
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
        emb = [m.text_model.embeddings.token_embedding.weight.requires_grad_(True) for m in te]
        with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
            with torch.no_grad(), lora_scale(unet, 0.0):
                unet(x, t, ctx, pooled, time_ids)
            hidden = []
            for m in te:  # the layers by hand: CLIPTextModel's end-of-text check needs values, which meta has not
                e = m.text_model.embeddings
                h = [e.token_embedding(ids) + e.position_embedding.weight[:77]]
                for layer in m.text_model.encoder.layers:
                    h.append(layer(h[-1]))
                hidden.append(h[-2])
            pooled = te[1].text_projection(te[1].text_model.final_layer_norm(h[-1][:, -1]))
            unet(x, t, torch.cat(hidden, -1), pooled, time_ids).float().square().mean().backward()
        del emb
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------------------------------
# (r2) ours vs diffusers at real size, (r3) consistency-guided sampling step at 1024^2


def interleaved(variants, rounds):
    times = {k: [] for k in variants}
    items = list(variants.items())
    for i in range(rounds):
        for name, fn in items if i % 2 == 0 else items[::-1]:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def vs_diffusers(resolution, rounds):
    from diffusers import UNet2DConditionModel

    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        ref = UNet2DConditionModel.from_config(unet_config()).to(BF16)
        ours = UNet(unet_config()).to(BF16)
    ref = randomize_(ref.to_empty(device="cpu"), g).eval().requires_grad_(False)
    ours.to_empty(device="cpu").load_state_dict(ref.state_dict(), strict=True)
    ours.eval().requires_grad_(False)
    L = resolution // 8
    x = torch.randn(1, 4, L, L, generator=g).to(BF16)
    t = torch.tensor([500])
    ctx, pooled = torch.randn(1, 77, 2048, generator=g).to(BF16), torch.randn(1, 1280, generator=g).to(BF16)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
    run = {"ours": lambda x: ours(x, t, ctx, pooled, time_ids),
           "diffusers": lambda x: ref(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample}
    xg = x.clone().requires_grad_(True)

    def backward(name):
        xg.grad = None
        run[name](xg).float().square().mean().backward()

    with torch.no_grad():
        diff = (run["ours"](x).float() - run["diffusers"](x).float()).abs().max().item()
        fwd = interleaved({k: functools.partial(f, x) for k, f in run.items()}, rounds + 1)
    bwd = interleaved({k: functools.partial(backward, k) for k in run}, rounds + 1)
    drop = lambda ts: {k: v[1:] for k, v in ts.items()}  # the first round is the warm-up
    return dict(forward=drop(fwd), backward=drop(bwd), max_abs_diff=diff, resolution=resolution)


def guided_step(resolution, rounds):
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        unet = UNet(unet_config()).to(BF16)
    unet = randomize_(unet.to_empty(device="cpu"), g).eval().requires_grad_(False)
    inject_lora(unet, rank=32)
    for m in lora_modules(unet).values():
        m.lora_down.to(BF16), m.lora_up.to(BF16)
    L = resolution // 8
    x = torch.randn(1, 4, L, L, generator=g).to(BF16)
    t = torch.tensor(500)
    ctx, pooled = torch.randn(3, 77, 2048, generator=g).to(BF16), torch.randn(3, 1280, generator=g).to(BF16)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * 3, dtype=torch.float32)
    cfg_w, wcon = 5.0, 3.0
    ours = guided_eps(unet, (ctx, pooled, time_ids, [0.0, 0.0, 1.0]), cfg_w, wcon)

    def official():
        with lora_scale(unet, 0.0):
            e_empty, e_base = unet(x.repeat(2, 1, 1, 1), t, ctx[:2], pooled[:2], time_ids[:2]).float().chunk(2)
        with lora_scale(unet, 1.0):
            e_c = unet(x, t, ctx[2:], pooled[2:], time_ids[2:]).float()
        return e_empty + cfg_w * (e_base - e_empty) + wcon * (e_c - e_base)

    with torch.inference_mode():
        unet(x[..., :8, :8], t, ctx[:1], pooled[:1], time_ids[:1])  # a small call first: kernels, allocator, caches
        times = interleaved({"ours": lambda: ours(x, t), "official": official}, rounds)
    return dict(times=times, resolution=resolution)


# ----------------------------------------------------------------------------------------------------------
# Running the children, writing the report


def child(kind, *params):
    """Run one measurement in a fresh process; -> its json result."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, "-m", "benchmarks.real_size", "--child", kind, *map(str, params)]
    print("  running", " ".join(cmd[3:]), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def med(ts):
    return statistics.median(ts)


def fmt_s(ts):
    return f"{med(ts):.3g} s ({min(ts):.3g}-{max(ts):.3g})" if len(ts) > 1 else f"{ts[0]:.3g} s"


def gib(n):
    return f"{n / GiB:.2f}"


def report(results, args, elapsed):
    runs = results.get("runs", [])
    lines = [SECTION, "",
             f"Written by `benchmarks/real_size.py` on {datetime.date.today().isoformat()}, torch {torch.__version__}, "
             f"{args.threads} threads, each row on the machine its run names, shared with other jobs (times are wall "
             "time, with the process's CPU time beside them where recorded; they rise with the other jobs' load, "
             "memory does not). The rows come from these runs (raw numbers in docs/real_size.json):", "",
             *[f"    {r['command']}    # rows {r['rows']}, {r['date']}, {r['minutes']:.0f} min, "
               f"{r.get('machine', 'machine not recorded')}" + (f"; {r['note']}" if r.get("note") else "") for r in runs],
             "",
             "`--model sdxl-random`: SDXL base's real configs with random weights (speed and memory do not depend on "
             "the values); the UNet and text encoders in bf16, the VAE in fp32 (SDXL's VAE overflows in half "
             "precision), LoRA rank 32 on the 560 attention projections in fp32, AdamW, batch 1, CPU autocast bf16.",
             ""]
    jobs = sorted(results.get("job", []), key=lambda j: (j["resolution"], j["checkpointing"]))
    if jobs:
        w = jobs[0]["weights"]
        lines += [
            "### (r1) The main job with a learned token",
            "",
            "train.py's work, phase by phase, in a fresh process per row: build the model, VAE-encode the image "
            "(cached), the token `<x>` in both encoders, then DCO steps that re-encode theta's prompt through both "
            "text encoders (the gradient reaches the new rows) and run phi (no grad) and theta (grad) through the "
            f"UNet. Time: median (min-max) of {len(jobs[0]['times'])} step(s) after one warm-up step. Memory in GiB: peak resident "
            "set of the process; \"above the process\" subtracts what the process held before any model "
            f"existed ({gib(jobs[0]['process'])} GiB: Python and torch's libraries).",
            "",
            f"Weights (exact byte counts): UNet {gib(w['unet'])}, text encoders {gib(w['text_encoder'])} + "
            f"{gib(w['text_encoder_2'])}, VAE {gib(w['vae'])} (fp32); LoRA + token rows with their gradients and "
            f"AdamW state {gib(jobs[0]['lora_opt'])}. Built in {', '.join('%.0f' % j['build_s'] for j in jobs)} s.",
            "",
            "| resolution | grad. checkpointing | s / step | TFLOP / step | peak during steps | "
            "of which activations | VAE encode: time, peak above the models | VAE decode (samples): time, peak "
            "above everything | whole job peak | above the process |",
            "|---|---|---|---|---|---|---|---|---|---|"]
        for j in jobs:
            dec = "" if j.get("decode_s") is None else f"{j['decode_s']:.0f} s, {gib(j['decode_above'])}"
            lines.append(
                f"| {j['resolution']}^2 | {'on' if j['checkpointing'] else 'off'} | {fmt_s(j['times'])}"
                + (f" (CPU time / threads {fmt_s(j['cpu_times'])})" if j.get("cpu_times") else "") + " | "
                f"{j['flops'] / 1e12:.1f} | {gib(j['step_peak'])} | {gib(j['activations'])} | "
                f"{j['vae_encode_s']:.0f} s, {gib(j['vae_encode_above'])} | {dec} | {gib(j['job_peak'])} | "
                f"{gib(j['job_peak'] - j['process'])} |")
        lines += ["", "\"of which activations\": the peak during the steps minus the resident set just before them "
                      "(models, LoRA, AdamW state), less the LoRA gradients (counted with the LoRA + optimizer state). "
                      "\"whole job peak\": the largest of the build, the VAE encode with every model resident (as "
                      "train.py does it today), the steps and (in the rows without checkpointing) the decode of a sample, "
                      "which train.py runs at every checkpoint beside the models, LoRA and AdamW state.", ""]
    phases = sorted(results.get("phases", []), key=lambda j: (j["resolution"], j["precision"], -j["token"]))
    if phases:
        lines += [
            "### (r4) The whole job as train.py runs it now: fp8 frozen weights, the phases",
            "",
            "`--gradient-checkpointing`, `--vae-tile 512` (the default), batch 1, in a fresh process per row: build "
            "(fp8: each Linear / Conv2d quantized as it is drawn), the VAE encode, the learned token `<x>` in both "
            "encoders (token: yes) or every fixed prompt encoded once and both encoders dropped (token: no), LoRA "
            "rank 32 + AdamW, DCO steps, a checkpoint's sample decode (tiled) beside everything else. Peak resident "
            "set above the process (GiB) per phase; the job's peak is the largest. **Compute dtype: as the row "
            "says.** This CPU has no bf16 kernels (a bf16 matmul is ~400x slower than fp32), so fp8 weights "
            "dequantise to fp32 here and the activations are fp32, twice a GPU's bf16 ones: these peaks are upper "
            "bounds of what the same flags take on a GPU in bf16.",
            "",
            "| resolution | frozen weights | token | compute | weights: UNet, text encoders, VAE | LoRA + AdamW | "
            "load | encode | steps | sample decode | whole job | s / step |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for j in phases:
            w, pk, base = j["weights"], j["peaks"], j["process"]
            lines.append(
                f"| {j['resolution']}^2 | {j['precision']} | {'yes' if j['token'] else 'no'} | {j['compute']} | "
                f"{gib(w['unet'])}, {gib(w['text_encoder'] + w['text_encoder_2'])}, {gib(w['vae'])} | "
                f"{gib(j['lora_opt'])} | " + " | ".join(gib(pk[k] - base) if k in pk else "" for k in (
                    "load", "encode", "steps", "sample decode"))
                + f" | **{gib(j['job_peak'] - base)}** | {fmt_s(j['times'])} |")
        lines += ["", "The text encoders' weights count the token tables, which stay in the compute dtype (fp32 "
                      "here: 0.38 GiB of the two; 0.19 in bf16).", ""]
    if "diffusers" in results:
        r = results["diffusers"]
        lines += ["### (r2) Ours vs diffusers' UNet2DConditionModel at real size", "",
                  f"The same random bf16 weights (diffusers' state dict loaded strictly into ours), "
                  f"{r['resolution']}^2 (32^2 latents), batch 1, {len(r['forward']['ours'])} interleaved rounds after "
                  f"one warm-up round; max abs difference of the outputs {r['max_abs_diff']:.3g}. Ratio: median of "
                  "the per-round ratios (target <= 1.00).", "",
                  "| measurement | ours | diffusers | ratio |", "|---|---|---|---|"]
        for key, what in (("forward", "UNet forward"), ("backward", "forward + backward to the input")):
            o, d = r[key]["ours"], r[key]["diffusers"]
            lines.append(f"| {what} | {fmt_s(o)} | {fmt_s(d)} | {med([a / b for a, b in zip(o, d)]):.2f} |")
        lines.append("")
    if "guided" in results:
        r = results["guided"]
        o, d = r["times"]["ours"], r["times"]["official"]
        lines += ["### (r3) A consistency-guided sampling step at 1024^2", "",
                  f"w_cfg 5, w_con 3, LoRA rank 32 in bf16: `sample.guided_eps`'s one batch-3 call vs the official "
                  f"code's two calls (phi's two rows with the LoRA off, then theta's), {len(o)} interleaved rounds "
                  "after one small warm-up call. The row measured at medium size by bench.py (c) is 0.89.", "",
                  "| one batch-3 call | two calls (2 + 1) | ratio |", "|---|---|---|",
                  f"| {fmt_s(o)} | {fmt_s(d)} | {med([a / b for a, b in zip(o, d)]):.2f} |", ""]
    lines += ["### What differs on CUDA (not measured here)", "",
              "No GPU was available for these rows; nothing here is a CUDA number. On CUDA, train.py's peak is "
              "`torch.cuda.max_memory_allocated`, which counts live tensors only: not the CUDA context (about 0.5 "
              "GiB on the card) nor the caching allocator's reserve above the live tensors; Python and torch's "
              "libraries (\"the process\" above) live in host memory. The kernels differ too: flash / "
              "memory-efficient attention keeps no attention matrix for the backward, cuDNN convolutions have their "
              "own workspaces, and the VAE is moved off the GPU once the latents are cached (train.py's "
              "`sd.vae.to(\"cpu\")`), while the UNet steps off it during the VAE encode and a sample's decode "
              "(no-ops on a CPU, so the phases above keep the UNet resident). `python -m benchmarks.bench` row (e) measures the UNet step on CUDA; "
              "`python -m benchmarks.real_size --device cuda` is not implemented yet.", ""]
    return "\n".join(lines) + "\n"


def write_section(path, text):
    """Replace the "## Real size" section of the markdown file (to the next "## " heading or the end), or append it."""
    old = Path(path).read_text() if Path(path).exists() else "# Benchmarks\n"
    start = old.find(SECTION + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text + (old[end + 1:] if end >= 0 else "")
    Path(path).write_text(new)


def main(argv=None):
    p = argparse.ArgumentParser(description="The main job at SDXL's real size (sdxl-random), measured on this machine.")
    p.add_argument("--model", default="sdxl-random", choices=["sdxl-random"], help="the model measured")
    p.add_argument("--resolutions", type=int, nargs="+", default=[1024, 512], help="row (r1)")
    p.add_argument("--steps", type=int, default=2, help="rows (r1), (r4): measured steps after one warm-up step "
                   "((r4) with 0: the warm-up step alone, timed: its peak includes AdamW's new state)")
    p.add_argument("--rounds", type=int, default=4, help="row (r2): measured rounds after a warm-up round")
    p.add_argument("--cg-rounds", type=int, default=2, help="row (r3): rounds (each 1024^2 call takes minutes here)")
    p.add_argument("--precisions", nargs="+", default=["fp8"], choices=["fp8", "fp32", "bf16"],
                   help="row (r4): the frozen weights' precision (bf16 computes in bf16: hours on a CPU without bf16)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 0], choices=[1, 0],
                   help="row (r4): with a learned token (1), without (0)")
    p.add_argument("--rows", nargs="*", default=["r1", "r2", "r3"], choices=["r1", "r2", "r3", "r4"],
                   help="rows to measure (none: rewrite the section from --json)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
    p.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--json", default=str(ROOT / "docs" / "real_size.json"), help="the raw measurements")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = errors.parse_flags(p, argv, {"resolutions": ">= 8", "steps": ">= 0", "rounds": ">= 1", "cg_rounds": ">= 1",
                                        "tokens": ">= 0",
                                        "threads": ">= 1"})
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as train.main: a saturated DCO loss makes denormal gradients, slow on CPUs
    if args.child:
        kind, *params = args.child
        if kind == "job":
            out = main_job(int(params[0]), params[1] == "1", int(params[2]))
        elif kind == "phases":
            out = phases_job(int(params[0]), params[1], params[2] == "1", int(params[3]))
        elif kind == "diffusers":
            out = vs_diffusers(int(params[0]), int(params[1]))
        else:
            out = guided_step(int(params[0]), int(params[1]))
        print(json.dumps(out))
        return
    start = time.perf_counter()
    results = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
    if args.rows:  # which run measured which rows: a row measured again replaces the older run's
        results["runs"] = [r for r in results.get("runs", []) if set(r["rows"].split(", ")) - set(args.rows)
                           or r["rows"] == "r4" and "r4" in args.rows] + [  # (r4) rows come from several runs
            dict(command=" ".join(["python -m benchmarks.real_size", *(argv if argv is not None else sys.argv[1:])]),
                 rows=", ".join(args.rows), date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), minutes=0,
                 machine=machine(torch.device("cpu")))]
    if "r1" in args.rows:
        results["job"] = [j for j in results.get("job", []) if j["resolution"] not in args.resolutions]
        for res in args.resolutions:
            for ckpt in (0, 1):
                r = child("job", res, ckpt, args.steps)
                key = f"{res}-{ckpt}"  # counted on the meta device, once: it depends on the shapes only
                results.setdefault("flops", {})[key] = results.get("flops", {}).get(key) or step_flops(res, bool(ckpt))
                r["flops"] = results["flops"][key]
                results["job"].append(r)
                print(f"  {res}^2 checkpointing {ckpt}: {fmt_s(r['times'])}/step, peak {gib(r['job_peak'])} GiB",
                      flush=True)
                Path(args.json).write_text(json.dumps(results, indent=1))
    if "r4" in args.rows:
        keep = lambda j: (j["resolution"] not in args.resolutions or j["precision"] not in args.precisions  # noqa: E731
                          or j["token"] not in args.tokens)
        results["phases"] = [j for j in results.get("phases", []) if keep(j)]
        for res in args.resolutions:
            for precision in args.precisions:
                for token in args.tokens:
                    r = child("phases", res, precision, token, args.steps)
                    results["phases"].append(r)
                    print(f"  {res}^2 {precision} token {token}: {fmt_s(r['times'])}/step, peak "
                          f"{gib(r['job_peak'] - r['process'])} GiB above the process", flush=True)
                    Path(args.json).write_text(json.dumps(results, indent=1))
    if "r2" in args.rows:
        results["diffusers"] = child("diffusers", 256, args.rounds)
        Path(args.json).write_text(json.dumps(results, indent=1))
    if "r3" in args.rows:
        results["guided"] = child("guided", 1024, args.cg_rounds)
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.rows:
        results["runs"][-1]["minutes"] = (time.perf_counter() - start) / 60
        Path(args.json).write_text(json.dumps(results, indent=1))
    text = report(results, args, time.perf_counter() - start)
    print(text)
    write_section(args.output, text)
    print(f"wrote the real-size section of {args.output}")


if __name__ == "__main__":
    main()
