"""`neti-fast demo --model tiny-xl`: the whole workflow (train, precompute, generate) on SDXL's built-in."""
from safetensors import safe_open

from neti_fast.cli import build_parser
from neti_fast.demo import run_demo


def test_demo_on_tiny_xl(tmp_path, tiny_xl_model, one_thread):
    args = build_parser().parse_args(["demo", "--model", "tiny-xl", "--out", str(tmp_path / "d")])
    assert (args.model, args.out) == ("tiny-xl", str(tmp_path / "d"))
    got = run_demo(tmp_path / "d", train_steps=2, gen_steps=2, model="tiny-xl")
    with safe_open(str(got["table"]), "pt") as f:
        assert f.metadata()["family"] == "sdxl" and f.get_slice("token").get_shape() == [1000, 11, 96]
    assert len(list(got["images"].glob("*.png"))) >= 16 and (got["images"] / "manifest.jsonl").is_file()
