"""neti_fast.sd.hub: where a model spec loads from, and one-line failures in seconds offline."""
import socket
import time

import pytest

from neti_fast.errors import NetiError
from neti_fast.sd import hub


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, an empty Hugging Face cache."""
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "hf-cache"


def test_local_folders_and_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymodels" / "sd-1.5").mkdir(parents=True)
    (tmp_path / "file.bin").write_text("x")
    assert hub.resolve_source("mymodels/sd-1.5", "--model") == "mymodels/sd-1.5"
    with pytest.raises(NetiError, match=r"^--model mymodels/sd15: no such local folder \(mymodels/ has: sd-1.5\)$"):
        hub.resolve_source("mymodels/sd15", "--model")   # looks like owner/name, but mymodels/ is a folder here
    for spec in ("./nope", "/no/such/dir", "a/b/c", "single"):
        with pytest.raises(NetiError, match=f"^--clip {spec}: no such local folder"):
            hub.resolve_source(spec, "--clip")
    with pytest.raises(NetiError, match="is a file"):
        hub.resolve_source("file.bin", "--model")


def test_offline_hub_id_fails_fast_in_one_line(offline, cli, one_line_error, tmp_path):
    t = time.perf_counter()
    code, _, err = cli("generate", "--model", "someone/some-model", "--prompt", "x", "--out", tmp_path / "o")
    one_line_error(code, err, "--model someone/some-model", "not in the Hugging Face cache", "HF_HUB_OFFLINE is set")
    assert time.perf_counter() - t < 30 and not (tmp_path / "o").exists()


def test_offline_hub_id_loads_from_the_cache(offline):
    snap = offline / "models--someone--cached" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (offline / "models--someone--cached" / "refs").mkdir()
    (offline / "models--someone--cached" / "refs" / "main").write_text("0123abcd")
    assert hub.resolve_source("someone/cached", "--model") == str(snap)


def test_unreachable_hub_is_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")

    def refuse(*a, **k):
        raise OSError("Network is unreachable")
    monkeypatch.setattr(socket, "create_connection", refuse)
    hub._probe.cache_clear()
    try:
        assert hub.offline_reason() == "cannot reach hub.invalid: Network is unreachable"
    finally:
        hub._probe.cache_clear()
