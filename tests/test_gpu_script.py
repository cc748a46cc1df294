"""benchmarks/gpu.py, the one-shot GPU check, on its CPU path (the tiny model at 32^2): every row runs, the table
is written as the "## GPU" section of the markdown file, and a second run replaces that section, keeping the rest."""
import torch

from benchmarks import gpu


def test_gpu_check_cpu_path_writes_its_section(tmp_path):
    md = tmp_path / "benchmarks.md"
    md.write_text("# Benchmarks\n\n## Real size\n\nkept\n\n## GPU\n\nold\n\n## Notes\n\nkept too\n")
    argv = ["--device", "cpu", "--output", str(md), "--work", str(tmp_path / "w"), "--steps", "1", "--sample-steps", "2"]
    rows = gpu.main(argv)
    g1 = [r for r in rows if r["row"] == "g1"]
    assert [(r["precision"], r["checkpointing"]) for r in g1] == [
        (str(gpu.float8.compute_dtype_of("cpu")).split(".")[-1], False),
        (str(gpu.float8.compute_dtype_of("cpu")).split(".")[-1], True), ("fp8", False), ("fp8", True)]
    assert all(r["s"] > 0 for r in g1)
    (g2,) = [r for r in rows if r["row"] == "g2"]
    assert g2["steps"] == 2 and g2["s"] > 0
    (g3,) = [r for r in rows if r["row"] == "g3"]
    assert g3.get("skipped") or g3["rel_diff"] < 1e-5  # ours = diffusers on the same weights (fp32 on the CPU)
    (g4,) = [r for r in rows if r["row"] == "g4"]
    assert g4["skipped"] if not torch.cuda.is_available() else True
    gpu.main(argv)
    text = md.read_text()
    assert text.count("## GPU") == 1 and "old" not in text and "kept\n" in text and "kept too" in text
    assert "| g1 | DCO step with a token, frozen weights fp8, gradient checkpointing on |" in text
