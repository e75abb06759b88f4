"""Measuring for the bench ladder: clocks (CUDA events / perf_counter), the U-Net call timer,
text-encoder row counter, peak memory, and a measured matmul peak (see ladder.py for what each
column means)."""
from __future__ import annotations

import statistics
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only; imported where used, so `--help` does not load it
    import torch


class Clock:
    """Wall-clock regions: CUDA-synchronized on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        import torch
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn):
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t0, out


class UnetTimer:
    """Sums the time spent in U-Net calls: CUDA events (no host sync) on GPU, perf_counter on CPU.

    Attach either as forward hooks on a module (`hook`) or around a denoiser callable (`wrap`).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self):
        self._events, self._cpu, self._t0, self.calls = [], 0.0, None, 0

    def start(self):
        import torch
        self.calls += 1
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self._t0 = e
        else:
            self._t0 = time.perf_counter()

    def stop(self):
        import torch
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self._events.append((self._t0, e))
        else:
            self._cpu += time.perf_counter() - self._t0

    def seconds(self) -> float:
        import torch
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self._events) / 1000.0
        return self._cpu

    def hook(self, module):
        h1 = module.register_forward_pre_hook(lambda *_: self.start())
        h2 = module.register_forward_hook(lambda *_: self.stop())
        return [h1, h2]

    def wrap(self, denoiser):
        timer = self

        class Timed:
            def __init__(self):
                self.inner = denoiser

            def __call__(self, *a, **k):
                timer.start()
                try:
                    return denoiser(*a, **k)
                finally:
                    timer.stop()

            def __getattr__(self, name):
                return getattr(denoiser, name)
        return Timed()


class TextRows:
    """Counts text-encoder rows (prompts encoded) through a forward pre-hook."""

    def __init__(self, text_encoder):
        self.rows = 0

        def pre(_m, args, kwargs):
            ids = args[0] if args else kwargs.get("input_ids")
            self.rows += int(ids.shape[0]) if ids is not None and ids.ndim > 1 else 1
        self.handle = text_encoder.register_forward_pre_hook(pre, with_kwargs=True)

    def remove(self):
        self.handle.remove()


def _rss() -> int | None:
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        return None


class PeakMemory:
    """Peak memory of a region over its starting point; `kind` says what was measured."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.kind = "cuda max_memory_allocated over the pre-run allocation"
        elif _rss() is not None:
            self.kind = "cpu peak RSS over the pre-run RSS (psutil, sampled every 2 ms)"
        else:
            self.kind = "cpu growth of getrusage max RSS (0 unless a new process high)"
        self.peak = 0

    def __enter__(self):
        import torch
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = _rss()
        if self._base is None:
            import resource
            self._ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
            return self
        self._max, self._stop = self._base, threading.Event()

        def sample():
            while not self._stop.wait(0.002):
                r = _rss()
                if r and r > self._max:
                    self._max = r
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = max(0, torch.cuda.max_memory_allocated() - self._base)
        elif self._base is None:
            import resource
            self.peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._ru)
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, _rss() or 0)
            self.peak = max(0, self._max - self._base)
        return False


def measure_peak_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense matmul throughput on CUDA (8192^3, median of 10): the utilization reference."""
    import torch
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1000.0)
    return 2 * n ** 3 / statistics.median(times) / 1e12
