"""Small definitions used all over the package, each in one place.

Nothing here imports the rest of neti_fast (only errors.py), so any module may import it without
creating a cycle; torch is imported lazily where it is needed.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from .errors import NetiError

METHODS = ("neti", "xti", "ti")                  # concept kinds: NeTI mapper, per-layer XTI, one TI embedding
SCHEDULERS = ("dpm++", "ddim", "euler", "euler-a", "dpm++-karras")  # --scheduler names (pipeline.make_scheduler)
ATTENTIONS = ("auto", "triton", "native", "sdpa", "xformers", "eager")  # --attention names
# dtype names accepted on the command line and in configs -> torch attribute name
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16",
               "float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
CLI_DTYPES = ("bf16", "fp16", "fp32")             # the short names the CLIs offer


def torch_dtype(name: str):
    """"fp16" / "float16" / ... -> torch.float16; NetiError for anything else."""
    import torch
    if name not in DTYPE_NAMES:
        raise NetiError(f"--dtype {name!r}: must be one of {', '.join(CLI_DTYPES)} (or float32, float16, bfloat16)")
    return getattr(torch, DTYPE_NAMES[name])


def dtype_name(dtype) -> str:
    """torch.float16 -> "float16" (as recorded in manifests)."""
    return str(dtype).replace("torch.", "")


def default_device() -> str:
    """"cuda" when a CUDA GPU is visible, else "cpu"."""
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype_name(device: str) -> str:
    """fp16 on CUDA, fp32 elsewhere (the CLIs' default --dtype)."""
    return "fp16" if str(device).startswith("cuda") else "fp32"


def env_flag(name: str) -> bool:
    """A kill switch / option from the environment: unset, "", "0", "false", "no", "off" mean off;
    any other value (e.g. "1", "true") means on. Case and surrounding spaces do not matter."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def image_size(model, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """(height, width): the given values, or the model's native size (512 for SD 1.x) for those left None."""
    return height or model.default_size, width or model.default_size


def first_line(e) -> str:
    """The informative part of an error (an exception or its message), one short line."""
    s = str(e)
    m = re.search(r"WeightsUnpickler error:\s*(.+)", s, re.S)  # torch wraps the real cause in prose
    s = " ".join((m.group(1) if m else s).split())
    s = s.split(" Check the documentation")[0].split(". ")[0].rstrip(".")
    if not s and isinstance(e, BaseException):
        return type(e).__name__
    return s[:160] or "unknown error"


def atomic_write(path: str | Path, write) -> Path:
    """Write via `write(tmp_path)` to a temporary file beside `path`, then rename over it atomically."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise NetiError(f"{path}: cannot write there ({e.strerror or e})") from None
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def check_writable(out: str | Path, flag: str = "--out") -> None:
    """Create `out` if needed and prove a file can be created in it (before any long work)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise NetiError(f"{flag} {out}: not writable ({e.strerror or e})") from None
