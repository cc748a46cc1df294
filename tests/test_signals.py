"""SIGTERM (what Slurm, Kubernetes and cloud schedulers send before a kill) and Ctrl-C, each at an exact point.

No test here waits for time to pass: the run stops itself with SIGSTOP where the test hook DCO_TEST_PAUSE says
(product/signals.py: "step N" after train.py's N-th step, "write NAME" when NAME's temporary is complete, before it
is renamed into place); the test waits for that (waitpid WUNTRACED), sends its signal and SIGCONTs it.

train.py on SIGTERM finishes the step, checkpoints it (also with --checkpoint-every 0), exits 143 with one line, and
--resume then ends with the bits of an uninterrupted run. During that save a second Ctrl-C discards it whole, a
repeated SIGTERM is ignored, a SIGKILL leaves only a temporary that the next run removes. sample.py and merge.py on
SIGTERM leave no file. (torchrun: tests/test_distributed.py.)"""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from product import files, run_folder
from test_train import argv, make_images, read_log, run

ROOT = Path(__file__).resolve().parent.parent
FINAL = (files.PEFT_FILE, files.KOHYA_FILE, files.EMBEDS_FILE)


def start(script, args, pause, cwd):
    """`python script args` with the test hook set: it stops itself at `pause`. -> (process, its stderr file)."""
    err = Path(cwd) / f"stderr-{len(list(Path(cwd).glob('stderr-*')))}.txt"
    p = subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], stdout=subprocess.DEVNULL,
                         stderr=open(err, "w"), cwd=cwd,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "DCO_TEST_PAUSE": pause})
    return p, err


def wait_stopped(p, err):
    """Until the process has stopped itself (SIGSTOP) at the hook; it must not have ended instead."""
    _, status = os.waitpid(p.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"the process ended instead of pausing: {err.read_text()}"


def send(p, signum):
    os.kill(p.pid, signum)
    os.kill(p.pid, signal.SIGCONT)


def last_line(err):
    return err.read_text().rstrip("\n").split("\n")[-1]


def same_files(a, b, names=FINAL):
    for name in names:
        x, y = load_file(Path(a) / name), load_file(Path(b) / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


def leftovers(folder):
    """Half-writes: temporaries of files.atomic."""
    return [p.name for p in Path(folder).rglob("*") if ".tmp-" in p.name]


@pytest.fixture(scope="module")
def data(tiny_sdxl, tmp_path_factory):
    """Images without captions (a <dog> token is learned too) and an uninterrupted 6-step run of them."""
    root = tmp_path_factory.mktemp("signals")
    images = make_images(root / "dog")
    run(*argv(images, tiny_sdxl[0], root / "straight", "--steps", "6", "--checkpoint-every", "0"))
    return images, root / "straight"


def args_of(data, tiny_sdxl, out, every):
    return argv(data[0], tiny_sdxl[0], out, "--steps", "6", "--checkpoint-every", every)


@pytest.mark.parametrize("every", ["2", "0"])
def test_sigterm_checkpoints_the_step_and_resume_is_bit_identical(every, data, tiny_sdxl, tmp_path):
    out = tmp_path / "out"
    p, err = start("train.py", args_of(data, tiny_sdxl, out, every), "step 3", tmp_path)
    wait_stopped(p, err)
    send(p, signal.SIGTERM)
    assert p.wait() == 143, err.read_text()
    assert last_line(err) == f"stopped by SIGTERM; the same command with --resume continues from {out / 'checkpoint-3'}"
    assert err.read_text().count("SIGTERM") == 1  # one line
    assert [s for s, _ in run_folder.checkpoints(out)] == ([2, 3] if every == "2" else [3])
    assert [r["step"] for r in read_log(out)] == [0, 1, 2] and not leftovers(out)
    assert not (out / run_folder.LOCK_FILE).exists()  # released, as at the end of a run
    assert not any((out / f).exists() for f in FINAL) and not list((out / "samples").glob("step000003*"))
    run(*args_of(data, tiny_sdxl, out, every), "--resume")  # as the line says
    same_files(data[1], out)
    assert [(r["step"], r["loss"]) for r in read_log(out)] == [(r["step"], r["loss"]) for r in read_log(data[1])]


@pytest.mark.parametrize("second", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_a_second_signal_during_that_save_leaves_nothing_half_written(second, data, tiny_sdxl, tmp_path):
    """A SIGTERM after step 3, and while checkpoint-3 is being written (its temporary complete, not yet renamed) a
    second signal: Ctrl-C discards the checkpoint whole (exit 130, checkpoint-2 stays the last), a repeated SIGTERM
    is ignored (the save completes, exit 143), SIGKILL leaves a temporary that the next run removes. Each time
    --resume ends with the bits of the uninterrupted run."""
    out = tmp_path / "out"
    args = args_of(data, tiny_sdxl, out, "2")
    p, err = start("train.py", args, "step 3, write checkpoint-3", tmp_path)
    wait_stopped(p, err)
    send(p, signal.SIGTERM)
    wait_stopped(p, err)  # now inside the save
    assert (out / f"checkpoint-3.tmp-{p.pid}" / files.PEFT_FILE).is_file() and not (out / "checkpoint-3").exists()
    send(p, getattr(signal, second))
    code = p.wait()
    found = [s for s, _ in run_folder.checkpoints(out)]
    if second == "SIGINT":
        assert code == 130 and found == [2] and not leftovers(out)
        assert last_line(err) == f"interrupted; the same command with --resume continues from {out / 'checkpoint-2'}"
    elif second == "SIGTERM":
        assert code == 143 and found == [2, 3] and not leftovers(out)
        assert last_line(err).endswith(f"--resume continues from {out / 'checkpoint-3'}")
    else:
        assert code == -signal.SIGKILL and found == [2] and (out / f"checkpoint-3.tmp-{p.pid}").is_dir()
    run(*args, "--resume")
    same_files(data[1], out)
    assert not leftovers(out)


def test_sigterm_before_the_steps_ends_at_once_and_the_same_command_works(data, tiny_sdxl, tmp_path):
    """While train_config.json is being written (before any step): exit 143 at once, no half file; the line says
    to run the same command again, and that trains the run."""
    out = tmp_path / "out"
    args = args_of(data, tiny_sdxl, out, "0")
    p, err = start("train.py", args, f"write {run_folder.CONFIG_FILE}", tmp_path)
    wait_stopped(p, err)
    send(p, signal.SIGTERM)
    assert p.wait() == 143
    assert last_line(err) == "stopped by SIGTERM; no checkpoint was saved yet: run the same command again"
    assert not (out / run_folder.CONFIG_FILE).exists() and not leftovers(out)
    run(*args)
    same_files(data[1], out)


@pytest.fixture(scope="module")
def loras(data, tmp_path_factory):
    """Two LoRA folders for merge.py: the uninterrupted run, and a copy without its token."""
    root = tmp_path_factory.mktemp("loras")
    other = root / "other"
    shutil.copytree(data[1], other, ignore=shutil.ignore_patterns("checkpoint-*", files.EMBEDS_FILE))
    return data[1], other


@pytest.mark.parametrize("tool", ["sample", "merge"])
def test_sample_and_merge_on_sigterm_leave_no_file(tool, tiny_sdxl, loras, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    if tool == "sample":
        args, name = ["--model", tiny_sdxl[0], "--prompt", "a photo of <dog>", "--lora", loras[0], "--device", "cpu",
                      "--steps", "1", "--height", "64", "--n", "1", "--output", work / "x.png"], "x.png"
    else:
        args, name = [loras[0], loras[1], "--output", work / "merged"], "merged"
    p, err = start(f"{tool}.py", args, f"write {name}", tmp_path)
    wait_stopped(p, err)
    assert list(work.iterdir())  # the temporary, complete, about to be renamed
    send(p, signal.SIGTERM)
    assert p.wait() == 143
    assert last_line(err) == "stopped by SIGTERM; run the same command again" and "Traceback" not in err.read_text()
    assert not list(work.iterdir())
