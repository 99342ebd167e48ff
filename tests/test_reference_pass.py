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


@pytest.mark.parametrize("method", ["dpo", "cita"])
def test_shared_reference_cache_trains_as_the_in_step_pass_and_is_reused(tiny_model, method, tmp_path,
                                                                          monkeypatch):
    """trainer.precompute_ref_log_probs: the reference log-probs come from a cache keyed by model, precision and
    training set (trainables/reference.py). The losses match the in-step reference pass; a trial of another seed
    reads the cache without computing; another training set computes its own."""
    from trainables import reference
    from trainables.config import TrialConfig
    from trainables.trial import prepare

    monkeypatch.setattr(reference, "cache_root", lambda: tmp_path / "cache")
    outcomes = []
    real_attach = reference.attach
    monkeypatch.setattr(reference, "attach", lambda *a, **kw: outcomes.append(real_attach(*a, **kw)) or outcomes[-1])

    def losses(workdir, **overrides):
        cfg = TrialConfig(**tiny_trial(method=method, max_steps=3, **overrides))
        trainer, _, _ = prepare(cfg, str(tmp_path / workdir))
        assert trainer.precompute_ref_logps is bool(cfg.trainer.get("precompute_ref_log_probs"))
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    cached = {"trainer": {"precompute_ref_log_probs": True}}
    assert losses("cached", **cached) == pytest.approx(losses("in-step"), rel=1e-5, abs=1e-7)
    assert outcomes == ["miss"]
    files = sorted((tmp_path / "cache" / "reference_logps").glob("*.parquet"))
    assert len(files) == 1

    def no_pass(*args, **kwargs):
        raise AssertionError("a cache hit computes nothing")

    monkeypatch.setattr(reference, "compute", no_pass)
    losses("other-seed", seed=11, **cached)
    assert outcomes == ["miss", "hit"]
    monkeypatch.undo()
    monkeypatch.setattr(reference, "cache_root", lambda: tmp_path / "cache")
    losses("more-pairs", n_train=24, **cached)  # another training set: its own entry
    assert len(sorted((tmp_path / "cache" / "reference_logps").glob("*.parquet"))) == 2
    # the same tokens truncated shorter by the collator (max_prompt_length, hence the prompts, unchanged): its own
    losses("shorter", max_length=100, **cached)
    assert len(sorted((tmp_path / "cache" / "reference_logps").glob("*.parquet"))) == 3
