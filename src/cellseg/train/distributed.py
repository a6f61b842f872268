"""torch.distributed glue, so one training script runs alone or under ``torchrun --nproc_per_node=N``.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything here is a no-op for a single process.
Only rank 0 writes files (checkpoints, logs, metrics); the others train and wait.

Three rules keep multi-GPU runs from failing or hanging:

- **Tensors go where the backend can reduce them.** On CUDA the default group is ``cpu:gloo,cuda:nccl`` and
  numbers are reduced on the GPU (NCCL cannot reduce a CPU tensor); on CPU, gloo and CPU tensors.
- **Waiting is safe.** Ranks wait for rank 0 (validation, checkpoint writing) in a separate gloo group with a
  long timeout, so a slow evaluation never trips NCCL's watchdog (10 minutes by default).
- **Failures are shared.** A step's losses are reduced on every rank before the backward pass, so a non-finite
  loss stops all ranks together; an error on rank 0 in work done for everyone (a download) is broadcast.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from cellseg import CellsegError
from cellseg.params import ParamsError

WAIT_TIMEOUT = timedelta(hours=6)
"""How long ranks wait for rank 0 (a validation pass on a big split, a slow filesystem)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "gloo"
    wait_group: Any = field(default=None, compare=False, repr=False)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class RankFailedError(CellsegError, RuntimeError):
    """Work that rank 0 did for every rank failed there; the message is rank 0's."""


def backend_for(use_cuda: bool) -> str:
    """The default group's backend: NCCL for CUDA tensors (with gloo for CPU ones), gloo alone on CPU."""
    return "cpu:gloo,cuda:nccl" if use_cuda else "gloo"


def collective_device(backend: str, local_rank: int = 0) -> torch.device:
    """Where tensors given to the default group's collectives must live for ``backend``."""
    return torch.device("cuda", local_rank) if "nccl" in backend else torch.device("cpu")


def init_distributed(use_cuda: bool) -> DistInfo:
    """Join the process group torchrun describes (see the module docstring), if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    backend = backend_for(use_cuda)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    wait_group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    return DistInfo(rank, world_size, local_rank, backend, wait_group)


def barrier(info: DistInfo) -> None:
    """Wait for every rank, however long rank 0 takes (gloo group, :data:`WAIT_TIMEOUT`)."""
    if info.enabled:
        dist.barrier(group=info.wait_group)


def sum_across_ranks(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks, on the device the backend needs (the caller's tensor is left alone)."""
    if not info.enabled:
        return values
    device = collective_device(info.backend, info.local_rank)
    total = values.detach().to(device, torch.float64, copy=True)
    dist.all_reduce(total)
    return total


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (gloo group: CPU objects)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj, group=info.wait_group)
    return out


def run_on_main(work: Callable[[], None], info: DistInfo) -> None:
    """Run ``work`` on rank 0 only while the others wait; if it fails there, every rank fails with its message."""
    error = None
    if info.is_main:
        try:
            work()
        except CellsegError as err:
            if not info.enabled:
                raise
            error = f"{type(err).__name__}: {err}"
    if not info.enabled:
        return
    message = [error]
    dist.broadcast_object_list(message, src=0, group=info.wait_group)
    if message[0] is not None:
        raise RankFailedError(f"on rank 0: {message[0]}")


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def check_nproc(nproc: int, device: torch.device) -> None:
    """One process per GPU: more processes than GPUs is a params error, not a CUDA traceback on rank N."""
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise ParamsError(f"train.nproc={nproc}, but this machine has {torch.cuda.device_count()} GPU(s)")


def launch_torchrun(nproc: int, script_and_args: list[str]) -> None:
    """Run ``python script args`` as ``nproc`` processes under torchrun on this machine; wait for them.

    Each rank reports its own errors (one ``error:`` line each); a failed launch is one error here.
    """
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    code = subprocess.run([*cmd, *script_and_args], check=False).returncode
    if code != 0:
        raise RankFailedError(
            f"train.nproc={nproc}: torchrun exited with status {code} (see the ranks' lines above)"
        )
