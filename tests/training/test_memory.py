"""Training memory settings (issue 21, item 8): gradient checkpointing computes the same step,
low-dtype frozen networks keep the concept, its gradients and AdamW state in float32, and the
training images are VAE-encoded once per run."""
import argparse
import dataclasses

import pytest
import torch

from neti_fast.errors import NetiError
from neti_fast.training.config import add_arguments, config_from_args
from train_util import train_config as _cfg


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


def _ckpt_on(te) -> bool:
    """transformers' checkpointing flag of a text encoder's layers (where it sits varies by version)."""
    return all(getattr(mod, "gradient_checkpointing") for mod in te.modules() if hasattr(mod, "gradient_checkpointing"))


@pytest.mark.parametrize("name", ["tiny", "tiny-xl"])
def test_checkpointing_same_loss_and_gradients(name, images, tiny_xl_model):
    """One micro-batch with gradient checkpointing (U-Net and every text encoder) gives the loss and
    concept gradients of one without, in float64 (where rounding is ~1e-15; a checkpointed block
    recomputed wrongly, e.g. with other dropout or another layer's rows, is off by O(1)). The
    checkpointing is really on: fewer bytes saved for backward, every text encoder's flag set."""
    from neti_fast.bench import training as tb
    from neti_fast.sd.models import load_model
    from neti_fast.training.trainer import _micro_step
    m = load_model(name, "cpu", torch.float64)

    def micro(ckpt: bool):
        run, state, _ = tb.setup_run(m, 64, 2, 1, images)
        run.trainable.mapper.double()
        with tb._variant(run, "checkpointing" if ckpt else "neti-fast"):
            flags = [_ckpt_on(te) for te in m.text_encoders]
            torch.manual_seed(0)  # the nested-dropout draws
            with tb.saved_bytes(tb._all_params(run)) as c:
                loss = _micro_step(run, state)
        assert not any(_ckpt_on(te) for te in m.text_encoders)  # undone
        grads = torch.cat([p.grad.flatten() for p in run.trainable.parameters()])
        state.mode, state.enc, state.enc_bypass = "plain", None, None
        return loss, grads, flags, c.bytes
    loss, grads, flags, saved = micro(False)
    loss_c, grads_c, flags_c, saved_c = micro(True)
    assert flags == [False] * len(m.text_encoders) and flags_c == [True] * len(m.text_encoders)
    assert saved_c < 0.7 * saved
    assert float(grads.norm()) > 0
    assert loss_c == pytest.approx(loss, rel=1e-12)
    assert float((grads_c - grads).norm() / grads.norm()) < 1e-10


@pytest.mark.parametrize("text_dtype", [None, "bfloat16"])
def test_bf16_frozen_weights_keep_fp32_concept(images, tmp_path, tiny_xl_model, text_dtype):
    """--dtype bfloat16 (and --text-dtype): the frozen U-Net / VAE (and text encoders) in bf16, every
    text encoder alike (SDXL's two), while the mapper, its gradients and AdamW's moments are float32
    and the gradient reaches the mapper (finite, non-zero) through the bf16 networks."""
    from neti_fast.engine.distributed import setup_distributed
    from neti_fast.sd.attention import install_processors
    from neti_fast.training.data import load_images
    from neti_fast.training.trainer import _load_model, _micro_step, _setup
    cfg = _cfg(images, tmp_path / "o", model="tiny-xl", dtype="bfloat16", text_dtype=text_dtype)
    dd = setup_distributed("cpu")
    m = _load_model(cfg, dd)
    assert m.unet.dtype == m.vae.dtype == torch.bfloat16
    want = torch.bfloat16 if text_dtype else torch.float32
    assert [te.dtype for te in m.text_encoders] == [want, want]
    run = _setup(cfg, m, dd, load_images(images), None)
    state = install_processors(m)
    params = run.trainable.parameters()
    before = [p.detach().clone() for p in params]
    assert all(p.dtype == torch.float32 for p in params)
    _micro_step(run, state)
    grads = [p.grad for p in params]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    flat = torch.cat([g.flatten() for g in grads])
    assert torch.isfinite(flat).all() and float(flat.abs().max()) > 0
    run.optimizer.step()
    for p, b in zip(params, before):
        st = run.optimizer.state[p]
        assert p.dtype == st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32
    assert any(not torch.equal(p, b) for p, b in zip(params, before))


def test_latents_encoded_once(images, tmp_path, tiny_model, monkeypatch):
    """The VAE encodes each training image and its mirror image once per run, none per micro-batch:
    3 images -> 6 encodes over 3 steps x 2 micro-batches (the official trainer: one per micro-batch)."""
    from neti_fast.training.trainer import train
    calls = []
    encode = tiny_model.vae.encode

    def counting(x, *a, **kw):
        calls.append(x.shape[0])
        return encode(x, *a, **kw)
    monkeypatch.setattr(tiny_model.vae, "encode", counting)
    steps = []
    train(_cfg(images, tmp_path / "o", steps=3, grad_accum=2), tiny_model, progress=False,
          on_step=lambda s, loss, tr: steps.append((s, len(calls))))
    assert calls == [1] * 6
    assert [n for _, n in steps] == [6, 6, 6]


def _args(*argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_text_dtype_flag_and_errors(images, tmp_path):
    from neti_fast.training.config import _check_config, _device
    cfg = config_from_args(_args(str(images), "--placeholder", "<a>", "--init-word", "cat", "--model", "tiny",
                                 "--dtype", "bf16", "--text-dtype", "bf16", "--gradient-checkpointing",
                                 "--device", "cpu"))
    assert (cfg.dtype, cfg.text_dtype, cfg.gradient_checkpointing) == ("bfloat16", "bfloat16", True)
    assert config_from_args(_args("--model", "tiny")).text_dtype is None  # default: float32 (official)
    with pytest.raises(NetiError, match=r"^--text-dtype float16 needs --device cuda"):
        _device(dataclasses.replace(cfg, text_dtype="float16"))
    with pytest.raises(NetiError, match=r"^--text-dtype 'int8': must be one of"):
        _check_config(dataclasses.replace(cfg, text_dtype="int8"))


def test_loss_scaling_when_any_frozen_network_is_fp16():
    """On CUDA a float16 U-Net or a --text-dtype float16 text encoder sends fp16 gradients back to the
    concept: the run uses a gradient scaler (never on CPU, where float16 is refused)."""
    from types import SimpleNamespace as NS

    from neti_fast.training.checkpoints import unet_dtype_is_fp16

    def model(dev, unet, *texts):
        return NS(device=torch.device(dev), unet=NS(dtype=unet), text_encoders=[NS(dtype=t) for t in texts])
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    assert unet_dtype_is_fp16(model("cuda", f16, f32, f32))
    assert unet_dtype_is_fp16(model("cuda", f32, f32, f16))
    assert unet_dtype_is_fp16(model("cuda", bf16, f16))
    assert not unet_dtype_is_fp16(model("cuda", bf16, f32, bf16))
    assert not unet_dtype_is_fp16(model("cpu", f16, f16))
