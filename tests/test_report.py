"""product/report.py: report.png and samples/progress.png of a run, rebuilt identically from its log (a torn last line
included), and the beta check driven both ways on the tiny SDXL: a beta that saturates DCO at low noise within the
first fifth of the run (measured here from log.jsonl, not assumed) prints the warning with a suggested beta; a small
beta does not; and a rerun at the suggested beta keeps more than the threshold of the gradient at the same step."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from product import report

ROOT = Path(__file__).resolve().parents[1]
CHECKER = ROOT / "tinyworld" / "concepts" / "checker"


def train(out, *extra, steps=40):
    """A tiny DCO run (the shipped tiny SDXL, the checker subject) -> its stdout and stderr."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--images", str(CHECKER), "--model", "tiny", "--token", "<checker>",
           "--init-word", "yellow", "--rank", "4", "--lr", "5e-3", "--ti-lr", "1e-3", "--steps", str(steps),
           "--sample-steps", "0", "--checkpoint-every", "0", "--output", str(out), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout + r.stderr


def low_noise_share(out, beta, until, window=8):
    """From log.jsonl alone: the step (0-based) at which the mean of 2 sigmoid(-beta r) over the last `window`
    low-noise (t < 500) samples first falls below 10% before step `until`, and that share; (None, last share)."""
    recent, share = [], None
    for line in (Path(out) / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["step"] >= until:
            break
        recent = (recent + [r for t, r in zip(rec["t"], rec["implicit_rewards"]) if t < 500])[-window:]
        if len(recent) == window:
            share = sum(2 / (1 + math.exp(min(beta * r, 700))) for r in recent) / window
            if share < 0.1:
                return rec["step"], share
    return None, share


def share_at(out, beta, step, window=8):
    """The same windowed share, at a given step."""
    recent = []
    for line in (Path(out) / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        recent = (recent + [r for t, r in zip(rec["t"], rec["implicit_rewards"]) if t < 500])[-window:]
        if rec["step"] == step:
            return sum(2 / (1 + math.exp(min(beta * r, 700))) for r in recent) / len(recent)


def test_beta_check_both_ways_and_the_suggested_beta_keeps_the_gradient(tmp_path):
    steps = 150
    text = train(tmp_path / "b1000", "--beta", "1000", steps=steps)
    fired, share = low_noise_share(tmp_path / "b1000", 1000.0, steps // 5)
    assert fired is not None, f"beta 1000 did not saturate within the first fifth here (share {share})"
    warnings = [line for line in text.splitlines() if line.startswith("warning: beta")]
    assert len(warnings) == 1, text[-3000:]  # once
    m = re.search(r"by step (\d+): ([\d.]+)% of the gradient is left at t < 500 \(median reward r = l_phi - l_theta "
                  r"([-\d.e]+) there\); --beta ([\d.e+]+) would leave about half", warnings[0])
    assert m, warnings[0]
    assert int(m.group(1)) == fired + 1 and abs(float(m.group(2)) - 100 * share) < 0.051
    suggested = float(m.group(4))
    assert 1 < suggested < 1000 and abs(suggested * float(m.group(3)) - math.log(3)) < 0.01 * math.log(3) + 1e-3

    text = train(tmp_path / "b1", "--beta", "1", steps=steps)  # a beta far from saturation: no warning
    assert low_noise_share(tmp_path / "b1", 1.0, steps // 5)[0] is None
    assert "warning: beta" not in text

    train(tmp_path / "again", "--beta", f"{suggested:g}", steps=steps)  # the suggestion, measured at the same step
    kept = share_at(tmp_path / "again", suggested, fired)
    print(f"beta 1000: {100 * share:.1f}% left at step {fired + 1}; suggested beta {suggested:g}: {100 * kept:.1f}%")
    assert kept > 0.1


def test_relative_reward_runs_get_the_check_in_their_terms(tmp_path):
    text = train(tmp_path / "rel", "--relative-reward", "--beta", "1000", steps=30)
    fired, _ = low_noise_share(tmp_path / "rel", 1000.0, 30 // 5)
    warned = [line for line in text.splitlines() if line.startswith("warning: beta")]
    assert bool(warned) == (fired is not None)
    if warned:
        assert "relative reward r / l_phi" in warned[0]


def png(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.format, im.size


def test_report_and_progress_after_a_run_rebuilt_identically_torn_line_included(tmp_path):
    out = tmp_path / "run"
    train(out, "--beta", "10", "--checkpoint-every", "3", "--sample-steps", "2", steps=6)
    fmt, size = png(out / "report.png")
    assert fmt == "PNG" and size[0] >= 800 and size[1] >= 600
    fmt, (w, h) = png(out / "samples" / "progress.png")
    assert fmt == "PNG" and h >= 2 * 100  # a row per checkpoint (steps 3 and 6)
    assert sorted(report.checkpoint_samples(out)) == [3, 6]
    before = {p: (out / p).read_bytes() for p in ("report.png", "samples/progress.png")}
    r = subprocess.run([sys.executable, "-m", "product.report", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert all((out / p).read_bytes() == b for p, b in before.items())  # the same log draws the same pictures
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 0.6')  # a run cut off while writing its log
    report.main([str(out)])
    assert (out / "report.png").read_bytes() == before["report.png"]


def test_report_of_a_run_written_before_reports_and_of_dreambooth(tmp_path):
    """A folder from before this change has no report.png and no per-band records beyond log.jsonl's fields; a
    DreamBooth run has no reward: both draw (the reward panels show the loss by band, or say why not)."""
    out = tmp_path / "old"
    out.mkdir()
    records = [{"step": s, "loss": 0.1 + 0.01 * s, "lr": 5e-5, "t": [100 * s + 50], "time": 0.1} for s in range(8)]
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "train_config.json").write_text(json.dumps({"loss": "db", "lr": 5e-5, "beta": 1000.0, "name": "old"}))
    assert report.write_report(str(out)) == [str(out / "report.png")]
    assert png(out / "report.png")[0] == "PNG"


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(SystemExit) as e:  # errors.cli: one line, exit status 1
        report.main([str(tmp_path / "nothing")])
    assert "no such folder" in str(e.value.code) and "\n" not in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        report.main([str(tmp_path)])
    assert "log.jsonl: no such file" in str(e.value.code)
