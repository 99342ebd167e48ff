"""MLflow layout (DESIGN.md): experiment = study; parent run per sweep; child run per trial.

Child run tags: alignsweep.role=trial, method, adapter, precision, template, seed, trial_key, config_key,
config_label, variant (the spec's variant name, '' if none), trial_status (running|finished|failed) and, on failure, error. Params: the flattened TrialConfig.
Metrics: train/* per optimizer step, eval/* at the end. Artifacts: config.yaml, eval_items.parquet, adapter/.
Only the MlflowClient API is used (no fluent global state), so trials in one process never share a run.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import yaml

ROLE = "alignsweep.role"
_MAX_TAG = 4900  # MLflow tag values are capped at 5000 characters


def runs_dir() -> Path:
    return Path(os.environ.get("ALIGNSWEEP_RUNS", "runs")).resolve()


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set (a cluster's server), else a local SQLite store under ./runs."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    runs_dir().mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{runs_dir() / 'mlflow.db'}"


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(mlflow_client, name: str) -> str:
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if mlflow_client.tracking_uri.startswith("sqlite:"):
        # SQLite stores have no artifact server: keep artifacts beside the database, not in the cwd
        location = (Path(mlflow_client.tracking_uri.removeprefix("sqlite:///")).parent / "artifacts" / name).as_uri()
    return mlflow_client.create_experiment(name, artifact_location=location)


def finished_trial_keys(mlflow_client, experiment_id: str) -> set[str]:
    """Keys of trials that already finished in this experiment: a rerun skips them."""
    keys, token = set(), None
    while True:
        page = mlflow_client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{ROLE}` = 'trial' and tags.trial_status = 'finished' and attributes.status = 'FINISHED'",
            max_results=5000, page_token=token)
        keys.update(r.data.tags["trial_key"] for r in page)
        token = page.token
        if not token:
            return keys


def start_trial_run(mlflow_client, experiment_id: str, parent_run_id: str | None, cfg, label: str,
                    variant: str = "", execution: dict[str, str] | None = None) -> str:
    """The trial's child run; `execution` tags say how it ran (GPU share, warm worker), not what it is."""
    tags = {**(execution or {}), ROLE: "trial", "method": cfg.method, "adapter": cfg.adapter, "precision": cfg.precision,
            "template": cfg.template, "seed": str(cfg.seed), "trial_key": cfg.trial_key,
            "config_key": cfg.config_key, "config_label": label, "trial_status": "running",
            "variant": variant}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow_client.create_run(experiment_id, tags=tags, run_name=f"{label}|seed={cfg.seed}")
    run_id = run.info.run_id
    from mlflow.entities import Param

    params = [Param(k, str(v)[:6000]) for k, v in cfg.flat().items()]
    for i in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
        mlflow_client.log_batch(run_id, params=params[i:i + 100])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        mlflow_client.log_artifact(run_id, str(path))
    return run_id


def log_metrics(mlflow_client, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log numeric metrics at one step (NaN and non-numbers dropped)."""
    log_metric_rows(mlflow_client, run_id, [(step, int(time.time() * 1000), metrics)])


def log_metric_rows(mlflow_client, run_id: str, rows) -> None:
    """Log (step, timestamp ms, metrics) rows in as few requests as MLflow allows (1000 metrics each)."""
    from mlflow.entities import Metric

    batch = [Metric(k, float(v), ts, step) for step, ts, metrics in rows for k, v in metrics.items()
             if isinstance(v, (int, float)) and v == v]
    for i in range(0, len(batch), 1000):
        mlflow_client.log_batch(run_id, metrics=batch[i:i + 1000])


def set_tags(mlflow_client, run_id: str, tags: dict) -> None:
    """Several tags in one request, values as text capped at MLflow's limit."""
    from mlflow.entities import RunTag

    mlflow_client.log_batch(run_id, tags=[RunTag(k, str(v)[:_MAX_TAG]) for k, v in tags.items()])


def finish_trial_run(mlflow_client, run_id: str, eval_metrics: dict, items, adapter_dir: str | None, step: int):
    log_metrics(mlflow_client, run_id, eval_metrics, step)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "eval_items.parquet"
        items.to_parquet(path, index=False)
        mlflow_client.log_artifact(run_id, str(path))
    if adapter_dir:
        mlflow_client.log_artifacts(run_id, adapter_dir, artifact_path="adapter")
    mlflow_client.set_tag(run_id, "trial_status", "finished")
    mlflow_client.set_terminated(run_id, "FINISHED")


def fail_trial_run(mlflow_client, run_id: str, error: BaseException) -> None:
    mlflow_client.set_tag(run_id, "trial_status", "failed")
    mlflow_client.set_tag(run_id, "error", f"{type(error).__name__}: {error}"[:_MAX_TAG])
    mlflow_client.set_terminated(run_id, "FAILED")


def step_logger(mlflow_client, run_id: str, report=None, extra_metrics=None, report_every_s: float = 10.0,
                flush_every_s: float = 10.0):
    """A TrainerCallback that records every logging step for MLflow (train/*) and, at most every `report_every_s`,
    sends one to Ray Tune (its progress table). Steps are buffered and written in one MLflow batch at most every
    `flush_every_s`, when training ends, and on `flush()` (the trial calls it when an attempt fails, so nothing
    is lost). `report_wait_s`: the seconds spent in `report` (Ray Tune's blocks the trial until its controller
    takes the result). Why not per step, not even asynchronously: a write is ~5 ms of Python (SQLAlchemy over
    SQLite), and on MLflow's async thread it still takes that time from the training loop through the GIL; an 8B
    LoRA step at micro-batch 1 is bound by Python's kernel launches, so it showed in the step time."""
    from transformers import TrainerCallback

    class _StepLogger(TrainerCallback):
        def __init__(self):
            self.rows, self.last_flush, self.last_report = [], time.monotonic(), float("-inf")
            self.report_wait_s = 0.0

        def on_log(self, args, state, control, logs=None, **kwargs):
            metrics = {f"train/{k}": v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            if extra_metrics is not None:
                metrics.update(extra_metrics())
            self.rows.append((state.global_step, int(time.time() * 1000), metrics))
            now = time.monotonic()
            if now - self.last_flush >= flush_every_s:
                self.flush()
            if report is not None and now - self.last_report >= report_every_s:
                self.last_report = now
                asked = time.monotonic()  # not `now`: a flush may have run since
                report({**{k.replace("/", "_"): v for k, v in metrics.items()}, "step": state.global_step})
                self.report_wait_s += time.monotonic() - asked

        def flush(self):
            rows, self.rows, self.last_flush = self.rows, [], time.monotonic()
            if rows:
                log_metric_rows(mlflow_client, run_id, rows)

        def on_train_end(self, args, state, control, **kwargs):
            self.flush()

    return _StepLogger()
