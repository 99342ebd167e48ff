"""Where a trial's start -> first optimizer step goes, on one warm worker: trials run one after another in this
process (as a reused Ray worker runs them), each kind --repeat times (2), optionally profiled (--profile). Each
trial loads its base model unless --reuse-base-model (the profiles' sweeps reuse it: trainables/warm_model.py).

    python bench/first_step.py                                   # local profile's kinds (SmolLM2 on a GPU)
    python bench/first_step.py --kinds dpo-lora-bf16 cita-lora-bf16 --repeat 3
    python bench/first_step.py --threads 1                       # torch threads as in a Ray trial of 1 CPU
    python bench/first_step.py --in-thread                       # a thread per trial, as Ray Tune runs it
    python bench/first_step.py --as-sweep --repeat 1             # whole trials (evaluation, generations)
    python bench/first_step.py --reuse-base-model                # a kind's later trials on the model kept

Each trial is a real `run_trial` (MLflow run in a temporary store, the local profile's config of the multi-seed
study, a few steps, no generations; with --as-sweep the profile's steps, evaluation and generations, every trial
at --seed). Per trial: the step clock (trainables.trial._step_clock: before the first
step, the first step itself, to the end of it) and whether this process had run the kind before (warm_kind).
With --profile, a cProfile of trial start -> end of the first step is printed for every trial whose first step
took longer than --profile-over seconds: the functions by cumulative and by own time (on a GPU a Python call
that waits for the device shows the wait as its own time). Appends a table to --bench-file.
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import functools
import io
import platform
import pstats
import queue
import statistics
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def kind_configs(steps: int | None, n_eval: int, model: str | None = None,
                 seed: int | None = None) -> dict[str, dict]:
    """One config per method-adapter-precision of the multi-seed study under the local profile (what the
    packing benchmark's trials train), shortened to `steps` steps, `n_eval` pairs and no generations (steps None:
    as the sweep runs them, evaluation and generations included); `model` and `seed` replace the profile's."""
    from packing import local_kinds

    short = {} if steps is None else {"max_steps": steps, "n_eval": n_eval}
    return {kind: c.model_dump(mode="json") | short
            | ({"eval": c.eval.model_dump() | {"n_generate": 0}} if short else {})
            | ({"model": model} if model else {}) | ({"seed": seed} if seed is not None else {})
            for kind, c in local_kinds().items()}


def _stats(profiler: cProfile.Profile, sort: str, lines: int) -> str:
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(sort).print_stats(lines)
    text = out.getvalue()
    return text[text.find("   ncalls"):]  # the table, without pstats' preamble


def run(kinds: list[str], repeat: int, steps: int | None, n_eval: int, profile: bool = False,
        profile_over: float = 3.0, model: str | None = None, threads: int | None = None, in_thread: bool = False,
        seed: int | None = None, reuse_base_model: bool = False) -> list[dict]:
    from grit_speed import callback

    from trainables import tracking
    from trainables.trial import run_trial

    def disable_after_step_1(state):
        if state.global_step == 1:
            profiler.disable()

    configs = kind_configs(steps, n_eval, model, seed)
    unknown = sorted(set(kinds) - set(configs))
    if unknown:
        raise SystemExit(f"--kinds {' '.join(unknown)}: allowed values: {', '.join(configs)}")
    rows = []
    with tempfile.TemporaryDirectory() as store:
        uri = f"sqlite:///{store}/mlflow.db"
        client = tracking.client(uri)
        experiment = tracking.ensure_experiment(client, "first-step")
        for kind in kinds:
            for i in range(repeat):
                profiler = cProfile.Profile() if profile else None  # it slows Python-heavy setup: only if asked
                if profiler:
                    profiler.enable()
                try:
                    trial = functools.partial(run_trial, configs[kind], f"{kind}#{i}", uri, experiment,
                                              threads=threads, reuse_base_model=reuse_base_model,
                                              callbacks=[callback(on_step_end=disable_after_step_1)]
                                              if profiler else [])
                    m = in_a_thread_as_ray_runs_it(trial) if in_thread else trial()
                finally:
                    if profiler:
                        profiler.disable()
                run = client.search_runs([experiment], order_by=["attributes.start_time DESC"], max_results=1)[0]
                row = {"kind": kind, "i": i, "seed": configs[kind]["seed"],
                       "warm_kind": run.data.tags.get("warm_kind"),
                       "base_model": run.data.tags.get("base_model"),
                       "setup_s": m["time/setup_s"], "before_s": m["time/before_first_step_s"],
                       "step1_s": m["time/first_step_s"], "step1_cpu_s": m["time/first_step_cpu_s"],
                       "step1_gc_s": m["time/first_step_gc_s"],
                       "to_first_s": m["time/to_first_step_s"],
                       "later_step_s": m.get("time/later_step_s", float("nan"))}
                rows.append(row)
                print(f"{kind} #{i} (warm_kind={row['warm_kind']}, base model {row['base_model']}): "
                      f"setup {row['setup_s']:.2f} s, before step 1 "
                      f"{row['before_s']:.2f} s, step 1 {row['step1_s']:.2f} s ({row['step1_cpu_s']:.2f} s CPU, "
                      f"{row['step1_gc_s']:.2f} s GC), "
                      f"to end of step 1 {row['to_first_s']:.2f} s; later steps {row['later_step_s']:.3f} s each",
                      flush=True)
                if profiler and row["to_first_s"] > profile_over:
                    print(_stats(profiler, "cumulative", 30), _stats(profiler, "tottime", 15), sep="\n", flush=True)
    return rows


def in_a_thread_as_ray_runs_it(trial) -> dict:
    """Run `trial(report=...)` in a new thread, as a reused Ray Tune worker runs each trial
    (ray/train/_internal/session.py), its reports handed to this (main) thread, the trial's thread blocked until
    one is taken. Tune's controller takes a report only at its next train() call, later than here: this is the
    thread without the controller's wait. (The step clock stops before the first report, in on_log after step 1.)"""
    results, taken, out = queue.Queue(1), threading.Semaphore(0), {}

    def report(metrics):
        results.put(metrics)
        taken.acquire()

    def target():
        try:
            out["metrics"] = trial(report=report)
        except BaseException as err:  # re-raised in the main thread
            out["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    while thread.is_alive():
        try:
            results.get(timeout=0.1)
            taken.release()
        except queue.Empty:
            pass
    if "error" in out:
        raise out["error"]
    return out["metrics"]


def section(rows: list[dict], command: str, machine: str) -> str:
    lines = [f"\n## Trial start -> first step on one warm worker — bench/first_step.py — {datetime.date.today()}",
             f"`{command}` on {machine}, seed {rows[0]['seed'] if rows else '?'}: trials one after another in one "
             "process (a reused worker); "
             "warm kind = this process ran the method-adapter-precision before.", "",
             "| kind | # | warm kind | base model | setup s | before step 1 s | step 1 s (thread CPU s; GC s) | "
             "to end of step 1 s | later step s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['i']} | {r['warm_kind']} | {r.get('base_model')} | {r['setup_s']:.2f} | "
                     f"{r['before_s']:.2f} | "
                     f"{r['step1_s']:.2f} ({r['step1_cpu_s']:.2f}; {r['step1_gc_s']:.2f}) | {r['to_first_s']:.2f} | "
                     f"{r['later_step_s']:.3f} |")
    warm = [r["to_first_s"] for r in rows[1:]]  # every trial after the process's first runs on a warm worker
    if warm:
        seen = [r["to_first_s"] for r in rows[1:] if r["warm_kind"] == "true"]
        lines += ["", f"- warm worker, trial start -> end of step 1: median {statistics.median(warm):.2f} s, max "
                  f"{max(warm):.2f} s (n={len(warm)}; target <= 5 s: {'PASS' if max(warm) <= 5 else 'FAIL'}); "
                  f"kind seen before: median {statistics.median(seen) if seen else float('nan'):.2f} s"]
    return "\n".join([*lines, ""])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", nargs="+", default=None, help="method-adapter-precision names (default: all the "
                    "local profile's, e.g. sft-lora-bf16 dpo-grit-nf4)")
    ap.add_argument("--repeat", type=int, default=2, help="trials of each kind, one after another")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per trial")
    ap.add_argument("--as-sweep", action="store_true", help="each trial as the sweep runs it (the profile's steps, "
                    "held-out pairs and generations; not --steps/--n-eval): does a whole previous trial (its "
                    "evaluation, its generations) slow the next trial's first step, as in a Ray sweep?")
    ap.add_argument("--n-eval", type=int, default=8, help="held-out pairs each trial scores (no generations)")
    ap.add_argument("--model", default=None, help="model id or local checkpoint (default: the local profile's)")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the slow trials' start")
    ap.add_argument("--profile-over", type=float, default=3.0, help="seconds to the first step above which a "
                    "trial's profile is printed")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per trial, as a Ray worker sets them "
                    "(the local GPU profile: 1 CPU per trial, so 1); default: torch's own")
    ap.add_argument("--in-thread", action="store_true", help="each trial in a new thread, its reports handed to "
                    "the main thread, as a Ray Tune worker runs it (without Tune's controller's wait); not with "
                    "--profile (cProfile sees one thread before Python 3.12, every thread mixed from it); to "
                    "profile step 1 here, set $ALIGNSWEEP_PROFILE_STEP1 (trainables/trial.py)")
    ap.add_argument("--seed", type=int, default=1, help="every trial's seed, which sets its batches: 1, as the "
                    "first trial of each kind in bench/packing.py's sweeps (the profile's own is 42)")
    ap.add_argument("--reuse-base-model", action="store_true", help="a kind's later trials train on the base model "
                    "the trial before left (trainables/warm_model.py), as the profiles' sweeps run")
    ap.add_argument("--bench-file", default=None, help="append the table here (e.g. BENCHMARKS.md)")
    a = ap.parse_args()
    if a.in_thread and a.profile:
        ap.error("--in-thread and --profile: cProfile sees only the thread it started in; choose one")
    import torch

    steps = None if a.as_sweep else a.steps
    kinds = a.kinds or list(kind_configs(steps, a.n_eval))
    rows = run(kinds, a.repeat, steps, a.n_eval, a.profile, a.profile_over, a.model,
               a.threads, a.in_thread, a.seed, a.reuse_base_model)
    machine = (f"{torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CPU") + f", {platform.node()}"
    from grit_speed import publish

    publish(section(rows, "python bench/first_step.py " + " ".join(sys.argv[1:]), machine), a.bench_file)


if __name__ == "__main__":
    main()
