"""Tests for neti_fast.training.trainer on the built-in tiny model (CPU, a few steps each)."""
import argparse
import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from neti_fast.concepts.concept import Concept
from neti_fast.errors import NetiError
from neti_fast.concepts.mapper import NeTIMapper
from neti_fast.sd.models import load_model
from neti_fast.training.trainer import Trainable, main, train
from neti_fast.training.config import TrainConfig, add_arguments, config_from_args, load_yaml_config
from train_util import train_config as _cfg


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    # tiny-model ops are too small for intra-op threads; on a busy 2-core machine they oversubscribe badly
    yield


@pytest.fixture(scope="module")
def model():
    return load_model("tiny")


def _frozen(model):
    return {f"{n}.{k}": v.clone() for n, m in (("unet", model.unet), ("vae", model.vae), ("te", model.text_encoder))
            for k, v in m.state_dict().items()}


def _initial(cfg, model):
    """The concept's state before training (train() seeds the global RNG, then builds it)."""
    init_id = model.tokenizer.encode(cfg.init_word, add_special_tokens=False)[0]
    emb = model.text_encoder.get_input_embeddings().weight[init_id].detach()
    torch.manual_seed(cfg.seed)
    return Trainable(cfg, emb, model.text_dim, model.family).tensors(), emb


@pytest.mark.parametrize("method", ["neti", "xti", "ti"])
def test_train_each_method(model, images, tmp_path, method):
    before = _frozen(model)
    vocab_before = len(model.tokenizer)
    cfg = _cfg(images, tmp_path / "out", method=method, placeholder=f"<{method}-thing>")
    losses = []
    path = train(cfg, model, progress=False, on_step=lambda s, l, tr: losses.append(l))
    assert len(losses) == 2 and all(math.isfinite(l) for l in losses)
    assert path == tmp_path / "out" / "concept.safetensors"
    assert (tmp_path / "out" / "checkpoint-2.safetensors").is_file()

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
    c = Concept.from_tensors(tensors, md, str(path))
    assert (c.method, c.placeholder, c.init_word, c.base_model, c.text_dim) == \
        (method, f"<{method}-thing>", "cat", "tiny", model.text_dim)

    # an intermediate checkpoint reads as a concept too (same tensor names and metadata)
    ck = tmp_path / "out" / "checkpoint-2.safetensors"
    with safe_open(str(ck), framework="pt") as f:
        ck_c = Concept.from_tensors({k: f.get_tensor(k) for k in f.keys()}, f.metadata(), str(ck))
    assert all(torch.equal(v, ck_c.tensors()[k]) for k, v in c.tensors().items())

    # the frozen model is bitwise untouched; the concept did change
    after = _frozen(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(model.tokenizer) == vocab_before  # the placeholder went into a copy of the tokenizer
    assert model.attn_state.mode == "plain"
    init, emb = _initial(cfg, model)
    if method == "neti":
        assert isinstance(c.mapper, NeTIMapper)
        assert c.mapper.cfg.target_norm == pytest.approx(float(emb.norm()))
        changed = [k for k, v in c.tensors().items() if k in init and not torch.equal(v, init[k])]
        assert any("output_layer" in k for k in changed)
        assert torch.equal(c.tensors()["mapper.encoder.w"], init["mapper.encoder.w"])  # fixed buffer
        token, bypass = c.embeddings_at(torch.tensor([0, 999]), torch.tensor([0, 15]))
        assert torch.isfinite(token).all() and bypass is not None
    else:
        assert c.embeds.shape == ((16 if method == "xti" else 1), model.text_dim)
        assert not torch.equal(c.embeds, init["embeds"])


def test_nested_dropout_active_during_training(model, images, tmp_path, monkeypatch):
    seen = []
    orig = NeTIMapper.nested_dropout

    def spy(self, h, truncation):
        out = orig(self, h, truncation)
        seen.append((self.training, bool((out == 0).any())))
        return out

    monkeypatch.setattr(NeTIMapper, "nested_dropout", spy)
    train(_cfg(images, tmp_path / "o", steps=3, placeholder="<nd>"), model, progress=False)
    assert len(seen) == 3 * 16
    assert all(training for training, _ in seen)
    assert any(dropped for _, dropped in seen)  # p = 0.5 over 48 calls: some truncation happened


def test_placeholder_already_in_tokenizer(model, images, tmp_path):
    with pytest.raises(NetiError, match="already exists in the tokenizer; choose another"):
        train(_cfg(images, tmp_path / "o", placeholder="cat"), model, progress=False)


def test_init_word_must_be_one_token(model, images, tmp_path):
    n = len(model.tokenizer.encode("teddy bear", add_special_tokens=False))
    assert n > 1
    with pytest.raises(NetiError, match=f"'teddy bear'.*{n} tokens"):
        train(_cfg(images, tmp_path / "o", init_word="teddy bear"), model, progress=False)


def test_bad_inputs(model, images, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NetiError, match="not writable"):
        train(_cfg(images, tmp_path / "file" / "out"), model, progress=False)
    with pytest.raises(NetiError, match="does not exist"):
        train(_cfg(tmp_path / "missing", tmp_path / "o"), model, progress=False)
    with pytest.raises(NetiError, match="--method"):
        train(_cfg(images, tmp_path / "o", method="lora"), model, progress=False)


@pytest.mark.parametrize("method", ["neti", "xti"])
def test_resume_is_exact(model, images, tmp_path, method):
    kw = dict(method=method, batch_size=1, grad_accum=2, placeholder="<r>")
    full = train(_cfg(images, tmp_path / "full", steps=4, save_every=2, **kw), model, progress=False)
    assert (tmp_path / "full" / "checkpoint-2.safetensors").is_file()
    train(_cfg(images, tmp_path / "half", steps=2, **kw), model, progress=False)
    # a run with other settings into that folder is refused, naming what changed and how to go on
    with pytest.raises(NetiError, match=r"other settings \(lr 0.001 -> 0.002\).*--resume latest"):
        train(_cfg(images, tmp_path / "half", steps=4, lr=2e-3, **kw), model, progress=False)
    torch.manual_seed(12345)
    np.random.seed(1)  # clobber the global RNGs: resume must restore them
    # the same command again (longer): a plain re-run continues (neti); --resume latest says so (xti)
    resumed = train(_cfg(images, tmp_path / "half", steps=4, resume=None if method == "neti" else "latest", **kw),
                    model, progress=False)
    a, b = load_file(str(full)), load_file(str(resumed))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # optimizer state and RNGs in the final checkpoints agree too
    ca = load_file(str(tmp_path / "full" / "checkpoint-4.safetensors"))
    cb = load_file(str(tmp_path / "half" / "checkpoint-4.safetensors"))
    assert ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)


def test_resume_mismatch(model, images, tmp_path):
    train(_cfg(images, tmp_path / "o", steps=1, method="ti", placeholder="<m>"), model, progress=False)
    with pytest.raises(NetiError, match="method 'ti'"):
        train(_cfg(images, tmp_path / "o2", steps=2, method="xti", placeholder="<m>",
                   resume=str(tmp_path / "o" / "checkpoint-1.safetensors")), model, progress=False)
    with pytest.raises(NetiError, match="no checkpoint"):
        train(_cfg(images, tmp_path / "empty", resume="latest"), model, progress=False)


OFFICIAL_YAML = """\
log:
  exp_name: my_cat
  exp_dir: {exp}
  save_steps: 250
data:
  train_data_dir: {images}
  placeholder_token: <my-cat>
  super_category_token: cat
  dataloader_num_workers: 8
  learnable_property: object
  resolution: 512
  center_crop: false
  repeats: 100
model:
  pretrained_model_name_or_path: CompVis/stable-diffusion-v1-4
  use_nested_dropout: True
  nested_dropout_prob: 0.5
  normalize_mapper_output: True
  use_positional_encoding: True
  pe_sigmas: {{'sigma_t': 0.03, 'sigma_l': 2.0}}
  num_pe_time_anchors: 10
  output_bypass: True
  revision: null
  mapper_checkpoint_path: null
  target_norm: null
eval:
  validation_steps: 250
  validation_prompts: ["a photo of a {{}}"]
optim:
  max_train_steps: 1000
  learning_rate: 1e-3
  train_batch_size: 2
  gradient_accumulation_steps: 4
  seed: 42
  scale_lr: True
  lr_scheduler: constant
  lr_warmup_steps: 0
  adam_beta1: 0.9
  adam_beta2: 0.999
  adam_weight_decay: 1e-2
  adam_epsilon: 1e-08
  mixed_precision: "no"
  allow_tf32: False
"""


def test_yaml_config(tmp_path):
    p = tmp_path / "train.yaml"
    p.write_text(OFFICIAL_YAML.format(exp=tmp_path / "exp", images=tmp_path / "imgs"))
    d = load_yaml_config(p)
    assert d["out"] == str(tmp_path / "exp" / "my_cat")
    assert d["images"] == str(tmp_path / "imgs")
    assert (d["placeholder"], d["init_word"], d["model"]) == ("<my-cat>", "cat", "CompVis/stable-diffusion-v1-4")
    assert (d["steps"], d["batch_size"], d["grad_accum"], d["seed"], d["save_every"]) == (1000, 2, 4, 42, 250)
    assert d["lr"] == 1e-3 and isinstance(d["lr"], float) and d["weight_decay"] == 0.01
    assert (d["sigma_t"], d["sigma_l"], d["dtype"], d["resolution"]) == (0.03, 2.0, "float32", 512)
    cfg = TrainConfig(**d)
    assert cfg.method == "neti" and cfg.target_norm is None

    # flags given explicitly override the YAML; the rest comes from it
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--config", str(p), "--steps", "7", "--method", "xti", "--device", "cpu"])
    cfg = config_from_args(args)
    assert (cfg.steps, cfg.method, cfg.seed, cfg.placeholder, cfg.batch_size) == (7, "xti", 42, "<my-cat>", 2)
    args = parser.parse_args([str(tmp_path / "other"), "--placeholder", "<x>", "--init-word", "dog", "--model", "tiny"])
    cfg = config_from_args(args)
    assert (cfg.images, cfg.placeholder, cfg.steps, cfg.lr) == (str(tmp_path / "other"), "<x>", 1000, 1e-3)
    # without --config, --model is required: no silent training on the random built-in model
    args = parser.parse_args([str(tmp_path / "other"), "--placeholder", "<x>", "--init-word", "dog"])
    with pytest.raises(NetiError, match="--model is required.*tiny"):
        config_from_args(args)


def test_yaml_config_errors(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  max_train_steps: 10\n  warp_speed: 9\n")
    with pytest.raises(NetiError, match="unknown key optim.warp_speed") as e:
        load_yaml_config(p)
    assert str(p) in str(e.value)
    p.write_text("telemetry:\n  x: 1\n")
    with pytest.raises(NetiError, match="unknown section 'telemetry'"):
        load_yaml_config(p)
    p.write_text("optim: [unclosed\n")
    with pytest.raises(NetiError, match="malformed YAML"):
        load_yaml_config(p)
    p.write_text("optim:\n  max_train_steps: lots\n")
    with pytest.raises(NetiError, match="steps must be an integer"):
        load_yaml_config(p)
    with pytest.raises(NetiError, match="cannot read"):
        load_yaml_config(tmp_path / "missing.yaml")


def test_v_prediction(model, images, tmp_path, monkeypatch):
    """With a v-prediction model the loss's target is v = sqrt(a_t) noise - sqrt(1 - a_t) x0 (and
    the noise with an epsilon model), checked against the scheduler's alphas independently."""
    from diffusers import DDPMScheduler
    seen = {}
    real_add, real_mse = DDPMScheduler.add_noise, torch.nn.functional.mse_loss

    def add_noise(self, x0, noise, t):
        seen.update(x0=x0.detach().clone(), noise=noise.detach().clone(), t=t.detach().clone(),
                    alphas=self.alphas_cumprod.clone())
        return real_add(self, x0, noise, t)

    def mse(pred, target, **kw):
        seen["target"] = target.detach().clone()
        return real_mse(pred, target, **kw)
    monkeypatch.setattr(DDPMScheduler, "add_noise", add_noise)
    monkeypatch.setattr(torch.nn.functional, "mse_loss", mse)
    for pred_type in ("v_prediction", "epsilon"):
        m = dataclasses.replace(model, scheduler_config={**model.scheduler_config, "prediction_type": pred_type})
        losses = []
        train(_cfg(images, tmp_path / pred_type, steps=1, method="ti", placeholder="<v>"), m, progress=False,
              on_step=lambda s, l, tr: losses.append(l))
        assert len(losses) == 1 and math.isfinite(losses[0])
        a = seen["alphas"][seen["t"]].double().view(-1, 1, 1, 1)
        want = (a.sqrt() * seen["noise"].double() - (1 - a).sqrt() * seen["x0"].double()
                if pred_type == "v_prediction" else seen["noise"].double())
        torch.testing.assert_close(seen["target"].double(), want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(want, seen["noise"].double()) or pred_type == "epsilon"  # v differs from noise


def test_cli_main(images, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "cli"
    args = parser.parse_args(["--images", str(images), "--placeholder", "<cli>", "--init-word", "dog", "--method",
                              "ti", "--steps", "1", "--batch-size", "1", "--grad-accum", "1", "--out", str(out),
                              "--device", "cpu", "--resolution", "64", "--model", "tiny"])
    path = main(args)
    assert path == out / "concept.safetensors" and path.is_file()
    assert str(path) in capsys.readouterr().out


# diffusers.optimization's schedules, transcribed from their definitions (get_scheduler defaults:
# cosine num_cycles 0.5, cosine_with_restarts 1 cycle, polynomial lr_end 1e-7 power 1)
def _lambda(name, k, W, T, base):
    if name == "constant":
        return 1.0
    if k < W:
        return k / max(1, W)
    if name == "constant_with_warmup":
        return 1.0
    if name == "linear":
        return max(0.0, (T - k) / max(1, T - W))
    progress = (k - W) / max(1, T - W)
    if name == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2 * 0.5 * progress)))
    if name == "cosine_with_restarts":
        return 0.0 if progress >= 1.0 else max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((1 * progress) % 1.0))))
    assert name == "polynomial"
    end = 1e-7
    if k > T:
        return end / base
    return ((base - end) * (1 - (k - W) / (T - W)) ** 1.0 + end) / base


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                                  "polynomial"])
def test_lr_schedules_official_and_own_counting(name):
    """Every schedule, both countings, against the formulas: the official trainer's (--config) gives
    the scheduler warm-up and length x grad_accum and step k the factor at k x processes (accelerate
    0.18 steps the scheduler once per process per optimizer step); neti-fast's own: optimizer steps,
    step k the factor after its k + 1 updates."""
    from types import SimpleNamespace

    from neti_fast.training.config import LR_SCHEDULERS
    from neti_fast.training.trainer import _lr_factor, lr_schedule
    assert name in LR_SCHEDULERS
    base = 8e-3
    for official, G, P in ((True, 4, 1), (True, 2, 2), (False, 4, 1)):
        cfg = TrainConfig(lr_scheduler=name, lr_warmup_steps=3, steps=12, grad_accum=G, official=official)
        opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=base)
        sched = lr_schedule(cfg, opt)
        got = [_lr_factor(SimpleNamespace(cfg=cfg, schedule=sched, lr_pos=k * P), k) for k in range(12)]
        if official:
            want = [_lambda(name, k * P, 3 * G, 12 * G, base) for k in range(12)]
        else:
            want = [_lambda(name, k + 1, 3, 12, base) for k in range(12)]
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15), (official, G, P)
    if name == "linear":  # what the difference means over an official 1000-step run: ends at 0.75, not 0
        cfg = TrainConfig(lr_scheduler="linear", steps=1000, official=True)
        sched = lr_schedule(cfg, torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1.0))
        assert _lr_factor(SimpleNamespace(cfg=cfg, schedule=sched, lr_pos=999), 999) == pytest.approx(3001 / 4000)


def _csv_lrs(out):
    from neti_fast.training.logs import read_loss_csv
    return [r["lr"] for r in read_loss_csv(out / "loss.csv")]


def test_official_schedule_in_a_run(model, images, tmp_path):
    """The learning rates a run applies (loss.csv), --config counting and neti-fast's, for linear
    with 1 warm-up step over 3 steps at accumulation 2: base rate 1e-3 x batch 1 x accumulation 2."""
    base = 2e-3
    kw = dict(method="ti", batch_size=1, grad_accum=2, steps=3, lr_scheduler="linear", lr_warmup_steps=1)
    train(_cfg(images, tmp_path / "off", official=True, **kw), model, progress=False)
    assert _csv_lrs(tmp_path / "off") == pytest.approx([base * _lambda("linear", k, 2, 6, base) for k in range(3)])
    assert _csv_lrs(tmp_path / "off")[0] == 0  # the official first warm-up step does not move
    train(_cfg(images, tmp_path / "own", **kw), model, progress=False)
    assert _csv_lrs(tmp_path / "own") == pytest.approx([base * _lambda("linear", k + 1, 1, 3, base) for k in range(3)])


def test_mapper_checkpoint_path_resumes_at_its_step(model, images, tmp_path):
    """--config's model.mapper_checkpoint_path: the run continues at the step in the file's name for
    max_train_steps - N steps, from that mapper, with a fresh optimizer and schedule (as the coach)."""
    import shutil
    kw = dict(batch_size=1, grad_accum=1, placeholder="<mc>", official=True, lr_scheduler="linear",
              lr_warmup_steps=1)
    first = train(_cfg(images, tmp_path / "a", steps=2, **kw), model, progress=False)
    ckpt = tmp_path / "mapper-steps-2.safetensors"
    shutil.copy(first, ckpt)
    cfg = _cfg(images, tmp_path / "b", steps=5, init_concept=str(ckpt), **kw)
    start, _ = _initial(cfg, model)
    assert all(torch.equal(v, load_file(str(ckpt))[k]) for k, v in start.items())  # the file's mapper
    steps = []
    train(cfg, model, progress=False, on_step=lambda s, l, tr: steps.append(s))
    assert steps == [3, 4, 5]
    assert (tmp_path / "b" / "checkpoint-5.safetensors").is_file()
    base = 1e-3
    assert _csv_lrs(tmp_path / "b") == pytest.approx([base * _lambda("linear", k, 1, 5, base) for k in range(3)])
    # the step in the name reaches max_train_steps: nothing to train, the file's mapper is the concept
    done = train(_cfg(images, tmp_path / "c", steps=2, init_concept=str(ckpt), **kw), model, progress=False)
    a, b = load_file(str(done)), load_file(str(ckpt))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("mapper."))
    # a name without a step: training starts at 0 (the official coach fails on it)
    plain = tmp_path / "concept-final.safetensors"
    shutil.copy(first, plain)
    steps.clear()
    train(_cfg(images, tmp_path / "d", steps=2, init_concept=str(plain), **kw), model, progress=False,
          on_step=lambda s, l, tr: steps.append(s))
    assert steps == [1, 2]
    # without --config the file only initialises the mapper (neti-fast's meaning): all steps run
    steps.clear()
    train(_cfg(images, tmp_path / "e", steps=2, init_concept=str(ckpt), **{**kw, "official": False}), model,
          progress=False, on_step=lambda s, l, tr: steps.append(s))
    assert steps == [1, 2]


def test_validation_logs_and_settings(model, images, tmp_path, monkeypatch):
    """validate_every: a grid of the concept as saved at that step (the same images as generating
    with the checkpoint), and a run with validation trains exactly the concept one without does;
    loss.csv / loss.png / settings.json beside the checkpoints; loss.csv kept across a resume."""
    import json

    import neti_fast.training.validation as V
    from neti_fast.api import generate
    from neti_fast.concepts.importers import load_concept
    from neti_fast.concepts.table import precompute
    from neti_fast.engine.request import GenerateConfig
    from neti_fast.training.logs import read_loss_csv
    shown, real = [], V.validation_images
    monkeypatch.setattr(V, "validation_images", lambda m, c, cfg: shown.append(real(m, c, cfg)) or shown[-1])
    kw = dict(batch_size=1, grad_accum=1, placeholder="<val>", save_every=2, validation_steps=2,
              validation_prompts=["a photo of {}", "{} on a beach"], validation_seeds=[3, 4])
    losses, grids = [], []
    with_val = train(_cfg(images, tmp_path / "v", steps=2, validate_every=2, **kw), model, progress=False,
                     on_step=lambda s, l, tr: losses.append(l), on_validation=lambda s, p: grids.append((s, p)))
    out = tmp_path / "v"
    assert grids == [(2, out / "validation-2.png")] and grids[0][1].is_file()
    assert len(shown) == 1 and shown[0].shape[:2] == (2, 2)
    table = precompute(load_concept(out / "checkpoint-2.safetensors"), progress=False)
    want = generate(model, table, kw["validation_prompts"], kw["validation_seeds"],
                    cfg=GenerateConfig(steps=2), backend="eager")
    assert np.array_equal(shown[0].reshape(want.shape), want)
    without = train(_cfg(images, tmp_path / "nv", steps=2, **kw), model, progress=False)
    a, b = load_file(str(with_val)), load_file(str(without))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = read_loss_csv(out / "loss.csv")
    assert [r["step"] for r in rows] == [1, 2] and [r["loss"] for r in rows] == pytest.approx(losses, rel=1e-12)
    with Image.open(out / "loss.png") as im:
        assert im.format == "PNG" and im.width > 100
    settings = json.loads((out / "settings.json").read_text())
    assert settings["config"] == json.loads(json.dumps(dataclasses.asdict(
        _cfg(images, out, steps=2, validate_every=2, **kw)))) and settings["world_size"] == 1
    # an interrupted run had logged step 3 without checkpointing it: the resumed run redoes it
    with open(out / "loss.csv", "a") as f:
        f.write("3,99.0,0.001,9.0\n")
    train(_cfg(images, out, steps=4, **kw), model, progress=False)
    rows = read_loss_csv(out / "loss.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[2]["loss"] != 99.0


def test_tensorboard_logs(model, images, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -e '.[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train(_cfg(images, tmp_path / "tb", steps=2, batch_size=1, tensorboard=True, method="ti"), model, progress=False)
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2] and len(acc.Scalars("lr")) == 2


def test_train_flags():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["imgs", "--placeholder", "<x>", "--init-word", "dog", "--model", "tiny",
                              "--lr-scheduler", "cosine", "--lr-warmup-steps", "5", "--gradient-checkpointing",
                              "--no-channels-last", "--validate-every", "50", "--validation-prompt", "a {}",
                              "--validation-prompt", "{} in snow"])
    cfg = config_from_args(args)
    assert (cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.gradient_checkpointing, cfg.channels_last) == \
        ("cosine", 5, True, False)
    assert (cfg.validate_every, cfg.validation_prompts, cfg.official) == (50, ["a {}", "{} in snow"], False)
    assert cfg.validation_seeds == [42, 420, 501, 5456] and cfg.validation_steps == 50  # the official defaults


def test_yaml_eval_section(tmp_path):
    """eval: validation every validation_steps (default 100, as official), its prompts, seeds and
    denoising steps; a seed count that does not match num_validation_images is refused."""
    p = tmp_path / "t.yaml"
    p.write_text("optim:\n  max_train_steps: 10\n")
    d = load_yaml_config(p)
    assert d["validate_every"] == 100 and d["official"] is True and "validation_prompts" not in d
    p.write_text("eval:\n  validation_steps: 5\n  num_denoising_steps: 20\n  validation_seeds: [1, 2]\n"
                 "  num_validation_images: 2\n  validation_prompts: ['x {}']\n")
    d = load_yaml_config(p)
    assert (d["validate_every"], d["validation_steps"], d["validation_seeds"], d["validation_prompts"]) == \
        (5, 20, [1, 2], ["x {}"])
    p.write_text("eval:\n  num_validation_images: 3\n")
    with pytest.raises(NetiError, match="num_validation_images 3 but 4 validation_seeds"):
        load_yaml_config(p)
    p.write_text("eval:\n  num_validation_images: 3\n  validation_seeds: null\n")
    assert load_yaml_config(p)["validation_seeds"] == [0, 1, 2]
    p.write_text("eval:\n  validation_prompts: 7\n")
    with pytest.raises(NetiError, match="eval.validation_prompts must be a list"):
        load_yaml_config(p)


def test_train_on_sd2(images, tmp_path, tiny_sd2_model):
    """SD 2.x (tiny-sd2, v-prediction): the mapper covers its 16 layers at its text width, the concept
    records the family and generates on it."""
    from neti_fast.concepts.table import precompute
    from neti_fast.engine.engine import Engine
    from neti_fast.engine.request import GenerateConfig, Request
    from neti_fast.sd.families import SD2
    m = tiny_sd2_model
    losses = []
    cfg = _cfg(images, tmp_path / "sd2", method="neti", placeholder="<sd2-thing>", model="tiny-sd2")
    path = train(cfg, m, progress=False, on_step=lambda s, l, tr: losses.append(l))
    assert len(losses) == 2 and all(math.isfinite(l) for l in losses)
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
    assert md["family"] == "sd2"
    c = Concept.from_tensors(load_file(str(path)), md, str(path))
    assert c.family is SD2 and (c.mapper.cfg.output_dim, c.mapper.cfg.num_layers) == (m.text_dim, 16) == (64, 16)
    img = Engine(m, GenerateConfig(steps=2)).generate([Request("a photo of {}", 0, precompute(c, progress=False))])
    assert img.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("method", ["neti", "ti"])
def test_train_on_sdxl(images, tmp_path, tiny_xl_model, method):
    """SDXL (tiny-xl): both text encoders' widths in one row (the init word's embedding in each),
    the mapper over its 11 layers, the pooled embedding and time ids fed to the U-Net; the
    concept records sdxl and generates."""
    from neti_fast.concepts.table import precompute
    from neti_fast.engine.engine import Engine
    from neti_fast.engine.request import GenerateConfig, Request
    from neti_fast.sd.families import SDXL
    m = tiny_xl_model
    losses = []
    cfg = _cfg(images, tmp_path / "xl", method=method, placeholder=f"<xl-{method}>", model="tiny-xl")
    path = train(cfg, m, progress=False, on_step=lambda s, l, tr: losses.append(l))
    assert len(losses) == 2 and all(math.isfinite(l) for l in losses)
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
    c = Concept.from_tensors(load_file(str(path)), md, str(path))
    assert md["family"] == "sdxl" and c.family is SDXL and c.text_dim == m.text_dim == 32 + 64
    if method == "neti":
        assert (c.mapper.cfg.output_dim, c.mapper.cfg.num_layers) == (96, 11)
    else:
        init = m.tokenizer.encode("cat", add_special_tokens=False)[0]
        start = torch.cat([te.get_input_embeddings().weight[init] for te in m.text_encoders])
        assert c.embeds.shape == (1, 96) and not torch.equal(c.embeds[0], start)   # trained from the init word
    img = Engine(m, GenerateConfig(steps=2)).generate([Request("a photo of {}", 0, precompute(c, progress=False))])
    assert img.shape == (1, 64, 64, 3)
