"""Data-parallel helpers over torch.distributed (NCCL on GPUs, gloo on CPU); no-ops in a single process.

Every rank holds the same SAE (same seed) and reads its own shards. The trainer wraps each SAE in
DistributedDataParallel (`wrap`): gradients are averaged in buckets whose all-reduce starts as soon as their last
gradient is ready, overlapped with the rest of the backward, so the ranks stay identical; floating buffers
(firing-rate EMAs) are averaged after each step. Launch with `torchrun --nproc-per-node N -m app.cli train ...`.
"""
import os

import torch
import torch.distributed as torch_dist


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def world_size() -> int:
    return torch_dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str) -> None:
    """Join the process group torchrun describes in the environment (nothing to do without WORLD_SIZE)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch_dist.init_process_group(backend=backend)
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def wrap(module: torch.nn.Module, bucket_mb: float = 25.0) -> torch.nn.Module:
    """The module itself in one process; else DistributedDataParallel around it: gradients averaged in buckets of
    `bucket_mb` MB, each all-reduced as soon as it is complete, overlapped with the rest of the backward.

    Buffers are not broadcast at each forward (the trainer averages floating buffers after each step); every
    parameter takes part in every step's loss, so unused-parameter detection stays off."""
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    device = next(module.parameters()).device
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                   broadcast_buffers=False, bucket_cap_mb=bucket_mb)


def average_gradients(module: torch.nn.Module) -> None:
    """One blocking all-reduce per parameter after the backward (the fallback for a module not wrapped by `wrap`)."""
    if not is_distributed():
        return
    size = world_size()
    for parameter in module.parameters():
        if parameter.grad is not None:
            torch_dist.all_reduce(parameter.grad, op=torch_dist.ReduceOp.SUM)
            parameter.grad.div_(size)


def average_buffers(module: torch.nn.Module) -> None:
    if not is_distributed():
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            torch_dist.all_reduce(buffer, op=torch_dist.ReduceOp.SUM)
            buffer.div_(world_size())


def combine_fired(fired: torch.Tensor, tokens: int) -> tuple[torch.Tensor, int]:
    """A latent fired if it fired on any rank; tokens add up over ranks."""
    fired_count = fired.to(torch.int32)
    torch_dist.all_reduce(fired_count, op=torch_dist.ReduceOp.MAX)
    return fired_count.bool(), tokens * world_size()


def sum_over_ranks(tensor: torch.Tensor) -> None:
    """In place: the sum of this tensor over ranks (threshold calibration adds up its per-rank observations)."""
    if is_distributed():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)


def shards_for_rank(shards: list[int]) -> list[int]:
    """This rank's share of the shards (round-robin)."""
    return shards[rank()::world_size()]


def min_over_ranks(value: int) -> int:
    """The smallest value over ranks (so every rank runs the same number of steps)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value])
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MIN)
    return int(tensor.item())


def min_over_ranks_(tensor: torch.Tensor) -> None:
    """In place: the element-wise minimum of this tensor over ranks (no host read)."""
    if is_distributed():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MIN)


def barrier() -> None:
    if is_distributed():
        torch_dist.barrier()
