"""A training run's folder: its config, log, checkpoints and final files, and the checks that make --resume safe.

The product layer of train.py (none of it is in the paper): everything here is about files. The layout of
output/<name>/:
    train_config.json                  every setting of the run (what --resume checks against)
    log.jsonl                          one line per step
    checkpoint-<step>/                 LoRA + token rows + AdamW state + step (what --resume continues from)
    pytorch_lora_weights.safetensors   the final LoRA (diffusers / PEFT names)
    lora_kohya.safetensors             the same LoRA (kohya names: ComfyUI, A1111)
    learned_embeds.safetensors         the new token rows as the official code writes them: {"clip_l", "clip_g"}
                                       (kyungmnlee/dco@164ae17 customize.py:205-212)
    samples/                           images at each checkpoint
Tensors are stored in safetensors and scalars in JSON: no pickle anywhere.
"""
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from files import EMBEDS_FILE, PEFT_FILE, atomic, save_tensors, write_json
from lora import load_lora_file, lora_modules, save_lora_kohya, save_lora_peft

CONFIG_FILE, LOG_FILE = "train_config.json", "log.jsonl"
# Settings a resumed run must share with the run it continues: they shape the LoRA, the data or the draws.
# The global batch (processes x batch size x grad-accum) defines each step's draws (train.get_batch); how it is split
# over processes and micro-batches does not, so a run may resume on another number of GPUs with the same global batch.
FIXED_ON_RESUME = ("model", "loss", "rank", "alpha", "resolution", "global_batch_size", "seed", "tokens", "captions")


def checkpoints(out):
    """[(step, folder)] of out's complete checkpoints, oldest first."""
    if not os.path.isdir(out):
        return []
    steps = sorted(int(d[11:]) for d in os.listdir(out) if d.startswith("checkpoint-") and d[11:].isdigit())
    return [(s, os.path.join(out, f"checkpoint-{s}")) for s in steps]


def check_run_folder(out, config, resume, steps):
    """Before anything is written: a new run needs a fresh folder; --resume needs a checkpoint, steps left to
    train, and the settings of the run it continues. Returns the checkpoint to resume from (or None)."""
    config_path = os.path.join(out, CONFIG_FILE)
    if not resume:
        if os.path.exists(config_path):
            raise ValueError(f"{out} already holds a training run: pass --resume to continue it, or another "
                             "--output (or delete it)")
        return None
    found = checkpoints(out)
    if not found:
        raise ValueError(f"--resume: no checkpoint-<step> folder in {out}")
    step, path = found[-1]
    if step >= steps:
        raise ValueError(f"--resume: {path} already has {step} steps; raise --steps")
    old = json.loads(Path(config_path).read_text()) if os.path.exists(config_path) else config
    old.setdefault("global_batch_size", old.get("batch_size"))  # a run from before torchrun: one process
    if old["global_batch_size"] != config["global_batch_size"]:
        raise ValueError(f"--resume: the global batch (processes x --batch-size x --grad-accum) was "
                         f"{old['global_batch_size']} in {out}, now {config['global_batch_size']}; keep the product "
                         "(any split over processes and --grad-accum continues the same run)")
    for k in FIXED_ON_RESUME:
        if old.get(k) != config[k]:
            raise ValueError(f"--resume: {k} was {old.get(k)!r} in {out}, now {config[k]!r}; it must not change")
    return path


def save_lora(folder, unet, embeds, meta):
    """pytorch_lora_weights.safetensors (+ learned_embeds.safetensors, as the official repo: {"clip_l": [k,768],
    "clip_g": [k,1280]}, which diffusers' load_textual_inversion takes one encoder at a time)."""
    save_lora_peft(folder, {"unet": unet}, meta)
    if embeds:
        save_tensors(os.path.join(folder, EMBEDS_FILE), {"clip_l": embeds[0].rows, "clip_g": embeds[1].rows}, meta)


def save_final(out, unet, embeds, meta):
    """The run's deliverables: the LoRA in both formats and the token rows."""
    save_lora(out, unet, embeds, meta)
    save_lora_kohya(out, {"unet": unet}, unet.config, meta)


def save_checkpoint(path, unet, embeds, opt, scaler, step, meta):
    """LoRA + token rows + AdamW state + step, written as one folder that appears whole or not at all."""
    with atomic(path) as tmp:
        os.makedirs(tmp)
        save_lora(tmp, unet, embeds, meta)
        state = opt.state_dict()["state"]
        save_tensors(os.path.join(tmp, "optimizer.safetensors"),  # "3.exp_avg", "3.step", ...
                     {f"{i}.{k}": v for i, s in state.items() for k, v in s.items()})
        write_json(os.path.join(tmp, "trainer_state.json"), {"step": step, "scaler": scaler.state_dict()})


@torch.no_grad()
def load_checkpoint(path, unet, embeds, opt, scaler):
    """Restore what save_checkpoint wrote -> the step to continue from. The learning rates come from the arguments."""
    layers = load_lora_file(os.path.join(path, PEFT_FILE))[0]["unet"]
    for name, m in lora_modules(unet).items():
        m.lora_down.weight.copy_(layers[name][0])
        m.lora_up.weight.copy_(layers[name][1])
    if embeds:
        rows = load_file(os.path.join(path, EMBEDS_FILE))
        embeds[0].rows.copy_(rows["clip_l"])
        embeds[1].rows.copy_(rows["clip_g"])
    state = {}
    for key, v in load_file(os.path.join(path, "optimizer.safetensors")).items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    trainer = json.loads(Path(path, "trainer_state.json").read_text())
    scaler.load_state_dict(trainer["scaler"])
    return trainer["step"]


def truncate_log(out, start):
    """Drop the steps logged after the checkpoint a resumed run continues from: they are trained again."""
    log_path = os.path.join(out, LOG_FILE)
    lines = Path(log_path).read_text().splitlines() if os.path.exists(log_path) else []
    with atomic(log_path) as tmp, open(tmp, "w") as f:
        f.writelines(line + "\n" for line in lines if json.loads(line)["step"] < start)


def append_log(out, record):
    with open(os.path.join(out, LOG_FILE), "a") as f:
        f.write(json.dumps(record) + "\n")
