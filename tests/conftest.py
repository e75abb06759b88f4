"""Shared fixtures. Everything runs on CPU; GPU-only tests skip with a reason."""
import os

import torch

# Triton kernels run under the interpreter on CPU. Triton reads the flag when a kernel is defined
# (first import of neti_fast.kernels), so it must be set before any test module imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """The tiny model is built once per test session into a temporary cache (never ~/.cache)."""
    if "NETI_FAST_CACHE" not in os.environ:
        os.environ["NETI_FAST_CACHE"] = str(tmp_path_factory.mktemp("neti-fast-cache"))
    yield


@pytest.fixture(scope="session")
def tiny_model(_cache_dir):
    from neti_fast.models import load_model
    return load_model("tiny")


def _make_concept(method: str = "neti", dim: int = 32, seed: int = 0, bypass: bool = True, placeholder: str = "<c>"):
    from neti_fast.concept import random_concept
    return random_concept(method, dim, seed, placeholder, bypass)


@pytest.fixture(scope="session")
def make_concept():
    return _make_concept


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for a test module, restored after it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
