"""`neti-fast eval`: CLIP image / text and DINO similarity, on tiny random CLIP / ViT folders.

Nothing is downloaded: the models are built here from small configs and saved as standard Hugging
Face folders, then loaded by the same code as `openai/clip-vit-base-patch32` / `facebook/dino-vits16`.
Reference values are computed independently (the vision / text towers and projections called
directly, cosine done in numpy).
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from neti_fast.evaluation.inputs import read_manifest_entries, strip_placeholder
from neti_fast.evaluation.metrics import evaluate_folder, evaluate_images
from neti_fast.evaluation.models import Similarity
from neti_fast.evaluation.report import format_table, save_report
from neti_fast.errors import NetiError

SIZE = 32


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """(clip_dir, dino_dir): a tiny CLIPModel + CLIP BPE tokenizer + CLIPImageProcessor, and a tiny ViT."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPTokenizer,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    from neti_fast.sd.tiny_tokenizer import write_clip_bpe_files
    root = tmp_path_factory.mktemp("eval-models")
    write_clip_bpe_files(root / "bpe")
    tok = CLIPTokenizer.from_pretrained(str(root / "bpe"), model_max_length=77)
    cfg = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": SIZE, "patch_size": 8},
        projection_dim=16)
    torch.manual_seed(0)
    clip_dir, dino_dir = root / "clip", root / "dino"
    CLIPModel(cfg).save_pretrained(clip_dir)
    tok.save_pretrained(clip_dir)
    CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(clip_dir)
    vit = ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=SIZE, patch_size=8), add_pooling_layer=False)
    vit.save_pretrained(dino_dir)
    ViTImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(dino_dir)
    return clip_dir, dino_dir


@pytest.fixture(scope="module")
def sim(model_dirs):
    clip_dir, dino_dir = model_dirs
    return Similarity(clip=str(clip_dir), dino=str(dino_dir), device="cpu", batch_size=3)


def _image(seed: int, size: int = 40) -> np.ndarray:
    """A distinct smooth-ish random RGB image."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(5, 5, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR))


def _save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _train_dir(tmp_path, seeds=(0, 1, 2)):
    d = tmp_path / "train"
    for i, s in enumerate(seeds):
        _save(d / f"img{i}.png", _image(s))
    (d / "notes.txt").write_text("not an image")
    return d


def _gen_dir(tmp_path, items, jsonl=None):
    """items: (file, prompt, truncation, image array). Writes the PNGs and manifest.json."""
    out = tmp_path / "gen"
    entries = []
    for file, prompt, trunc, arr in items:
        _save(out / file, arr)
        entries.append({"file": file, "prompt": prompt, "truncation": trunc, "seed": 0})
    (out / "manifest.json").write_text(json.dumps({"images": entries}))
    if jsonl is not None:
        (out / "manifest.jsonl").write_text("\n".join(json.dumps(e) for e in jsonl) + "\n")
    return out


# ----------------------------------------------------------------------------- independent reference

def _cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a @ b.T) / (np.linalg.norm(a, axis=1)[:, None] * np.linalg.norm(b, axis=1)[None, :])


class Reference:
    """The metrics computed without neti_fast.evaluation's code: towers + projections called directly."""

    def __init__(self, model_dirs):
        from transformers import (
            CLIPImageProcessor,
            CLIPModel,
            CLIPTokenizer,
            ViTImageProcessor,
            ViTModel,
        )
        clip_dir, dino_dir = model_dirs
        self.clip = CLIPModel.from_pretrained(clip_dir).eval()
        self.tok = CLIPTokenizer.from_pretrained(clip_dir)
        self.cproc = CLIPImageProcessor.from_pretrained(clip_dir)
        self.vit = ViTModel.from_pretrained(dino_dir, add_pooling_layer=False).eval()
        self.vproc = ViTImageProcessor.from_pretrained(dino_dir)

    @torch.no_grad()
    def image(self, arrays):
        px = self.cproc(images=[Image.fromarray(a) for a in arrays], return_tensors="pt")["pixel_values"]
        pooled = self.clip.vision_model(pixel_values=px).pooler_output
        return self.clip.visual_projection(pooled).numpy()

    @torch.no_grad()
    def text(self, texts):
        enc = self.tok(texts, padding=True, return_tensors="pt")
        pooled = self.clip.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
        return self.clip.text_projection(pooled).numpy()

    @torch.no_grad()
    def dino(self, arrays):
        px = self.vproc(images=[Image.fromarray(a) for a in arrays], return_tensors="pt")["pixel_values"]
        return self.vit(pixel_values=px).last_hidden_state[:, 0].numpy()


@pytest.fixture(scope="module")
def ref(model_dirs):
    return Reference(model_dirs)


# ----------------------------------------------------------------------------- prompts

@pytest.mark.parametrize("prompt, expected", [
    ("A photo of {} on a beach", "A photo of on a beach"),
    ("{} in the snow", "in the snow"),
    ("An oil painting of {}.", "An oil painting of."),
    ("a {cat} next to a {dog}", "a next to a"),
    ("  a   photo of {}  ", "a photo of"),
    ("{}", ""),
    ("no concept here", "no concept here"),
])
def test_strip_placeholder(prompt, expected):
    assert strip_placeholder(prompt) == expected


def test_strip_literal_placeholder():
    assert strip_placeholder("a photo of <my-cat> and {}", ["<my-cat>"]) == "a photo of and"


# ----------------------------------------------------------------------------- metrics

def test_embeds_are_normalised_and_batch_independent(sim, ref):
    imgs = [_image(s) for s in range(5)]
    e = sim.image_embeds(imgs)                         # batch_size 3: two batches
    assert e.shape == (5, 16)
    np.testing.assert_allclose(e.norm(dim=1).numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(e.numpy(), sim.image_embeds(np.stack(imgs)).numpy(), atol=1e-6)  # array input
    r = ref.image(imgs)
    np.testing.assert_allclose(e.numpy(), r / np.linalg.norm(r, axis=1, keepdims=True), atol=1e-5)
    t = sim.text_embeds(["a photo of", "a cat on a beach"])
    rt = ref.text(["a photo of", "a cat on a beach"])
    np.testing.assert_allclose(t.numpy(), rt / np.linalg.norm(rt, axis=1, keepdims=True), atol=1e-5)


def test_identical_images_have_similarity_one(tmp_path, sim):
    train = _train_dir(tmp_path, seeds=(7,))
    same = _gen_dir(tmp_path, [("a.png", "a photo of {}", None, _image(7))])
    rep = evaluate_folder(same, train, similarity=sim)
    assert rep["overall"]["image_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert rep["overall"]["dino_similarity"] == pytest.approx(1.0, abs=1e-5)
    other = tmp_path / "other"
    _gen_dir(other, [("a.png", "a photo of {}", None, _image(8))])
    rep2 = evaluate_folder(other / "gen", train, similarity=sim)
    assert rep2["overall"]["image_similarity"] < 1.0 - 1e-4
    assert rep2["overall"]["dino_similarity"] < 1.0 - 1e-4


def test_metrics_match_direct_computation(tmp_path, sim, ref):
    train_seeds = (0, 1, 2)
    train = _train_dir(tmp_path, train_seeds)
    prompts = ["A photo of {} on a beach", "An oil painting of {}"]
    items = []
    for pi, p in enumerate(prompts):
        for t in (8, None):
            for s in range(2):
                items.append((f"{pi}_{t}_{s}.png", p, t, _image(100 + 10 * pi + (0 if t is None else 5) + s)))
    out = _gen_dir(tmp_path, items)
    rep = evaluate_folder(out, train, similarity=sim)

    items = sorted(items)  # the report lists images by file name
    gen = [a for *_, a in items]
    real = [_image(s) for s in train_seeds]
    texts = [strip_placeholder(p) for _, p, _, _ in items]
    img = _cos(ref.image(gen), ref.image(real)).mean(axis=1)
    txt = np.diag(_cos(ref.image(gen), ref.text(texts)))
    dino = _cos(ref.dino(gen), ref.dino(real)).mean(axis=1)

    assert rep["counts"] == {"generated": 8, "train": 3, "prompts": 2, "truncations": 2}
    assert [r["file"] for r in rep["images"]] == [f for f, *_ in items]
    np.testing.assert_allclose([r["image_similarity"] for r in rep["images"]], img, atol=1e-5)
    np.testing.assert_allclose([r["text_similarity"] for r in rep["images"]], txt, atol=1e-5)
    np.testing.assert_allclose([r["dino_similarity"] for r in rep["images"]], dino, atol=1e-5)
    # overall = mean over all (generated, training) pairs
    assert rep["overall"]["image_similarity"] == pytest.approx(_cos(ref.image(gen), ref.image(real)).mean(), abs=1e-5)
    assert rep["overall"]["text_similarity"] == pytest.approx(txt.mean(), abs=1e-5)
    assert rep["overall"]["dino_similarity"] == pytest.approx(dino.mean(), abs=1e-5)
    # per truncation and per prompt
    trunc = np.array([t is None for _, _, t, _ in items])
    assert list(rep["per_truncation"]) == ["8", "full"]
    for key, mask in (("8", ~trunc), ("full", trunc)):
        g = rep["per_truncation"][key]
        assert g["n_images"] == 4
        assert g["image_similarity"] == pytest.approx(img[mask].mean(), abs=1e-5)
        assert g["text_similarity"] == pytest.approx(txt[mask].mean(), abs=1e-5)
        assert g["dino_similarity"] == pytest.approx(dino[mask].mean(), abs=1e-5)
    for p in prompts:
        mask = np.array([q == p for _, q, _, _ in items])
        g = rep["per_prompt"][p]
        assert g["n_images"] == 4 and g["text"] == strip_placeholder(p)
        assert g["text_similarity"] == pytest.approx(txt[mask].mean(), abs=1e-5)
        assert g["image_similarity"] == pytest.approx(img[mask].mean(), abs=1e-5)
        assert set(g["per_truncation"]) == {"8", "full"}
        sub = mask & trunc
        assert g["per_truncation"]["full"]["image_similarity"] == pytest.approx(img[sub].mean(), abs=1e-5)


def test_text_similarity_uses_prompt_without_placeholder(tmp_path, sim, ref, monkeypatch):
    train = _train_dir(tmp_path)
    prompt = "A photo of {} on a beach"
    out = _gen_dir(tmp_path, [("a.png", prompt, None, _image(50)), ("b.png", "{cat} in the snow", None, _image(51))])
    encoded = []
    real_text_embeds = Similarity.text_embeds

    def spy(self, texts):
        encoded.extend(texts)
        return real_text_embeds(self, texts)

    monkeypatch.setattr(Similarity, "text_embeds", spy)
    rep = evaluate_folder(out, train, similarity=sim)
    assert sorted(encoded) == ["A photo of on a beach", "in the snow"]
    assert rep["per_prompt"][prompt]["text"] == "A photo of on a beach"
    g = ref.image([_image(50)])
    with_marker = _cos(g, ref.text([prompt]))[0, 0]
    without = _cos(g, ref.text(["A photo of on a beach"]))[0, 0]
    assert abs(with_marker - without) > 1e-4  # the check below can tell them apart
    assert rep["per_prompt"][prompt]["text_similarity"] == pytest.approx(without, abs=1e-5)


def test_per_truncation_grouping(tmp_path, sim):
    train = _train_dir(tmp_path, seeds=(3,))
    items = [("t8_s0.png", "a photo of {}", 8, _image(3)), ("t8_s1.png", "a photo of {}", 8, _image(3)),
             ("full_s0.png", "a photo of {}", None, _image(60)), ("t16_s0.png", "a photo of {}", 16, _image(61)),
             ("full_s1.png", "a photo of {}", None, _image(62))]
    rep = evaluate_folder(_gen_dir(tmp_path, items), train, similarity=sim)
    pt = rep["per_truncation"]
    assert list(pt) == ["8", "16", "full"]
    assert [pt[k]["n_images"] for k in pt] == [2, 1, 2]
    assert pt["8"]["image_similarity"] == pytest.approx(1.0, abs=1e-5)   # identical to the training image
    assert pt["full"]["image_similarity"] < 1.0 - 1e-4
    assert rep["overall"]["n_images"] == 5
    assert rep["overall"]["image_similarity"] == pytest.approx(
        sum(pt[k]["image_similarity"] * pt[k]["n_images"] for k in pt) / 5, abs=1e-6)


def test_manifest_jsonl_union_and_status(tmp_path, sim):
    """manifest.json + the job runner's manifest.jsonl / manifest.rank*.jsonl: union of finished images."""
    train = _train_dir(tmp_path)
    out = _gen_dir(tmp_path, [("a.png", "a photo of {}", None, _image(70))], jsonl=[
        {"file": "b.png", "prompt": "{} on a beach", "truncation": 8, "status": "running"},
        {"file": "b.png", "prompt": "{} on a beach", "truncation": 8, "status": "done"},
        {"file": "c.png", "prompt": "{} in the snow", "truncation": 16},                      # no status: done
        {"file": "d.png", "prompt": "{} in the snow", "truncation": 16, "status": "failed"},  # not on disk
        {"line": 3, "prompt": "{} at night", "status": "failed", "reason": "bad concept"},    # no "file"
    ])
    (out / "manifest.rank1.jsonl").write_text(
        json.dumps({"file": "e.png", "prompt": "{} in the snow", "truncation": 16, "status": "done"})
        + '\n{"file": "f.png", "prompt": "{} in')                                           # torn last line
    for f, s in (("b.png", 71), ("c.png", 72), ("e.png", 73)):
        _save(out / f, _image(s))
    with pytest.warns(UserWarning, match="incomplete last line"):
        entries = read_manifest_entries(out)
    assert [(e["file"], e["truncation"]) for e in entries] == [("a.png", None), ("b.png", 8), ("c.png", 16),
                                                               ("e.png", 16)]
    (out / "manifest.json").unlink()                   # jsonl alone also works
    (out / "manifest.rank1.jsonl").unlink()
    assert [e["file"] for e in read_manifest_entries(out)] == ["b.png", "c.png"]
    rep = evaluate_folder(out, train, similarity=sim)
    assert list(rep["per_truncation"]) == ["8", "16"]
    with (out / "manifest.jsonl").open("a") as f:      # a bad line that is not the last one is an error
        f.write("{oops\n" + json.dumps({"file": "c.png", "prompt": "x", "truncation": None}) + "\n")
    with pytest.raises(NetiError, match="manifest.jsonl:6: not a JSON object"):
        read_manifest_entries(out)


def test_report_files(tmp_path, sim):
    train = _train_dir(tmp_path)
    out = _gen_dir(tmp_path, [("a.png", "a photo of {}", 8, _image(80)), ("b.png", "a photo of {}", None, _image(81))])
    rep = evaluate_folder(out, train, similarity=sim)
    save_report(rep, tmp_path / "r.json", tmp_path / "r.png")
    assert json.loads((tmp_path / "r.json").read_text())["per_truncation"].keys() == {"8", "full"}
    with Image.open(tmp_path / "r.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    table = format_table(rep)
    assert table.splitlines()[0].split() == ["truncation", "images", "image-sim", "text-sim", "dino-sim"]
    assert [line.split()[0] for line in table.splitlines()[1:]] == ["8", "full", "all"]


# ----------------------------------------------------------------------------- CLI

def _cli(argv, capsys):
    from neti_fast.cli import main
    rc = main(argv)
    return rc, capsys.readouterr()


def test_cli_writes_json_and_plot(tmp_path, model_dirs, capsys):
    clip_dir, dino_dir = model_dirs
    train = _train_dir(tmp_path)
    out = _gen_dir(tmp_path, [("a.png", "a photo of {}", 8, _image(90)), ("b.png", "a photo of {}", None, _image(91)),
                              ("c.png", "{} on a beach", 8, _image(92))])
    rc, cap = _cli(["eval", str(out), "--train-images", str(train), "--clip", str(clip_dir), "--dino", str(dino_dir),
                    "--device", "cpu", "--batch-size", "2"], capsys)
    assert rc == 0, cap.err
    rep = json.loads((out / "eval.json").read_text())
    assert rep["clip"] == str(clip_dir) and rep["dino"] == str(dino_dir)
    assert rep["counts"] == {"generated": 3, "train": 3, "prompts": 2, "truncations": 2}
    assert set(rep["per_prompt"]) == {"a photo of {}", "{} on a beach"}
    assert 0 < rep["overall"]["dino_similarity"] <= 1
    with Image.open(out / "eval.png") as im:
        assert im.format == "PNG"
    assert "image-sim" in cap.out and "dino-sim" in cap.out and "full" in cap.out

    rc, cap = _cli(["eval", str(out), "--train-images", str(train), "--clip", str(clip_dir), "--no-dino",
                    "--device", "cpu", "--json", str(tmp_path / "x" / "e.json"), "--plot", str(tmp_path / "x" / "e.png")],
                   capsys)
    assert rc == 0, cap.err
    rep = json.loads((tmp_path / "x" / "e.json").read_text())
    assert rep["dino"] is None and "dino_similarity" not in rep["overall"]
    assert (tmp_path / "x" / "e.png").is_file() and "dino-sim" not in cap.out


@pytest.mark.parametrize("case", ["no-out-dir", "no-manifest", "bad-manifest", "no-train-dir", "no-train-images",
                                  "missing-image", "clip-path", "clip-not-a-model", "clip-is-vit", "dino-path",
                                  "cuda"])
def test_cli_bad_inputs(tmp_path, model_dirs, capsys, case):
    clip_dir, dino_dir = model_dirs
    train = _train_dir(tmp_path)
    out = _gen_dir(tmp_path, [("a.png", "a photo of {}", None, _image(95))])
    clip, dino, device, expect = str(clip_dir), str(dino_dir), "cpu", None
    if case == "no-out-dir":
        out, expect = tmp_path / "nope", "nope: output folder does not exist"
    elif case == "no-manifest":
        (out / "manifest.json").unlink()
        expect = "no manifest.json or manifest.jsonl"
    elif case == "bad-manifest":
        (out / "manifest.json").write_text("{not json")
        expect = "manifest.json: unreadable manifest"
    elif case == "no-train-dir":
        train, expect = tmp_path / "no-train", "--train-images"
    elif case == "no-train-images":
        for p in train.glob("*.png"):
            p.unlink()
        expect = f"--train-images {train}: no training images"
    elif case == "missing-image":
        (out / "a.png").unlink()
        expect = "missing: a.png"
    elif case == "clip-path":
        clip, expect = str(tmp_path / "no-clip"), f"--clip {tmp_path / 'no-clip'}: no such local folder"
    elif case == "clip-not-a-model":
        (tmp_path / "empty").mkdir()
        clip, expect = str(tmp_path / "empty"), f"--clip {tmp_path / 'empty'}: could not load it"
    elif case == "clip-is-vit":
        clip, expect = str(dino_dir), "not a CLIP model"
    elif case == "dino-path":
        dino, expect = str(tmp_path / "no-dino"), f"--dino {tmp_path / 'no-dino'}: no such local folder"
    elif case == "cuda":
        if torch.cuda.is_available():
            pytest.skip("a GPU is available here")
        device, expect = "cuda", "--device cuda"
    rc, cap = _cli(["eval", str(out), "--train-images", str(train), "--clip", clip, "--dino", dino,
                    "--device", device], capsys)
    assert rc == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in cap.err, cap.err
    assert lines[0].startswith("neti-fast eval: error: ")
    assert expect in lines[0], lines[0]
    assert not (out / "eval.json").exists() if out.exists() else True


def test_api_errors():
    with pytest.raises(NetiError, match="same length"):
        evaluate_images(None, [1], ["a"], [], [1])
    with pytest.raises(NetiError, match="--batch-size"):
        Similarity(clip="x", dino=None, batch_size=0)


@pytest.mark.parametrize("name", ["tiny-sd2", "tiny-xl"])
def test_eval_of_a_generated_folder_on_each_family(name, tmp_path, model_dirs, make_concept, capsys, request):
    """`generate` with a concept of SD 2.x / SDXL (tiny-sd2, tiny-xl) writes a folder `eval` reads: eval
    itself has nothing family-specific (its CLIP / DINO are its own models, never the SD model's
    text encoders; it reads the manifest's prompts, truncations and image files), so this checks
    the interface: each family's manifest carries the prompt with its {} marker and the truncations."""
    # the fixture builds the model into the session's cache, where --model finds it
    m = request.getfixturevalue("tiny_sd2_model" if name == "tiny-sd2" else "tiny_xl_model")
    c = make_concept("neti", m.text_dim, 0, True, "<thing>", m.family)
    c.save(tmp_path / "c.safetensors")
    out = tmp_path / "gen"
    rc, cap = _cli(["generate", "--model", name, "--device", "cpu", "--concept", str(tmp_path / "c.safetensors"),
                    "--prompt", "a photo of {}", "--prompt", "{} on a beach", "--truncation", "none", "4",
                    "--steps", "2", "--height", "64", "--width", "64", "--out", str(out)], capsys)
    assert rc == 0, cap.err
    train = _train_dir(tmp_path)
    clip_dir, dino_dir = model_dirs
    rc, cap = _cli(["eval", str(out), "--train-images", str(train), "--clip", str(clip_dir), "--dino", str(dino_dir),
                    "--device", "cpu"], capsys)
    assert rc == 0, cap.err
    rep = json.loads((out / "eval.json").read_text())
    assert rep["counts"] == {"generated": 4, "train": 3, "prompts": 2, "truncations": 2}
    assert set(rep["per_prompt"]) == {"a photo of {}", "{} on a beach"}
    assert set(rep["per_truncation"]) == {"4", "full"}
    assert all(0 < rep["overall"][k] <= 1 for k in ("image_similarity", "dino_similarity"))
