"""The file-and-job commands on another family's model (SDXL, the built-in tiny-xl): `import` an
A1111 / civitai `clip_l` + `clip_g` embedding, `precompute` a NeTI concept, `run` a job mixing
them (and two in one prompt) in shared batches; a concept of another family is a bad line that
stops the job before anything runs, naming the line and both families."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from neti_fast.concepts.table import load_table
from neti_fast.engine.engine import Engine
from neti_fast.engine.request import GenerateConfig, Request
from neti_fast.sd.families import SDXL

STEPS = 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


def test_import_precompute_run_on_sdxl(cli, tmp_path, tiny_xl_model, make_concept, max_diff):
    m = tiny_xl_model
    l_dim, g_dim = m.text_widths
    g = torch.Generator().manual_seed(3)
    save_file({"clip_l": torch.randn(1, l_dim, generator=g) * 0.3, "clip_g": torch.randn(1, g_dim, generator=g) * 0.3},
              str(tmp_path / "civitai.safetensors"))
    code, _, err = cli("import", tmp_path / "civitai.safetensors", "--out", tmp_path / "ti.safetensors",
                       "--placeholder", "<t>")
    assert code == 0, err
    make_concept("neti", dim=m.text_dim, seed=5, family=SDXL).save(tmp_path / "neti.safetensors")
    code, _, err = cli("precompute", tmp_path / "neti.safetensors", "--out", tmp_path / "table.safetensors",
                       "--truncation", "8")
    assert code == 0, err
    make_concept("ti", dim=32, seed=6).save(tmp_path / "sd1.safetensors")  # an SD 1.x concept

    lines = [{"prompt": "a photo of {}", "concept": "table.safetensors", "seeds": "0-1", "truncation": [None, 8]},
             {"prompt": "a {} toy", "concept": "ti.safetensors", "seeds": [2], "negative_prompt": "blurry"},
             {"prompt": "{a} beside {b}", "concept": {"a": "table.safetensors", "b": "ti.safetensors"}, "seeds": [3]},
             {"prompt": "a {} dog", "concept": "sd1.safetensors", "seeds": [4]},
             {"prompt": "a cat", "seeds": [5]}]
    job = tmp_path / "job.jsonl"
    args = ["run", job, "--model", "tiny-xl", "--out", tmp_path / "out", "--steps", STEPS, "--height", 64,
            "--width", 64, "--batch-size", 4, "--no-progress"]
    job.write_text("".join(json.dumps(x) + "\n" for x in lines))
    code, stdout, err = cli(*args)
    assert code == 2 and "nothing was run" in err and not (tmp_path / "out" / "manifest.jsonl").exists(), err
    bad = [ln for ln in err.splitlines() if "line 4" in ln]
    assert len(bad) == 1 and "SD 1.x" in bad[0] and "SDXL" in bad[0], err   # names both families
    job.write_text("".join(json.dumps(x) + "\n" for i, x in enumerate(lines) if i != 3))
    code, stdout, err = cli(*args)
    assert code == 0 and "7 images made" in stdout, err
    out = tmp_path / "out"

    done = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    done = [e for e in done if e["status"] == "done"]
    assert len(done) == 7
    tables = {p: load_table(tmp_path / p) for p in ("table.safetensors", "ti.safetensors")}
    assert tables["ti.safetensors"].family is SDXL and tables["table.safetensors"].family is SDXL
    # the job ran with the family's defaults (SDXL: Euler, guidance 5.0), as the manifest records
    assert {(e["scheduler"], e["guidance"]) for e in done} == {(SDXL.default_scheduler, SDXL.default_guidance)}
    engine = Engine(m, GenerateConfig(steps=STEPS, height=64, width=64, batch_size=1,
                                      scheduler=SDXL.default_scheduler, guidance=SDXL.default_guidance))
    for e in done:   # each image as its request alone (the job batched 4 at a time, concepts mixed)
        c = e["concept"]
        table = None if c is None else {k: tables[v] for k, v in c.items()} if isinstance(c, dict) else tables[c]
        solo = engine.generate_batch([Request(e["prompt"], e["seed"], table, e["truncation"], e["negative_prompt"])])[0]
        assert max_diff(solo, np.asarray(Image.open(out / e["file"]).convert("RGB"))) <= 1, e["file"]
    imgs = {(e["prompt"], e["seed"], e["truncation"]): np.asarray(Image.open(out / e["file"])).astype(int) for e in done}
    assert np.abs(imgs[("a photo of {}", 0, None)] - imgs[("a photo of {}", 0, 8)]).max() > 0  # truncation is applied
