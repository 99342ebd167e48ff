"""One trial end to end on the tiny model: TRL training, evaluation, the MLflow layout."""
import os
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


def test_a_trial_records_the_time_its_progress_reports_blocked_it(runs, tiny_model):
    """Ray Tune's report() blocks the trial until its controller takes the result: time/report_wait_s is the
    training time spent so (the final report, after training, is not in it)."""
    import time

    client = tracking.client(runs)
    reports = []

    def slow_report(metrics):
        reports.append(metrics)
        time.sleep(0.3)

    metrics = run_trial(tiny_trial(method="sft"), "a", runs, tracking.ensure_experiment(client, "t"),
                        report=slow_report)
    in_training = len(reports) - 1  # the last is the trial's final result
    assert in_training >= 1 and 0.3 * in_training <= metrics["time/report_wait_s"] < 0.3 * in_training + 0.2


def test_a_trial_records_its_mean_later_step(runs, tiny_model):
    """time/later_step_s: the steps after the first, per step (what bench/ sets beside trials run alone)."""
    client = tracking.client(runs)
    metrics = run_trial(tiny_trial(method="sft", max_steps=3), "a", runs, tracking.ensure_experiment(client, "t"))
    assert metrics["time/later_step_s"] == pytest.approx(metrics["time/later_steps_s"] / 2)


def test_the_step_clock_tells_waiting_from_working_in_step_1(runs, tiny_model):
    """time/first_step_cpu_s is the training thread's CPU time in step 1: a wait inside the step (here a sleep
    before the optimizer step, as a lock or another thread's GIL would) shows in first_step_s alone."""
    import time

    from transformers import TrainerCallback

    class WaitInStep1(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step == 0:
                time.sleep(0.5)

    client = tracking.client(runs)
    metrics = run_trial(tiny_trial(method="sft", max_steps=2), "a", runs, tracking.ensure_experiment(client, "t"),
                        callbacks=[WaitInStep1()])
    assert 0 < metrics["time/first_step_cpu_s"]
    assert metrics["time/first_step_s"] - metrics["time/first_step_cpu_s"] >= 0.45


def test_the_step_clock_times_garbage_collections_in_step_1_only(runs, tiny_model):
    """time/first_step_gc_s: the collections inside step 1 (here one full collection over a large heap), not step
    2's; the gc hook is gone after the trial (a reused worker must not pile them up)."""
    import gc
    import time

    from transformers import TrainerCallback

    junk = []
    took = {}

    class CollectInSteps1And2(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # after a first trial's freeze (not frozen)
            junk.extend([i] for i in range(300_000))  # a heap a full collection has to walk

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step < 2:
                t = time.perf_counter()
                gc.collect()
                took[state.global_step] = time.perf_counter() - t

    class FailInStep1(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            raise RuntimeError("boom in step 1")

    hooks = len(gc.callbacks)
    client = tracking.client(runs)
    experiment = tracking.ensure_experiment(client, "t")
    metrics = run_trial(tiny_trial(method="sft", max_steps=3), "a", runs, experiment,
                        callbacks=[CollectInSteps1And2()])
    assert len(junk) and len(gc.callbacks) == hooks
    assert 0.9 * took[0] <= metrics["time/first_step_gc_s"] < took[0] + 0.5 * took[1]
    with pytest.raises(RuntimeError, match="boom in step 1"):  # a trial failing inside step 1 removes it too
        run_trial(tiny_trial(method="sft", max_steps=3), "b", runs, experiment, callbacks=[FailInStep1()])
    assert len(gc.callbacks) == hooks


def _in_step_1():
    import time

    time.sleep(0.1)


def _in_step_2():
    import time

    time.sleep(0.1)


def test_step_1_profile_when_asked(runs, tiny_model, tmp_path, monkeypatch):
    """$ALIGNSWEEP_PROFILE_STEP1: the training thread's stack sampled through step 1 (not step 2) into
    {kind}-{pid}-{worker_trial}.folded, and its setup (not step 1) into before_step1/ under the same name; a
    trial that fails inside step 1 or in its setup leaves no sampler thread running."""
    import os
    import threading
    import time

    from transformers import TrainerCallback

    from trainables import trial

    class MarkSteps(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            (_in_step_1 if state.global_step == 0 else _in_step_2)()

    class FailInStep1(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            raise RuntimeError("boom in step 1")

    monkeypatch.setenv("ALIGNSWEEP_PROFILE_STEP1", str(tmp_path / "prof"))
    client = tracking.client(runs)
    experiment = tracking.ensure_experiment(client, "t")
    from trainables.stack_sampler import StackSampler

    real_dump = StackSampler.dump
    slow_write = 2.5  # s; far above two tiny CPU steps, even on a loaded 2-core machine (1.6 s seen)
    monkeypatch.setattr(StackSampler, "dump", lambda self, path: real_dump(self, path) or time.sleep(slow_write))
    metrics = run_trial(tiny_trial(method="sft", max_steps=3), "a", runs, experiment, callbacks=[MarkSteps()])
    assert metrics["sys/first_step_sampled"] == 1 and metrics["time/later_steps_s"] < slow_write  # write left out
    n = trial._trials_in_this_process - 1
    files = sorted(p.name for p in (tmp_path / "prof").iterdir())
    assert files == ["before_step1", f"sft-lora-fp32-{os.getpid()}-{n}.folded"]
    setup = (tmp_path / "prof" / "before_step1" / files[1]).read_text()
    assert ":prepare:" in setup and ":_in_step_1:" not in setup
    lines = (tmp_path / "prof" / files[1]).read_text().splitlines()
    per_sample = float(lines[0].split()[-1])
    in_step_1 = sum(int(line.rsplit(" ", 1)[1]) for line in lines[1:] if ":_in_step_1:" in line) * per_sample
    assert 0.07 < in_step_1 < 0.2  # the 0.1 s sleep, from 2 ms samples
    assert not any(":_in_step_2:" in line for line in lines) and any(":training_step:" in line for line in lines)
    samplers = lambda: [t for t in threading.enumerate() if t.name == "stack-sampler"]
    assert samplers() == []
    with pytest.raises(RuntimeError, match="boom in step 1"):
        run_trial(tiny_trial(method="sft", max_steps=3), "b", runs, experiment, callbacks=[FailInStep1()])
    assert samplers() == []
    monkeypatch.setattr(trial.lora, "check_targets", lambda *a: (_ for _ in ()).throw(ValueError("boom in setup")))
    with pytest.raises(ValueError, match="boom in setup"):
        run_trial(tiny_trial(method="sft", max_steps=3), "c", runs, experiment)
    assert samplers() == []


def test_a_worker_loads_a_tokenizer_once_and_hands_each_trial_its_own_copy(tiny_model, monkeypatch):
    from trainables import models

    models._loaded_tokenizer.cache_clear()
    loads = []
    real = models.from_pretrained
    monkeypatch.setattr(models, "from_pretrained", lambda *a, **k: loads.append(a) or real(*a, **k))
    first, second = models.load_tokenizer(tiny_model), models.load_tokenizer(tiny_model)
    assert len(loads) == 1 and first is not second
    first.padding_side = "left"  # what one trial changes stays in its copy
    first.pad_token = first.bos_token
    assert second.padding_side == "right" and second.pad_token == second.eos_token
    assert first("a b c").input_ids == second("a b c").input_ids
    assert first.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        second.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


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
    assert older.data.tags["worker_pid"] == newer.data.tags["worker_pid"] == str(os.getpid())
    assert int(newer.data.tags["worker_trial"]) == int(older.data.tags["worker_trial"]) + 1


def test_a_first_trial_trains_frozen_and_leaves_only_its_survivors_frozen(runs, tiny_model, monkeypatch):
    """A process's first trial trains with what lives frozen (imports, its own model), so the collections while it
    trains do not walk it; garbage from before is collected first, not frozen. After it, the trial's objects are
    freed, those that died in a reference cycle while frozen too, and what is still alive (modules, caches) stays
    frozen. Later trials freeze nothing more (what a caller's per-trial objects would leak)."""
    import gc

    from trainables import trial

    monkeypatch.setattr(trial, "_frozen", False)
    gc.unfreeze()
    client = tracking.client(runs)
    seen = {}
    trial.run_trial(tiny_trial(method="sft"), "a", runs, tracking.ensure_experiment(client, "t"),
                    callbacks=[_keep_model(seen)])
    assert seen["model frozen"] and not seen["dead before frozen"]
    assert seen["model"]() is None and seen["cycle"]() is None  # freed and collected, not frozen for good
    assert gc.get_freeze_count() > 0
    gc.unfreeze()
    seen.clear()
    trial.run_trial(tiny_trial(method="sft"), "b", runs, tracking.ensure_experiment(client, "t"),
                    callbacks=[_keep_model(seen)])
    assert not seen["model frozen"] and gc.get_freeze_count() == 0


def test_a_failed_trials_model_is_not_frozen_and_is_freed_once_caught(runs, tiny_model, monkeypatch):
    """A failure propagates with the trial's model in its traceback (frozen while its first trial trained): the
    caller's free_memory after its except block unfreezes and gives it back, and nothing stays frozen (a frozen
    model in a cycle would stay for the process's life)."""
    import gc

    from transformers import TrainerCallback

    from trainables import trial

    class Fail(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            raise RuntimeError("boom")

    monkeypatch.setattr(trial, "_frozen", False)
    gc.unfreeze()
    client = tracking.client(runs)
    seen = {}
    with pytest.raises(RuntimeError, match="boom"):
        trial.run_trial(tiny_trial(method="sft"), "a", runs, tracking.ensure_experiment(client, "t"),
                        callbacks=[_keep_model(seen), Fail()])
    trial.free_memory()
    assert seen["model frozen"] and gc.get_freeze_count() == 0
    assert seen["model"]() is None and seen["cycle"]() is None


class _Cycle:
    pass


def _keep_model(seen):
    """A TrainerCallback that keeps weak references to the trial's model and to two objects in reference cycles in
    the oldest generation (freed only by a full collection): one dies when the trainer is built, before a first
    trial's freeze; the other lives until training begins, so it dies frozen. As training begins it notes whether
    the model is frozen and whether the first cycle is still there (frozen with the heap)."""
    import gc

    from transformers import TrainerCallback

    class Keep(TrainerCallback):
        def on_init_end(self, args, state, control, **kwargs):
            cycle, dead = _Cycle(), _Cycle()
            cycle.me, dead.me = cycle, dead
            gc.collect()  # both to the oldest generation: once dead, only a full collection frees them
            seen["alive"], seen["cycle"], seen["dead"] = cycle, weakref.ref(cycle), weakref.ref(dead)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            listed = {id(o) for o in gc.get_objects()}  # frozen objects are not listed
            seen["model"] = weakref.ref(model)
            seen["model frozen"] = id(model) not in listed
            seen["dead before frozen"] = seen["dead"]() is not None
            del seen["alive"]  # dies now, while frozen in a first trial

    return Keep()


def test_failure_is_recorded_on_the_run(runs, tiny_model):
    client = tracking.client(runs)
    exp = tracking.ensure_experiment(client, "t")
    with pytest.raises(Exception):
        run_trial(tiny_trial(model="no-such-org/no-such-model"), "bad", runs, exp)
    (run,) = client.search_runs([exp])
    assert run.info.status == "FAILED" and run.data.tags["trial_status"] == "failed"
    assert "no-such-org/no-such-model" in run.data.tags["error"]


def test_steps_logged_before_a_failure_reach_mlflow(runs, tiny_model, monkeypatch):
    """The step logger buffers its MLflow writes (one batch per 10 s): an attempt that fails mid-training still
    files the steps it finished."""
    from transformers import TrainerCallback

    from trainables import trial

    real = trial.METHOD_TRAINERS["sft"]

    class Crash(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                raise RuntimeError("disk on fire (injected by the test)")

    def build(cfg, *args, **kwargs):
        trainer = real(cfg, *args, **kwargs)
        trainer.add_callback(Crash())
        return trainer

    monkeypatch.setitem(trial.METHOD_TRAINERS, "sft", build)
    client = tracking.client(runs)
    exp = tracking.ensure_experiment(client, "t")
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_trial(tiny_trial(), "crash", runs, exp)
    (run,) = client.search_runs([exp])
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1]


def _inject_oom(monkeypatch, method: str, largest_that_fits: int, checkpointing_fits: bool = True) -> list:
    """Make training raise CUDA's OOM error whenever the micro-batch exceeds `largest_that_fits` (or, unless
    `checkpointing_fits`, whenever checkpointing is off); returns (micro_batch, grad_accum, checkpointing) of every
    trainer built."""
    import torch
    from transformers import TrainerCallback

    from trainables import trial

    real, built = trial.METHOD_TRAINERS[method], []

    class OutOfMemory(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if args.per_device_train_batch_size > largest_that_fits or not (
                    checkpointing_fits or args.gradient_checkpointing):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")

    def build(cfg, *args, **kwargs):
        trainer = real(cfg, *args, **kwargs)
        built.append((trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps,
                      trainer.args.gradient_checkpointing))
        trainer.add_callback(OutOfMemory())
        return trainer

    monkeypatch.setitem(trial.METHOD_TRAINERS, method, build)
    return built


def test_oom_retries_with_half_micro_batch_and_same_effective_batch(runs, tiny_model, monkeypatch):
    built = _inject_oom(monkeypatch, "sft", largest_that_fits=1)
    client = tracking.client(runs)
    exp = tracking.ensure_experiment(client, "t")
    metrics = run_trial(tiny_trial(micro_batch=4, grad_accum=1), "oom", runs, exp)
    assert built == [(4, 1, False), (2, 2, False), (1, 4, False)]
    (run,) = client.search_runs([exp])
    tags = run.data.tags
    assert run.info.status == "FINISHED" and tags["trial_status"] == "finished"
    assert (tags["oom_retries"], tags["exec_micro_batch"], tags["exec_grad_accum"]) == ("2", "1", "4")
    assert "micro_batch=2" in tags["oom_retry_1"] and "out of memory" in tags["oom_retry_1"]
    assert run.data.metrics["sys/oom_retries"] == 2 == metrics["sys/oom_retries"]
    assert run.data.params["micro_batch"] == "4"  # the config (and its key) stays what the spec asked for


def test_oom_at_micro_batch_one_fails_the_trial(runs, tiny_model, monkeypatch):
    from trainables.trial import TrainingOOM

    _inject_oom(monkeypatch, "dpo", largest_that_fits=0)
    client = tracking.client(runs)
    exp = tracking.ensure_experiment(client, "t")
    with pytest.raises(TrainingOOM):
        run_trial(tiny_trial(method="dpo", micro_batch=2), "oom", runs, exp)
    (run,) = client.search_runs([exp])
    assert run.info.status == "FAILED" and run.data.tags["oom_retries"] == "1"
    assert "out of memory" in run.data.tags["error"] and "micro_batch=1" in run.data.tags["error"]


def test_after_oom_falls_back_to_the_checkpointed_plan_before_halving():
    from trainables.memory import every_n_layers, with_checkpointing
    from trainables.trial import after_oom

    cfg = TrialConfig(**tiny_trial(micro_batch=1, grad_accum=8, gradient_checkpointing=True))
    planned = cfg.model_copy(update={"micro_batch": 4, "grad_accum": 2, "gradient_checkpointing": False})
    checkpointed = cfg.model_copy(update={"micro_batch": 8, "grad_accum": 1})
    steps = [planned]
    while (following := after_oom(steps[-1], checkpointed)) is not None:
        steps.append(following)
    assert [(c.micro_batch, c.grad_accum, c.gradient_checkpointing) for c in steps] == [
        (4, 2, False), (8, 1, True), (4, 2, True), (2, 4, True), (1, 8, True)]
    off = cfg.model_copy(update={"micro_batch": 2, "grad_accum": 4, "gradient_checkpointing": False})
    assert after_oom(off, None).gradient_checkpointing is False  # not the planner's doing: stays off
    # planned to checkpoint every 8th layer only: the same fallback first
    partial = with_checkpointing(cfg, 8).model_copy(update={"micro_batch": 4, "grad_accum": 2})
    assert after_oom(partial, checkpointed) is checkpointed
    assert every_n_layers(after_oom(after_oom(partial, checkpointed), checkpointed)) == 1


def test_a_planned_trial_that_runs_out_of_memory_without_checkpointing_retries_with_it(runs, tiny_model,
                                                                                       monkeypatch):
    """The planner (GPU only; stubbed here as it would answer on an 80 GB GPU) turned checkpointing off; the
    retry takes its checkpointed plan, and the tags say what ran while the params keep the config."""
    from trainables import trial

    built = _inject_oom(monkeypatch, "sft", largest_that_fits=8, checkpointing_fits=False)

    def planned(cfg, gpu_share, client, run_id):
        client.set_tag(run_id, "memory_plan", "stub")
        return (cfg.model_copy(update={"micro_batch": 2, "grad_accum": 2, "gradient_checkpointing": False}),
                cfg.model_copy(update={"micro_batch": 4, "grad_accum": 1, "gradient_checkpointing": True}))

    monkeypatch.setattr(trial, "_planned", planned)
    client = tracking.client(runs)
    exp = tracking.ensure_experiment(client, "t")
    run_trial(tiny_trial(micro_batch=1, grad_accum=4, gradient_checkpointing=True), "planned", runs, exp,
              plan_micro_batch=True)
    assert built == [(2, 2, False), (4, 1, True)]
    (run,) = client.search_runs([exp])
    tags = run.data.tags
    assert run.info.status == "FINISHED" and tags["oom_retries"] == "1"
    assert (tags["exec_micro_batch"], tags["exec_gradient_checkpointing"]) == ("4", "true")
    assert "gradient_checkpointing=true" in tags["oom_retry_1"] and "gradient_checkpointing=false" in \
        tags["oom_retry_1"]  # what it retries with, after which error
    assert run.data.params["gradient_checkpointing"] == "True" and run.data.params["micro_batch"] == "1"


def test_checkpointing_is_the_trials_field_not_a_trainer_knob():
    with pytest.raises(ValueError, match="trainer.gradient_checkpointing: set the trial's"):
        TrialConfig(**tiny_trial(trainer={"gradient_checkpointing": False}))


@pytest.mark.parametrize("method", ["sft", "dpo", "cita"])
def test_checkpointing_changes_no_loss(method, tiny_model, tmp_path):
    """What the planner relies on when it checkpoints fewer layers or none: the same losses as with all of them.
    every_n_layers=2 on the 2-layer model checkpoints layer 0 only (transformers' flag on each decoder layer)."""
    from trainables.memory import with_checkpointing
    from trainables.trial import prepare

    losses = []
    base = TrialConfig(**tiny_trial(method=method, micro_batch=2, grad_accum=1, max_steps=3))
    for every_n, flags in ((1, [True, True]), (2, [True, False]), (None, [False, False])):
        cfg = with_checkpointing(base, every_n)
        trainer, _, _ = prepare(cfg, str(tmp_path / str(every_n)))
        trainer.train()
        layers = trainer.model.get_base_model().model.layers
        assert [layer.gradient_checkpointing for layer in layers] == flags, every_n
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert len(losses[0]) == 3
    for other in losses[1:]:
        assert other == pytest.approx(losses[0], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_accumulation_is_equivalent_to_a_bigger_micro_batch(method, tiny_model, tmp_path):
    """What the OOM retry and the memory planner rely on: micro-batch 4 x 1 trains like 2 x 2 and 1 x 4."""
    from trainables.trial import prepare

    losses = []
    for micro, accum in [(4, 1), (2, 2), (1, 4)]:
        cfg = TrialConfig(**tiny_trial(method=method, micro_batch=micro, grad_accum=accum, max_steps=3))
        trainer, _, _ = prepare(cfg, str(tmp_path / f"{micro}"))
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert len(losses[0]) == 3
    for other in losses[1:]:
        assert other == pytest.approx(losses[0], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("method", ["dpo", "cita"])
def test_the_reference_is_the_base_model_with_no_adapter_copy(method, tiny_model, tmp_path):
    """DPO/CITA hand TRL the LoRA config, so TRL's reference pass runs with the adapter disabled: no frozen "ref"
    copy of the adapter (setup time, a LoRA pass per reference forward, a second adapter in the saved artifact).
    With a trained adapter (B != 0) the reference log-probs are the base model's, not the policy's."""
    import torch

    from trainables.trial import prepare

    trainer, _, _ = prepare(TrialConfig(**tiny_trial(method=method)), str(tmp_path))
    model = trainer.model
    assert list(model.peft_config) == ["default"]
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    with torch.no_grad():
        reference = trainer.compute_ref_log_probs(model, batch)
        with model.disable_adapter():
            base = trainer.compute_ref_log_probs(model, batch)  # inside, nothing more to disable
    assert all(torch.equal(r, b) for r, b in zip(reference, base))
    with torch.no_grad():  # the policy (adapter on, B != 0) is not the reference
        policy = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with model.disable_adapter():
            base_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(policy, base_logits, atol=1e-3)
    model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "ref").exists()


def test_every_method_starts_from_the_same_adapter_for_a_seed(tiny_model, tmp_path):
    """SFT attaches the adapter itself, TRL does for DPO/CITA (seeding with the trainer's seed): for one trial
    seed all three start from the same LoRA weights, so the analysis compares methods from one start."""
    import torch

    from trainables.trial import prepare

    def lora_a(method):
        trainer, _, _ = prepare(TrialConfig(**tiny_trial(method=method, seed=7)), str(tmp_path / method))
        return [p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_A" in n]

    sft = lora_a("sft")
    assert sft and all(all(torch.equal(a, b) for a, b in zip(sft, lora_a(m))) for m in ("dpo", "cita"))
    with pytest.raises(ValueError, match="trainer.seed: set the trial's `seed` instead"):
        TrialConfig(**tiny_trial(trainer={"seed": 3}))


def test_chunked_log_probs_equal_the_full_logits_ones(tiny_model, monkeypatch):
    """Evaluation scores through the LM head a chunk of positions at a time; the log-probs are those of the
    model's own logits, with the adapter on, and differ with it off."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainables import evaluate, lora, models

    model = lora.attach(AutoModelForCausalLM.from_pretrained(models.resolve(tiny_model)),
                        TrialConfig(model=tiny_model))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a trained adapter: B != 0
            torch.nn.init.normal_(p, std=0.5)
    monkeypatch.setattr(evaluate, "LOGITS_CHUNK_TOKENS", 7)  # chunks that cut across sequences
    ids = torch.randint(0, 1000, (3, 20))
    attn = torch.ones_like(ids)
    attn[1, 12:] = 0
    with torch.no_grad():
        chunked = evaluate._token_logps(model, ids, attn)
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        full = torch.gather(logits.log_softmax(-1), 2, ids[:, 1:, None]).squeeze(2)
        with model.disable_adapter():
            reference = evaluate._token_logps(model, ids, attn)
    assert torch.allclose(chunked, full, atol=1e-5)
    assert not torch.allclose(chunked, reference, atol=1e-3)


def test_padding_from_the_profile_changes_how_a_trial_runs_not_its_key(runs, tiny_model):
    # sweeps pass the profile's pad_to_multiple_of; a config's own trainer.pad_to_multiple_of (null too) wins
    from transformers import TrainerCallback

    class Seen(TrainerCallback):
        pads = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.pads.append(args.pad_to_multiple_of)

    client = tracking.client(runs)
    exp = tracking.ensure_experiment(client, "t")
    run_trial(tiny_trial(method="dpo"), "a", runs, exp, pad_to_multiple_of=64, callbacks=[Seen()])
    run_trial(tiny_trial(method="dpo", trainer={"pad_to_multiple_of": None}), "b", runs, exp, pad_to_multiple_of=64,
              callbacks=[Seen()])
    assert Seen.pads == [64, None]
    by_label = {r.data.tags["config_label"]: r.data.tags for r in client.search_runs([exp])}
    assert by_label["a"]["exec_pad_to_multiple_of"] == "64" and "exec_pad_to_multiple_of" not in by_label["b"]
    assert by_label["a"]["trial_key"] == TrialConfig(**tiny_trial(method="dpo")).trial_key


def test_reference_cache_is_execution_only_and_for_pair_methods(runs, tiny_model, tmp_path, monkeypatch):
    """A profile's reference_cache turns the shared reference log-probs on for DPO/CITA trials (not SFT, whose
    trainer has no such knob), tagged; the trial key stays the config's."""
    from trainables import reference, tracking
    from trainables.trial import run_trial

    monkeypatch.setattr(reference, "cache_root", lambda: tmp_path / "cache")
    client = tracking.client(runs)
    exp = tracking.ensure_experiment(client, "t")
    for method in ("dpo", "sft"):
        run_trial(tiny_trial(method=method), method, runs, exp, reference_cache=True, cudnn_attention=False,
                  liger_kernel=True)
    by_label = {r.data.tags["config_label"]: r.data.tags for r in client.search_runs([exp])}
    assert not any("exec_use_liger_kernel" in tags for tags in by_label.values())  # Triton: GPU trials only
    assert by_label["dpo"]["exec_precompute_ref_log_probs"] == "True" and by_label["dpo"]["reference_cache"] == "miss"
    assert by_label["sft"]["exec_cudnn_attention"] == "false" and "reference_cache" not in by_label["sft"]
    assert "exec_precompute_ref_log_probs" not in by_label["sft"]
    assert by_label["dpo"]["trial_key"] == TrialConfig(**tiny_trial(method="dpo")).trial_key
    assert len(list((tmp_path / "cache" / "reference_logps").glob("*.parquet"))) == 1
