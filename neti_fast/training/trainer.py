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

Speed (exact rewrites of the official algorithm; bench/training.py measures them against it): the VAE
latent distribution of every training image and its mirror image is computed once (the official
trainer re-encodes the batch every micro-batch; a sample is mean + std x noise either way, the noise
drawn from the same generator); the 16 layers' CLIP passes are one batch of 16 B (official: 16
sequential passes); on CUDA the text encoding runs under autocast in the low dtype (as accelerate's
mixed precision does for the official text encoder) and the U-Net / VAE in channels-last. Optional:
gradient checkpointing of the U-Net and every text encoder, and torch.compile of the U-Net.

Memory (mixed precision): --dtype puts the frozen U-Net and VAE in float16 / bfloat16, --text-dtype
the text encoders (default float32, as official); the concept's parameters, their gradients and
the AdamW state are float32 whatever the frozen dtypes (the rows are cast down on their way into
the frozen networks, and the gradients cast back up on their way out).

What a run writes beside its checkpoints (training/logs.py): settings.json, loss.csv and loss.png,
validation-{step}.png grids (training/validation.py), optionally TensorBoard logs.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import (_checkpoints, _rank_seed, _rng_state, _seed_globals, load_checkpoint, save_checkpoint,
                          settings_changed, unet_dtype_is_fp16)
from ..concepts.concept import Concept
from ..errors import NetiError
from ..concepts.mapper import MapperConfig, NeTIMapper
from ..sd.families import Family
from .config import TrainConfig, _check_config, _device, config_from_args, default_out
from ..utils import check_writable, image_size, torch_dtype


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

    def __init__(self, cfg: TrainConfig, init_embed: torch.Tensor, text_dim: int, family: Family):
        self.cfg, self.family = cfg, family
        self.init_embed = init_embed.detach().float().cpu()
        self.mapper = self.embeds = None
        if cfg.method == "neti":
            target = None
            if cfg.normalize_mapper_output:
                target = float(cfg.target_norm) if cfg.target_norm is not None else float(self.init_embed.norm())
            mcfg = MapperConfig(output_dim=text_dim, num_layers=family.num_layers, use_nested_dropout=cfg.use_nested_dropout,
                                nested_dropout_prob=cfg.nested_dropout_prob, target_norm=target,
                                use_positional_encoding=cfg.use_positional_encoding,
                                num_pe_time_anchors=cfg.num_pe_time_anchors, sigma_t=cfg.sigma_t,
                                sigma_l=cfg.sigma_l, output_bypass=cfg.output_bypass)
            self.mapper = NeTIMapper(mcfg, generator=torch.Generator().manual_seed(cfg.seed)).float()
            if cfg.init_concept:
                self._load_init_concept(cfg.init_concept)
            self.mapper.train()
        else:
            n = family.num_layers if cfg.method == "xti" else 1
            self.embeds = torch.nn.Parameter(self.init_embed[None].repeat(n, 1).clone())

    def _load_init_concept(self, path: str) -> None:
        """Start from a concept's mapper: its own architecture and settings (nested dropout included),
        as the official trainer's CheckpointHandler.load_mapper builds the mapper from the file's config."""
        from ..concepts.importers import load_concept
        c = load_concept(path)
        if c.method != "neti" or c.mapper is None:
            raise NetiError(f"{path}: init concept is a {c.method} concept; a NeTI mapper is needed")
        if c.mapper.cfg.output_dim != self.mapper.cfg.output_dim:
            raise NetiError(f"{path}: its mapper is {c.mapper.cfg.output_dim}-d; this model's text encoder is "
                            f"{self.mapper.cfg.output_dim}-d")
        with torch.random.fork_rng(devices=[]):
            self.mapper = NeTIMapper(c.mapper.cfg).float()
        self.mapper.load_tensors(c.mapper.tensors())

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
                           base_model=cfg.model, placeholder_embed=self.init_embed.clone(), family=self.family)
        return Concept(cfg.method, cfg.placeholder, text_dim, embeds=self.embeds.detach().float().cpu().clone(),
                       init_word=cfg.init_word, base_model=cfg.model, family=self.family)


# ----------------------------------------------------------------------------- training

def lr_schedule(cfg: TrainConfig, optimizer):
    """diffusers' learning-rate schedule (`get_scheduler`, as the official trainer): a LambdaLR whose
    factor λ is read by `_lr_factor` and set explicitly each step, so no scheduler object is saved in
    the (pickle-free) checkpoints.

    neti-fast's counting (no --config): warm-up and length in optimizer steps, and step k (0-based)
    uses λ(k + 1), the factor after its k + 1 updates (a warm-up reaches the full rate at step
    warmup - 1; a linear decay's last step has rate 0).
    The official counting (`cfg.official`, set by --config): the coach passes warm-up and length
    x gradient_accumulation_steps, while accelerate (0.18) advances the scheduler once per process
    per optimizer step (never on the skipped micro-batches, nor on an fp16 step skipped for inf
    gradients), and the first step uses λ(0): step k uses λ(k x processes) of a schedule 4x as long
    at the default accumulation, so a linear decay ends near (1 - 1/grad_accum) x the base rate."""
    from diffusers.optimization import get_scheduler
    scale = cfg.grad_accum if cfg.official else 1
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * scale,
                         num_training_steps=cfg.steps * scale)


def _lr_factor(run, step: int) -> float:
    """The schedule's factor for optimizer step `step` (lr_schedule): λ(position of the official
    scheduler) with --config, else λ(step + 1)."""
    return float(run.schedule.lr_lambdas[0](run.lr_pos if run.cfg.official else step + 1))


def official_start_step(path: str) -> int | None:
    """The step the official trainer resumes at from `model.mapper_checkpoint_path`: the number its file
    name ends with (`mapper-steps-500.pt` -> 500; `int(path.stem.split("-")[-1])` in the coach), or
    None when the name has none (the official trainer fails on those; here training starts at 0)."""
    last = Path(path).stem.split("-")[-1]
    return int(last) if last.isdigit() else None


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


def train(cfg: TrainConfig, model=None, progress: bool = True, on_step=None, on_validation=None) -> Path:
    """Train the concept described by `cfg`; returns the path of `concept.safetensors`.

    `model`: an already loaded `Model` (else `load_model(cfg.model, cfg.device, cfg.dtype)`); its
    tokenizer is not modified. `on_step(step, loss, trainable)` is called after every optimizer step,
    `on_validation(step, grid_path)` after each validation grid (cfg.validate_every).
    Under torchrun / accelerate launch (WORLD_SIZE > 1) it trains data-parallel (module docstring).
    """
    from ..engine.distributed import setup_distributed

    _check_config(cfg)
    device = _device(cfg)
    dd = setup_distributed(str(device))  # "cuda" -> cuda:LOCAL_RANK under torchrun
    try:
        return _train(cfg, model, progress, on_step, on_validation, dd)
    finally:
        dd.close()


def _resume_target(cfg: TrainConfig, out: Path, log=print) -> Path | None:
    """The checkpoint to continue from (checked before the slow model load), or None for a fresh run:
    the one `--resume` names, else the latest in `out` when its run had these settings."""
    if cfg.resume:
        if cfg.resume == "latest":
            ckpts = _checkpoints(out)
            if not ckpts:
                raise NetiError(f"--resume latest: no checkpoint-*.safetensors in {out}")
            return ckpts[-1][1]
        path = Path(cfg.resume)
        if not path.is_file():
            raise NetiError(f"--resume {cfg.resume}: no such checkpoint file")
        return path
    ckpts = _checkpoints(out)
    if not ckpts:
        return None
    # a plain re-run of an interrupted command continues it, as `generate` and `run` do
    changed = settings_changed(ckpts[-1][1], cfg)
    if changed:
        raise NetiError(f"--out {out}: holds checkpoints of a run with other settings ({'; '.join(changed)}); "
                        "re-run with those settings to continue it, pass --resume latest to continue it with "
                        "these, or choose another --out")
    log(f"resuming from {ckpts[-1][1]} (step {ckpts[-1][0]}); --out another folder to start afresh")
    return ckpts[-1][1]


def _load_model(cfg: TrainConfig, dd):
    from ..engine.distributed import prepare_builtin
    from ..sd.models import load_model
    prepare_builtin(cfg.model, dd)
    model = load_model(cfg.model, device=torch.device(dd.device), dtype=torch_dtype(cfg.dtype))
    # as official: only the U-Net and VAE run in the low dtype, unless --text-dtype says otherwise;
    # every text encoder alike (SDXL's two: the concept's row goes through both)
    text_dtype = torch_dtype(cfg.text_dtype or "float32")
    for te in model.text_encoders:
        te.to(text_dtype)
    return model


@dataclass
class _Run:
    """Everything one training run holds, set up once (`_setup`) before the loop."""
    cfg: TrainConfig
    model: object
    tokenizers: list               # the model's (one per text encoder), copied, with the placeholder added
    dataset: object                # TextualInversionDataset
    train_gen: torch.Generator     # latents' sampling, noise and timesteps (the data order is the dataset's)
    trainable: Trainable
    optimizer: torch.optim.Optimizer
    lr: float                      # the base rate (scaled by the effective batch when scale_lr)
    schedule: object               # the learning-rate schedule (lr_schedule)
    scaler: torch.amp.GradScaler
    noise_sched: object            # DDPMScheduler: add_noise, the v-prediction target
    start: int                     # the step training starts at (a resumed run's)
    lr_pos: int                    # the official scheduler's position (cfg.official; see lr_schedule)
    latents: dict                  # (image index, mirrored) -> (mean, std) of the VAE's latent distribution
    unet: object                   # model.unet, or its torch.compile


def _setup(cfg: TrainConfig, model, dd, decoded: list, resume_path: Path | None) -> _Run:
    """Placeholder, images (`decoded`: load_images' RGB images, resized here), seeds, the concept,
    optimizer and schedule, and a resumed run's state."""
    from diffusers import DDPMScheduler

    from .data import TextualInversionDataset, preprocess
    device = model.device
    tokenizers = [copy.deepcopy(t) for t in model.tokenizers]  # the placeholder is added to copies only
    # the init word's embedding in every text encoder, side by side (a concept row: Model.text_dim)
    init_embed = torch.cat([te.get_input_embeddings().weight[init_token_id(tok, cfg.placeholder, cfg.init_word)]
                            for tok, te in zip(tokenizers, model.text_encoders)]).detach().float().cpu()
    size = image_size(model, cfg.resolution)[0]
    images = [preprocess(img, size, cfg.center_crop) for img in decoded]  # as load_images(folder, size) would

    # seeds: global RNGs drive the mapper's init and its nested dropout (as official)
    _seed_globals(cfg.seed)
    data_seed = _rank_seed(cfg.seed, dd.rank)
    dataset = TextualInversionDataset(images, size, cfg.learnable_property, cfg.center_crop, seed=data_seed)
    train_gen = torch.Generator().manual_seed(data_seed + 1)
    trainable = Trainable(cfg, init_embed, model.text_dim, model.family).to(device)
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
    start, lr_pos = 0, 0
    if resume_path is not None:
        start, lr_pos = load_checkpoint(resume_path, cfg, trainable, optimizer, train_gen, dataset, device, scaler,
                                        dd.rank)
        lr_pos = start * dd.world if lr_pos is None else lr_pos
    elif cfg.official and cfg.init_concept:
        # the official coach resumes at the step in the mapper file's name, with a fresh optimizer
        # and a fresh schedule (its scheduler is not advanced: the warm-up, if any, runs again)
        start = official_start_step(cfg.init_concept) or 0

    noise_sched = DDPMScheduler.from_config({k: v for k, v in model.scheduler_config.items() if not k.startswith("_")})
    if noise_sched.config.prediction_type not in ("epsilon", "v_prediction"):
        raise NetiError(f"--model {cfg.model}: scheduler prediction_type {noise_sched.config.prediction_type!r} "
                        "is not supported for training")
    unet = model.unet
    if cfg.compile:
        unet = torch.compile(model.unet)
    return _Run(cfg, model, tokenizers, dataset, train_gen, trainable, optimizer, lr, schedule, scaler, noise_sched,
                start, lr_pos, _latent_cache(model, dataset), unet)


@torch.no_grad()
def _latent_cache(model, dataset) -> dict:
    """The VAE's latent distribution (mean, std) of every training image and its mirror image, one
    image per call (the official trainer encodes the micro-batch every step; the values are the
    same up to rounding, and a latent is sampled from them with the same generator as before)."""
    vae, cache = model.vae, {}
    for i, px in enumerate(dataset.pixels):
        for flip in (False, True):
            x = (px.flip(-1) if flip else px)[None].to(model.device, vae.dtype)
            dist = vae.encode(x).latent_dist
            cache[i, flip] = (dist.mean[0], dist.std[0])
    return cache


def _sample_latents(run: _Run, items: list) -> torch.Tensor:
    """diffusers' DiagonalGaussianDistribution.sample for the batch's cached distributions:
    mean + std x randn_tensor(shape, generator) (the same draw as encoding the batch), x scaling."""
    from diffusers.utils.torch_utils import randn_tensor
    mean = torch.stack([run.latents[i, f][0] for i, f, _ in items])
    std = torch.stack([run.latents[i, f][1] for i, f, _ in items])
    z = randn_tensor(mean.shape, generator=run.train_gen, device=mean.device, dtype=mean.dtype)
    return (mean + std * z) * run.model.vae.config.scaling_factor


def _text_rows(run: _Run, ids: list, mask, t: torch.Tensor, B: int):
    """Per-layer text encodings for the captions at timesteps t (ids: per text encoder [B, 77]):
    (L x [B, 77, D] keys' source, L x values' source, pooled [B, P] or None). NeTI / XTI: the L
    layers' rows in one batch of L B per encoder; TI: one pass. The pooled embedding (SDXL) is
    encoded with the rows of the family's pooled layer, as at inference (sd.encoders)."""
    from ..sd.encoders import encode_all, pooled_rows
    m = run.model
    L, pl = m.family.num_layers, m.family.pooled_layer
    if run.cfg.method == "ti":  # one row for every layer: encode once
        token, bypass = run.trainable.layer_rows(t, 0)
        e, eb = encode_all(m, ids, mask, token, bypass)
        return [e] * L, [eb] * L, None if pl is None else pooled_rows(m, ids, _slots(mask), token)
    rows = [run.trainable.layer_rows(t, l) for l in range(L)]
    token = torch.cat([r[0] for r in rows])
    bypass = None if rows[0][1] is None else torch.cat([r[1] for r in rows])
    e, eb = encode_all(m, [x.repeat(L, 1) for x in ids], mask.repeat(L, 1), token, bypass)
    return list(e.split(B)), list(eb.split(B)), None if pl is None else pooled_rows(m, ids, _slots(mask), rows[pl][0])


def _slots(mask: torch.Tensor) -> torch.Tensor:
    """A one-concept mask [B, 77] as slots (0 at the concept, -1 elsewhere)."""
    return torch.where(mask, 0, -1)


def _text_autocast(model):
    """On CUDA with a low-dtype U-Net, the mapper and CLIP run under autocast in that dtype (as the
    official text encoder under accelerate's mixed precision); their weights stay fp32."""
    import contextlib
    dtype = model.unet.dtype
    if model.device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _micro_step(run: _Run, state) -> float:
    """One micro-batch: VAE latents, noise at a random t per image, the concept's text rows, the
    U-Net's prediction and the MSE loss; its gradient (scaled by 1 / grad_accum) is accumulated."""
    from ..sd.conditioning import tokenize
    cfg, m, gen, sched = run.cfg, run.model, run.train_gen, run.noise_sched
    device, dtype = m.device, m.unet.dtype
    items = run.dataset.next_items(cfg.batch_size)
    captions = [c for _, _, c in items]
    B = len(captions)
    latents = _sample_latents(run, items)
    noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
    t = torch.randint(0, sched.config.num_train_timesteps, (B,), generator=gen)
    noisy = sched.add_noise(latents, noise, t.to(device))
    toks = [[tokenize(tok, c, [cfg.placeholder]) for c in captions] for tok in run.tokenizers]
    ids = [torch.stack([x.input_ids for x in tk]) for tk in toks]
    mask = torch.stack([x.mask for x in toks[0]])
    t_dev = t.to(device)
    with _text_autocast(m):
        enc, enc_b, pooled = _text_rows(run, ids, mask, t_dev, B)
    state.mode = "layers"
    state.enc = [x.to(dtype) for x in enc]
    state.enc_bypass = [x.to(dtype) for x in enc_b]
    added = None
    if pooled is not None:  # SDXL: the images are cropped to `size` x `size`: that is every time id
        size = noisy.shape[-1] * m.vae_scale_factor
        time_ids = torch.tensor([size, size, 0, 0, size, size], dtype=dtype, device=device).expand(B, -1)
        added = {"text_embeds": pooled.to(dtype), "time_ids": time_ids}
    pred = run.unet(noisy.to(dtype), t_dev, encoder_hidden_states=state.enc[0], added_cond_kwargs=added).sample
    target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t_dev)
    loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")
    run.scaler.scale(loss / cfg.grad_accum).backward()
    return float(loss.detach()) / cfg.grad_accum


def _optimizer_step(run: _Run, state, step: int, dd) -> float:
    """Optimizer step `step` (0-based): its learning rate, grad_accum micro-batches, gradients
    averaged over ranks, the update. Returns the step's loss."""
    lr = run.lr * _lr_factor(run, step)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    total = sum(_micro_step(run, state) for _ in range(run.cfg.grad_accum))
    if dd.world > 1:
        total = _average_grads(run.trainable.parameters(), total, dd.world)
    if not math.isfinite(total):
        raise NetiError(f"training diverged at step {step + 1} (loss {total}); lower --lr or use --dtype float32")
    scale = run.scaler.get_scale() if run.scaler.is_enabled() else None
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    skipped = scale is not None and run.scaler.get_scale() < scale  # inf gradients: the step was skipped
    if not skipped:
        run.lr_pos += dd.world  # accelerate steps the scheduler once per process
    return total, lr


def checkpointing(text_encoder, on: bool) -> None:
    """transformers' activation checkpointing of a text encoder (renamed in transformers 5)."""
    name = "activation_checkpointing" if hasattr(text_encoder, "activation_checkpointing_enable") \
        else "gradient_checkpointing"
    getattr(text_encoder, f"{name}_{'enable' if on else 'disable'}")()


def _prepare_model(cfg: TrainConfig, model):
    """Training-time settings of the frozen models; returns the function undoing them (the model
    may be shared with inference, e.g. the server's)."""
    unet, vae = model.unet, model.vae
    channels_last = model.device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
    if channels_last:  # convolutions in NHWC: faster with cuDNN's tensor-core kernels
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    tes = model.text_encoders  # every one the concept's gradient goes through (SDXL: both)
    if cfg.gradient_checkpointing:  # U-Net and CLIP blocks (as official); both checkpoint in train mode
        unet.enable_gradient_checkpointing()  # only, and neither has dropout, so train mode changes nothing else
        unet.train()
        for te in tes:
            checkpointing(te, True)
            te.train()

    def undo():
        if channels_last:
            unet.to(memory_format=torch.contiguous_format)
            vae.to(memory_format=torch.contiguous_format)
        if cfg.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
            unet.eval()
            for te in tes:
                checkpointing(te, False)
                te.eval()
    return undo


def _train(cfg: TrainConfig, model, progress: bool, on_step, on_validation, dd) -> Path:
    """Check the inputs, set up, run the optimizer steps (checkpointing, logging, validating),
    write the concept."""
    from tqdm.auto import tqdm

    from ..sd.attention import install_processors
    from .data import load_images
    from .logs import TrainLog, write_settings
    from .validation import write_validation

    out = Path(cfg.out) if cfg.out else default_out(cfg.placeholder)
    main_rank = dd.rank == 0
    log = print if main_rank else (lambda *a: None)
    folder = Path(cfg.images)
    decoded = load_images(folder, log=log)  # every image decodes, before the (slow) model load
    check_writable(out)
    resume_path = _resume_target(cfg, out, log=log)
    if cfg.allow_tf32 and torch.device(dd.device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = model if model is not None else _load_model(cfg, dd)
    run = _setup(cfg, model, dd, decoded, resume_path)
    if resume_path is None and run.start:
        log(f"{cfg.init_concept}: resuming at step {run.start} (its file name), as the official trainer does")
    state = install_processors(model)
    undo = _prepare_model(cfg, model)
    train_log = None
    if main_rank:
        write_settings(out, cfg, dd.world)
        train_log = TrainLog(out, run.start, cfg.tensorboard)

    bar = tqdm(total=cfg.steps, initial=run.start, disable=not progress or not main_rank, desc=f"train {cfg.method}",
               unit="step")
    try:
        for step in range(run.start, cfg.steps):
            loss, lr = _optimizer_step(run, state, step, dd)
            done = step + 1
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)  # tqdm's ETA: (steps left) / its smoothed rate
            if train_log is not None:
                train_log.step(done, loss, lr)
            if on_step is not None:
                on_step(done, loss, run.trainable)
            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
                ranks = _gather_rng(dd, run.train_gen, run.dataset, model.device)
                if main_rank:
                    save_checkpoint(out / f"checkpoint-{done}.safetensors", done, cfg, run.trainable,
                                    run.optimizer, run.train_gen, run.dataset, model.device, model.text_dim,
                                    run.scaler, ranks, lr_position=run.lr_pos)
                    train_log.plot()
            if cfg.validate_every and done % cfg.validate_every == 0 and main_rank:
                path, grid = write_validation(out, done, model, run.trainable.concept(model.text_dim), cfg)
                train_log.image("validation", grid, done)
                if on_validation is not None:
                    on_validation(done, path)
    finally:
        bar.close()
        state.mode, state.enc, state.enc_bypass = "plain", None, None
        undo()
        if train_log is not None:
            train_log.plot()
            train_log.close()

    concept = run.trainable.concept(model.text_dim)
    path = out / "concept.safetensors"
    concept.check_finite(str(path))
    if main_rank:
        concept.save(path)
    dd.barrier()  # the other ranks return once the file is there
    return path


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
