"""A reused (warm) worker keeps its last trial's base model for its next trial of the same model and precision.

Loading is a large part of a warm trial's setup: a quantized model is re-read and re-quantized on the GPU every
trial, an 8B model re-read from disk. On an H100 (BENCHMARKS.md, 2026-11-24 afternoon): a warm 8B trial reached
the end of step 1 in 1.55-2.36 s on a kept model, against 4.01-4.43 s loading it; SmolLM2 trials packed 16 at a
time spent 2.9 s before step 1 on a kept model, against 4.5-5.4 s loading it.

Every trial still gets a fresh adapter: after a trial, `keep` takes the adapter off (PEFT's `unload`), puts back
what training changed on the base model (checkpointing, hooks, added attributes and plain attribute values,
requires_grad, train mode, plain config values, the generation config), and keeps the model only if it then
matches what was loaded: module types, attribute names and plain values, hooks, every parameter's and buffer's
dtype, shape, device, flags and checksum (bitsandbytes' quantization state too), train mode and configs.
Otherwise it is dropped and the next trial loads afresh. A load that draws random numbers (initialising weights
the checkpoint lacks) is never kept. So a trial's adapter initialisation, and its losses, are the same either way
(tests/test_warm_model.py).

Written here because neither PEFT nor transformers offers "the base model as loaded" back after training.
"""
from __future__ import annotations

import copy
import gc
import weakref
from typing import NamedTuple

import torch

from trainables import models, precision
from trainables.config import TrialConfig

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device)  # attribute values put back as loaded
_kept: dict = {}  # at most one entry: key -> (model, snapshot)
_snapshots = weakref.WeakKeyDictionary()  # model `take` handed out -> (key, snapshot, or why it cannot be kept)


def _key(cfg: TrialConfig) -> tuple:
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    return models.resolve(cfg.model), str(models.weight_files(cfg.model)), cfg.precision, device


def take(cfg: TrialConfig) -> tuple[object, bool]:
    """(base model at the trial's precision, whether it was kept from an earlier trial). A kept model of another
    model or precision is dropped first: a worker's GPU share holds one."""
    key = _key(cfg)
    if key in _kept:
        model, snapshot = _kept.pop(key)
        _snapshots[model] = (key, snapshot)
        return model, True
    if drop() and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the trial's peak: its own model, not the one it replaced
    drawn = _rng_state()
    model = precision.load_model(cfg)
    if _rng_state() != drawn:  # it initialised weights the checkpoint lacks: a kept copy would carry this seed's
        _snapshots[model] = (key, "its load drew random numbers (weights the checkpoint lacks)")  # draws onward
        return model, False
    try:
        _snapshots[model] = (key, _snapshot(model))
    except Exception as err:  # reuse is an optimisation: the trial goes on without it
        _snapshots[model] = (key, f"no snapshot at load ({type(err).__name__}: {err})")
    return model, False


def keep(trained) -> str | None:
    """Keep the base model under `trained` (the trial's PeftModel, or the base model from `take`) for the next
    trial. Returns None when kept, else why not: what does not match the load (then it is not kept)."""
    model = trained.unload() if hasattr(trained, "unload") else trained
    key, snapshot = _snapshots.pop(model, (None, "not a model take() handed out"))
    if isinstance(snapshot, str):
        return snapshot
    _reset(model, snapshot)
    now = _snapshot(model)
    changed = [f"{part.replace('_', ' ')}: {', '.join(sorted(map(str, _changed(was, getattr(now, part))))[:3])}"
               for part, was in snapshot._asdict().items() if was != getattr(now, part)]
    if changed:
        return "; ".join(changed)
    drop()
    _kept[key] = (model, snapshot)
    return None


def _changed(was, now) -> list:
    if isinstance(was, dict) and isinstance(now, dict):
        return [k for k in was.keys() | now.keys() if was.get(k) != now.get(k)]
    return [f"{was} -> {now}"]


def drop() -> bool:
    """Give up the kept model, if any (its memory is freed once nothing else holds it). True if one was kept."""
    if not _kept:
        return False
    (model, _), = _kept.values()
    gone = weakref.ref(model)
    del model
    _kept.clear()
    if gone() is not None:  # in a reference cycle (none seen so far): refcounting alone did not free it
        gc.unfreeze()  # trainables.trial froze the warm worker's heap, this model with it; not frozen again, so
        gc.collect()   # the live trial's objects are not frozen for good
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return True


def _rng_state() -> tuple:
    """torch's generators, which initialise weights (Python's `random` is not one: the first load in a process
    draws from it, importing something)."""
    cuda = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return (torch.random.get_rng_state().numpy().tobytes(), *cuda)


def _checksum(t: torch.Tensor) -> torch.Tensor:
    """Sum in float64 (a 0-d tensor on t's device), in chunks: a whole 8B embedding summed in float64 at once takes
    a 4 GiB copy."""
    chunks = [c.sum(dtype=torch.float64) for c in t.detach().reshape(-1).split(1 << 24)]
    return chunks[0] if len(chunks) == 1 else torch.stack(chunks).sum()  # most tensors: one chunk, one kernel


def _to_floats(sums: list[torch.Tensor]) -> list[float]:
    """The checksums as numbers, read from each device at once: one wait for the GPU, not one per tensor (a GPU
    shared by packed trials serves each wait only in this process's time slice: 1.3 s per snapshot of SmolLM2
    under 16-way packing, BENCHMARKS.md 2026-11-24 15:40-17:10)."""
    read = {}
    for device in {s.device for s in sums}:
        on_device = [i for i, s in enumerate(sums) if s.device == device]
        read.update(zip(on_device, torch.stack([sums[i] for i in on_device]).tolist()))
    return [read[i] for i in range(len(sums))]


def _quantization_state(t: torch.Tensor, owner: torch.nn.Module) -> list:
    """bitsandbytes' tensors beside the weight: a 4-bit weight's absmax (and its own quantization's), 8-bit's SCB
    (the scales), which an 8-bit layer moves from its weight to its own `state` at its first forward."""
    state = getattr(t, "quant_state", None)
    nested = getattr(state, "state2", None)
    scales = getattr(t, "SCB", None)
    if scales is None and t is getattr(owner, "weight", None):  # the layer's weight's, not its bias's
        scales = getattr(getattr(owner, "state", None), "SCB", None)
    found = [getattr(state, "absmax", None), getattr(nested, "absmax", None), scales]
    return [x for x in found if isinstance(x, torch.Tensor)]


class Snapshot(NamedTuple):
    """What `keep` compares: modules (type, instance attributes, their plain values, hooks), tensors (dtype,
    shape, device, requires_grad, gradient, hooks, checksums of the tensor and its quantization state), train
    mode and configs."""
    modules: dict
    tensors: dict
    train_mode: bool
    config: dict
    generation_config: dict | None


def _tensors(model):
    """(owning module, qualified name, tensor) for every parameter and buffer, a tied one once (as
    `named_parameters` gives them)."""
    seen = set()
    for prefix, module in model.named_modules():
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if id(t) not in seen:
                seen.add(id(t))
                yield module, f"{prefix}.{name}" if prefix else name, t


@torch.no_grad()
def _snapshot(model) -> Snapshot:
    modules = {name: (type(m).__name__, frozenset(vars(m)),
                      tuple(sorted((k, v) for k, v in vars(m).items() if isinstance(v, _PLAIN))),
                      tuple(tuple(getattr(m, d)) for d in _HOOK_DICTS))
               for name, m in model.named_modules()}
    found = [(name, t, _quantization_state(t, owner)) for owner, name, t in _tensors(model)]
    sums = iter(_to_floats([_checksum(x) for _, t, quantization in found for x in (t, *quantization)]))
    tensors = {name: (t.dtype, tuple(t.shape), t.device, t.requires_grad, t.grad is None,
                      bool(getattr(t, "_backward_hooks", None)), bool(getattr(t, "_post_accumulate_grad_hooks", None)),
                      next(sums), tuple(next(sums) for _ in quantization))
               for name, t, quantization in found}
    return Snapshot(modules, tensors, model.training, model.config.to_dict(),
                    model.generation_config.to_dict() if model.generation_config is not None else None)


def _reset(model, snapshot: Snapshot):
    """Undo what a trial does to its base model beyond the adapter PEFT took off: each value put back is a copy of
    the snapshot's, so that nothing changing it later changes what `keep` compares with."""
    if model.is_gradient_checkpointing:
        model.gradient_checkpointing_disable()
    for name, module in model.named_modules():
        if name not in snapshot.modules:
            continue
        _, attributes, plain, hooks = snapshot.modules[name]
        for extra in set(vars(module)) - attributes:  # e.g. checkpointing's per-layer flags, a hook's handle
            delattr(module, extra)
        for attribute, value in plain:  # e.g. a flag a layer sets on its first forward
            if attribute in vars(module) and vars(module)[attribute] != value:
                setattr(module, attribute, value)
        for hook_dict, kept_ids in zip(_HOOK_DICTS, hooks):  # e.g. the input-grads hook checkpointing adds
            registered = getattr(module, hook_dict)
            for hook_id in [h for h in registered if h not in kept_ids]:
                del registered[hook_id]
    for name, param in model.named_parameters():
        if name in snapshot.tensors:
            param.requires_grad_(snapshot.tensors[name][3])
    model.train(snapshot.train_mode)
    loaded = snapshot.config  # e.g. use_cache (evaluation), eos/pad ids (the trainer aligns them to its tokenizer)
    for name, value in model.config.to_dict().items():
        if name in loaded and value != loaded[name] and isinstance(value, (*_PLAIN, list)):
            setattr(model.config, name, copy.deepcopy(loaded[name]))
    if snapshot.generation_config is not None:  # generation normalizes it (eos_token_id 2 -> [2])
        model.generation_config = type(model.generation_config).from_dict(copy.deepcopy(snapshot.generation_config))
