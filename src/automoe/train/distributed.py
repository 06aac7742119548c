"""Data parallelism under torchrun (gloo on CPU, NCCL on GPU); one process works the same.

Gradients are summed across workers once per update, in buckets of about 32 MB. This
is what DistributedDataParallel does with `no_sync` accumulation, done by hand because a
supernet update touches an arch-dependent subset of parameters (and, with MoE, a
batch-dependent subset of experts): the workers first agree which parameters any of
them has a gradient for (one int per parameter); only those are shipped (a worker that
did not use one sends zeros for it), and the others keep no gradient, as in one process,
so the optimizer leaves them alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from automoe.errors import ConfigError


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Sum a few numbers over all workers (float64)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def sum_gradients(self, params: list[torch.nn.Parameter], bucket_bytes: int = 32 << 20) -> int:
        """Sum gradients over workers; the bytes shipped per worker."""
        if self.size == 1:
            return 0
        used = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=self.device)
        dist.all_reduce(used)
        shipped = [p for p, u in zip(params, used.tolist(), strict=True) if u]
        bucket: list[torch.nn.Parameter] = []
        size = total = 0
        for p in shipped:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            bucket.append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_bytes:
                _all_reduce_grads(bucket)
                total, bucket, size = total + size, [], 0
        if bucket:
            _all_reduce_grads(bucket)
            total += size
        return total


def _all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p))
        offset += n


def init_world(device: str = "auto") -> World:
    """Join the torchrun process group when WORLD_SIZE > 1; pick the device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was asked for but no GPU is visible")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
        # fp32 products (the optimizer's master weights, fp32 runs) on TF32 tensor cores (Ampere and later)
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return World(rank, size, dev)


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
