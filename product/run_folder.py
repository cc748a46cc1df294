"""A training run's folder: its config, log, checkpoints and final files, and the checks that make --resume safe.

The product layer of train.py (none of it is in the paper): everything here is about files. The layout of
output/<name>/:
    train_config.json                  every setting of the run (what --resume checks against)
    log.jsonl                          one line per step
    checkpoint-<step>/                 LoRA + token rows + AdamW state + step (what --resume continues from)
    pytorch_lora_weights.safetensors   the final LoRA (diffusers / PEFT names)
    lora_kohya.safetensors             the same LoRA (kohya names: ComfyUI, A1111), with kohya's ss_* and ModelSpec keys
    README.md                          the model card (the Hub reads its front matter; product/model_card.py)
    learned_embeds.safetensors         the new token rows as the official code writes them: {"clip_l", "clip_g"}
                                       (kyungmnlee/dco@164ae17 customize.py:205-212)
    samples/                           images at each checkpoint
    .lock                              held (flock) while a run trains here: a second run is refused
Tensors are stored in safetensors and scalars in JSON: no pickle anywhere.
"""
import errno
import fcntl
import json
import math
import os
import socket
import statistics
import sys
import time
import weakref

import torch

from tqdm import tqdm

from lora import load_lora_file, lora_modules, save_lora_kohya, save_lora_peft
from product.distributed import agree, average, barrier, gather
from product.files import (EMBEDS_FILE, FINAL_INCOMPLETE, PEFT_FILE, atomic, check_writable, load_tensors, read_json,
                           read_metadata_list, read_text, remove_temporaries, save_image, save_tensors,
                           write_json)
from product.model_card import base_license, kohya_metadata, model_card
from product.report import BetaCheck, write_report
from product.signals import Signalled, pause_for_test, stop

CONFIG_FILE, LOG_FILE = "train_config.json", "log.jsonl"
# Settings a resumed run must share with the run it continues: they shape the LoRA, the data or the draws.
# The global batch (processes x batch size x grad-accum) defines each step's draws (train.get_batch); how it is split
# over processes and micro-batches does not, so a run may resume on another number of GPUs with the same global batch.
FIXED_ON_RESUME = ("model", "loss", "rank", "alpha", "resolution", "global_batch_size", "seed", "tokens", "init_words",
                   "captions", "base_prompts", "offset_noise", "crop", "random_flip", "resample", "time_ids", "pool",
                   "num_class_images", "class_prompt", "buckets", "train_sizes")
LOCK_FILE = ".lock"


def checkpoints(out):
    """[(step, folder)] of out's complete checkpoints, oldest first."""
    if not os.path.isdir(out):
        return []
    steps = sorted(int(d[11:]) for d in os.listdir(out) if d.startswith("checkpoint-") and d[11:].isdigit())
    return [(s, os.path.join(out, f"checkpoint-{s}")) for s in steps]


def check_run_folder(out, config, resume, steps, master=True):
    """Before anything is written: a new run needs a fresh folder (or one whose run stopped before its first
    checkpoint: it starts again); --resume needs a checkpoint, no more steps than --steps, and the settings and images
    of the run it continues. Returns the checkpoint to resume from (or None)."""
    config_path = os.path.join(out, CONFIG_FILE)
    found = checkpoints(out)
    if not resume:
        final, marker = os.path.join(out, PEFT_FILE), os.path.join(out, FINAL_INCOMPLETE)
        finished = os.path.exists(final) and not os.path.exists(marker)  # a cut-off final save without checkpoints
        # has nothing to resume from: it starts again, like a run stopped before its first checkpoint
        if os.path.exists(config_path) and (found or finished):
            raise ValueError(f"{out} already holds a training run: pass --resume to continue it, or another "
                             "--output (or delete it)")
        if os.path.exists(config_path) and master:  # stopped before its first checkpoint: start it again
            print(f"notice: {out} holds a run that stopped before its first checkpoint; starting it again",
                  file=sys.stderr)
            truncate_log(out, 0)
        return None
    if not found and os.path.exists(os.path.join(out, PEFT_FILE)) and \
            not os.path.exists(os.path.join(out, FINAL_INCOMPLETE)):
        raise ValueError(f"--resume: {out} holds a finished run without checkpoints (--checkpoint-every 0): there "
                         "is nothing to resume; start a new run with another --output")
    if not found:
        raise ValueError(f"--resume: no checkpoint-<step> folder in {out}" + (
            ": the run stopped before its first checkpoint; run the same command without --resume to start it again"
            if os.path.exists(config_path) else ""))
    step, path = found[-1]
    if step > steps:  # == steps: the run is done, --resume writes its final files again (a save was cut off)
        raise ValueError(f"--resume: {path} already has {step} steps; raise --steps")
    old = read_json(config_path) if os.path.exists(config_path) else config
    if not isinstance(old, dict):
        raise ValueError(f"{config_path}: not a training run's settings; restore it, or start a new --output")
    check_same_images(out, old, config)
    old.setdefault("global_batch_size", old.get("batch_size"))  # a run from before torchrun: one process
    old.setdefault("buckets", False)  # a run from before --buckets trained square crops: it keeps them
    if old["global_batch_size"] != config["global_batch_size"]:
        raise ValueError(f"--resume: the global batch (processes x --batch-size x --grad-accum) was "
                         f"{old['global_batch_size']} in {out}, now {config['global_batch_size']}; keep the product "
                         "(any split over processes and --grad-accum continues the same run)")
    for k in FIXED_ON_RESUME:
        if k in old and old[k] != config.get(k):
            raise ValueError(f"--resume: {k} was {old[k]!r} in {out}, now {config.get(k)!r}; it must not change "
                             "(resume with the run's settings, or start a new run with another --output)")
    return path


def check_same_images(out, old, config):
    """The training images' content (sha256 of each file) must be the one the run began with; a moved folder with the
    same images is fine. Runs from before the hashes were recorded compare the paths."""
    before, now = old.get("image_sha256"), config["image_sha256"]
    if before is None:
        if old.get("images", config["images"]) != config["images"]:
            raise ValueError(f"--resume: the training images are not the ones {out} began with; resume with the "
                             "original --images, or start a new run with another --output")
        return
    if len(before) != len(now):
        raise ValueError(f"--resume: {out} began with {len(before)} training images, now there are {len(now)}; "
                         "resume with the original images, or start a new run with another --output")
    changed = [p for p, a, b in zip(config["images"], before, now) if a != b]
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise ValueError(f"--resume: training image(s) changed since {out} began: {shown}; resume with the original "
                         "images, or start a new run with another --output")


class RunLock:
    """The output folder's lock: one run trains in a folder at a time. flock(2), so the kernel drops the lock when
    its process ends however it ends (SIGKILL included): a stale .lock file never blocks. The file names the holder
    (PID, host) for the message. Released by release() (which removes the file) or, should train() fail, when its
    frame is freed."""
    # This process's locks, weakly: a failed train() whose traceback a notebook keeps must not lock itself out.
    held = weakref.WeakValueDictionary()

    def __init__(self, out):
        self.path = os.path.join(out, LOCK_FILE)
        earlier = RunLock.held.pop(os.path.realpath(self.path), None)
        if earlier:
            earlier.file.close()
        while True:
            self.file = open(self.path, "a+")
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.file.seek(0)
                holder = self.file.read().strip() or "another process"
                self.file.close()
                raise ValueError(f"{out}: another run is training in this folder ({holder}); wait for it to "
                                 "finish, stop it, or choose another --output") from None
            try:  # the holder we waited for may have removed the file: lock the one that is there now
                if os.stat(self.path).st_ino == os.fstat(self.file.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            self.file.close()
        self.file.truncate(0)
        self.file.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()
        RunLock.held[os.path.realpath(self.path)] = self
        for folder in (out, os.path.join(out, "samples")):  # half-writes of a killed run: nobody else writes here
            remove_temporaries(folder)

    def release(self):
        RunLock.held.pop(os.path.realpath(self.path), None)
        if not self.file.closed:
            os.unlink(self.path)  # while still holding it (see the inode check above)
            self.file.close()


def check_not_running(out):
    """Early (before loading the model): refuse a folder another run is training in."""
    if os.path.isfile(os.path.join(out, LOCK_FILE)):
        RunLock(out).release()


def preflight(out, class_dir=None):
    """Before the model is loaded: the output folder (and db-prior's class images folder) can be written, and no
    other run is training there."""
    check_writable(out, "--output folder")  # a read-only or full disk, a file in the way
    check_not_running(out)
    if class_dir:
        check_writable(class_dir, "--class-dir folder")


def start_run(out, config):
    """The run's folder, its lock (one run per folder) and train_config.json -> the lock, to release at the end."""
    os.makedirs(out, exist_ok=True)
    lock = RunLock(out)  # dropped by the kernel if this process dies
    write_json(os.path.join(out, CONFIG_FILE), config)
    return lock


def resume(path, unet, new_tokens, opt, scaler, steps, master=True):
    """--resume: restore the checkpoint at `path` and drop the log lines after it -> the step to continue from."""
    start = load_checkpoint(path, unet, new_tokens, opt, scaler)
    if master:
        truncate_log(os.path.dirname(path), start)
        print(f"resuming from {path}" if start < steps else f"{path} is the run's last step: writing its final "
              "files again")
    return start


def save_lora(folder, unet, new_tokens, meta):
    """pytorch_lora_weights.safetensors (+ learned_embeds.safetensors, as the official repo: {"clip_l": [k,768],
    "clip_g": [k,1280]}, which diffusers' load_textual_inversion takes one encoder at a time)."""
    save_lora_peft(folder, {"unet": unet}, meta)
    if new_tokens:
        rows = {"clip_l": new_tokens[0].rows, "clip_g": new_tokens[1].rows}
        save_tensors(os.path.join(folder, EMBEDS_FILE), rows, meta)


def save_final(out, unet, new_tokens, meta, bundle=False, kohya_meta=None, card=None):
    """The run's deliverables: the LoRA in both formats, the token rows and the model card README.md, as one set.
    kohya_meta: the ss_* / modelspec.* keys the kohya file carries besides `meta` (model_card.kohya_metadata).

    They stay directly in out/ (where diffusers' load_lora_weights(out) and sample.py look), so the set cannot be
    switched by one rename. Instead: (1) all files are written into out/.final (atomic: whole or absent), which
    costs nothing if the disk fills or Ctrl-C comes; (2) the marker out/.final-incomplete is made; (3) each file is
    renamed into place; (4) the marker is removed. A crash in (3) leaves the marker, and files.find_lora_files
    (sample.py, merge.py) refuses the folder until `train.py --resume` writes the set again from the last
    checkpoint."""
    staging = os.path.join(out, ".final")
    with atomic(staging) as tmp:
        os.makedirs(tmp)
        save_lora(tmp, unet, new_tokens, meta)
        tokens = read_metadata_list(meta, "token") if bundle and new_tokens else []
        bundled = {t: {"clip_l": new_tokens[0].rows[i:i + 1], "clip_g": new_tokens[1].rows[i:i + 1]}
                   for i, t in enumerate(tokens)}
        save_lora_kohya(tmp, {"unet": unet}, unet.config, {**meta, **(kohya_meta or {})}, embeddings=bundled)
        if card is not None:
            with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
                f.write(card)
    marker = os.path.join(out, FINAL_INCOMPLETE)
    open(marker, "w").close()
    for name in sorted(os.listdir(staging)):
        os.replace(os.path.join(staging, name), os.path.join(out, name))
    os.rmdir(staging)
    os.unlink(marker)


def check_step_finite(out, record, precision, params=()):
    """After every step (the loss and reward, already on the CPU) and before every save (the weights, ~1,100
    tensors: only then): NaN/inf stops the run before anything is saved over the last good checkpoint. AdamW has
    already applied the step, so the weights in memory are lost."""
    bad = [k for k in ("loss", "implicit_reward") if k in record and not math.isfinite(record[k])]
    if not bad and (not params or torch.isfinite(sum(p.detach().float().sum() for p in params))):
        return
    found = checkpoints(out)
    cause = ("fp16 overflow (--precision bf16, or an fp16-safe VAE), " if precision == "fp16" else "") + \
        "too high a --lr / --ti-lr, or too large a --beta"
    what = f"the {' and '.join(bad)}" if bad else "the weights after the update"
    raise ValueError(f"step {record['step']}: {what} became NaN/inf (timesteps {record['t']}); likely {cause}. "
                     f"Nothing was saved after {found[-1][1] if found else 'the start'}: change the flag and "
                     f"{'--resume' if found else 'run again'}")


def save_checkpoint(path, unet, new_tokens, opt, scaler, step, meta):
    """LoRA + token rows + AdamW state + step, written as one folder that appears whole or not at all."""
    with atomic(path) as tmp:
        os.makedirs(tmp)
        save_lora(tmp, unet, new_tokens, meta)
        state = opt.state_dict()["state"]
        save_tensors(os.path.join(tmp, "optimizer.safetensors"),  # "3.exp_avg", "3.step", ...
                     {f"{i}.{k}": v for i, s in state.items() for k, v in s.items()})
        write_json(os.path.join(tmp, "trainer_state.json"), {"step": step, "scaler": scaler.state_dict()})


def load_checkpoint(path, unet, new_tokens, opt, scaler):
    """Restore what save_checkpoint wrote -> the step to continue from. A damaged checkpoint (a disk fault after it
    was written) is named, with the previous complete one to fall back to."""
    try:
        return _load_checkpoint(path, unet, new_tokens, opt, scaler)
    except (ValueError, KeyError, OSError) as e:
        earlier = [p for _, p in checkpoints(os.path.dirname(path)) if p != path][-1:]
        hint = (f"move {path} away and --resume continues from {earlier[0]}" if earlier else
                "no earlier checkpoint exists: start again with a new --output")
        raise ValueError(f"--resume: {path} is damaged ({e}); {hint}") from None


@torch.no_grad()
def _load_checkpoint(path, unet, new_tokens, opt, scaler):
    """The learning rates come from the arguments."""
    layers = load_lora_file(os.path.join(path, PEFT_FILE))[0]["unet"]
    for name, m in lora_modules(unet).items():
        m.lora_down.weight.copy_(layers[name][0])
        m.lora_up.weight.copy_(layers[name][1])
    if new_tokens:
        rows = load_tensors(os.path.join(path, EMBEDS_FILE))
        new_tokens[0].rows.copy_(rows["clip_l"])
        new_tokens[1].rows.copy_(rows["clip_g"])
    state = {}
    for key, v in load_tensors(os.path.join(path, "optimizer.safetensors")).items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    trainer = read_json(os.path.join(path, "trainer_state.json"))
    scaler.load_state_dict(trainer["scaler"])
    return trainer["step"]


def truncate_log(out, start):
    """Drop the steps logged after the checkpoint a resumed run continues from: they are trained again. A torn last
    line (the run was cut off while writing it: a full disk, SIGKILL) is dropped with a notice."""
    log_path = os.path.join(out, LOG_FILE)
    lines = read_text(log_path).splitlines() if os.path.exists(log_path) else []
    records = []
    for i, line in enumerate(lines):
        try:
            records.append((json.loads(line)["step"], line))
        except (ValueError, KeyError, TypeError):
            if i < len(lines) - 1:
                raise ValueError(f"{log_path}: line {i + 1} is not a step record; fix or remove that line") from None
            print(f"notice: {log_path}: dropped a torn last line (the run was cut off while writing it)",
                  file=sys.stderr)
    with atomic(log_path) as tmp, open(tmp, "w") as f:
        f.writelines(line + "\n" for step, line in records if step < start)


def append_log(out, record):
    """One line per step; a write that fails (a full disk) is taken back, so no torn line stays behind."""
    path, data = os.path.join(out, LOG_FILE), (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        except BaseException:
            os.ftruncate(fd, end)
            raise
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------
# The run as train() goes through it

class Run:
    """A training run's folder, in the order train() uses it: checked before the model loads (preflight), started
    once the settings are known (the checks of --resume, the lock, train_config.json), restored from its last
    checkpoint, a log line per step, checkpoints with sample images, and the final files. Under torchrun every
    process checks and agrees, and only rank 0 (master) writes or prints."""

    def __init__(self, out, master=True, checkpoint_every=0, class_dir=None, report=True):
        self.out, self.master, self.checkpoint_every, self.report = out, master, checkpoint_every, report
        self.lock = self.resume_from = self.bar = self.beta_check = None
        self.times, self.t0, self.stopping = [], None, 0
        if master:
            preflight(out, class_dir)  # before the model is loaded: the folders can be written, no run is there

    def say(self, text):
        if self.master:
            print(text)

    def start(self, config, resume, steps, metadata):
        """Check the folder against the run's settings (before any write), then take it: lock, train_config.json.
        metadata: what every LoRA file written carries (train_cli.lora_file_metadata)."""
        self.config, self.metadata = config, metadata
        if config["loss"] == "dco":  # the one line that says beta has saturated DCO (product/report.py)
            self.beta_check = BetaCheck(config["beta"], steps, config["relative_reward"])
        self.resume_from = check_run_folder(self.out, config, resume, steps, self.master)
        barrier()  # every process has checked the folder before rank 0 writes to it
        if self.master:
            self.lock = start_run(self.out, config)

    def restore(self, unet, new_tokens, opt, scaler, steps):
        """--resume: the last checkpoint's weights and AdamW state -> the step to continue from (0 for a new run)."""
        return resume(self.resume_from, unet, new_tokens, opt, scaler, steps, self.master) if self.resume_from else 0

    def steps(self, start, total):
        """The steps still to train, behind a progress bar (rank 0's); each step's time is taken for log(). From here
        to the end of finish() a SIGTERM or Ctrl-C only asks to stop (product/signals.py): checkpoint_due() sees it
        after the step in progress."""
        self.bar = tqdm(range(start, total), initial=start, total=total, desc="train", disable=not self.master)
        stop.deferring = True
        for step in self.bar:
            self.t0 = time.perf_counter()
            yield step

    def log(self, step, loss, reward, t, lr):
        """The global batch's loss and rewards (every process joins these collectives), checked for NaN/inf on
        every process (so they stop together), and logged by rank 0."""
        self.times.append(time.perf_counter() - self.t0)
        loss, reward = average(loss), (None if reward is None else gather(reward))
        self.record = log_record(step, loss, reward, t, lr, self.times[-1])
        check_step_finite(self.out, self.record, self.config["precision"])
        if self.master:
            append_log(self.out, self.record)
            rewards = self.record.get("implicit_rewards")
            warning = self.beta_check and self.beta_check.update(step, self.record["t"], rewards)
            if warning:
                self.bar.write(warning, file=sys.stderr)
            self.bar.set_postfix({k: f"{self.record[k]:.4g}" for k in ("loss", "implicit_reward") if k in self.record})

    def checkpoint_due(self, done, steps):
        """After `done` steps: rank 0 checkpoints (and samples) every --checkpoint-every steps and at the end; and
        every process checkpoints when a signal asked the run to stop. Every process joins one collective here, so
        all of them stop after the same step, even if the signal reached only one."""
        pause_for_test(f"step {done}")  # the test hook (product/signals.py); nothing unless DCO_TEST_PAUSE says so
        self.stopping = agree(stop.requested())  # the signal's number, 0 for none
        return bool(self.stopping) or (self.master and (done == steps or bool(self.checkpoint_every and
                                                                              done % self.checkpoint_every == 0)))

    def checkpoint(self, done, unet, new_tokens, opt, scaler, params, samples=None):
        """The weights are checked first (nothing NaN is ever saved); with --checkpoint-every 0 only that and the
        samples. samples() -> the sample images of the model as it is now. When a signal asked the run to stop: the
        checkpoint alone (even with --checkpoint-every 0; no samples, no report: a scheduler gives little time), then
        every process ends with Signalled (errors.cli: exit 128 + the signal, and the --resume line)."""
        if self.master:
            check_step_finite(self.out, self.record, self.config["precision"], params)
            if self.checkpoint_every or self.stopping:
                save_checkpoint(os.path.join(self.out, f"checkpoint-{done}"), unet, new_tokens, opt, scaler, done,
                                self.metadata)
        if self.stopping:
            barrier()  # rank 0 has saved: under torchrun no process may end before (torchrun would stop rank 0)
            self.bar.close()  # the progress bar's line ends before the one line errors.cli prints
            if self.master:
                self.lock.release()
            raise Signalled(self.stopping)
        for i, image in enumerate(samples() if samples else []):
            save_image(image, os.path.join(self.out, "samples", f"step{done:06d}-{i}.png"))
        if self.report:  # report.png and samples/progress.png, redrawn from log.jsonl
            write_report(self.out)

    def finish(self, unet, new_tokens, bundle=False, device=None, sample_prompts=()):
        """Rank 0: the final set (save_final) with the model card and the kohya file's ss_* / modelspec.* keys, the
        lock released, the speed and peak memory printed. sample_prompts: those of the samples/ images. A signal
        that came after the last step's check does not stop this: the final files are what the run was for."""
        if self.master:
            card = model_card(self.config, self.out, sample_prompts, base_license(self.config["model"]))
            save_final(self.out, unet, new_tokens, self.metadata, bundle=bundle,
                       kohya_meta=kohya_metadata(self.config), card=card)
            if self.report:
                write_report(self.out)
            self.lock.release()
            print_resources(self.times, device)
        stop.deferring = False


def log_record(step, loss, reward, t, lr, seconds):
    """A line of log.jsonl: the step, its loss, learning rate and timesteps, and for DCO the implicit reward (mean,
    and per sample: DCO's gradient weight 2 sigmoid(-beta r) depends on t, see docs/training.md), and its time."""
    record = {"step": step, "loss": loss.item(), "lr": lr, "t": t.tolist()}
    if reward is not None:
        record["implicit_reward"] = reward.mean().item()
        record["implicit_rewards"] = reward.tolist()
    record["time"] = seconds
    return record


def peak_memory(device):
    """Peak memory of this process so far, in bytes: the CUDA allocator's peak on a GPU, the peak resident set on a
    CPU (Linux VmHWM; 0 where /proc is missing)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


def print_resources(times, device):
    if times:
        what = "max_memory_allocated" if device.type == "cuda" else "peak RSS"
        print(f"median {statistics.median(times):.3g} s/step over {len(times)} steps; peak memory "
              f"{peak_memory(device) / 2 ** 30:.2f} GiB ({what})")
