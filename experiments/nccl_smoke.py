"""2-process NCCL smoke test (run by experiments/gpu_check.sh under torchrun): every rank all-reduces its rank
on its own GPU and checks the sum; rank 0 prints the figures. Also times a 256 MB all-reduce."""

import os
import time

import torch
import torch.distributed as dist


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    value = torch.tensor([float(rank)], device="cuda")
    dist.all_reduce(value)
    expected = world * (world - 1) / 2
    if value.item() != expected:
        raise SystemExit(f"rank {rank}: all_reduce gave {value.item()}, expected {expected}")
    big = torch.ones(64 * 2**20, device="cuda")  # 256 MB of fp32
    dist.all_reduce(big)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        dist.all_reduce(big)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 5
    if rank == 0:
        print(
            f"nccl smoke test: {world} processes, all_reduce correct; 256 MB all_reduce {seconds * 1e3:.1f} ms"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
