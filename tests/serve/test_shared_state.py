"""Two servers on one state folder, as Ray Serve replicas run (neti_fast.serve.ray_app), without Ray:
what one adds (uploads, trained concepts, a rescan of --concepts) the other lists on its next sync;
one training run per folder, and its status readable from the other."""
from __future__ import annotations

import io
import os

import pytest

from serve_util import make_concepts, make_server

from neti_fast.serve.a1111 import FieldError  # noqa: E402  (serve_util skips without the serve extra)


@pytest.fixture(scope="module")
def pair(tiny_model, tmp_path_factory, one_thread):
    from neti_fast.sd.models import load_model
    tmp = tmp_path_factory.mktemp("shared")
    make_concepts(tmp / "concepts")
    a = make_server(tiny_model, tmp)
    b = make_server(load_model("tiny"), tmp)  # its own model: each server's engine binds its model's attention
    yield a, b, tmp
    a.close()
    b.close()


def test_uploads_and_rescans_reach_the_other_server(pair, make_concept):
    a, b, tmp = pair
    assert a.store.names() == b.store.names()
    path = tmp / "owl.safetensors"
    make_concept(seed=21, placeholder="<owl>").save(path)
    assert a.add_upload("owl.safetensors", path.read_bytes(), None) == ["owl"]
    assert "owl" not in b.store.names()
    b.sync_shared()
    assert "owl" in b.store.names() and b.store.embeddings() == a.store.embeddings()
    b.sync_shared()  # nothing changed: nothing read again
    # a file added to --concepts and rescanned on one server: the other rescans too
    make_concept(seed=22, placeholder="<elk>").save(tmp / "concepts" / "elk.safetensors")
    a.store.scan()
    a.mark_refreshed()
    b.sync_shared()
    assert "elk" in b.store.names() and b.store.embeddings() == a.store.embeddings()
    a.sync_shared()  # its own upload, seen again through the folder: listed once, no error
    assert a.store.names().count("owl") == 1 and not a.store.skipped


def test_one_training_run_per_state_folder(pair):
    from PIL import Image
    a, b, _ = pair
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
    images = [("red.png", buf.getvalue())] * 2
    job = a.trainer.start(images, "<red>", "ball", 1)
    with pytest.raises(FieldError) as e:
        b.trainer.start(images, "<blue>", "ball", 1)
    assert e.value.status == 409 and "another replica" in str(e.value)
    seen = b.trainer.job(job.id)  # read from the run's status.json
    assert seen is not None and seen.id == job.id and seen.state in ("running", "done")
    a.trainer.wait(300)
    seen = b.trainer.job(job.id)
    assert seen.state == "done" and seen.concept == "red" and seen.step == 1
    b.sync_shared()
    assert "red" in b.store.names()
    assert b.trainer.job("../../etc") is None and b.trainer.job("0" * 12) is None
    fd = b.trainer._take_lock()  # released when the run ended: the next start (on any server) may go
    assert fd is not None
    os.close(fd)
