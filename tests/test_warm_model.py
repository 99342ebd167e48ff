"""A warm worker's next trial trains on the base model its last trial left (trainables/warm_model.py): the same
losses and results as on a freshly loaded one, and never a model that training changed."""
import weakref

import pytest
import torch

from tests.conftest import tiny_trial
from trainables import tracking, warm_model
from trainables.config import TrialConfig
from trainables.trial import run_trial


@pytest.fixture(autouse=True)
def nothing_kept():
    warm_model.drop()
    yield
    warm_model.drop()


def _losses_and_results(client, run_id, metrics):
    losses = [m.value for m in client.get_metric_history(run_id, "train/loss")]
    return losses, {k: v for k, v in metrics.items() if k.startswith("eval/") and k != "eval/trial_seconds"}


@pytest.mark.parametrize("method", ["sft", "dpo", "cita"])
def test_a_reused_base_model_trains_as_a_freshly_loaded_one(method, runs, tiny_model):
    """A trial on a model an earlier trial left (GRIT, every layer checkpointed: hooks and flags on the base
    model, then generation) has the losses, generations and scores of the same trial on a fresh load."""
    fresh, reused = trials_fresh_and_reused(runs, tiny_trial(method=method, seed=3))
    assert reused == fresh


def trials_fresh_and_reused(runs, cfg: dict):
    """(losses, eval results) of `cfg` on a fresh load, then on the base model a different trial left."""
    client = tracking.client(runs)
    exp = tracking.ensure_experiment(client, "t")
    fresh = run_trial(cfg, "fresh", runs, exp)
    earlier = {**cfg, "method": "cita", "adapter": "grit", "gradient_checkpointing": True, "seed": 9}
    run_trial(earlier, "earlier", runs, exp, reuse_base_model=True)
    reused = run_trial(cfg, "reused", runs, exp, reuse_base_model=True)
    by_label = {r.data.tags["config_label"]: r for r in client.search_runs([exp])}
    tags = {label: run.data.tags for label, run in by_label.items()}
    assert (tags["earlier"]["base_model"], tags["reused"]["base_model"]) == ("loaded", "reused")
    assert tags["reused"]["exec_reuse_base_model"] == "true" and "base_model_kept" not in tags["reused"]
    assert tags["fresh"]["base_model"] == "loaded" and "exec_reuse_base_model" not in tags["fresh"]
    expected = _losses_and_results(client, by_label["fresh"].info.run_id, fresh)
    assert len(expected[0]) == cfg["max_steps"] and expected[1]["eval/n_generated"] > 0
    return expected, _losses_and_results(client, by_label["reused"].info.run_id, reused)


def test_a_model_whose_weights_changed_is_not_kept(tiny_model):
    cfg = TrialConfig(**tiny_trial())
    model, reused = warm_model.take(cfg)
    assert not reused
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    assert warm_model.keep(model) == f"tensors: {next(model.named_parameters())[0]}"
    assert warm_model.take(cfg)[1] is False


def test_config_values_a_trainer_aligned_are_put_back(tiny_model):
    """The trainer sets the config's eos/pad token ids to its tokenizer's (the 8B checkpoint with SmolLM2's
    tokenizer: 1 -> 2, 0 -> 2, found on a GPU); keeping the model puts the loaded values back."""
    cfg = TrialConfig(**tiny_trial())
    model, _ = warm_model.take(cfg)
    loaded = model.config.to_dict()
    model.config.eos_token_id, model.config.pad_token_id, model.config.use_cache = 12345, 12346, True
    assert warm_model.keep(model) is None
    assert model.config.to_dict() == loaded


def test_a_kept_model_is_handed_out_once_and_dropped_for_another_precision(tiny_model):
    fp32, bf16 = TrialConfig(**tiny_trial()), TrialConfig(**tiny_trial(precision="bf16"))
    model, _ = warm_model.take(fp32)
    assert warm_model.keep(model) is None
    again, reused = warm_model.take(fp32)
    assert again is model and reused
    assert warm_model.take(fp32)[1] is False  # handed out: a second trial at once loads its own
    assert warm_model.keep(again) is None
    gone = weakref.ref(model)
    del model, again
    other, reused = warm_model.take(bf16)
    assert not reused and next(other.parameters()).dtype == torch.bfloat16
    assert gone() is None  # the fp32 model was freed, not kept beside the bf16 one


def test_plain_attribute_values_are_put_back_and_later_changes_do_not_reach_the_snapshot(tiny_model):
    cfg = TrialConfig(**tiny_trial())
    model, _ = warm_model.take(cfg)
    attention = model.model.layers[0].self_attn
    layer_idx, architectures = attention.layer_idx, list(model.config.architectures)
    attention.layer_idx, model.config.architectures = 99, ["Other"]
    assert warm_model.keep(model) is None
    assert (attention.layer_idx, model.config.architectures) == (layer_idx, architectures)
    model, _ = warm_model.take(cfg)
    model.config.architectures.append("Mutated")  # in place: the list put back is a copy, not the snapshot's own
    assert warm_model.keep(model) is None and model.config.architectures == architectures


def test_a_load_that_draws_random_numbers_is_not_kept(tiny_model, monkeypatch):
    """A checkpoint missing weights gets them initialised at load from the trial's seeded stream: a kept copy
    would carry one seed's draws into other trials."""
    from trainables import precision

    load = precision.load_model

    def load_and_initialise(cfg):
        model = load(cfg)
        torch.rand(1)
        return model

    monkeypatch.setattr(precision, "load_model", load_and_initialise)
    model, _ = warm_model.take(TrialConfig(**tiny_trial()))
    assert "random numbers" in warm_model.keep(model)


def test_a_failed_trial_keeps_nothing_and_a_failed_keep_leaves_the_trial_finished(runs, tiny_model, monkeypatch):
    from transformers import TrainerCallback

    client = tracking.client(runs)
    exp = tracking.ensure_experiment(client, "t")

    class Fail(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            raise RuntimeError("boom")

    run_trial(tiny_trial(), "keeps", runs, exp, reuse_base_model=True)
    with pytest.raises(RuntimeError, match="boom"):  # takes the kept model, then fails: it is not kept
        run_trial(tiny_trial(), "fails", runs, exp, reuse_base_model=True, callbacks=[Fail()])
    run_trial(tiny_trial(), "after", runs, exp, reuse_base_model=True)

    def broken(trained):
        raise RuntimeError("no unload")

    monkeypatch.setattr(warm_model, "keep", broken)
    run_trial(tiny_trial(), "keep fails", runs, exp, reuse_base_model=True)
    by_label = {r.data.tags["config_label"]: r for r in client.search_runs([exp])}
    assert (by_label["fails"].data.tags["base_model"], by_label["fails"].info.status) == ("reused", "FAILED")
    assert by_label["after"].data.tags["base_model"] == "loaded"
    assert by_label["keep fails"].info.status == "FINISHED"
    assert by_label["keep fails"].data.tags["base_model_kept"] == "false: RuntimeError: no unload"


def test_a_trial_without_reuse_drops_the_kept_model(runs, tiny_model):
    client = tracking.client(runs)
    exp = tracking.ensure_experiment(client, "t")
    run_trial(tiny_trial(), "keeps", runs, exp, reuse_base_model=True)
    (kept, _), = warm_model._kept.values()
    gone = weakref.ref(kept)
    del kept
    run_trial(tiny_trial(), "fresh", runs, exp)
    assert gone() is None and not warm_model._kept


def test_a_fresh_processs_first_model_is_kept(tiny_model):
    """A Ray worker's first trial loads in a fresh process, where imports made at the first load draw from
    Python's `random`: that is no weight initialisation, and the model is kept."""
    import subprocess
    import sys

    code = ("from tests.conftest import tiny_trial; from trainables import warm_model; "
            "from trainables.config import TrialConfig; "
            "model, _ = warm_model.take(TrialConfig(**tiny_trial())); print('KEEP', warm_model.keep(model))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "KEEP None" in out.stdout, out.stdout + out.stderr[-2000:]
