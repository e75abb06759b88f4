"""The training tests' config: a 2-step run of 64x64 micro-batches of 2 on CPU, nothing saved mid-run."""
from neti_fast.training.config import TrainConfig


def train_config(images, out, **kw) -> TrainConfig:
    base = dict(images=str(images), placeholder="<thing>", init_word="cat", out=str(out), steps=2,
                batch_size=2, grad_accum=1, resolution=64, save_every=0)
    base.update(kw)
    return TrainConfig(**base)
