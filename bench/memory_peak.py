"""What is live at a trial's peak GPU memory, against the memory planner's parts (trainables/memory.py).

The planner's estimate must be within 15% of the measured peak on the benchmark cases; where it is not, this shows
which allocations make up the difference. It trains the project's trainable (trainables.trial.prepare, as
bench/trainable_vs_trl.py builds it, on the same synthetic data) for a few steps with torch's allocator history
recording Python stacks, replays the history to the moment of the largest allocated total, and groups the blocks
live then by the first frame outside torch (the code that asked for them). GPU only.

    python bench/memory_peak.py --shape smollm2 --cases sft-nf4 sft-bf16     # ~1 min on an H100

Prints, per case: the measured peak (torch.cuda.max_memory_allocated), the replayed peak, the planner's estimate
and parts, and the live blocks at the peak by frame (MiB, count).
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MiB = 2**20
SKIP = ("/torch/", "<frozen", "/contextlib.py", "/threading.py", "/functools.py")


def owner(frames: list[dict]) -> str:
    """The first (innermost) frame that is not torch's own machinery: the code that asked for the block."""
    for f in frames:
        if not any(s in f["filename"] for s in SKIP):
            name = f["filename"].split("site-packages/")[-1].split(str(ROOT) + "/")[-1]
            return f"{name}:{f['line']} {f['name']}"
    return "torch internals" if frames else "(no stack)"


def live_at_peak(trace: list[dict]) -> tuple[int, dict[int, dict]]:
    """Replay an allocator trace (alloc / free_completed events): the largest live total, and the blocks live
    then (address -> event). Blocks freed before recording started are not in it; blocks allocated before it are
    not counted."""
    live: dict[int, dict] = {}
    total = peak = 0
    at_peak: dict[int, dict] = {}
    for ev in trace:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
            total += ev["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            total -= live.pop(ev["addr"])["size"]
    return peak, at_peak


def by_owner(blocks: dict[int, dict]) -> list[tuple[str, int, int]]:
    sizes, counts = collections.Counter(), collections.Counter()
    for ev in blocks.values():
        k = owner(ev.get("frames", []))
        sizes[k] += ev["size"]
        counts[k] += 1
    return [(k, sizes[k], counts[k]) for k, _ in sizes.most_common()]


def run_case(case: str, a) -> None:
    import torch
    from trainable_vs_trl import checkpoint, data_for, shape_of, trial_config
    from trainables import memory
    from trainables.trial import free_memory, prepare

    method, precision = case.split("-")
    model_name, ckpt = checkpoint(a)
    cfg = trial_config(method, precision, model_name, a.seq, a.micro_batch, 1, a.steps)
    ds = data_for(method, ckpt, a.seq, a.steps * a.micro_batch + 8)
    est = memory.estimate_peak(cfg, shape_of(model_name, ckpt), seq_len=a.seq)
    free_memory()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, context="all", stacks="python")
    try:
        trainer, _, _ = prepare(cfg, tempfile.mkdtemp(prefix="mempeak_"), callbacks=[], train_ds=ds)
        trainer.train()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    measured = torch.cuda.max_memory_allocated()
    trace = [ev for dev in snap["device_traces"] for ev in dev]
    peak, blocks = live_at_peak(trace)
    print(f"\n## {case} ({a.shape}, seq {a.seq}, micro-batch {a.micro_batch}, {a.steps} steps)")
    print(f"measured peak {measured / MiB:.1f} MiB; replayed peak {peak / MiB:.1f} MiB ({len(blocks)} blocks); "
          f"planner {est.total / MiB:.1f} MiB at '{est.moment}' ({100 * (est.total - measured) / measured:+.1f}%)")
    print("planner parts: " + ", ".join(f"{k} {v / MiB:.1f}" for k, v in est.parts.items()))
    print("| live at the peak, by the frame that allocated it | MiB | blocks |\n|---|---|---|")
    for k, size, n in by_owner(blocks)[: a.top]:
        print(f"| {k} | {size / MiB:.1f} | {n} |")
    del trainer
    free_memory()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=("llama3-8b", "smollm2"), default="smollm2")
    ap.add_argument("--cases", nargs="+", default=["sft-nf4"], help="METHOD-PRECISION, e.g. sft-nf4 dpo-bf16")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per sequence (as bench/trainable_vs_trl.py)")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25, help="rows of the by-frame table")
    ap.add_argument("--ckpt-dir", default=None, help="as bench/trainable_vs_trl.py (8B random checkpoint)")
    a = ap.parse_args()
    a.tiny = False
    import torch
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (torch's allocator history)")
    for case in a.cases:
        run_case(case, a)


if __name__ == "__main__":
    main()
