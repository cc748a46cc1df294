"""Shared fixtures: the tiny reference SDXL folder is built once per test session (it takes ~15 s)."""
import pytest

from tiny_sdxl import save_tiny_sdxl


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """(folder, reference diffusers pipeline) of a tiny random SDXL in the real hub layout."""
    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "sdxl")
