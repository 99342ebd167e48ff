"""Does the project's trainable dispatch the same work per step as bare TRL? Operator and kernel counts, side by side.

bench/trainable_vs_trl.py times the two sides against each other. On the 8B shape at micro-batch 1 a step is bound
by Python launching kernels (GPU kernels ~0.16 s of a ~0.4 s step), so a ratio of a few percent could come from the
work each side dispatches, or from the noise of a launch-bound step (its A/A control read up to 0.94-1.06). This
tells the two apart without timing: it builds each side as trainable_vs_trl.py does (the trainable through
trainables.trial.prepare with the trial's MLflow step logger, bare TRL + PEFT by hand, the same data), trains each
alone for --warmup + --steps steps, and counts under torch.profiler, over the last --steps:
- aten operator calls per step (nested ones included), and the operators whose counts differ between the sides;
- kernel launches per step (CUDA runtime and driver launch calls; 0 on a CPU);
- the profiled CPU self time per step, all threads (the profiler inflates it: compare the two sides, not with
  trainable_vs_trl's step times).
Equal counts mean both sides run the same operators and kernels; a step-time ratio away from 1 then comes from
Python around them (callbacks, the step logger) or from noise.

    python bench/op_census.py --cases sft-bf16 sft-nf4 dpo-bf16            # Llama-3-8B shape (random weights), GPU
    python bench/op_census.py --shape smollm2 --cases sft-nf4 dpo-bf16
    python bench/op_census.py --tiny                                       # CPU check (tiny Llama, fp32)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


class Census:
    """A TrainerCallback: torch.profiler over the steps after `warmup`; `counts` and `cpu_us` per event name."""

    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        census = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == warmup:
                    census.start()

            def on_train_end(self, args, state, control, **kw):
                census.stop(state.global_step - warmup)

        self.callback = Callback()
        self.prof, self.counts, self.cpu_us, self.steps, self.wall = None, {}, {}, 0, 0.0

    def start(self):
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.prof = profile(activities=activities)
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def stop(self, steps: int):
        if self.prof is None:
            return
        self.wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        events = self.prof.key_averages()
        self.counts = {e.key: e.count for e in events}
        self.cpu_us = {e.key: e.self_cpu_time_total for e in events}
        self.steps, self.prof = steps, None

    def per_step(self) -> dict:
        n = max(self.steps, 1)
        return {"aten": sum(c for k, c in self.counts.items() if k.startswith("aten::")) / n,
                "launches": sum(self.counts.get(k, 0) for k in LAUNCHES) / n,
                "cpu_ms": sum(self.cpu_us.values()) / n / 1e3, "wall_s": self.wall / n}


def count_side(build, warmup: int) -> Census:
    """Builds one side (`build()` -> trainer), trains it with a Census, frees it."""
    from trainables.trial import free_memory

    census = Census(warmup)
    trainer = build()
    trainer.add_callback(census.callback)
    try:
        trainer.train()
    finally:
        trainer.accelerator.free_memory()
        del trainer
        free_memory()
    return census


def run_case(case: str, env, a) -> dict[str, Census]:
    import trainable_vs_trl as tvt

    method, precision = case.split("-")
    max_steps = a.warmup + a.steps
    data = tvt.data_for(method, env.ckpt, a.seq, max_steps + 8)
    cfg = tvt.trial_config(method, precision, env.model_name, a.seq, 1, 1, max_steps)
    return {"trainable": count_side(lambda: tvt.build_trainable(cfg, data, env)[0], a.warmup),
            "bare": count_side(lambda: tvt.build_bare(method, precision, env.ckpt, data, a.seq, 1, 1, max_steps,
                                                      env.tmp), a.warmup)}


def report(case: str, sides: dict[str, Census], top: int = 12) -> list[str]:
    t, b = sides["trainable"], sides["bare"]
    ts, bs = t.per_step(), b.per_step()
    lines = [f"{case}: per step over {t.steps} / {b.steps} steps: aten operators trainable {ts['aten']:.0f}, bare "
             f"{bs['aten']:.0f}; kernel launches trainable {ts['launches']:.0f}, bare {bs['launches']:.0f}; profiled "
             f"CPU ms trainable {ts['cpu_ms']:.1f}, bare {bs['cpu_ms']:.1f}; profiled wall s trainable "
             f"{ts['wall_s']:.3f}, bare {bs['wall_s']:.3f}"]
    names = set(t.counts) | set(b.counts)
    differ = {k: t.counts.get(k, 0) / max(t.steps, 1) - b.counts.get(k, 0) / max(b.steps, 1) for k in names
              if k.startswith("aten::") or k in LAUNCHES}
    differ = {k: d for k, d in differ.items() if d}
    if not differ:
        lines.append(f"{case}: same operators and kernel launches per step")
    for k in sorted(differ, key=lambda k: (-abs(differ[k]), k))[:top]:
        lines.append(f"  {k}: {differ[k]:+.1f} per step (trainable - bare)")
    return lines


def main():
    import trainable_vs_trl as tvt

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=tvt.SHAPES, default=None, help="default llama3-8b (--tiny: tiny)")
    ap.add_argument("--cases", nargs="+", choices=tvt.CASES, default=None,
                    help="method-precision (default sft-bf16 dpo-bf16; --tiny sft-fp32 dpo-fp32)")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps per side")
    ap.add_argument("--warmup", type=int, default=3, help="steps per side before the profiled ones")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024; --tiny 64)")
    ap.add_argument("--tiny", action="store_true", help="CPU check: tiny Llama shape, fp32")
    a = ap.parse_args()
    if not a.tiny and not tvt.cuda():
        sys.exit("No CUDA device: run with --tiny for a CPU check of the script.")
    a.shape = a.shape or ("tiny" if a.tiny else "llama3-8b")
    a.seq = a.seq or (64 if a.tiny else 1024)
    a.cases = a.cases or (["sft-fp32", "dpo-fp32"] if a.tiny else ["sft-bf16", "dpo-bf16"])
    a.ckpt_dir = None
    env = tvt.Env(a, "bench-op-census")
    for case in a.cases:
        tvt.log(f"{case} ...")
        for line in report(case, run_case(case, env, a)):
            print(line, flush=True)


if __name__ == "__main__":
    main()
