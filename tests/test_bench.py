"""bench.py: `--quick` runs end to end and reports every CPU row with a numeric ratio (timings are not asserted: they
are noise on a shared machine), its SDXL configs are SDXL's, and the CUDA-only row (e) code runs (on CPU, with the
torch.cuda calls it makes stubbed)."""
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from benchmarks import bench
from unet_loader import UNet

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "sdxl"


def table_rows(markdown):
    """{(row, measurement): cells} from the markdown table bench.py writes."""
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if re.fullmatch(r"\([a-e]\)", cells[0]):
            rows[(cells[0], cells[1])] = cells
    return rows


def test_quick_reports_every_cpu_row_with_a_ratio(tmp_path):
    out = tmp_path / "bench.md"
    p = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--quick", "--device", "cpu", "--output", str(out)],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    doc = out.read_text()
    rows = table_rows(doc)
    assert sorted({r for r, _ in rows}) == ["(a)", "(b)", "(c)", "(d)", "(e)"]
    ratios = {key: cells[4] for key, cells in rows.items() if key[0] != "(e)"}
    assert len(ratios) == 6  # a: forward, forward+backward; b: time, memory; c; d
    for key, ratio in ratios.items():
        assert re.match(r"\d+\.\d\d", ratio), (key, ratio)
        assert float(ratio.split()[0]) > 0
    for key, cells in rows.items():  # a target is judged against the ratio, never left blank
        if cells[5]:
            assert cells[6] in ("yes", "**no**"), key
    (e,) = [cells for key, cells in rows.items() if key[0] == "(e)"]
    assert "not yet measured on GPU" in e[2] and not re.search(r"\d+ ms", " ".join(e))  # never an estimate
    assert "python -m benchmarks.bench --quick" in doc and "Where the time of row (b) goes" in doc
    assert p.stdout.count("| (") == len(rows)  # the same table is printed


def test_sdxl_configs_are_sdxl_base():
    cfg = bench.sdxl_configs()
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ref = json.loads((DATA / comp / "config.json").read_text())
        mismatched = {k: (v, ref.get(k)) for k, v in cfg[comp].items() if ref.get(k) != v}
        assert not mismatched, (comp, mismatched)
    with torch.device("meta"):
        unet = UNet(cfg["unet"])
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684


@pytest.mark.parametrize("size", ["tiny", "medium"])
def test_small_sizes_build(size):
    cfg = bench.SIZES[size]()
    with torch.device("meta"):
        UNet(cfg["unet"])  # a config our UNet accepts (and diffusers too: row (a) builds it)


def test_gpu_rows_run(monkeypatch):
    """Row (e) is the only code that never runs on this machine: run it on CPU with a tiny model and the five
    torch.cuda calls it makes stubbed, so a GPU session does not find a typo."""
    cuda = {"get_device_name": lambda *a: "NVIDIA H100 80GB HBM3", "synchronize": lambda *a: None,
            "reset_peak_memory_stats": lambda *a: None, "memory_allocated": lambda *a: 0,
            "max_memory_allocated": lambda *a: 3 * 2 ** 30}
    for name, fn in cuda.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    cfg = bench.SIZES["tiny"]()
    cpu = torch.device("cpu")
    args = types.SimpleNamespace(repeats=1, warmup=0, threads=1, size="tiny")
    res = bench.Results()
    steps = bench.training_setup(cfg, cpu, torch.float32)
    cg = bench.row_c(cfg, cpu, torch.float32, args, res, steps["unet"])  # as main() runs them: (c) before (e)
    bench.rows_e(cfg, types.SimpleNamespace(type="cuda"), args, res, steps, cg)
    res.rows = res.rows[1:]
    assert [r["row"] for r in res.rows] == ["e"] * 3
    assert "peak 3.00 GiB" in res.rows[0]["note"] and "% of NVIDIA H100" in res.rows[0]["note"]
    assert all(re.match(r"[\d.]+ m?s", r["ours"]) for r in res.rows)
    assert bench.gpu_bf16_peak("NVIDIA H100 PCIe") == 756e12 and bench.gpu_bf16_peak("Tesla T4") is None


def test_real_size_section_replaced_in_place_and_kept_by_a_bench_run(tmp_path):
    """benchmarks/real_size.py owns the "## Real size" section of docs/benchmarks.md: it replaces only that section,
    and a full bench.py run, which rewrites the file, keeps it."""
    from benchmarks import real_size

    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\nold numbers\n")
    real_size.write_section(path, "## Real size\n\nfirst\n")
    real_size.write_section(path, "## Real size\n\nsecond\n")
    assert path.read_text() == "# Benchmarks\n\nold numbers\n\n## Real size\n\nsecond\n"
    args = types.SimpleNamespace(size="tiny", threads=1, compile=False, repeats=1, warmup=0)
    bench.write_report(path, bench.Results(), args, torch.device("cpu"), 1.0)
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nWritten by `benchmarks/bench.py`") and "old numbers" not in text
    assert text.endswith("\n## Real size\n\nsecond\n") and text.count("## Real size") == 1


def test_bench_real_size_runs_real_size_with_its_arguments(tmp_path):
    out, raw = tmp_path / "b.md", tmp_path / "r.json"
    raw.write_text(json.dumps({"diffusers": {"resolution": 256, "max_abs_diff": 0.0,
                                             "forward": {"ours": [1.0], "diffusers": [2.0]},
                                             "backward": {"ours": [3.0], "diffusers": [3.0]}}}))
    bench.main(["--real-size", "--rows", "--json", str(raw), "--output", str(out)])  # no rows: report from --json
    rows = [line for line in out.read_text().splitlines() if line.startswith("| UNet forward") or "backward to" in line]
    assert rows == ["| UNet forward | 1 s | 2 s | 0.50 |", "| forward + backward to the input | 3 s | 3 s | 1.00 |"]
