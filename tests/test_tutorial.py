"""tutorial.ipynb runs top to bottom without an error (fast mode: DCO_TUTORIAL_FAST=1, few steps), as a student
would run it. Executed by nbclient in a fresh python3 kernel from the repository root."""
import os

import pytest
import torch

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tutorial_runs_in_fast_mode(tmp_path, monkeypatch):
    if not os.path.isfile(os.path.join(ROOT, "tinyworld", "model", "model_index.json")):
        pytest.skip("tinyworld/model not built (python -m tinyworld.pretrain)")
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        pytest.skip("no python3 Jupyter kernel: pip install ipykernel && python -m ipykernel install --user")
    nb = nbformat.read(os.path.join(ROOT, "tutorial.ipynb"), as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook stripped"
    monkeypatch.setenv("DCO_TUTORIAL_FAST", "1")
    monkeypatch.setenv("DCO_TUTORIAL_WORK", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}})
    client.execute()  # raises CellExecutionError (with the cell and traceback) on any error
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "FAST=True" in text
    assert torch.cuda.is_available() or "No CUDA here" in text
    assert os.path.isdir(tmp_path / "merge_dco"), "the notebook writes into DCO_TUTORIAL_WORK"
