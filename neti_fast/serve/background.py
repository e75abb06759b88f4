"""A server in a background thread of this process: uvicorn on 127.0.0.1 and a free port.

For notebooks, benchmarks and tests that already hold a loaded model (`Server(cfg, model=...)`):

    with BackgroundServer(server) as bg:
        httpx.post(f"{bg.url}/sdapi/v1/txt2img", json={...})
"""
from __future__ import annotations

import socket
import threading
import time


class BackgroundServer:
    def __init__(self, server, host: str = "127.0.0.1"):
        import uvicorn

        from .app import create_app
        from .http import is_loopback
        if not is_loopback(host) and not server.cfg.api_key:
            raise ValueError(f"{host}: a non-loopback address needs an API key")
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}" if ":" not in host else f"http://[{host}]:{self.port}"
        self.uv = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        t0 = time.monotonic()
        while not self.uv.started:
            if time.monotonic() - t0 > 30 or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.uv.should_exit = True
        self.thread.join(10)
        self.sock.close()
