"""Small host-to-GPU copies queued instead of waited for, while a trial loads its model and builds its trainer.

A copy from ordinary (pageable) host memory returns only once the GPU has made it, and a GPU that several
processes share by time-slicing (trials packed on one GPU) makes it only in this process's slice. SmolLM2 trials
packed 16 on an H100 spent 1.3 s of their setup in PEFT moving each new LoRA matrix to the GPU (210 modules, 420
matrices), and 0.3 s in bitsandbytes' 16-value NF4 tables (stack samples of the setup, BENCHMARKS.md 2026-11-24 15:40-17:10).
Staged through a fresh pinned copy, a copy is queued on the GPU's stream and the CPU goes on; the values are the
same. Written here because neither PEFT nor bitsandbytes pins or batches these copies.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

# Larger copies are bandwidth-bound. The limit also bounds the pinned staging memory, which torch's host allocator
# keeps cached for the process: the copies this is for are LoRA matrices (SmolLM2 <= 98 KiB, 8B lora_A 256 KiB).
SMALL_BYTES = 256 << 10


def _small(t: torch.Tensor) -> bool:
    return t.numel() * t.element_size() <= SMALL_BYTES


class _PinnedCopies(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is torch.Tensor.to and args and type(args[0]) in (torch.Tensor, torch.nn.Parameter)
                and set(kwargs) <= {"device", "dtype", "non_blocking"}):  # not `copy=`, `memory_format=`
            try:
                device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            except (TypeError, RuntimeError):  # e.g. a positional `copy`: the plain way
                device = dtype = None
            src = args[0]
            if device is not None and device.type == "cuda" and src.device.type == "cpu" and _small(src):
                staged = src if dtype is None else src.to(dtype)  # cast on the host: the pinned copy is the last
                if not staged.is_pinned():  # a pinned source is the caller's buffer: it may change after we return
                    return staged.pin_memory().to(device, non_blocking=True)
        elif (func is torch.tensor and args and not isinstance(args[0], torch.Tensor)
              and not kwargs.get("requires_grad") and _is_cuda(kwargs.get("device"))):
            host = func(*args, **{**kwargs, "device": "cpu"})
            if _small(host):
                return host.pin_memory().to(kwargs["device"], non_blocking=True)
            return host.to(kwargs["device"])
        return func(*args, **kwargs)


def _is_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def pinned_small_copies():
    """Within it (this thread), small host-to-GPU `.to` and `torch.tensor(<data>, device=<cuda>)` copies are staged
    through a fresh pinned copy and queued; a no-op without CUDA."""
    return _PinnedCopies() if torch.cuda.is_available() else contextlib.nullcontext()
