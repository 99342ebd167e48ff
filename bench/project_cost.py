"""GPU-hours for the research's full study, projected from measured per-trial costs.

    # 1. On a GPU: short calibration trials, one per method x adapter x precision, at the cluster profile's
    #    settings (planned micro-batch, max length, evaluation), filed in MLflow (~1 min per 8B trial):
    python bench/project_cost.py calibrate --model /root/llama3-8b-random --precisions bf16 \
        --tokenizer embedded:smollm2-135m-instruct     # a real tokenizer for the random weights
    python bench/project_cost.py calibrate --model /root/llama3-8b-random --precisions nf4 --tokenizer ...
    # 2. Anywhere: project every trial of sweeps/multi_seed.py and sweeps/cita_fixes.py (profile lambda) and
    #    append the table to BENCHMARKS.md:
    python bench/project_cost.py project

Each calibrate call first runs a warm-up trial, filed apart: the process's cold start (CUDA, imports, tokenizing
the data) lands there, not on the first kind calibrated; the projection names it beside the total.
A trial's cost = setup + training's one-time part (entering the loop, the first step, the wrap-up) + (max_steps - 1)
x (seconds per later optimizer step) + held-out pairs x (seconds per pair scored) + generations x (seconds per
generation), each measured by the calibration trial of the same method, adapter and precision (MLflow metrics
time/setup_s, time/train_s, time/later_steps_s, time/eval_logps_s, time/eval_generate_s). The one-time part is
priced once because a short calibration run would otherwise spread it over every step. What the
calibration trained on (model, data) is printed with the projection: with a random-weights checkpoint and the
generated data, sequences are shorter than PKU-SafeRLHF's, so calibrate on the cluster with the real model
and `--data pku_saferlhf` for the projection that counts.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXPERIMENT = "cost-calibration"
WARMUP = "cost-calibration-warmup"  # each calibrate call's first trial: the process's cold start, priced apart
STUDIES = ("multi_seed", "cita_fixes")
RESEARCH_ESTIMATE_A100_H = 48.0


def study_trials(profile_name: str = "lambda"):
    """Every trial the research's study runs under a profile (both study scripts)."""
    import importlib

    from sweeps import profiles
    from sweeps.spec import Spec, expand

    profile = profiles.get(profile_name)
    trials = []
    for study in STUDIES:
        spec = Spec.load(importlib.import_module(f"sweeps.{study}").spec(profile))
        trials += expand(spec, profile.overrides, cuda=profile.cuda, step_scale=profile.step_scale)
    return profile, trials


def with_tokenizer(model_dir: str, tokenizer: str) -> str:
    """A view of a local checkpoint with another model's tokenizer: its weights and configs linked, the
    tokenizer saved beside them. For bench/'s random-weights 8B, whose word-level tokenizer turns real text into
    <unk> and fails generation's stop strings: a real BPE tokenizer gives real text its real length."""
    import hashlib
    import json
    import shutil

    from trainables.models import load_tokenizer

    src = Path(model_dir)
    tok, vocab = load_tokenizer(tokenizer), json.loads((src / "config.json").read_text())["vocab_size"]
    if len(tok) > vocab:
        raise SystemExit(f"--tokenizer {tokenizer}: {len(tok)} tokens, more than {model_dir}'s vocabulary ({vocab})")
    view = src.with_name(f"{src.name}+tokenizer-{hashlib.sha256(tokenizer.encode()).hexdigest()[:12]}")
    shutil.rmtree(view, ignore_errors=True)  # rebuilt each time: never a stale link or another tokenizer's file
    view.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors" or f.name in ("config.json", "generation_config.json",
                                                    "model.safetensors.index.json"):
            (view / f.name).symlink_to(f.absolute())
    tok.save_pretrained(view)
    return str(view)


def calibrate(model: str, precisions: list[str], steps: int, data: str, n_eval: int, n_generate: int,
              tracking_uri: str | None, profile_name: str = "lambda", tokenizer: str | None = None) -> None:
    import traceback

    from trainables import tracking
    from trainables.trial import free_memory, run_trial

    profile, trials = study_trials(profile_name)
    offered = sorted({t.config.precision for t in trials})
    if set(precisions) - set(offered):
        raise SystemExit(f"--precisions {' '.join(sorted(set(precisions) - set(offered)))}: the {profile.name} "
                         f"profile's study trains at {', '.join(offered)} only")
    if tokenizer:
        model = with_tokenizer(model, tokenizer)
    uri = tracking_uri or tracking.default_tracking_uri()
    client = tracking.client(uri)
    kinds = {}  # (method, adapter, precision) -> the calibration trial's config
    for t in trials:
        c = t.config
        if c.precision in precisions:
            kinds.setdefault((c.method, c.adapter, c.precision), c.model_dump(mode="json") | {
                "model": model, "data": data, "max_steps": steps, "n_eval": n_eval,
                "eval": c.eval.model_dump() | {"n_generate": n_generate}})
    # A warm-up trial first, filed apart: it pays this process's cold start (CUDA, imports, tokenizing the data
    # set, first-use kernels), which would otherwise inflate whichever kind came first (2026-11-23: sft-lora's
    # ~1,000 s per trial outside its steps against 440-610 s for the rest). A sweep's workers pay it once each.
    if not kinds:
        raise SystemExit(f"--precisions: none given; the {profile.name} profile's study trains at {', '.join(offered)}")
    first = next(iter(kinds.values()))  # same data split as the kinds (n_eval kept): its tokenized set is theirs
    todo = [("warm-up", WARMUP, first | {"max_steps": 2, "eval": first["eval"] | {"n_generate": 1}}),
            *(("/".join(kind), EXPERIMENT, cfg) for kind, cfg in kinds.items())]
    for label, experiment, cfg in todo:
        print(f"calibrating {label} on {model} ({cfg['max_steps']} steps)", flush=True)
        try:
            # as the profile trains (planned micro-batch, Liger's kernels), but without its shared reference cache:
            # its one-time pass over the whole training set would be priced into every trial's setup, so DPO/CITA
            # steps are priced with their reference forward (~27% of the planned 8B step) instead
            run_trial(cfg, label, uri, tracking.ensure_experiment(client, experiment), gpu_share=profile.gpus_per_trial,
                      plan_micro_batch=profile.plan_micro_batch, liger_kernel=profile.liger_kernel)
        except Exception:  # noqa: BLE001 - one failed kind must not lose the others
            print("  failed:", "".join(traceback.format_exc(limit=-4)), flush=True)
        free_memory()  # a failed trial's model is garbage only now that its traceback is gone


def rates(tracking_uri: str | None) -> dict[tuple, dict]:
    """Per (method, adapter, precision), from its newest finished calibration run (older calibrations may be of
    another model or carry a cold start): seconds per step, per pair scored, per generation, setup."""
    from trainables import tracking

    client = tracking.client(tracking_uri or tracking.default_tracking_uri())
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        raise SystemExit(f"no MLflow experiment {EXPERIMENT!r}: run `python bench/project_cost.py calibrate` first")
    newest: dict[tuple, object] = {}
    for r in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=5000,
                                order_by=["attributes.start_time DESC"]):
        newest.setdefault((r.data.tags["method"], r.data.tags["adapter"], r.data.tags["precision"]), r)
    out = {}
    for kind, run in newest.items():
        m, p = run.data.metrics, run.data.params
        train_once, step = training_split(m, int(p["max_steps"]))
        out[kind] = {
            "train_once_s": train_once, "step_s": step,
            "pair_s": m["time/eval_logps_s"] / max(m["eval/n_items"], 1),
            "generation_s": m["time/eval_generate_s"] / m["eval/n_generated"] if m["eval/n_generated"] else 0.0,
            "setup_s": m["time/setup_s"],
            "model": p["model"], "data": p["data"], "device": run.data.tags.get("device", ""),
            "micro_batch": run.data.tags.get("exec_micro_batch", p["micro_batch"]),
            "gradient_checkpointing": run.data.tags.get("exec_gradient_checkpointing",
                                                        p["gradient_checkpointing"].lower())}
    return out


def cold_start_s(tracking_uri: str | None) -> float | None:
    """Seconds of the newest calibration warm-up trial (a process's first: its cold start); None if none."""
    from trainables import tracking

    client = tracking.client(tracking_uri or tracking.default_tracking_uri())
    exp = client.get_experiment_by_name(WARMUP)
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=1,
                              order_by=["attributes.start_time DESC"]) if exp else []
    return runs[0].data.metrics["eval/trial_seconds"] if runs else None


def training_split(metrics: dict, max_steps: int) -> tuple[float, float]:
    """A calibration run's training time as (what it costs once: entering the loop, the first step with its
    first-use costs, the wrap-up; seconds per later step): calibration runs are short, a study's trials are not.
    A run without the step clock's time/later_steps_s (older ones) counts every step at its average."""
    train = metrics["time/train_s"]
    if "time/later_steps_s" not in metrics or max_steps < 2:
        return train / max_steps, train / max_steps
    return train - metrics["time/later_steps_s"], metrics["time/later_steps_s"] / (max_steps - 1)


def trial_seconds(cfg, rate: dict) -> float:
    return (rate["setup_s"] + rate["train_once_s"] + (cfg.max_steps - 1) * rate["step_s"] + cfg.n_eval * rate["pair_s"]
            + min(cfg.eval.n_generate, cfg.n_eval) * rate["generation_s"])


def project(tracking_uri: str | None, bench_file: str, profile_name: str = "lambda") -> str:
    profile, trials = study_trials(profile_name)
    measured = rates(tracking_uri)
    missing = sorted({(t.config.method, t.config.adapter, t.config.precision) for t in trials} - set(measured))
    if missing:
        raise SystemExit(f"no calibration for {missing}: run `calibrate` with those precisions")
    rows, total = {}, 0.0
    for t in trials:
        kind = (t.config.study, t.config.method, t.config.adapter, t.config.precision, t.config.max_steps)
        seconds = trial_seconds(t.config, measured[kind[1:4]])
        n, s = rows.get(kind, (0, 0.0))
        rows[kind] = (n + 1, s + seconds)
        total += seconds * profile.gpus_per_trial
    hours = total / 3600
    any_rate = next(iter(measured.values()))
    lines = [f"\n## Projected cost of the full study — bench/project_cost.py — {datetime.date.today()}",
             f"Calibration: MLflow experiment `{EXPERIMENT}` on {any_rate['device']}, model `{any_rate['model']}`, "
             f"data `{any_rate['data']}`; "
             f"profile {profile.name} settings ({profile.gpus_per_trial} GPU per trial, planned micro-batch: "
             f"{profile.plan_micro_batch}). Per trial: setup + training's one-time part + later steps x s/step + pairs x s/pair + generations x s/generation.",
             "", "| study | method | adapter | precision | steps | trials | s/step | micro-batch (checkpointing) | GPU-h |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (study, method, adapter, precision, steps), (n, seconds) in sorted(rows.items()):
        r = measured[(method, adapter, precision)]
        lines.append(f"| {study} | {method} | {adapter} | {precision} | {steps} | {n} | {r['step_s']:.2f} | "
                     f"{r['micro_batch']} ({r['gradient_checkpointing']}) | "
                     f"{seconds * profile.gpus_per_trial / 3600:.2f} |")
    lines += ["", f"- **{len(trials)} trials: {hours:.1f} GPU-hours** on the calibration GPU, against the research's "
              f"estimate of {RESEARCH_ESTIMATE_A100_H:.0f} A100-hours (a different GPU: compare with care)."]
    cold = cold_start_s(tracking_uri)
    if cold is not None:
        lines.append(f"- Not in the total: a worker's cold start, paid once at its first trial (the warm-up trial: "
                     f"{cold:.0f} s with its short training and evaluation).")
    lines.append("")
    from grit_speed import publish

    text = "\n".join(lines)
    publish(text, bench_file)
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    cal = sub.add_parser("calibrate", help="run one short trial per method x adapter x precision (GPU)")
    cal.add_argument("--model", required=True, help="model id or local checkpoint (e.g. random 8B weights)")
    cal.add_argument("--precisions", nargs="+", default=["bf16", "nf4"])
    cal.add_argument("--steps", type=int, default=12)
    cal.add_argument("--data", default="generated", help="'generated', 'pku_saferlhf' or a local PKU copy")
    cal.add_argument("--n-eval", type=int, default=64)
    cal.add_argument("--n-generate", type=int, default=16)
    cal.add_argument("--tokenizer", default=None, help="another model's tokenizer for a local checkpoint (e.g. "
                     "embedded:smollm2-135m-instruct for bench/'s random 8B, whose word-level one fails on real "
                     "text); default: the checkpoint's own")
    for p in (cal, sub.add_parser("project", help="project the study's GPU-hours from the calibration")):
        p.add_argument("--tracking-uri", default=None)
        p.add_argument("--profile", default="lambda")
    ap.add_argument("--bench-file", default="BENCHMARKS.md")
    a = ap.parse_args()
    if a.command == "calibrate":
        calibrate(a.model, a.precisions, a.steps, a.data, a.n_eval, a.n_generate, a.tracking_uri, a.profile,
                  a.tokenizer)
    else:
        project(a.tracking_uri, a.bench_file, a.profile)


if __name__ == "__main__":
    main()
