"""Loading Stable Diffusion 1.x components, and the two built-in models.

`--model` is a local diffusers folder, a hub id, or a built-in name:
- `tiny`: the exact SD 1.x topology (16 cross-attention layers: 6 down, 1 mid, 9 up; CLIP with
  77 positions; VAE with 8x downsampling; SD's scheduler config) at toy width with fixed-seed
  random weights and a BPE tokenizer learned here. It is written once as a standard diffusers
  folder and then loaded by the very same code as a real model.
- `sd15-shaped`: SD 1.5's published architecture configs with random weights, built in memory,
  for benchmarks whose cost must equal the real model's.
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

# The 16 cross-attention layers in execution order, named as in the official NeTI / P+ code
# (SD's "input/middle/output block" numbering). Layer identity is this position, bound once.
UNET_LAYERS = ("IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
               "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")
NUM_LAYERS = len(UNET_LAYERS)
BUILTIN_MODELS = ("tiny", "sd15-shaped")
TINY_VERSION = "2"

# SD 1.x scheduler_config.json (PNDM, as shipped); generation swaps the class, keeps the betas.
SD_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
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
    cross_attention: list = field(default_factory=list)  # 16 diffusers Attention modules, execution order
    attn_state: object = None                             # set by attention.install_processors

    def __post_init__(self):
        if not self.cross_attention:
            self.cross_attention = cross_attention_modules(self.unet)

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


def cross_attention_modules(unet) -> list:
    """The U-Net's cross-attention (`attn2`) modules in execution order: down, mid, up."""
    blocks = list(unet.down_blocks) + [unet.mid_block] + list(unet.up_blocks)
    mods = []
    for block in blocks:
        for transformer in getattr(block, "attentions", None) or []:
            for tb in transformer.transformer_blocks:
                if getattr(tb, "attn2", None) is not None:
                    mods.append(tb.attn2)
    if len(mods) != NUM_LAYERS:
        raise NetiError(f"the U-Net has {len(mods)} cross-attention layers; neti-fast needs SD 1.x's {NUM_LAYERS}")
    return mods


def _cache_root() -> Path:
    return Path(os.environ.get("NETI_FAST_CACHE", Path.home() / ".cache" / "neti-fast"))


def load_model(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Model:
    """Load `spec` (diffusers folder, hub id, `tiny` or `sd15-shaped`) onto `device` in `dtype`."""
    if spec == "sd15-shaped":
        model = build_sd15_shaped()
    else:
        path = str(tiny_model_dir()) if spec == "tiny" else spec
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


def load_diffusers(path: str, dtype: torch.dtype | None = None) -> Model:
    """Load an SD 1.x diffusers layout (local folder or hub id) component by component, each directly
    in `dtype` (None: as stored) via from_pretrained, so fp16 loads need no float32 copy first."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from .hub import resolve_source
    spec, path = path, resolve_source(path, "--model", hint=f"; built-in models: {', '.join(BUILTIN_MODELS)}")
    local = Path(path)
    if local.exists():
        missing = [s for s in ("tokenizer", "text_encoder", "unet", "vae", "scheduler") if not (local / s).is_dir()]
        if missing:
            raise NetiError(f"--model {spec}: not a Stable Diffusion diffusers folder (missing {', '.join(missing)}/)")
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
    return Model(tokenizer, text_encoder, unet, vae, sched, name=spec)


# ----------------------------------------------------------------------------- built-in models

def _sd1_configs(vocab_size: int, bos: int, eos: int, pad: int, text_width: int, text_ff: int,
                 text_layers: int, text_heads: int, unet_widths: tuple, unet_sample: int,
                 vae_widths: tuple, vae_layers: int, vae_sample: int) -> dict:
    """SD 1.x's topology (block types, 16 cross-attention layers, 8 heads) at the given widths."""
    text = dict(vocab_size=vocab_size, hidden_size=text_width, intermediate_size=text_ff,
                num_hidden_layers=text_layers, num_attention_heads=text_heads, max_position_embeddings=77,
                hidden_act="quick_gelu", bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                projection_dim=text_width)
    unet = dict(sample_size=unet_sample, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=unet_widths,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=text_width, attention_head_dim=8, norm_num_groups=32)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=vae_layers,
               block_out_channels=vae_widths, norm_num_groups=32, sample_size=vae_sample,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    return {"text": text, "unet": unet, "vae": vae}


def tiny_configs(vocab_size: int, bos: int, eos: int) -> dict:
    """SD 1.x topology at toy width: same block types, layer counts and head counts."""
    return _sd1_configs(vocab_size, bos, eos, pad=eos, text_width=32, text_ff=64, text_layers=2, text_heads=4,
                        unet_widths=(32, 32, 64, 64), unet_sample=8,
                        vae_widths=(32, 32, 32, 32), vae_layers=1, vae_sample=64)


def sd15_configs(vocab_size: int = 49408, bos: int = 49406, eos: int = 49407) -> dict:
    """The public SD 1.5 configs (runwayml/stable-diffusion-v1-5), written out: no download."""
    return _sd1_configs(vocab_size, bos, eos, pad=1, text_width=768, text_ff=3072, text_layers=12, text_heads=12,
                        unet_widths=(320, 640, 1280, 1280), unet_sample=64,
                        vae_widths=(128, 256, 512, 512), vae_layers=2, vae_sample=512)


def _make_tokenizer(workdir: Path):
    from transformers import CLIPTokenizer

    from .tiny_tokenizer import write_clip_bpe_files
    write_clip_bpe_files(workdir)
    return CLIPTokenizer.from_pretrained(str(workdir), model_max_length=77)


def _build_components(cfg: dict, tokenizer, seed: int = 0):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)  # every component's init draws from the default generator, in order
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text"]))
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    return text_encoder, unet, vae


def build_tiny(out_dir: str | Path) -> Path:
    """Write the `tiny` model as a standard diffusers folder (StableDiffusionPipeline loads it)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise NetiError(f"{out_dir}: folder exists and is not empty; choose a new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out_dir.parent))
    try:
        tokenizer = _make_tokenizer(tmp / "bpe")
        cfg = tiny_configs(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
        text_encoder, unet, vae = _build_components(cfg, tokenizer)
        sched = PNDMScheduler.from_config({k: v for k, v in SD_SCHEDULER_CONFIG.items() if k != "_class_name"})
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.save_pretrained(tmp / "model", safe_serialization=True)
        (tmp / "model" / "neti_fast_tiny.json").write_text(json.dumps({"version": TINY_VERSION}))
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp / "model", out_dir)  # atomic: a half-written model is never visible
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def tiny_model_dir() -> Path:
    """The cached `tiny` folder, built on first use (a few seconds)."""
    d = _cache_root() / f"tiny-v{TINY_VERSION}"
    if not (d / "neti_fast_tiny.json").exists():
        try:
            build_tiny(d)
        except (OSError, NetiError) as e:
            # Several processes (torchrun ranks, parallel tests) may build it at once: each builds in
            # its own temporary folder and renames it into place; whoever loses finds it there.
            if not (d / "neti_fast_tiny.json").exists():
                why = e.strerror or e if isinstance(e, OSError) else e
                raise NetiError(f"cannot build the tiny model in {d}: {why} (set NETI_FAST_CACHE)") from e
    return d


def build_sd15_shaped(seed: int = 0) -> Model:
    """SD 1.5-shaped model with random weights, in memory (about 1.1 B parameters)."""
    tokenizer = _make_tokenizer(Path(tempfile.mkdtemp(prefix="neti-bpe-")))
    text_encoder, unet, vae = _build_components(sd15_configs(), tokenizer, seed)
    return Model(tokenizer, text_encoder, unet, vae, dict(SD_SCHEDULER_CONFIG), name="sd15-shaped")
