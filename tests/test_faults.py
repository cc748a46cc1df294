"""Faults and bad input on the tiny SDXL: a full or read-only disk, Ctrl-C in the final save, a torn log, damaged
files, a stalled hub, a token past CLIP's window, NaN guidance and losses, two runs in one folder, changed images on
--resume, file permissions. Every error is one line that names the file or flag; nothing is half-written; the
obvious next command (--resume, or the same command) works and gives the same bits as an uninterrupted run.

The disk tests mount a small tmpfs (root, where mounts are allowed) and skip with the reason elsewhere: permission
bits mean nothing to root, so a chmod'ed folder would make a test that cannot fail."""
import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from product import run_folder
from product import files
import merge
import sample
import sdxl
import train
from dco import dco_loss
from test_train import argv, make_images, read_log

ROOT = Path(__file__).resolve().parent.parent
FINAL = (files.PEFT_FILE, files.KOHYA_FILE, files.EMBEDS_FILE)


def error_of(main, args):
    """The one line a CLI exits with (status 1)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    msg = str(e.value.code)
    print(msg)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def same_tensors(a, b):
    a, b = load_file(a), load_file(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def leftovers(folder):
    return [str(p) for p in Path(folder).rglob("*") if ".tmp" in p.name or p.name in (".final", files.FINAL_INCOMPLETE)]


@contextlib.contextmanager
def tmpfs(path, size):
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): needs root where mounts are allowed")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path, options):
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def fill(folder, leave=0):
    """Fill a file system to the last byte, then give `leave` bytes back."""
    with open(Path(folder) / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        f.truncate(f.tell() - leave)


@pytest.fixture(scope="module")
def base(tiny_sdxl, tmp_path_factory):
    """A finished DCO run (4 steps, checkpoints at 2 and 4) under umask 022: (images folder, output folder)."""
    root = tmp_path_factory.mktemp("faults")
    images = make_images(root / "dog")
    old = os.umask(0o022)
    try:
        train.main(argv(images, tiny_sdxl[0], root / "out", "--checkpoint-every", "2"))
    finally:
        os.umask(old)
    return images, root / "out"


def copy_run(base, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(base[1], out)
    return out


def no_model(monkeypatch):
    """The checks must come before the model is loaded."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")
    monkeypatch.setattr(train, "load_sdxl", refuse)
    monkeypatch.setattr(sdxl, "load_sdxl", refuse)


# ----------------------------------------------------------------------------------------------------------
# Outputs: permissions, read-only and full disks

def test_outputs_get_the_usual_permissions(base):
    modes = {str(p.relative_to(base[1])): oct(p.stat().st_mode & 0o777) for p in base[1].rglob("*") if p.is_file()}
    assert set(modes.values()) == {"0o644"}, modes


def test_read_only_output_is_refused_before_loading(tiny_sdxl, base, tmp_path, monkeypatch):
    with tmpfs(tmp_path / "ro", "1m") as ro:
        (ro / "old").mkdir()
        remount(ro, "ro")
        no_model(monkeypatch)
        msg = error_of(train.main, argv(base[0], tiny_sdxl[0], ro / "out"))
        assert "--output" in msg and "Read-only" in msg
        msg = error_of(sample.main, ["--model", tiny_sdxl[0], "--prompt", "a dog", "--output", ro / "x.png",
                                     "--device", "cpu"])
        assert "--output" in msg and "Read-only" in msg
        msg = error_of(merge.main, [base[1], base[1], "--output", ro / "merged"])
        assert "--output" in msg and "Read-only" in msg
        assert sorted(p.name for p in ro.iterdir()) == ["old"]


def test_output_that_is_a_file_or_folder_in_the_way(tiny_sdxl, base, tmp_path, monkeypatch):
    no_model(monkeypatch)
    (tmp_path / "afile").write_text("x")
    assert "exists and is not a folder" in error_of(train.main, argv(base[0], tiny_sdxl[0], tmp_path / "afile"))
    assert "is a folder" in error_of(sample.main, ["--model", tiny_sdxl[0], "--prompt", "a", "--output", tmp_path,
                                                   "--device", "cpu"])


def test_full_disk_while_training_then_resume(tiny_sdxl, base, tmp_path):
    """Room for checkpoint-2 (4.4 MB) but not checkpoint-4: one line; then with space, --resume finishes it with
    the bits of an uninterrupted run."""
    with tmpfs(tmp_path / "disk", "7m") as disk:
        out = disk / "out"
        args = argv(base[0], tiny_sdxl[0], out, "--checkpoint-every", "2")
        msg = error_of(train.main, args)
        assert "No space left on device" in msg and "free some space" in msg
        assert msg.endswith(f"the same command with --resume continues from {out / 'checkpoint-2'}")
        assert [s for s, _ in run_folder.checkpoints(out)] == [2] and not leftovers(out)
        assert not any((out / f).exists() for f in FINAL)
        assert [r["step"] for r in read_log(out)] == [0, 1, 2, 3]  # every line whole
        remount(disk, "size=64m")
        train.main(args + ["--resume"])
        for f in FINAL:
            assert same_tensors(base[1] / f, out / f), f
        assert [(r["step"], r["loss"]) for r in read_log(out)] == [(r["step"], r["loss"]) for r in read_log(base[1])]


def test_full_disk_keeps_the_previous_image(tiny_sdxl, tmp_path):
    with tmpfs(tmp_path / "disk", "512k") as disk:
        cmd = ["--model", tiny_sdxl[0], "--prompt", "a dog", "--device", "cpu", "--steps", "2", "--height", "64",
               "--output", disk / "x.png", "--n", "1"]
        sample.main([str(a) for a in cmd])
        good = (disk / "x.png").read_bytes()
        assert len(good) > 8192  # so it cannot fit in what is left: the write fails midway
        fill(disk, leave=8192)  # room for the early check, not for the image
        msg = error_of(sample.main, cmd + ["--seed", "1"])
        assert "No space left on device" in msg
        assert (disk / "x.png").read_bytes() == good
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "x.png"]


def test_full_disk_during_a_merge_leaves_no_output(base, tmp_path):
    other = tmp_path / "other"  # the same LoRA without its token (one token cannot come from two LoRAs)
    shutil.copytree(base[1], other, ignore=shutil.ignore_patterns("checkpoint-*", files.EMBEDS_FILE))
    with tmpfs(tmp_path / "disk", "2m") as disk:
        fill(disk, leave=1 << 20)  # room for the check, not for the ~3 MB merged LoRA
        msg = error_of(merge.main, [base[1], other, "--output", disk / "merged"])
        assert "No space left on device" in msg and str(disk / "merged") in msg
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_a_failed_log_append_leaves_no_torn_line(tmp_path):
    with tmpfs(tmp_path / "disk", "64k") as disk:
        run_folder.append_log(disk, {"step": 0, "loss": 1.0})
        before = (disk / "log.jsonl").read_bytes()
        fill(disk)
        with pytest.raises(OSError) as e:
            run_folder.append_log(disk, {"step": 1, "loss": 1.0, "pad": "x" * 20000})  # more than the page's slack
        assert e.value.errno == errno.ENOSPC
        assert (disk / "log.jsonl").read_bytes() == before


# ----------------------------------------------------------------------------------------------------------
# --resume: torn log, interrupted final save, damaged checkpoint, changed data, a second run

def test_torn_log_line_is_dropped_with_a_notice(tiny_sdxl, base, tmp_path, capsys):
    out = copy_run(base, tmp_path)
    shutil.rmtree(out / "checkpoint-4")
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # the disk filled (or the power went) mid-line
    train.main(argv(base[0], tiny_sdxl[0], out, "--checkpoint-every", "2", "--resume"))
    assert "dropped a torn last line" in capsys.readouterr().err
    assert [r["step"] for r in read_log(out)] == [0, 1, 2, 3]
    assert same_tensors(base[1] / files.PEFT_FILE, out / files.PEFT_FILE)


def test_interrupted_final_save_is_refused_then_resume_repairs(tiny_sdxl, base, tmp_path, monkeypatch, capsys):
    """Ctrl-C between the renames of the final set: the folder holds a mix of two steps. sample.py and merge.py
    refuse it; --resume (already at its last step) writes the set again."""
    out = copy_run(base, tmp_path)
    for f in (files.PEFT_FILE, files.EMBEDS_FILE):  # an older set (step 2) is in place, as after an earlier run
        shutil.copy(out / "checkpoint-2" / f, out / f)
    shutil.rmtree(out / "checkpoint-4")
    real = os.replace

    def ctrl_c(src, dst):
        if os.path.basename(os.path.dirname(src)) == ".final" and dst.endswith(files.KOHYA_FILE):
            raise KeyboardInterrupt
        return real(src, dst)
    monkeypatch.setattr(os, "replace", ctrl_c)
    args = [str(a) for a in argv(base[0], tiny_sdxl[0], out, "--checkpoint-every", "2", "--resume")]
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert e.value.code == 130
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("interrupted; ") and f"--resume continues from {out / 'checkpoint-4'}" in err, err
    monkeypatch.setattr(os, "replace", real)
    assert (out / files.FINAL_INCOMPLETE).exists()
    assert same_tensors(base[1] / files.EMBEDS_FILE, out / files.EMBEDS_FILE)  # new ...
    assert not same_tensors(base[1] / files.PEFT_FILE, out / files.PEFT_FILE)  # ... and old: a mixed set
    msg = error_of(sample.main, ["--model", tiny_sdxl[0], "--lora", out, "--prompt", "a <dog>", "--device", "cpu",
                                 "--output", tmp_path / "x.png"])
    assert "interrupted" in msg and "--resume" in msg
    assert "interrupted" in error_of(merge.main, [out, base[1], "--output", tmp_path / "m"])
    train.main(args)  # at its last step: re-exports the final set from checkpoint-4
    assert not leftovers(out)
    for f in FINAL:
        assert same_tensors(base[1] / f, out / f), f


def test_ctrl_c_before_the_first_checkpoint_then_the_same_command(tiny_sdxl, base, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = [str(a) for a in argv(base[0], tiny_sdxl[0], out, "--checkpoint-every", "2")]
    real, calls = run_folder.append_log, []

    def ctrl_c_at_step_1(folder, record):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(folder, record)
    monkeypatch.setattr(run_folder, "append_log", ctrl_c_at_step_1)
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert e.value.code == 130
    assert capsys.readouterr().err.splitlines()[-1] == ("interrupted; no checkpoint was saved yet: run the same "
                                                        "command again")
    monkeypatch.setattr(run_folder, "append_log", real)
    assert "without --resume" in error_of(train.main, args + ["--resume"])
    train.main(args)  # as it says
    assert "stopped before its first checkpoint" in capsys.readouterr().err
    assert [r["step"] for r in read_log(out)] == [0, 1, 2, 3]
    for f in FINAL:
        assert same_tensors(base[1] / f, out / f), f


def test_damaged_checkpoint_names_the_file_and_the_previous_one(tiny_sdxl, base, tmp_path):
    out = copy_run(base, tmp_path)
    opt = out / "checkpoint-4" / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:1000])
    msg = error_of(train.main, argv(base[0], tiny_sdxl[0], out, "--checkpoint-every", "2", "--resume", "--steps", "6"))
    assert str(opt) in msg and "checkpoint-2" in msg
    (out / "checkpoint-4" / "optimizer.safetensors").unlink()
    shutil.rmtree(out / "checkpoint-4")
    (out / "checkpoint-2" / "trainer_state.json").write_text('{"step": 2,')
    msg = error_of(train.main, argv(base[0], tiny_sdxl[0], out, "--checkpoint-every", "2", "--resume"))
    assert "trainer_state.json" in msg and "malformed JSON" in msg


def test_changed_images_or_settings_are_refused_on_resume(tiny_sdxl, base, tmp_path):
    out = copy_run(base, tmp_path)
    images = tmp_path / "dog"
    shutil.copytree(base[0], images)
    resume = argv(images, tiny_sdxl[0], out, "--checkpoint-every", "2", "--resume", "--steps", "6")
    config = json.loads((out / "train_config.json").read_text())
    moved = {**config, "images": [str(images / Path(p).name) for p in config["images"]]}
    run_folder.check_same_images(out, config, moved)  # the same images in another folder: fine
    config = moved  # as if the run had used this copy
    (out / "train_config.json").write_text(json.dumps(config))
    msg = error_of(train.main, resume + ["--rank", "8"])
    assert "rank" in msg and "32" in msg and "8" in msg
    Image.fromarray(np.zeros((96, 64, 3), np.uint8)).save(images / "1.png")  # same name, same size, other pixels
    msg = error_of(train.main, resume)
    assert "changed" in msg and str(images / "1.png") in msg and "0.png" not in msg


def test_a_second_run_in_the_folder_is_refused_and_a_killed_ones_lock_is_not(tiny_sdxl, base, tmp_path):
    out = tmp_path / "out"
    args = [str(a) for a in argv(base[0], tiny_sdxl[0], out, "--checkpoint-every", "2", "--steps", "6")]
    with open(tmp_path / "stderr.txt", "w") as err:  # the test hook: it stops itself after step 3 (product/signals.py)
        p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], stdout=subprocess.DEVNULL, stderr=err,
                             cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", "DCO_TEST_PAUSE": "step 3"})
        try:
            _, status = os.waitpid(p.pid, os.WUNTRACED)
            assert os.WIFSTOPPED(status), (tmp_path / "stderr.txt").read_text()
            msg = error_of(train.main, args + ["--resume"])
            assert "another run is training" in msg and f"PID {p.pid}" in msg
            os.kill(p.pid, signal.SIGKILL)
        finally:
            p.kill()
            p.wait()
    assert (out / ".lock").exists()  # left by the killed run: stale, it must not block
    (out / "checkpoint-999.tmp-99999999").mkdir()  # as a checkpoint being written when the SIGKILL came
    last = run_folder.checkpoints(out)[-1][0]
    train.main(args[:-2] + ["--steps", str(last + 2), "--resume"])
    assert (out / files.PEFT_FILE).is_file() and not (out / ".lock").exists() and not leftovers(out)


# ----------------------------------------------------------------------------------------------------------
# Damaged and wrong files: one line naming the file

@pytest.mark.parametrize("case", ["lora-truncated", "lora-pickle", "lora-nan", "embeds-truncated",
                                  "single-file-truncated", "model-config-json", "tokenizer-not-utf8",
                                  "unet-of-another-model"])
def test_damaged_model_files_are_one_line(case, tiny_sdxl, base, tmp_path):
    model, lora = tmp_path / "model", tmp_path / "lora"
    shutil.copytree(tiny_sdxl[0], model)
    shutil.copytree(base[1], lora, ignore=shutil.ignore_patterns("checkpoint-*"))
    if case == "lora-truncated":
        bad = lora / files.PEFT_FILE
        bad.write_bytes(bad.read_bytes()[:5000])
    elif case == "lora-pickle":
        bad = lora / files.PEFT_FILE
        torch.save({"a": torch.zeros(2)}, bad)
    elif case == "lora-nan":  # a diverged run's weights would draw black images
        bad = lora / files.PEFT_FILE
        weights = load_file(bad)
        next(v for k, v in weights.items() if "lora_B" in k or "up" in k).fill_(float("nan"))
        files.save_tensors(bad, weights, {"format": "pt"})
    elif case == "tokenizer-not-utf8":
        bad = model / "tokenizer_2" / "merges.txt"
        bad.write_bytes(bad.read_bytes() + "caf\u00e9 x\n".encode("latin-1"))
    elif case == "embeds-truncated":
        bad = lora / files.EMBEDS_FILE
        bad.write_bytes(bad.read_bytes()[:100])
    elif case == "single-file-truncated":
        bad = tmp_path / "model.safetensors"
        shutil.copy(model / "unet" / "diffusion_pytorch_model.safetensors", bad)
        bad.write_bytes(bad.read_bytes()[:3000])
        model = bad
    elif case == "model-config-json":
        bad = model / "vae" / "config.json"
        bad.write_text(bad.read_text()[:-20])
    else:
        bad = model / "unet"
        config = json.loads((bad / "config.json").read_text())
        config["cross_attention_dim"] *= 2
        (bad / "config.json").write_text(json.dumps(config))
    lora_arg = str(bad) if case == "lora-pickle" else str(lora)
    msg = error_of(sample.main, ["--model", model, "--lora", lora_arg, "--prompt", "a <dog>", "--device", "cpu",
                                 "--output", tmp_path / "x.png", "--steps", "1"])
    assert str(bad) in msg
    if case == "unet-of-another-model":
        assert "do not fit its config.json" in msg
    if case == "lora-nan":
        assert "NaN/inf" in msg
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("case", ["caption-not-utf8", "config-json"])
def test_undecodable_data_names_the_file(case, tiny_sdxl, tmp_path):
    images = make_images(tmp_path / "dog", sizes=((64, 64),))
    extra = []
    if case == "caption-not-utf8":
        bad = images / "0.txt"
        bad.write_bytes("a photo of <dog> in the caf\u00e9".encode("latin-1"))
    else:
        bad = tmp_path / "config.json"
        bad.write_text('{"dog": {"images": [}')
        extra = ["--config", bad, "--config-name", "dog"]
    msg = error_of(train.main, argv(images, tiny_sdxl[0], tmp_path / "out", *extra))
    assert str(bad) in msg
    assert not (tmp_path / "out").exists()


def test_train_config_json_malformed_names_it(tiny_sdxl, base, tmp_path):
    out = copy_run(base, tmp_path)
    (out / "train_config.json").write_text("{")
    msg = error_of(train.main, argv(base[0], tiny_sdxl[0], out, "--resume", "--steps", "6"))
    assert "train_config.json" in msg and "malformed JSON" in msg


# ----------------------------------------------------------------------------------------------------------
# The network

def test_a_stalled_hub_ends_in_one_line(tmp_path):
    """A hub that accepts the connection and never answers: one line within a minute, naming the model."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in iter(int, 1)], daemon=True).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{server.getsockname()[1]}", HF_HUB_CACHE=str(tmp_path / "cache"),
               HF_HOME=str(tmp_path / "home"), NO_PROXY="127.0.0.1", no_proxy="127.0.0.1",
               HF_HUB_DISABLE_TELEMETRY="1")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, str(ROOT / "sdxl.py"), "--model", "someone/sdxl-stalled"], env=env,
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    seconds = time.monotonic() - t0
    print(f"{seconds:.1f} s: {p.stderr}")
    assert held, "the test server never saw a connection"
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: ")
    assert "someone/sdxl-stalled" in p.stderr and "HF_HUB_OFFLINE=1" in p.stderr
    assert seconds < 60
    server.close()


# ----------------------------------------------------------------------------------------------------------
# Meaning: CLIP's window, finite numbers, devices, memory

def test_a_token_past_the_window_is_refused(tiny_sdxl, tmp_path):
    images = make_images(tmp_path / "dog", sizes=((64, 64),))
    caption = images / "0.txt"
    caption.write_text("a photo of a dog, " * 20 + "<dog>")
    msg = error_of(train.main, argv(images, tiny_sdxl[0], tmp_path / "out"))
    assert str(caption) in msg and "<dog> is token" in msg and "CLIP tokens" in msg
    assert not (tmp_path / "out").exists()


def test_long_captions_and_prompts_are_warned(tiny_sdxl, tmp_path, capsys):
    images = make_images(tmp_path / "dog", sizes=((64, 64),))
    (images / "0.txt").write_text("a photo of <dog>, " + "on the grass " * 30)
    train.main([str(a) for a in argv(images, tiny_sdxl[0], tmp_path / "out", "--steps", "1")])
    err = capsys.readouterr().err
    assert "0.txt: the caption is" in err and "only the first 75 are read" in err
    sample.main(["--model", str(tiny_sdxl[0]), "--prompt", "a dog " * 50, "--device", "cpu", "--steps", "1",
                 "--height", "64", "--n", "1", "--output", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert "warning: --prompt is" in err and "CLIP tokens; only the first 75 are read" in err


@pytest.mark.parametrize("tool,flag,value", [("sample", "--wcon", "nan"), ("sample", "--cfg", "inf"),
                                             ("sample", "--lora", "nan"), ("train", "--beta", "nan"),
                                             ("train", "--lr", "inf"), ("merge", "--weights", "nan")])
def test_non_finite_numbers_are_refused(tool, flag, value, tiny_sdxl, base, tmp_path, monkeypatch):
    no_model(monkeypatch)
    if tool == "sample":
        arg = f"{base[1]}:{value}" if flag == "--lora" else value
        extra = [] if flag == "--lora" else ["--lora", base[1]]
        msg = error_of(sample.main, ["--model", tiny_sdxl[0], "--prompt", "a <dog>", "--device", "cpu", flag, arg,
                                     *extra, "--output", tmp_path / "x.png"])
    elif tool == "train":
        msg = error_of(train.main, argv(base[0], tiny_sdxl[0], tmp_path / "out", flag, value))
    else:
        msg = error_of(merge.main, [base[1], base[1], "--weights", "1", value, "--output", tmp_path / "out"])
    assert flag in msg and "finite" in msg
    assert not list(tmp_path.iterdir())


def test_a_nan_loss_stops_training_before_any_save(tiny_sdxl, base, tmp_path):
    calls = []

    def nan_at_step_3(eps_theta, eps_phi, eps, beta):
        calls.append(1)
        loss, reward = dco_loss(eps_theta, eps_phi, eps, beta)
        return (loss * float("nan"), reward) if len(calls) == 4 else (loss, reward)
    out = tmp_path / "out"
    args = train.parse_args([str(a) for a in argv(base[0], tiny_sdxl[0], out, "--checkpoint-every", "2")])
    with pytest.raises(ValueError) as e:
        train.train(args, loss_fn=nan_at_step_3)
    msg = str(e.value)
    print(msg)
    assert msg.startswith("step 3: the loss") and "timesteps [" in msg and "--lr" in msg and "--beta" in msg
    assert str(out / "checkpoint-2") in msg
    assert [s for s, _ in run_folder.checkpoints(out)] == [2] and not any((out / f).exists() for f in FINAL)
    assert [r["step"] for r in read_log(out)] == [0, 1, 2]
    # --resume, as the message says, in this same process while the failed run's traceback (and lock) is still held
    train.main([str(a) for a in argv(base[0], tiny_sdxl[0], out, "--checkpoint-every", "2", "--resume")])
    assert e.value is not None and all((out / f).is_file() for f in FINAL)


def test_devices_are_checked(tiny_sdxl, base, tmp_path, monkeypatch):
    no_model(monkeypatch)
    msg = error_of(train.main, argv(base[0], tiny_sdxl[0], tmp_path / "out")[:-4] + ["--device", "gpu0"])
    assert "--device gpu0" in msg
    if not torch.cuda.is_available():
        msg = error_of(sample.main, ["--model", tiny_sdxl[0], "--prompt", "a", "--device", "cuda",
                                     "--output", tmp_path / "x.png"])
        assert "--device cuda" in msg and "no CUDA" in msg


def test_a_size_that_cannot_be_allocated_is_one_line(tiny_sdxl, tmp_path):
    msg = error_of(sample.main, ["--model", tiny_sdxl[0], "--prompt", "a dog", "--device", "cpu", "--steps", "1",
                                 "--height", "8000000", "--n", "1", "--output", tmp_path / "x.png"])
    assert "out of memory" in msg and "--height" in msg
    assert not (tmp_path / "x.png").exists()


def test_a_cut_off_final_save_without_checkpoints_starts_again(tmp_path, capsys):
    """--checkpoint-every 0: nothing to resume from, so the same command starts the run again."""
    out = tmp_path / "out"
    out.mkdir()
    (out / run_folder.CONFIG_FILE).write_text("{}")
    (out / files.PEFT_FILE).write_bytes(b"")
    with pytest.raises(ValueError, match="already holds a training run"):  # finished: kept
        run_folder.check_run_folder(str(out), {}, False, 4)
    (out / files.FINAL_INCOMPLETE).touch()
    assert run_folder.check_run_folder(str(out), {}, False, 4) is None
    assert "starting it again" in capsys.readouterr().err


def test_review_cases_are_one_line(tiny_sdxl, tmp_path):
    """Cases found in review: db-prior with --sample-steps 0 generates its class images all the same; --snr-gamma with
    --relative-reward (the weights cancel) and a non-finite --snr-gamma are refused; a --config that is not the
    official format is one line; --resume of a run finished without checkpoints says there is nothing to resume."""
    import train
    from test_train import argv, make_images, run

    images = make_images(tmp_path / "dog")
    run(*argv(images, tiny_sdxl[0], tmp_path / "prior"), "--steps", "1", "--loss", "db-prior", "--num-class-images",
        "2", "--checkpoint-every", "0", "--sample-steps", "0")
    assert len(list((tmp_path / "prior" / "class_images").glob("*.png"))) == 2
    for extra, words in ((["--relative-reward", "--snr-gamma", "5"], "no effect"),
                         (["--snr-gamma", "nan"], "--snr-gamma nan")):
        with pytest.raises(ValueError, match=words):
            train.parse_args(argv(images, tiny_sdxl[0], tmp_path / "x") + extra)
    config = tmp_path / "config.json"
    for text in ("[1, 2]", '{"a": {"prompts": []}}'):
        config.write_text(text)
        with pytest.raises(SystemExit) as e:
            train.main(["--config", str(config), "--config-name", "a", "--model", str(tiny_sdxl[0])])
        assert str(e.value.code).startswith("error: --config") and "\n" not in str(e.value.code)
    run(*argv(images, tiny_sdxl[0], tmp_path / "done"), "--steps", "1", "--checkpoint-every", "0")
    with pytest.raises(ValueError, match="nothing to resume"):
        run(*argv(images, tiny_sdxl[0], tmp_path / "done"), "--steps", "2", "--checkpoint-every", "0", "--resume")
