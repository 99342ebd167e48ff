"""The one typed config of a trial. Built by sweeps.spec, logged verbatim to MLflow, read by the trainable.

Every default lives here (the research's values from STUDY.md where it gives one); nothing else in the
project invents hyperparameters.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

METHODS = ("sft", "dpo", "cita")
ADAPTERS = ("lora", "grit")
PRECISIONS = ("fp32", "bf16", "nf4", "int8")
TEMPLATES = ("llama3", "alpaca", "chatml", "model")
QUANTIZED = ("nf4", "int8")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraConfig(_Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class GritConfig(_Strict):
    """GRIT knobs (STUDY.md defaults). Used only when adapter == 'grit'."""
    precondition: bool = True          # natural-gradient step dB <- dB G^-1, dA <- A^-1 dA
    reproject: bool = True             # Fisher-guided reprojection onto top eigendirections
    dynamic_rank: bool = True          # pick k by cumulative energy, else reprojection_k
    two_sided: bool = True             # reproject with G_cov eigenvectors as well as A_cov
    kfac_update_freq: int = Field(50, ge=1)   # steps between factor inversions
    kfac_min_samples: int = Field(64, ge=1)   # samples before preconditioning starts
    reprojection_freq: int = Field(50, ge=1)
    sample_every: int = Field(15, ge=1)       # training forwards between statistic samples
    damping: float = Field(1e-3, gt=0)
    energy_threshold: float = Field(0.99, gt=0, le=1)
    min_rank: int = Field(4, ge=1)
    reprojection_k: int = Field(8, ge=1)
    lambda_kfac: float = Field(1e-5, ge=0)
    lambda_reproj: float = Field(1e-4, ge=0)
    statistics: Literal["running_mean", "ema"] = "running_mean"
    ema_decay: float = Field(0.95, gt=0, lt=1)


class EvalConfig(_Strict):
    n_generate: int = Field(32, ge=0)     # held-out prompts generated and scored (0 = likelihood metrics only)
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    batch_size: int = Field(16, ge=1)


class TrialConfig(_Strict):
    study: str = "adhoc"
    method: Literal["sft", "dpo", "cita"] = "sft"
    adapter: Literal["lora", "grit"] = "lora"
    precision: Literal["fp32", "bf16", "nf4", "int8"] = "bf16"
    template: Literal["llama3", "alpaca", "chatml", "model"] = "llama3"
    model: str = "meta-llama/Meta-Llama-3.1-8B"
    data: str = "generated"             # 'generated', 'pku_saferlhf', or a local parquet/dir of that dataset
    n_train: int = Field(10_813, ge=1)  # pairs used for training (PKU: the research's filtered count)
    n_eval: int = Field(256, ge=1)      # held-out pairs/prompts
    seed: int = 3407                    # model init, dropout, training data order
    data_seed: int = 0                  # which pairs exist and the train/held-out split: shared across seeds so
                                        # every config is scored on the same prompts (paired analysis)
    lr: float = Field(2e-4, gt=0)
    max_steps: int = Field(300, ge=1)
    micro_batch: int = Field(1, ge=1)
    grad_accum: int = Field(8, ge=1)
    max_length: int = Field(2048, ge=16)
    max_prompt_length: int = Field(1024, ge=8)  # dpo/cita prompts keep their last tokens (data.to_trl)
    warmup_steps: int = Field(5, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    lr_scheduler: str = "linear"
    optim: str = "adamw_torch"
    gradient_checkpointing: bool = True  # True: cluster profiles' planner may checkpoint fewer layers or none
    beta: float = Field(0.1, gt=0)       # DPO and CITA temperature
    lambda_kl: float = Field(0.01, ge=0)  # CITA anchor weight
    cita_anchor: Literal["seq_kl", "none"] = "seq_kl"
    lora: LoraConfig = LoraConfig()
    grit: GritConfig = GritConfig()
    eval: EvalConfig = EvalConfig()
    logging_steps: int = Field(1, ge=1)
    trainer: dict[str, Any] = Field(default_factory=dict)  # any other TRL/transformers TrainingArguments knob

    @property
    def checkpointing_kwargs(self) -> dict:
        """The trial's `trainer.gradient_checkpointing_kwargs` (every_n_layers: the memory planner's), {} if unset."""
        return self.trainer.get("gradient_checkpointing_kwargs") or {}

    @model_validator(mode="after")
    def _check(self):
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({self.max_length})")
        if "gradient_checkpointing" in self.trainer:  # the planner reads the field, not the trainer knob
            raise ValueError("trainer.gradient_checkpointing: set the trial's `gradient_checkpointing` instead (the "
                             "memory planner may checkpoint fewer layers or none where that fits and is faster, "
                             "tagged exec_gradient_checkpointing)")
        every_n = self.checkpointing_kwargs.get("every_n_layers", 1)
        if not isinstance(every_n, int) or isinstance(every_n, bool) or every_n < 1:
            raise ValueError(f"trainer.gradient_checkpointing_kwargs.every_n_layers = {every_n!r}: a whole number >= 1 "
                             "(checkpoint every n-th decoder layer; 1: all)")
        seeds = sorted({"seed", "data_seed"} & set(self.trainer))
        if seeds:  # TRL seeds DPO/CITA's LoRA init with the trainer's seed: one seed for every method (pairing)
            raise ValueError(f"trainer.{seeds[0]}: set the trial's `seed` instead (it seeds the adapter, the data "
                             "order and the trainer alike)")
        return self

    # --- identity -------------------------------------------------------------------------------
    def canonical(self, without: tuple[str, ...] = ()) -> dict:
        # `study` names where a trial is filed, not what it is; leave it out of every key.
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in ("study", *without)}

    @property
    def trial_key(self) -> str:
        """Stable hash of the resolved config: same config, same key, on any machine."""
        return _hash(self.canonical())

    @property
    def config_key(self) -> str:
        """Hash of everything but the seed: the unit analysis compares across seeds."""
        return _hash(self.canonical(without=("seed",)))

    def flat(self) -> dict[str, Any]:
        """Dotted flat params for MLflow."""
        out: dict[str, Any] = {}

        def walk(prefix, value):
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.model_dump(mode="json"))
        return out


def _hash(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
