"""DPO: TRL's sigmoid loss against the frozen base model as reference: TRL adds the adapter (peft_config) and
computes the reference with it disabled."""
from __future__ import annotations

import contextlib
import functools
import inspect

from trainables import lora, reference
from trainables.config import TrialConfig
from trainables.pinned_copies import pinned_small_copies
from trainables.training_args import trl_args


@contextlib.contextmanager
def checkpointing_left_on(model):
    """Stop TRL's reference pass from turning gradient checkpointing off and on again around every micro-batch.

    Why: each toggle walks every module four times (~25 ms per pass for SmolLM2 on a CPU), and each re-enable adds
    one more forward hook on the input embeddings that nothing removes (transformers 5.17), so every later
    forward, generation included, runs one hook more per micro-batch trained. Leaving it on is exact: under
    no_grad torch's checkpoint saves and recomputes nothing. TRL decides the toggle from
    `model.is_gradient_checkpointing`, so we answer False for the pass (an instance attribute on the PeftModel).
    TRL's own reason for the toggle is a warning that only reentrant checkpointing gives (we use non-reentrant;
    TRL forces reentrant only under DeepSpeed ZeRO-3 with PEFT, where the pass would warn once per layer)."""
    # nested: the outer block restores it; not a PeftModel: the property cannot be shadowed, so TRL's toggle runs
    shadowable = not isinstance(inspect.getattr_static(type(model), "is_gradient_checkpointing", None), property)
    if "is_gradient_checkpointing" in vars(model) or not shadowable:
        yield
        return
    model.is_gradient_checkpointing = False
    try:
        yield
    finally:
        del model.is_gradient_checkpointing


@functools.cache
def trainer_class():
    """TRL's DPOTrainer with the reference pass above (CITA's trainer subclasses it)."""
    from trl import DPOTrainer

    class ReferencePassTrainer(DPOTrainer):
        def _compute_loss(self, model, inputs, return_outputs):  # DPO's loss runs its reference pass inline
            with checkpointing_left_on(self.model):
                return super()._compute_loss(model, inputs, return_outputs)

        def compute_ref_log_probs(self, model, inputs):  # CITA's loss and TRL's precompute call this one
            with checkpointing_left_on(self.model):
                return super().compute_ref_log_probs(model, inputs)

    return ReferencePassTrainer


def build_pair_trainer(trainer_cls, cfg: TrialConfig, model, tokenizer, train_ds, output_dir: str, callbacks=(),
                       args_kwargs=None, **trainer_kwargs):
    """A DPO-family TRL trainer (DPO, CITA) with the adapter from `peft_config`. With the trial's
    `trainer.precompute_ref_log_probs`, the reference log-probs come from the cache shared across trials
    (trainables/reference.py) instead of TRL's per-trial pass over the whole training set."""
    from trl import DPOConfig

    args = trl_args(cfg, DPOConfig, output_dir, beta=cfg.beta, **(args_kwargs or {}))
    shared_reference, args.precompute_ref_log_probs = args.precompute_ref_log_probs, False
    with pinned_small_copies():  # PEFT moves each new LoRA matrix to the GPU (not the reference pass below)
        trainer = trainer_cls(model=model, ref_model=None, args=args, train_dataset=train_ds,
                              processing_class=tokenizer, callbacks=list(callbacks), peft_config=lora.peft_config(cfg),
                              **trainer_kwargs)
    if shared_reference:
        if args.use_liger_kernel:  # the reference pass with the kernels the policy trains with (transformers applies
            from transformers.integrations.liger import apply_liger_kernel  # them only when training starts)

            apply_liger_kernel(trainer.model, args.liger_kernel_config)
        trainer.reference_cache = reference.attach(trainer, cfg, args.precompute_ref_batch_size)
        args.precompute_ref_log_probs = True  # what the trainer does (TRL reads the argument only when built)
    return trainer


def build_trainer(cfg: TrialConfig, model, tokenizer, train_ds, output_dir: str, callbacks=()):
    return build_pair_trainer(trainer_class(), cfg, model, tokenizer, train_ds, output_dir, callbacks,
                              args_kwargs={"loss_type": ["sigmoid"]})
