"""Loading Stable Diffusion components (of any family in `families`), and the built-in models.

`--model` is a local diffusers folder, a hub id, or a built-in name:
- `tiny`: the exact SD 1.x topology (16 cross-attention layers: 6 down, 1 mid, 9 up; CLIP with
  77 positions; VAE with 8x downsampling; SD's scheduler config) at toy width with fixed-seed
  random weights and a BPE tokenizer learned here. It is written once as a standard diffusers
  folder and then loaded by the very same code as a real model.
- `tiny-sd2`: the same for SD 2.x (OpenCLIP-H-style text encoder, `gelu`, padding with "!"; 16
  cross-attention layers with head dim 64 from per-block head counts, linear projections, upcast
  attention; v-prediction DDIM scheduler config, as SD 2.1 ships).
- `tiny-xl`: the same for SDXL (CLIP-L-style and bigG-style text encoders, the second with its
  projection, both configs with SDXL's eos_token_id 2 so pooling takes the highest id as there; 11
  cross-attention modules holding 70 transformer blocks (1, 2, 10 per level), linear projections,
  `text_time` added conditioning; force_zeros_for_empty_prompt; SDXL's Euler scheduler config).
- `sd15-shaped`, `sd2-shaped`, `sdxl-shaped`: the published configs (SD 1.5, SD 2.1, SDXL base) with random
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

# SD 1.x's layer names (tests name layers by them); every stage reads its model's or concept's family
# (families.Family.layers).
UNET_LAYERS = families.SD1.layers
BUILTIN_MODELS = ("tiny", "tiny-sd2", "tiny-xl", "sd15-shaped", "sd2-shaped", "sdxl-shaped")
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
# SDXL base 1.0's (stabilityai/stable-diffusion-xl-base-1.0).
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "interpolation_type": "linear",
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
    "clip_sample": False,
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
    more_tokenizers: list = field(default_factory=list)       # the family's further text encoders' (SDXL: bigG)
    more_text_encoders: list = field(default_factory=list)
    zero_empty_negative: bool = False    # model_index.json force_zeros_for_empty_prompt: "" -> zero conditioning
    cross_attention: list = field(default_factory=list)  # diffusers Attention modules (attn2), execution order
    attn_layer: list = field(default_factory=list)       # the family's layer l of each of those modules
    attn_state: object = None                             # set by attention.install_processors

    def __post_init__(self):
        if not self.cross_attention:
            self.cross_attention, self.attn_layer = cross_attention_modules(self.unet, self.family)

    @property
    def tokenizers(self) -> list:
        return [self.tokenizer] + self.more_tokenizers

    @property
    def text_encoders(self) -> list:
        return [self.text_encoder] + self.more_text_encoders

    @property
    def text_widths(self) -> list:
        return [te.config.hidden_size for te in self.text_encoders]

    @property
    def text_dim(self) -> int:
        """A concept row's width: the text encoders' widths side by side (SDXL: CLIP-L's, then bigG's)."""
        return sum(self.text_widths)

    # diffusers' ModelMixin.device / .dtype walk every submodule (~9 ms a read on tiny's U-Net); the first
    # parameter says the same and these are read on every conditioning and every batch.
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def added_widths(self) -> dict:
        """Width of each of the family's added U-Net inputs ({} for SD 1.x / 2.x), read from this
        model's components: `added_conditioning` lists the pooled text embedding first (the pooled
        encoders' projection widths side by side), then the time ids (what the U-Net's added
        embedding takes beyond the pooled vector, in `addition_time_embed_dim`-wide sinusoids)."""
        names = self.family.added_conditioning
        if not names:
            return {}
        pooled = sum(self.text_encoders[i].config.projection_dim for i in self.family.pooled_encoders)
        rest = self.unet.add_embedding.linear_1.in_features - pooled
        return dict(zip(names, (pooled, rest // self.unet.config.addition_time_embed_dim)))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    def to(self, device=None, dtype=None) -> "Model":
        for m in (*self.text_encoders, self.unet, self.vae):
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
    for m in (*model.text_encoders, model.unet, model.vae):
        m.eval().requires_grad_(False)
    return model


def _transformers_dtype_kw() -> str:
    """transformers >= 4.56 names from_pretrained's dtype argument `dtype` (`torch_dtype` before)."""
    import transformers
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _family(path: str, spec: str) -> tuple[Family, dict]:
    """The family of a diffusers layout, from its model_index.json and text encoder config (a local
    folder without model_index.json is taken for SD 1.x, as neti-fast always has), and that index."""
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
        return families.detect(index, {}, where), index  # refused, naming what was found
    if local.exists() and not (local / "text_encoder" / "config.json").is_file():
        return families.detect(index, {}, where), index  # the missing folder is reported by the caller
    try:
        text = PretrainedConfig.get_config_dict(path, subfolder="text_encoder")[0]
    except (OSError, ValueError) as e:
        raise NetiError(f"--model {spec}: could not read text_encoder/config.json ({first_line(e)})") from e
    return families.detect(index, text, where), index


def load_diffusers(path: str, dtype: torch.dtype | None = None) -> Model:
    """Load a diffusers layout of a supported family (local folder or hub id) component by component,
    each directly in `dtype` (None: as stored) via from_pretrained, so fp16 loads need no float32 copy."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .hub import resolve_source
    spec, path = path, resolve_source(path, "--model", hint=f"; built-in models: {', '.join(BUILTIN_MODELS)}")
    local = Path(path)
    family, index = _family(path, spec)
    if local.exists():
        parts = [e.tokenizer_subfolder for e in family.encoders] + [e.subfolder for e in family.encoders]
        missing = [s for s in parts + ["unet", "vae", "scheduler"] if not (local / s).is_dir()]
        if missing:
            raise NetiError(f"--model {spec}: not a {family.title} diffusers folder (missing {', '.join(missing)}/)")
    try:
        tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder=e.tokenizer_subfolder) for e in family.encoders]
        kw = {} if dtype is None else {"torch_dtype": dtype}
        text_kw = {} if dtype is None else {_transformers_dtype_kw(): dtype}
        # an encoder whose pooled output conditions the U-Net carries its projection (SDXL's bigG)
        text_encoders = [(CLIPTextModelWithProjection if e.pooled else CLIPTextModel).from_pretrained(
            path, subfolder=e.subfolder, **text_kw) for e in family.encoders]
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
        from diffusers import DDIMScheduler
        sched = dict(DDIMScheduler.load_config(path, subfolder="scheduler"))
    except NetiError:
        raise
    except (OSError, ValueError) as e:
        raise NetiError(f"--model {spec}: could not load it ({first_line(e)})") from e
    return Model(tokenizers[0], text_encoders[0], unet, vae, sched, name=spec, family=family,
                 more_tokenizers=tokenizers[1:], more_text_encoders=text_encoders[1:],
                 zero_empty_negative=bool(index.get("force_zeros_for_empty_prompt", False)))


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


def _xl_configs(vocab_size: int, bos: int, eos: int, pad: int, widths: tuple, ffs: tuple, text_layers: tuple,
                text_heads: tuple, unet_widths: tuple, unet_heads: tuple, blocks: tuple, time_dim: int,
                unet_sample: int, vae_widths: tuple, vae_layers: int, vae_sample: int) -> dict:
    """SDXL's topology at the given widths: CLIP-L-style `text` and bigG-style `text_2` (with its
    projection); a 3-level U-Net, cross-attention at levels 2-3 with `blocks` transformer blocks per
    module, `text_time` added conditioning (the pooled projection + 6 time ids x `time_dim`)."""
    def text(width, ff, layers, heads, act, pad_id):
        # SDXL's text configs keep CLIP's old eos_token_id 2: transformers then pools at the highest id
        return dict(vocab_size=vocab_size, hidden_size=width, intermediate_size=ff, num_hidden_layers=layers,
                    num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, bos_token_id=bos,
                    eos_token_id=2, pad_token_id=pad_id, projection_dim=widths[1])
    unet = dict(sample_size=unet_sample, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=unet_widths, down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), transformer_layers_per_block=blocks,
                cross_attention_dim=sum(widths), attention_head_dim=unet_heads, norm_num_groups=32,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                projection_class_embeddings_input_dim=widths[1] + 6 * time_dim)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=vae_layers,
               block_out_channels=vae_widths, norm_num_groups=32, sample_size=vae_sample, scaling_factor=0.13025,
               force_upcast=True, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4)
    return {"text": text(widths[0], ffs[0], text_layers[0], text_heads[0], "quick_gelu", eos),
            "text_2": text(widths[1], ffs[1], text_layers[1], text_heads[1], "gelu", pad), "unet": unet, "vae": vae}


def tiny_xl_configs(vocab_size: int, bos: int, eos: int, pad: int) -> dict:
    """SDXL at toy width: head dim 64 (1, 1, 2 heads where SDXL has 5, 10, 20), SDXL's 1 / 2 / 10
    transformer blocks per module (70 in 11 modules), 3-layer text encoders (hidden state -2 is then
    the second layer's output)."""
    return _xl_configs(vocab_size, bos, eos, pad, widths=(32, 64), ffs=(64, 128), text_layers=(3, 3),
                       text_heads=(4, 4), unet_widths=(64, 64, 128), unet_heads=(1, 1, 2), blocks=(1, 2, 10),
                       time_dim=8, unet_sample=8, vae_widths=(32, 32, 32, 32), vae_layers=1, vae_sample=64)


def sdxl_configs(vocab_size: int = 49408, bos: int = 49406, eos: int = 49407, pad: int = 0) -> dict:
    """The public SDXL base 1.0 configs, written out: no download."""
    return _xl_configs(vocab_size, bos, eos, pad, widths=(768, 1280), ffs=(3072, 5120), text_layers=(12, 32),
                       text_heads=(12, 20), unet_widths=(320, 640, 1280), unet_heads=(5, 10, 20), blocks=(1, 2, 10),
                       time_dim=256, unet_sample=128, vae_widths=(128, 256, 512, 512), vae_layers=2, vae_sample=1024)


@dataclass(frozen=True)
class Builtin:
    """A built-in model: its family, its configs (from the tokenizer's special ids) and scheduler."""
    family: Family
    configs: object             # (vocab_size, bos, eos, pad) -> {"text", "unet", "vae"}
    scheduler: dict
    pad_token: str | None       # None: pad with the end token (SD 1.x's CLIP); SD 2.x pads with "!"
    version: str
    pipeline_kwargs: tuple = ()  # further pipeline config (SDXL: force_zeros_for_empty_prompt)
    # Each further text encoder's tokenizer pad token (SDXL: CLIP-L pads with the end token, bigG with "!").
    more_pad_tokens: tuple = ()


TINY = {"tiny": Builtin(families.SD1, tiny_configs, SD_SCHEDULER_CONFIG, None, TINY_VERSION),
        "tiny-sd2": Builtin(families.SD2, tiny_sd2_configs, SD2_SCHEDULER_CONFIG, "!", "1"),
        "tiny-xl": Builtin(families.SDXL, tiny_xl_configs, SDXL_SCHEDULER_CONFIG, None, "1",
                           (("force_zeros_for_empty_prompt", True),), ("!",))}
SHAPED = {"sd15-shaped": Builtin(families.SD1, sd15_configs, SD_SCHEDULER_CONFIG, None, ""),
          "sd2-shaped": Builtin(families.SD2, sd2_configs, SD2_SCHEDULER_CONFIG, "!", ""),
          "sdxl-shaped": Builtin(families.SDXL, sdxl_configs, SDXL_SCHEDULER_CONFIG, None, "",
                                 (("force_zeros_for_empty_prompt", True),), ("!",))}


def _make_tokenizer(workdir: Path, pad_token: str | None = None):
    from transformers import CLIPTokenizer

    from .tiny_tokenizer import write_clip_bpe_files
    write_clip_bpe_files(workdir)
    kw = {} if pad_token is None else {"pad_token": pad_token}
    return CLIPTokenizer.from_pretrained(str(workdir), model_max_length=77, **kw)


def _builtin_configs(b: Builtin, tokenizers: list) -> dict:
    """The configs for these tokenizers' ids: the last one's pad id (SD 2.x's, SDXL's bigG's "!")."""
    t = tokenizers[0]
    return b.configs(len(t), t.bos_token_id, t.eos_token_id, tokenizers[-1].pad_token_id)


def _build_components(cfg: dict, seed: int = 0):
    """(text encoders, U-Net, VAE) from configs: `text`, then `text_2` with its projection where there is one."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)  # every component's init draws from the default generator, in order
    texts = [CLIPTextModel(CLIPTextConfig(**cfg["text"]))]
    if "text_2" in cfg:
        texts.append(CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_2"])))
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    return texts, unet, vae


def _tokenizers(workdir: Path, b: Builtin) -> list:
    return [_make_tokenizer(workdir / ("bpe" if i == 0 else f"bpe{i}"), pad)
            for i, pad in enumerate((b.pad_token,) + b.more_pad_tokens)]


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
        tokenizers = _tokenizers(tmp, b)
        texts, unet, vae = _build_components(_builtin_configs(b, tokenizers))
        parts = {}
        for spec, tok, te in zip(b.family.encoders, tokenizers, texts):
            parts[spec.tokenizer_subfolder], parts[spec.subfolder] = tok, te
        cls = getattr(diffusers, b.family.pipeline)
        # the pipeline's own optional parts (SD's safety checker, SDXL's image encoder) are left out
        optional = {k: None for k in getattr(cls, "_optional_components", []) if k not in parts}
        extra = {"requires_safety_checker": False} if "safety_checker" in optional else {}
        pipe = cls(vae=vae, unet=unet, scheduler=_scheduler(b.scheduler), **parts, **optional, **extra,
                   **dict(b.pipeline_kwargs))
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
    tokenizers = _tokenizers(Path(tempfile.mkdtemp(prefix="neti-bpe-")), b)
    pad = tokenizers[-1].pad_token_id
    cfg = b.configs() if pad == tokenizers[0].eos_token_id else b.configs(pad=pad)  # SD 1.5's config pads with 1
    texts, unet, vae = _build_components(cfg, seed)
    return Model(tokenizers[0], texts[0], unet, vae, dict(b.scheduler), name=name, family=b.family,
                 more_tokenizers=tokenizers[1:], more_text_encoders=texts[1:],
                 zero_empty_negative=dict(b.pipeline_kwargs).get("force_zeros_for_empty_prompt", False))
