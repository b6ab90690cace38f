"""Where and how the model runs: devices, distributed processes, mixed precision, memory.

retrain.py stays one code path for a laptop CPU, a 6 GB RTX 3060, a Colab T4 and a multi-GPU
server: every feature here is an object that can do nothing (autocast disabled, a GradScaler
that is off, a world of one process).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

# ---------------------------------------------------------------------------------------------
# Distributed (torchrun + DistributedDataParallel)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job; a world of one without torchrun."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The one process that prints, logs and writes checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


# A gloo group beside the training one, for agreements made on the host (stop requests): over
# NCCL, each of those would make the host wait for the GPU to finish its queued work.
_host_group = None


def init_distributed(device_name: str) -> Dist:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1).

    NCCL on CUDA, gloo on CPU (what the tests use); plus a gloo group for host-side flags.
    """
    global _host_group
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not device_name.startswith("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    _host_group = dist.new_group(backend="gloo")
    return Dist(rank, world, local_rank)


def any_process(flag: bool, ctx: Dist) -> bool:
    """True where `flag` is true on at least one process; a CPU collective that never waits
    for a GPU."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, group=_host_group)
    return bool(t.item())


def shutdown_distributed() -> None:
    global _host_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _host_group = None


def all_sum(values: torch.Tensor, ctx: Dist, device: torch.device) -> list[float]:
    """Sum a 1-D tensor over all processes (in float64, so loss sums stay exact enough) and
    read it back: one host-device wait, wherever the tensor lives."""
    t = values.detach().to(torch.float64)
    if ctx.enabled:
        t = t.to(device if device.type == "cuda" else "cpu")
        dist.all_reduce(t)
    return t.tolist()


def same_buffers_as_rank_zero(model: nn.Module, ctx: Dist) -> None:
    """Copy process 0's buffers (BatchNorm running statistics) to every process.

    DistributedDataParallel broadcasts them at the start of each training forward, but every
    process then updates its own from its own share of the batch. Without this, each process
    would evaluate its shard of the images with slightly different statistics, none of them
    those of the checkpoint that process 0 saves: the validation loss would not be the saved
    model's. Parameters need nothing: the averaged gradients make them equal on all processes.
    (The wrapper's first forward after training broadcasts them too, because a flag set by the
    last training forward is still on; evaluation does not depend on that detail, nor on being
    given the wrapper.)
    """
    if not ctx.enabled:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def gather_in_order(obj: object, ctx: Dist) -> list:
    """Every process's `obj`, in rank order (for predictions of contiguous shards)."""
    if not ctx.enabled:
        return [obj]
    out: list = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def shard(n: int, ctx: Dist) -> np.ndarray:
    """Contiguous, non-overlapping indices of this rank's share of n items (evaluation: every
    item exactly once, unlike DistributedSampler, which pads by repeating items)."""
    return np.array_split(np.arange(n), ctx.world)[ctx.rank]


# ---------------------------------------------------------------------------------------------
# Mixed precision, layout, compile
# ---------------------------------------------------------------------------------------------
AMP_CHOICES = ("auto", "bf16", "fp16", "off")


def resolve_amp(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `--amp`, or None for full fp32.

    auto: bf16 where the GPU supports it (Ampere and newer: RTX 3060, A100, H100), fp16 with a
    GradScaler on older cards (T4, V100), off on CPU (CPU autocast is slower for DenseNet).
    """
    if choice not in AMP_CHOICES:
        raise ValueError(f"--amp {choice!r}: expected one of {AMP_CHOICES}")
    if choice == "off":
        return None
    if choice == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if choice == "fp16" and device.type == "cpu":
        raise ValueError("--amp fp16 needs a CUDA GPU; use --amp bf16 or off on a CPU")
    return torch.bfloat16 if choice == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast for `dtype`, or a context that does nothing."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler that is only enabled for fp16 (bf16 has fp32's range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def maybe_compile(model: nn.Module, enabled: bool, log: Callable[[str], None] = print
                  ) -> nn.Module:
    """torch.compile the model, or return it unchanged with a message saying why not."""
    if not enabled:
        return model
    if not hasattr(torch, "compile"):
        log("--compile: this PyTorch has no torch.compile; running uncompiled")
        return model
    try:
        return torch.compile(model)
    except (RuntimeError, ImportError, NotImplementedError) as err:
        log(f"--compile: torch.compile is unavailable here ({err}); running uncompiled")
        return model


# ---------------------------------------------------------------------------------------------
# Batch size
# ---------------------------------------------------------------------------------------------
REFERENCE_BATCH = 16


def largest_fitting_batch(fits: Callable[[int], bool], start: int = 16, limit: int = 1024
                          ) -> int:
    """The largest power-of-two batch in [start, limit] for which `fits(batch)` is True, found by
    doubling; `start` if even that does not fit (the caller then reports the real error)."""
    best, batch = start, start
    while batch <= limit and fits(batch):
        best, batch = batch, batch * 2
    return best


def probe_batch_size(model: nn.Module, image_size: int, n_classes: int, device: torch.device,
                     amp_dtype: torch.dtype | None, channels_last: bool,
                     margin: float = 0.8, limit: int = 1024) -> int:
    """The largest batch whose forward + backward fits in GPU memory, times a safety `margin`
    (rounded down to a multiple of 8). On a CPU there is no memory limit worth probing: 16."""
    if device.type != "cuda":
        return REFERENCE_BATCH

    def fits(batch: int) -> bool:
        try:
            x = torch.randn(batch, 3, image_size, image_size, device=device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp_dtype):
                out = model(x)
            out.float().sum().backward()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    best = largest_fitting_batch(fits, REFERENCE_BATCH, limit)
    return max(REFERENCE_BATCH, int(best * margin) // 8 * 8)


def scaled_lr(lr: float, batch: int, reference_batch: int = REFERENCE_BATCH) -> float:
    """Linear scaling rule (Goyal et al. 2017): lr grows with the batch, so that one epoch
    moves the weights about as far as the reference recipe's batch-16 epoch does."""
    return lr * batch / reference_batch


@dataclass
class Precision:
    """How tensors are laid out and computed: autocast dtype (None = fp32), channels_last."""
    amp: torch.dtype | None = None
    channels_last: bool = False

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return images.contiguous(memory_format=torch.channels_last)
        return images
