"""The evaluation's embedding models: CLIP (image and text features) and DINO (CLS token), loaded
from a hub id or a local folder, each failure one line."""
from __future__ import annotations

from pathlib import Path

from ..errors import NetiError
from ..utils import default_device, first_line as _first_line

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINO = "facebook/dino-vits16"


def _resolve(arg: str, spec: str) -> str:
    from ..sd.hub import resolve_source
    return resolve_source(spec, arg)


def _load_error(arg: str, spec: str, e: BaseException, what: str = "it") -> NetiError:
    where = "" if Path(spec).expanduser().exists() else "no such local folder, and "
    return NetiError(f"{arg} {spec}: {where}could not load {what} ({_first_line(e)})")


_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError)


def _image_processor(arg: str, path: str):
    import importlib.util

    import transformers
    from transformers import AutoImageProcessor
    kwargs = {}
    if int(transformers.__version__.split(".")[0]) >= 5 and importlib.util.find_spec("torchvision") is None:
        kwargs["backend"] = "pil"  # same preprocessing; avoids the "requires torchvision" fallback warning
    try:
        return AutoImageProcessor.from_pretrained(path, **kwargs)
    except _LOAD_ERRORS as e:
        raise _load_error(arg, path, e, "its image processor") from None


def _model_type(arg: str, path: str) -> str:
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(path).model_type
    except _LOAD_ERRORS as e:
        raise _load_error(arg, path, e) from None


def _check_loaded(arg: str, path: str, info: dict) -> None:
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise NetiError(f"{arg} {path}: the checkpoint lacks {len(missing)} weight(s) of the model "
                        f"(e.g. {missing[0]}); is it the right kind of model?")


def load_clip(spec: str = DEFAULT_CLIP, device="cpu"):
    """(CLIPModel, CLIPTokenizer, image processor) from a local folder or hub id, eval mode, fp32."""
    from transformers import CLIPModel, CLIPTokenizer
    path = _resolve("--clip", spec)
    mtype = _model_type("--clip", path)
    if mtype != "clip":
        raise NetiError(f"--clip {spec}: not a CLIP model (its config says model_type {mtype!r})")
    try:
        model, info = CLIPModel.from_pretrained(path, output_loading_info=True)
        tokenizer = CLIPTokenizer.from_pretrained(path)
    except _LOAD_ERRORS as e:
        raise _load_error("--clip", spec, e) from None
    _check_loaded("--clip", spec, info)
    vocab = model.config.text_config.vocab_size
    if len(tokenizer) <= 2 or len(tokenizer) > vocab:
        raise NetiError(f"--clip {spec}: no usable CLIP tokenizer in it ({len(tokenizer)} tokens for a "
                        f"{vocab}-token text model)")
    processor = _image_processor("--clip", path)
    return model.to(device).eval().requires_grad_(False), tokenizer, processor


def load_dino(spec: str = DEFAULT_DINO, device="cpu"):
    """(ViT model, image processor) from a local folder or hub id (ViT, e.g. DINO; DINOv2 also works)."""
    from transformers import AutoModel, ViTModel
    path = _resolve("--dino", spec)
    mtype = _model_type("--dino", path)
    if mtype not in ("vit", "dinov2"):
        raise NetiError(f"--dino {spec}: not a ViT / DINO model (its config says model_type {mtype!r})")
    try:
        if mtype == "vit":
            model, info = ViTModel.from_pretrained(path, add_pooling_layer=False, output_loading_info=True)
        else:
            model, info = AutoModel.from_pretrained(path, output_loading_info=True)
    except _LOAD_ERRORS as e:
        raise _load_error("--dino", spec, e) from None
    _check_loaded("--dino", spec, info)
    processor = _image_processor("--dino", path)
    return model.to(device).eval().requires_grad_(False), processor


def _pooled(out):
    """get_*_features: a tensor in transformers 4.x; in 5.x an output whose pooler_output is projected."""
    import torch
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "pooler_output"):
        return out.pooler_output
    return out[1] if isinstance(out, tuple) else out


def _as_pil(images) -> list:
    import numpy as np
    from PIL import Image
    if isinstance(images, np.ndarray):
        images = [images] if images.ndim == 3 else list(images)
    out = []
    for im in images:
        if isinstance(im, Image.Image):
            out.append(im if im.mode == "RGB" else im.convert("RGB"))
        else:
            a = np.asarray(im)
            if a.dtype != np.uint8:
                raise NetiError(f"images must be PIL images or uint8 arrays [H, W, 3], got dtype {a.dtype}")
            out.append(Image.fromarray(a).convert("RGB"))
    return out


class Similarity:
    """Loaded CLIP (and optionally DINO) models; embeddings come back L2-normalised, float32, on CPU.

        sim = Similarity(clip="openai/clip-vit-base-patch32", dino="facebook/dino-vits16")
        g, r = sim.image_embeds(generated), sim.image_embeds(training)   # PIL images or uint8 arrays
        (g @ r.T).mean()                                                 # image similarity
    """

    def __init__(self, clip: str = DEFAULT_CLIP, dino: str | None = DEFAULT_DINO, device=None, batch_size: int = 32):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise NetiError(f"--batch-size {batch_size}: must be a positive integer")
        self.device = str(device or default_device())
        self.batch_size = batch_size
        self.clip_name, self.dino_name = clip, dino
        self.clip_model, self.tokenizer, self.clip_processor = load_clip(clip, self.device)
        self.dino_model, self.dino_processor = load_dino(dino, self.device) if dino else (None, None)

    def _batches(self, items):
        for i in range(0, len(items), self.batch_size):
            yield items[i:i + self.batch_size]

    @staticmethod
    def _normalize(x):
        import torch
        return torch.nn.functional.normalize(x.float(), dim=-1).cpu()

    def _embed_images(self, images, processor, model, forward, width: int):
        """Batched `forward(model, pixel_values)` over images, normalised: [N, width]."""
        import torch
        chunks = []
        with torch.inference_mode():
            for batch in self._batches(_as_pil(images)):
                px = processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device, model.dtype)
                chunks.append(self._normalize(forward(model, px)))
        return torch.cat(chunks) if chunks else torch.zeros(0, width)

    def image_embeds(self, images):
        """CLIP image embeddings [N, projection_dim] (the model's visual projection), normalised."""
        return self._embed_images(images, self.clip_processor, self.clip_model,
                                  lambda m, px: _pooled(m.get_image_features(pixel_values=px)),
                                  self.clip_model.config.projection_dim)

    def text_embeds(self, texts: list[str]):
        """CLIP text embeddings [N, projection_dim] (the model's text projection), normalised."""
        import torch
        texts = [texts] if isinstance(texts, str) else list(texts)
        max_len = min(self.clip_model.config.text_config.max_position_embeddings,
                      getattr(self.tokenizer, "model_max_length", 77) or 77)
        chunks = []
        with torch.inference_mode():
            for batch in self._batches(texts):
                enc = self.tokenizer(batch, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
                out = self.clip_model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                                        attention_mask=enc["attention_mask"].to(self.device))
                chunks.append(self._normalize(_pooled(out)))
        return torch.cat(chunks) if chunks else torch.zeros(0, self.clip_model.config.projection_dim)

    def dino_embeds(self, images):
        """DINO CLS embeddings [N, hidden] (last hidden state after the final layer norm), normalised."""
        if self.dino_model is None:
            raise NetiError("DINO was not loaded (--no-dino)")
        return self._embed_images(images, self.dino_processor, self.dino_model,
                                  lambda m, px: m(pixel_values=px).last_hidden_state[:, 0],
                                  self.dino_model.config.hidden_size)
