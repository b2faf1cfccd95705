"""Which process this is under torchrun: world size, rank 0, barrier (one process without torchrun).

Imports torch only when a process group may exist (``torch.distributed`` is asked only when torch is loaded).
"""

from __future__ import annotations

import os
import sys


def _group():
    """``torch.distributed`` when a process group is running, else None."""
    if "torch" not in sys.modules:  # no torch loaded: no process group either
        return None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    """Processes of this run: ``torch.distributed``'s world size, else torchrun's ``WORLD_SIZE``, else 1."""
    dist = _group()
    return dist.get_world_size() if dist is not None else int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on rank 0 (or without torchrun): the process that writes artifacts."""
    dist = _group()
    return dist.get_rank() == 0 if dist is not None else int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    dist = _group()
    if dist is not None:
        dist.barrier()


def rank_checksums(tensors) -> list[float]:
    """A float64 checksum of ``tensors`` (index-weighted sums in name order) from every rank, rank order.

    Equal entries mean every rank holds the same tensors (e.g. the n:m masks after a DDP stage); one entry in a
    single process.
    """
    import torch
    import torch.distributed as dist

    total = torch.zeros((), dtype=torch.float64)
    for name in sorted(tensors):
        flat = tensors[name].detach().flatten().double().cpu()
        total += (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [float(total)]
    backend_device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    local = total.reshape(1).to(backend_device)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return [float(g.item()) for g in gathered]
