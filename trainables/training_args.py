"""TRL/transformers training arguments shared by every method: one place maps TrialConfig to TrainingArguments."""
from __future__ import annotations

import torch

from trainables.config import TrialConfig


def trl_args(cfg: TrialConfig, config_cls, output_dir: str, **method_kwargs):
    cuda = torch.cuda.is_available()
    args = dict(
        output_dir=output_dir,
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.micro_batch,
        gradient_accumulation_steps=cfg.grad_accum,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler,
        optim=cfg.optim,
        seed=cfg.seed,
        data_seed=cfg.seed,
        max_length=cfg.max_length,
        logging_steps=cfg.logging_steps,
        # bf16 autocast on GPUs for every non-fp32 precision (nf4/int8 compute in bf16, as the research did)
        bf16=cuda and cfg.precision != "fp32",
        use_cpu=not cuda,
        gradient_checkpointing=cfg.gradient_checkpointing,
        # non-reentrant checkpointing works with frozen embeddings (LoRA) without enable_input_require_grads;
        # the trial's own kwargs add to it (every_n_layers: the memory planner's partial checkpointing)
        gradient_checkpointing_kwargs={"use_reentrant": False,
                                       **cfg.checkpointing_kwargs},
        report_to="none",          # the trial logs to MLflow itself (trainables/tracking.py)
        save_strategy="no",        # the adapter is saved once, at the end, as an MLflow artifact
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    args.update(method_kwargs)
    args.update({k: v for k, v in cfg.trainer.items() if k != "gradient_checkpointing_kwargs"})  # the spec's win
    return config_cls(**args)
