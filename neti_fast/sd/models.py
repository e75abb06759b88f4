"""Loading Stable Diffusion components (of any family in `families`), and the built-in models.

`--model` is a local diffusers folder, a hub id, or a built-in name:
- `tiny`: the exact SD 1.x topology (16 cross-attention layers: 6 down, 1 mid, 9 up; CLIP with
  77 positions; VAE with 8x downsampling; SD's scheduler config) at toy width with fixed-seed
  random weights and a BPE tokenizer learned here. It is written once as a standard diffusers
  folder and then loaded by the very same code as a real model.
- `tiny-sd2`: the same for SD 2.x (OpenCLIP-H-style text encoder, `gelu`, padding with "!"; 16
  cross-attention layers with head dim 64 from per-block head counts, linear projections, upcast
  attention; v-prediction DDIM scheduler config, as SD 2.1 ships).
- `sd15-shaped`, `sd2-shaped`: the published architecture configs (SD 1.5, SD 2.1) with random
  weights, built in memory, for benchmarks whose cost must equal the real model's.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import NetiError
from ..utils import first_line
from . import families
from .families import Family

# SD 1.x's layers: export/ (ONNX / TensorRT, SD 1.x only so far) reads these; every other stage reads
# its model's or concept's family (families.Family.layers).
UNET_LAYERS = families.SD1.layers
NUM_LAYERS = families.SD1.num_layers
BUILTIN_MODELS = ("tiny", "tiny-sd2", "sd15-shaped", "sd2-shaped")
TINY_VERSION = "2"        # of `tiny`; each built-in folder is cached under its name and version

# SD 1.x scheduler_config.json (PNDM, as shipped); generation swaps the class, keeps the betas.
SD_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}
# SD 2.1's (stabilityai/stable-diffusion-2-1, the 768 v-prediction model).
SD2_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
    "prediction_type": "v_prediction",
}


@dataclass
class Model:
    """The SD components neti-fast uses (no safety checker, no pipeline object)."""
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: dict
    name: str
    family: Family
    cross_attention: list = field(default_factory=list)  # diffusers Attention modules (attn2), execution order
    attn_layer: list = field(default_factory=list)       # the family's layer l of each of those modules
    attn_state: object = None                             # set by attention.install_processors

    def __post_init__(self):
        if not self.cross_attention:
            self.cross_attention, self.attn_layer = cross_attention_modules(self.unet, self.family)

    @property
    def text_dim(self) -> int:
        return self.text_encoder.config.hidden_size

    # diffusers' ModelMixin.device / .dtype walk every submodule (~9 ms a read on tiny's U-Net); the first
    # parameter says the same and these are read on every conditioning and every batch.
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    def to(self, device=None, dtype=None) -> "Model":
        for m in (self.text_encoder, self.unet, self.vae):
            if dtype is not None and m.dtype != dtype:
                m.to(dtype=dtype)
            if device is not None:
                m.to(device=device)
        return self


def cross_attention_modules(unet, family: Family) -> tuple[list, list]:
    """The U-Net's cross-attention (`attn2`) modules in execution order (down, mid, up), and the
    layer l of each. A layer is one transformer module, as NeTI and P+ count them: it holds one block
    in SD 1.x / 2.x and several in SDXL (70 blocks in 11 modules), each block with its own K / V."""
    blocks = list(unet.down_blocks) + [unet.mid_block] + list(unet.up_blocks)
    mods, layer_of, layers = [], [], 0
    for block in blocks:
        for transformer in getattr(block, "attentions", None) or []:
            attn2 = [tb.attn2 for tb in transformer.transformer_blocks if getattr(tb, "attn2", None) is not None]
            mods += attn2
            layer_of += [layers] * len(attn2)
            layers += bool(attn2)
    if layers != family.num_layers:
        raise NetiError(f"the U-Net has {layers} cross-attention layers; {family.title} has {family.num_layers}")
    return mods, layer_of


def _cache_root() -> Path:
    return Path(os.environ.get("NETI_FAST_CACHE", Path.home() / ".cache" / "neti-fast"))


def load_model(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Model:
    """Load `spec` (diffusers folder, hub id, or a built-in: BUILTIN_MODELS) onto `device` in `dtype`."""
    if spec in SHAPED:
        model = build_shaped(spec)
    else:
        path = str(tiny_model_dir(spec)) if spec in TINY else spec
        model = load_diffusers(path, dtype=dtype)  # loaded in `dtype`: no float32 copy first
        model.name = spec
    model.to(device=device, dtype=dtype)
    for m in (model.text_encoder, model.unet, model.vae):
        m.eval().requires_grad_(False)
    return model


def _transformers_dtype_kw() -> str:
    """transformers >= 4.56 names from_pretrained's dtype argument `dtype` (`torch_dtype` before)."""
    import transformers
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _family(path: str, spec: str) -> Family:
    """The family of a diffusers layout, from its model_index.json and text encoder config (a local
    folder without model_index.json is taken for SD 1.x, as neti-fast always has)."""
    from diffusers import DiffusionPipeline
    from transformers import PretrainedConfig
    local = Path(path)
    if local.exists() and not (local / "model_index.json").is_file():
        index = {"_class_name": families.DEFAULT.pipeline}
    else:
        try:
            index = dict(DiffusionPipeline.load_config(path))
        except (OSError, ValueError) as e:
            raise NetiError(f"--model {spec}: could not read model_index.json ({first_line(e)})") from e
    where = f"--model {spec}"
    if not any(f.pipeline == index.get("_class_name") for f in families.FAMILIES.values()):
        return families.detect(index, {}, where)  # refused, naming what was found
    if local.exists() and not (local / "text_encoder" / "config.json").is_file():
        return families.detect(index, {}, where)  # the missing folder is reported by the caller
    try:
        text = PretrainedConfig.get_config_dict(path, subfolder="text_encoder")[0]
    except (OSError, ValueError) as e:
        raise NetiError(f"--model {spec}: could not read text_encoder/config.json ({first_line(e)})") from e
    return families.detect(index, text, where)


def load_diffusers(path: str, dtype: torch.dtype | None = None) -> Model:
    """Load a diffusers layout of a supported family (local folder or hub id) component by component,
    each directly in `dtype` (None: as stored) via from_pretrained, so fp16 loads need no float32 copy."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from .hub import resolve_source
    spec, path = path, resolve_source(path, "--model", hint=f"; built-in models: {', '.join(BUILTIN_MODELS)}")
    local = Path(path)
    family = _family(path, spec)
    if local.exists():
        parts = [e.tokenizer_subfolder for e in family.encoders] + [e.subfolder for e in family.encoders]
        missing = [s for s in parts + ["unet", "vae", "scheduler"] if not (local / s).is_dir()]
        if missing:
            raise NetiError(f"--model {spec}: not a {family.title} diffusers folder (missing {', '.join(missing)}/)")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        kw = {} if dtype is None else {"torch_dtype": dtype}
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder",
                                                     **({} if dtype is None else {_transformers_dtype_kw(): dtype}))
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
        from diffusers import DDIMScheduler
        sched = dict(DDIMScheduler.load_config(path, subfolder="scheduler"))
    except NetiError:
        raise
    except (OSError, ValueError) as e:
        raise NetiError(f"--model {spec}: could not load it ({first_line(e)})") from e
    return Model(tokenizer, text_encoder, unet, vae, sched, name=spec, family=family)


# ----------------------------------------------------------------------------- built-in models

def _sd_configs(vocab_size: int, bos: int, eos: int, pad: int, text_width: int, text_ff: int,
                text_layers: int, text_heads: int, text_act: str, unet_widths: tuple, unet_sample: int,
                unet_heads, vae_widths: tuple, vae_layers: int, vae_sample: int, linear_projection: bool = False,
                upcast_attention: bool = False) -> dict:
    """SD 1.x / 2.x's topology (block types, 16 cross-attention layers) at the given widths.
    `unet_heads`: diffusers' `attention_head_dim`, which in SD's configs counts heads (8 everywhere
    for SD 1.x; per block for SD 2.x: [5, 10, 20, 20], i.e. head dim 64)."""
    text = dict(vocab_size=vocab_size, hidden_size=text_width, intermediate_size=text_ff,
                num_hidden_layers=text_layers, num_attention_heads=text_heads, max_position_embeddings=77,
                hidden_act=text_act, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                projection_dim=text_width)
    unet = dict(sample_size=unet_sample, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=unet_widths,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=text_width, attention_head_dim=unet_heads, norm_num_groups=32)
    if linear_projection or upcast_attention:  # SD 1.x's configs leave them out (diffusers' defaults)
        unet.update(use_linear_projection=linear_projection, upcast_attention=upcast_attention)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=vae_layers,
               block_out_channels=vae_widths, norm_num_groups=32, sample_size=vae_sample,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    return {"text": text, "unet": unet, "vae": vae}


def tiny_configs(vocab_size: int, bos: int, eos: int, pad: int | None = None) -> dict:
    """SD 1.x topology at toy width: same block types, layer counts and head counts (pads with the end token)."""
    return _sd_configs(vocab_size, bos, eos, pad=eos if pad is None else pad, text_width=32, text_ff=64, text_layers=2, text_heads=4,
                       text_act="quick_gelu", unet_widths=(32, 32, 64, 64), unet_sample=8, unet_heads=8,
                       vae_widths=(32, 32, 32, 32), vae_layers=1, vae_sample=64)


def sd15_configs(vocab_size: int = 49408, bos: int = 49406, eos: int = 49407, pad: int = 1) -> dict:
    """The public SD 1.5 configs (runwayml/stable-diffusion-v1-5), written out: no download."""
    return _sd_configs(vocab_size, bos, eos, pad=pad, text_width=768, text_ff=3072, text_layers=12, text_heads=12,
                       text_act="quick_gelu", unet_widths=(320, 640, 1280, 1280), unet_sample=64, unet_heads=8,
                       vae_widths=(128, 256, 512, 512), vae_layers=2, vae_sample=512)


def tiny_sd2_configs(vocab_size: int, bos: int, eos: int, pad: int) -> dict:
    """SD 2.x topology at toy width: OpenCLIP-style text encoder (gelu), head dim 64 from per-block
    head counts (1, 1, 2, 2 where SD 2.1 has 5, 10, 20, 20), linear projections, upcast attention."""
    return _sd_configs(vocab_size, bos, eos, pad=pad, text_width=64, text_ff=128, text_layers=2, text_heads=4,
                       text_act="gelu", unet_widths=(64, 64, 128, 128), unet_sample=8, unet_heads=(1, 1, 2, 2),
                       vae_widths=(32, 32, 32, 32), vae_layers=1, vae_sample=64, linear_projection=True,
                       upcast_attention=True)


def sd2_configs(vocab_size: int = 49408, bos: int = 49406, eos: int = 49407, pad: int = 0) -> dict:
    """The public SD 2.1 configs (stabilityai/stable-diffusion-2-1: OpenCLIP-H exported to its
    penultimate layer, 23 layers), written out: no download."""
    return _sd_configs(vocab_size, bos, eos, pad=pad, text_width=1024, text_ff=4096, text_layers=23, text_heads=16,
                       text_act="gelu", unet_widths=(320, 640, 1280, 1280), unet_sample=96, unet_heads=(5, 10, 20, 20),
                       vae_widths=(128, 256, 512, 512), vae_layers=2, vae_sample=768, linear_projection=True,
                       upcast_attention=True)


@dataclass(frozen=True)
class Builtin:
    """A built-in model: its family, its configs (from the tokenizer's special ids) and scheduler."""
    family: Family
    configs: object             # (vocab_size, bos, eos, pad) -> {"text", "unet", "vae"}
    scheduler: dict
    pad_token: str | None       # None: pad with the end token (SD 1.x's CLIP); SD 2.x pads with "!"
    version: str


TINY = {"tiny": Builtin(families.SD1, tiny_configs, SD_SCHEDULER_CONFIG, None, TINY_VERSION),
        "tiny-sd2": Builtin(families.SD2, tiny_sd2_configs, SD2_SCHEDULER_CONFIG, "!", "1")}
SHAPED = {"sd15-shaped": Builtin(families.SD1, sd15_configs, SD_SCHEDULER_CONFIG, None, ""),
          "sd2-shaped": Builtin(families.SD2, sd2_configs, SD2_SCHEDULER_CONFIG, "!", "")}


def _make_tokenizer(workdir: Path, pad_token: str | None = None):
    from transformers import CLIPTokenizer

    from .tiny_tokenizer import write_clip_bpe_files
    write_clip_bpe_files(workdir)
    kw = {} if pad_token is None else {"pad_token": pad_token}
    return CLIPTokenizer.from_pretrained(str(workdir), model_max_length=77, **kw)


def _builtin_configs(b: Builtin, tokenizer) -> dict:
    return b.configs(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)


def _build_components(cfg: dict, tokenizer, seed: int = 0):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)  # every component's init draws from the default generator, in order
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text"]))
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    return text_encoder, unet, vae


def _scheduler(config: dict):
    import diffusers
    return getattr(diffusers, config["_class_name"]).from_config({k: v for k, v in config.items() if k != "_class_name"})


def build_tiny(out_dir: str | Path, name: str = "tiny") -> Path:
    """Write the built-in `name` (TINY) as a standard diffusers folder (its family's pipeline loads it)."""
    import diffusers

    b = TINY[name]
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise NetiError(f"{out_dir}: folder exists and is not empty; choose a new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out_dir.parent))
    try:
        tokenizer = _make_tokenizer(tmp / "bpe", b.pad_token)
        text_encoder, unet, vae = _build_components(_builtin_configs(b, tokenizer), tokenizer)
        pipe = getattr(diffusers, b.family.pipeline)(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_scheduler(b.scheduler),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(tmp / "model", safe_serialization=True)
        (tmp / "model" / "neti_fast_tiny.json").write_text(json.dumps({"version": b.version}))
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp / "model", out_dir)  # atomic: a half-written model is never visible
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def tiny_model_dir(name: str = "tiny") -> Path:
    """The cached folder of the built-in `name` (TINY), built on first use (a few seconds)."""
    d = _cache_root() / f"{name}-v{TINY[name].version}"
    if not (d / "neti_fast_tiny.json").exists():
        try:
            build_tiny(d, name)
        except (OSError, NetiError) as e:
            # Several processes (torchrun ranks, parallel tests) may build it at once: each builds in
            # its own temporary folder and renames it into place; whoever loses finds it there.
            if not (d / "neti_fast_tiny.json").exists():
                why = e.strerror or e if isinstance(e, OSError) else e
                raise NetiError(f"cannot build the {name} model in {d}: {why} (set NETI_FAST_CACHE)") from e
    return d


def build_shaped(name: str, seed: int = 0) -> Model:
    """A published-config model (SHAPED) with random weights, in memory (about 1.1-1.3 B parameters)."""
    b = SHAPED[name]
    tokenizer = _make_tokenizer(Path(tempfile.mkdtemp(prefix="neti-bpe-")), b.pad_token)
    cfg = b.configs() if b.pad_token is None else b.configs(pad=tokenizer.pad_token_id)
    text_encoder, unet, vae = _build_components(cfg, tokenizer, seed)
    return Model(tokenizer, text_encoder, unet, vae, dict(b.scheduler), name=name, family=b.family)
