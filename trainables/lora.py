"""Attach the LoRA adapter (the research's r=16, alpha=16, dropout 0, all seven projections by default).

GRIT is LoRA plus curvature-aware updates (trainables/grit.py); it starts from the same adapter.
"""
from __future__ import annotations

from trainables.config import TrialConfig


def peft_config(cfg: TrialConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, bias="none",
                      target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")


def check_targets(model, cfg: TrialConfig):
    """A clear error for target modules the model does not have (PEFT's own error does not list candidates)."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.lora.target_modules if m not in present]
    if missing:
        raise ValueError(f"lora.target_modules {missing} are not modules of {cfg.model}; "
                         f"candidates: {sorted(m for m in present if m.endswith('proj'))}")


def attach(model, cfg: TrialConfig):
    """The model with the fresh adapter (SFT). DPO and CITA pass `peft_config(cfg)` to TRL instead: given a
    PeftModel, TRL 1.16 would add a frozen copy of the adapter as the reference, costing setup time and a LoRA
    pass in every reference forward; given the config, its reference is the base model (adapter disabled), the
    same values since a fresh adapter's B is zero."""
    from peft import get_peft_model

    return get_peft_model(model, peft_config(cfg))
