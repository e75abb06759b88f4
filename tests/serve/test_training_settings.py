"""The server's training runs build their TrainConfig from the server's settings: its model's
dtypes as they are, and --train-gradient-checkpointing."""
import pytest
import torch

from neti_fast.errors import NetiError


@pytest.mark.parametrize("on", [False, True])
def test_server_training_gradient_checkpointing(on, tmp_path, monkeypatch, tiny_model):
    import neti_fast.training.trainer as trainer
    from neti_fast.serve.training import TrainJob, Trainer
    seen = []

    def fake_train(cfg, model=None, **kw):
        seen.append((cfg, model))
        raise NetiError("stop here")
    monkeypatch.setattr(trainer, "train", fake_train)
    t = Trainer("tiny", "cpu", torch.float32, tmp_path, store=None, gradient_checkpointing=on)
    t._model = tiny_model
    job = TrainJob("abc123abc123", "<x>", "cat", 5)
    (tmp_path / "train" / job.id).mkdir(parents=True)
    t._train(job, tmp_path / "train" / job.id, "neti", {"batch_size": 1, "grad_accum": 1})
    (cfg, model), = seen
    assert cfg.gradient_checkpointing is on and cfg.dtype == "float32" and model is tiny_model
    assert job.state == "failed" and job.error == "stop here"


def test_serve_flag_and_ray_args(monkeypatch):
    """`neti-fast serve --train-gradient-checkpointing` and the Ray app's `train_gradient_checkpointing=false`
    (a string there: bool("false") would be True)."""
    import argparse

    from neti_fast.serve import cli, ray_app
    p = argparse.ArgumentParser()
    cli.add_parser(p.add_subparsers())
    for argv, want in ((["--model", "tiny", "--device", "cpu"], False),
                       (["--model", "tiny", "--device", "cpu", "--train-gradient-checkpointing"], True)):
        assert cli.config_from_args(p.parse_args(["serve", *argv])).train_gradient_checkpointing is want
    monkeypatch.setattr(ray_app, "build", lambda cfg, rc: cfg)
    assert ray_app.app({"train_gradient_checkpointing": "false"}).train_gradient_checkpointing is False
    assert ray_app.app({"train_gradient_checkpointing": "True"}).train_gradient_checkpointing is True
    with pytest.raises(NetiError, match="^train_gradient_checkpointing 'maybe': must be true or false"):
        ray_app.app({"train_gradient_checkpointing": "maybe"})
