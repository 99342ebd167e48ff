"""A reused (warm) worker keeps its last trial's base model for its next trial of the same model and precision.

Loading is a large part of a warm trial's setup: a quantized model is re-read and re-quantized on the GPU every
trial, an 8B model re-read from disk. 16 SmolLM2 trials packed on an H100: 2.9 s from a warm trial's start to its
first step on a kept model, 5.2-5.4 s loading it (BENCHMARKS.md, 2026-11-24 afternoon). Every trial still gets a
fresh adapter: after a trial, `keep` takes the adapter off (PEFT's `unload`), puts back what training changed on
the base model (checkpointing, hooks, instance attributes, requires_grad, train mode, plain config values,
generation config), and keeps the model only if it then matches what was loaded: the same modules, attributes, hooks,
parameters and configs, and the same weights (a checksum per tensor).
Otherwise it is dropped and the next trial loads afresh. Loading consumes no random numbers, so a trial's adapter
initialisation, and its losses, are the same either way (tests/test_warm_model.py).

Written here because neither PEFT nor transformers offers "the base model as loaded" back after training.
"""
from __future__ import annotations

import gc
import weakref

import torch

from trainables import models, precision
from trainables.config import TrialConfig

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")
_kept: dict = {}  # at most one entry: key -> (model, snapshot)
_snapshots = weakref.WeakKeyDictionary()  # model `take` handed out -> (key, snapshot)


def _key(cfg: TrialConfig) -> tuple:
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    return models.resolve(cfg.model), cfg.precision, device


def take(cfg: TrialConfig) -> tuple[object, bool]:
    """(base model at the trial's precision, whether it was kept from an earlier trial). A kept model of another
    model or precision is dropped first: a worker's GPU share holds one."""
    key = _key(cfg)
    if key in _kept:
        model, snapshot = _kept.pop(key)
        _snapshots[model] = (key, snapshot)
        return model, True
    drop()
    model = precision.load_model(cfg)
    _snapshots[model] = (key, _snapshot(model))
    return model, False


def keep(trained) -> str | None:
    """Keep the base model under `trained` (the trial's PeftModel, or the base model from `take`) for the next
    trial. Returns None when kept, else why not: what does not match the load (then it is not kept)."""
    model = trained.unload() if hasattr(trained, "unload") else trained
    key, snapshot = _snapshots.pop(model, (None, None))
    if snapshot is None:
        return "not a model take() handed out"
    _reset(model, snapshot)
    now = _snapshot(model)
    changed = [f"{part}: {', '.join(sorted(map(str, _changed(was, now[i])))[:3])}"
               for i, (part, was) in enumerate(zip(_PARTS, snapshot)) if was != now[i]]
    if changed:
        return "; ".join(changed)
    drop()
    _kept[key] = (model, snapshot)
    return None


def _changed(was, now) -> list:
    if isinstance(was, dict) and isinstance(now, dict):
        return [k for k in was.keys() | now.keys() if was.get(k) != now.get(k)]
    return [f"{was} -> {now}"]


def drop():
    """Give up the kept model, if any (its memory is freed once nothing else holds it)."""
    if not _kept:
        return
    (model, _), = _kept.values()
    gone = weakref.ref(model)
    del model
    _kept.clear()
    # Only a model in a reference cycle needs a full collection (none seen so far). Collecting at every switch, the
    # packed sweep's warm trials that loaded spent 0.3-0.9 s more before step 1 than with no reuse at all.
    if gone() is not None:
        frozen = gc.get_freeze_count() > 0  # trainables.trial freezes a warm worker's heap: thaw it to collect
        if frozen:
            gc.unfreeze()
        gc.collect()
        if frozen:
            gc.freeze()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _modules_state(model) -> dict:
    return {name: (type(m).__name__, frozenset(vars(m)), tuple(tuple(getattr(m, d)) for d in _HOOK_DICTS))
            for name, m in model.named_modules()}


_PARTS = ("modules", "tensors", "train mode", "config", "generation config")  # _snapshot's, in order


@torch.no_grad()
def _snapshot(model) -> tuple:
    """What `keep` compares: modules (type, instance attributes, hooks), tensors (dtype, shape, device,
    requires_grad, checksum), train mode and configs."""
    tensors = {name: (t.dtype, tuple(t.shape), t.device, t.requires_grad, t.sum(dtype=torch.float64))
               for name, t in [*model.named_parameters(), *model.named_buffers()]}
    sums = torch.stack([v[-1] for v in tensors.values()]).tolist() if tensors else []  # one device sync
    tensors = {name: (*v[:-1], s) for (name, v), s in zip(tensors.items(), sums)}
    return (_modules_state(model), tensors, model.training, model.config.to_dict(),
            model.generation_config.to_dict() if model.generation_config is not None else None)


def _reset(model, snapshot):
    """Undo what a trial does to its base model beyond the adapter PEFT took off."""
    modules, tensors = snapshot[0], snapshot[1]
    if model.is_gradient_checkpointing:
        model.gradient_checkpointing_disable()
    for name, module in model.named_modules():
        if name not in modules:
            continue
        attributes, hooks = modules[name][1], modules[name][2]
        for extra in set(vars(module)) - attributes:  # e.g. checkpointing's per-layer flags, a hook's handle
            delattr(module, extra)
        for hook_dict, kept_ids in zip(_HOOK_DICTS, hooks):  # e.g. the input-grads hook checkpointing adds
            registered = getattr(module, hook_dict)
            for hook_id in [h for h in registered if h not in kept_ids]:
                del registered[hook_id]
    for name, param in model.named_parameters():
        if name in tensors:
            param.requires_grad_(tensors[name][3])
    model.train(snapshot[2])
    loaded = snapshot[3]  # e.g. use_cache (evaluation), eos/pad token ids (the trainer aligns them to the tokenizer)
    for name, value in model.config.to_dict().items():
        if name in loaded and value != loaded[name] and isinstance(value, (bool, int, float, str, list, type(None))):
            setattr(model.config, name, loaded[name])
    if snapshot[4] is not None:  # generation normalizes it (eos_token_id 2 -> [2])
        model.generation_config = type(model.generation_config).from_dict(snapshot[4])
