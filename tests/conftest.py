"""Test configuration: on machines without CUDA, run Triton kernels in the interpreter.

The variable must be set before any module that defines ``@triton.jit`` kernels is
imported, so it is set here, at collection time, before the tests import amips.
"""

import os
from pathlib import Path

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data; tests that use it skip cleanly where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present (a user's clone has none)")
    return SHARED_DATA


@pytest.fixture
def device() -> str:
    return "cuda" if _HAS_CUDA else "cpu"


@pytest.fixture
def one_torch_thread():
    """Run a test with one torch thread (a fixed reduction order), then restore."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def torch_backend(monkeypatch):
    """Searches compared against "the torch path" use the torch reference, not the Triton
    interpreter."""
    monkeypatch.setenv("AMIPS_BACKEND", "torch")
