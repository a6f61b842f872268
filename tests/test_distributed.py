"""torch.distributed glue with two real gloo processes: reductions on the backend's device, shared failures.

The NCCL leg needs GPUs; what CPUs can show is that every collective gets its tensor on the device that
``collective_device`` names for the backend in use, and that this device is CUDA for the CUDA backend.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cellseg import CellsegError
from cellseg.train.distributed import (
    WAIT_TIMEOUT,
    DistInfo,
    RankFailedError,
    backend_for,
    collective_device,
    gather_objects,
    run_on_main,
    sum_across_ranks,
)


def test_each_backend_reduces_on_its_own_device() -> None:
    assert backend_for(use_cuda=True) == "cpu:gloo,cuda:nccl"  # CUDA tensors to NCCL, CPU objects to gloo
    assert collective_device(backend_for(use_cuda=True), local_rank=1) == torch.device("cuda", 1)
    assert collective_device(backend_for(use_cuda=False)) == torch.device("cpu")


def _rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    info = DistInfo(rank, 2, 0, "gloo", dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT))
    devices = []
    real_all_reduce = dist.all_reduce

    def recording_all_reduce(tensor, *args, **kwargs):
        devices.append(str(tensor.device))
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = recording_all_reduce
    result = {
        "non_finite": sum_across_ranks(torch.tensor([1.0, math.nan if rank == 1 else 0.0]), info).tolist(),
        "gathered": gather_objects({"rank": rank}, info),
        "devices": devices,
        "expected_device": str(collective_device(info.backend, info.local_rank)),
    }

    def failing() -> None:
        raise CellsegError("weights not found")

    try:
        run_on_main(failing, info)
        result["failure"] = None
    except RankFailedError as err:
        result["failure"] = str(err)
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def test_reductions_and_failures_with_two_gloo_processes(tmp_path: Path) -> None:
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, result in enumerate(results):
        value, flag = result["non_finite"]
        assert value == 2.0 and math.isnan(flag), "rank 1's NaN reaches every rank"
        assert result["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert result["devices"] and set(result["devices"]) == {result["expected_device"]} == {"cpu"}
        assert result["failure"] == "on rank 0: CellsegError: weights not found", rank


def test_single_process_is_a_no_op() -> None:
    info = DistInfo()
    values = torch.tensor([1.0, 2.0])
    assert sum_across_ranks(values, info) is values
    assert gather_objects(3, info) == [3]
