"""Where this process sits in a `torchrun` / `accelerate launch` run, for `run` (jobs) and `train`.

Both launchers set RANK / WORLD_SIZE / LOCAL_RANK; a plain launch is world 1 and never touches
torch.distributed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import NetiError
from ..utils import default_device, first_line


@dataclass
class Dist:
    """This process's place in a torchrun / accelerate launch (world 1 when launched plainly)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"
    owns_group: bool = False

    def _group(self):
        import torch.distributed as dist
        return dist

    def barrier(self) -> None:
        if self.world > 1:
            dist = self._group()
            if self.device.startswith("cuda"):
                import torch
                dist.barrier(device_ids=[torch.device(self.device).index or 0])
            else:
                dist.barrier()

    def reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """All-reduce a few numbers (sum or max) across ranks."""
        if self.world == 1:
            return list(values)
        import torch
        dist = self._group()
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.tolist()

    def all_ok(self, ok: bool) -> bool:
        return self.reduce([0.0 if ok else 1.0], "max")[0] == 0.0

    def close(self) -> None:
        if self.owns_group:
            self._group().destroy_process_group()
            self.owns_group = False


def setup_distributed(device: str | None) -> Dist:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun and accelerate launch); init the process
    group only when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU). `device` "cuda" becomes cuda:LOCAL_RANK."""
    import torch
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise NetiError("WORLD_SIZE / RANK / LOCAL_RANK must be integers (torchrun and accelerate launch set them)") from None
    if world < 1 or not 0 <= rank < world:
        raise NetiError(f"RANK {rank} / WORLD_SIZE {world}: need 0 <= RANK < WORLD_SIZE")
    device = device or default_device()
    if world > 1 and device == "cuda":
        device = f"cuda:{local}"
    d = Dist(rank, world, local, device)
    if world > 1:
        import torch.distributed as dist
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        if not dist.is_initialized():
            try:
                dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
            except (ValueError, RuntimeError) as e:  # e.g. WORLD_SIZE set by hand without MASTER_ADDR
                raise NetiError(f"WORLD_SIZE={world}: cannot start torch.distributed ({first_line(e)}); "
                                "launch with torchrun or accelerate launch") from None
            d.owns_group = True
    return d


def prepare_builtin(spec: str, d: Dist) -> None:
    """Rank 0 builds a cached built-in folder (`tiny`, ...) before the others load it (ranks must not race to build it)."""
    from ..sd.models import TINY, tiny_model_dir
    if spec in TINY and d.world > 1:
        if d.rank == 0:
            tiny_model_dir(spec)
        d.barrier()


