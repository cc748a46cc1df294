"""Shared fixtures: the tiny reference SDXL folder is built once per test session (it takes ~15 s)."""
import os

# MKL's sgemm picks code paths by the buffers' memory alignment, so the same matmul can differ in the last bit
# between two calls on some CPUs (seen on an AVX-512 Xeon here). The tests compare bit for bit (LoRA scale 0 ==
# the base model, resume == an uninterrupted run), so ask MKL for run-to-run reproducible results. It must be set
# before torch loads MKL; subprocesses (the CLI tests) inherit it.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import pytest  # noqa: E402
import torch  # noqa: E402

from tiny_sdxl import save_tiny_sdxl


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """(folder, reference diffusers pipeline) of a tiny random SDXL in the real hub layout."""
    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "sdxl")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine two threads fighting for the cores run
    several times slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
