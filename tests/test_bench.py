"""Benchmark scripts: stopped runs still report what finished; the statistics and the cost projection they rest on."""
from __future__ import annotations

import json
import math
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # the scripts import each other as top-level modules


def test_grit_speed_stopped_by_sigterm_writes_the_finished_cases(tmp_path):
    out = tmp_path / "bench.md"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "grit_speed.py"), "--tiny", "--cases", "sft-bf16", "dpo-bf16",
         "--warmup", "50", "--steps", "4", "--block", "1", "--bench-file", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    log = []
    try:
        for line in proc.stdout:  # stop it as `timeout` would, once the first case is measured
            log.append(line)
            if "dpo-bf16 ..." in line:
                proc.send_signal(signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    log.append(rest)
    rows = [r for r in out.read_text().splitlines() if r.startswith("| ")]
    assert any(r.startswith("| sft-bf16 | research defaults |") and r.rstrip().endswith(("pass |", "FAIL |"))
               for r in rows), "".join(log)
    assert any(r.startswith("| dpo-bf16 |") and "interrupted (signal 15)" in r for r in rows), rows


def _tvt():
    import trainable_vs_trl
    return trainable_vs_trl


def test_abba_alternates_blocks_symmetrically():
    assert _tvt().abba("bare", "trainable", 2, 4, 1) == [
        ("bare", 2), ("trainable", 2),  # warmup, then ABBA, then one untimed final step each
        ("bare", 1), ("trainable", 1), ("trainable", 1), ("bare", 1),
        ("bare", 1), ("trainable", 1), ("trainable", 1), ("bare", 1),
        ("bare", 1), ("trainable", 1)]


def test_ratio_ci_is_of_the_ratio_of_means_not_the_biased_mean_of_ratios():
    import random

    ratio_ci = _tvt().ratio_ci
    lo, hi = ratio_ci([1.0, 2.0, 4.0], [1.1, 2.2, 4.4])
    assert abs(lo - 1.1) < 1e-9 and abs(hi - 1.1) < 1e-9
    # A/A with heavy, launch-bound-like noise: both sides drawn alike. The mean of per-round ratios sits well
    # above 1 (Jensen); the interval of the ratio of means must still contain 1.
    rng = random.Random(0)
    a = [0.5 * rng.lognormvariate(0, 0.4) for _ in range(200)]
    b = [0.5 * rng.lognormvariate(0, 0.4) for _ in range(200)]
    assert sum(y / x for x, y in zip(a, b)) / len(a) > 1.1
    lo, hi = ratio_ci(a, b)
    assert lo < 1.0 < hi


def test_project_cost_calibrates_each_kind_once_and_projects_every_trial(runs, tiny_model, tmp_path):
    """The cost projection end to end on the CPU profile: one calibration trial per method x adapter x precision,
    then every trial of both study scripts priced from those rates."""
    import project_cost

    profile, trials = project_cost.study_trials("local")  # fp32 on a CPU (bf16 + nf4 where CUDA is)
    kinds = {(t.config.method, t.config.adapter, t.config.precision) for t in trials}
    from trainables import tracking

    client = tracking.client(runs)  # an older calibration (another model, a cold start): not read
    old = client.create_run(tracking.ensure_experiment(client, project_cost.EXPERIMENT), start_time=1,
                            tags={"method": "sft", "adapter": "lora", "precision": "fp32"})
    client.log_metric(old.info.run_id, "time/setup_s", 1e6)
    client.set_terminated(old.info.run_id)
    project_cost.calibrate("tiny-random", sorted({k[2] for k in kinds}), steps=2, data="generated", n_eval=4,
                           n_generate=1, tracking_uri=runs, profile_name="local")
    measured = project_cost.rates(runs)
    assert measured[("sft", "lora", "fp32")]["setup_s"] < 1e6
    assert set(measured) == kinds
    # the warm-up trial (the process's cold start) is filed apart
    assert len(client.search_runs([client.get_experiment_by_name(project_cost.WARMUP).experiment_id])) == 1
    assert all(r["step_s"] > 0 and r["setup_s"] > 0 and r["train_once_s"] > 0 for r in measured.values())
    # one calibration run per kind: its one-time part plus its later steps are its whole training time
    for run in client.search_runs([client.get_experiment_by_name(project_cost.EXPERIMENT).experiment_id],
                                  f"attributes.run_id != '{old.info.run_id}'"):
        m, r = run.data.metrics, measured[tuple(run.data.tags[k] for k in ("method", "adapter", "precision"))]
        assert r["train_once_s"] + r["step_s"] * (int(run.data.params["max_steps"]) - 1) == pytest.approx(
            m["time/train_s"])
    text = project_cost.project(runs, str(tmp_path / "bench.md"), "local")
    rows = [r.split(" | ") for r in text.splitlines() if r.startswith("| ") and r[2:4] not in ("st", "--")]
    assert sum(int(r[5]) for r in rows) == len(trials)
    assert f"**{len(trials)} trials:" in text and (tmp_path / "bench.md").read_text() == text
    assert f"(the warm-up trial: {project_cost.cold_start_s(runs):.0f} s" in text
    with pytest.raises(SystemExit, match="--precisions int8: the local profile's study trains at .* only"):
        project_cost.calibrate("tiny-random", ["int8", *sorted({k[2] for k in kinds})], 2, "generated", 4, 1, runs,
                               "local")


def test_project_cost_calibrates_as_the_profile_trains(runs, monkeypatch):
    """Calibration trials run at the profile's planned micro-batch and with its Liger kernels (the lambda profile's
    8B trials), one per kind after the warm-up."""
    import project_cost

    from trainables import trial

    calls = []
    monkeypatch.setattr(trial, "run_trial", lambda cfg, label, *a, **kw: calls.append((label, kw)))
    project_cost.calibrate("tiny-random", ["bf16"], steps=2, data="generated", n_eval=4, n_generate=1,
                           tracking_uri=runs, profile_name="lambda")
    assert calls[0][0] == "warm-up" and len(calls) == 1 + 6  # sft/dpo/cita x lora/grit at bf16
    assert all(kw["plan_micro_batch"] and kw["liger_kernel"] and kw["gpu_share"] == 1 for _, kw in calls)


def test_project_cost_prices_training_once_costs_apart_from_the_later_steps():
    from types import SimpleNamespace

    import project_cost

    cfg = SimpleNamespace(max_steps=10, n_eval=20, eval=SimpleNamespace(n_generate=4))
    rate = {"setup_s": 1.0, "train_once_s": 5.0, "step_s": 0.5, "pair_s": 0.1, "generation_s": 2.0}
    assert project_cost.trial_seconds(cfg, rate) == pytest.approx(1 + 5 + 9 * 0.5 + 20 * 0.1 + 4 * 2)
    cfg.eval.n_generate = 50  # generations come from held-out items: at most n_eval of them
    assert project_cost.trial_seconds(cfg, rate) == pytest.approx(1 + 5 + 9 * 0.5 + 20 * 0.1 + 20 * 2)
    # a calibration without the step clock (older runs): every step at the average rate
    once, step = project_cost.training_split({"time/train_s": 5.0}, max_steps=10)
    assert project_cost.trial_seconds(cfg, dict(rate, train_once_s=once, step_s=step)) == pytest.approx(
        1 + 10 * 0.5 + 2 + 40)


def test_packing_section_compares_rows_of_one_results_file():
    import packing

    row = dict(mode="per-gpu", gpus=1, cpus=16, trials=12, finished=12, wall_s=540.0, trials_per_hour=80.0,
               trial_s_median=45.0, phase_s_median={"setup": 1.0, "train": 30.0, "eval": 12.0},
               first_step_s_cold=9.0, first_step_s_warm=2.5, warm_trials=11, gpu_shares=["1"],
               gpu_mem_peak_mib=3000.0, gpu_util_mean=20.0, machine="H100")
    packed = dict(row, mode="packed", trials=36, finished=36, trials_per_hour=520.0, first_step_s_warm=6.0,
                  phase_s_median={"setup": 2.0, "train": 60.0, "eval": 25.0})
    text = packing.section([row, dict(row, trials_per_hour=1.0, mode="packed", gpus=2), packed], "cmd")
    assert "| packed | 1 | 16 | 36 (36) |" in text and "| 2.0 / 60.0 / 25.0 |" in text
    assert "**6.50x** trials/hour (target >= 6): PASS" in text  # 520 / 80, the latest packed 1-GPU row
    assert "**0.00x** trials/hour (target >= 1.9): FAIL" in text  # 2 GPUs (1/h) vs 1 (520/h)
    assert "median 2.5-6.0 s across rows (target <= 5 s): FAIL" in text


def test_packing_samples_only_the_gpus_the_sweep_uses(tmp_path, monkeypatch):
    """A 1-GPU row on a 2-GPU host must not average the idle GPU's utilization in (2026-11-24: 31% read for ~62%)."""
    import threading

    import packing

    fake = tmp_path / "nvidia-smi"  # answers like nvidia-smi for two GPUs unless --id narrows it, and logs its args
    fake.write_text('#!/bin/sh\necho "$@" >> "$0.args"\ncase "$*" in *--id=0\\ *) echo "100, 60";; '
                    '*) printf "100, 60\\n4, 0\\n";; esac\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{__import__('os').environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    samples, stop = [], threading.Event()
    sampler = threading.Thread(target=packing._sample_gpu, args=(stop, samples, 1), daemon=True)
    sampler.start()
    for _ in range(200):  # up to 10 s for the first sample
        if samples or not sampler.is_alive():
            break
        stop.wait(0.05)
    stop.set()
    sampler.join(timeout=5)
    assert samples and samples[0] == (100.0, 60.0)
    assert "--id=0 " in (tmp_path / "nvidia-smi.args").read_text()


def test_packing_section_rates_packed_and_packed_mps_each_against_per_gpu():
    import packing

    row = dict(mode="per-gpu", gpus=1, cpus=16, trials=12, finished=12, wall_s=540.0, trials_per_hour=80.0,
               trial_s_median=45.0, phase_s_median={}, first_step_s_cold=9.0, first_step_s_warm=2.5,
               warm_trials=0, gpu_shares=["1"], gpu_mem_peak_mib=3000.0, gpu_util_mean=20.0, machine="H100")
    text = packing.section([row, dict(row, mode="packed-mps", trials_per_hour=400.0),
                            dict(row, mode="packed", trials_per_hour=160.0)], "cmd")
    assert "- packed-mps vs one trial per GPU (1 GPU): **5.00x** trials/hour (target >= 6): FAIL" in text
    assert "- packed vs one trial per GPU (1 GPU): **2.00x** trials/hour (target >= 6): FAIL" in text


def test_packing_scaling_trains_in_worker_processes_and_rates_against_one():
    """--scaling end to end on the CPU (one process, MPS off: the GPU parts need a GPU); the section's speed-up
    is each row's aggregate steps/s over the one-process row of the same MPS setting."""
    import packing

    row = packing.run_scaling(1, False, "sft-lora-fp32", steps=7, warmup=5)
    assert row["n"] == 1 and row["step_s_median"] > 0 and row["steps_per_s"] == 1 / row["step_s_median"]
    text = packing.scaling_section([dict(row, steps_per_s=2.0), dict(row, n=4, steps_per_s=5.0),
                                    dict(row, n=1, mps=True, steps_per_s=1.0),
                                    dict(row, n=4, mps=True, steps_per_s=6.0)], "cmd")
    assert "| sft-lora-fp32 | 4 | no |" in text and "| 2.50x |" in text
    assert "| sft-lora-fp32 | 4 | yes |" in text and "| 6.00x |" in text


def _side(mean, median, blocks, peak=1.0):
    return {"mean": mean, "median": median, "n": len(blocks), "peak": peak, "error": None, "blocks": blocks}


def test_report_puts_the_aa_pair_in_the_real_pairs_places():
    """The A/A row reads like the real one: bare-b (built second, bare's place) in the bare column, bare-a (built
    first, the trainable's place) in the trainable column, ratio a/b; the note's CI is of the same ratio."""
    import argparse

    tvt = _tvt()
    a = argparse.Namespace(cases=["dpo-fp32"], seq=64, micro_batch=1, grad_accum=1, block=1, steps=3, warmup=0,
                           control=True, shape="tiny", swap=False)
    base, other = _side(1.0, 1.0, [1.0, 1.0, 1.0]), _side(1.1, 1.1, [1.1, 1.1, 1.1])
    res = {"bare": _side(2.0, 2.0, [2.0] * 3), "trainable": _side(2.2, 2.2, [2.2] * 3), "estimate": 0.1,
           "control": {"bare-a": other, "bare-b": base},
           "notes": [tvt.ratio_note("A/A bare-a/bare-b", base, other)]}
    text = tvt.report({"dpo-fp32": res}, a)
    assert "| dpo-fp32: A/A control | 1.000 / 1.000 | 1.100 / 1.100 | 1.100 / 1.100 | noise floor" in text
    assert "A/A bare-a/bare-b: per-block-pair ratio 1.100..1.100 over 3 pairs; ratio of means, 95% " \
           "paired-bootstrap CI 1.100..1.100" in text
    assert "| dpo-fp32 | 2.000 / 2.000 | 2.200 / 2.200 | 1.100 / 1.100 | FAIL" in text


def test_both_orders_cancel_a_build_order_bias_that_one_order_reads_as_a_difference():
    """A side built first runs 8% slower whatever its code: order 1 reads r*1.08, order 2 r/1.08. The geometric mean
    gives r back exactly (an arithmetic mean of the two ratios would read r*1.003); the A/A pair reads 1."""
    import random

    tvt = _tvt()
    rng = random.Random(0)
    r, bias = 1.01, 1.08
    base1 = [0.7 * rng.lognormvariate(0, 0.05) for _ in range(30)]
    base2 = [0.7 * rng.lognormvariate(0, 0.05) for _ in range(30)]

    def side(blocks):
        return _side(sum(blocks) / len(blocks), sorted(blocks)[len(blocks) // 2], blocks)

    order1 = side(base1), side([x * r * bias for x in base1])  # the trainable built first: slowed
    order2 = side(base2), side([x * r / bias for x in base2])  # bare built first: bare slowed
    both = tvt.both_orders(order1, order2)
    assert abs(both["mean"] - r) < 1e-9 and abs(both["median"] - r) < 1e-9
    assert both["ci"][0] <= r <= both["ci"][1]
    assert order1[1]["mean"] / order1[0]["mean"] > 1.08  # one order alone reads the bias as a difference
    aa = tvt.both_orders((side(base1), side([x * bias for x in base1])), (side(base2), side([x / bias for x in base2])))
    assert abs(aa["mean"] - 1) < 1e-9


def test_swapped_report_gives_the_verdict_on_both_orders_only():
    import argparse

    tvt = _tvt()
    a = argparse.Namespace(cases=["sft-fp32"], seq=64, micro_batch=1, grad_accum=1, block=1, steps=3, warmup=0,
                           control=False, shape="tiny", swap=True)
    order1 = {"bare": _side(1.0, 1.0, [1.0] * 3), "trainable": _side(1.1, 1.1, [1.1] * 3), "estimate": 1.0, "notes": []}
    order2 = {"bare": _side(1.1, 1.1, [1.1] * 3), "trainable": _side(1.0, 1.0, [1.0] * 3), "estimate": 1.0, "notes": []}
    text = tvt.report({"sft-fp32": {**order1, "swapped": order2}}, a)
    rows = [r for r in text.splitlines() if r.startswith("| sft-fp32") or r.startswith("| **sft-fp32")]
    assert len(rows) == 3, rows
    assert rows[0].startswith("| sft-fp32, trainable built first | 1.000 / 1.000 | 1.100 / 1.100 | 1.100 / 1.100 | "
                              "one order (see both)")
    assert rows[1].startswith("| sft-fp32, bare built first | 1.100 / 1.100 | 1.000 / 1.000 | 0.909 / 0.909 | "
                              "one order")
    assert rows[2].startswith("| **sft-fp32, both orders** (geometric mean) | | | 1.000 / 1.000 | **pass**")


def test_the_control_takes_the_real_pairs_build_order_and_places_in_both_orders(monkeypatch):
    """bare-a stands where the trainable stood (built first, opening second when not swapped; the reverse when
    swapped), bare-b where bare stood."""
    import argparse
    import types

    tvt = _tvt()
    scheduled = []

    class Recorder:
        def __init__(self, sides, blocks):
            scheduled.append(blocks)

        def run(self):
            pass

    monkeypatch.setattr(tvt, "Interleaver", Recorder)
    trainer = types.SimpleNamespace(accelerator=types.SimpleNamespace(free_memory=lambda: None))
    a = argparse.Namespace(warmup=1, steps=2, swap=True)
    for swapped, built_first, opens in ((False, "bare-a", "bare-b"), (True, "bare-b", "bare-a")):
        built = []

        def add_bare(sides, name):
            built.append(name)
            sides[name] = tvt.Side(name, trainer)

        tvt.run_control({"notes": []}, "dpo-fp32", add_bare, a, 4, 1, swapped)
        assert built[0] == built_first and sorted(built) == ["bare-a", "bare-b"]
        assert scheduled[-1][0] == (opens, 1)
    real_build, real_schedule = tvt.places(False)
    assert (real_build[0], real_schedule[0]) == ("trainable", "bare")  # what the control mirrors
    assert tvt.places(True) == (real_build[::-1], real_schedule[::-1])


def test_a_side_that_failed_gets_no_both_orders_verdict():
    tvt = _tvt()
    ok = {"bare": _side(1.0, 1.0, [1.0] * 3), "trainable": _side(1.0, 1.0, [1.0] * 3)}
    broken = {"bare": _side(1.0, 1.0, [1.0] * 3), "trainable": {**_side(1.4, 1.4, [1.4] * 3), "error": "boom"}}
    assert tvt.combined({**ok, "swapped": ok})["mean"] == 1.0
    assert tvt.combined({**ok, "swapped": broken}) is None
    assert tvt.combined_rows("sft-fp32", {**ok, "swapped": broken}) == [
        "| sft-fp32, both orders | | | - | not measured in full in both orders | | | | |"]
    short = {"bare": _side(1.0, 1.0, [1.0] * 2), "trainable": _side(1.1, 1.1, [1.1] * 2)}
    assert tvt.combined({**short, "swapped": short})["ci"] is None  # too few pairs for an interval


def test_a_time_limit_in_the_swapped_order_keeps_the_first_order(monkeypatch):
    import argparse

    tvt = _tvt()
    first = {"bare": _side(1.0, 1.0, [1.0]), "trainable": _side(1.0, 1.0, [1.0]), "notes": []}

    def run_order(case, env, a, swapped):
        if swapped:
            raise tvt.Interrupted("signal 15")
        return first

    monkeypatch.setattr(tvt, "run_order", run_order)
    res = tvt.run_case("sft-fp32", None, argparse.Namespace(swap=True))
    assert res["bare"] is first["bare"] and res["swapped"]["error"] == "interrupted (signal 15)"
    assert isinstance(res["interrupted"], tvt.Interrupted)  # main() reports what finished, then stops


def test_a_failed_or_interrupted_aa_control_keeps_the_real_comparison():
    import argparse

    tvt = _tvt()
    a = argparse.Namespace(warmup=0, steps=2, swap=False)

    def stopped(sides, name):
        raise tvt.Interrupted("signal 15")

    def broken(sides, name):
        raise RuntimeError("no memory")

    res = {"bare": _side(1.0, 1.0, [1.0]), "notes": []}
    tvt.run_control(res, "dpo-bf16", broken, a, 2, 1)
    assert res["notes"] == ["A/A control failed: RuntimeError: no memory"] and "control" not in res
    tvt.run_control(res, "dpo-bf16", stopped, a, 2, 1)
    assert res["notes"][-1] == "A/A control stopped by the time limit (signal 15)"
    assert isinstance(res["interrupted"], tvt.Interrupted) and "bare" in res


def test_trainable_vs_trl_runs_end_to_end_with_the_aa_control(tmp_path):
    """The whole script on the CPU (tiny Llama): both pairs interleave in both build orders (--swap), the table has
    the real and the A/A rows of each order and their combination, and CITA points to DPO's control instead of
    repeating it. --times keeps every side's timed steps, taken apart."""
    out, times = tmp_path / "bench.md", tmp_path / "times.jsonl"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "trainable_vs_trl.py"), "--tiny", "--cases", "dpo-fp32", "cita-fp32",
         "--steps", "2", "--block", "1", "--warmup", "1", "--control", "--swap", "--bench-file", str(out),
         "--times", str(times)],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    rows = [r for r in text.splitlines() if r.startswith("| ")]
    for order in ("trainable built first", "bare built first"):
        assert f"dpo-fp32: both trainers built, {order}" in proc.stdout
        assert any(r.startswith(f"| dpo-fp32, {order} | ") for r in rows)
        assert any(r.startswith(f"| cita-fp32 (bare: DPOTrainer), {order} | ") for r in rows)
        assert any(r.startswith(f"| dpo-fp32: A/A control, {order} | ") and "noise floor" in r for r in rows)
        assert f"- dpo-fp32: {order}: A/A bare-a/bare-b:" in text
    assert any(r.startswith("| **dpo-fp32, both orders**") for r in rows)
    assert any(r.startswith("| dpo-fp32: A/A control, both orders | ") for r in rows)
    assert not any(r.startswith("| cita-fp32: A/A") for r in rows)
    assert text.count("- cita-fp32: A/A control: see dpo-fp32") == 1
    lines = [json.loads(x) for x in times.read_text().splitlines()]
    assert [x["case"] for x in lines] == ["dpo-fp32", "cita-fp32"]
    dpo = lines[0]["orders"]
    assert set(dpo) == {"trainable built first", "bare built first"}
    for sides in dpo.values():
        assert set(sides) == {"trainable", "bare", "A/A bare-a", "A/A bare-b"}
        for r in sides.values():
            assert len(r["wall"]) == len(r["cpu"]) == len(r["gc"]) == 2
            assert all(0 < c <= w * 1.5 for c, w in zip(r["cpu"], r["wall"]))  # the side's own thread, not others
    assert "trainable: thread CPU " in text and " ms/step (max " in text


def test_planner_profile_mode_profiles_the_planned_steps_and_writes_no_table(tmp_path):
    """--planner --profile-steps: the trainable alone at the plan, the profiled window's steps timed and summed by
    kernel group (none on a CPU), and nothing appended to the bench file."""
    out = tmp_path / "bench.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "trainable_vs_trl.py"), "--tiny", "--planner", "--cases", "sft-fp32",
         "--profile-steps", "2", "--bench-file", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sft-fp32 profile: 2 steps in " in proc.stdout and "aten::" in proc.stdout
    assert "bare" not in proc.stdout.split("sft-fp32 ...")[1].split("profile:")[0]  # no bare TRL side built
    assert not out.exists()


def test_kernels_are_grouped_by_their_names():
    tvt = _tvt()
    names = {"sm90_xmma_gemm_bf16bf16_bf16f32": "matmul", "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT": "matmul",
             "pytorch_flash::flash_fwd_kernel": "attention", "void at::native::vectorized_elementwise_kernel<4>":
             "elementwise", "void at::native::reduce_kernel<512, 1>": "reduction / norm",
             "Memcpy DtoD (Device -> Device)": "copy / cast", "_swiglu_backward_kernel": "Liger (Triton)",
             "_triton_rope": "Liger (Triton)", "_rms_norm_forward_kernel": "Liger (Triton)",
             "void at::native::distribution_elementwise_grid_stride_kernel<normal>": "elementwise",
             "void (anonymous namespace)::indexSelectLargeIndex": "other"}
    assert {name: tvt.kernel_group(name) for name in names} == names


def test_first_step_times_trials_of_one_process_and_profiles_the_slow_ones(tiny_model, capsys, monkeypatch):
    """bench/first_step.py: trials one after another in this process; the second of a kind is a warm kind, the
    step clock adds up, and --profile prints the cProfile of a trial slower than the threshold."""
    import first_step

    from trainables import trial

    monkeypatch.setattr(trial, "_kinds_in_this_process", set())  # earlier tests ran this kind in this process

    rows = first_step.run(["sft-lora-fp32"], repeat=2, steps=2, n_eval=2, profile=True, profile_over=0.0,
                          model="tiny-random")
    assert [r["warm_kind"] for r in rows] == ["false", "true"]
    for r in rows:
        assert r["before_s"] + r["step1_s"] == pytest.approx(r["to_first_s"]) and r["later_step_s"] > 0
        assert 0 < r["step1_cpu_s"]
    assert first_step.kind_configs(2, 2, "tiny-random", seed=5)["sft-lora-fp32"]["seed"] == 5  # --seed
    from packing import local_kinds

    as_sweep = first_step.kind_configs(None, 2, "tiny-random")["sft-lora-fp32"]  # --as-sweep: the profile's own
    profile_cfg = local_kinds()["sft-lora-fp32"]
    assert (as_sweep["max_steps"], as_sweep["n_eval"], as_sweep["eval"]["n_generate"]) == (
        profile_cfg.max_steps, profile_cfg.n_eval, profile_cfg.eval.n_generate) and profile_cfg.eval.n_generate > 0
    assert capsys.readouterr().out.count("run_trial") >= 2  # a profile per trial, each with the trial's frames
    first_step.run(["sft-lora-fp32"], repeat=1, steps=2, n_eval=2, profile=False, model="tiny-random")
    assert "ncalls" not in capsys.readouterr().out  # not profiled unless asked: cProfile slows the setup it times
    text = first_step.section(rows, "cmd", "CPU")
    assert "| sft-lora-fp32 | 1 | true | loaded |" in text and "n=1;" in text
    from trainables import warm_model

    try:  # --reuse-base-model: the second trial trains on the model the first left
        reused = first_step.run(["sft-lora-fp32"], repeat=2, steps=2, n_eval=2, model="tiny-random",
                                reuse_base_model=True)
    finally:
        warm_model.drop()
    assert [r["base_model"] for r in reused] == ["loaded", "reused"]
    with pytest.raises(SystemExit, match="--kinds nope: allowed values: sft-lora-fp32"):
        first_step.run(["nope"], 1, 2, 2, model="tiny-random")


def test_first_step_in_thread_runs_each_trial_in_its_own_thread_and_takes_its_reports():
    """--in-thread, as Ray Tune runs a trial: a new thread per trial, every report taken by the main thread
    (the trial's thread waits until it is), the trial's metrics returned, its error re-raised here."""
    import threading

    import first_step

    seen = []

    def trial(report):
        seen.append(threading.current_thread() is not threading.main_thread())
        for step in range(3):
            report({"step": step})  # would block for ever if nothing took it
        return {"done": 1.0}

    assert first_step.in_a_thread_as_ray_runs_it(trial) == {"done": 1.0} and seen == [True]

    def failing(report):
        raise ValueError("bad trial")

    with pytest.raises(ValueError, match="bad trial"):
        first_step.in_a_thread_as_ray_runs_it(failing)


def test_project_cost_gives_a_random_checkpoint_a_real_tokenizer_and_generation_works(runs, tmp_path):
    """bench/'s random-weights checkpoints carry a word-level tokenizer: real text becomes <unk> and generation's
    stop strings fail on it (the 8B calibration of 2026-11-23 failed so). The view keeps the weights, links not
    copies, and brings SmolLM2's tokenizer; a trial with generations then runs on it."""
    import torch
    from grit_speed import llama_config
    from project_cost import with_tokenizer
    from trainable_vs_trl import save_random_checkpoint

    from trainables import tracking
    from trainables.models import EMBEDDED, load_tokenizer
    from trainables.trial import run_trial

    ckpt = tmp_path / "tiny-llama"
    save_random_checkpoint(llama_config(True), ckpt, "cpu", torch.float32)
    with pytest.raises(SystemExit, match="--tokenizer .*: 49152 tokens, more than .* vocabulary"):
        with_tokenizer(str(ckpt), EMBEDDED)
    save_random_checkpoint(llama_config(True).__class__(**{**llama_config(True).to_dict(), "vocab_size": 49152}),
                           ckpt, "cpu", torch.float32)
    (ckpt / "generation_config.json").unlink()  # a file gone from the source is gone from a view made again
    view = Path(with_tokenizer(str(ckpt), EMBEDDED))
    assert all((view / f).is_symlink() for f in ("config.json", "model.safetensors"))
    assert Path(with_tokenizer(str(ckpt), EMBEDDED)) == view and not (view / "generation_config.json").exists()
    assert load_tokenizer(str(view)).get_vocab() == load_tokenizer(EMBEDDED).get_vocab()
    cfg = {"model": str(view), "method": "dpo", "precision": "fp32", "data": "generated", "template": "llama3",
           "n_train": 16, "n_eval": 2, "max_steps": 1, "micro_batch": 1, "eval": {"n_generate": 1, "max_new_tokens": 4}}
    metrics = run_trial(cfg, "a", runs, tracking.ensure_experiment(tracking.client(runs), "t"))
    assert metrics["eval/n_generated"] == 1


def test_step1_profiles_finds_what_one_group_spends_more_on(tmp_path, capsys):
    """Group B's trials spend 40 ms more in one frame: the comparison ranks it first, with the right sign and
    size; a worker's first (cold) trial is left out unless asked."""
    import step1_profiles

    def folded(path, waits):  # 1 ms per sample: `waits` samples in wait(), 10 in forward()
        path.write_text(f"# seconds_per_sample 0.001\nt.py:step:1;t.py:wait:2 {waits}\nt.py:step:1;t.py:forward:3 10\n")

    for group, waits in (("a", 10), ("b", 50)):
        (tmp_path / group).mkdir()
        for n in (1, 2):
            folded(tmp_path / group / f"dpo-lora-bf16-{ord(group)}-{n}.folded", waits)
    folded(tmp_path / "b" / "dpo-lora-bf16-98-0.folded", 1000)  # cold: would dominate B's mean
    funcs, n = step1_profiles.load(str(tmp_path / "b"), cold=False)
    assert n == 2 and step1_profiles.load(str(tmp_path / "b"), cold=True)[1] == 3
    assert funcs["t.py:step:1"][1] == pytest.approx(2 * 0.060)  # inclusive: everything under step, both trials
    step1_profiles.main([str(tmp_path / "a"), str(tmp_path / "b"), "--top", "3"])
    out = capsys.readouterr().out
    own = out.split("## B - A")[1].split("\n\n")[1].splitlines()
    frame, a_s, b_s, delta = [c.strip() for c in own[2].strip("|").split("|")]
    assert frame == "t.py:wait:2" and float(a_s) == pytest.approx(0.010) and float(delta) == pytest.approx(0.040)
    with pytest.raises(SystemExit, match="no step-1 samples"):
        step1_profiles.load(str(tmp_path), cold=False)


def test_memory_peak_replays_to_the_largest_live_total_and_names_who_allocated():
    import memory_peak

    ours = [{"filename": "/x/lib/python3.11/site-packages/torch/nn/functional.py", "line": 1, "name": "linear"},
            {"filename": "/x/lib/python3.11/site-packages/trl/trainer/sft_trainer.py", "line": 7, "name": "loss"}]
    other = [{"filename": "/x/site-packages/peft/tuners/lora/layer.py", "line": 3, "name": "forward"}]
    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": ours},
        {"action": "alloc", "addr": 2, "size": 50, "frames": other},
        {"action": "free_requested", "addr": 2, "size": 50},   # not yet free: the peak counts it
        {"action": "alloc", "addr": 3, "size": 30, "frames": other},
        {"action": "free_completed", "addr": 2, "size": 50},
        {"action": "free_completed", "addr": 9, "size": 70},   # allocated before recording: ignored
        {"action": "alloc", "addr": 4, "size": 60, "frames": ours},  # 100 + 30 + 60: the new peak
        {"action": "free_completed", "addr": 4, "size": 60},
    ]
    peak, blocks = memory_peak.live_at_peak(trace)
    assert peak == 190 and sorted(blocks) == [1, 3, 4]
    rows = memory_peak.by_owner(blocks)
    assert rows[0] == ("trl/trainer/sft_trainer.py:7 loss", 160, 2)
    assert rows[1] == ("peft/tuners/lora/layer.py:3 forward", 30, 1)


def test_gc_census_counts_what_a_full_collection_walks_and_freezing_leaves_out(tmp_path):
    """bench/gc_census.py on the CPU (tiny Llama): each census line counts the tracked objects, training's
    collections are listed by generation, and with --frozen what lived before training is out of the collector's
    view after it."""
    import re

    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gc_census.py"), "--tiny", "--steps", "3", "--frozen"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = {m[0]: (int(m[1]), int(m[2])) for m in re.findall(
        r"^(after the imports|trainer built|after training): (\d+) tracked objects \((\d+) frozen", proc.stdout, re.M)}
    assert set(counts) == {"after the imports", "trainer built", "after training"}
    imports, built, trained = counts["after the imports"], counts["trainer built"], counts["after training"]
    assert imports[1] == built[1] == 0 and imports[0] < built[0]
    assert trained[1] >= built[0] > 10 * trained[0]
    assert "training: 3 steps in " in proc.stdout
    assert re.search(r"^  generation 2: \d+ collections", proc.stdout, re.M)


def test_pool_combines_every_order_of_several_runs_kept_with_times(tmp_path):
    """--pool reads --times files and gives one ratio per case over all their orders: with a build-order bias b
    (r*b in one order, r/b in the other) and runs r1, r2, the pooled ratio is sqrt(r1 * r2)."""
    tvt = _tvt()
    rng = random.Random(0)

    def run(ratio, bias, orders=("trainable built first", "bare built first")):
        def order(b):
            bare = [0.7 + rng.random() * 0.1 for _ in range(20)]
            return {"bare": {"wall": bare}, "trainable": {"wall": [x * ratio * b for x in bare]}}
        return {"case": "dpo-nf4", "shape": "llama3-8b", "block": 1, "heap_frozen": True,
                "orders": dict(zip(orders, (order(bias), order(1 / bias))))}

    files = []
    for i, r in enumerate((0.9, 1.2)):
        files.append(tmp_path / f"run{i}.jsonl")
        files[-1].write_text(json.dumps(run(r, 1.05)) + "\n")
    line = tvt.pooled([str(f) for f in files])
    assert line.startswith("dpo-nf4 (llama3-8b, heap frozen while training): 4 orders pooled, trainable/bare ")
    assert f"{math.sqrt(0.9 * 1.2):.3f} (means)" in line and "95% CI" in line
    bad = tmp_path / "bad.jsonl"
    for broken, why in ((run(1.0, 1.0) | {"block": 5}, "--block 1"),
                        (run(1.0, 1.0, orders=("trainable built first",)), "unbalanced build orders")):
        bad.write_text(json.dumps(broken) + "\n")
        with pytest.raises(SystemExit, match=why):
            tvt.pooled([str(bad)])
    short = run(1.0, 1.0)
    short["orders"]["bare built first"]["trainable"]["wall"].pop()
    bad.write_text(json.dumps(short) + "\n")
    with pytest.raises(SystemExit, match="did not time the same steps"):
        tvt.pooled([str(bad)])


def test_the_interleaver_trains_both_sides_with_the_heap_frozen_and_unfreezes_after():
    """Both sides step with what lived before frozen (a trial freezes after building its trainer, so full
    collections do not land on one side at random), and nothing stays frozen afterwards."""
    import gc
    from types import SimpleNamespace

    tvt = _tvt()
    blocks = tvt.abba("bare", "trainable", 0, 2, 1)

    class FakeTrainer:
        def __init__(self, name):
            self.steps = sum(n for side, n in blocks if side == name)
            self.callbacks, self.frozen = [], []

        def add_callback(self, cb):
            self.callbacks.append(cb)

        def train(self):
            for step in range(self.steps):
                for cb in self.callbacks:
                    cb.on_step_begin(None, SimpleNamespace(global_step=step), None)
                self.frozen.append(gc.get_freeze_count())

    gc.unfreeze()
    sides = {name: tvt.Side(name, FakeTrainer(name)) for name in ("bare", "trainable")}
    tvt.Interleaver(sides, blocks).run()
    for s in sides.values():
        assert s.error is None and len(s.trainer.frozen) == s.trainer.steps and all(s.trainer.frozen)
        assert len(s.times) == len(s.cpu) == len(s.gc) == s.trainer.steps - 1
    assert gc.get_freeze_count() == 0


def test_op_census_finds_the_trainable_dispatching_what_bare_trl_does():
    """bench/op_census.py on the CPU (tiny Llama, fp32): the trainable and bare TRL run the same operators per step,
    for SFT and for DPO (the trainable's DPO keeps checkpointing on in the reference pass: on the CPU, the same
    operators; on a GPU, +2 aten::empty per layer, BENCHMARKS.md). The window holds whole steps: one profiled step
    counts what each of two does."""
    import re

    def census(steps: int, cases=("sft-fp32", "dpo-fp32")) -> dict[str, tuple[int, int]]:
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "op_census.py"), "--tiny", "--steps", str(steps),
                               "--warmup", "1", "--cases", *cases], capture_output=True, text=True, cwd=ROOT,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert proc.stdout.count("same operators, kernel launches and GPU kernels per step") == len(cases)
        return {c: (int(t), int(b)) for c, t, b in re.findall(
            r"^(\w+-fp32): per step: aten operators trainable (\d+), bare (\d+);", proc.stdout, re.M)}

    two = census(2)
    assert list(two) == ["sft-fp32", "dpo-fp32"]
    for trainable, bare in two.values():
        assert trainable == bare > 100
    assert census(1, ["sft-fp32"])["sft-fp32"] == two["sft-fp32"]


def test_op_census_lists_the_operators_and_kernels_whose_counts_differ():
    import op_census

    same = {"aten::mm": 4, "aten::add_": 2, "cudaLaunchKernel": 6, "kernel: gemm": 4, "bitsandbytes::dequant": 1}
    lines = op_census.report("sft-bf16", {"trainable": op_census.Side(same, 1.0, 0.1),
                                          "bare": op_census.Side(dict(same), 2.0, 0.2)})
    assert lines[1:] == ["sft-bf16: same operators, kernel launches and GPU kernels per step"]
    hooked = dict(same, **{"aten::mm": 5, "aten::mul": 1, "cudaLaunchKernel": 8, "kernel: gemm": 5,
                           "kernel: mul": 1})
    lines = op_census.report("sft-bf16", {"trainable": op_census.Side(hooked, 1.0, 0.1),
                                          "bare": op_census.Side(same, 1.0, 0.1)}, top=4)
    assert ("aten operators trainable 8, bare 6; kernel launches trainable 8, bare 6; GPU kernels trainable 6, "
            "bare 4") in lines[0]
    assert lines[1:] == [f"  {op}: +{d:.1f} per step (trainable - bare)" for op, d in
                         (("cudaLaunchKernel", 2), ("aten::mm", 1), ("aten::mul", 1), ("kernel: gemm", 1))] + [
                            "  ... and 1 more"]
