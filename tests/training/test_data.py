"""Tests for neti_fast.training.data: image loading edge cases and the training dataset."""
import numpy as np
import pytest
import torch
from PIL import Image

from neti_fast.training.data import TextualInversionDataset, load_images, to_rgb
from neti_fast.errors import NetiError
from neti_fast.sd.templates import IMAGENET_STYLE_TEMPLATES, IMAGENET_TEMPLATES


def _rgb(path, color=(10, 200, 30), size=(8, 6)):
    Image.new("RGB", size, color).save(path)
    return path


def test_missing_folder(tmp_path):
    with pytest.raises(NetiError, match="does not exist") as e:
        load_images(tmp_path / "nope", 16)
    assert "nope" in str(e.value)


def test_not_a_folder(tmp_path):
    f = _rgb(tmp_path / "a.png")
    with pytest.raises(NetiError, match="not a folder"):
        load_images(f, 16)


def test_empty_folder(tmp_path):
    with pytest.raises(NetiError, match="no training images") as e:
        load_images(tmp_path, 16)
    assert str(tmp_path) in str(e.value)


def test_corrupt_image_refused_other_files_skipped_in_one_line(tmp_path):
    _rgb(tmp_path / "good.png")
    (tmp_path / "notes.txt").write_text("not an image")
    said = []
    imgs = load_images(tmp_path, 16, log=said.append)
    assert len(imgs) == 1 and imgs[0].size == (16, 16) and imgs[0].mode == "RGB"
    assert said == [f"{tmp_path}: 1 images; skipped 1 other file(s): notes.txt"]
    good = tmp_path / "good.png"
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:40])
    with pytest.raises(NetiError, match=r"truncated.png: not a readable image .*fix or remove it"):
        load_images(tmp_path, 16)


def test_no_images_is_an_error(tmp_path):
    (tmp_path / "b.txt").write_text("x")
    with pytest.raises(NetiError, match="none of its 1 files is an image") as e:
        load_images(tmp_path, 16)
    assert str(tmp_path) in str(e.value)
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(NetiError, match="a.jpg: not a readable image"):
        load_images(tmp_path, 16)


def test_hidden_files_ignored(tmp_path):
    _rgb(tmp_path / "a.png")
    (tmp_path / ".DS_Store").write_bytes(b"\0\1\2")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_images(tmp_path, 16)) == 1


def _load_one(tmp_path, img, name="x.png", **save):
    img.save(tmp_path / name, **save)
    [out] = load_images(tmp_path, None)
    assert out.mode == "RGB"
    return np.asarray(out)


def test_grayscale(tmp_path):
    a = _load_one(tmp_path, Image.new("L", (4, 3), 77))
    assert a.shape == (3, 4, 3) and (a == 77).all()


def test_rgba_composited_on_white(tmp_path):
    img = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    img.putpixel((1, 0), (255, 0, 0, 255))
    a = _load_one(tmp_path, img)
    assert a[0, 0].tolist() == [255, 255, 255]  # transparent -> white, not black
    assert a[0, 1].tolist() == [255, 0, 0]


def test_la_and_palette_transparency(tmp_path):
    la = Image.new("LA", (1, 1), (0, 0))
    assert np.asarray(to_rgb(la))[0, 0].tolist() == [255, 255, 255]
    p = Image.new("P", (2, 1), 0)
    p.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0
    a = _load_one(tmp_path, p, "p.png", transparency=0)
    assert a[0, 0].tolist() == [255, 255, 255] and a[0, 1].tolist() == [0, 0, 255]


def test_cmyk(tmp_path):
    a = _load_one(tmp_path, Image.new("CMYK", (2, 2), (0, 255, 255, 0)), "c.tif")
    assert a[0, 0].tolist() == [255, 0, 0]


def test_16bit_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 128 * 257, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    a = _load_one(tmp_path, img, "g16.png")
    assert a[0, :, 0].tolist() == [0, 128, 255]
    # mode "I" (how PIL may hold 16-bit PNGs), directly
    a = np.asarray(to_rgb(Image.fromarray(arr.astype(np.int32), "I")))
    assert a[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_exif_orientation_applied(tmp_path, fmt):
    # a 2x1 "phone photo" stored sideways: orientation 6 = rotate 90 degrees clockwise to display
    img = Image.new("RGB", (2, 1))
    img.putpixel((0, 0), (255, 0, 0))
    img.putpixel((1, 0), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    kw = {"quality": 100, "subsampling": 0} if fmt == "jpeg" else {}
    a = _load_one(tmp_path, img, f"phone.{fmt}", exif=exif, **kw).astype(int)
    assert a.shape == (2, 1, 3)  # now 1 wide, 2 tall
    top, bottom = a[0, 0], a[1, 0]
    assert top[0] > 200 and top[2] < 60       # left pixel (red) went to the top
    assert bottom[2] > 200 and bottom[0] < 60  # right pixel (blue) to the bottom


def test_resize_and_center_crop(tmp_path):
    img = Image.new("RGB", (30, 10), (0, 0, 0))
    for x in range(10, 20):
        for y in range(10):
            img.putpixel((x, y), (255, 255, 255))
    img.save(tmp_path / "wide.png")
    [stretched] = load_images(tmp_path, 8)
    [cropped] = load_images(tmp_path, 8, center_crop=True)
    assert stretched.size == cropped.size == (8, 8)
    assert np.asarray(cropped).min() > 200            # only the white middle square remains
    assert np.asarray(stretched)[:, 0].max() < 50      # stretched keeps the black left edge


def _dataset(tmp_path, **kw):
    a = np.zeros((16, 16, 3), np.uint8)
    a[:, :8] = 255  # left half white: flips are visible
    Image.fromarray(a).save(tmp_path / "a.png")
    _rgb(tmp_path / "b.png", (0, 0, 0), (16, 16))
    return TextualInversionDataset(load_images(tmp_path, 16), 16, **kw)


def test_dataset_items(tmp_path):
    ds = _dataset(tmp_path, seed=3)
    px, caps = ds.next_batch(2)
    assert px.shape == (2, 3, 16, 16) and px.dtype == torch.float32
    assert px.min() >= -1 and px.max() <= 1 and px.min() == -1 and px.max() == 1
    assert all("{}" in c and c in IMAGENET_TEMPLATES for c in caps)
    style = _dataset(tmp_path, learnable_property="style")
    assert all(c in IMAGENET_STYLE_TEMPLATES for c in style.next_batch(4)[1])
    with pytest.raises(NetiError, match="property"):
        _dataset(tmp_path, learnable_property="face")


def test_dataset_flips_and_epochs(tmp_path):
    ds = _dataset(tmp_path, seed=0)
    flips = set()
    for _ in range(40):
        px, _ = ds[0]
        flips.add(bool(px[0, 0, 0] < 0))  # left column black -> flipped
    assert flips == {True, False}
    ds = _dataset(tmp_path, seed=1)
    order = [ds.next_index() for _ in range(6)]
    assert sorted(order[:2]) == sorted(order[2:4]) == [0, 1]  # every image once per epoch


def test_dataset_deterministic_and_resumable(tmp_path):
    a, b = _dataset(tmp_path, seed=7), _dataset(tmp_path, seed=7)
    for _ in range(3):
        pa, ca = a.next_batch(3)
        pb, cb = b.next_batch(3)
        assert torch.equal(pa, pb) and ca == cb
    js, t = a.state_dict()
    want = [a.next_batch(2) for _ in range(4)]
    c = _dataset(tmp_path, seed=99)
    import json
    c.load_state_dict(json.loads(json.dumps(js)), t)
    got = [c.next_batch(2) for _ in range(4)]
    for (pw, cw), (pg, cg) in zip(want, got):
        assert torch.equal(pw, pg) and cw == cg
