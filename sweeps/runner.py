"""Run a validated sweep on Ray Tune, filing every trial in MLflow.

spec -> expand (validated) -> connect to Ray -> MLflow parent run -> drop trials already finished (resume,
no duplicates) -> Tuner.fit with per-trial resources -> summary. A trial that raises is recorded (MLflow run
FAILED with its error, Tune trial ERROR) and the others go on.
"""
from __future__ import annotations

import os
import queue
import subprocess
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from sweeps.profiles import Profile
from sweeps.spec import Spec, SpecError, Trial, expand, trial_table
from trainables import tracking


@dataclass
class SweepResult:
    experiment_id: str | None
    parent_run_id: str | None
    tracking_uri: str
    trials: list[Trial]
    skipped: list[Trial] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)   # trial_key -> error

    @property
    def ran(self) -> int:
        return len(self.trials) - len(self.skipped)


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class _TrialThread:
    """One lasting thread per worker process that runs each of its trials in turn.

    Ray Tune runs every trial of a reused worker in a new thread (ray/air/_internal/util.py RunnerThread), and
    what torch keeps per thread dies with it: cuDNN's attention graphs (thread_local caches in
    aten/src/ATen/native/cudnn/MHA.cpp), built anew for every shape on a thread's first use. Tune's thread only
    waits here; exceptions (Tune's SystemExit(0) to stop a trial included) reach it unchanged."""

    _lock = threading.Lock()
    _thread: threading.Thread | None = None
    _jobs: queue.SimpleQueue = queue.SimpleQueue()

    @classmethod
    def run(cls, fn):
        if threading.current_thread() is cls._thread:  # already on it: waiting for itself would never end
            return fn()
        with cls._lock:
            if cls._thread is None or not cls._thread.is_alive():
                cls._thread = threading.Thread(target=cls._serve, name="alignsweep-trials", daemon=True)
                cls._thread.start()
        future = Future()
        cls._jobs.put((fn, future))
        try:
            return future.result()
        finally:  # a failure's traceback holds this frame, the frame the future, the future the failure: a cycle
            del future  # that would keep the failed trial's model until a full collection

    @classmethod
    def _serve(cls):
        while True:
            fn, future = cls._jobs.get()
            try:
                future.set_result(fn())
            except BaseException as err:  # noqa: BLE001 - handed to the waiting Tune thread, which raises it
                future.set_exception(err)
            del fn, future  # a finished trial's result or traceback must not outlive it here


def _tune_trainable(params: dict, context: dict):
    """What a Ray worker runs for one trial: on the worker's lasting trial thread (_TrialThread), or with
    $ALIGNSWEEP_THREAD_PER_TRIAL=1 in the new thread Ray Tune gives each trial (bench/packing.py compares them)."""
    from ray import tune

    from trainables.trial import run_trial

    params = params["trial"]

    def trial():
        run_trial(params["config"], params["label"], context["tracking_uri"], context["experiment_id"],
                  context["parent_run_id"], report=tune.report, threads=context["threads"], variant=params["variant"],
                  gpu_share=params["gpu_share"], **context["execution"])

    if os.environ.get("ALIGNSWEEP_THREAD_PER_TRIAL") == "1":
        trial()
    else:
        _TrialThread.run(trial)


def gpu_shares(trials: list[Trial], profile: Profile) -> list[float]:
    """Each trial's fraction of a GPU: the profile's, or with pack_by_memory the smallest 1/k of a GPU that holds
    the trial's estimated peak memory (never more than the profile's)."""
    if not profile.cuda or not profile.pack_by_memory:
        return [profile.gpus_per_trial] * len(trials)
    gpu_gib = profile.gpu_mem_gib
    if gpu_gib is None:
        import torch

        if not torch.cuda.is_available():
            print(f"profile {profile.name}: no local GPU to size packing from and no gpu_mem_gib; "
                  f"{profile.gpus_per_trial} GPU per trial", flush=True)
            return [profile.gpus_per_trial] * len(trials)
        gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    from trainables import memory

    shapes = {name: memory.model_shape(name) for name in {t.config.model for t in trials}}
    return [min(profile.gpus_per_trial,
                memory.gpu_fraction(memory.trial_peak(t.config, shapes[t.config.model]), int(gpu_gib * 2**30)))
            for t in trials]


def _progress_callback(total: int):
    from ray.tune import Callback

    class Progress(Callback):
        """One line per finished trial: what the Tune table doesn't say (eval results, errors)."""

        def __init__(self):
            self.done = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            r, t = trial.last_result or {}, trial.config["trial"]
            print(f"[{self.done}/{total}] done  {t['label']} seed={t['config']['seed']}  "
                  f"pref_acc={r.get('eval_pref_accuracy', float('nan')):.3f} "
                  f"quality={r.get('eval_quality', float('nan')):.2f}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            t = trial.config["trial"]
            print(f"[{self.done}/{total}] FAILED {t['label']} seed={t['config']['seed']} "
                  f"(error recorded in MLflow; the sweep goes on)", flush=True)

    return Progress()


def run_sweep(spec: Spec, profile: Profile, *, address: str | None = None, tracking_uri: str | None = None,
              storage: str | None = None, dry_run: bool = False, max_concurrent: int | None = None,
              config_keys: set[str] | None = None) -> SweepResult:
    """Run the spec's trials (only those whose config_key is in `config_keys`, when given)."""
    trials = expand(spec, profile.overrides, cuda=profile.cuda, step_scale=profile.step_scale)
    if config_keys is not None:
        trials = [t for t in trials if t.config.config_key in config_keys]
    tracking_uri = tracking_uri or tracking.default_tracking_uri()
    shares = dict(zip((t.key for t in trials), gpu_shares(trials, profile)))
    share_text = ", ".join(f"{g:.3g}" for g in sorted(set(shares.values())))
    if dry_run:
        print(trial_table(trials))
        print(f"profile {profile.name}: {profile.description}; per trial {profile.cpus_per_trial} CPU, "
              f"{share_text} GPU; MLflow {tracking_uri}")
        return SweepResult(None, None, tracking_uri, trials)

    if profile.name in ("lambda", "tacc") and not tracking_uri.startswith(("http://", "https://", "postgresql")):
        # workers on other nodes would each write to their own local file: nothing would reach the head
        raise SpecError(f"profile {profile.name!r} needs the cluster's MLflow server; tracking URI is "
                        f"{tracking_uri!r}. Set --tracking-uri or MLFLOW_TRACKING_URI (cluster scripts export it).")
    client = tracking.client(tracking_uri)
    experiment_id = tracking.ensure_experiment(client, spec.study)
    done = tracking.finished_trial_keys(client, experiment_id)
    todo = [t for t in trials if t.key not in done]
    result = SweepResult(experiment_id, None, tracking_uri, trials, skipped=[t for t in trials if t.key in done])
    print(f"{spec.study}: {len(trials)} trials, {len(result.skipped)} already finished in MLflow, "
          f"{len(todo)} to run (profile {profile.name}: {profile.description}; GPU per trial: {share_text})",
          flush=True)
    if not todo:
        return result

    parent = client.create_run(experiment_id, run_name=f"sweep-{time.strftime('%Y%m%d-%H%M%S')}", tags={
        tracking.ROLE: "sweep", "study": spec.study, "profile": profile.name, "git_sha": _git_sha(),
        "spec_hash": spec.hash, "n_trials": str(len(todo))})
    result.parent_run_id = parent.info.run_id
    status = "FAILED"
    try:
        result.failed = _fit(todo, shares, profile, address, storage, {
            "tracking_uri": tracking_uri, "experiment_id": experiment_id, "parent_run_id": result.parent_run_id,
            "threads": max(1, int(profile.cpus_per_trial)), "execution": profile.execution()},
            spec.study, max_concurrent)
        status = "FINISHED"
    finally:  # an interrupted sweep still closes its parent run; finished trials stay and are skipped next time
        client.set_tag(result.parent_run_id, "n_failed", str(len(result.failed)))
        client.set_terminated(result.parent_run_id, status)
    return result


def _fit(todo: list[Trial], shares: dict[str, float], profile: Profile, address, storage, context: dict, name: str,
         max_concurrent):
    import ray
    from ray import tune

    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            ray.init(address="local", include_dashboard=False, configure_logging=False)  # never a stray cluster

    def resources(config: dict):  # per trial: packed trials may each get a different GPU share
        share = config["trial"]["gpu_share"]
        return tune.PlacementGroupFactory([{"CPU": profile.cpus_per_trial, **({"GPU": share} if share else {})}])

    trainable = tune.with_resources(tune.with_parameters(_tune_trainable, context=context), resources)
    params = [{"config": t.config.model_dump(mode="json"), "label": t.label, "key": t.key, "variant": t.variant,
               "gpu_share": shares[t.key]} for t in todo]
    space = tune.grid_search(params)
    storage = storage or os.environ.get("ALIGNSWEEP_STORAGE") or str(tracking.runs_dir() / "ray")
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": space},
        tune_config=tune.TuneConfig(
            num_samples=1, max_concurrent_trials=max_concurrent,
            reuse_actors=True,  # a warm worker skips re-importing torch/transformers/TRL (~10 s per trial)
            trial_name_creator=lambda t: f"{t.config['trial']['config']['method']}-{t.trial_id}",
            trial_dirname_creator=lambda t: f"trial-{t.trial_id}"),
        run_config=tune.RunConfig(
            name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            callbacks=[_progress_callback(len(todo))], verbose=1),
    )
    results = tuner.fit()
    return {r.config["trial"]["key"]: str(r.error)[:500] for r in results if r.error is not None}
