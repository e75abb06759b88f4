"""Small definitions used all over the package, each in one place.

Nothing here imports the rest of neti_fast (only errors.py), so any module may import it without
creating a cycle; torch is imported lazily where it is needed.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import NetiError

METHODS = ("neti", "xti", "ti")                  # concept kinds: NeTI mapper, per-layer XTI, one TI embedding
# Two separate vocabularies: --attention picks the cross-attention kernel inside the U-Net,
# --backend the runtime that runs the U-Net (no name is in both).
ATTENTIONS = ("auto", "triton", "native", "sdpa", "xformers", "math")  # --attention (sd/attention.py)
BACKENDS = ("auto", "eager", "compile", "onnx", "tensorrt")            # --backend (engine/backends.py)
ATTENTIONS_RENAMED = {"eager": "math"}   # older --attention spellings, still taken (with a notice)
# dtype names accepted on the command line and in configs -> torch attribute name
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16",
               "float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
CLI_DTYPES = ("bf16", "fp16", "fp32")             # the short names the CLIs offer


# ----------------------------------------------------------------------------- samplers
# The one table of samplers: engine name -> the diffusers scheduler and options it is built with
# (engine/sampling.make_scheduler), the schedule types it takes and how it draws noise. Each row is
# the diffusers docs' "A1111 / k-diffusion equivalents" entry for that sampler (docs/samplers.md;
# serve/a1111.py maps A1111's names onto these). Data only: nothing here imports diffusers.

@dataclass(frozen=True)
class SamplerSpec:
    cls: str                  # diffusers scheduler class
    options: tuple = ()       # (key, value) pairs passed to `from_config`
    schedules: tuple = ()     # SCHEDULES keys it takes (its class has the config option)
    noise: str = ""           # "": deterministic; "generator": step() draws from each image's generator;
    #                           "brownian": a torchsde Brownian tree per image, seeded with its seed
    needs: tuple = ()         # packages beyond diffusers' own (importable names)
    eta: bool = False         # step() takes DDIM's eta (GenerateConfig.eta)


# schedule type (A1111's names) -> diffusers config options. "uniform" is the model's own timestep
# spacing (official NeTI samples DPM-Solver++ on it).
SCHEDULES = {
    "uniform": (),
    "karras": (("use_karras_sigmas", True),),
    "exponential": (("use_exponential_sigmas", True),),
    "beta": (("use_beta_sigmas", True),),            # diffusers computes it with scipy.stats
    "sgm_uniform": (("timestep_spacing", "trailing"),),
    "simple": (("timestep_spacing", "trailing"),),
    "normal": (("timestep_spacing", "linspace"),),
}
_SIGMA = tuple(SCHEDULES)                                    # classes with use_*_sigmas and timestep_spacing
_SPACING = ("uniform", "sgm_uniform", "simple", "normal")   # classes with timestep_spacing only
SAMPLERS = {
    "dpm++": SamplerSpec("DPMSolverMultistepScheduler", (), _SIGMA),                      # DPM++ 2M
    "dpm++-2m-sde": SamplerSpec("DPMSolverMultistepScheduler", (("algorithm_type", "sde-dpmsolver++"),), _SIGMA,
                                "generator"),
    "dpm++-sde": SamplerSpec("DPMSolverSDEScheduler", (), _SIGMA, "brownian", ("torchsde",)),
    "euler": SamplerSpec("EulerDiscreteScheduler", (), _SIGMA),
    "euler-a": SamplerSpec("EulerAncestralDiscreteScheduler", (), _SPACING, "generator"),
    "heun": SamplerSpec("HeunDiscreteScheduler", (), _SIGMA),
    "lms": SamplerSpec("LMSDiscreteScheduler", (), _SIGMA, needs=("scipy",)),
    "dpm2": SamplerSpec("KDPM2DiscreteScheduler", (), _SIGMA),
    "dpm2-a": SamplerSpec("KDPM2AncestralDiscreteScheduler", (), _SIGMA, "generator"),
    "ddim": SamplerSpec("DDIMScheduler", (), _SPACING, "generator", eta=True),          # noise only with eta > 0
    "plms": SamplerSpec("PNDMScheduler", (("skip_prk_steps", True),), _SPACING),
    "unipc": SamplerSpec("UniPCMultistepScheduler", (), _SIGMA),
    "lcm": SamplerSpec("LCMScheduler", (), _SPACING, "generator"),
}


def scheduler_name(sampler: str, schedule: str = "uniform") -> str:
    """The engine's (and --scheduler's) name of a sampler on a schedule: `euler`, `dpm++-karras`."""
    return sampler if schedule == "uniform" else f"{sampler}-{schedule.replace('_', '-')}"


# --scheduler names (engine/sampling.py): every sampler on every schedule it takes -> (sampler, schedule)
SCHEDULER_PARTS = {scheduler_name(n, s): (n, s) for n, spec in SAMPLERS.items() for s in spec.schedules}
SCHEDULERS = tuple(SCHEDULER_PARTS)


def scheduler_problem(name: str) -> str | None:
    """None for a --scheduler name, else what a valid one looks like (one line, not all the names)."""
    if name in SCHEDULER_PARTS:
        return None
    schedules = ", ".join(s.replace("_", "-") for s in SCHEDULES if s != "uniform")
    return (f"must be SAMPLER or SAMPLER-SCHEDULE with a sampler of {', '.join(SAMPLERS)} and a schedule it "
            f"takes ({schedules}); docs/samplers.md")



@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: `kind` (int or float) in [lo, hi] (None: unbounded;
    `lo_open`: lo itself excluded). Floats must be finite. One description serves every front end:
    the CLI's argparse types (options.number), job files, the engine's check of a run's settings and
    the training config, each naming the setting its own way (NetiError's `field`)."""
    kind: type = int
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        if self.lo is not None and self.hi is not None:
            return f"{what} > {self.lo:g} and <= {self.hi:g}" if self.lo_open else f"{what} from {self.lo:g} to {self.hi:g}"
        if self.lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {self.lo:g}"
        return f"{what} <= {self.hi:g}" if self.hi is not None else what

    def ok(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or value <= self.hi

    def check(self, value, field: str):
        """`value` if allowed, else NetiError("must be ...", field=field, value=value)."""
        if not self.ok(value):
            raise NetiError(f"must be {self.describe()}", field=field, value=value)
        return value

    def parse(self, text: str):
        """A command-line string -> its value; NetiError (no field) when it is not allowed."""
        try:
            value = self.kind(text)
        except ValueError:
            raise NetiError(f"{text!r}: must be {self.describe()}") from None
        if not self.ok(value):
            raise NetiError(f"{text}: must be {self.describe()}")
        return value


# A run's numeric settings (GenerateConfig's fields; the job file's keys). Steps: at most the
# schedulers' 1000 training timesteps; guidance 0 is unconditional, 1 the conditional prediction alone.
SAMPLING_RANGES = {
    "steps": Range(int, 1, 1000),
    "guidance": Range(float, 0),
    "batch_size": Range(int, 1),
    "height": Range(int, 1),
    "width": Range(int, 1),
    "cache_mb": Range(int, 0),
}
SEED_RANGE = Range(int, 0, 2**63 - 1)   # torch.Generator.manual_seed takes any int64 >= 0
# img2img (engine/img2img.py): A1111's denoising_strength, the fraction of the schedule run (0 would run
# nothing), and its resize_mode 0 just resize, 1 crop and resize, 2 resize and fill
STRENGTH_RANGE = Range(float, 0, 1, lo_open=True)
DEFAULT_STRENGTH = 0.75
RESIZE_MODE_RANGE = Range(int, 0, 2)

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


class ByteLRU:
    """A cache bounded by bytes, least recently used out first: the engine's prepared conditionings,
    a job's concept files and a server's loaded concepts.

    `nbytes(value)` sizes an entry once, when it is put. `put` trims at once, always keeping the new
    entry (one entry over the budget still serves its request); `put(..., trim=False)` and
    `trim(keep)` let a caller defer eviction until it knows what it still needs (a job keeps the
    current batch's concepts). Not thread-safe: callers that share one hold their own lock.
    """

    def __init__(self, budget_bytes: int, nbytes):
        self.budget, self._nbytes = budget_bytes, nbytes
        self._items: dict = {}     # insertion order = recency order (oldest first)
        self._sizes: dict = {}
        self.total = 0
        self.evictions = 0         # trims that evicted something

    def __contains__(self, key) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return iter(list(self._items))   # keys, least recently used first

    def values(self) -> list:
        return list(self._items.values())

    def get(self, key, default=None):
        """The value (now the most recently used), or `default`."""
        if key not in self._items:
            return default
        self._items[key] = self._items.pop(key)
        return self._items[key]

    def put(self, key, value, trim: bool = True):
        self.pop(key)
        self._items[key], self._sizes[key] = value, self._nbytes(value)
        self.total += self._sizes[key]
        if trim:
            self.trim(keep={key})
        return value

    def get_or_build(self, key, build):
        if key in self._items:
            return self.get(key)
        return self.put(key, build())

    def pop(self, key, default=None):
        if key not in self._items:
            return default
        self.total -= self._sizes.pop(key)
        return self._items.pop(key)

    def trim(self, keep=frozenset()) -> bool:
        """Evict the least recently used entries not in `keep` until within budget; True if any was."""
        evicted = False
        for key in list(self._items):
            if self.total <= self.budget:
                break
            if key not in keep:
                self.pop(key)
                evicted = True
        self.evictions += evicted
        return evicted

    def clear(self) -> None:
        self._items.clear()
        self._sizes.clear()
        self.total = 0
