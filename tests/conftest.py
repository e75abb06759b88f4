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
    from neti_fast.sd.models import load_model
    return load_model("tiny")


@pytest.fixture(scope="session")
def tiny_sd2_model(_cache_dir):
    from neti_fast.sd.models import load_model
    return load_model("tiny-sd2")


@pytest.fixture(scope="session")
def tiny_xl_model(_cache_dir):
    from neti_fast.sd.models import load_model
    return load_model("tiny-xl")


def _make_concept(method: str = "neti", dim: int = 32, seed: int = 0, bypass: bool = True, placeholder: str = "<c>",
                  family=None):
    from neti_fast.concepts.concept import random_concept
    from neti_fast.sd.families import DEFAULT
    return random_concept(method, dim, seed, placeholder, bypass, family or DEFAULT)


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


def _kill_after_first_image(argv, out, pattern="*.png", timeout=300):
    """Run `python -m neti_fast *argv` (one thread) and SIGKILL it once a PNG appears in `out`."""
    import signal
    import subprocess
    import sys
    import time
    proc = subprocess.Popen([sys.executable, "-m", "neti_fast", *argv], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + timeout
        while not list(out.glob(pattern)):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, f"no image after {timeout} s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


@pytest.fixture(scope="session")
def kill_after_first_image():
    """kill_after_first_image(argv, out, pattern): a run killed right after its first image."""
    return _kill_after_first_image


# ----------------------------------------------------------------------------- shared helpers
# Fixtures rather than importable functions: test modules live in folders mirroring the package,
# and pytest hands every one of them these without a sys.path arrangement.

def _max_diff(a, b) -> int:
    """Largest per-pixel difference of two uint8 image arrays (0 = identical, 1 = the 1/255 rule)."""
    import numpy as np
    return int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())


@pytest.fixture(scope="session")
def max_diff():
    return _max_diff


@pytest.fixture(scope="session")
def init_image():
    """A smooth random 64 x 64 RGB PIL image (the tiny models' native size): img2img's init image."""
    import numpy as np
    from PIL import Image, ImageFilter
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(3))


@pytest.fixture
def cli(capsys):
    """cli(*argv) -> (exit code, stdout, stderr) of `neti-fast argv` run in this process."""
    from neti_fast.cli import main

    def run(*argv):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:   # argparse: --help (0) and usage errors (2)
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err
    return run


def _one_line_error(code, err, *needles):
    """A user error: exit status 2, one line on stderr (progress bars aside), no traceback, naming `needles`."""
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and "img/s]" not in ln and not ln.startswith("\r")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="session")
def one_line_error():
    return _one_line_error
