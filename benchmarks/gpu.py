"""The one-shot GPU check:  python -m benchmarks.gpu   (one CUDA GPU, <= 8 minutes; writes docs/benchmarks.md "## GPU")

For the day a GPU is lent: every number the CPU cannot give, in one command, printed as a table and written as the
"## GPU" section of docs/benchmarks.md (the other sections are kept).
    (g1) the real-size DCO step (sdxl-random, the learned token <x>, LoRA rank 32, AdamW, batch 1) at 1024^2 with
         the frozen weights in bf16 and in fp8, gradient checkpointing off and on: s / step, and the peaks
         torch.cuda.max_memory_allocated (live tensors) and max_memory_reserved (what the caching allocator holds);
    (g2) a 30-step consistency-guided sample at 1024^2 (w_cfg 5, w_con 3), bf16: seconds and peaks;
    (g3) ours vs diffusers' UNet2DConditionModel on the device, the same bf16 weights, forward at 1024^2;
    (g4) torchrun with 2 ranks (NCCL) when there are 2 GPUs: 3 train.py steps.
`--device cpu` runs the same code at the tiny model's size (32^2, `--model tiny`): what tests/test_gpu_script.py
runs, so the script cannot rot between GPUs.
"""
import argparse
import datetime
import functools
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from dco import add_noise, alphas_cumprod, dco_loss, sample_noise, sample_timesteps  # noqa: E402
from lora import UNET_ATTN, inject_lora, lora_modules, lora_parameters  # noqa: E402
from product import errors, float8  # noqa: E402
from sample import generate_latents  # noqa: E402
from sdxl import load_sdxl  # noqa: E402
from text_encoder import init_token  # noqa: E402
from train import Batch, NewTokens, train_step  # noqa: E402

SECTION = "## GPU"
GiB = 2 ** 30


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peaks(device):
    """(max_memory_allocated, max_memory_reserved) in GiB; None on a CPU (no allocator statistics)."""
    if device.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated(device) / GiB, torch.cuda.max_memory_reserved(device) / GiB


def timed(fn, device, n):
    """Median seconds of n calls after one warm-up call."""
    fn()
    times = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def load(args, device, precision):
    dtype = torch.bfloat16 if device.type == "cuda" else float8.compute_dtype_of(device)
    return load_sdxl(args.model, device=device, dtype=dtype, fp8=precision == "fp8"), dtype


def dco_steps(args, device, precision):
    """(g1): one model per precision, the step timed with checkpointing off and on."""
    reset(device)
    sd, dtype = load(args, device, precision)
    amp = functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype != torch.float32)
    embeds = []
    for tok, te in ((sd.tokenizer, sd.text_encoder), (sd.tokenizer_2, sd.text_encoder_2)):
        ids = [init_token(tok, te, "<x>", "x", any_word=True)]  # grows the table first
        emb = te.text_model.embeddings
        emb.token_embedding = NewTokens(emb.token_embedding, ids)
        embeds.append(emb.token_embedding)
    inject_lora(sd.unet, rank=32, targets=UNET_ATTN)
    for m in lora_modules(sd.unet).values():
        m.lora_down.float(), m.lora_up.float()
    sd.unet.train()
    opt = torch.optim.AdamW([{"params": lora_parameters(sd.unet), "lr": 5e-5},
                             {"params": [e.rows for e in embeds], "lr": 5e-6}], weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    with torch.no_grad(), amp():
        base = sd.encode_prompt(["a photo of x"])
    acp, R = alphas_cumprod(sd.scheduler).to(device), args.resolution
    g, f = torch.Generator().manual_seed(0), sd.vae.factor
    x0 = torch.randn(1, sd.unet.conv_in.in_channels, R // f, R // f, generator=g).to(device)
    time_ids = torch.tensor([[R, R, 0, 0, R, R]], dtype=torch.float32, device=device)

    def step():
        eps = sample_noise(x0, 0.0, g)
        t = sample_timesteps(1, len(acp), generator=g).to(device)
        with amp():
            cond = sd.encode_prompt(["a photo of <x>"])
        train_step(sd.unet, opt, scaler, [Batch(add_noise(x0, eps, t, acp), eps, t, time_ids, cond, base)],
                   functools.partial(dco_loss, beta=1000.0), amp=amp)

    rows = []
    for checkpointing in (False, True):
        sd.unet.gradient_checkpointing = checkpointing
        reset(device)
        s = timed(step, device, args.steps)
        frozen = "fp8" if precision == "fp8" else str(dtype).split(".")[-1]  # on a CPU without bf16: fp32
        rows.append(dict(row="g1", precision=frozen, checkpointing=checkpointing, s=s, peaks=peaks(device)))
    return rows, sd


def guided_sample(args, device, sd):
    """(g2): 30 Euler steps of consistency guidance with the model (+ its trained-for-a-few-steps LoRA) of (g1)."""
    sd.unet.eval()
    reset(device)
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        generate_latents(sd, ["a photo of <x>"], base_prompts=["a photo of x"], height=args.resolution,
                         width=args.resolution, steps=args.sample_steps, cfg=5.0, wcon=3.0, progress=False)
    sync(device)
    return dict(row="g2", s=time.perf_counter() - t0, steps=args.sample_steps, peaks=peaks(device))


def vs_diffusers(args, device):
    """(g3): the same random weights in ours and in diffusers' UNet, forward at the resolution, bf16 on CUDA."""
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        return dict(row="g3", skipped="diffusers is not installed (pip install -r requirements-dev.txt)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sd = load_sdxl(args.model, device=device, dtype=dtype)
    ours = sd.unet
    ref = UNet2DConditionModel.from_config(ours.config).to(device, dtype).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    c = ref.config
    R, g = args.resolution, torch.Generator().manual_seed(0)
    x = torch.randn(1, c.in_channels, R // sd.vae.factor, R // sd.vae.factor, generator=g).to(device, dtype)
    t = torch.tensor([500], device=device)
    ctx = torch.randn(1, 77, c.cross_attention_dim, generator=g).to(device, dtype)
    pooled = torch.randn(1, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim,
                         generator=g).to(device, dtype)
    time_ids = torch.tensor([[R, R, 0, 0, R, R]], dtype=torch.float32, device=device)
    run_ours = lambda: ours(x, t, ctx, pooled, time_ids)  # noqa: E731
    run_ref = lambda: ref(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample  # noqa: E731
    with torch.inference_mode():
        a, b = run_ours().float(), run_ref().float()
        s_ours, s_ref = timed(run_ours, device, args.steps), timed(run_ref, device, args.steps)
    return dict(row="g3", ours=s_ours, diffusers=s_ref, ratio=s_ours / s_ref, rel_diff=((a - b).norm() / b.norm()).item())


def torchrun_two_ranks(args, device, tmp):
    """(g4): 3 train.py steps under torchrun --nproc_per_node 2 (NCCL), when the machine has 2 GPUs."""
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return dict(row="g4", skipped=f"{torch.cuda.device_count() if device.type == 'cuda' else 0} GPU(s): needs 2")
    from PIL import Image
    images = Path(tmp, "dog")
    images.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (args.resolution, args.resolution), (120, 80, 40)).save(images / "0.png")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "train.py"),
           "--images", str(images), "--model", args.model, "--steps", "3", "--sample-steps", "0",
           "--checkpoint-every", "0", "--gradient-checkpointing", "--resolution", str(args.resolution),
           "--output", str(Path(tmp, "ddp"))]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
    return dict(row="g4", s=time.perf_counter() - t0, ok=p.returncode == 0, tail=p.stderr[-300:])


def fmt_peaks(p):
    a, r = p
    return "n/a (CPU)" if a is None else f"{a:.2f} / {r:.2f}"


def report(rows, args, device, minutes):
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (the script's test path)"
    lines = [SECTION, "", f"Written by `python -m benchmarks.gpu {' '.join(args.argv)}` on "
             f"{datetime.date.today().isoformat()}: {what}, torch {torch.__version__}, model {args.model} at "
             f"{args.resolution}^2, {minutes:.1f} min. Peaks in GiB: max_memory_allocated / max_memory_reserved.", "",
             "| row | what | s | peaks |", "|---|---|---|---|"]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['row']} | skipped: {r['skipped']} | | |")
        elif r["row"] == "g1":
            lines.append(f"| g1 | DCO step with a token, frozen weights {r['precision']}, gradient checkpointing "
                         f"{'on' if r['checkpointing'] else 'off'} | {r['s']:.3g} | {fmt_peaks(r['peaks'])} |")
        elif r["row"] == "g2":
            lines.append(f"| g2 | {r['steps']}-step consistency-guided sample (w_cfg 5, w_con 3), fp8 weights | "
                         f"{r['s']:.3g} | {fmt_peaks(r['peaks'])} |")
        elif r["row"] == "g3":
            lines.append(f"| g3 | UNet forward, ours / diffusers = {r['ratio']:.2f} (outputs differ by "
                         f"{r['rel_diff']:.1e} relative) | {r['ours']:.3g} / {r['diffusers']:.3g} | |")
        else:
            lines.append(f"| g4 | torchrun 2 ranks (NCCL), 3 train.py steps: {'ok' if r['ok'] else 'FAILED'} | "
                         f"{r['s']:.3g} | |")
    return "\n".join(lines) + "\n"


def write_section(path, text):
    old = Path(path).read_text() if Path(path).exists() else "# Benchmarks\n"
    start = old.find(SECTION + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text + (old[end + 1:] if end >= 0 else "")
    Path(path).write_text(new)


def main(argv=None):
    p = argparse.ArgumentParser(description="The one-shot GPU check (<= 8 minutes on one CUDA GPU).")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", help="default: sdxl-random on CUDA, tiny on a CPU (the test path)")
    p.add_argument("--resolution", type=int, help="default: 1024 on CUDA, 32 on a CPU")
    p.add_argument("--steps", type=int, default=3, help="timed calls per row, after one warm-up")
    p.add_argument("--sample-steps", type=int, default=30)
    p.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--work", default=str(ROOT / "output" / "gpu-check"), help="folder for the torchrun run")
    args = errors.parse_flags(p, argv, {"resolution": ">= 8", "steps": ">= 1", "sample_steps": ">= 1"})
    args.argv = list(argv if argv is not None else sys.argv[1:])
    device = torch.device(args.device)
    args.model = args.model or ("sdxl-random" if device.type == "cuda" else "tiny")
    args.resolution = args.resolution or (1024 if device.type == "cuda" else 32)
    start, rows = time.perf_counter(), []
    for precision in ("bf16", "fp8"):
        step_rows, sd = dco_steps(args, device, precision)
        rows += step_rows
        print(*(f"{r['precision']} checkpointing {r['checkpointing']}: {r['s']:.3g} s, {fmt_peaks(r['peaks'])}"
                for r in step_rows), sep="\n", flush=True)
        if precision == "fp8":
            rows.append(guided_sample(args, device, sd))
        del sd
    rows.append(vs_diffusers(args, device))
    rows.append(torchrun_two_ranks(args, device, args.work))
    text = report(rows, args, device, (time.perf_counter() - start) / 60)
    print(text)
    write_section(args.output, text)
    print(f"wrote the GPU section of {args.output}")
    return rows


if __name__ == "__main__":
    main()
