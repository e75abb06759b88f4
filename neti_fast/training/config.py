"""Training configuration: `TrainConfig` (official NeTI defaults), its validation, the official
YAML config (input_configs/train.yaml) and the `neti-fast train` flags. The loop is trainer.py."""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import NetiError
from ..options import number
from ..utils import DTYPE_NAMES, METHODS, SEED_RANGE, Range, default_device, torch_dtype

# diffusers.optimization.get_scheduler names (as the official NeTI trainer); piecewise_constant needs rules
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")

# the official trainer's validation defaults (constants.VALIDATION_PROMPTS, EvalConfig.validation_seeds)
VALIDATION_PROMPTS = ("A photo of a {}", "A photo of a {} on a beach", "App icon of {}",
                      "A painting of {} in the style of Monet")
VALIDATION_SEEDS = (42, 420, 501, 5456)


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults are official NeTI's unless noted."""
    images: str | None = None             # folder of training images (required)
    placeholder: str | None = None        # new token naming the concept, e.g. "<my-cat>" (required)
    init_word: str | None = None          # one-token word initialising it, e.g. "cat" (required; official super_category_token)
    method: str = "neti"                  # neti | xti | ti
    learnable_property: str = "object"    # object | style (caption templates)
    model: str = "tiny"                   # built-in name, diffusers folder or hub id (SD 1.x / 2.x / SDXL)
    out: str | None = None                # output folder; default ./outputs/<placeholder>
    steps: int = 1000                     # optimizer steps (official max_train_steps)
    batch_size: int = 2                   # images per micro-batch
    grad_accum: int = 4                   # micro-batches per optimizer step
    lr: float = 1e-3                      # base learning rate
    scale_lr: bool = True                 # lr *= batch_size * grad_accum (official)
    lr_scheduler: str = "constant"        # diffusers get_scheduler name: constant, constant_with_warmup, linear, cosine, ...
    lr_warmup_steps: int = 0
    # The official trainer's counting (set by --config; see trainer.lr_schedule): warm-up and length
    # in micro-batches, the factor of step k read at k x processes (lr 0 at the first warm-up step),
    # and model.mapper_checkpoint_path resuming at the step its file name gives.
    official: bool = False
    weight_decay: float = 1e-2            # AdamW
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    resolution: int | None = None         # training image size; None -> the model's (512 for SD 1.x)
    center_crop: bool = False
    seed: int = 0                         # official default is unseeded; here runs are reproducible
    save_every: int = 250                 # checkpoint every N steps (and always at the end); 0 = only at the end
    # NeTI mapper
    use_nested_dropout: bool = True
    nested_dropout_prob: float = 0.5
    output_bypass: bool = True
    normalize_mapper_output: bool = True
    target_norm: float | None = None      # None -> ||init word embedding||
    use_positional_encoding: bool = True
    num_pe_time_anchors: int = 10
    sigma_t: float = 0.03
    sigma_l: float = 2.0
    # runtime
    device: str = "cpu"                   # cpu | cuda | cuda:N
    dtype: str = "float32"                # dtype of the frozen U-Net and VAE; the concept trains in float32
    # dtype of the frozen text encoders (every one: SDXL's two). None: float32, as the official NeTI
    # trainer (the concept's gradient runs through them; on CUDA they compute under autocast in
    # `dtype`); float16 / bfloat16 stores their weights at half the size (SDXL: 1.6 GB instead of 3.3 GB).
    # A model handed to train() (the server's) is used in the dtypes it has.
    text_dtype: str | None = None
    allow_tf32: bool = False
    gradient_checkpointing: bool = False  # recompute the U-Net's blocks in the backward pass (less memory, slower)
    channels_last: bool | None = None     # U-Net / VAE in channels-last memory format; None: on CUDA only
    compile: bool = False                 # torch.compile the U-Net
    # what the run shows (none of it changes what is trained)
    validate_every: int = 0               # a validation grid every N steps (and at the end); 0 = never
    validation_prompts: list = field(default_factory=lambda: list(VALIDATION_PROMPTS))
    validation_seeds: list = field(default_factory=lambda: list(VALIDATION_SEEDS))
    validation_steps: int = 50            # denoising steps of a validation image (official num_denoising_steps)
    tensorboard: bool = False             # also log loss, lr and validation grids for TensorBoard
    resume: str | None = None             # checkpoint path, or "latest" (highest step in `out`)
    init_concept: str | None = None       # NeTI: start from this concept's mapper (official mapper_checkpoint_path)


# ----------------------------------------------------------------------------- validation helpers

# Numeric settings and what they may be (flags and YAML keys alike; the loop's own rules, e.g.
# resolution a multiple of 8, are checked in _check_config).
TRAIN_RANGES = {
    "steps": Range(int, 1), "batch_size": Range(int, 1), "grad_accum": Range(int, 1),
    "lr": Range(float, 0, lo_open=True), "seed": SEED_RANGE, "save_every": Range(int, 0),
    "resolution": Range(int, 8), "lr_warmup_steps": Range(int, 0), "weight_decay": Range(float, 0),
    "adam_beta1": Range(float, 0, 1), "adam_beta2": Range(float, 0, 1), "adam_epsilon": Range(float, 0, lo_open=True),
    "nested_dropout_prob": Range(float, 0, 1), "num_pe_time_anchors": Range(int, 1),
    "sigma_t": Range(float, 0, lo_open=True), "sigma_l": Range(float, 0, lo_open=True),
    "validate_every": Range(int, 0), "validation_steps": Range(int, 1, 1000),
}

def _check_config(cfg: TrainConfig) -> None:
    for name in ("images", "placeholder", "init_word"):
        if not getattr(cfg, name):
            raise NetiError(f"--{name.replace('_', '-')} is required")
    if cfg.method not in METHODS:
        raise NetiError(f"--method {cfg.method!r}: must be one of {', '.join(METHODS)}")
    if cfg.learnable_property not in ("object", "style"):
        raise NetiError(f"--property {cfg.learnable_property!r}: must be object or style")
    for name, rng in TRAIN_RANGES.items():
        v = getattr(cfg, name)
        if v is None and name == "resolution":
            continue
        if name in _FLAG_FIELDS:          # the CLI names it as its flag, the server as its field
            rng.check(v, name)
        elif not rng.ok(v):               # YAML-only settings: named as the config key
            raise NetiError(f"{name} {v}: must be {rng.describe()}")
    if cfg.lr_scheduler not in LR_SCHEDULERS:
        raise NetiError(f"lr_scheduler {cfg.lr_scheduler!r}: supported are {', '.join(LR_SCHEDULERS)}")
    if cfg.resolution is not None and cfg.resolution % 8:
        raise NetiError("must be a multiple of 8", field="resolution", value=cfg.resolution)
    if cfg.dtype not in DTYPE_NAMES:
        raise NetiError(f"--dtype {cfg.dtype!r}: must be one of float32, float16, bfloat16")
    if cfg.text_dtype is not None and cfg.text_dtype not in DTYPE_NAMES:
        raise NetiError(f"--text-dtype {cfg.text_dtype!r}: must be one of float32, float16, bfloat16")
    if cfg.validate_every and (not cfg.validation_prompts or not cfg.validation_seeds):
        raise NetiError("--validate-every: needs validation prompts and seeds (--validation-prompt)")
    if cfg.tensorboard:
        import importlib.util
        if importlib.util.find_spec("tensorboard") is None:
            raise NetiError("--tensorboard: the tensorboard package is not installed (pip install tensorboard)")
    if any(c.isspace() for c in cfg.placeholder) or "{}" in cfg.placeholder:
        raise NetiError(f"--placeholder {cfg.placeholder!r}: must be one word without spaces or {{}}")


def _device(cfg: TrainConfig):
    import torch
    try:
        dev = torch.device(cfg.device)
    except RuntimeError:
        raise NetiError(f"--device {cfg.device!r}: not a device (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NetiError(f"--device {cfg.device}: CUDA is not available on this machine")
    # CPU float16: no GradScaler on CPU (fp16 gradients through the frozen U-Net underflow without
    # loss scaling) and slow fallback kernels; bfloat16 has float32's range and needs no scaling
    for flag, value in (("--dtype", cfg.dtype), ("--text-dtype", cfg.text_dtype)):
        if dev.type == "cpu" and value is not None and torch_dtype(value) == torch.float16:
            raise NetiError(f"{flag} float16 needs --device cuda (use float32 or bfloat16 on CPU)")
    return dev


def default_out(placeholder: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", placeholder).strip("-.") or "concept"
    return Path("outputs") / name


# ----------------------------------------------------------------------------- official YAML config

# official key -> TrainConfig field (None: accepted and ignored)
_YAML_MAP = {
    "log": {"exp_name": "_exp_name", "exp_dir": "_exp_dir", "save_steps": "save_every", "overwrite_ok": None,
            "logging_dir": None, "report_to": None, "checkpoints_total_limit": None},
    "data": {"train_data_dir": "images", "placeholder_token": "placeholder", "super_category_token": "init_word",
             "learnable_property": "learnable_property", "resolution": "resolution", "center_crop": "center_crop",
             "dataloader_num_workers": None, "repeats": None},
    "model": {"pretrained_model_name_or_path": "model", "use_nested_dropout": "use_nested_dropout",
              "nested_dropout_prob": "nested_dropout_prob", "normalize_mapper_output": "normalize_mapper_output",
              "use_positional_encoding": "use_positional_encoding", "pe_sigmas": "_pe_sigmas",
              "num_pe_time_anchors": "num_pe_time_anchors", "output_bypass": "output_bypass",
              "revision": "_revision", "mapper_checkpoint_path": "init_concept", "target_norm": "target_norm"},
    "optim": {"max_train_steps": "steps", "learning_rate": "lr", "train_batch_size": "batch_size",
              "gradient_accumulation_steps": "grad_accum", "seed": "seed", "scale_lr": "scale_lr",
              "lr_scheduler": "lr_scheduler", "lr_warmup_steps": "lr_warmup_steps", "adam_beta1": "adam_beta1",
              "adam_beta2": "adam_beta2", "adam_weight_decay": "weight_decay", "adam_epsilon": "adam_epsilon",
              "mixed_precision": "_mixed_precision", "allow_tf32": "allow_tf32", "gradient_checkpointing": "gradient_checkpointing"},
    "eval": {"validation_prompts": "validation_prompts", "num_validation_images": "_num_validation_images",
             "validation_seeds": "validation_seeds", "validation_steps": "validate_every",
             "num_denoising_steps": "validation_steps"},
}
_MIXED = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}
_FLOATS = {"lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "nested_dropout_prob", "target_norm",
           "sigma_t", "sigma_l"}
_INTS = {"steps", "batch_size", "grad_accum", "seed", "save_every", "resolution", "lr_warmup_steps",
         "num_pe_time_anchors", "validate_every", "validation_steps", "_num_validation_images"}
_BOOLS = {"scale_lr", "center_crop", "use_nested_dropout", "output_bypass", "normalize_mapper_output",
          "use_positional_encoding", "allow_tf32", "gradient_checkpointing"}


def _coerce(path, key: str, v):
    """YAML value -> the field's type (PyYAML reads `1e-3` as a string; the official loader converts it)."""
    if v is None:
        return None  # null = not set: the built-in default
    if key in _BOOLS:
        if not isinstance(v, bool):
            raise NetiError(f"--config {path}: {key} must be true or false, got {v!r}")
        return v
    if key in ("validation_prompts", "validation_seeds"):
        item = "prompts (text)" if key == "validation_prompts" else "integer seeds"
        ok = str if key == "validation_prompts" else int
        if not isinstance(v, list) or not v or not all(isinstance(x, ok) and not isinstance(x, bool) for x in v):
            raise NetiError(f"--config {path}: eval.{key} must be a list of {item}, got {v!r}")
        return list(v)
    if key in _FLOATS or key in _INTS:
        try:
            if isinstance(v, bool):
                raise ValueError
            f = float(v)
            if key in _INTS:
                if f != int(f):
                    raise ValueError
                return int(f)
            return f
        except (TypeError, ValueError, OverflowError):
            kind = "an integer" if key in _INTS else "a number"
            raise NetiError(f"--config {path}: {key} must be {kind}, got {v!r}") from None
    return v if isinstance(v, bool) or not isinstance(v, (int, float)) else str(v)


def load_yaml_config(path) -> dict:
    """Map an official NeTI `train.yaml` onto TrainConfig fields: {field: value} for the keys present."""
    import yaml
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise NetiError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise NetiError(f"--config {path}: malformed YAML ({' '.join(str(e).split())})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise NetiError(f"--config {path}: must be a mapping of sections (log, data, model, optim, eval)")
    out: dict = {}
    for section, body in raw.items():
        if section not in _YAML_MAP:
            raise NetiError(f"--config {path}: unknown section {section!r} (known: {', '.join(_YAML_MAP)})")
        if _YAML_MAP[section] is None or body is None:
            continue
        if not isinstance(body, dict):
            raise NetiError(f"--config {path}: section {section!r} must be a mapping")
        for key, value in body.items():
            if key not in _YAML_MAP[section]:
                raise NetiError(f"--config {path}: unknown key {section}.{key}")
            target = _YAML_MAP[section][key]
            if target is None:
                continue
            if target == "_pe_sigmas":
                if value is None:
                    continue
                if not isinstance(value, dict) or set(value) - {"sigma_t", "sigma_l"}:
                    raise NetiError(f"--config {path}: model.pe_sigmas must be {{sigma_t: ..., sigma_l: ...}}")
                out.update({k: float(v) for k, v in value.items()})
            elif target == "_revision":
                if value is not None:
                    raise NetiError(f"--config {path}: model.revision is not supported; download that revision and give its folder")
            elif target == "_mixed_precision":
                if value not in _MIXED:
                    raise NetiError(f"--config {path}: optim.mixed_precision {value!r}: must be no, fp16 or bf16")
                out["dtype"] = _MIXED[value]
            else:
                out[target] = value
    # the official trainer's validation: every eval.validation_steps (default 100) steps, its default
    # prompts and seeds; seeds null -> 0..num_validation_images-1, else one per validation image
    ev = raw.get("eval") or {}
    out.setdefault("validate_every", 100)
    n = ev.get("num_validation_images")
    if "validation_seeds" in ev and ev["validation_seeds"] is None:
        out["validation_seeds"] = list(range(int(_coerce(path, "_num_validation_images", n) or 4)))
    elif n is not None:
        n = _coerce(path, "_num_validation_images", n)
        seeds = out.get("validation_seeds", list(VALIDATION_SEEDS))
        if len(seeds) != n:
            raise NetiError(f"--config {path}: eval.num_validation_images {n} but {len(seeds)} validation_seeds; "
                            "give one seed per image (or validation_seeds: null)")
    out.pop("_num_validation_images", None)
    out["official"] = True  # the official trainer's counting of the schedule and the mapper checkpoint
    exp_dir, exp_name = out.pop("_exp_dir", None), out.pop("_exp_name", None)
    if exp_dir is not None:
        out["out"] = str(Path(exp_dir) / exp_name) if exp_name else str(exp_dir)
    elif exp_name is not None:
        out["out"] = str(Path("outputs") / exp_name)
    for k in ("images", "out", "init_concept", "model"):
        if out.get(k) is not None:
            out[k] = str(out[k])
    for k, v in list(out.items()):
        out[k] = _coerce(path, k, v)
        if out[k] is None:
            del out[k]
    return out


# ----------------------------------------------------------------------------- CLI glue

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`neti-fast train` arguments. Every default is None so that only flags given override --config."""
    a = parser.add_argument
    a("images", nargs="?", default=None, help="folder of training images (or --images)")
    a("--images", dest="images_opt", default=None, metavar="FOLDER", help="folder of training images")
    a("--placeholder", default=None, help='new token naming the concept, e.g. "<my-cat>"')
    a("--init-word", default=None, help='one-token word the concept starts from, e.g. "cat"')
    a("--method", choices=METHODS, default=None, help="neti (default), xti or ti")
    a("--property", dest="learnable_property", choices=("object", "style"), default=None,
      help="caption templates: object (default) or style")
    a("--model", default=None, help="a diffusers SD 1.x / 2.x / SDXL folder or hub id, or a built-in (tiny, "
                                    "tiny-sd2, tiny-xl: random weights); "
                                    "required unless --config names one")
    a("--out", default=None, help="output folder (checkpoints and concept.safetensors)")
    a("--steps", type=number(TRAIN_RANGES["steps"]), default=None, help="optimizer steps (default 1000)")
    a("--batch-size", type=number(TRAIN_RANGES["batch_size"]), default=None, help="images per micro-batch (default 2)")
    a("--grad-accum", type=number(TRAIN_RANGES["grad_accum"]), default=None, help="micro-batches per step (default 4)")
    a("--lr", type=number(TRAIN_RANGES["lr"]), default=None, help="base learning rate, scaled by batch x accumulation (default 1e-3)")
    a("--seed", type=number(TRAIN_RANGES["seed"]), default=None, help="random seed (default 0)")
    a("--save-every", type=number(TRAIN_RANGES["save_every"]), default=None, help="checkpoint every N steps (default 250)")
    a("--resolution", type=number(TRAIN_RANGES["resolution"]), default=None, help="training image size (default: the model's)")
    a("--center-crop", action=argparse.BooleanOptionalAction, default=None, help="center-crop images to square first")
    a("--config", default=None, metavar="YAML", help="official NeTI train.yaml; flags given override it")
    a("--resume", default=None, metavar="latest|PATH", help="continue from a checkpoint")
    a("--device", default=None, help="cpu or cuda (default: cuda when available)")
    a("--dtype", default=None, choices=sorted(DTYPE_NAMES),
      help="dtype of the frozen U-Net and VAE; the concept, its gradients and optimizer stay float32 "
           "(default float32; float16 on CUDA only)")
    a("--text-dtype", default=None, choices=sorted(DTYPE_NAMES),
      help="dtype of the frozen text encoders (default float32, as official NeTI; bfloat16 / float16 "
           "halve their memory: SDXL 3.3 -> 1.6 GB)")
    a("--lr-scheduler", default=None, choices=LR_SCHEDULERS,
      help="learning-rate schedule (diffusers get_scheduler; default constant). Without --config, "
           "--lr-warmup-steps and --steps count optimizer steps and step k uses the factor after k + 1 "
           "updates; with --config, as the official trainer: both x --grad-accum, factor at k (README)")
    a("--lr-warmup-steps", type=number(TRAIN_RANGES["lr_warmup_steps"]), default=None,
      help="warm-up steps of the schedule (default 0)")
    a("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
      help="recompute the U-Net's and text encoders' activations in the backward pass: less memory, "
           "about 30%% slower")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=None,
      help="U-Net and VAE in channels-last memory format (default: on CUDA)")
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile the U-Net (a slow first step; faster on GPUs)")
    a("--validate-every", type=number(TRAIN_RANGES["validate_every"]), default=None, metavar="N",
      help="a validation grid (prompts x seeds) every N steps, validation-N.png in --out (default 0: never; "
           "--config: the YAML's eval section, as official)")
    a("--validation-prompt", dest="validation_prompts", action="append", default=None, metavar="PROMPT",
      help="validation prompt with {} for the concept (repeatable; default: the official four)")
    a("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
      help="also write TensorBoard logs (loss, lr, validation grids) to --out/tensorboard")


_FLAG_FIELDS = ("placeholder", "init_word", "method", "learnable_property", "model", "out", "steps", "batch_size",
                "grad_accum", "lr", "seed", "save_every", "resolution", "center_crop", "resume", "device", "dtype",
                "text_dtype", "lr_scheduler", "lr_warmup_steps", "gradient_checkpointing", "channels_last", "compile",
                "validate_every", "validation_prompts", "tensorboard")


def config_from_args(args) -> TrainConfig:
    """Built-in defaults < --config YAML < flags given explicitly."""
    values: dict = {}
    if getattr(args, "config", None):
        values.update(load_yaml_config(args.config))
    pos, opt = getattr(args, "images", None), getattr(args, "images_opt", None)
    if pos and opt and pos != opt:
        raise NetiError(f"images given twice ({pos} and --images {opt}); give one")
    if pos or opt:
        values["images"] = pos or opt
    for name in _FLAG_FIELDS:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    if "model" not in values:  # never train on the random built-in model by accident
        raise NetiError("--model is required: a diffusers SD 1.x / 2.x / SDXL folder, a hub id, or tiny (the built-in "
                        "model with random weights, for trying the commands)")
    if "device" not in values:
        values["device"] = default_device()
    for k in ("dtype", "text_dtype"):
        if values.get(k) in DTYPE_NAMES:
            values[k] = DTYPE_NAMES[values[k]]
    return TrainConfig(**values)
