"""The paper's experiments in the tiny world, on a CPU:  python -m tinyworld.experiments

Lee, Kwak, Sohn, Shin, "Direct Consistency Optimization for Robust Customization of Text-to-Image Diffusion
Models" (NeurIPS 2024, arXiv 2402.12004), Sec. 5, at toy scale, with the repo's own train.py, sample.py and
merge.py on the tiny SDXL (tinyworld/model) and the exact pixel metrics of tinyworld/metrics.py:

1. Customisation (paper Fig. 4/5). For every concept (subjects <checker>, <striped>; styles <pastel>, <outline>)
   and every seed, train a LoRA (+ the concept's token) on its 5 reference images with comprehensive captions
   using DreamBooth (`--loss db`), DreamBooth + prior preservation (`db-prior`), DCO (`dco`, a beta sweep) and
   the follow-up, DCO with the reward relative to phi's error (`dco-rel`, train.py --relative-reward, a beta sweep).
   Sample each on new prompts (random contexts: other backgrounds, positions, sizes; for styles other colours and
   shapes) over a consistency-guidance sweep (w_con; 0 = plain CFG sampling with the LoRA) and score every image:
   concept fidelity (subject_fidelity / style_fidelity ~ the paper's DINO score) against prompt fidelity (the share
   of the prompt's attributes the image shows ~ its SigLIP score). The Pareto plot puts one against the other.
2. Merging (paper Fig. 7 and its table). Add a subject LoRA and a style LoRA, trained separately (merge.merge, exact
   sum), for DB, DCO and dco-rel, and merge the DB pair by ZipLoRA too (merge.merge method="ziplora", timed next to
   training its LoRAs); sample "a <subject> ... , <style> style": subject, style and prompt fidelity.
3. Interference (merge.interference, [3/5]): mean |cos| between the two LoRAs' weight updates, layer by layer,
   and the size of each update ||dW||_F, for the DB pair and the DCO pair.

4. Where DCO stops learning: from train.py's per-sample log, the share of the DreamBooth gradient DCO has left,
   2 sigmoid(-beta r), by timestep.

Every run appends its rows to the CSVs as soon as it finishes (a killed run leaves usable partial results); at the
end the plots and the tables (docs/tinyworld_results.md) are made from the CSVs. `--report` remakes them from
existing CSVs without training; `--append` adds to them and skips every run and merge they already hold (a restart,
or a subset such as `--methods dco-rel --rel-betas 0.3`). One run (train 300 steps + sample 24 prompts x 3 w_con +
score) takes ~30 s on one idle CPU core: the defaults (4 concepts x 3 seeds x 8 methods + 30 merges) ~60 min on one
core, ~30 min with --jobs 2 (estimated from the parts' timings).
"""
import argparse
import contextlib
import csv
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import replace

import numpy as np
import torch

import merge as merging
import train as trainer
from sample import load_lora
from product import errors, plot
from sdxl import load_sdxl, model_path

from . import metrics, world
from .evaluate import sample_images, upscale
from .model import MODEL_DIR

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
EVAL_SEED = 777          # the evaluation prompts: a fixed set, the same for every method and seed
SAMPLE_ROWS = 8          # images per row of the sample figure
PAIRS = (("checker", "pastel"), ("striped", "outline"))  # subject + style merges
RUN_FIELDS = ["concept", "kind", "method", "loss", "beta", "seed", "wcon", "fidelity", "prompt_fidelity",
              "prompt_all", "bg", "color", "kind_attr", "position", "size", "shape", "colors", "texture",
              "train_s", "n"]  # shape, colors, texture: subject_fidelity's three parts (subjects only)
MERGE_FIELDS = ["subject", "style", "method", "seed", "wcon", "subject_fidelity", "style_fidelity",
                "prompt_fidelity", "prompt_all", "n", "merge_s", "lora_train_s"]  # lora_train_s: its two LoRAs' mean
# training time, when trained in the same run (the side-by-side cost of a ZipLoRA merge)
T_BINS = ((0, 250), (250, 500), (500, 750), (750, 1000))  # timestep ranges: low noise (fine detail) to pure noise
SATURATION_FIELDS = ["concept", "method", "beta", "seed", "r", "w"] + [f"w{lo}" for lo, _ in T_BINS]
INTERFERENCE_FIELDS = ["subject", "style", "method", "seed", "col_cos", "row_cos", "up_cos", "down_cos",
                       "col_random", "row_random", "norm_subject", "norm_style", "layers"]


def kind_of(name):
    return "subject" if name in world.SUBJECTS else "style"


def methods(betas, losses=("db", "db-prior", "dco"), rel_betas=()):
    """[(method name, train.py --loss, beta)]: the two baselines, DCO at every beta, then the follow-up, DCO with the
    relative reward r / l_phi (train.py --relative-reward, "dco-rel"), at every rel_beta."""
    return [(m, m, 0.0) for m in ("db", "db-prior") if m in losses] + \
        [(f"dco-{b:g}", "dco", b) for b in betas if "dco" in losses] + \
        [(f"dco-rel-{b:g}", "dco-rel", b) for b in rel_betas if "dco-rel" in losses]


def merge_methods(args):
    """The merges of a subject and a style LoRA: [(name, method trained, merge.py --method)]. DB's LoRAs summed and
    zipped (ZipLoRA, the baseline DCO claims to make unnecessary), DCO's and the follow-up's summed."""
    out = [("db", "db", "sum"), ("db-ziplora", "db", "ziplora")] if "db" in args.methods else []
    out += [(f"dco-{b:g}", f"dco-{b:g}", "sum") for b in args.merge_betas if "dco" in args.methods]
    return out + [(f"dco-rel-{b:g}", f"dco-rel-{b:g}", "sum") for b in args.rel_betas if "dco-rel" in args.methods]


def eval_scenes(name, n, subject=None, style=None):
    """The evaluation prompts' scenes (no jitter: a prompt states none). One concept, or a subject in a style."""
    rngs = [np.random.default_rng([EVAL_SEED, i]) for i in range(n)]
    if subject:
        return [world.random_scene(r, style=style, subject=subject, jitter=False) for r in rngs]
    return [world.concept_scene(name, r, jitter=False) for r in rngs]


def class_prompt(name):
    """db-prior's class prompt: one ordinary caption of the world with the concept's init word (DreamBooth's
    "a dog"): "a big yellow circle at the center on a ... background, flat style" for <checker>."""
    s = world.concept_scene(name, np.random.default_rng([EVAL_SEED, 10_000]), jitter=False)
    return world.base_caption(replace(s, size="big", position="center"))


# ----------------------------------------------------------------------------------------------------------
# One run: train.py, then sample.py + metrics


def train_seed(name, seed):
    """train.py's --seed for a concept: it seeds the LoRA init and the data order. Offset per concept, so the subject
    and style LoRAs of a merge start from different random down-projections (with one seed their A's stay ~95%
    aligned after 200 steps and inflate the interference measure); every method of a concept shares it."""
    return seed + 100 * [*world.SUBJECTS, *world.STYLES].index(name)


def train_lora(name, loss, beta, seed, out, args):
    """train.py on the concept's folder (its captions name the token) -> seconds taken."""
    c = world.concept(name)
    argv = ["--images", os.path.join(world.CONCEPTS_DIR, name), "--model", args.model, "--output", out,
            "--loss", "dco" if loss == "dco-rel" else loss, "--beta", str(beta or 1000), "--steps", str(args.steps), "--rank", str(args.rank),
            "--lr", str(args.lr), "--ti-lr", str(args.ti_lr), "--resolution", str(world.SIZE),
            "--token", c.token, "--init-word", c.init_word, "--seed", str(train_seed(name, seed)),
            "--checkpoint-every", "0", "--sample-steps", "0", "--device", "cpu", "--precision", args.precision] + \
        (["--relative-reward"] if loss == "dco-rel" else [])
    if loss == "db-prior":  # class images are made by the base model once per concept (cached in --class-dir)
        argv += ["--class-prompt", class_prompt(name), "--num-class-images", str(args.num_class_images),
                 "--class-dir", os.path.join(args.work, "class_images", args.digest, name), "--sample-steps",
                 str(args.sample_steps)]
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    with contextlib.redirect_stderr(io.StringIO()):  # train.py's progress bar, once per run, is noise here
        trainer.train(trainer.parse_args(argv))
    shutil.rmtree(os.path.join(out, "samples"), ignore_errors=True)
    return time.time() - t0


def score(image, scene):
    """Concept fidelity/ies and prompt fidelity of one sample of `scene`'s prompt."""
    p = metrics.prompt_fidelity(image, scene)
    out = {"prompt_fidelity": p["overall"], "prompt_all": p["all"],
           **{("kind_attr" if a == "kind" else a): p[a] for a in metrics.PROMPT_ATTRIBUTES if a in p}}
    if scene.subject:
        sf = metrics.subject_fidelity(image, scene.subject, scene.style)
        out["subject_fidelity"] = sf["overall"]
        if scene.style not in world.STYLES:  # a single subject: keep the parts, to see *what* was learned
            out.update(shape=sf["shape"], colors=sf["colors"], texture=sf["texture"])
    if scene.style in world.STYLES:
        out["style_fidelity"] = metrics.style_fidelity(image, scene.style)
    return out


def sample_scores(args, loras, scenes, wcons, seed, keep=None, prompts=None):
    """Load the tiny model + LoRA folder(s) afresh, as sample.py does, sample every scene's prompt (default: its
    caption, with the tokens) at every w_con (0: plain sampling with the LoRA, no consistency guidance) and score
    the images against the scenes -> {w_con: mean scores}. `keep`: path stem for the first SAMPLE_ROWS images per
    w_con (the sample figure)."""
    sd = load_sdxl(args.model, fp8=args.precision == "fp8")  # fp8: computed in fp32 on a CPU without bf16
    for path in loras:
        load_lora(sd, path)
    prompts = prompts or [world.caption(s) for s in scenes]
    base = [world.base_caption(s) for s in scenes]
    out = {}
    for wcon in wcons:
        images = sample_images(sd, prompts, args.sample_steps, args.cfg, seed, wcon=wcon,
                               base_prompts=base if wcon else None)
        out[wcon] = metrics.mean_scores([score(img, s) for img, s in zip(images, scenes)])
        if keep:
            np.save(f"{keep}_w{wcon:g}.npy", images[:SAMPLE_ROWS])
    return out


def append(path, fields, rows):
    """Add rows to a CSV; one written with fewer columns (an older run's) is rewritten with the new ones first."""
    new = not os.path.exists(path)
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != fields:
            old = read_csv(path)
            os.remove(path)
            return append(path, fields, old + list(rows))
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)


def lora_norm(layers):
    """||dW||_F over every layer of a LoRA, dW = alpha / r * up @ down: how far it moves the base model."""
    sq = sum(((a / d.shape[0]) * (u.float() @ d.float())).pow(2).sum().item()
             for comp in layers.values() for d, u, a in comp.values())
    return sq ** 0.5


# ----------------------------------------------------------------------------------------------------------
# The experiment


def model_digest(model):
    """First 12 hex digits of the sha256 of the UNet weights: which tiny model the numbers belong to."""
    path = os.path.join(model_path(model), "unet", "diffusion_pytorch_model.safetensors")
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


def run_parallel(args):
    """--jobs N: the concepts split by merge pair over N forked worker processes (one CPU thread each), every worker
    a plain run() into its own folder under --work; then their CSV rows gathered into --output and the report made.
    On 2 cores, 2 jobs take about half the time of one."""
    groups = [[c for c in pair if c in args.concepts] for pair in PAIRS]
    groups = [g for g in groups if g] + [[c] for c in args.concepts if not any(c in p for p in PAIRS)]
    jobs = [sum(groups[k::args.jobs], []) for k in range(min(args.jobs, len(groups)))]
    outs = [os.path.join(args.work, f"job{k}") for k in range(len(jobs))]
    ctx = multiprocessing.get_context("fork")  # workers inherit the loaded modules; no re-import per process
    t_start = time.time()
    done_from = args.output if args.append else None  # workers skip what --output's CSVs already have
    procs = [ctx.Process(target=_worker, args=(replace_args(args, concepts=c, output=o, append=False, jobs=1,
                                                            done_from=done_from),))
             for c, o in zip(jobs, outs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"--jobs: a worker failed (exit codes {[p.exitcode for p in procs]}); see its log above")
    os.makedirs(args.output, exist_ok=True)
    for key, path in csv_paths(args.output).items():
        old = read_csv(path) if args.append else []
        new = [r for o in outs for r in read_csv(csv_paths(o)[key])]
        if os.path.exists(path):
            os.remove(path)
        fields = {"runs": RUN_FIELDS, "merge": MERGE_FIELDS, "interference": INTERFERENCE_FIELDS,
                  "saturation": SATURATION_FIELDS}[key]
        if old or new:
            append(path, fields, old + new)
    write_run_json(args, (time.time() - t_start) / 60)
    report(args)


def replace_args(args, **changes):
    return argparse.Namespace(**{**vars(args), **changes})


def _worker(args):
    torch.set_num_threads(args.threads)
    run(args, make_report=False)


def write_run_json(args, minutes):
    made, before = os.path.join(args.output, "tinyworld_run.json"), {"command": "", "minutes": 0}
    if args.append and os.path.exists(made):
        before = json.load(open(made))
    with open(made, "w") as f:  # what --report later says made the CSVs
        json.dump({"command": " && ".join(c for c in (before["command"], args.command.strip()) if c),
                   "minutes": round(before["minutes"] + minutes, 1), "model_sha256": model_digest(args.model)},
                  f, indent=2)


def run(args, make_report=True):
    args.digest = model_digest(args.model)
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.output, exist_ok=True)
    csvs = csv_paths(args.output)
    for path in csvs.values():  # a fresh run (unless --append); rows are appended as runs finish
        if os.path.exists(path) and not args.append:
            os.remove(path)
    # --append: what the CSVs already hold is not run again (a restart, or new methods added to an old run)
    done = csv_paths(getattr(args, "done_from", None) or args.output) \
        if args.append or getattr(args, "done_from", None) else {"runs": "", "merge": ""}
    done_runs = {(r["concept"], r["method"], r["seed"]) for r in read_csv(done["runs"])}
    done_merges = {(r["subject"], r["style"], r["method"], r["seed"]) for r in read_csv(done["merge"])}
    merges = merge_methods(args)
    needed = {m for _, m, _ in merges}  # LoRAs a merge needs: trained again if --work lost them
    train_s = {}  # (concept, method, seed) -> seconds, for this run's merge costs
    t_start = time.time()

    def log(text):
        print(f"[{(time.time() - t_start) / 60:5.1f} min] {text}", flush=True)

    for seed in args.seeds:
        first = seed == args.seeds[0]
        for name in args.concepts:
            kind, scenes = kind_of(name), eval_scenes(name, args.n_eval)
            fid = f"{kind}_fidelity"
            # The base model on the base prompts (token -> init word), scored as if it were meant to show the
            # concept: the floor of concept fidelity, and the prompt fidelity of the unchanged model.
            if (name, "base", str(seed)) not in done_runs:
                keep = os.path.join(args.work, f"samples_{name}_base") if first else None
                r = sample_scores(args, [], scenes, [0.0], seed, keep, [world.base_caption(s) for s in scenes])[0.0]
                append(csvs["runs"], RUN_FIELDS, [{"concept": name, "kind": kind, "method": "base", "loss": "",
                                                   "beta": "", "seed": seed, "wcon": 0, "fidelity": r[fid], **r,
                                                   "train_s": 0, "n": len(scenes)}])
            for method, loss, beta in methods(args.betas, args.methods, args.rel_betas):
                out = os.path.join(args.work, f"{name}_{method}_s{seed}")
                have = (name, method, str(seed)) in done_runs
                if have and (method not in needed or os.path.exists(os.path.join(out, "train_config.json"))):
                    continue
                secs = train_s[(name, method, seed)] = train_lora(name, loss, beta, seed, out, args)
                if have:  # trained again only for a merge; its scores are in the CSV already
                    log(f"seed {seed} {name:8s} {method:9s} train {secs:5.1f} s (for the merges)")
                    continue
                keep = os.path.join(args.work, f"samples_{name}_{method}") if first else None
                res = sample_scores(args, [out], scenes, args.wcons, seed, keep)
                append(csvs["runs"], RUN_FIELDS, [{"concept": name, "kind": kind, "method": method, "loss": loss,
                                                   "beta": beta or "", "seed": seed, "wcon": w, "fidelity": r[fid],
                                                   **r, "train_s": round(secs, 1), "n": len(scenes)}
                                                  for w, r in res.items()])
                if loss in ("dco", "dco-rel"):  # the relative reward's log holds r / l_phi: 2 sigmoid(-beta r) still
                    append(csvs["saturation"], SATURATION_FIELDS, [{"concept": name, "method": method, "beta": beta,
                           "seed": seed, **saturation(os.path.join(out, "log.jsonl"), beta)}])
                log(f"seed {seed} {name:8s} {method:9s} train {secs:5.1f} s   fidelity/prompt "
                    + "  ".join(f"w{w:g} {r[fid]:.2f}/{r['prompt_fidelity']:.2f}" for w, r in res.items()))
        for subject, style in PAIRS:
            if subject not in args.concepts or style not in args.concepts:
                continue
            scenes = eval_scenes(None, args.n_eval, subject=subject, style=style)
            for method, lora, how in merges:
                if (subject, style, method, str(seed)) in done_merges:
                    continue
                a, b = (os.path.join(args.work, f"{n}_{lora}_s{seed}") for n in (subject, style))
                merged = os.path.join(args.work, f"merge_{subject}_{style}_{method}_s{seed}")
                shutil.rmtree(merged, ignore_errors=True)
                t0 = time.time()
                with contextlib.redirect_stderr(io.StringIO()):  # ZipLoRA's progress bar
                    merging.merge([a, b], [1.0, 1.0], merged, model=args.model, method=how,
                                  ziplora={"device": "cpu", "seed": seed, "steps": args.ziplora_steps})
                merge_s = time.time() - t0
                trained = [train_s.get((n, lora, seed)) for n in (subject, style)]
                keep = os.path.join(args.work, f"samples_merge_{subject}_{style}_{method}") if first else None
                res = sample_scores(args, [merged], scenes, args.wcons, seed, keep)
                append(csvs["merge"], MERGE_FIELDS, [{"subject": subject, "style": style, "method": method,
                                                      "seed": seed, "wcon": w, **r, "n": len(scenes),
                                                      "merge_s": round(merge_s, 2), "lora_train_s":
                                                      round(sum(trained) / 2, 1) if None not in trained else ""}
                                                     for w, r in res.items()])
                log(f"seed {seed} merge {subject}+{style} {method} ({how}, {merge_s:.1f} s): subject/style/prompt "
                    + "  ".join(f"w{w:g} {r['subject_fidelity']:.2f}/{r['style_fidelity']:.2f}/"
                                f"{r['prompt_fidelity']:.2f}" for w, r in res.items()))
                if how != "sum":  # the same two LoRAs as the sum's: their interference is already measured
                    continue
                la, lb = (merging.read_source(p).layers for p in (a, b))
                rows = merging.interference(la, lb)
                mean = {k: float(np.mean([r[k] for r in rows])) for k in INTERFERENCE_FIELDS[4:10]}
                append(csvs["interference"], INTERFERENCE_FIELDS,
                       [{"subject": subject, "style": style, "method": method, "seed": seed, **mean,
                         "norm_subject": lora_norm(la), "norm_style": lora_norm(lb), "layers": len(rows)}])
                log(f"seed {seed} {subject}+{style} {method}: |cos| {mean['col_cos']:.3f} (random "
                    f"{mean['col_random']:.3f})")
    minutes = (time.time() - t_start) / 60
    if make_report:
        write_run_json(args, minutes)
        report(args)
    return minutes


# ----------------------------------------------------------------------------------------------------------
# Tables and plots, from the CSVs


def csv_paths(folder):
    return {k: os.path.join(folder, f"tinyworld_{k}.csv") for k in ("runs", "merge", "interference", "saturation")}


def read_csv(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def seed_stats(rows, group, value):
    """{group key: (mean over seeds, std over seeds, n seeds)} of `value`, first averaged within each seed (over the
    concepts the group holds)."""
    per_seed = {}
    for r in rows:
        per_seed.setdefault(group(r), {}).setdefault(r["seed"], []).append(float(r[value]))
    out = {}
    for key, seeds in per_seed.items():
        v = [np.mean(x) for x in seeds.values()]
        out[key] = (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v))
    return out


def pm(stat):
    return f"{stat[0]:.3f} ± {stat[1]:.3f}"


def method_order(names):
    def key(m):
        fixed = {"base": 0, "db": 1, "db-prior": 2, "db-ziplora": 3}
        return (fixed[m], 0.0) if m in fixed else (5, float(m[8:])) if m.startswith("dco-rel-") else \
            (4, float(m.split("-", 1)[1]))
    return sorted(set(names), key=key)


def merge_label(m):
    """'db' -> 'db merge', 'db-ziplora' -> 'db ziplora', 'dco-30' -> 'dco-30 merge': the paper's three rows."""
    return "db ziplora" if m == "db-ziplora" else f"{m} merge"


def wcon_label(w):
    return "plain" if float(w) == 0 else f"{float(w):g}"


def pareto_panel(rows, kind, title, value="fidelity", ylabel=None):
    rows = [r for r in rows if r["kind"] == kind]
    group = lambda r: (r["method"], float(r["wcon"]))  # noqa: E731
    fid, prm = seed_stats(rows, group, value), seed_stats(rows, group, "prompt_fidelity")
    series = []
    for m in method_order(r["method"] for r in rows):
        ws = sorted({w for mm, w in fid if mm == m}, key=lambda w: (w == 0, w))  # plain sampling last
        series.append(plot.Series(m if m != "base" else "base model (init word)",
                                  [(prm[(m, w)][0], fid[(m, w)][0]) for w in ws],
                                  [wcon_label(w) if m != "base" else "" for w in ws],
                                  [(prm[(m, w)][1], fid[(m, w)][1]) for w in ws],
                                  color=(0, 0, 0) if m == "base" else None, dashed=m.startswith("db")))
    return plot.lines(series, "prompt fidelity", ylabel or f"{kind} fidelity", title)


def sample_figure(args, out_png):
    """The first seed's first samples, one row per (concept, method, w_con): the base model and DB + prior plain,
    DB and DCO at --show-betas plain and at --show-wcons; then the merges."""
    stems = []
    for name in args.concepts:
        stems += [(f"{name}_base", [0.0]), (f"{name}_db-prior", [0.0])] + \
            [(f"{name}_{m}", [0.0] + args.show_wcons) for m in ["db"] + [f"dco-{b:g}" for b in args.show_betas]]
    for subject, style in PAIRS:
        stems += [(f"merge_{subject}_{style}_{m}", [0.0] + args.show_wcons) for m, _, _ in merge_methods(args)]
    rows, labels = [], []
    if not all(os.path.exists(os.path.join(args.work, f"samples_{c}_base_w0.npy")) for c in args.concepts):
        return False  # an --append run kept only its new rows' samples (no base rows): keep the full run's figure
    for stem, wcons in stems:
        for w in wcons:
            path = os.path.join(args.work, f"samples_{stem}_w{w:g}.npy")
            if os.path.exists(path):
                rows.append([upscale(im, 2) for im in np.load(path)])
                labels.append(f"{stem.replace('merge_', 'merge ').replace('_', ' ')}, "
                              f"{'plain' if w == 0 else f'w_con {w:g}'}")
    if rows:
        plot.labelled_rows(rows, labels).save(out_png)
    return bool(rows)


def saturation(log_path, beta):
    """From one DCO run's log.jsonl, over the second half of training: the mean implicit reward r = l_phi - l_theta
    and the share of the DreamBooth gradient left, 2 sigmoid(-beta r), overall and per timestep range (train.py
    logs every sample's t and r)."""
    with open(log_path) as f:
        log = [json.loads(line) for line in f]
    log = log[len(log) // 2:]
    t = np.array([t for x in log for t in x["t"]])
    r = np.array([r for x in log for r in x["implicit_rewards"]])
    w = 2 / (1 + np.exp(np.clip(beta * r, -50, 50)))
    row = {"r": r.mean(), "w": w.mean()}
    for lo, hi in T_BINS:
        if ((t >= lo) & (t < hi)).any():
            row[f"w{lo}"] = w[(t >= lo) & (t < hi)].mean()
    return row


def dco_saturation(rows):
    """{dco method: {column: (mean, std, n seeds)}} from the saturation CSV's rows (per seed: averaged over
    concepts first)."""
    out = {}
    for m in method_order(x["method"] for x in rows):
        mine = [x for x in rows if x["method"] == m]
        out[m] = {k: seed_stats([x for x in mine if x.get(k)], lambda x: 0, k)[0]
                  for k in SATURATION_FIELDS[4:] if any(x.get(k) for x in mine)}
    return out


def merge_cost(merges):
    """ZipLoRA's cost next to training one LoRA, both measured in the same run (merge_s: merge.merge's wall time,
    loading the model included; lora_train_s: the mean of its two LoRAs' train.py wall time)."""
    rows = [r for r in merges if r["method"] == "db-ziplora" and r.get("merge_s") and r.get("lora_train_s")
            and float(r["wcon"]) == 0]
    if not rows:
        return []
    zip_s, train_s = (float(np.mean([float(r[k]) for r in rows])) for k in ("merge_s", "lora_train_s"))
    sums = [float(r["merge_s"]) for r in merges if r["method"] == "db" and r.get("merge_s") and float(r["wcon"]) == 0]
    return [f"Cost, measured side by side in one run ({len(rows)} merges): a ZipLoRA merge takes {zip_s:.1f} s, "
            f"{zip_s / train_s:.2f}× the {train_s:.1f} s of training one of its DB LoRAs (300 steps)"
            + (f"; the exact sum takes {np.mean(sums):.2f} s" if sums else "") + ".", ""]


def follow_up(runs, merges):
    """The follow-up on one line per method, plain sampling: DB, DCO and DCO with the relative reward on the subject
    axes (fidelity, its texture part, prompt), the style axes and the merge."""
    rel = sorted({r["method"] for r in runs if r["method"].startswith("dco-rel-")})
    if not rel:
        return []
    plain = [r for r in runs if float(r["wcon"]) == 0]
    ms = [m for m in method_order(r["method"] for r in plain) if m in ("db",) or m.startswith("dco-")]
    cols = [("subject", "fidelity"), ("subject", "texture"), ("subject", "prompt_fidelity"), ("style", "fidelity"),
            ("style", "prompt_fidelity")]
    stats = {c: seed_stats([r for r in plain if r["kind"] == c[0]], lambda r: r["method"], c[1]) for c in cols}
    mplain = [r for r in merges if float(r["wcon"]) == 0]
    mst = {k: seed_stats(mplain, lambda r: r["method"], k) for k in ("subject_fidelity", "style_fidelity",
                                                                      "prompt_fidelity")}
    lines = ["## Follow-up: DCO with the reward relative to phi's error (dco-rel-β)", "",
             "`train.py --relative-reward`: the reward r = l_phi − l_theta divided by l_phi (dco.relative_reward). "
             "Plain sampling (w_con 0), every method on the same axes; merge = the sum of its subject and style LoRAs "
             "(db: also ZipLoRA):", "",
             "| method | subject fidelity | subject texture | subject prompt | style fidelity | style prompt | "
             "merge subject | merge style | merge prompt |", "|---|---|---|---|---|---|---|---|---|"]
    for m in ms:
        cells = [pm(stats[c][m]) if m in stats[c] else "–" for c in cols]
        cells += [pm(mst[k][m]) if m in mst[k] else "–" for k in mst]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
        if m == "db" and "db-ziplora" in mst["subject_fidelity"]:
            lines.append("| db ziplora | – | – | – | – | – | " + " | ".join(pm(mst[k]["db-ziplora"]) for k in mst)
                         + " |")
    return lines + [""]


def report(args):
    """Plots and docs/tinyworld_results.md from the CSVs in args.output."""
    csvs = csv_paths(args.output)
    made = os.path.join(args.output, "tinyworld_run.json")
    made = json.load(open(made)) if os.path.exists(made) else {"command": args.command}
    runs, merges, inter, sat = (read_csv(csvs[k]) for k in ("runs", "merge", "interference", "saturation"))
    if not runs:
        raise FileNotFoundError(f"{csvs['runs']}: no results to report; run `python -m tinyworld.experiments` first")
    names = {k: ", ".join(sorted({r["concept"] for r in runs if r["kind"] == k})) for k in ("subject", "style")}
    panels = [pareto_panel(runs, k, f"{k}s: {names[k]}") for k in ("subject", "style") if names[k]]
    if names["subject"] and all(r.get("texture") for r in runs if r["kind"] == "subject"):
        # subject fidelity's texture part alone: what the LoRA learned, without the shape and colours it may cost
        panels.insert(1, pareto_panel(runs, "subject", "subjects: texture part only", "texture", "subject texture"))
    plot.side_by_side(panels).save(os.path.join(args.output, "tinyworld_pareto.png"))
    seeds = sorted({int(r["seed"]) for r in runs})
    lines = ["# Tiny-world experiments: results", "",
             f"Made by `{made['command'].strip()}`" + (f" in {made['minutes']} min" if "minutes" in made else "")
             + (f" on the tiny model whose UNet weights have sha256 {made['model_sha256']}…"
                if "model_sha256" in made else "") + ". "
             f"Seeds {seeds}; mean ± standard deviation over seeds (each seed first averaged over the concepts of its "
             f"kind and the {runs[0]['n']} evaluation prompts). `wcon` plain = ordinary CFG sampling with the LoRA; "
             "a number = consistency guidance with that w_con. Fidelity = subject_fidelity (subjects) or "
             "style_fidelity (styles), prompt = prompt_fidelity (tinyworld/metrics.py).", ""]
    for kind in ("subject", "style"):
        rows = [r for r in runs if r["kind"] == kind]
        if not rows:
            continue
        group = lambda r: (r["method"], float(r["wcon"]))  # noqa: E731
        fid, prm = seed_stats(rows, group, "fidelity"), seed_stats(rows, group, "prompt_fidelity")
        allr = seed_stats(rows, group, "prompt_all")
        lines += [f"## {kind.capitalize()}s ({', '.join(sorted({r['concept'] for r in rows}))})", "",
                  f"| method | w_con | {kind} fidelity | prompt fidelity | all prompt attributes right |",
                  "|---|---|---|---|---|"]
        for m in method_order(r["method"] for r in rows):
            for w in sorted({w for mm, w in fid if mm == m}, key=lambda w: (w != 0, w)):
                lines.append(f"| {m} | {wcon_label(w)} | {pm(fid[(m, w)])} | {pm(prm[(m, w)])} | {pm(allr[(m, w)])} |")
        lines += ["", "Per concept, plain sampling (w_con 0):", "",
                  "| method | " + " | ".join(f"{c} fidelity | {c} prompt" for c in sorted({r['concept'] for r in rows}))
                  + " |", "|---|" + "---|---|" * len({r['concept'] for r in rows})]
        plain = [r for r in rows if float(r["wcon"]) == 0]
        cf = seed_stats(plain, lambda r: (r["method"], r["concept"]), "fidelity")
        cp = seed_stats(plain, lambda r: (r["method"], r["concept"]), "prompt_fidelity")
        for m in method_order(r["method"] for r in rows):
            lines.append(f"| {m} | " + " | ".join(f"{pm(cf[(m, c)])} | {pm(cp[(m, c)])}"
                                                   for c in sorted({r['concept'] for r in rows})) + " |")
        if kind == "subject" and all(r.get("texture") for r in plain):
            parts = {k: seed_stats(plain, lambda r: r["method"], k) for k in ("shape", "colors", "texture")}
            lines += ["", "The three parts of subject fidelity, plain sampling (shape: the object's kind is the "
                      "subject's; colors: its two colours; texture: its pattern):", "",
                      "| method | shape | colors | texture |", "|---|---|---|---|"]
            for m in method_order(r["method"] for r in plain):
                lines.append(f"| {m} | " + " | ".join(pm(parts[k][m]) for k in parts) + " |")
        times = seed_stats([r for r in rows if r["method"] != "base"], lambda r: r["method"], "train_s")
        lines += ["", "Training time per LoRA (s): " + ", ".join(f"{m} {times[m][0]:.0f}" for m in
                                                               method_order(times)), ""]
    if merges:
        group = lambda r: (r["method"], float(r["wcon"]))  # noqa: E731
        st = {k: seed_stats(merges, group, k) for k in ("subject_fidelity", "style_fidelity", "prompt_fidelity")}
        pairs = sorted({f"{r['subject']}+{r['style']}" for r in merges})
        lines += [f"## Merging a subject LoRA and a style LoRA ({', '.join(pairs)})", "",
                  "| method | w_con | subject fidelity | style fidelity | prompt fidelity |", "|---|---|---|---|---|"]
        for m in method_order(r["method"] for r in merges):
            for w in sorted({w for mm, w in st["subject_fidelity"] if mm == m}, key=lambda w: (w != 0, w)):
                lines.append(f"| {merge_label(m)} | {wcon_label(w)} | " + " | ".join(pm(st[k][(m, w)]) for k in st)
                             + " |")
        lines += [""] + merge_cost(merges)
        series = []
        for m in method_order(r["method"] for r in merges):
            ws = sorted({w for mm, w in st["subject_fidelity"] if mm == m}, key=lambda w: (w == 0, w))
            series.append((m, ws))
        a = plot.lines([plot.Series(merge_label(m), [(st["prompt_fidelity"][(m, w)][0],
                                                      st["subject_fidelity"][(m, w)][0]) for w in ws],
                                    [wcon_label(w) for w in ws], dashed=m.startswith("db"))
                        for m, ws in series], "prompt fidelity", "subject fidelity", "merged: subject vs prompt")
        b = plot.lines([plot.Series(merge_label(m), [(st["style_fidelity"][(m, w)][0],
                                                      st["subject_fidelity"][(m, w)][0]) for w in ws],
                                    [wcon_label(w) for w in ws], dashed=m.startswith("db"))
                        for m, ws in series], "style fidelity", "subject fidelity", "merged: subject vs style")
        plot.side_by_side([a, b]).save(os.path.join(args.output, "tinyworld_merge.png"))
        lines.append("")
    if inter:
        lines += ["## Interference of the two LoRAs of a merge (merge.interference, mean over layers)", "",
                  "| method | mean abs cos, dW columns | random directions | mean abs cos, dW rows | random | "
                  "norm dW subject | norm dW style |", "|---|---|---|---|---|---|---|"]
        for m in method_order(r["method"] for r in inter):
            st = {k: seed_stats([r for r in inter if r["method"] == m], lambda r: 0, k)[0]
                  for k in ("col_cos", "col_random", "row_cos", "row_random", "norm_subject", "norm_style")}
            lines.append(f"| {m} | " + " | ".join(pm(st[k]) for k in st) + " |")
        lines.append("")
    lines += follow_up(runs, merges)
    gradient_left = dco_saturation(sat)
    if gradient_left:
        lines += ["## Where DCO stops learning: the DreamBooth gradient left, by timestep", "",
                  "Per sample, dL_DCO/dl_theta = β·sigmoid(−β·r) with r = l_phi − l_theta, the implicit reward "
                  "train.py logs; relative to its value at the start (β/2) that is 2·sigmoid(−β·r): 1 while "
                  "theta = phi, → 0 once theta beats phi by a few 1/β (DreamBooth's stays 1). Mean over the second "
                  "half of training, over all timesteps and per timestep range (low t = little noise, fine detail; "
                  "high t = coarse layout and colour), then over concepts; ± std over seeds:", "",
                  "| method | implicit reward r | 2·sigmoid(−β·r), all t | "
                  + " | ".join(f"t {lo}–{hi - 1}" for lo, hi in T_BINS) + " |",
                  "|---|---|---|" + "---|" * len(T_BINS)]
        for m, st in gradient_left.items():
            lines.append(f"| {m} | {pm(st['r'])} | {pm(st['w'])} | "
                         + " | ".join(pm(st[f"w{lo}"]) if f"w{lo}" in st else "–" for lo, _ in T_BINS) + " |")
        lines.append("")
    figure = os.path.join(args.output, "tinyworld_samples.png")  # made from --work's kept samples; else kept as it is
    if (os.path.isdir(args.work) and sample_figure(args, figure)) or os.path.exists(figure):
        lines += ["![samples](tinyworld_samples.png)", "",
                  f"First seed, first {SAMPLE_ROWS} evaluation prompts per row (the same prompts and noise in every "
                  "row of a concept).", ""]
    lines += ["![pareto](tinyworld_pareto.png)", ""] + (["![merge](tinyworld_merge.png)", ""] if merges else [])
    path = os.path.join(args.output, "tinyworld_results.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path} and the plots beside it")


def floats(text):
    return [float(x) for x in text.split(",") if x]


# The range of every numeric flag (errors.check_flags).
NUMBERS = {"rel_betas": "> 0", "betas": "> 0", "merge_betas": "> 0", "wcons": ">= 0", "show_wcons": ">= 0",
           "show_betas": "> 0", "steps": ">= 1", "lr": "> 0", "ti_lr": ">= 0", "rank": ">= 1",
           "num_class_images": ">= 1", "n_eval": ">= 1", "sample_steps": ">= 1", "cfg": ">= 0", "threads": ">= 1",
           "jobs": ">= 1", "ziplora_steps": ">= 0"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DreamBooth vs DreamBooth+prior vs DCO in the tiny world (CPU).")
    p.add_argument("--model", default=MODEL_DIR, help="the tiny SDXL (python -m tinyworld.pretrain)")
    p.add_argument("--output", default=DOCS, help="CSVs, plots and tinyworld_results.md")
    p.add_argument("--work", default=os.path.join("output", "tinyworld_experiments"),
                   help="LoRAs, merges, class images, kept samples")
    p.add_argument("--concepts", default=",".join([*world.SUBJECTS, *world.STYLES]))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="db,db-prior,dco,dco-rel", help="which of db, db-prior, dco (at every "
                   "--betas), dco-rel (DCO with the relative reward, at every --rel-betas) to train; merges are made "
                   "of those trained: db (sum and ZipLoRA), dco (--merge-betas), dco-rel")
    p.add_argument("--rel-betas", type=floats, default=floats("1,3"), help="the follow-up's beta sweep (the "
                   "relative reward is ~0.5 where DCO's is ~0.05: beta ~ 1, not 1000)")
    p.add_argument("--betas", type=floats, default=floats("10,30,100,1000"), help="DCO's beta sweep")
    p.add_argument("--merge-betas", type=floats, default=floats("30,100"),
                   help="the DCO LoRAs merged (some of --betas)")
    p.add_argument("--wcons", type=floats, default=floats("0,1,3"), help="0 = plain sampling with the LoRA")
    p.add_argument("--show-wcons", type=floats, default=floats("3"), help="w_con rows of the sample figure")
    p.add_argument("--show-betas", type=floats, default=floats("10,1000"), help="DCO rows of the sample figure")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp8"], help="the frozen weights, in training "
                   "and sampling (fp8: float8 with a scale per channel, product/float8.py)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=5e-3, help="the LoRA's; chosen (with --steps) so that DreamBooth "
                   "visibly learns every concept in plain sampling")
    p.add_argument("--ti-lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--num-class-images", type=int, default=20)
    p.add_argument("--n-eval", type=int, default=24, help="evaluation prompts per concept (one sample each)")
    p.add_argument("--sample-steps", type=int, default=15)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (the concepts split by merge pair): "
                   "--jobs 2 on 2 cores halves the time")
    p.add_argument("--append", action="store_true", help="keep the rows already in --output's CSVs and add this "
                   "run's (e.g. more betas, a new method): a run or merge the CSVs already hold is not repeated, so "
                   "this also resumes a killed run (a LoRA a new merge needs is retrained if --work lost it)")
    p.add_argument("--ziplora-steps", type=int, default=100, help="ZipLoRA's optimisation steps (merge.py's default)")
    p.add_argument("--report", action="store_true", help="only remake plots and tables from the CSVs in --output")
    args = errors.parse_flags(p, argv, NUMBERS)
    args.concepts = [c for c in args.concepts.split(",") if c]
    for c in args.concepts:
        world.concept(c)
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.methods = [m for m in args.methods.split(",") if m]
    if set(args.methods) - {"db", "db-prior", "dco", "dco-rel"}:
        raise ValueError(f"--methods {','.join(args.methods)}: choose from db, db-prior, dco, dco-rel")
    if {"db", "dco"} <= set(args.methods) and not set(args.merge_betas) <= set(args.betas):
        raise ValueError(f"--merge-betas {args.merge_betas}: each must be one of --betas {args.betas}")
    args.command = "python -m tinyworld.experiments " + " ".join(argv if argv is not None else sys.argv[1:])
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.report:
        report(args)
    elif args.jobs > 1:
        run_parallel(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
