"""Model families as data: one description per family (SD 1.x, SD 2.x, SDXL) that every stage reads.

A stage never asks which family it runs; it reads the fields it needs: how many cross-attention
layers a concept's rows cover (`layers`), which text encoders condition the U-Net and how
(`encoders`), what else the U-Net is given (`added_conditioning`), and the defaults a run starts
from. Widths here are the full-size models'; a built-in toy model keeps the topology and
conditioning at its own width, which the loaded components say (`Model.text_dim`).

Detection follows diffusers: model_index.json's `_class_name` names the pipeline; SD 1.x and 2.x
share `StableDiffusionPipeline` and differ in the text encoder (CLIP ViT-L's `quick_gelu` vs
OpenCLIP's `gelu`), as diffusers' own checkpoint conversion tells them apart.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import NetiError


@dataclass(frozen=True)
class TextEncoderSpec:
    subfolder: str        # diffusers subfolder of the encoder; its tokenizer is `tokenizer_subfolder`
    tokenizer_subfolder: str
    width: int            # hidden size at full size
    # Which state conditions the U-Net. -1: the output of the final layer norm (SD 1.x; SD 2.x too, whose
    # diffusers export already ends at OpenCLIP's penultimate layer); -2: the penultimate hidden state,
    # no final layer norm (SDXL).
    hidden_state: int
    pooled: bool          # its pooled, projected output is added conditioning (SDXL's bigG: `text_embeds`)
    file_key: str | None = None   # its tensor in A1111 / civitai embedding files of several encoders (SDXL: clip_l, clip_g)

    @property
    def final_norm(self) -> bool:
        """Whether the final layer norm is applied (only to the last hidden state, as diffusers does)."""
        return self.hidden_state == -1

    def clip_skip(self, clip_skip: int) -> int:
        """The hidden state (counted as conditioning.encode's clip_skip) for a request's CLIP skip
        (1 = the family's own state): SDXL's -2 with clip skip n is diffusers' hidden_states[-(n + 1)]."""
        return clip_skip - 1 - self.hidden_state


@dataclass(frozen=True)
class Family:
    name: str                     # recorded in concept and table files
    title: str                    # in messages
    pipeline: str                 # model_index.json `_class_name`
    text_activation: str          # the first text encoder's `hidden_act`: tells families of one pipeline apart
    encoders: tuple               # TextEncoderSpec, in the order their outputs are concatenated
    layers: tuple                 # NeTI's layer l: the cross-attention modules, execution order
    transformer_blocks: int       # attention blocks those modules hold at full size (one K/V table each)
    head_dim: tuple               # per layer at full size
    prediction_type: str          # the full-size scheduler's (the config read from a folder decides)
    default_size: int
    default_scheduler: str
    default_guidance: float
    added_conditioning: tuple     # U-Net added_cond_kwargs: SDXL's pooled text embedding and time_ids
    # The layer whose concept rows the pooled embedding is encoded with (SDXL: the middle block's; the
    # pooled vector is one per image and step, so one layer's rows must stand for all). None: no pooled.
    pooled_layer: int | None = None
    # Whether A1111 applies its CLIP skip (CLIP_stop_at_last_layers) to this family's text encoding:
    # only to SD 1.x's CLIP ViT-L. It reads SD 2.x's OpenCLIP and SDXL's two encoders at their fixed
    # layer whatever the setting says (sd_hijack_open_clip.py; sd_hijack_clip.py's SDXL encoder, where
    # only the sdxl_clip_l_skip option, off by default, would apply it to CLIP-L). The /sdapi drop-in
    # does the same; neti-fast's own --clip-skip applies on every family.
    a1111_clip_skip: bool = False

    @property
    def pooled_encoders(self) -> tuple:
        return tuple(i for i, e in enumerate(self.encoders) if e.pooled)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def context_width(self) -> int:
        return sum(e.width for e in self.encoders)

    @property
    def widths(self) -> tuple:
        return tuple(e.width for e in self.encoders)


_SD_LAYERS = ("IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
              "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")

SD1 = Family(
    name="sd1", title="SD 1.x", pipeline="StableDiffusionPipeline", text_activation="quick_gelu",
    encoders=(TextEncoderSpec("text_encoder", "tokenizer", 768, -1, False),),
    layers=_SD_LAYERS, transformer_blocks=16,
    head_dim=(40, 40, 80, 80, 160, 160, 160, 160, 160, 160, 80, 80, 80, 40, 40, 40),
    prediction_type="epsilon", default_size=512, default_scheduler="dpm++", default_guidance=7.5,
    added_conditioning=(), a1111_clip_skip=True)

SD2 = Family(
    name="sd2", title="SD 2.x", pipeline="StableDiffusionPipeline", text_activation="gelu",
    encoders=(TextEncoderSpec("text_encoder", "tokenizer", 1024, -1, False),),
    layers=_SD_LAYERS, transformer_blocks=16, head_dim=(64,) * 16,
    prediction_type="v_prediction", default_size=768, default_scheduler="dpm++", default_guidance=7.5,
    added_conditioning=())

SDXL = Family(
    name="sdxl", title="SDXL", pipeline="StableDiffusionXLPipeline", text_activation="quick_gelu",
    encoders=(TextEncoderSpec("text_encoder", "tokenizer", 768, -2, False, "clip_l"),
              TextEncoderSpec("text_encoder_2", "tokenizer_2", 1280, -2, True, "clip_g")),
    # SGM's numbering: input blocks 4, 5, 7, 8, the middle block, output blocks 0-5
    layers=("IN04", "IN05", "IN07", "IN08", "MID", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"),
    transformer_blocks=70, head_dim=(64,) * 11,
    prediction_type="epsilon", default_size=1024, default_scheduler="euler", default_guidance=5.0,
    added_conditioning=("text_embeds", "time_ids"), pooled_layer=4)

FAMILIES = {f.name: f for f in (SD1, SD2, SDXL)}
DEFAULT = SD1   # what a concept or table file without a `family` entry was made for (every older file)


def get(name: str, where: str = "family") -> Family:
    """The family named `name` (as concept / table files record it)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise NetiError(f"{where}: unknown model family {name!r} (known: {', '.join(FAMILIES)})") from None


def detect(model_index: dict, text_config: dict, where: str) -> Family:
    """The family of a diffusers folder from its model_index.json and text_encoder/config.json."""
    found = model_index.get("_class_name")
    pipelines = [f for f in FAMILIES.values() if f.pipeline == found]
    if not pipelines:
        known = ", ".join(dict.fromkeys(f.pipeline for f in FAMILIES.values()))
        raise NetiError(f"{where}: a {found or 'unnamed'} pipeline (model_index.json); neti-fast runs "
                        f"{', '.join(f.title for f in FAMILIES.values())} ({known})")
    act = text_config.get("hidden_act")
    match = [f for f in pipelines if f.text_activation == act]
    return match[0] if len(match) == 1 else pipelines[0]


def by_file_keys(keys) -> Family | None:
    """The family whose encoders' embedding-file tensors are exactly `keys` (SDXL: clip_l, clip_g)."""
    match = [f for f in FAMILIES.values() if all(e.file_key for e in f.encoders)
             and {e.file_key for e in f.encoders} == set(keys)]
    return match[0] if len(match) == 1 else None


def by_encoder_count(n: int) -> Family | None:
    """The family with `n` text encoders, where only one has (diffusers' one-file-per-encoder embeddings)."""
    match = [f for f in FAMILIES.values() if len(f.encoders) == n]
    return match[0] if len(match) == 1 else None


def by_widths(widths: tuple) -> Family | None:
    """The family whose full-size text encoders have these widths (a raw embedding file's only clue)."""
    match = [f for f in FAMILIES.values() if f.widths == tuple(widths)]
    return match[0] if len(match) == 1 else None
