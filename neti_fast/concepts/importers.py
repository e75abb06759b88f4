"""Read every supported concept format into a `Concept`, dispatching on the file's content.

Formats:
    neti-fast safetensors   metadata neti_fast.format = concept | table
    Automatic1111           .safetensors with `emb_params` [n, D]; .pt dict with `string_to_param`
    A1111 / civitai SDXL    .safetensors with one tensor per text encoder: `clip_l` [n, 768], `clip_g` [n, 1280]
    diffusers / official TI learned_embeds.bin (or .safetensors): {token: [D] or [n, D]}; for SDXL
                            diffusers writes one file per encoder, learned_embeds_2.* beside it (read together)
Multi-vector embeddings ([n, D], n > 1) take n token positions in a prompt, as in A1111 and diffusers.
    official NeTI           mapper-steps-N.pt ({state_dict, cfg, encoder}) + learned_embeds-steps-N.bin

Security: pickle-based files are read only with torch.load(weights_only=True). The official NeTI
mapper pickles an instance of its encoder class; exactly those two classes
(models.positional_encoding.NeTIPositionalEncoding / BasicEncoder) are admitted, mapped onto inert
stand-ins below that only receive the pickled attribute dict. Any other global is refused before
anything is called.
"""
from __future__ import annotations

import pickle
import re
import struct
import warnings
from pathlib import Path

import torch

from .concept import Concept
from ..errors import NetiError
from .mapper import MapperConfig, NeTIMapper
from ..sd import families
from ..utils import first_line as _first_line

NETI_FAST_FORMATS = ("concept", "table")
_CONCEPT_TENSOR_KEYS = ("embeds", "placeholder_embed")
_OFFICIAL_PE = "models.positional_encoding.NeTIPositionalEncoding"
_OFFICIAL_BASIC = "models.positional_encoding.BasicEncoder"


# ---------------------------------------------------------------------------- restricted unpickling
class _PickledEncoder:
    """Inert stand-in for an official encoder class: keeps the pickled attribute dict, runs nothing."""
    official_name = ""

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}

    def tensor(self, name: str):
        """An attribute saved as a plain tensor, a parameter or a buffer (official code does all three)."""
        st = getattr(self, "state", {})
        for holder in (st, st.get("_parameters"), st.get("_buffers")):
            if isinstance(holder, dict) and isinstance(holder.get(name), torch.Tensor):
                return holder[name].detach()
        return None


class _OfficialNeTIPositionalEncoding(_PickledEncoder):
    official_name = _OFFICIAL_PE


class _OfficialBasicEncoder(_PickledEncoder):
    official_name = _OFFICIAL_BASIC


_ALLOWED_CLASSES = [(_OfficialNeTIPositionalEncoding, _OFFICIAL_PE), (_OfficialBasicEncoder, _OFFICIAL_BASIC)]
_REFUSAL_PATTERNS = (r"GLOBAL ([\w.<>]+)", r"unrecognized function (\S+)", r"but got (<class '[^']*'>)")


def _torch_load(path: Path):
    """torch.load with weights_only and only the two official encoder classes admitted (scoped)."""
    try:
        with torch.serialization.safe_globals(_ALLOWED_CLASSES):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        for pat in _REFUSAL_PATTERNS:
            m = re.search(pat, msg)
            if m:
                name = m.group(1).rstrip(".,")
                raise NetiError(f"{path}: refused to load: the pickle asks for {name}, which is not a known "
                                f"checkpoint class; nothing was executed") from None
        raise NetiError(f"{path}: not a readable checkpoint (corrupt pickle: {_first_line(msg)})") from None
    except NetiError:
        raise
    except Exception as e:  # corrupt zip / truncated file / bad storage; weights_only means nothing ran
        raise NetiError(f"{path}: not a readable checkpoint (corrupt or truncated: "
                        f"{type(e).__name__}: {_first_line(str(e))})") from None


# ---------------------------------------------------------------------------- content sniffing
def _sniff(path: Path) -> str:
    """'safetensors', 'pickle' (torch zip or legacy), or raise."""
    if not path.exists():
        raise NetiError(f"{path}: no such file")
    if not path.is_file():
        raise NetiError(f"{path}: not a file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise NetiError(f"{path}: cannot read ({e.strerror or e})") from None
    if size == 0:
        raise NetiError(f"{path}: file is empty")
    # safetensors first: its 8-byte little-endian header length may well start with 0x80
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "pickle"
    raise NetiError(f"{path}: not a concept file (neither safetensors nor a torch checkpoint; corrupt?)")


# ---------------------------------------------------------------------------- helpers
def _vectors(path: Path, t, what: str) -> torch.Tensor:
    """A [D] or [n, D] floating tensor -> [n, D] float32."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.ndim not in (1, 2) or t.numel() == 0:
        desc = f"tensor of shape {list(t.shape)}, dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise NetiError(f"{path}: {what} must be a float tensor of shape [D] or [n, D], got {desc}")
    return t.detach().float().reshape(-1, t.shape[-1]).contiguous()


MAX_VECTORS = 75  # one CLIP chunk's worth of token positions (77 less start and end)


def _ti_concept(path: Path, vec: torch.Tensor, placeholder: str, source: str, family=None) -> Concept:
    """`family`: where the format says (several encoders' vectors side by side); else by the width."""
    n, d = vec.shape
    if n > MAX_VECTORS:
        raise NetiError(f"{path}: an embedding of {n} vectors cannot fit a prompt (at most {MAX_VECTORS})")
    c = Concept(method="ti", placeholder=placeholder, text_dim=d, embeds=vec, source=source,
                family=family or _family_of(d), family_from_width=family is None)
    c.check_finite(str(path))
    return c


def _family_of(d: int):
    """A file that records no family is for the one whose text encoder has its width (768: SD 1.x,
    1024: SD 2.x); any other width (a toy model's) is taken for SD 1.x, as it always was. For a raw
    TI vector that is a guess only: used with a model of its width, the model's family decides
    (Concept.family_from_width)."""
    return families.by_widths((d,)) or families.DEFAULT


def _diffusers_ti(path: Path, token: str, vec: torch.Tensor, placeholder: str | None) -> Concept:
    """A diffusers {token: vector} file; with its siblings learned_embeds_2.*, ... (diffusers' SDXL
    textual inversion writes one file per text encoder) the vectors side by side, for that family."""
    vecs, i = [vec], 2
    while (p := path.with_name(f"{path.stem}_{i}{path.suffix}")).is_file():
        obj = _read_single(p)
        if set(obj) != {token}:
            raise NetiError(f"{p}: holds {', '.join(map(repr, obj)) or 'nothing'}; {path} beside it is for {token!r}")
        vecs.append(_vectors(p, obj[token], f"embedding {token!r}"))
        i += 1
    family = None if len(vecs) == 1 else families.by_encoder_count(len(vecs))
    if len(vecs) > 1 and family is None:
        raise NetiError(f"{path}: {len(vecs)} files of one embedding; no model family has {len(vecs)} text encoders")
    if len({v.shape[0] for v in vecs}) != 1:
        raise NetiError(f"{path}: the files beside it hold different numbers of vectors")
    return _ti_concept(path, torch.cat(vecs, dim=-1), placeholder or token, "diffusers-ti", family)


def _read_single(path: Path) -> dict:
    """A diffusers {token: tensor} file, safetensors or a torch checkpoint."""
    if _sniff(path) == "safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise NetiError(f"{path}: expected a {{token: tensor}} embedding file")
    return obj


def _a1111_placeholder(path: Path, name, placeholder: str | None) -> str:
    if placeholder:
        return placeholder
    stem = name if isinstance(name, str) and name.strip() else path.stem
    return f"<{stem.strip()}>"


# ---------------------------------------------------------------------------- safetensors
_PARAMETER_NAMES = {"weight", "bias", "embeddings", "embedding", "state_dict", "running_mean", "running_var"}


def _looks_like_ti(key: str, shape) -> bool:
    """diffusers' learned_embeds.safetensors holds one tensor named after its token, [D] or [n, D].
    Another model's single weight (`linear.weight`, `bias`, a `proj` matrix) is not one: a matrix of
    n > 1 rows is read as n vectors only under a token written `<...>`, as multi-vector ones are named."""
    if "." in key or "/" in key or key.lower() in _PARAMETER_NAMES or not key.strip():
        return False
    if len(shape) == 2 and 1 < shape[0] <= MAX_VECTORS:
        return key.startswith("<") and key.endswith(">")
    return len(shape) == 1 or (len(shape) == 2 and shape[0] == 1)


def _import_safetensors(path: Path, placeholder: str | None) -> Concept:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            md = f.metadata() or {}
            keys = list(f.keys())
            fmt = md.get("neti_fast.format")
            if fmt is not None:
                if fmt not in NETI_FAST_FORMATS:
                    raise NetiError(f"{path}: unknown neti_fast.format {fmt!r} (expected concept or table)")
                wanted = [k for k in keys if k.startswith("mapper.") or k in _CONCEPT_TENSOR_KEYS]
                tensors = {k: f.get_tensor(k) for k in wanted}
            elif "emb_params" in keys:
                tensors = {"emb_params": f.get_tensor("emb_params")}
            elif families.by_file_keys(keys) is not None:
                tensors = {k: f.get_tensor(k) for k in keys}
            elif len(keys) == 1 and _looks_like_ti(keys[0], f.get_slice(keys[0]).get_shape()):
                tensors = {keys[0]: f.get_tensor(keys[0])}
            else:
                shown = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "") or "none"
                raise NetiError(f"{path}: safetensors file holds no known concept tensors (tensors: {shown})")
    except NetiError:
        raise
    except Exception as e:
        raise NetiError(f"{path}: not a readable safetensors file ({_first_line(str(e))})") from None

    if fmt is not None:
        c = Concept.from_tensors(tensors, md, where=str(path))
        if placeholder:
            c.placeholder = placeholder
        return c
    if "emb_params" in tensors:
        vec = _vectors(path, tensors["emb_params"], "emb_params")
        return _ti_concept(path, vec, _a1111_placeholder(path, md.get("name"), placeholder), "a1111")
    family = families.by_file_keys(tensors)
    if family is not None:  # one vector per text encoder, side by side in the family's order
        vecs = [_vectors(path, tensors[e.file_key], e.file_key) for e in family.encoders]
        if len({v.shape[0] for v in vecs}) != 1:
            raise NetiError(f"{path}: {' / '.join(e.file_key for e in family.encoders)} hold different numbers "
                            f"of vectors ({', '.join(str(v.shape[0]) for v in vecs)})")
        return _ti_concept(path, torch.cat(vecs, dim=-1), _a1111_placeholder(path, md.get("name"), placeholder),
                           "a1111", family)
    (token, t), = tensors.items()  # diffusers learned_embeds.safetensors: {token: [D] / [1, D]}
    c = _diffusers_ti(path, token, _vectors(path, t, f"embedding {token!r}"), placeholder)
    warnings.warn(f"{path}: no neti-fast metadata; read as a Textual Inversion embedding for the token {token!r} "
                  f"(diffusers learned_embeds format)", stacklevel=3)
    return c


# ---------------------------------------------------------------------------- pickle-based
def _import_pickle(path: Path, placeholder: str | None, embeds_path) -> Concept:
    m = re.fullmatch(r"learned_embeds-steps-(\d+)\.bin", path.name)
    if m and embeds_path is None and (path.parent / f"mapper-steps-{m.group(1)}.pt").is_file():
        # the official NeTI pair: its learned_embeds row alone is not the concept; the mapper is
        return _import_official_neti(path.parent / f"mapper-steps-{m.group(1)}.pt",
                                     _torch_load(path.parent / f"mapper-steps-{m.group(1)}.pt"), placeholder, path)
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise NetiError(f"{path}: unrecognized checkpoint content (a {type(obj).__name__}, expected a dict)")
    if "state_dict" in obj and "encoder" in obj:
        return _import_official_neti(path, obj, placeholder, embeds_path)
    if "string_to_param" in obj:
        params = obj["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise NetiError(f"{path}: A1111 embedding's string_to_param must hold exactly one tensor")
        vec = _vectors(path, next(iter(params.values())), "string_to_param")
        return _ti_concept(path, vec, _a1111_placeholder(path, obj.get("name"), placeholder), "a1111")
    if "emb_params" in obj:
        vec = _vectors(path, obj["emb_params"], "emb_params")
        return _ti_concept(path, vec, _a1111_placeholder(path, obj.get("name"), placeholder), "a1111")
    if len(obj) == 1:
        (token, t), = obj.items()
        if isinstance(token, str) and token and isinstance(t, torch.Tensor):
            return _diffusers_ti(path, token, _vectors(path, t, f"embedding {token!r}"), placeholder)
    shown = ", ".join(repr(k) for k in list(obj)[:6]) or "none"
    raise NetiError(f"{path}: unrecognized checkpoint dict (keys: {shown}); expected an A1111 embedding, "
                    f"a learned_embeds.bin or an official NeTI mapper")


def _find_official_embeds(mapper_path: Path) -> Path | None:
    m = re.fullmatch(r"mapper-steps-(\d+)\.pt", mapper_path.name)
    cands = ([mapper_path.parent / f"learned_embeds-steps-{m.group(1)}.bin"] if m else []) + \
            [mapper_path.parent / "learned_embeds.bin"]
    return next((p for p in cands if p.is_file()), None)


def _cfg_get(path: Path, d: dict, key: str, default, types: tuple):
    v = d.get(key, default)
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
        raise NetiError(f"{path}: official NeTI cfg field {key!r} is malformed ({v!r})")
    return v


def _import_official_neti(path: Path, obj: dict, placeholder: str | None, embeds_path) -> Concept:
    sd, cfg, enc = obj.get("state_dict"), obj.get("cfg"), obj.get("encoder")
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise NetiError(f"{path}: official NeTI mapper's state_dict is not a dict of tensors")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise NetiError(f"{path}: official NeTI mapper has no usable cfg (expected a dict with a 'model' section)")
    mc = cfg["model"]
    dc = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    use_pe = _cfg_get(path, mc, "use_positional_encoding", True, (bool,))
    bypass = _cfg_get(path, mc, "output_bypass", True, (bool,))
    use_nd = _cfg_get(path, mc, "use_nested_dropout", True, (bool,))
    nd_prob = float(_cfg_get(path, mc, "nested_dropout_prob", 0.5, (int, float)))
    n_anchors = _cfg_get(path, mc, "num_pe_time_anchors", 10, (int,))
    target_norm = mc.get("target_norm")
    if isinstance(target_norm, torch.Tensor) and target_norm.numel() == 1:
        target_norm = target_norm.item()
    if target_norm is not None and (isinstance(target_norm, bool) or not isinstance(target_norm, (int, float))):
        raise NetiError(f"{path}: official NeTI cfg field 'target_norm' is malformed ({target_norm!r})")
    sig = mc.get("pe_sigmas") or {"sigma_t": 0.03, "sigma_l": 2.0}
    try:
        sigma_t, sigma_l = float(sig["sigma_t"]), float(sig["sigma_l"])
    except (KeyError, TypeError, ValueError):
        raise NetiError(f"{path}: official NeTI cfg field 'pe_sigmas' is malformed ({sig!r})") from None

    w_out = sd.get("output_layer.0.weight")
    if w_out is None or w_out.ndim != 2:
        raise NetiError(f"{path}: official NeTI state_dict lacks output_layer.0.weight")
    rows = w_out.shape[0]
    if bypass and rows % 2:
        raise NetiError(f"{path}: output_layer.0.weight has {rows} rows, not even as output_bypass requires")
    d = rows // 2 if bypass else rows

    sd = {k: v.detach().float() for k, v in sd.items()}
    for a, b in (("input_layer.", "net.0."), ("net.0.", "input_layer.")):  # the same Linear under two names
        for k in [k for k in sd if k.startswith(a)]:
            sd.setdefault(b + k[len(a):], sd[k])
    if use_pe:
        if not isinstance(enc, _OfficialNeTIPositionalEncoding):
            raise NetiError(f"{path}: cfg says use_positional_encoding but the pickled encoder is "
                            f"{type(enc).__name__}, not NeTIPositionalEncoding")
        w = sd.get("encoder.w", enc.tensor("w"))
        if w is None or w.ndim != 2 or w.shape[1] != 2 or w.shape[0] < 1:
            raise NetiError(f"{path}: the pickled NeTIPositionalEncoding has no [num_w, 2] tensor `w`")
        sd["encoder.w"] = w.float()
        num_w = int(w.shape[0])
    else:
        if not isinstance(enc, _OfficialBasicEncoder):
            raise NetiError(f"{path}: cfg says no positional encoding but the pickled encoder is "
                            f"{type(enc).__name__}, not BasicEncoder")
        for name in ("normalized_timesteps", "normalized_unet_layers"):
            v = sd.get(f"encoder.{name}", enc.tensor(name))
            if v is None:
                raise NetiError(f"{path}: the pickled BasicEncoder has no tensor `{name}`")
            sd[f"encoder.{name}"] = v.float()
        num_w = MapperConfig.num_w

    family = _family_of(d)
    mcfg = MapperConfig(output_dim=d, num_layers=family.num_layers, use_nested_dropout=use_nd, nested_dropout_prob=nd_prob,
                        target_norm=None if target_norm is None else float(target_norm),
                        use_positional_encoding=use_pe, num_pe_time_anchors=n_anchors,
                        sigma_t=sigma_t, sigma_l=sigma_l, num_w=num_w, output_bypass=bypass)
    try:
        mapper = NeTIMapper(mcfg)
        mapper.load_state_dict(sd, strict=True)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise NetiError(f"{path}: official NeTI weights do not match its cfg ({_first_line(str(e))})") from None
    mapper.eval()

    ph = placeholder or dc.get("placeholder_token")
    if not isinstance(ph, str) or not ph:
        raise NetiError(f"{path}: official NeTI cfg has no data.placeholder_token; pass a placeholder")
    init_word = dc.get("super_category_token") if isinstance(dc.get("super_category_token"), str) else None
    base = mc.get("pretrained_model_name_or_path") if isinstance(mc.get("pretrained_model_name_or_path"), str) else None

    ep = Path(embeds_path) if embeds_path is not None else _find_official_embeds(path)
    placeholder_embed = None
    if ep is not None:
        if _sniff(ep) != "pickle":
            raise NetiError(f"{ep}: expected the official learned_embeds .bin (a torch checkpoint)")
        e = _torch_load(ep)
        if not isinstance(e, dict) or len(e) != 1 or not isinstance(next(iter(e.values())), torch.Tensor):
            raise NetiError(f"{ep}: expected {{placeholder_token: tensor [D]}} learned embeds")
        vec = _vectors(ep, next(iter(e.values())), "learned embedding")
        if vec.shape != (1, d):
            raise NetiError(f"{ep}: learned embedding has shape {list(vec.shape)}, expected [{d}] to match the mapper")
        placeholder_embed = vec[0]

    c = Concept(method="neti", placeholder=ph, text_dim=d, mapper=mapper, init_word=init_word or None,
                base_model=base or None, source="official-neti", placeholder_embed=placeholder_embed, family=family)
    c.check_finite(str(path))
    return c


# ---------------------------------------------------------------------------- entry point
def load_concept(path, placeholder: str | None = None, embeds_path: str | None = None) -> Concept:
    """Load any supported concept file (see the module docstring); NetiError for anything else."""
    path = Path(path)
    if placeholder is not None and (not isinstance(placeholder, str) or not placeholder.strip()):
        raise NetiError(f"placeholder {placeholder!r}: must be a non-empty string")
    if embeds_path is not None and not Path(embeds_path).is_file():
        raise NetiError(f"{embeds_path}: no such file (given as the learned embeds)")
    kind = _sniff(path)
    if kind == "safetensors":
        return _import_safetensors(path, placeholder)
    return _import_pickle(path, placeholder, embeds_path)
