"""Load the base model at a trial's precision: fp32/bf16 anywhere, nf4/int8 through bitsandbytes on CUDA."""
from __future__ import annotations

import torch

from trainables import models
from trainables.config import QUANTIZED, TrialConfig


def cuda_available() -> bool:
    return torch.cuda.is_available()


def quantization_config(precision: str):
    """The research's 4-bit setup (NF4, double quant, bf16 compute) or plain 8-bit."""
    from transformers import BitsAndBytesConfig

    if precision == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    if precision == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"precision {precision!r} is not quantized; quantized precisions: {', '.join(QUANTIZED)}")


def load_model(cfg: TrialConfig):
    """Base model, frozen, on the trial's device, ready for an adapter."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": torch.float32 if cfg.precision == "fp32" else torch.bfloat16}
    if cfg.precision in QUANTIZED:
        if not cuda_available():  # validation refuses this earlier; this guards direct calls
            raise RuntimeError(f"precision={cfg.precision!r} needs CUDA; allowed without a GPU: fp32, bf16")
        kwargs["quantization_config"] = quantization_config(cfg.precision)
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    elif cuda_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = models.from_pretrained(AutoModelForCausalLM, cfg.model, **kwargs)
    model.config.use_cache = False  # training; generation turns it back on
    # No peft.prepare_model_for_kbit_training: it up-casts embeddings, lm_head and norms to fp32 (+2 GiB and a
    # slower lm_head on an 8B model) for nothing under bf16 autocast, and bare TRL + PEFT runs without it.
    # PEFT freezes the base; non-reentrant checkpointing needs no input grads.
    return model
