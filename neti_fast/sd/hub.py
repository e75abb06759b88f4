"""Where a model spec (`--model`, `eval --clip` / `--dino`) is loaded from: a local folder, the local
Hugging Face cache, or the hub, decided before any from_pretrained call, so that a mistyped folder
or a machine without network fails in seconds with one line instead of minutes of retries.

A spec that exists on disk is a local folder. One that looks like a path (starts with `.`, `/`,
`~`, has no `/` or more than one, or its first part is an existing folder: `mymodels/sd15`) and does
not exist is "no such local folder". Otherwise it is a hub id `owner/name`: offline (HF_HUB_OFFLINE
set, or the hub's host unreachable within a few seconds) it loads from the cache's snapshot folder
or fails naming both; online it is left to from_pretrained, which downloads as usual.
"""
from __future__ import annotations

import functools
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from ..errors import NetiError
from ..utils import env_flag

PROBE_SECONDS = 3.0   # how long the hub's host may take to accept a connection before we call it offline


def offline_reason() -> str | None:
    """Why the hub cannot be reached from here, or None when it can (probed once per process)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if env_flag(var):
            return f"{var} is set"
    return _probe(urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co")


@functools.lru_cache(maxsize=None)
def _probe(host: str) -> str | None:
    result = [f"{host} did not answer within {PROBE_SECONDS:g} s"]

    def connect():   # name resolution has no timeout of its own: the thread's join bounds it
        try:
            socket.create_connection((host, 443), timeout=PROBE_SECONDS).close()
            result[0] = None
        except OSError as e:
            result[0] = f"cannot reach {host}: {e.strerror or e}"
    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(PROBE_SECONDS + 0.5)
    return result[0]


def _looks_like_path(spec: str) -> bool:
    if spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") != 1 or spec.endswith("/"):
        return True
    return Path(spec.split("/")[0]).expanduser().is_dir()   # `mymodels/sd15` beside an existing mymodels/


def resolve_source(spec: str, flag: str, hint: str = "") -> str:
    """`spec` -> what from_pretrained should be given: a local folder's path, a cached snapshot's
    folder (offline), or the hub id (online). NetiError naming `flag` when none can work (`hint`:
    what else the flag takes, said when the spec is no folder)."""
    local = Path(spec).expanduser()
    if local.exists():
        if not local.is_dir():
            raise NetiError(f"{flag} {spec}: is a file; give a model folder or a hub id (owner/name)")
        return str(local)
    if _looks_like_path(spec):
        parent = local.parent if str(local.parent) not in ("", ".") else None
        near = ""
        if parent is not None and parent.is_dir():
            names = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))[:5]
            near = f" ({parent}/ has: {', '.join(names)})" if names else f" ({parent}/ is empty)"
        raise NetiError(f"{flag} {spec}: no such local folder{near}{hint}")
    why = offline_reason()
    if why is None:
        return spec
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(spec, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the cache (or no hub client): the one-line answer below
        raise NetiError(f"{flag} {spec}: no such local folder, and not in the Hugging Face cache; offline "
                        f"({why}): download it where there is a network (`hf download {spec}`) or give a "
                        "local folder") from None
