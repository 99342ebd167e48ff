"""Small host-to-GPU copies queued instead of waited for, while a trial loads its model and builds its trainer.

A copy from ordinary (pageable) host memory returns only once the GPU has made it, and a GPU that several
processes share by time-slicing (trials packed on one GPU) makes it only in this process's slice. SmolLM2 trials
packed 16 on an H100 spent 1.3 s of their setup in PEFT moving each new LoRA matrix to the GPU (420 copies), and
0.3 s in bitsandbytes' 16-value NF4 tables (stack samples of the setup, BENCHMARKS.md 2026-11-24 evening). Staged
through pinned memory, a copy is queued on the GPU's stream and the CPU goes on; the values are the same.
Written here because neither PEFT nor bitsandbytes pins or batches these copies.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

SMALL_BYTES = 4 << 20  # larger copies are bandwidth-bound (and pinning a whole model's weights would hold its size)


class _PinnedCopies(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is torch.Tensor.to and args and type(args[0]) in (torch.Tensor, torch.nn.Parameter)
                and set(kwargs) <= {"device", "dtype", "non_blocking"}):  # not `copy=`, `memory_format=`
            device, dtype, _, memory_format = torch._C._nn._parse_to(*args[1:], **kwargs)
            src = args[0]
            if (device is not None and device.type == "cuda" and src.device.type == "cpu" and memory_format is None
                    and src.numel() * src.element_size() <= SMALL_BYTES):
                staged = src if dtype is None else src.to(dtype)  # cast on the host: the pinned copy is the last
                return staged.pin_memory().to(device, non_blocking=True)
        elif func is torch.tensor and not kwargs.get("requires_grad") and _is_cuda(kwargs.get("device")):
            host = func(*args, **{**kwargs, "device": "cpu"})
            if host.numel() * host.element_size() <= SMALL_BYTES:
                return host.pin_memory().to(kwargs["device"], non_blocking=True)
            return host.to(kwargs["device"])
        return func(*args, **kwargs)


def _is_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def pinned_small_copies():
    """Within it (this thread), small host-to-GPU `.to` and `torch.tensor(..., device=<cuda>)` copies are staged
    through pinned memory and queued; a no-op without CUDA."""
    return _PinnedCopies() if torch.cuda.is_available() else contextlib.nullcontext()
