"""One trial end to end on the tiny model: TRL training, evaluation, the MLflow layout."""
import weakref

import pandas as pd
import pytest
import yaml

from tests.conftest import tiny_trial
from trainables import tracking
from trainables.config import TrialConfig
from trainables.trial import run_trial


def _artifact_dir(client, run_id):
    import mlflow

    return mlflow.artifacts.download_artifacts(run_id=run_id, tracking_uri=client.tracking_uri)


@pytest.mark.parametrize("method", ["sft", "dpo", "cita"])
def test_trial_trains_evaluates_and_logs(method, runs, tiny_model):
    client = tracking.client(runs)
    exp = tracking.ensure_experiment(client, "t")
    cfg = tiny_trial(method=method, seed=7)
    reports = []
    metrics = run_trial(cfg, f"{method}|x", runs, exp, report=reports.append)

    (run,) = client.search_runs([exp])
    tags, data = run.data.tags, run.data
    assert run.info.status == "FINISHED" and tags["trial_status"] == "finished"
    c = TrialConfig(**cfg)
    assert (tags["method"], tags["trial_key"], tags["config_key"]) == (method, c.trial_key, c.config_key)
    assert data.params["lr"] == "0.001" and data.params["eval.n_generate"] == "4"
    # per-step training metrics, one per optimizer step
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2]
    if method == "cita":
        for name in ("train/cita/contrastive", "train/cita/anchor", "train/cita/margin"):
            assert name in data.metrics
    for name in ("eval/pref_accuracy", "eval/reward_margin", "eval/quality", "eval/refusal_accuracy"):
        assert name in data.metrics and metrics[name] == pytest.approx(data.metrics[name])
    assert reports and reports[-1]["done"]
    # per-trial overhead: trial start -> end of the first optimizer step, after setup, within the trial
    assert metrics["time/setup_s"] < metrics["time/to_first_step_s"] < metrics["eval/trial_seconds"]
    # ... = the time before the first step (setup included) + the first step itself
    assert metrics["time/setup_s"] < metrics["time/before_first_step_s"] and metrics["time/first_step_s"] > 0
    assert metrics["time/before_first_step_s"] + metrics["time/first_step_s"] == pytest.approx(
        metrics["time/to_first_step_s"])
    # the later steps lie inside training, after the first
    assert 0 < metrics["time/later_steps_s"] < metrics["time/train_s"] - metrics["time/first_step_s"]
    assert data.metrics["sys/oom_retries"] == 0 and tags["exec_micro_batch"] == "2"

    art = _artifact_dir(client, run.info.run_id)
    items = pd.read_parquet(f"{art}/eval_items.parquet")
    assert len(items) == 8 and items.item_id.is_unique
    assert items.generation.notna().sum() == 4 and items.quality.isna().sum() == 4
    assert items.quality.dropna().between(0, 10).all()
    assert metrics["eval/pref_accuracy"] == pytest.approx(items.pref_correct.mean())
    assert yaml.safe_load(open(f"{art}/config.yaml"))["method"] == method
    assert any(p.endswith("adapter_config.json") for p in __import__("glob").glob(f"{art}/adapter/*"))


def test_same_seed_same_losses(runs, tiny_model, monkeypatch):
    """Everything is seeded: two runs of one config give identical loss curves and generations. The second, in
    the same process, is tagged as a warm kind (its first-use costs were paid by the first)."""
    from trainables import trial

    monkeypatch.setattr(trial, "_kinds_in_this_process", set())
    client = tracking.client(runs)
    exp = tracking.ensure_experiment(client, "t")
    cfg = tiny_trial(method="dpo", seed=3)
    first = run_trial(cfg, "a", runs, exp)
    second = run_trial(cfg, "a", runs, exp)
    a, b = client.search_runs([exp])
    la = [m.value for m in client.get_metric_history(a.info.run_id, "train/loss")]
    lb = [m.value for m in client.get_metric_history(b.info.run_id, "train/loss")]
    results = lambda m: {k: v for k, v in m.items() if k.startswith("eval/") and k != "eval/trial_seconds"}
    assert la == lb and results(first) == results(second)
    older, newer = sorted((a, b), key=lambda r: r.info.start_time)
    assert (older.data.tags["warm_kind"], newer.data.tags["warm_kind"]) == ("false", "true")


def test_a_finished_trial_leaves_its_survivors_out_of_the_collectors_scans(runs, tiny_model):
    """After a trial, what is still alive (modules, caches) is frozen: the next trial's full collections (one per
    trainer.train()) do not walk it again. The trial's own objects are collected first, not frozen."""
    import gc

    from trainables import trial

    gc.unfreeze()
    client = tracking.client(runs)
    kept = []
    trial.run_trial(tiny_trial(method="sft"), "a", runs, tracking.ensure_experiment(client, "t"),
                    callbacks=[_keep_model(kept)])
    assert gc.get_freeze_count() > 0
    assert kept and kept[0]() is None  # the trial's model was freed, not frozen


def test_a_failed_trials_model_is_not_frozen_and_is_freed_once_caught(runs, tiny_model):
    """A failure propagates with the trial's model in its traceback: nothing is frozen then, so the caller's
    free_memory after its except block gives the model back (a frozen one would stay for the process's life)."""
    import gc

    from transformers import TrainerCallback

    from trainables import trial

    class Fail(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            raise RuntimeError("boom")

    gc.unfreeze()
    client = tracking.client(runs)
    kept = []
    with pytest.raises(RuntimeError, match="boom"):
        trial.run_trial(tiny_trial(method="sft"), "a", runs, tracking.ensure_experiment(client, "t"),
                        callbacks=[_keep_model(kept), Fail()])
    assert gc.get_freeze_count() == 0
    trial.free_memory()
    assert kept and kept[0]() is None


def _keep_model(refs):
    """A TrainerCallback that keeps a weak reference to the trial's model."""
    from transformers import TrainerCallback

    class Keep(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            refs.append(weakref.ref(model))

    return Keep()
