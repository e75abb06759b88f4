"""Training a concept (NeTI mapper, XTI per-layer embeddings, or one TI embedding).

Only the concept trains; the U-Net, VAE and text encoder stay frozen. Defaults are the official
NeTI ones (input_configs/train.yaml): 1000 steps, batch 2 x 4 accumulation, lr 1e-3 scaled by
batch x accumulation, AdamW (0.9, 0.999, wd 1e-2, eps 1e-8), constant schedule, nested dropout 0.5.

One optimizer step = `grad_accum` micro-batches of `batch_size` images. Each micro-batch:
VAE-encode, add noise at a random t per sample, then for each of the 16 cross-attention layers l
the concept gives (token, bypass) for (t_b, l); every caption is CLIP-encoded with them (one batch
of 16 B), the U-Net runs with K from enc[l] and V from enc_bypass[l], and the loss is the MSE to
the noise (or to v for v-prediction schedulers).

Checkpoints `checkpoint-{step}.safetensors` hold the concept tensors (same names and metadata as a
concept file, so `Concept.from_tensors` reads one), the AdamW state and every RNG state; the
non-tensor state (step, python / numpy RNG internals, data order) is a JSON string in the
safetensors metadata (`neti_fast.train_state`), so one atomic file carries everything, and no
pickle is involved. Resuming reproduces an uninterrupted run bit for bit (CPU, fp32).

Data-parallel (under torchrun / accelerate launch, WORLD_SIZE > 1): every rank holds the same concept
(same init, broadcast from rank 0) and draws its own data / noise / nested-dropout stream (rank 0 the
single-process one); gradients are averaged across ranks before each optimizer step, so the ranks stay
identical; the effective batch is batch_size x grad_accum x world (scale_lr scales by all three, as
the official script does with num_processes). Rank 0 alone writes; checkpoints carry every rank's RNG
state, so a resume with the same number of processes continues each stream exactly.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .concept import Concept
from .errors import NetiError
from .mapper import MapperConfig, NeTIMapper
from .models import NUM_LAYERS
from .utils import DTYPE_NAMES, METHODS, atomic_write, check_writable, default_device, image_size, torch_dtype

DTYPES = {name: getattr(torch, full) for name, full in DTYPE_NAMES.items()}  # kept for compatibility
# diffusers.optimization.get_scheduler names (as the official NeTI trainer); piecewise_constant needs rules
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)\.safetensors$")


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults are official NeTI's unless noted."""
    images: str | None = None             # folder of training images (required)
    placeholder: str | None = None        # new token naming the concept, e.g. "<my-cat>" (required)
    init_word: str | None = None          # one-token word initialising it, e.g. "cat" (required; official super_category_token)
    method: str = "neti"                  # neti | xti | ti
    learnable_property: str = "object"    # object | style (caption templates)
    model: str = "tiny"                   # built-in name, diffusers folder or hub id (SD 1.x)
    out: str | None = None                # output folder; default ./outputs/<placeholder>
    steps: int = 1000                     # optimizer steps (official max_train_steps)
    batch_size: int = 2                   # images per micro-batch
    grad_accum: int = 4                   # micro-batches per optimizer step
    lr: float = 1e-3                      # base learning rate
    scale_lr: bool = True                 # lr *= batch_size * grad_accum (official)
    lr_scheduler: str = "constant"        # diffusers get_scheduler name: constant, constant_with_warmup, linear, cosine, ...
    lr_warmup_steps: int = 0
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
    dtype: str = "float32"                # dtype of the frozen models; the concept trains in float32
    allow_tf32: bool = False
    resume: str | None = None             # checkpoint path, or "latest" (highest step in `out`)
    init_concept: str | None = None       # NeTI: start from this concept's mapper (official mapper_checkpoint_path)


# ----------------------------------------------------------------------------- validation helpers

def _check_config(cfg: TrainConfig) -> None:
    for name in ("images", "placeholder", "init_word"):
        if not getattr(cfg, name):
            raise NetiError(f"--{name.replace('_', '-')} is required")
    if cfg.method not in METHODS:
        raise NetiError(f"--method {cfg.method!r}: must be one of {', '.join(METHODS)}")
    if cfg.learnable_property not in ("object", "style"):
        raise NetiError(f"--property {cfg.learnable_property!r}: must be object or style")
    for name in ("steps", "batch_size", "grad_accum"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 1:
            raise NetiError(f"--{name.replace('_', '-')} {v}: must be a positive integer")
    if not isinstance(cfg.save_every, int) or cfg.save_every < 0:
        raise NetiError(f"--save-every {cfg.save_every}: must be a non-negative integer")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise NetiError(f"--lr {cfg.lr}: must be a positive number")
    if cfg.lr_scheduler not in LR_SCHEDULERS:
        raise NetiError(f"lr_scheduler {cfg.lr_scheduler!r}: supported are {', '.join(LR_SCHEDULERS)}")
    if not 0.0 <= cfg.nested_dropout_prob <= 1.0:
        raise NetiError(f"nested_dropout_prob {cfg.nested_dropout_prob}: must be between 0 and 1")
    if cfg.resolution is not None and (not isinstance(cfg.resolution, int) or cfg.resolution < 8 or cfg.resolution % 8):
        raise NetiError(f"--resolution {cfg.resolution}: must be a multiple of 8")
    if cfg.dtype not in DTYPE_NAMES:
        raise NetiError(f"--dtype {cfg.dtype!r}: must be one of float32, float16, bfloat16")
    if any(c.isspace() for c in cfg.placeholder) or "{}" in cfg.placeholder:
        raise NetiError(f"--placeholder {cfg.placeholder!r}: must be one word without spaces or {{}}")


def _device(cfg: TrainConfig) -> torch.device:
    try:
        dev = torch.device(cfg.device)
    except RuntimeError:
        raise NetiError(f"--device {cfg.device!r}: not a device (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NetiError(f"--device {cfg.device}: CUDA is not available on this machine")
    if dev.type == "cpu" and torch_dtype(cfg.dtype) == torch.float16:
        raise NetiError("--dtype float16 needs --device cuda (use float32 or bfloat16 on CPU)")
    return dev


def default_out(placeholder: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", placeholder).strip("-.") or "concept"
    return Path("outputs") / name


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def init_token_id(tokenizer, placeholder: str, init_word: str) -> int:
    """Validate the placeholder (new) and the init word (exactly one token); return the init word's id."""
    vocab = tokenizer.get_vocab()
    if placeholder in vocab or placeholder + "</w>" in vocab:  # added token, or a word CLIP already has
        raise NetiError(f"--placeholder {placeholder!r}: placeholder token already exists in the tokenizer; choose another")
    ids = tokenizer.encode(init_word, add_special_tokens=False)
    if len(ids) != 1:
        raise NetiError(f"--init-word {init_word!r}: must be a single token, but it becomes {len(ids)} tokens; "
                        "choose a simpler word for the concept's category")
    return ids[0]


# ----------------------------------------------------------------------------- the trainable concept

class Trainable:
    """The concept being trained: parameters, per-(t, l) rows, and conversion to a `Concept`."""

    def __init__(self, cfg: TrainConfig, init_embed: torch.Tensor, text_dim: int):
        self.cfg = cfg
        self.init_embed = init_embed.detach().float().cpu()
        self.mapper = self.embeds = None
        if cfg.method == "neti":
            target = None
            if cfg.normalize_mapper_output:
                target = float(cfg.target_norm) if cfg.target_norm is not None else float(self.init_embed.norm())
            mcfg = MapperConfig(output_dim=text_dim, num_layers=NUM_LAYERS, use_nested_dropout=cfg.use_nested_dropout,
                                nested_dropout_prob=cfg.nested_dropout_prob, target_norm=target,
                                use_positional_encoding=cfg.use_positional_encoding,
                                num_pe_time_anchors=cfg.num_pe_time_anchors, sigma_t=cfg.sigma_t,
                                sigma_l=cfg.sigma_l, output_bypass=cfg.output_bypass)
            self.mapper = NeTIMapper(mcfg, generator=torch.Generator().manual_seed(cfg.seed)).float()
            if cfg.init_concept:
                self._load_init_concept(cfg.init_concept)
            self.mapper.train()
        else:
            n = NUM_LAYERS if cfg.method == "xti" else 1
            self.embeds = torch.nn.Parameter(self.init_embed[None].repeat(n, 1).clone())

    def _load_init_concept(self, path: str) -> None:
        from .concept import load_concept
        c = load_concept(path)
        if c.method != "neti" or c.mapper is None:
            raise NetiError(f"{path}: init concept is a {c.method} concept; a NeTI mapper is needed")
        try:
            self.mapper.load_tensors(c.mapper.tensors())
        except RuntimeError as e:
            raise NetiError(f"{path}: its mapper does not match this run's mapper settings ({str(e).splitlines()[0]})") from None

    def to(self, device) -> "Trainable":
        if self.mapper is not None:
            self.mapper.to(device)
        else:
            self.embeds.data = self.embeds.data.to(device)
        return self

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.mapper.parameters()) if self.mapper is not None else [self.embeds]

    def layer_rows(self, t: torch.Tensor, layer: int):
        """(token [B, D], bypass [B, D] or None) for timesteps t [B] at one layer (training mode)."""
        if self.mapper is not None:
            return self.mapper(t.float(), torch.full_like(t, layer).float())
        row = self.embeds[layer if self.cfg.method == "xti" else 0]
        return row[None].expand(len(t), -1), None

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.mapper is not None:
            return {f"mapper.{k}": v.float().cpu().contiguous() for k, v in self.mapper.tensors().items()}
        return {"embeds": self.embeds.detach().float().cpu().contiguous()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        try:
            if self.mapper is not None:
                self.mapper.load_tensors({k[len("mapper."):]: v for k, v in tensors.items() if k.startswith("mapper.")})
            else:
                if tensors["embeds"].shape != self.embeds.shape:
                    raise RuntimeError(f"embeds shape {tuple(tensors['embeds'].shape)} != {tuple(self.embeds.shape)}")
                with torch.no_grad():
                    self.embeds.copy_(tensors["embeds"])
        except (KeyError, RuntimeError) as e:
            raise NetiError(f"{where}: checkpoint does not match this run's concept settings ({str(e).splitlines()[0]})") from None

    def concept(self, text_dim: int) -> Concept:
        cfg = self.cfg
        if self.mapper is not None:
            with torch.random.fork_rng(devices=[]):  # building a mapper draws from the global RNG
                mapper = NeTIMapper(self.mapper.cfg)
            mapper.load_tensors({k: v.cpu() for k, v in self.mapper.tensors().items()})
            return Concept("neti", cfg.placeholder, text_dim, mapper=mapper.eval(), init_word=cfg.init_word,
                           base_model=cfg.model, placeholder_embed=self.init_embed.clone())
        return Concept(cfg.method, cfg.placeholder, text_dim, embeds=self.embeds.detach().float().cpu().clone(),
                       init_word=cfg.init_word, base_model=cfg.model)


# ----------------------------------------------------------------------------- checkpoints

def _rng_state(train_gen: torch.Generator, dataset, device: torch.device) -> tuple[dict, dict]:
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    pv, pinternal, pgauss = random.getstate()
    ds_js, ds_t = dataset.state_dict()
    js = {"numpy": {"name": np_name, "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
          "python": [pv, list(pinternal), pgauss], "data": ds_js}
    tensors = {"rng.torch": torch.get_rng_state(), "rng.train": train_gen.get_state(),
               "rng.numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
               "rng.data_order": ds_t["order_gen"]}
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    return js, tensors


def _set_rng_state(js: dict, tensors: dict, train_gen: torch.Generator, dataset, device: torch.device) -> None:
    n = js["numpy"]
    np.random.set_state((n["name"], tensors["rng.numpy_keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    pv, pinternal, pgauss = js["python"]
    random.setstate((pv, tuple(pinternal), pgauss))
    torch.set_rng_state(tensors["rng.torch"])
    train_gen.set_state(tensors["rng.train"])
    dataset.load_state_dict(js["data"], {"order_gen": tensors["rng.data_order"]})
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)


def unet_dtype_is_fp16(model) -> bool:
    return model.unet.dtype == torch.float16 and model.device.type == "cuda"


def save_checkpoint(path: Path, step: int, cfg: TrainConfig, trainable: Trainable, optimizer, train_gen,
                    dataset, device, text_dim: int, scaler=None, ranks: list | None = None) -> Path:
    """`ranks`: under data parallelism, every rank's (_rng_state js, tensors), gathered by `_gather_rng`."""
    from safetensors.torch import save_file
    concept = trainable.concept(text_dim)
    tensors = concept.tensors()  # a checkpoint is also a loadable concept file
    params = trainable.parameters()
    for i, p in enumerate(params):
        for k, v in optimizer.state.get(p, {}).items():
            tensors[f"optim.{i}.{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    rng_js, rng_t = _rng_state(train_gen, dataset, device)
    tensors.update({k: v.cpu().contiguous() for k, v in rng_t.items()})
    md = concept.metadata()
    scaler_state = scaler.state_dict() if scaler is not None and scaler.is_enabled() else None
    state = {"step": step, "num_params": len(params), "rng": rng_js, "scaler": scaler_state, "config": asdict(cfg)}
    if ranks:
        state["world_size"] = len(ranks)
        state["rank_rng"] = {str(r): js for r, (js, _) in enumerate(ranks) if r > 0}
        for r, (_, ts) in enumerate(ranks):
            if r > 0:
                tensors.update({f"rank{r}.{k}": v.cpu().contiguous() for k, v in ts.items()})
    md["neti_fast.train_state"] = json.dumps(state)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=md))


def load_checkpoint(path: Path, cfg: TrainConfig, trainable: Trainable, optimizer, train_gen, dataset, device,
                    scaler=None, rank: int = 0) -> int:
    from safetensors import safe_open
    where = str(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        state = json.loads(md["neti_fast.train_state"])
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
        raise NetiError(f"{where}: not a neti-fast training checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    except Exception as e:  # safetensors raises its own error type for malformed headers
        raise NetiError(f"{where}: not a readable checkpoint ({str(e).splitlines()[0]})") from None
    for key, want in (("method", cfg.method), ("placeholder", cfg.placeholder)):
        if md.get(key) != want:
            raise NetiError(f"{where}: checkpoint was trained with {key} {md.get(key)!r}, this run uses {want!r}")
    trainable.load_tensors(tensors, where)
    params = trainable.parameters()
    if state.get("num_params") != len(params):
        raise NetiError(f"{where}: checkpoint does not match this run's concept settings (parameter count)")
    opt_state = {}
    for i in range(len(params)):
        st = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"optim.{i}.")}
        if st:
            opt_state[i] = st
    sd = optimizer.state_dict()
    sd["state"] = opt_state
    optimizer.load_state_dict(sd)
    rng_js, rng_t = state["rng"], tensors
    if rank > 0:
        rng_js = state.get("rank_rng", {}).get(str(rank))
        rng_t = {k[len(f"rank{rank}."):]: v for k, v in tensors.items() if k.startswith(f"rank{rank}.")}
    if rng_js is not None:
        _set_rng_state(rng_js, rng_t, train_gen, dataset, device)
    else:  # a checkpoint from fewer processes has no stream for this rank: a fresh one, seeded by the step
        _seed_globals(_rank_seed(cfg.seed, rank) + int(state["step"]))
    if scaler is not None and scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["step"])


# ----------------------------------------------------------------------------- training

def lr_schedule(cfg: TrainConfig, optimizer):
    """diffusers' learning-rate schedule (`get_scheduler`, as the official trainer): a LambdaLR whose
    factor for optimizer step k (0-based) is read as `lr_lambdas[0](k + 1)` and set explicitly each
    step, so a resumed run needs no scheduler state in its (pickle-free) checkpoint. k + 1: step k
    has done k + 1 updates when it ends (warm-up reaches full lr at step warmup - 1, as before)."""
    from diffusers.optimization import get_scheduler
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                         num_training_steps=cfg.steps)


def _lr_factor(schedule, step: int) -> float:
    return float(schedule.lr_lambdas[0](step + 1))


def _rank_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps the single-process seed, so one process and rank 0 draw the same stream."""
    return seed + 1_000_003 * rank


def _seed_globals(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _gather_rng(dd, train_gen, dataset, device) -> list | None:
    """Every rank's RNG state, on every rank (None in a single process)."""
    if dd.world == 1:
        return None
    import torch.distributed as dist
    mine = _rng_state(train_gen, dataset, device)
    everyone = [None] * dd.world
    dist.all_gather_object(everyone, mine)
    return everyone


def _average_grads(params: list, loss: float, world: int) -> float:
    """All-reduce the gradients (and the loss, for logging) in one flat buffer, averaged over ranks."""
    import torch.distributed as dist
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([loss], device=grads[0].device)])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for p, g in zip(params, grads):
        p.grad = flat[i:i + g.numel()].view_as(g).to(g.dtype)
        i += g.numel()
    return float(flat[-1])


def train(cfg: TrainConfig, model=None, progress: bool = True, on_step=None) -> Path:
    """Train the concept described by `cfg`; returns the path of `concept.safetensors`.

    `model`: an already loaded `Model` (else `load_model(cfg.model, cfg.device, cfg.dtype)`); its
    tokenizer is not modified. `on_step(step, loss, trainable)` is called after every optimizer step.
    Under torchrun / accelerate launch (WORLD_SIZE > 1) it trains data-parallel (module docstring).
    """
    from .distributed import setup_distributed

    _check_config(cfg)
    device = _device(cfg)
    dd = setup_distributed(str(device))  # "cuda" -> cuda:LOCAL_RANK under torchrun
    try:
        return _train(cfg, model, progress, on_step, dd)
    finally:
        dd.close()


def _train(cfg: TrainConfig, model, progress: bool, on_step, dd) -> Path:
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    from .attention import install_processors
    from .conditioning import encode, tokenize
    from .data import TextualInversionDataset, load_images
    from .models import load_model

    device = torch.device(dd.device)
    out = Path(cfg.out) if cfg.out else default_out(cfg.placeholder)
    folder = Path(cfg.images)  # the folder's basic checks before the (slow) model load
    if not folder.is_dir():
        load_images(folder)  # raises the NetiError naming the problem
    check_writable(out)

    # resume target, checked before the (slow) model load
    resume_path = None
    if cfg.resume:
        if cfg.resume == "latest":
            ckpts = _checkpoints(out)
            if not ckpts:
                raise NetiError(f"--resume latest: no checkpoint-*.safetensors in {out}")
            resume_path = ckpts[-1][1]
        else:
            resume_path = Path(cfg.resume)
            if not resume_path.is_file():
                raise NetiError(f"--resume {cfg.resume}: no such checkpoint file")
    elif _checkpoints(out):
        raise NetiError(f"--out {out}: holds checkpoints of an earlier run; pass --resume latest to continue it "
                        "or choose another folder")

    if cfg.allow_tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if model is None:
        from .distributed import prepare_builtin
        prepare_builtin(cfg.model, dd)
        model = load_model(cfg.model, device=device, dtype=torch_dtype(cfg.dtype))
        model.text_encoder.to(torch.float32)  # as official: only the U-Net and VAE run in the low dtype
    device = model.device
    tokenizer = copy.deepcopy(model.tokenizer)  # the placeholder is added to a copy only
    init_id = init_token_id(tokenizer, cfg.placeholder, cfg.init_word)
    text_encoder, unet, vae = model.text_encoder, model.unet, model.vae
    init_embed = text_encoder.get_input_embeddings().weight[init_id].detach().float().cpu()
    size = image_size(model, cfg.resolution)[0]
    images = load_images(folder, size, cfg.center_crop)

    # seeds: global RNGs drive the mapper's init and its nested dropout (as official)
    _seed_globals(cfg.seed)
    data_seed = _rank_seed(cfg.seed, dd.rank)
    dataset = TextualInversionDataset(images, size, cfg.learnable_property, cfg.center_crop, seed=data_seed)
    train_gen = torch.Generator().manual_seed(data_seed + 1)
    trainable = Trainable(cfg, init_embed, model.text_dim).to(device)
    if dd.world > 1:
        import torch.distributed as dist
        for p in trainable.parameters():  # identical start on every rank, whatever each drew
            dist.broadcast(p.data, 0)
        if dd.rank > 0:
            _seed_globals(data_seed)  # its own nested-dropout stream

    lr = cfg.lr * (cfg.batch_size * cfg.grad_accum * dd.world if cfg.scale_lr else 1)
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    schedule = lr_schedule(cfg, optimizer)
    # fp16 gradients through the frozen U-Net underflow without loss scaling (accelerate's fp16 does the same)
    scaler = torch.amp.GradScaler(device.type, enabled=unet_dtype_is_fp16(model))
    start = 0
    if resume_path is not None:
        start = load_checkpoint(resume_path, cfg, trainable, optimizer, train_gen, dataset, device, scaler, dd.rank)

    sched = DDPMScheduler.from_config({k: v for k, v in model.scheduler_config.items() if not k.startswith("_")})
    pred_type = sched.config.prediction_type
    if pred_type not in ("epsilon", "v_prediction"):
        raise NetiError(f"--model {cfg.model}: scheduler prediction_type {pred_type!r} is not supported for training")
    num_t = sched.config.num_train_timesteps
    scaling = vae.config.scaling_factor
    dtype = unet.dtype

    state = install_processors(model)

    bar = tqdm(total=cfg.steps, initial=start, disable=not progress or dd.rank > 0, desc=f"train {cfg.method}", unit="step")
    step = start
    try:
        while step < cfg.steps:
            for g in optimizer.param_groups:
                g["lr"] = lr * _lr_factor(schedule, step)
            total = 0.0
            for _ in range(cfg.grad_accum):
                pixels, captions = dataset.next_batch(cfg.batch_size)
                B = len(captions)
                with torch.no_grad():
                    lat = vae.encode(pixels.to(device, vae.dtype)).latent_dist
                    latents = lat.sample(generator=train_gen) * scaling
                noise = torch.randn(latents.shape, generator=train_gen).to(device, latents.dtype)
                t = torch.randint(0, num_t, (B,), generator=train_gen)
                noisy = sched.add_noise(latents, noise, t.to(device))
                toks = [tokenize(tokenizer, c, [cfg.placeholder]) for c in captions]
                ids = torch.stack([x.input_ids for x in toks])
                mask = torch.stack([x.mask for x in toks])
                t_dev = t.to(device)
                if cfg.method == "ti":  # one row for all 16 layers: encode once
                    token, bypass = trainable.layer_rows(t_dev, 0)
                    e, eb = encode(text_encoder, ids, mask, token, bypass)
                    enc, enc_b = [e] * NUM_LAYERS, [eb] * NUM_LAYERS
                else:
                    rows = [trainable.layer_rows(t_dev, l) for l in range(NUM_LAYERS)]
                    token = torch.cat([r[0] for r in rows])
                    bypass = None if rows[0][1] is None else torch.cat([r[1] for r in rows])
                    e, eb = encode(text_encoder, ids.repeat(NUM_LAYERS, 1), mask.repeat(NUM_LAYERS, 1), token, bypass)
                    enc, enc_b = list(e.split(B)), list(eb.split(B))
                state.mode = "layers"
                state.enc = [x.to(dtype) for x in enc]
                state.enc_bypass = [x.to(dtype) for x in enc_b]
                pred = unet(noisy.to(dtype), t_dev, encoder_hidden_states=state.enc[0]).sample
                target = noise if pred_type == "epsilon" else sched.get_velocity(latents, noise, t_dev)
                loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")
                scaler.scale(loss / cfg.grad_accum).backward()
                total += float(loss.detach()) / cfg.grad_accum
            if dd.world > 1:
                total = _average_grads(trainable.parameters(), total, dd.world)
            if not math.isfinite(total):
                raise NetiError(f"training diverged at step {step + 1} (loss {total}); lower --lr or use --dtype float32")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}")
            if on_step is not None:
                on_step(step, total, trainable)
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                ranks = _gather_rng(dd, train_gen, dataset, device)
                if dd.rank == 0:
                    save_checkpoint(out / f"checkpoint-{step}.safetensors", step, cfg, trainable, optimizer,
                                    train_gen, dataset, device, model.text_dim, scaler, ranks)
    finally:
        bar.close()
        state.mode, state.enc, state.enc_bypass = "plain", None, None

    concept = trainable.concept(model.text_dim)
    path = out / "concept.safetensors"
    concept.check_finite(str(path))
    if dd.rank == 0:
        concept.save(path)
    dd.barrier()  # the other ranks return once the file is there
    return path


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
              "mixed_precision": "_mixed_precision", "allow_tf32": "allow_tf32", "gradient_checkpointing": None},
    "eval": None,  # validation during training is not run; the section is ignored
}
_MIXED = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}
_FLOATS = {"lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "nested_dropout_prob", "target_norm",
           "sigma_t", "sigma_l"}
_INTS = {"steps", "batch_size", "grad_accum", "seed", "save_every", "resolution", "lr_warmup_steps",
         "num_pe_time_anchors"}
_BOOLS = {"scale_lr", "center_crop", "use_nested_dropout", "output_bypass", "normalize_mapper_output",
          "use_positional_encoding", "allow_tf32"}


def _coerce(path, key: str, v):
    """YAML value -> the field's type (PyYAML reads `1e-3` as a string; the official loader converts it)."""
    if v is None:
        return None  # null = not set: the built-in default
    if key in _BOOLS:
        if not isinstance(v, bool):
            raise NetiError(f"--config {path}: {key} must be true or false, got {v!r}")
        return v
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
    a("--model", default=None, help="tiny, a diffusers SD 1.x folder or hub id")
    a("--out", default=None, help="output folder (checkpoints and concept.safetensors)")
    a("--steps", type=int, default=None, help="optimizer steps (default 1000)")
    a("--batch-size", type=int, default=None, help="images per micro-batch (default 2)")
    a("--grad-accum", type=int, default=None, help="micro-batches per step (default 4)")
    a("--lr", type=float, default=None, help="base learning rate, scaled by batch x accumulation (default 1e-3)")
    a("--seed", type=int, default=None, help="random seed (default 0)")
    a("--save-every", type=int, default=None, help="checkpoint every N steps (default 250)")
    a("--resolution", type=int, default=None, help="training image size (default: the model's)")
    a("--center-crop", action=argparse.BooleanOptionalAction, default=None, help="center-crop images to square first")
    a("--config", default=None, metavar="YAML", help="official NeTI train.yaml; flags given override it")
    a("--resume", default=None, metavar="latest|PATH", help="continue from a checkpoint")
    a("--device", default=None, help="cpu or cuda (default: cuda when available)")
    a("--dtype", default=None, choices=sorted(DTYPE_NAMES), help="dtype of the frozen models (default float32)")


_FLAG_FIELDS = ("placeholder", "init_word", "method", "learnable_property", "model", "out", "steps", "batch_size",
                "grad_accum", "lr", "seed", "save_every", "resolution", "center_crop", "resume", "device", "dtype")


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
    if "device" not in values:
        values["device"] = default_device()
    if values.get("dtype") in DTYPE_NAMES:
        values["dtype"] = DTYPE_NAMES[values["dtype"]]
    return TrainConfig(**values)


def main(args) -> Path:
    cfg = config_from_args(args)
    rank = int(os.environ.get("RANK", "0") or 0)
    try:
        path = train(cfg)
    except NetiError:
        if rank > 0:
            raise SystemExit(2) from None  # every rank hit the same error: rank 0 alone prints it
        raise
    if rank == 0:
        print(f"concept saved to {path}")
    return path
