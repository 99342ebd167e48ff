"""A real Ray Tune sweep on the tiny model: trials land in MLflow, reruns add nothing, a failure doesn't stop it."""
import json

from sweeps.profiles import Profile
from sweeps.runner import run_sweep
from sweeps.spec import Spec
from tests.conftest import tiny_trial
from trainables import tracking

CPU = Profile("test", tiny_trial(), cpus_per_trial=1, gpus_per_trial=0, precisions=("fp32",))


def _children(client, exp_id):
    return [r for r in client.search_runs([exp_id]) if r.data.tags.get(tracking.ROLE) == "trial"]


GRIT_SOON = {"kfac_update_freq": 1, "kfac_min_samples": 1, "reprojection_freq": 1, "sample_every": 1}


def test_sweep_runs_trials_and_rerun_skips_finished(runs, tiny_model, ray_local):
    # one LoRA SFT trial and one GRIT DPO trial (GRIT inside a Ray Tune sweep, acting: steps preconditioned)
    spec = Spec.load({"study": "sweep_t", "seeds": [1], "variants": [
        {"method": "sft"}, {"method": "dpo", "adapter": "grit", "grit": GRIT_SOON}]})
    first = run_sweep(spec, CPU, tracking_uri=runs)
    assert first.ran == 2 and not first.failed
    client = tracking.client(runs)
    kids = _children(client, first.experiment_id)
    assert sorted(r.data.tags["method"] for r in kids) == ["dpo", "sft"]
    grit_run = next(r for r in kids if r.data.tags["adapter"] == "grit")
    assert grit_run.data.metrics["grit/steps_preconditioned"] >= 1
    assert grit_run.data.metrics["grit/factor_refreshes"] >= 1
    assert grit_run.data.metrics["grit/natgrad_norm"] > 0 and grit_run.data.metrics["grit/top_eigenvalue"] > 0
    # per-module proof: every LoRA module's effective rank and top eigenvalues, as an artifact
    per_module = json.loads(open(client.download_artifacts(grit_run.info.run_id, "grit_modules.json")).read())
    assert len(per_module) == 14 and all(1 <= m["rank"] <= 16 and m["top_eig_a"] > 0 and m["samples"] > 0
                                         for m in per_module.values())
    assert all(r.info.status == "FINISHED" for r in kids)
    assert {r.data.tags["mlflow.parentRunId"] for r in kids} == {first.parent_run_id}
    parent = client.get_run(first.parent_run_id)
    assert parent.data.tags["profile"] == "test" and parent.info.status == "FINISHED"

    # same study again, plus two new seeds: only the new trials run; 4 trials on 2 CPUs, so Tune reuses a
    # finished trial's worker (reuse_actors) for a later one, which then starts warm
    spec.seeds = [1, 2, 3]
    second = run_sweep(spec, CPU, tracking_uri=runs)
    assert (len(second.skipped), second.ran) == (2, 4)
    kids = _children(client, first.experiment_id)
    assert len(kids) == 6 and len({r.data.tags["trial_key"] for r in kids}) == 6
    assert "true" in {r.data.tags["warm_worker"] for r in kids if r.data.tags["seed"] != "1"}
    # the profile's execution knobs reach the trials: a warm worker's trial trains on the base model it kept
    assert all(r.data.tags["exec_reuse_base_model"] == "true" for r in kids)
    assert "reused" in {r.data.tags["base_model"] for r in kids}
    # a worker ran all its trials on one lasting thread (its per-thread caches kept: sweeps.runner._TrialThread)
    assert all(r.data.tags["thread_trial"] == r.data.tags["worker_trial"] for r in kids), \
        [(r.data.tags["worker_trial"], r.data.tags["thread_trial"]) for r in kids]

    third = run_sweep(spec, CPU, tracking_uri=runs)
    assert third.ran == 0 and len(_children(client, first.experiment_id)) == 6


def test_failing_trial_is_recorded_and_sweep_goes_on(runs, tiny_model, ray_local):
    spec = Spec.load({"study": "fail_t", "variants": [{"name": "ok"}, {"name": "bad", "model": "no-org/none"}],
                      "seeds": [1]})
    result = run_sweep(spec, CPU, tracking_uri=runs)
    assert len(result.failed) == 1
    client = tracking.client(runs)
    by_status = {r.info.status: r for r in _children(client, result.experiment_id)}
    assert set(by_status) == {"FINISHED", "FAILED"}
    assert "no-org/none" in by_status["FAILED"].data.tags["error"]
    # a rerun retries the failed trial only
    again = run_sweep(spec, CPU, tracking_uri=runs)
    assert (len(again.skipped), again.ran) == (1, 1)


def test_cluster_profiles_refuse_a_local_store(runs):
    import pytest

    from sweeps import profiles
    from sweeps.spec import SpecError

    spec = Spec.load({"study": "c", "seeds": [1]})
    with pytest.raises(SpecError, match="MLFLOW_TRACKING_URI"):
        run_sweep(spec, profiles.get("tacc"), tracking_uri=runs)


def test_packing_by_memory_sizes_each_trials_gpu_share(tiny_model):
    """GPU share per trial from the memory planner: the smallest 1/k of a GPU holding the trial's peak + headroom,
    capped by the profile's share; a profile without packing keeps its fixed share."""
    from dataclasses import replace

    from sweeps.runner import gpu_shares
    from sweeps.spec import expand
    from trainables import memory

    packed = Profile("t", tiny_trial(), cpus_per_trial=1, gpus_per_trial=1, precisions=("fp32",),
                     pack_by_memory=True, gpu_mem_gib=80)
    spec = Spec.load({"study": "s", "seeds": [1], "variants": [{"method": "sft"}, {"method": "dpo", "max_length": 1024,
                                                                                  "max_prompt_length": 512}]})
    trials = expand(spec, packed.overrides, cuda=True)
    shares = gpu_shares(trials, packed)
    assert shares[0] == 1 / 16  # a short tiny trial: as many per GPU as allowed
    assert shares[1] > shares[0]  # the longer DPO trial needs a bigger share
    shares = gpu_shares(trials, replace(packed, gpu_mem_gib=24))
    shape = memory.model_shape(tiny_model)
    for t, share in zip(trials, shares):
        need = memory.required_bytes(memory.trial_peak(t.config, shape))
        # holds it, and is the smallest 1/k that does (up to 16 per GPU)
        assert need <= share * 24 * 2**30 and (share == 1 / 16 or need > 24 * 2**30 / (1 / share + 1))
    assert gpu_shares(trials, replace(packed, pack_by_memory=False, gpus_per_trial=0.25)) == [0.25, 0.25]


def test_a_failed_trial_on_the_lasting_thread_leaves_nothing_for_the_collector():
    """The trial thread hands a failure to the waiting thread; once caught, the failed trial's objects (its model)
    are freed by refcounting alone: no reference cycle through the waiting frame keeps them until a full
    collection, which a process's first trial would freeze instead (trainables.trial._freeze_first_trial)."""
    import gc
    import weakref

    from sweeps.runner import _TrialThread

    class Model:
        pass

    refs = []

    def trial():
        model = Model()
        refs.append(weakref.ref(model))
        raise RuntimeError("boom")

    gc.disable()
    try:
        try:
            _TrialThread.run(trial)
        except RuntimeError as err:
            assert str(err) == "boom"
        assert refs and refs[0]() is None
    finally:
        gc.enable()
