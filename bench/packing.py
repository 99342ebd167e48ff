"""Trials per hour of the multi-seed study on one or more GPUs: one trial per GPU vs trials packed by memory.

    python bench/packing.py --mode per-gpu packed --seeds 1 --packed-seeds 3          # one H100, one call
    python bench/packing.py --mode packed --gpus 1 2 1 2 --packed-seeds 3             # 2 x H200: scaling
    python bench/packing.py --mode per-gpu packed packed-mps                          # also packed under MPS
    python bench/packing.py --scaling 1 4 8 16 --mps both                             # training only, no Ray

Each (mode, GPU count) runs the study's trials (profile local on a GPU: SmolLM2, bf16 and nf4, all methods and
adapters) as a sweep of its own, in a fresh local Ray with `--cpus-per-gpu` CPUs and the given GPUs, into its
own MLflow experiment, and measures: wall time, finished trials per hour, per-trial seconds, the time from
trial start to the end of the first optimizer step on fresh and on warm (reused) workers, and the GPU's memory
and utilization (nvidia-smi, once a second).
- per-gpu: every trial gets a whole GPU (Ray GPU = 1), as a sweep without packing would run.
- packed: the profile's packing, each trial's GPU share sized by the memory planner (trainables/memory.py).
- per-gpu-new-thread: per-gpu with each trial in the new thread Ray Tune starts for it
  ($ALIGNSWEEP_THREAD_PER_TRIAL=1), as sweeps ran before the lasting trial thread (sweeps/runner.py _TrialThread):
  the control for what that thread saves in a warm trial's first step.
- packed-mps: the same under NVIDIA's Multi-Process Service (a private control daemon this script starts and
  stops), which lets the kernels of the packed trials' processes run concurrently instead of time-sliced.
- packed-cudnn, packed-no-reuse: packed as the local profile ran before it turned cuDNN's attention off, and before
  a warm worker's trials reused its base model (trainables/warm_model.py): the controls for those changes.
--scaling N...: where packing loses time, without Ray or evaluation: N processes train the same trial's config at
once on GPU 0 (after a common start barrier); aggregate optimizer steps/s against one process alone.
Ratios are computed between the latest rows of one results file (`--results`, JSON lines; rows accumulate
across calls, so a comparison too long for one call can span two calls on the same warm machine: the table
names the machine of every row). Counts may repeat (`--gpus 1 2 1 2`): the first sweep on a fresh machine
carries its cold start, and the latest row of each count is the one rated. Appends a section to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import tempfile
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _sample_gpu(stop: threading.Event, samples: list, gpus: int):
    """Memory and utilization of the `gpus` GPUs the sweep uses (Ray's GPU ids 0..gpus-1), once a second: a 1-GPU
    row on a 2-GPU host must not average the idle GPU in."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # nvidia-smi counts every GPU; Ray's ids index this list
    ids = ",".join(visible.split(",")[:gpus] if visible else (str(i) for i in range(gpus)))
    while not stop.is_set():
        try:
            out = subprocess.run(["nvidia-smi", f"--id={ids}", "--query-gpu=memory.used,utilization.gpu",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout.split("\n")
        except FileNotFoundError:  # no NVIDIA driver: nothing to sample
            return
        rows = [line.split(",") for line in out if line.count(",") == 1]
        if rows:  # all GPUs together: memory summed, utilization averaged
            samples.append((sum(float(m) for m, _ in rows), sum(float(u) for _, u in rows) / len(rows)))
        stop.wait(1.0)


def _median(values):
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


@contextlib.contextmanager
def mps_daemon(enabled: bool = True):
    """NVIDIA MPS for the processes started inside (they inherit the pipe directory): a private control daemon,
    quit on exit. Changes no GPU setting (compute mode, clocks, MIG stay as they are)."""
    if not enabled:
        yield
        return
    root = Path(tempfile.mkdtemp(prefix="alignsweep-mps-"))
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(root / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(root / "log")}
    for d in env.values():
        Path(d).mkdir()
    try:
        subprocess.run(["nvidia-cuda-mps-control", "-d"], env={**os.environ, **env}, check=True, timeout=30)
    except FileNotFoundError:
        raise SystemExit("MPS: nvidia-cuda-mps-control not found (it comes with the NVIDIA driver's utilities)") from None
    try:
        with mock.patch.dict(os.environ, env):
            yield
    finally:
        # The daemon quits once its last client exits; this process is one too if it touched CUDA (sizing the
        # packing does), so don't wait for it (a blocking quit timed out after 60 s on 2026-11-23): it goes when
        # this process does, so run packed-mps last. Its temporary directory stays (the pipes live there).
        quit_ = subprocess.Popen(["nvidia-cuda-mps-control"], stdin=subprocess.PIPE, text=True)
        quit_.stdin.write("quit\n")
        quit_.stdin.close()


def run_mode(mode: str, gpus: int, seeds: list[int], cpus_per_gpu: int, overrides: list[str]) -> dict:
    new_thread = {"ALIGNSWEEP_THREAD_PER_TRIAL": "1" if mode == "per-gpu-new-thread" else "0"}
    with mps_daemon(mode == "packed-mps"), mock.patch.dict(os.environ, new_thread):  # Ray's workers inherit it
        return _run_mode(mode, gpus, seeds, cpus_per_gpu, overrides)


def _run_mode(mode: str, gpus: int, seeds: list[int], cpus_per_gpu: int, overrides: list[str]) -> dict:
    import ray
    import torch

    from sweeps import multi_seed, profiles
    from sweeps.cli import apply_overrides
    from sweeps.runner import run_sweep
    from sweeps.spec import Spec
    from trainables import tracking

    profile = profiles.get("local")
    if not profile.cuda:
        raise SystemExit("bench/packing.py measures GPU packing: no CUDA GPU here")
    if mode.startswith("per-gpu"):
        profile = dataclasses.replace(profile, gpus_per_trial=1, pack_by_memory=False)
    if mode == "packed-cudnn":  # the control: the local profile runs SDPA without cuDNN since 2026-11-24
        profile = dataclasses.replace(profile, cudnn_attention=True)
    if mode == "packed-no-reuse":  # the control: a warm worker's trials reuse its base model since 2026-11-24
        profile = dataclasses.replace(profile, reuse_base_model=False)
    spec = Spec.load(multi_seed.spec(profile))
    spec.study = f"bench-packing-{mode}-{gpus}gpu-{time.strftime('%Y%m%d-%H%M%S')}"
    spec.seeds = seeds
    apply_overrides(spec, overrides)

    ray.shutdown()
    ray.init(address="local", num_cpus=cpus_per_gpu * gpus, num_gpus=gpus, include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    samples, stop = [], threading.Event()
    threading.Thread(target=_sample_gpu, args=(stop, samples, gpus), daemon=True).start()
    started = time.time()
    try:
        result = run_sweep(spec, profile)
    finally:
        wall = time.time() - started
        stop.set()
        ray.shutdown()

    client = tracking.client(result.tracking_uri)
    runs = [r for r in client.search_runs([result.experiment_id], max_results=5000)
            if r.data.tags.get(tracking.ROLE) == "trial"]
    done = [r for r in runs if r.info.status == "FINISHED"]

    def values(metric, **tags):  # the finished trials' values of a metric, of those with these tag values
        return [r.data.metrics.get(metric, float("nan")) for r in done
                if all(r.data.tags.get(k) == v for k, v in tags.items())]

    return {
        "mode": mode, "gpus": gpus, "cpus": cpus_per_gpu * gpus, "trials": len(runs), "finished": len(done),
        "wall_s": wall, "trials_per_hour": 3600 * len(done) / wall,
        "trial_s_median": _median(values("eval/trial_seconds")),
        # where a packed trial's extra time goes: per-phase medians (trainables.trial's time/* metrics)
        "phase_s_median": {p: _median(values(f"time/{p}_s")) for p in ("setup", "train", "eval")},
        "first_step_s_cold": _median(values("time/to_first_step_s", warm_worker="false")),
        "first_step_s_warm": _median(values("time/to_first_step_s", warm_worker="true")),
        "warm_trials": len(values("time/to_first_step_s", warm_worker="true")),
        # where a warm trial's first-step time goes: everything before the first step, then the step itself
        "warm_before_step1_s": _median(values("time/before_first_step_s", warm_worker="true")),
        "warm_step1_s": _median(values("time/first_step_s", warm_worker="true")),
        # warm trials on the base model their worker kept (trainables/warm_model.py) against those that loaded it
        "warm_before_step1_s_by_base_model": {how: _median(values("time/before_first_step_s", warm_worker="true",
                                                                  base_model=how)) for how in ("reused", "loaded")},
        "warm_trials_by_base_model": {how: len(values("time/before_first_step_s", warm_worker="true", base_model=how))
                                      for how in ("reused", "loaded")},
        "warm_step1_cpu_s": _median(values("time/first_step_cpu_s", warm_worker="true")),  # waited or worked
        "warm_step1_gc_s": _median(values("time/first_step_gc_s", warm_worker="true")),  # collections in step 1
        # each warm trial's step 1, in start order: label, worker pid, its trial number there; before step 1, step
        # 1, its thread CPU, its GC (s); step 1's cudaMalloc calls
        "warm_step1_by_trial": [[r.data.tags.get(k, "?") for k in ("mlflow.runName", "worker_pid", "worker_trial")]
                                + [round(r.data.metrics.get(m, float("nan")), 3) for m in (
                                    "time/before_first_step_s", "time/first_step_s", "time/first_step_cpu_s",
                                    "time/first_step_gc_s", "sys/first_step_cuda_mallocs")]
                                for r in sorted(done, key=lambda r: r.info.start_time)
                                if r.data.tags.get("warm_worker") == "true"],
        # a later step (to set beside bench/first_step.py's, alone) and Tune's blocking progress reports
        "later_step_s_median": _median(values("time/later_step_s")),
        "report_wait_s_median": _median(values("time/report_wait_s")),
        # warm workers, split by whether the process already ran this kind of trial (first-use costs)
        "warm_first_step_s_by_kind": {seen: _median(values("time/to_first_step_s", warm_worker="true", warm_kind=seen))
                                      for seen in ("true", "false")},
        "peak_gib_trial_max": max((r.data.metrics.get("sys/peak_gpu_mem_gib", 0) for r in done), default=float("nan")),
        "gpu_mem_peak_mib": max((s[0] for s in samples), default=float("nan")),
        "gpu_util_mean": statistics.mean(s[1] for s in samples) if samples else float("nan"),
        "gpu_shares": sorted({r.data.tags.get("gpu_share", "?") for r in runs}),
        "seeds": seeds, "overrides": overrides, "profile_pad_to_multiple_of": profile.pad_to_multiple_of,
        "date": str(datetime.date.today()),
        "machine": f"{torch.cuda.get_device_name(0)} x{gpus}, {platform.node()}",
    }


def section(rows: list[dict], command: str) -> str:
    nan = float("nan")  # rows written before a column existed
    # what is rated: the latest row of each mode and GPU count, as the study runs it (no --set)
    latest = {(r["mode"], r["gpus"]): r for r in rows if not r.get("overrides")}

    lines = [f"\n## GPU packing and scaling — bench/packing.py — {datetime.date.today()}",
             f"`{command}`: the multi-seed study, profile local on a GPU (SmolLM2, bf16 + nf4); each row is its own "
             "sweep in a fresh local Ray with the CPUs and GPUs shown.", "",
             "| mode | GPUs | CPUs | trials (finished) | wall s | trials/h | trial s (median) | setup / train / eval s "
             "(medians) | first step s cold / warm (n warm) | warm: before / in step 1 s (thread CPU; GC) | warm, kind seen / new s | later step s / "
             "report wait s per trial (medians) | GPU share per trial | GPU mem peak MiB | GPU util % | machine |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mode = f"{r['mode']} ({', '.join(r['overrides'])})" if r.get("overrides") else r["mode"]
        lines.append(f"| {mode} | {r['gpus']} | {r['cpus']} | {r['trials']} ({r['finished']}) | {r['wall_s']:.0f} | "
                     f"{r['trials_per_hour']:.0f} | {r['trial_s_median']:.1f} | "
                     f"{' / '.join(f'{v:.1f}' for v in r.get('phase_s_median', {}).values()) or 'n/a'} | "
                     f"{r['first_step_s_cold']:.1f} / "
                     f"{r['first_step_s_warm']:.1f} ({r['warm_trials']}) | {r.get('warm_before_step1_s', nan):.1f} / "
                     f"{r.get('warm_step1_s', nan):.1f} ({r.get('warm_step1_cpu_s', nan):.1f}; "
                     f"{r.get('warm_step1_gc_s', nan):.2f}) | "
                     f"{' / '.join(f'{v:.1f}' for v in r.get('warm_first_step_s_by_kind', {}).values()) or 'n/a'} | "
                     f"{r.get('later_step_s_median', nan):.3f} / {r.get('report_wait_s_median', nan):.2f} | "
                     f"{', '.join(r['gpu_shares'])} | {r['gpu_mem_peak_mib']:.0f} | "
                     f"{r['gpu_util_mean']:.0f} | {r['machine']} |")
    ratios = []
    per_gpu = latest.get(("per-gpu", 1))
    for mode in ("packed", "packed-mps", "packed-cudnn", "packed-no-reuse"):
        one, two = latest.get((mode, 1)), latest.get((mode, 2))
        if per_gpu and one:
            x = one["trials_per_hour"] / per_gpu["trials_per_hour"]
            ratios.append(f"- {mode} vs one trial per GPU (1 GPU): **{x:.2f}x** trials/hour (target >= 6): "
                          f"{'PASS' if x >= 6 else 'FAIL'}")
        if one and two:
            x = two["trials_per_hour"] / one["trials_per_hour"]
            ratios.append(f"- 2 GPUs vs 1 ({mode}): **{x:.2f}x** trials/hour (target >= 1.9): "
                          f"{'PASS' if x >= 1.9 else 'FAIL'}")
    for r in rows:
        if r.get("warm_trials_by_base_model"):
            n, s = r["warm_trials_by_base_model"], r["warm_before_step1_s_by_base_model"]
            mode = f"{r['mode']} ({', '.join(r['overrides'])})" if r.get("overrides") else r["mode"]
            ratios.append(f"- {mode}, {r['gpus']} GPU: warm trials' time before step 1, median: on the base "
                          f"model their worker kept {s['reused']:.1f} s ({n['reused']}), loaded {s['loaded']:.1f} s "
                          f"({n['loaded']})")
    # the control (Tune's thread per trial) is not how sweeps run
    warm = [r["first_step_s_warm"] for r in latest.values() if r["warm_trials"] and r["mode"] != "per-gpu-new-thread"]
    if warm:
        ratios.append(f"- trial start -> end of first optimizer step on a warm worker: median {min(warm):.1f}-"
                      f"{max(warm):.1f} s across rows (target <= 5 s): {'PASS' if max(warm) <= 5 else 'FAIL'}")
    return "\n".join([*lines, "", *ratios, ""])


# --- scaling: N processes training at once on one GPU, no Ray, no evaluation ---------------------------------
def local_kinds() -> dict:
    """The local GPU profile's multi-seed trials, one per kind: "method-adapter-precision" -> TrialConfig (first
    seed). Also bench/first_step.py's trials."""
    from sweeps import multi_seed, profiles
    from sweeps.spec import Spec, expand

    profile = profiles.get("local")
    kinds = {}
    for t in expand(Spec.load(multi_seed.spec(profile)), profile.overrides, cuda=profile.cuda,
                    step_scale=profile.step_scale):
        kinds.setdefault(f"{t.config.method}-{t.config.adapter}-{t.config.precision}", t.config)
    return kinds


def local_trial_config(case: str):
    kinds = local_kinds()
    if case not in kinds:
        raise SystemExit(f"--case {case}: not a trial of the local profile's study; allowed values: {', '.join(kinds)}")
    return kinds[case]


def scaling_worker(case: str, steps: int, rank: int, barrier: Path) -> None:
    """One process of a scaling row: build the trainer, wait at the barrier, train, print per-step end times."""
    import torch
    from grit_speed import callback

    from trainables import trial

    torch.set_num_threads(1)  # as a packed trial (1 Ray CPU each)
    cfg = local_trial_config(case)
    cfg = cfg.model_copy(update={"max_steps": steps, "seed": cfg.seed + rank})
    ends = []
    with tempfile.TemporaryDirectory() as workdir:
        trainer, _, _ = trial.prepare(cfg, workdir, [callback(on_step_end=lambda _: ends.append(time.perf_counter()))])
        (barrier / f"ready-{rank}").touch()
        while not (barrier / "go").exists():
            time.sleep(0.01)
        start = time.perf_counter()
        trainer.train()
    print("RESULT " + json.dumps({"rank": rank, "start": start, "ends": ends}), flush=True)


def run_scaling(n: int, mps: bool, case: str, steps: int, warmup: int) -> dict:
    """n processes train `case` at once on GPU 0; each one's median seconds per optimizer step after `warmup`
    steps (the first interval timed ends at step warmup + 2)."""
    import torch

    if steps < warmup + 2:
        raise SystemExit(f"--steps {steps}: at least {warmup + 2} (the first {warmup + 1} are not timed)")

    with mps_daemon(mps), tempfile.TemporaryDirectory() as tmp:
        barrier = Path(tmp)
        procs = [subprocess.Popen([sys.executable, __file__, "--scaling-worker", str(rank), "--barrier", tmp,
                                   "--case", case, "--steps", str(steps)], stdout=subprocess.PIPE, text=True)
                 for rank in range(n)]
        deadline = time.time() + 600
        while len(list(barrier.glob("ready-*"))) < n:
            if any(p.poll() not in (None, 0) for p in procs) or time.time() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"scaling n={n}: a worker failed or timed out before training")
            time.sleep(0.1)
        (barrier / "go").touch()
        try:
            outs = [p.communicate(timeout=max(1.0, deadline - time.time()))[0] for p in procs]
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise RuntimeError(f"scaling n={n}: workers still training after 600 s") from None
    runs = [json.loads(line[7:]) for out in outs for line in out.splitlines() if line.startswith("RESULT ")]
    if len(runs) != n:
        raise RuntimeError(f"scaling n={n}: {len(runs)} of {n} workers finished")
    step_s = [statistics.median(b - a for a, b in zip(r["ends"][warmup:], r["ends"][warmup + 1:])) for r in runs]
    wall = max(r["ends"][-1] for r in runs) - min(r["start"] for r in runs)
    return {"n": n, "mps": mps, "case": case, "steps": steps, "step_s_median": statistics.median(step_s),
            "step_s_max": max(step_s), "steps_per_s": sum(1 / s for s in step_s), "train_wall_s": wall,
            "date": str(datetime.date.today()), "machine": f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}, "
                       f"{os.cpu_count()} CPUs"}


def scaling_section(rows: list[dict], command: str) -> str:
    lines = [f"\n## Packing without Ray: N processes training at once on one GPU — bench/packing.py — "
             f"{datetime.date.today()}",
             f"`{command}`: each process trains the local GPU profile's trial (one CPU thread, as a packed trial); "
             "steps/s is the sum over processes of 1 / (median seconds per optimizer step); speed-up is against "
             "one process alone, with and without MPS as run.", "",
             "| case | processes | MPS | s/step median (slowest process) | aggregate steps/s | speed-up vs 1 | "
             "train wall s | machine |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        one = next((o for o in rows if o["n"] == 1 and o["case"] == r["case"] and o["mps"] == r["mps"]), None) \
            or next((o for o in rows if o["n"] == 1 and o["case"] == r["case"]), None)
        speed = f"{r['steps_per_s'] / one['steps_per_s']:.2f}x" if one else "n/a"
        lines.append(f"| {r['case']} | {r['n']} | {'yes' if r['mps'] else 'no'} | {r['step_s_median']:.3f} "
                     f"({r['step_s_max']:.3f}) | {r['steps_per_s']:.1f} | {speed} | {r['train_wall_s']:.1f} | "
                     f"{r['machine']} |")
    return "\n".join([*lines, ""])


def command_line() -> str:
    return "python bench/packing.py " + " ".join(sys.argv[1:])


def main():
    from grit_speed import publish

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", nargs="+",
                    choices=["per-gpu", "per-gpu-new-thread", "packed", "packed-mps", "packed-cudnn",
                             "packed-no-reuse"],
                    default=["per-gpu", "packed"])
    ap.add_argument("--scaling", type=int, nargs="+", metavar="N",
                    help="instead of sweeps: N processes training at once (no Ray), for each N given")
    ap.add_argument("--mps", choices=["off", "on", "both"], default="both", help="--scaling: with MPS, without, both")
    ap.add_argument("--case", default="sft-lora-bf16", help="--scaling: METHOD-ADAPTER-PRECISION of the local study")
    ap.add_argument("--steps", type=int, default=40, help="--scaling: optimizer steps per process (first 6 untimed)")
    ap.add_argument("--scaling-worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--barrier", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--gpus", type=int, nargs="+", default=[1], help="GPU counts to run each mode on")
    ap.add_argument("--seeds", type=int, default=1, help="seeds (x GPUs) for per-gpu mode: 12 trials per seed")
    ap.add_argument("--packed-seeds", type=int, default=3, help="seeds (x GPUs) for packed mode")
    ap.add_argument("--cpus-per-gpu", type=int, default=16, help="Ray CPUs per GPU in use (one node's share)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--results", default="runs/bench_packing.jsonl", help="JSON lines: rows accumulate across calls")
    ap.add_argument("--bench-file", default="BENCHMARKS.md")
    ap.add_argument("--profile-step1", default=None, metavar="DIR", help="profile every trial's step 1 into "
                    "DIR/MODE-Ngpu/ (trainables/trial.py's $ALIGNSWEEP_PROFILE_STEP1); bench/step1_profiles.py "
                    "compares them")
    a = ap.parse_args()
    if a.scaling_worker is not None:
        return scaling_worker(a.case, a.steps, a.scaling_worker, Path(a.barrier))
    results = Path(a.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    if a.scaling:
        rows = []
        for mps in {"off": [False], "on": [True], "both": [False, True]}[a.mps]:
            for n in a.scaling:
                rows.append(run_scaling(n, mps, a.case, a.steps, warmup=5))
                print(json.dumps(rows[-1]), flush=True)
        return publish(scaling_section(rows, command_line()), a.bench_file)
    for gpus in a.gpus:
        for mode in a.mode:
            n = (a.seeds if mode.startswith("per-gpu") else a.packed_seeds) * gpus
            if a.profile_step1:  # Ray's local workers inherit the driver's environment
                os.environ["ALIGNSWEEP_PROFILE_STEP1"] = str(Path(a.profile_step1).resolve() / f"{mode}-{gpus}gpu")
            row = run_mode(mode, gpus, list(range(1, n + 1)), a.cpus_per_gpu, a.overrides)
            print(json.dumps(row), flush=True)
            with results.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    publish(section(rows, command_line()), a.bench_file)



if __name__ == "__main__":
    main()
