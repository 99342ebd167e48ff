"""Does the project's trainable dispatch the same work per step as bare TRL? Operator and kernel counts, side by side.

bench/trainable_vs_trl.py times the two sides against each other. On the 8B shape at micro-batch 1 a step is bound
by Python launching kernels (GPU kernels ~0.16 s of a ~0.4 s step), so a ratio of a few percent could come from the
work each side dispatches, or from the noise of a launch-bound step (its A/A control read up to 0.94-1.06). This
tells the two apart without timing: it builds each side as trainable_vs_trl.py does (the trainable through
trainables.trial.prepare with the trial's MLflow step logger, bare TRL + PEFT by hand, the same data), trains each
alone, and counts under torch.profiler over --steps whole steps after --warmup (each step's batch fetch and
logging included; trainable_vs_trl.ProfiledWindow), per step:
- each namespaced operator (aten::, bitsandbytes::, autograd's backward functions; nested ones count), each
  kernel-launch call (CUDA runtime and driver) and each GPU kernel by name; then every one whose count differs;
- the profiled CPU self time, all threads, and the wall (the profiler inflates both: compare the two sides, not
  with trainable_vs_trl's step times).
Equal counts mean both sides run the same operators and the same kernels; a step-time ratio away from 1 then comes
from host-side time around them (callbacks, the step logger, the CPU time the same calls take) or from noise.

    python bench/op_census.py --cases sft-bf16 sft-nf4 dpo-bf16            # Llama-3-8B shape (random weights), GPU
    python bench/op_census.py --shape smollm2 --cases sft-nf4 dpo-bf16
    python bench/op_census.py --tiny                                       # CPU check (tiny Llama, fp32)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def dispatched(events, steps: int, kernel_type) -> dict[str, float]:
    """Per step: each namespaced operator (aten::, bitsandbytes::, autograd::engine::...), each kernel-launch call
    and each GPU kernel (by name, "kernel: ..."; copies and memsets left out). Nested operators count too."""
    counts = {}
    for e in events:
        if e.device_type == kernel_type:
            if not e.key.startswith(("Memcpy", "Memset")):
                counts[f"kernel: {e.key}"] = e.count / steps
        elif "::" in e.key or e.key in LAUNCHES:
            counts[e.key] = e.count / steps
    return counts


class Side:
    """One side's census: `counts` per step (`dispatched`), profiled CPU self time (all threads) and wall per step."""

    def __init__(self, counts: dict[str, float], cpu_ms: float, wall_s: float):
        self.counts, self.cpu_ms, self.wall_s = counts, cpu_ms, wall_s

    def total(self, kind: str) -> float:
        if kind == "aten":
            return sum(v for k, v in self.counts.items() if k.startswith("aten::"))
        if kind == "launches":
            return sum(self.counts.get(k, 0) for k in LAUNCHES)
        return sum(v for k, v in self.counts.items() if k.startswith("kernel: "))


def count_side(build, a) -> Side:
    """Builds one side (`build()` -> trainer), trains it with a profiled window over steps [warmup, warmup + steps),
    frees it."""
    import trainable_vs_trl as tvt
    from trainables.trial import free_memory

    trainer = build()
    window = tvt.ProfiledWindow(trainer, a.warmup, a.steps)
    try:
        trainer.train()
    finally:
        window.close()
        trainer.accelerator.free_memory()
        del trainer
        free_memory()
    if window.events is None:
        raise RuntimeError(f"training ended before step {a.warmup + a.steps}: the window was not profiled")
    cpu_us = sum(e.self_cpu_time_total for e in window.events)
    return Side(dispatched(window.events, a.steps, window.kernel), cpu_us / a.steps / 1e3, window.seconds / a.steps)


def run_case(case: str, env, a) -> dict[str, Side]:
    import trainable_vs_trl as tvt

    method, precision = case.split("-")
    max_steps = a.warmup + a.steps + 1  # the window closes as the step after it begins
    data = tvt.data_for(method, env.ckpt, a.seq, max_steps + 8)
    cfg = tvt.trial_config(method, precision, env.model_name, a.seq, 1, 1, max_steps)
    return {"trainable": count_side(lambda: tvt.build_trainable(cfg, data, env)[0], a),
            "bare": count_side(lambda: tvt.build_bare(method, precision, env.ckpt, data, a.seq, 1, 1, max_steps,
                                                      env.tmp), a)}


def report(case: str, sides: dict[str, Side], top: int = 12) -> list[str]:
    t, b = sides["trainable"], sides["bare"]
    totals = "; ".join(f"{label} trainable {t.total(kind):.0f}, bare {b.total(kind):.0f}" for kind, label in
                       (("aten", "aten operators"), ("launches", "kernel launches"), ("kernels", "GPU kernels")))
    lines = [f"{case}: per step: {totals}; profiled CPU ms trainable {t.cpu_ms:.1f}, bare {b.cpu_ms:.1f}; profiled "
             f"wall s trainable {t.wall_s:.3f}, bare {b.wall_s:.3f}"]
    differ = {k: t.counts.get(k, 0) - b.counts.get(k, 0) for k in set(t.counts) | set(b.counts)}
    differ = {k: d for k, d in differ.items() if d}
    if not differ:
        lines.append(f"{case}: same operators, kernel launches and GPU kernels per step")
    ranked = sorted(differ, key=lambda k: (-abs(differ[k]), k))
    lines += [f"  {k[:100]}: {differ[k]:+.1f} per step (trainable - bare)" for k in ranked[:top]]
    if len(ranked) > top:
        lines.append(f"  ... and {len(ranked) - top} more")
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
    if a.steps < 1 or a.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    if not a.tiny and not tvt.cuda():
        sys.exit("No CUDA device: run with --tiny for a CPU check of the script.")
    a.shape = a.shape or ("tiny" if a.tiny else "llama3-8b")
    a.seq = a.seq or (64 if a.tiny else 1024)
    a.cases = a.cases or (["sft-fp32", "dpo-fp32"] if a.tiny else ["sft-bf16", "dpo-bf16"])
    a.ckpt_dir = None  # trainable_vs_trl.default_ckpt_root
    env = tvt.Env(a, "bench-op-census")
    try:
        for case in a.cases:
            tvt.log(f"{case} ...")
            for line in report(case, run_case(case, env, a)):
                print(line, flush=True)
    finally:
        env.close()


if __name__ == "__main__":
    main()
