"""What is live at a trial's peak GPU memory, against the memory planner's parts (trainables/memory.py).

The planner's estimate must be within 15% of the measured peak on the benchmark cases; where it is not, this shows
which allocations make up the difference. What torch allocates once per process (the cuBLAS workspaces) is measured
first and kept out of each case, then added back to compare with the planner, which counts it as a trial's own
process holds it. It trains the project's trainable (trainables.trial.prepare, as
bench/trainable_vs_trl.py builds it, on the same synthetic data) for a few steps with torch's allocator history
recording Python stacks, replays the history to the moment of the largest allocated total, and groups the blocks
live then by the first frame outside torch (the code that asked for them). GPU only.

    python bench/memory_peak.py --shape smollm2 --cases sft-nf4 sft-bf16     # ~1 min on an H100
    python bench/memory_peak.py --shape llama3-8b --cases dpo-bf16 --varied --set micro_batch=4 \
        --set gradient_checkpointing=false --steps 12 --top 0                # reserved vs allocated, 8B

Prints the first-use allocations, then per case: the measured peak (torch.cuda.max_memory_allocated, without and
with the first use) and the reserved peak (what the caching allocator holds: the planner's allocator headroom
covers the difference), the replayed peak (without the first use), the planner's estimate and parts, and the live
blocks at the peak by frame (MiB, count).
"""
from __future__ import annotations

import argparse
import collections
import os
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


def varied_data(method, ckpt, seq: int, rows: int):
    """bench/trainable_vs_trl.py's exact-length rows at 8 lengths from seq/2 to seq, shuffled: a real dataset's
    spread of batch shapes, which is what leaves the caching allocator's blocks cut for other sizes."""
    from datasets import concatenate_datasets
    from trainable_vs_trl import data_for

    lengths = [seq // 2 + k * (seq // 2) // 7 // 8 * 8 for k in range(8)]
    return concatenate_datasets([data_for(method, ckpt, n, rows // 8 + 1) for n in lengths]).shuffle(seed=0)


def run_case(case: str, a, first_use: int) -> None:
    """first_use: the process's one-time allocations (process_first_use), excluded from the measured peak and
    added back to compare with the planner, which counts them as a trial's process holds them."""
    import torch
    from trainable_vs_trl import checkpoint, completion_tokens, data_for, shape_of, trial_config, with_trainable_set
    from trainables import memory
    from trainables.trial import free_memory, prepare

    method, precision = case.split("-")
    model_name, ckpt = checkpoint(a)
    cfg = with_trainable_set(trial_config(method, precision, model_name, a.seq, a.micro_batch, 1, a.steps), a.set)
    rows = a.steps * cfg.micro_batch + 8
    ds = varied_data(method, ckpt, a.seq, rows) if a.varied else data_for(method, ckpt, a.seq, rows)
    # --varied's rows are no longer than --seq: its completions are the longest
    est = memory.estimate_peak(cfg, shape_of(model_name, ckpt), seq_len=a.seq, completion_len=completion_tokens(a.seq))
    free_memory()
    base = torch.cuda.memory_allocated()  # what an earlier case left: not this one's
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, context="all", stacks="python")
    try:
        trainer, _, _ = prepare(cfg, tempfile.mkdtemp(prefix="mempeak_"), callbacks=[], train_ds=ds)
        trainer.train()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    measured = torch.cuda.max_memory_allocated() - base
    as_trial = measured + first_use  # what a trial's own process reads
    reserved = torch.cuda.max_memory_reserved()
    trace = [ev for dev in snap["device_traces"] for ev in dev]
    peak, blocks = live_at_peak(trace)
    print(f"\n## {case} ({a.shape}, seq {a.seq}{' varied' if a.varied else ''}, micro-batch {cfg.micro_batch}, "
          f"checkpointing {cfg.gradient_checkpointing}, {a.steps} steps{', ' + ' '.join(a.set) if a.set else ''}; "
          f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')!r})")
    print(f"measured peak {measured / MiB:.1f} MiB allocated (less {base / MiB:.1f} MiB allocated before it), "
          f"{as_trial / MiB:.1f} with the {first_use / MiB:.1f} MiB of first use, as a trial's process reads it; "
          f"{reserved / MiB:.1f} MiB reserved; replayed peak {peak / MiB:.1f} MiB ({len(blocks)} blocks); "
          f"planner {est.total / MiB:.1f} MiB at '{est.moment}' "
          f"({100 * (est.total - as_trial) / as_trial:+.1f}% of that); "
          f"reserved - allocated = {(reserved - measured - base) / MiB:.1f} MiB = "
          f"{(reserved - measured - base) / max(est.transient, 1):.2f} x the planner's transient part; the "
          f"planner's allocator headroom {memory.allocator_headroom(est) / MiB:.1f} MiB")
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
    ap.add_argument("--varied", action="store_true", help="rows of 8 lengths from seq/2 to seq, not all seq")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="change the trial's config, e.g. gradient_checkpointing=false, micro_batch=4")
    ap.add_argument("--ckpt-dir", default=None, help="as bench/trainable_vs_trl.py (8B random checkpoint)")
    a = ap.parse_args()
    a.tiny = False
    import torch
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (torch's allocator history)")
    first_use = process_first_use()
    print("allocated on first use in this process (the cases below start after it, so exclude it): "
          + ", ".join(f"{k} {v / MiB:.1f} MiB" for k, v in first_use.items()))
    for case in a.cases:
        run_case(case, a, sum(first_use.values()))


def process_first_use() -> dict[str, int]:
    """What torch allocates once per process or thread, not per step, that max_memory_allocated() counts: the
    cuBLAS/cuBLASLt workspace of each (handle, stream), so of the main thread (forward) and of autograd's device
    thread (backward)."""
    import torch

    out, before = {}, torch.cuda.memory_allocated()
    x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = x @ x  # forward matmul: the main thread's handle
    out["main thread matmul"] = torch.cuda.memory_allocated() - before - 2 * x.nbytes
    mark = torch.cuda.memory_allocated()
    y.sum().backward()  # the matmul's backward runs in autograd's device thread
    out["backward thread matmul"] = torch.cuda.memory_allocated() - mark - x.grad.nbytes
    del x, y
    return out


if __name__ == "__main__":
    main()
