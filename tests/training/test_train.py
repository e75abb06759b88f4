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


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    # tiny-model ops are too small for intra-op threads; on a busy 2-core machine they oversubscribe badly
    yield


@pytest.fixture(scope="module")
def model():
    return load_model("tiny")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rs = np.random.RandomState(0)
    for i in range(3):
        Image.fromarray((rs.rand(40, 48, 3) * 255).astype(np.uint8)).save(d / f"{i}.png")
    return d


def _cfg(images, out, **kw):
    base = dict(images=str(images), placeholder="<thing>", init_word="cat", out=str(out), steps=2,
                batch_size=2, grad_accum=1, resolution=64, save_every=0)
    base.update(kw)
    return TrainConfig(**base)


def _frozen(model):
    return {f"{n}.{k}": v.clone() for n, m in (("unet", model.unet), ("vae", model.vae), ("te", model.text_encoder))
            for k, v in m.state_dict().items()}


def _initial(cfg, model):
    """The concept's state before training (train() seeds the global RNG, then builds it)."""
    init_id = model.tokenizer.encode(cfg.init_word, add_special_tokens=False)[0]
    emb = model.text_encoder.get_input_embeddings().weight[init_id].detach()
    torch.manual_seed(cfg.seed)
    return Trainable(cfg, emb, model.text_dim).tensors(), emb


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


def test_lr_schedule_is_diffusers_get_scheduler():
    """The LR schedule is diffusers' get_scheduler (as the official trainer), read at step k + 1:
    constant_with_warmup keeps its meaning (full lr from step warmup - 1 on)."""
    from neti_fast.training.trainer import _lr_factor, lr_schedule
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1.0)
    warm = lr_schedule(TrainConfig(lr_scheduler="constant_with_warmup", lr_warmup_steps=4, steps=10), opt)
    assert [_lr_factor(warm, k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = lr_schedule(TrainConfig(lr_scheduler="cosine", steps=10), opt)
    f = [_lr_factor(cos, k) for k in range(10)]
    assert f == sorted(f, reverse=True) and f[-1] == pytest.approx(0.0, abs=1e-12) and f[4] == pytest.approx(0.5)
    with pytest.raises(NetiError, match="lr_scheduler"):
        train(TrainConfig(images="x", placeholder="<p>", init_word="cat", lr_scheduler="piecewise"))
