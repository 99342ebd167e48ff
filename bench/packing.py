"""Trials per hour of the multi-seed study on one or more GPUs: one trial per GPU vs trials packed by memory.

    python bench/packing.py --mode per-gpu packed --seeds 1 --packed-seeds 3          # one H100, one call
    python bench/packing.py --mode packed --gpus 1 2 --packed-seeds 3                 # 2 x H200: scaling

Each (mode, GPU count) runs the study's trials (profile local on a GPU: SmolLM2, bf16 and nf4, all methods and
adapters) as a sweep of its own, in a fresh local Ray with `--cpus-per-gpu` CPUs and the given GPUs, into its
own MLflow experiment, and measures: wall time, finished trials per hour, per-trial seconds, the time from
trial start to the end of the first optimizer step on fresh and on warm (reused) workers, and the GPU's memory
and utilization (nvidia-smi, once a second).
- per-gpu: every trial gets a whole GPU (Ray GPU = 1), as a sweep without packing would run.
- packed: the profile's packing, each trial's GPU share sized by the memory planner (trainables/memory.py).
Ratios are computed between rows of one results file (`--results`, JSON lines; rows accumulate across calls,
so a comparison too long for one call can span two calls on the same warm machine: the table names the
machine of every row). Appends a section to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _sample_gpu(stop: threading.Event, samples: list):
    while not stop.is_set():
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout.split("\n")
        except FileNotFoundError:  # no NVIDIA driver: nothing to sample
            return
        rows = [line.split(",") for line in out if line.count(",") == 1]
        if rows:  # all GPUs together: memory summed, utilization averaged
            samples.append((sum(float(m) for m, _ in rows), sum(float(u) for _, u in rows) / len(rows)))
        stop.wait(1.0)


def _median(values):
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def run_mode(mode: str, gpus: int, seeds: list[int], cpus_per_gpu: int, overrides: list[str]) -> dict:
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
    if mode == "per-gpu":
        profile = dataclasses.replace(profile, gpus_per_trial=1, pack_by_memory=False)
    spec = Spec.load(multi_seed.spec(profile))
    spec.study = f"bench-packing-{mode}-{gpus}gpu-{time.strftime('%Y%m%d-%H%M%S')}"
    spec.seeds = seeds
    apply_overrides(spec, overrides)

    ray.shutdown()
    ray.init(address="local", num_cpus=cpus_per_gpu * gpus, num_gpus=gpus, include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    samples, stop = [], threading.Event()
    threading.Thread(target=_sample_gpu, args=(stop, samples), daemon=True).start()
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
    first_step = lambda warm: [r.data.metrics.get("time/to_first_step_s", float("nan")) for r in done  # noqa: E731
                               if r.data.tags.get("warm_worker") == warm]
    return {
        "mode": mode, "gpus": gpus, "cpus": cpus_per_gpu * gpus, "trials": len(runs), "finished": len(done),
        "wall_s": wall, "trials_per_hour": 3600 * len(done) / wall,
        "trial_s_median": _median([r.data.metrics.get("eval/trial_seconds", float("nan")) for r in done]),
        # where a packed trial's extra time goes: per-phase medians (trainables.trial's time/* metrics)
        "phase_s_median": {p: _median([r.data.metrics.get(f"time/{p}_s", float("nan")) for r in done])
                           for p in ("setup", "train", "eval")},
        "first_step_s_cold": _median(first_step("false")), "first_step_s_warm": _median(first_step("true")),
        "warm_trials": len(first_step("true")),
        "peak_gib_trial_max": max((r.data.metrics.get("sys/peak_gpu_mem_gib", 0) for r in done), default=float("nan")),
        "gpu_mem_peak_mib": max((s[0] for s in samples), default=float("nan")),
        "gpu_util_mean": statistics.mean(s[1] for s in samples) if samples else float("nan"),
        "gpu_shares": sorted({r.data.tags.get("gpu_share", "?") for r in runs}),
        "seeds": seeds, "overrides": overrides, "date": str(datetime.date.today()),
        "machine": f"{torch.cuda.get_device_name(0)} x{gpus}, {platform.node()}",
    }


def section(rows: list[dict], command: str) -> str:
    def find(mode, gpus):
        return next((r for r in reversed(rows) if r["mode"] == mode and r["gpus"] == gpus), None)

    lines = [f"\n## GPU packing and scaling — bench/packing.py — {datetime.date.today()}",
             f"`{command}`: the multi-seed study, profile local on a GPU (SmolLM2, bf16 + nf4); each row is its own "
             "sweep in a fresh local Ray with the CPUs and GPUs shown.", "",
             "| mode | GPUs | CPUs | trials (finished) | wall s | trials/h | trial s (median) | setup / train / eval s "
             "(medians) | first step s cold / warm (n warm) | GPU share per trial | GPU mem peak MiB | GPU util % | machine |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['gpus']} | {r['cpus']} | {r['trials']} ({r['finished']}) | {r['wall_s']:.0f} | "
                     f"{r['trials_per_hour']:.0f} | {r['trial_s_median']:.1f} | "
                     f"{' / '.join(f'{v:.1f}' for v in r.get('phase_s_median', {}).values()) or 'n/a'} | "
                     f"{r['first_step_s_cold']:.1f} / "
                     f"{r['first_step_s_warm']:.1f} ({r['warm_trials']}) | {', '.join(r['gpu_shares'])} | {r['gpu_mem_peak_mib']:.0f} | "
                     f"{r['gpu_util_mean']:.0f} | {r['machine']} |")
    ratios = []
    per_gpu, packed1, packed2 = find("per-gpu", 1), find("packed", 1), find("packed", 2)
    if per_gpu and packed1:
        x = packed1["trials_per_hour"] / per_gpu["trials_per_hour"]
        ratios.append(f"- packed vs one trial per GPU (1 GPU): **{x:.2f}x** trials/hour (target >= 6): "
                      f"{'PASS' if x >= 6 else 'FAIL'}")
    if packed1 and packed2:
        x = packed2["trials_per_hour"] / packed1["trials_per_hour"]
        ratios.append(f"- 2 GPUs vs 1 (packed): **{x:.2f}x** trials/hour (target >= 1.9): {'PASS' if x >= 1.9 else 'FAIL'}")
    warm = [r["first_step_s_warm"] for r in rows if r["warm_trials"]]
    if warm:
        ratios.append(f"- trial start -> end of first optimizer step on a warm worker: median {min(warm):.1f}-"
                      f"{max(warm):.1f} s across rows (target <= 5 s): {'PASS' if max(warm) <= 5 else 'FAIL'}")
    return "\n".join([*lines, "", *ratios, ""])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", nargs="+", choices=["per-gpu", "packed"], default=["per-gpu", "packed"])
    ap.add_argument("--gpus", type=int, nargs="+", default=[1], help="GPU counts to run each mode on")
    ap.add_argument("--seeds", type=int, default=1, help="seeds (x GPUs) for per-gpu mode: 12 trials per seed")
    ap.add_argument("--packed-seeds", type=int, default=3, help="seeds (x GPUs) for packed mode")
    ap.add_argument("--cpus-per-gpu", type=int, default=16, help="Ray CPUs per GPU in use (one node's share)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--results", default="runs/bench_packing.jsonl", help="JSON lines: rows accumulate across calls")
    ap.add_argument("--bench-file", default="BENCHMARKS.md")
    a = ap.parse_args()
    results = Path(a.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    for gpus in a.gpus:
        for mode in a.mode:
            n = (a.seeds if mode == "per-gpu" else a.packed_seeds) * gpus
            row = run_mode(mode, gpus, list(range(1, n + 1)), a.cpus_per_gpu, a.overrides)
            print(json.dumps(row), flush=True)
            with results.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    text = section(rows, "python bench/packing.py " + " ".join(sys.argv[1:]))
    print(text)
    with open(a.bench_file, "a") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
