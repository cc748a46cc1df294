"""torchrun's data-parallel cost on this machine, side by side in one run:  python benchmarks/ddp.py [--rounds 3]

The same global batch of 2 trained two ways on the tiny SDXL (tinyworld/model, 32 px, DCO + a new token, CPU):
    A  python train.py --batch-size 2                                  (one process)
    B  torchrun --nproc_per_node 2 train.py --batch-size 1             (two processes, gloo)
alternately (A B, B A, ...). Reported: the median step time of each (rank 0's, from log.jsonl: the all_reduce of the
gradients and the gathers for the log are inside it; start-up is not) and the median of the per-round ratios B / A.
B's two processes need two free cores: on a machine that has fewer idle, the ratio measures the contention too.
NCCL on GPUs is not measured here.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/ddp.py` as well as `python -m benchmarks.ddp`
    sys.path.insert(0, str(ROOT))
from product import errors  # noqa: E402


def median_step(cmd, out, steps):
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(cmd + ["--output", str(out)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    times = [json.loads(line)["time"] for line in open(out / "log.jsonl")]
    assert len(times) == steps
    return statistics.median(times[2:])  # the first steps warm up


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    args = errors.parse_flags(p, argv, {"rounds": ">= 1", "steps": ">= 3"})  # the median skips 2 warm-up steps
    common = [str(ROOT / "train.py"), "--images", str(ROOT / "tinyworld" / "concepts" / "checker"), "--model", "tiny",
              "--token", "<checker>", "--init-word", "yellow", "--steps", str(args.steps), "--device", "cpu",
              "--checkpoint-every", "0", "--sample-steps", "0"]
    variants = {"1 process x batch 2": [sys.executable, *common, "--batch-size", "2"],
                "torchrun 2 processes x batch 1": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   "--nproc_per_node", "2", *common, "--batch-size", "1"]}
    times = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                times[name].append(median_step(variants[name], Path(tmp, "out"), args.steps))
    a, b = times.values()
    for name, ts in times.items():
        print(f"{name:32s} median {statistics.median(ts) * 1e3:7.1f} ms/step  (rounds: "
              f"{', '.join(f'{t * 1e3:.1f}' for t in ts)})")
    print(f"ratio torchrun / one process: {statistics.median(y / x for x, y in zip(a, b)):.2f} "
          f"({args.rounds} rounds, {args.steps} steps each, {os.cpu_count()} CPUs here)")


if __name__ == "__main__":
    main()
