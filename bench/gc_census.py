"""What Python's garbage collector walks in a trial's process, and how often a full collection stops training.

A full (generation-2) collection walks every tracked object the process holds; in a trial's process that is mostly
what its imports made (torch, transformers, TRL, MLflow). This builds the project's trainable the way
bench/trainable_vs_trl.py does (trainables.trial.prepare, synthetic data), trains it, and prints:
- a census (tracked objects, the most common types, one full collection's seconds) after the imports, after the
  trainer is built, and after training;
- every collection Python ran while training, by generation: count and seconds, and for each full one its step;
- with --frozen, the same with everything alive frozen just before training, as trainables.trial does in a
  process's first trial (later trials train with what the first left alive frozen for good).

CPython (3.11, 3.12) runs a full collection when the objects promoted to the oldest generation since the last one
exceed 25% of the long-lived ones it walked then, so a frozen (smaller) heap gets smaller but more frequent full
collections: compare the total seconds, not the pauses.

    python bench/gc_census.py --case dpo-nf4 --steps 40            # Llama-3-8B shape (random weights), GPU
    python bench/gc_census.py --case dpo-nf4 --steps 40 --frozen
    python bench/gc_census.py --tiny --steps 4                     # CPU check of the script
"""
from __future__ import annotations

import argparse
import collections
import gc
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def census(label: str):
    started = time.perf_counter()
    gc.collect()
    seconds = time.perf_counter() - started
    objects = gc.get_objects()
    top = collections.Counter(type(o).__name__ for o in objects).most_common(8)
    print(f"{label}: {len(objects)} tracked objects ({gc.get_freeze_count()} frozen besides), one full collection "
          f"{seconds:.3f} s; most common: {', '.join(f'{k} {v}' for k, v in top)}", flush=True)


class Collections:
    """Each collection's generation, seconds and the training step it fell in (`timer` goes in gc.callbacks)."""

    def __init__(self):
        from trainables.trial import gc_pause_timer

        self.step, self.seen = 0, []
        self.timer = gc_pause_timer(lambda info, seconds: self.seen.append((info["generation"], seconds, self.step)))

    def report(self, steps: int, wall: float):
        print(f"training: {steps} steps in {wall:.1f} s", flush=True)
        for g in (0, 1, 2):
            mine = [s for gen, s, _ in self.seen if gen == g]
            print(f"  generation {g}: {len(mine)} collections, {sum(mine):.3f} s", flush=True)
        full = [f"step {step}: {s:.3f} s" for gen, s, step in self.seen if gen == 2]
        print(f"  full collections: {', '.join(full) or 'none'}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default=None, help="method-precision, as bench/trainable_vs_trl.py's cases "
                                                  "(default dpo-nf4; --tiny dpo-fp32)")
    ap.add_argument("--steps", type=int, default=40, help="training steps (a full collection comes every ~30 on the "
                                                          "8B shape)")
    ap.add_argument("--frozen", action="store_true", help="freeze everything alive just before training")
    ap.add_argument("--tiny", action="store_true", help="CPU check: tiny Llama shape, seq 64")
    a = ap.parse_args()

    import trainable_vs_trl as tvt
    from transformers import TrainerCallback

    if not a.tiny and not tvt.cuda():
        sys.exit("No CUDA device: run with --tiny for a CPU check of the script.")
    census("after the imports")
    a.case = a.case or ("dpo-fp32" if a.tiny else "dpo-nf4")
    method, precision = a.case.split("-")
    a.shape, a.seq = ("tiny" if a.tiny else "llama3-8b"), (64 if a.tiny else 1024)
    a.ckpt_dir = None  # trainable_vs_trl.default_ckpt_root
    env = tvt.Env(a, "bench-gc-census")
    try:
        data = tvt.data_for(method, env.ckpt, a.seq, a.steps + 8)
        cfg = tvt.trial_config(method, precision, env.model_name, a.seq, 1, 1, a.steps)
        trainer = tvt.build_trainable(cfg, data, env)[0]
        census("trainer built")
        seen = Collections()

        class StepOf(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                seen.step = state.global_step + 1

        trainer.add_callback(StepOf())
        if a.frozen:
            gc.freeze()
        gc.callbacks.append(seen.timer)
        started = time.perf_counter()
        try:
            trainer.train()
        finally:
            gc.callbacks.remove(seen.timer)
        seen.report(a.steps, time.perf_counter() - started)
        census("after training")
    finally:
        env.close()


if __name__ == "__main__":
    main()
