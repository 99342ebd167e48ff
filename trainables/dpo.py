"""DPO: TRL's sigmoid loss against the frozen base model as reference: TRL adds the adapter (peft_config) and
computes the reference with it disabled."""
from __future__ import annotations

from trainables import lora
from trainables.config import TrialConfig
from trainables.training_args import trl_args


def build_trainer(cfg: TrialConfig, model, tokenizer, train_ds, output_dir: str, callbacks=()):
    from trl import DPOConfig, DPOTrainer

    args = trl_args(cfg, DPOConfig, output_dir, beta=cfg.beta, loss_type=["sigmoid"])
    return DPOTrainer(model=model, ref_model=None, args=args, train_dataset=train_ds, processing_class=tokenizer,
                      callbacks=list(callbacks), peft_config=lora.peft_config(cfg))
