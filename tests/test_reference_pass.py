"""The DPO/CITA reference pass leaves gradient checkpointing on (trainables/dpo.py): same log-probs as TRL's
toggle, and no forward hook added per micro-batch."""
import pytest
import torch
from transformers import TrainerCallback

from tests.conftest import tiny_trial


def _trainer(method, workdir, callbacks=()):
    from trainables.config import TrialConfig
    from trainables.trial import prepare

    cfg = TrialConfig(**tiny_trial(method=method, gradient_checkpointing=True, max_steps=4, grad_accum=2))
    trainer, _, _ = prepare(cfg, str(workdir), list(callbacks))
    return trainer


class _HookCount(TrainerCallback):
    def __init__(self):
        self.per_step = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.per_step.append(len(model.get_input_embeddings()._forward_hooks))


@pytest.mark.parametrize("method", ["dpo", "cita"])
def test_training_adds_no_hook_per_micro_batch(tiny_model, method, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    toggles = []
    real_disable = PreTrainedModel.gradient_checkpointing_disable
    monkeypatch.setattr(PreTrainedModel, "gradient_checkpointing_disable",
                        lambda self: toggles.append(1) or real_disable(self))
    hooks = _HookCount()
    trainer = _trainer(method, tmp_path, [hooks])
    trainer.train()
    # TRL's toggle re-registered one hook per micro-batch: 2 more per step at grad_accum 2
    assert len(hooks.per_step) == 4 and len(set(hooks.per_step)) == 1, hooks.per_step
    assert toggles == []
    assert trainer.model.is_gradient_checkpointing


@pytest.mark.parametrize("method", ["dpo", "cita"])
def test_reference_log_probs_equal_trl_toggle(tiny_model, method, tmp_path):
    from trl import DPOTrainer

    trainer = _trainer(method, tmp_path)
    # as Trainer.train() sets up; checkpointing applies in training mode only
    trainer.model.gradient_checkpointing_enable(trainer.args.gradient_checkpointing_kwargs)
    trainer.model.train()
    assert trainer.model.is_gradient_checkpointing
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    ours = trainer.compute_ref_log_probs(trainer.model, inputs)
    assert "is_gradient_checkpointing" not in vars(trainer.model)  # the pass's stand-in answer is gone
    trl = DPOTrainer.compute_ref_log_probs(trainer, trainer.model, inputs)  # TRL's: toggles checkpointing
    for a, b in zip(ours, trl):
        assert torch.equal(a, b)
    assert trainer.model.is_gradient_checkpointing


def test_a_plain_model_keeps_trls_toggle(tiny_model):
    """Without PEFT the flag is a read-only property: the pass leaves it alone instead of failing."""
    from transformers import AutoModelForCausalLM

    from trainables import models
    from trainables.dpo import checkpointing_left_on

    model = AutoModelForCausalLM.from_pretrained(models.resolve(tiny_model))
    model.gradient_checkpointing_enable({"use_reentrant": False})
    with checkpointing_left_on(model):
        assert model.is_gradient_checkpointing
    assert "is_gradient_checkpointing" not in vars(model)
