"""`torchrun --nproc_per_node 2 train.py ...` on the tiny random SDXL (CPU, gloo, 64 px): data parallel trains the
LoRA and the token rows one process x the global batch would (and one process with --grad-accum), rank 0 alone
writes, a killed rank ends the job, and --resume after the kill is bit-identical to an uninterrupted torchrun run.
Also --grad-accum, the LR schedules and the resume rule on the global batch (one process, no torchrun)."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from product import buckets
from test_train import argv, make_images, read_log, run

ROOT = Path(__file__).resolve().parent.parent
STEPS = 12  # enough steps after checkpoint-2 to kill a rank mid-run
# lr 5e-6: AdamW turns float rounding in an element whose gradient is ~0 into a move of up to ~lr (see the first
# test); at the default 5e-5 one LoRA element in 360k differs from one process x batch 2 by 1.5e-5, at 5e-6 by 1.5e-6.
LR = ("--lr", "5e-6")
FILES = ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors")


def torchrun(*args, cwd, stderr, launcher=(), pause=""):
    """`python -m torch.distributed.run` (= torchrun) with 2 processes on this machine, started, not waited for.
    pause: the test hook DCO_TEST_PAUSE (product/signals.py), e.g. "step 3": every rank stops itself there."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *launcher,
           str(ROOT / "train.py"), *args]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, cwd=cwd,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "DCO_TEST_PAUSE": pause})


def workers(launcher_pid):
    """{rank: pid} of torchrun's worker processes (its children, each with RANK in its environment)."""
    found = {}
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == launcher_pid:
                env = dict(kv.split("=", 1) for kv in (d / "environ").read_text().split("\0") if "=" in kv)
                found[int(env["RANK"])] = int(d.name)
        except (OSError, KeyError, ValueError):  # a process that ended meanwhile
            pass
    return found


def paused_workers(p, log):
    """{rank: pid} once both ranks have stopped themselves at the test hook (state T in /proc): a wait for a state,
    not for time (the deadline only ends a test that would otherwise hang)."""
    deadline = time.monotonic() + 300
    while True:
        ranks = workers(p.pid)
        if len(ranks) == 2 and all(state(pid) == "T" for pid in ranks.values()):
            return ranks
        assert p.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)


def state(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def max_diff(a, b):
    a, b = load_file(a), load_file(b)
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Images without captions (so a <dog> token is learned too) and the arguments every run shares."""
    root = tmp_path_factory.mktemp("ddp")
    return root, make_images(root / "dog")


@pytest.fixture(scope="module")
def ddp(tiny_sdxl, data):
    """An uninterrupted torchrun run: 2 processes x --batch-size 1, DCO + the new token, a checkpoint every 2."""
    root, images = data
    out = root / "ddp"
    with open(root / "ddp.txt", "w") as err:
        p = torchrun(*argv(images, tiny_sdxl[0], out, "--steps", str(STEPS), "--checkpoint-every", "2", *LR),
                     cwd=root, stderr=err)
        assert p.wait(timeout=300) == 0, (root / "ddp.txt").read_text()
    return out


@pytest.fixture(scope="module")
def single(tiny_sdxl, data):
    """The same runs in one process: --batch-size 2, and --batch-size 1 --grad-accum 2."""
    root, images = data
    outs = {"batch": root / "batch2", "accum": root / "accum2"}
    run(*argv(images, tiny_sdxl[0], outs["batch"], "--steps", str(STEPS), "--checkpoint-every", "2",
              "--batch-size", "2", *LR))
    run(*argv(images, tiny_sdxl[0], outs["accum"], "--steps", str(STEPS), "--checkpoint-every", "2",
              "--grad-accum", "2", *LR))
    return outs


def test_two_processes_train_as_one_process_with_the_global_batch(ddp, single):
    """2 processes x B=1 == 1 process x B=2 == 1 process x B=1 x grad-accum 2: the same images, noise and timesteps
    every step (the logs' t), the same losses, and the same LoRA and token rows up to float reduction order."""
    logs = {"ddp": read_log(ddp), **{k: read_log(v) for k, v in single.items()}}
    for name, log in logs.items():
        assert [r["step"] for r in log] == list(range(STEPS)), name  # one line per step: rank 0 alone logs
        assert [r["t"] for r in log] == [r["t"] for r in logs["ddp"]] and all(len(r["t"]) == 2 for r in log)
        assert all(len(r["implicit_rewards"]) == 2 for r in log)
        assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in logs["ddp"]], rel=1e-3, abs=1e-6)
    diffs = {(name, f): max_diff(ddp / f, out / f) for name, out in single.items() for f in FILES}
    print("max abs diff vs 2 processes x B=1:", {f"{n} {f[:7]}": f"{d:.3g}" for (n, f), d in diffs.items()})
    assert all(d <= 1e-5 for d in diffs.values())  # the bound, LoRA and token rows, both single runs
    # The LoRA against one batch of 2: a batched forward rounds differently from two of 1, and AdamW divides each
    # gradient by its own running size, so an element whose gradient is ~0 (two samples cancelling) can move by up to
    # lr x its sign noise. Bound: almost every element within 1e-5, and none by more than that Adam bound.
    a, b = load_file(ddp / FILES[0]), load_file(single["batch"] / FILES[0])
    d = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    print(f"LoRA vs batch 2: max {d.max():.3g}, mean {d.mean():.3g}, {(d > 1e-5).sum()} of {d.numel()} > 1e-5")
    assert (d > 1e-5).float().mean() < 1e-4 and d.max() <= 2 * 5e-6 * STEPS
    # and the two differ from a run that really differs (10 steps earlier): the checks above can fail
    assert max_diff(ddp / FILES[0], single["accum"] / "checkpoint-2" / FILES[0]) > 1e-5 * 3


def test_rank_0_alone_writes(ddp):
    names = sorted(str(f.relative_to(ddp)) for f in ddp.rglob("*") if f.is_file())
    assert not [n for n in names if ".tmp" in n]
    assert {"train_config.json", "log.jsonl", "lora_kohya.safetensors", *FILES} <= set(names)
    assert len([n for n in names if n.startswith("checkpoint-")]) == STEPS // 2 * 4  # 4 files per checkpoint
    config = json.loads((ddp / "train_config.json").read_text())
    assert config["world_size"] == 2 and config["global_batch_size"] == 2 and config["grad_accum"] == 1


def test_a_killed_rank_ends_the_job_and_resume_is_bit_identical(ddp, tiny_sdxl, data):
    """SIGKILL rank 1 after step 3 (the first checkpoint is at 2; both ranks stopped there by the test hook, rank 0
    continued at once): the whole job ends non-zero, rank 0 says why in one line, and `torchrun ... --resume` then
    ends with the bits of the uninterrupted run. torchrun checks its workers every 0.1 s by default and then stops the
    others with SIGTERM, often before rank 0's collective fails (1-2 s from kill to exit here, the cause named by
    torchrun's report); checking every 3 s here lets rank 0 see the failed all_reduce first, as a rank on another
    machine would."""
    root, images = data
    out, log = root / "killed", root / "killed.txt"
    args = argv(images, tiny_sdxl[0], out, "--steps", str(STEPS), "--checkpoint-every", "2", *LR)
    with open(log, "w") as err:
        p = torchrun(*args, cwd=root, stderr=err, launcher=["--monitor-interval", "3"], pause="step 3")
        try:
            ranks = paused_workers(p, log)
            os.kill(ranks[1], signal.SIGKILL)
            os.kill(ranks[0], signal.SIGCONT)
            killed = time.monotonic()
            returncode = p.wait(timeout=120)
            seconds = time.monotonic() - killed
        finally:
            p.kill()
            p.wait()
    text = log.read_text()
    print(f"killed rank 1 after {len(read_log(out))} steps: torchrun exited {returncode} {seconds:.1f} s later")
    assert returncode != 0 and seconds < 120
    assert not (out / FILES[0]).exists() and len(read_log(out)) == 3  # it died after step 3
    errors = [line for line in text.splitlines() if line.startswith("error: rank 0")]
    print("rank 0 said:", errors)
    assert len(errors) == 1 and "another process stopped" in errors[0] and "--resume" in errors[0]
    assert "rank      : 1 (local_rank: 1)\n  exitcode  : -9" in text  # and torchrun's report names rank 1's SIGKILL

    with open(root / "resumed.txt", "w") as err:
        assert torchrun(*args, "--resume", cwd=root, stderr=err).wait(timeout=300) == 0, \
            (root / "resumed.txt").read_text()
    for name in (*FILES, "lora_kohya.safetensors", f"checkpoint-{STEPS}/optimizer.safetensors"):
        a, b = load_file(ddp / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert [(r["step"], r["loss"]) for r in read_log(out)] == [(r["step"], r["loss"]) for r in read_log(ddp)]


def test_sigterm_to_one_rank_stops_every_rank_after_that_step_and_resume_is_bit_identical(ddp, tiny_sdxl, data):
    """SIGTERM to rank 1 alone after step 5 (both ranks stopped there by the test hook), with --checkpoint-every 0:
    the ranks agree to stop after step 5 (one all_reduce per step), rank 0 alone writes checkpoint-5 and says one
    line, every rank exits 143; `torchrun ... --resume` then ends with the bits of the uninterrupted run."""
    root, images = data
    out, log = root / "sigterm", root / "sigterm.txt"
    args = argv(images, tiny_sdxl[0], out, "--steps", str(STEPS), "--checkpoint-every", "0", *LR)
    with open(log, "w") as err:
        p = torchrun(*args, cwd=root, stderr=err, pause="step 5")
        try:
            ranks = paused_workers(p, log)
            os.kill(ranks[1], signal.SIGTERM)
            for pid in ranks.values():
                os.kill(pid, signal.SIGCONT)
            returncode = p.wait(timeout=300)
        finally:
            p.kill()
            p.wait()
    text = log.read_text()
    assert returncode != 0
    said = [line for line in text.splitlines() if "SIGTERM" in line and "--resume" in line]
    assert said == [f"stopped by SIGTERM; the same command with --resume continues from {out / 'checkpoint-5'}"], text
    # torchrun's report: each rank ended by the SIGTERM, 143 (the one that ends second may get torchrun's own SIGTERM
    # in its last moments, after the stop: -15)
    codes = dict(re.findall(r"rank      : (\d) \(local_rank: \d\)\n  exitcode  : (-?\d+)", text))
    assert set(codes) == {"0", "1"} and set(codes.values()) <= {"143", "-15"}, codes
    assert [d.name for d in out.glob("checkpoint-*")] == ["checkpoint-5"] and not list(out.rglob("*.tmp-*"))
    assert [r["step"] for r in read_log(out)] == list(range(5)) and not (out / FILES[0]).exists()
    with open(root / "sigterm-resumed.txt", "w") as err:
        assert torchrun(*args, "--resume", cwd=root, stderr=err).wait(timeout=300) == 0, \
            (root / "sigterm-resumed.txt").read_text()
    for name in (*FILES, "lora_kohya.safetensors"):
        a, b = load_file(ddp / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert [(r["step"], r["loss"]) for r in read_log(out)] == [(r["step"], r["loss"]) for r in read_log(ddp)]


def test_two_processes_with_buckets_train_as_one_process_with_the_global_batch(tiny_sdxl, tmp_path):
    """--buckets: each step's global batch is of one bucket, and 2 processes x B=1 split it as one process x B=2 and
    x B=1 --grad-accum 2 do: the same timesteps, and the LoRA and token rows within the bounds of the test above."""
    from test_buckets import FILES as SIZES  # portrait, landscape and square images
    images, steps = make_images(tmp_path / "dog", sizes=SIZES), 6
    args = ("--steps", str(steps), "--checkpoint-every", "0", "--buckets", "--random-flip", *LR)
    with open(tmp_path / "ddp.txt", "w") as err:
        p = torchrun(*argv(images, tiny_sdxl[0], tmp_path / "ddp", *args), cwd=tmp_path, stderr=err)
        assert p.wait(timeout=300) == 0, (tmp_path / "ddp.txt").read_text()
    run(*argv(images, tiny_sdxl[0], tmp_path / "batch", *args, "--batch-size", "2"))
    run(*argv(images, tiny_sdxl[0], tmp_path / "accum", *args, "--grad-accum", "2"))
    logs = {name: read_log(tmp_path / name) for name in ("ddp", "batch", "accum")}
    assert all([r["t"] for r in log] == [r["t"] for r in logs["ddp"]] for log in logs.values())
    diffs = {(name, f): max_diff(tmp_path / "ddp" / f, tmp_path / name / f) for name in ("batch", "accum") for f in FILES}
    print("--buckets, max abs diff vs 2 processes x B=1:", {f"{n} {f[:7]}": f"{d:.3g}" for (n, f), d in diffs.items()})
    assert diffs["accum", FILES[0]] <= 1e-5 and diffs["accum", FILES[1]] <= 1e-5 and diffs["batch", FILES[1]] <= 1e-5
    a, b = load_file(tmp_path / "ddp" / FILES[0]), load_file(tmp_path / "batch" / FILES[0])
    d = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (d > 1e-5).float().mean() < 1e-4 and d.max() <= 2 * 5e-6 * steps  # the Adam bound of the test above
    sizes, _ = buckets.training_sizes([(h, w) for w, h in SIZES], 64, 32, True)  # and the steps span buckets
    assert len({sizes[train.batch_indices(s, 2, 4, 0, buckets.groups(sizes))[0]] for s in range(steps)}) > 1


# ---------------------------------------------------------------------------------------------------------
# One process: the resume rule, the learning-rate schedules

def test_resume_keeps_the_global_batch_and_may_split_it_differently(ddp, tiny_sdxl, data, tmp_path):
    """The torchrun run's checkpoint resumed by one process: --batch-size 1 (global batch 1, not 2) is refused in one
    line; --batch-size 2 (the same global batch) continues the same run, up to float reduction order."""
    root, images = data
    out = tmp_path / "out"
    out.mkdir()
    for f in ("train_config.json", "log.jsonl"):
        (out / f).write_bytes((ddp / f).read_bytes())
    (out / "checkpoint-10").mkdir()
    for f in (ddp / "checkpoint-10").iterdir():
        (out / "checkpoint-10" / f.name).write_bytes(f.read_bytes())
    args = argv(images, tiny_sdxl[0], out, "--steps", str(STEPS), "--checkpoint-every", "2", "--resume", *LR)
    with pytest.raises(SystemExit) as e:
        train.main(args)
    msg = str(e.value.code)
    assert msg.startswith("error: --resume: the global batch") and "\n" not in msg and "--grad-accum" in msg
    run(*args, "--batch-size", "2")
    assert max_diff(ddp / FILES[1], out / FILES[1]) <= 1e-5
    assert [r["t"] for r in read_log(out)] == [r["t"] for r in read_log(ddp)]


def test_grad_accum_with_db_prior(tiny_sdxl, data, tmp_path):
    """db-prior's micro-batches are [instance; class] slices of the global batch too: --grad-accum 2 draws the same
    timesteps as --batch-size 2 and trains the same LoRA (one process; under torchrun the slices are the same code)."""
    root, images = data
    for out, extra in (("accum", ["--grad-accum", "2"]), ("batch", ["--batch-size", "2"])):
        run(*argv(images, tiny_sdxl[0], tmp_path / out, "--loss", "db-prior", "--num-class-images", "2", "--steps", "3",
                  "--sample-steps", "2", "--checkpoint-every", "0", "--class-dir", str(tmp_path / "class"), *extra))
    a, b = read_log(tmp_path / "accum"), read_log(tmp_path / "batch")
    assert [r["t"] for r in a] == [r["t"] for r in b] and len(a[0]["t"]) == 2
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)
    diff = max_diff(tmp_path / "accum" / FILES[0], tmp_path / "batch" / FILES[0])
    print(f"db-prior, grad-accum 2 vs batch 2: LoRA max abs diff {diff:.3g}")
    assert diff <= 1e-5


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_lr_schedules(schedule):
    f = [train.lr_factor(s, 4, schedule, 14) for s in range(14)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]  # warm-up: the first step already trains
    want = {"constant": [1.0] * 10, "linear": [1 - i / 10 for i in range(10)],
            "cosine": [0.5 * (1 + math.cos(math.pi * i / 10)) for i in range(10)]}[schedule]
    assert f[4:] == pytest.approx(want)
    assert train.lr_factor(5, 0, "constant", 9) == 1.0


def test_the_schedule_is_what_trains_and_is_logged(tiny_sdxl, data, tmp_path):
    root, images = data
    run(*argv(images, tiny_sdxl[0], tmp_path / "out", "--steps", "3", "--checkpoint-every", "0",
              "--lr-warmup", "2", "--lr-schedule", "linear", "--loss", "db"))
    assert [r["lr"] for r in read_log(tmp_path / "out")] == pytest.approx([2.5e-5, 5e-5, 5e-5])


@pytest.mark.parametrize("flag, value", [("--grad-accum", "0"), ("--lr-warmup", "-1")])
def test_bad_flags_are_one_line(flag, value, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(["--images", str(tmp_path), flag, value])
    msg = str(e.value.code)
    assert msg.startswith("error: ") and flag in msg and "\n" not in msg
