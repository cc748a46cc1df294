"""More than one GPU: `torchrun --nproc_per_node N train.py ...` trains data-parallel, one process per GPU.

Without torchrun none of this does anything: no process group exists and a plain run executes no collective. With
it, every process draws its slice of the same global batch (train.get_batch), and the gradients are averaged here
by hand before the clip, so N processes x --batch-size B train as one process with N*B (docs/multi_gpu.md).
"""
import os
from datetime import timedelta

import torch
import torch.distributed as dist


def init(device):
    """-> (rank, world size, device). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without it: (0, 1, device)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1, device
    if device.type == "cuda":  # one GPU per process
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # A rank that dies is noticed by torchrun, which stops the others within seconds. The timeout only bounds a
        # rank that hangs: long enough for rank 0 to generate db-prior's class images while the others wait.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size(), device


def barrier():
    """Wait for every process (where rank 0 writes what the others then read); nothing without torchrun."""
    if dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def broadcast_parameters(params):
    """Every process starts from rank 0's trainable weights, as DistributedDataParallel does at construction: then
    identical averaged gradients keep them identical (the token rows' retraction included)."""
    if dist.is_initialized():
        for p in params:
            dist.broadcast(p, 0)


@torch.no_grad()
def average_gradients(params):
    """Data parallel by hand: one all_reduce of every gradient, flattened into one buffer, / world size. Chosen over
    wrapping the UNet in DistributedDataParallel because the trainable tensors are not all in the UNet (the token
    rows live in the text encoders), phi calls the same UNet without gradients, and gradient accumulation would need
    no_sync(): one call after the K backward passes says all of it. What it gives up is DDP's overlap of the
    reduction with the backward pass: small for a LoRA (~0.2 GB of fp32 gradients at rank 32 on SDXL)."""
    if not dist.is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]  # a rank where it got none
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)


def gather(x):
    """This process's per-sample values (its slice of the global batch) -> the global batch's, in order."""
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def average(x):
    """A scalar averaged over the processes (the global batch's loss, each process having the same share)."""
    if not dist.is_initialized():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def agree(value):
    """The largest of every process's whole number `value` (train.py: the number of a signal that asked to stop, 0
    for none), so that every process takes the same decision after the same step."""
    if not dist.is_initialized():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    x = torch.tensor([value], device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return int(x.item())


def is_peer_failure(e):
    """A collective that failed because another process died (or hung): NCCL's exception class, gloo's words."""
    return isinstance(e, dist.DistBackendError) or "gloo/transport" in str(e)


def finish():
    if dist.is_initialized():
        dist.destroy_process_group()
