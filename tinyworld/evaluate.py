"""How well does the tiny base model obey its prompts? Per-attribute accuracy of its samples, measured by metrics.py.

    python -m tinyworld.evaluate                      # -> docs/tinyworld_base.md, docs/tinyworld_base_samples.png

Sampling is sample.py's, unchanged (Euler on SDXL's schedule, classifier-free guidance with SDXL's zero "no
prompt" embeddings, micro-conditioning 32x32): what the DCO experiments use. The prompts are random scenes of the
world (without jitter: a prompt states no jitter), one image each; the accuracy of attribute A is the share of
images in which metrics.parse reads back the value the prompt asked for. Chance levels: background 1/6, colour
1/5 (never the background's), kind 1/4, position 1/5, size 1/2.
"""
import argparse
import os
import time

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from product import errors
from sample import decode, generate_latents, make_grid

from . import metrics, world
from .model import MODEL_DIR, load

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
CHANCE = {"bg": 1 / 6, "color": 1 / 5, "kind": 1 / 4, "position": 1 / 5, "size": 1 / 2}


@torch.no_grad()
def sample_images(sd, prompts, steps=20, cfg=4.0, seed=0, sampler="euler", batch_size=64, wcon=0.0,
                  base_prompts=None):
    """uint8 [N, 32, 32, 3] samples, one per prompt; batch b uses seed + b (so results depend on batch_size)."""
    out = []
    for b in range(0, len(prompts), batch_size):
        latents = generate_latents(sd, prompts[b : b + batch_size], base_prompts=None if base_prompts is None else
                                   base_prompts[b : b + batch_size], height=world.SIZE, width=world.SIZE,
                                   steps=steps, cfg=cfg, wcon=wcon, sampler=sampler, seed=seed + b // batch_size,
                                   progress=False)
        out.append((decode(sd, latents).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy())
    return np.concatenate(out)


def model_table(sd, folder):
    """Markdown rows: parameters and file size of each component, and the command stored in the weights."""
    rows, total = [], [0, 0]
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        n = sum(p.numel() for p in getattr(sd, comp).parameters())
        size = sum(os.path.getsize(os.path.join(folder, comp, f)) for f in os.listdir(os.path.join(folder, comp)))
        rows.append(f"| {comp} | {n:,} | {size / 2 ** 20:.2f} MiB |")
        total = [total[0] + n, total[1] + size]
    rows.append(f"| **total** (fp32 safetensors) | {total[0]:,} | {total[1] / 2 ** 20:.2f} MiB |")
    with safe_open(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"), "pt") as f:
        meta = f.metadata() or {}
    return rows, meta


def eval_scenes(n, seed=0):
    return [world.random_scene(np.random.default_rng([seed, i]), jitter=False) for i in range(n)]


def accuracy(images, scenes):
    """{attribute: accuracy, "overall": mean over attributes, "all": share of images with every attribute right}."""
    return metrics.mean_scores([metrics.prompt_fidelity(img, s) for img, s in zip(images, scenes)])


def per_value(images, scenes, attr):
    """{value: accuracy of `attr` over the images whose prompt asked for that value}."""
    rows = {}
    for img, s in zip(images, scenes):
        rows.setdefault(getattr(s, attr), []).append(metrics.prompt_fidelity(img, s)[attr])
    return {v: float(np.mean(r)) for v, r in sorted(rows.items())}


def concept_fidelity(image, name):
    return metrics.subject_fidelity(image, name)["overall"] if name in world.SUBJECTS else metrics.style_fidelity(image, name)


@torch.no_grad()
def concept_baselines(sd, n, steps, cfg, seed):
    """Per new concept: its fidelity on the exact reference drawings, on their VAE reconstructions (the most a
    model generating through this VAE can reach), and on base-model samples of n base prompts (the concept's
    token replaced by its init word: the score before any training)."""
    rows = {}
    for name in [*world.SUBJECTS, *world.STYLES]:
        refs = np.stack([world.render(s) for s in world.reference_scenes(name)])
        x = torch.from_numpy(refs).permute(0, 3, 1, 2).float() / 127.5 - 1
        rec = ((sd.vae.decode(sd.vae.encode(x)[0]).clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        scenes = [world.concept_scene(name, np.random.default_rng([seed, i]), jitter=False) for i in range(n)]
        base = sample_images(sd, [world.base_caption(s) for s in scenes], steps, cfg, seed)
        rows[name] = [np.mean([concept_fidelity(im, name) for im in ims]) for ims in (refs, rec, base)]
    return rows


def upscale(img, k=4):
    return Image.fromarray(np.asarray(img)).resize((img.shape[1] * k, img.shape[0] * k), Image.NEAREST)


def sweep_grid(sd, steps, cfg, seed):
    """One row per attribute, that attribute swept while the others stay fixed (2 seeds side by side)."""
    base = dict(bg="white", color="red", kind="circle", position="center", size="big")
    sweeps = [("bg", [c for c in world.COLORS if c != "red"]), ("color", [c for c in world.COLORS if c != "white"]),
              ("kind", list(world.KINDS)), ("position", list(world.POSITIONS)), ("size", list(world.SIZES))]
    rows, labels = [], []
    for attr, values in sweeps:
        scenes = [world.make_scene(**{**base, attr: v}) for v in values]
        prompts = [world.caption(s) for s in scenes for _ in range(2)]
        images = sample_images(sd, prompts, steps, cfg, seed)
        rows.append([upscale(im) for im in images])
        labels.append(attr)
    return rows, labels


NOTES = """* Image 32x32; VAE downsampling factor 2 (`2 ** (len(block_out_channels) - 1)`, not SDXL's 8): latents
  [4, 16, 16]; UNet levels 16x16 (resnets), 8x8 and 4x4 (cross-attention), like SDXL's 128/64/32. Text: two CLIP
  towers, 64 wide, 32 tokens; a 596-token BPE vocabulary learned on the world's 25 words.
* Why a VAE and not pixel space: train.py and sample.py go through `sd.vae` and its scaling factor exactly as for
  SDXL, so the experiments test the real code path; a factor of 2 keeps the subjects' checks and stripes and the
  1.5-pixel outline (a factor-4 VAE blurred them).
* New concepts (reference images in `tinyworld/concepts/<name>/`, kohya layout): subjects `<checker>` (class word
  circle, init word `yellow`) and `<striped>` (square, `blue`); styles `<pastel>` and `<outline>` (init word
  `flat`: every base caption ends in "flat style").
* These weights are a clean run of `python -m tinyworld.pretrain` (new --work folder; --output/--work change no
  weight) on this repo's 2-core machine, otherwise idle, on 2026-12-01: 25.5 min in all (VAE 2.7 min for 1,500
  steps at 0.11 s; UNet + text encoders 3,000 steps of 32 at ~0.45 s), 1 thread. The run is deterministic: two
  clean runs of a shortened recipe gave bit-identical weights. (The model shipped before, most likely made in a work
  folder that kept its VAE and encoded data set from earlier runs, could not be reproduced this way: it placed objects
  better, position 100% vs 66% here, mostly at the corners.) Loading: ~2 s.
* Sampling: CFG 2-4 is best here (7, sample.py's SDXL default, starts to cost kind and size accuracy); 10 Euler
  steps are as good as 30."""


def main(argv=None):
    p = argparse.ArgumentParser(description="Measure the tiny base model's prompt control.")
    p.add_argument("--model", default=MODEL_DIR)
    p.add_argument("--n", type=int, default=300, help="random prompts (one sample each) for the main table")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--sweep-cfg", default="1,2,4,7", help="guidance weights compared on --sweep-n prompts")
    p.add_argument("--sweep-n", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=os.path.join(DOCS, "tinyworld_base.md"))
    args = errors.parse_flags(p, argv, {"n": ">= 1", "steps": ">= 1", "cfg": ">= 0", "sweep_n": ">= 1", "seed": "seed",
                                        "threads": ">= 1"})
    torch.set_num_threads(args.threads)
    t0 = time.time()
    sd = load(args.model)
    load_s = time.time() - t0
    scenes = eval_scenes(args.n, args.seed)
    prompts = [world.caption(s) for s in scenes]

    truth = accuracy([world.render(s) for s in scenes], scenes)  # the metric on the exact drawings
    t1 = time.time()
    images = sample_images(sd, prompts, args.steps, args.cfg, args.seed)
    sample_s = (time.time() - t1) / len(prompts)
    acc = accuracy(images, scenes)
    sweep = {}
    for cfg in [float(c) for c in args.sweep_cfg.split(",") if c]:
        sub = images[: args.sweep_n] if cfg == args.cfg else sample_images(sd, prompts[: args.sweep_n], args.steps, cfg, args.seed)
        sweep[cfg] = accuracy(sub, scenes[: args.sweep_n])
    steps_sweep = {s: accuracy(sample_images(sd, prompts[: args.sweep_n], s, args.cfg, args.seed), scenes[: args.sweep_n])
                   for s in (10, 30) if s != args.steps}
    steps_sweep[args.steps] = accuracy(images[: args.sweep_n], scenes[: args.sweep_n])

    baselines = concept_baselines(sd, 24, args.steps, args.cfg, args.seed)
    rows, labels = sweep_grid(sd, args.steps, args.cfg, args.seed)
    rand = [upscale(im) for im in images[:12]]
    grid = make_grid(rows + [rand], labels + ["random"])
    png = os.path.splitext(args.output)[0] + "_samples.png"
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    grid.save(png)

    table, meta = model_table(sd, args.model)
    attrs = list(metrics.PROMPT_ATTRIBUTES)
    fmt = lambda d: " | ".join(f"{100 * d[a]:.0f}%" for a in attrs + ["overall", "all"])  # noqa: E731
    lines = [
        "# The tiny base model: prompt control",
        "",
        f"Model `{os.path.relpath(args.model, os.path.dirname(DOCS))}` (made by `python -m tinyworld.pretrain`), "
        f"sampled with sample.py: Euler, {args.steps} steps, CFG {args.cfg:g}, 32x32, seed {args.seed}; "
        f"{args.n} random prompts of the world, one sample each; read back by `tinyworld/metrics.py`. "
        f"Command: `python -m tinyworld.evaluate` ({load_s:.1f} s to load the model, {sample_s:.2f} s per sample "
        f"on {args.threads} CPU thread(s)).",
        "",
        "| | " + " | ".join(attrs) + " | overall | all five |",
        "|---|" + "---|" * (len(attrs) + 2),
        f"| **base model samples** | {fmt(acc)} |",
        f"| the exact drawings (metric check) | {fmt(truth)} |",
        "| chance | " + " | ".join(f"{100 * CHANCE[a]:.0f}%" for a in attrs) + " | | |",
        "",
        "Per value (accuracy of that attribute when the prompt asks for the value):",
        "",
    ]
    for a in attrs:
        lines.append(f"* {a}: " + ", ".join(f"{v} {100 * x:.0f}%" for v, x in per_value(images, scenes, a).items()))
    lines += ["", f"Guidance weight (first {args.sweep_n} prompts, {args.steps} steps):", "",
              "| CFG | " + " | ".join(attrs) + " | overall | all five |", "|---|" + "---|" * (len(attrs) + 2)]
    lines += [f"| {c:g} | {fmt(d)} |" for c, d in sweep.items()]
    lines += ["", f"Sampler steps (first {args.sweep_n} prompts, CFG {args.cfg:g}):", "",
              "| steps | " + " | ".join(attrs) + " | overall | all five |", "|---|" + "---|" * (len(attrs) + 2)]
    lines += [f"| {s} | {fmt(d)} |" for s, d in sorted(steps_sweep.items())]
    lines += ["", "## The new concepts before training", "",
              "Subject fidelity (subjects) or style fidelity (styles) of `tinyworld/metrics.py`, mean over the 5 "
              "reference images, over their VAE reconstructions (the ceiling for anything generated through this "
              "VAE: the small <checker>'s 2-pixel cells do not survive it), and over 24 base-model samples of base "
              "prompts (token -> init word, e.g. \"a big yellow circle ...\"): the score before any training.", "",
              "| concept | token | init word | references | VAE reconstructions | base model |", "|---|---|---|---|---|---|"]
    lines += [f"| {n} | `{world.concept(n).token}` | {world.concept(n).init_word} | {r[0]:.2f} | {r[1]:.2f} | {r[2]:.2f} |"
              for n, r in baselines.items()]
    lines += ["", "## The model", "", "| component | parameters | weights |", "|---|---|---|", *table, "",
              f"Made by `{meta.get('command', '?').strip()}` (seed {meta.get('seed', '?')}; all settings: "
              f"`{meta.get('pretrain_args', '?')}`).", "", NOTES,
              "", "## Samples", "", f"![samples]({os.path.basename(png)})", "",
              f"`{os.path.basename(png)}`: each row sweeps one attribute of \"a big red circle at the center on a white "
              "background, flat style\", two samples per value: bg green, blue, yellow, purple, white; color red, "
              "green, blue, yellow, purple; kind circle, square, triangle, cross; position top left, top right, bottom "
              "left, bottom right, center; size small, big. The last row: the first 12 random prompts of the table."]
    with open(args.output, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.output} and {png}")


if __name__ == "__main__":
    main()
