"""SFT: supervised fine-tuning on the chosen responses (loss on completion tokens only)."""
from __future__ import annotations

from trainables import lora
from trainables.config import TrialConfig
from trainables.pinned_copies import pinned_small_copies
from trainables.training_args import trl_args


def build_trainer(cfg: TrialConfig, model, tokenizer, train_ds, output_dir: str, callbacks=()):
    from trl import SFTConfig, SFTTrainer

    args = trl_args(cfg, SFTConfig, output_dir, completion_only_loss=True)
    with pinned_small_copies():  # PEFT moves each new LoRA matrix to the GPU
        return SFTTrainer(model=lora.attach(model, cfg), args=args, train_dataset=train_ds,
                          processing_class=tokenizer, callbacks=list(callbacks))
