"""Data-parallel training under `torch.distributed` (one process per GPU, or per CPU worker with gloo).

When the caller has initialised a process group (Ray Train's `TorchTrainer` does, so does `torchrun` or a test
with `torch.multiprocessing`), the trainer runs data parallel:

* `train.batch_size` is the global batch: each process takes its contiguous slice of every batch
  (`rank_loader`), so the processes together see exactly the batches one process would;
* every loss that is a mean over a batch-dependent count (pixels, token pairs, region pairs, tokens) is turned
  into this process's share of the mean over the global batch (`BatchSplit.share`: the counts are all-reduced),
  and the gradients are summed over the processes (`all_reduce_gradients`), so the update equals the
  single-process update on the whole batch (to float tolerance);
* the model starts identical everywhere (`broadcast_module`); the prototype pool is built on rank 0 and
  broadcast (`cpews.training.prototype_hooks`); only rank 0 validates, writes files and reports.

Every process must make the same sequence of collective calls: the trainer's decisions (which terms are active,
when to log, build or check) depend on the iteration only, never on the data of one process.
This module imports `torch.distributed` only (no ray: the layering rule of design.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

T = TypeVar("T")

GRADIENT_BUCKET_ELEMENTS = 2**24  # gradient elements per all-reduce (64 MB of float32): bounds the extra memory


class World(NamedTuple):
    """This process's place in the process group: rank 0 of 1 without one."""

    rank: int
    size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World(0, 1)


def current_world() -> World:
    """The initialised default process group's rank and size, or `SINGLE`."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return SINGLE


def per_process_batch_size(batch_size: int, world: World) -> int:
    """The slice of the global batch each process takes.

    Raises:
        ValueError: `batch_size` is not a multiple of the number of processes (the message names
            train.batch_size and the worker count).
    """
    if batch_size % world.size:
        raise ValueError(
            f"train.batch_size={batch_size} cannot be split over {world.size} workers: the global batch is split "
            f"evenly, so it must be a multiple of {world.size}"
        )
    return batch_size // world.size


def process_device(device: torch.device, world: World) -> torch.device:
    """The device of this process: a bare "cuda" becomes the current CUDA device (Ray Train and `torchrun`
    users set it per process with `torch.cuda.set_device`), anything else stays."""
    if world.distributed and device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class RankBatchSampler(Sampler[list[Any]]):
    """This process's slice `[rank * n, (rank + 1) * n)` of every batch of `batches` (n = batch / world size)."""

    def __init__(self, batches: Iterable[list[Any]], world: World) -> None:
        self.batches, self.world = batches, world

    def __iter__(self) -> Iterator[list[Any]]:
        for batch in self.batches:
            size = per_process_batch_size(len(batch), self.world)
            yield batch[self.world.rank * size : (self.world.rank + 1) * size]

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]


def rank_loader(loader: DataLoader, world: World) -> DataLoader:
    """`loader` (built on a batch sampler of global batches) reading only this process's slice of each batch;
    `loader` itself in a single process. Decoding and augmentation of the other slices never happen here."""
    if not world.distributed:
        return loader
    options: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "worker_init_fn": loader.worker_init_fn,
        "persistent_workers": loader.persistent_workers,
    }
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
    return DataLoader(loader.dataset, batch_sampler=RankBatchSampler(loader.batch_sampler, world), **options)


def global_sum(value: Tensor, world: World) -> Tensor:
    """The sum of `value` over the processes (a detached copy; `value` itself in a single process)."""
    if not world.distributed:
        return value.detach()
    total = value.detach().clone()
    dist.all_reduce(total)
    return total


class BatchSplit:
    """How a loss term turns a mean over its process's slice into its share of the mean over the global batch.

    `share(local, count)` for `local = S / max(count, 1)` (or `S / (count + 1)` with `plus_one`) returns
    `S / max(N, 1)` (or `S / (N + 1)`) with `N` the sum of `count` over the processes, so that the shares sum to
    the mean the whole batch would give; its gradient, summed over the processes, is the whole batch's gradient.
    In a single process (`WHOLE_BATCH`) it returns `local` unchanged and costs nothing.
    """

    def __init__(self, world: World = SINGLE) -> None:
        self.world = world

    @property
    def size(self) -> int:
        return self.world.size

    def sum(self, value: Tensor) -> Tensor:
        """`global_sum` of a detached diagnostic or count."""
        return global_sum(value, self.world)

    def share(self, local: Tensor, count: Tensor | int, *, plus_one: bool = False) -> Tensor:
        if not self.world.distributed:
            return local
        count = torch.as_tensor(count, device=local.device).detach().to(local.dtype)
        total = self.sum(count)
        if plus_one:
            return local * (count + 1) / (total + 1)
        return local * count.clamp_min(1) / total.clamp_min(1)


WHOLE_BATCH = BatchSplit()


def _buckets(grads: list[Tensor]) -> Iterator[list[Tensor]]:
    """Consecutive gradients of one dtype, at most `GRADIENT_BUCKET_ELEMENTS` elements each (or one gradient)."""
    bucket: list[Tensor] = []
    filled = 0
    for grad in grads:
        if bucket and (filled + grad.numel() > GRADIENT_BUCKET_ELEMENTS or grad.dtype != bucket[0].dtype):
            yield bucket
            bucket, filled = [], 0
        bucket.append(grad)
        filled += grad.numel()
    if bucket:
        yield bucket


def all_reduce_gradients(parameters: Iterable[nn.Parameter], world: World) -> None:
    """Sum the gradients over the processes in place, one all-reduce per bucket (`_buckets`).

    Parameters without a gradient keep none: every process has the same ones (the same terms are active at an
    iteration), so the buckets line up.
    """
    if not world.distributed:
        return
    for bucket in _buckets([p.grad for p in parameters if p.grad is not None]):
        flat = torch.cat([grad.reshape(-1) for grad in bucket])
        dist.all_reduce(flat)
        offset = 0
        for grad in bucket:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def broadcast_module(module: nn.Module, world: World, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers (the prototype pool included) into every process's `module`."""
    broadcast_tensors([*module.parameters(), *module.buffers()], world, src)


def broadcast_tensors(tensors: Iterable[Tensor], world: World, src: int = 0) -> None:
    """Copy rank `src`'s values of `tensors` (same shapes everywhere) into every process's, in place."""
    if not world.distributed:
        return
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor.data, src)


def gather_rows(value: Tensor, world: World) -> Tensor:
    """The rows of `value` (same shape on every process) of all processes, rank 0's first."""
    if not world.distributed:
        return value
    parts = [torch.empty_like(value) for _ in range(world.size)]
    dist.all_gather(parts, value.contiguous())
    return torch.cat(parts)


def barrier(world: World) -> None:
    """Wait for every process (nothing in a single process)."""
    if world.distributed:
        dist.barrier()


def main_first(world: World, make: Callable[[], T]) -> T:
    """`make()` on rank 0, then on the other processes: what it creates on first use (the synthetic dataset, the
    pretrained backbone file) is made once, and the others find it made."""
    if world.is_main:
        value = make()
    barrier(world)
    if not world.is_main:
        value = make()
    return value


__all__ = [
    "GRADIENT_BUCKET_ELEMENTS",
    "SINGLE",
    "WHOLE_BATCH",
    "BatchSplit",
    "RankBatchSampler",
    "World",
    "all_reduce_gradients",
    "barrier",
    "broadcast_module",
    "broadcast_tensors",
    "current_world",
    "gather_rows",
    "global_sum",
    "main_first",
    "per_process_batch_size",
    "process_device",
    "rank_loader",
]
